"""The lean speculative decoder (engine/fastdecode.py): the float32 model's greedy reply,
token for token, whatever its 4-bit draft proposes, with the native kernels
(engine/kernels/lean.c) and with its PyTorch path."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_runs import CHATS, chat_base, shared_adapter_run

from engine import fastdecode, native
from engine.inference import GenerationSettings, TorchChatModel, load_chat_model, normalize_messages

PROMPTS = [[{"role": "user", "content": q}] for q, _ in CHATS[:3]] + [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me about the sea."}]
]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    base = chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())
    return shared_adapter_run(tmp_path_factory.getbasetemp(), base)


@pytest.fixture(scope="module", params=["base", "tuned"])
def chat(request, run) -> TorchChatModel:
    return load_chat_model(run, request.param)


def _runnable_isas() -> list[str]:
    """The native kernels' instruction sets this machine can build and run."""
    runnable = []
    for isa in native.ISAS:
        try:
            native.load(isa=isa)
        except native.NativeUnavailable:
            continue
        runnable.append(isa)
    return runnable


def _leans(chat) -> dict:
    """The chat model's own lean decoder (native kernels where they load), one on the
    PyTorch path, and one on each other instruction set of the kernels this CPU runs."""
    leans = {"default": chat.lean_model()}
    assert leans["default"] is not None, chat.lean_note
    if leans["default"].native is not None:
        leans["pytorch"] = fastdecode.LeanModel(chat.model, native=False)
        for isa in _runnable_isas():
            if isa != leans["default"].native.lib.isa:
                leans[isa] = fastdecode.LeanModel(chat.model, native=isa)
    return leans


def _lib_or_skip(isa: str):
    """The kernels built for ``isa``, or a skip that names what this machine lacks."""
    try:
        return native.load(isa=isa)
    except native.NativeUnavailable as err:
        pytest.skip(f"the {isa} kernels cannot run here: {err}")


def _hf_greedy(chat, prompt, new_tokens, min_new_tokens=0):
    with torch.inference_mode():
        out = chat.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            eos_token_id=sorted(chat.stop_ids),
            pad_token_id=min(chat.stop_ids),
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_replies_equal_transformers_generate(chat, monkeypatch):
    leans = _leans(chat)
    for name, lean in leans.items():
        for messages in PROMPTS:
            prompt = chat.encode_prompt(normalize_messages(messages))
            assert list(lean.greedy(prompt, 40, chat.stop_ids)) == _hf_greedy(chat, prompt, 40), name
            forced = list(lean.greedy(prompt, 30, chat.stop_ids, min_new_tokens=30))
            assert len(forced) == 30 and forced == _hf_greedy(chat, prompt, 30, min_new_tokens=30), name
    # a prompt longer than the native prompt pass takes goes through PyTorch's, then native checks
    monkeypatch.setattr(fastdecode, "NATIVE_PROMPT", 3)
    for name, lean in leans.items():
        prompt = chat.encode_prompt(normalize_messages(PROMPTS[3]))
        assert list(lean.greedy(prompt, 30, chat.stop_ids)) == _hf_greedy(chat, prompt, 30), name


# /proc/cpuinfo of the CPU kinds tunelab meets (flags shortened to those that matter)
EPYC_AVX2 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx f16c fma avx2 bmi2\n"
XEON_AMX = (
    "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu sse2 avx f16c fma avx2 avx512f "
    "avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile\n"
)
EPYC_AVX512 = "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512_bf16\n"
OLD_AVX = "model name\t: Intel(R) Xeon(R) E5-2670\nflags\t\t: fpu sse2 avx\n"


def test_the_instruction_set_follows_the_cpu_flags():
    """The choice between the AVX-512 and the AVX2 build, on faked /proc/cpuinfo flags."""
    flags = {
        name: native._cpu_flags(text)
        for name, text in {"epyc_avx2": EPYC_AVX2, "xeon": XEON_AMX, "epyc_avx512": EPYC_AVX512, "old": OLD_AVX}.items()
    }
    assert "avx2" in flags["epyc_avx2"] and "avx512f" not in flags["epyc_avx2"]
    x86 = {"machine": "x86_64"}
    assert native.choose_isa(flags["epyc_avx2"], "", **x86) == "avx2"
    assert native.choose_isa(flags["xeon"], "", **x86) == "avx512"
    assert native.choose_isa(flags["epyc_avx512"], "auto", **x86) == "avx512"
    assert native.choose_isa(flags["xeon"], "avx2", **x86) == "avx2"  # asked for: AVX-512 CPUs run AVX2
    with pytest.raises(native.NativeUnavailable, match="avx2 f16c fma"):
        native.choose_isa(flags["old"], "", **x86)
    with pytest.raises(native.NativeUnavailable, match="lacks: avx512f"):
        native.choose_isa(flags["epyc_avx2"], "avx512", **x86)
    with pytest.raises(native.NativeUnavailable, match="TUNELAB_NATIVE=0"):
        native.choose_isa(flags["xeon"], "0", **x86)
    with pytest.raises(native.NativeUnavailable, match="none of"):
        native.choose_isa(flags["xeon"], "sse9", **x86)
    with pytest.raises(native.NativeUnavailable, match="x86-64, not aarch64"):
        native.choose_isa(flags["xeon"], "", machine="aarch64")
    # each instruction set is built and cached on its own (the key names the compiler)
    if native.shutil.which(native.os.environ.get("CC") or "cc"):
        assert native.library_path(flags["xeon"], "avx2") != native.library_path(flags["xeon"], "avx512")


@pytest.mark.parametrize("isa", list(native.ISAS))
def test_this_machine_runs_the_kernels_its_cpu_allows(isa):
    """Where the CPU reports the flags an instruction set needs and a C compiler is there,
    its kernels must load (not silently fall back) and be built for that instruction set."""
    needs = native.ISAS[isa][0]
    missing = needs - native._cpu_flags()
    if missing or native.platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"this CPU lacks {' '.join(sorted(missing)) or 'x86-64'}: the {isa} kernels cannot run here")
    if not native.shutil.which(native.os.environ.get("CC") or "cc"):
        pytest.skip("no C compiler here: the PyTorch path is tested instead")
    lib = native.load(isa=isa)
    assert lib.isa == isa and lib.tl_init(2) >= 1
    if native.ISAS["avx512"][0] <= native._cpu_flags():
        assert native.choose_isa(native._cpu_flags(), "") == "avx512"


def test_the_avx2_build_uses_no_avx512_instructions():
    """An AVX-512 machine builds the AVX2 kernels too (tests, benchmarks): that library
    must hold no AVX-512 instruction, or it would crash on the AVX2 machines it is for."""
    lib = _lib_or_skip("avx2")
    objdump = native.shutil.which("objdump")
    if not objdump:
        pytest.skip("objdump (binutils) is not installed")
    code = native.subprocess.run([objdump, "-d", lib._name], capture_output=True, text=True, check=True).stdout
    assert "vfmadd" in code and "ymm" in code  # it is vectorised
    import re

    evex = re.findall(r"%zmm\d+|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[1-7]\b", code)
    assert not evex, f"AVX-512 registers in the AVX2 build: {sorted(set(evex))[:5]}"


@pytest.mark.parametrize("penalty", [1.15, 1.6])
def test_a_repetition_penalty_gives_the_plain_loops_reply(chat, penalty):
    """With a penalty, each choice depends on the tokens before it, guesses included."""
    plain = TorchChatModel(
        chat.model, chat.tokenizer, backend=chat.backend, label="plain", source="test", fast_decode=False
    )
    for messages in PROMPTS:
        settings = GenerationSettings(greedy=True, repetition_penalty=penalty, max_new_tokens=40)
        fast = chat.complete(messages, settings)[1]
        reference = plain.complete(messages, settings)[1]
        assert fast.decoder.startswith("speculative") and reference.decoder == "plain"
        assert fast.token_ids == reference.token_ids
    for lean in _leans(chat).values():
        for messages in PROMPTS[:2]:
            settings = GenerationSettings(greedy=True, repetition_penalty=penalty, max_new_tokens=40)
            prompt = chat.encode_prompt(normalize_messages(messages))
            fast = [
                t for t in lean.greedy(prompt, 40, chat.stop_ids, repetition_penalty=penalty) if t not in chat.stop_ids
            ]
            assert fast == plain.complete(messages, settings)[1].token_ids
    with torch.inference_mode():  # and the penalty does change the reply
        prompt = chat.encode_prompt(normalize_messages(PROMPTS[0]))
        assert list(chat.lean_model().greedy(prompt, 40, chat.stop_ids, repetition_penalty=1.6)) != list(
            chat.lean_model().greedy(prompt, 40, chat.stop_ids)
        )


def test_a_useless_draft_changes_nothing_but_speed(chat, monkeypatch):
    """Replace the draft's guesses by noise: every guess is rejected or accepted by the
    float32 check alone, so the reply must still be the model's greedy reply."""
    plain = TorchChatModel(
        chat.model, chat.tokenizer, backend=chat.backend, label="plain", source="test", fast_decode=False
    )
    penalised = GenerationSettings(greedy=True, repetition_penalty=1.3, max_new_tokens=40)
    for lean in _leans(chat).values():
        real = lean.propose
        generator = torch.Generator().manual_seed(0)

        def noisy(seq, guesses, real=real, generator=generator):
            row = real(seq, guesses)
            return torch.randn(row.shape, generator=generator)

        monkeypatch.setattr(lean, "propose", noisy)
        for messages in PROMPTS[:2]:
            prompt = chat.encode_prompt(normalize_messages(messages))
            assert list(lean.greedy(prompt, 40, chat.stop_ids)) == _hf_greedy(chat, prompt, 40)
            fast = [t for t in lean.greedy(prompt, 40, chat.stop_ids, repetition_penalty=1.3) if t not in chat.stop_ids]
            assert fast == plain.complete(messages, penalised)[1].token_ids


def test_target_logits_match_the_model_and_survive_a_rollback(chat):
    ids = chat.encode_prompt(normalize_messages(PROMPTS[0]))
    for name, lean in _leans(chat).items():
        with torch.inference_mode():
            reference = chat.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
            lean.target.reserve(len(ids) + 8)
            head = lean.target.forward(ids[:-5])  # the prompt pass (PyTorch on both paths)
            tail = lean.check(ids[-5:], len(ids) - 5)  # the check pass (native where it loads)
            assert torch.allclose(torch.cat([head, tail]), reference, atol=1e-4), name
            lean.target.reserve(len(ids) + 8)
            last = lean.prefill(ids[:-5])  # the prompt pass of a reply (native where it loads)
            assert lean.target.length == len(ids) - 5
            assert torch.allclose(last, reference[-6], atol=1e-4), name
            tail = lean.check(ids[-5:], len(ids) - 5)  # reads the keys and values prefill cached
            assert torch.allclose(tail, reference[-5:], atol=1e-4), name
            rows = [lean.check([t], len(ids) - 5 + i)[0].clone() for i, t in enumerate(ids[-5:])]  # rolled back
            assert torch.allclose(torch.stack(rows), reference[-5:], atol=1e-4), name
            # the draft is a different (4-bit) model, yet close to it
            lean.target.length = len(ids) - 5
            if lean.draft is not None:
                lean.draft.reserve(len(ids))
                lean.draft.length = 0
                lean.draft.forward(ids[:-5])
            # seq = ids[:-4] (its last token not in the cache yet), then j earlier guesses
            draft = torch.stack([lean.propose(ids[:-4], ids[-4 : len(ids) - 4 + j]).clone() for j in range(5)])
        assert not torch.equal(draft, reference[-5:]), name
        assert (draft.argmax(-1) == reference[-5:].argmax(-1)).float().mean() >= 0.6, name


def test_the_chat_loop_uses_it_for_greedy_replies_only(chat, monkeypatch):
    greedy = GenerationSettings(greedy=True, max_new_tokens=20)
    text, stats = chat.complete(PROMPTS[0], greedy)
    assert stats.decoder.startswith("speculative") and "speculative" in stats.summary()
    assert (
        stats.token_ids
        == _hf_greedy(chat, chat.encode_prompt(normalize_messages(PROMPTS[0])), 20)[: len(stats.token_ids)]
    )
    sampled = GenerationSettings(temperature=0.8, seed=1, max_new_tokens=8)
    assert chat.complete(PROMPTS[0], sampled)[1].decoder == "plain"
    too_long = GenerationSettings(greedy=True, max_new_tokens=chat.model.config.max_position_embeddings)
    assert chat.decoder_name(too_long, 10) == "plain"


def test_a_reply_while_the_decoder_is_busy_uses_and_names_the_plain_loop(chat):
    """One speculative reply at a time per model: another one meanwhile (another thread)
    takes the plain loop, and its statistics say so."""
    greedy = GenerationSettings(greedy=True, max_new_tokens=12)
    fast = chat.complete(PROMPTS[1], greedy)[1]
    assert fast.decoder.startswith("speculative")
    assert chat._lean_lock.acquire(blocking=False)  # as if another reply held it
    try:
        busy = chat.complete(PROMPTS[1], greedy)[1]
    finally:
        chat._lean_lock.release()
    assert busy.decoder == "plain" and busy.token_ids == fast.token_ids


def test_it_can_be_switched_off_and_refuses_what_it_cannot_run(run, monkeypatch):
    from transformers import AutoModelForCausalLM

    chat = load_chat_model(run, "base")
    monkeypatch.setenv("TUNELAB_FAST_DECODE", "0")
    plain = TorchChatModel(chat.model, chat.tokenizer, backend="base", label="plain", source="test")
    assert plain.lean_model() is None
    assert plain.complete(PROMPTS[0], GenerationSettings(greedy=True, max_new_tokens=5))[1].decoder == "plain"
    monkeypatch.delenv("TUNELAB_FAST_DECODE")
    monkeypatch.setattr(chat.model.config, "model_type", "gpt2")
    with pytest.raises(fastdecode.Unsupported, match="gpt2"):
        fastdecode.LeanModel(chat.model)
    monkeypatch.undo()
    half = AutoModelForCausalLM.from_pretrained(chat.model.name_or_path, dtype=torch.bfloat16)
    with pytest.raises(fastdecode.Unsupported, match="float32"):
        fastdecode.LeanModel(half)


def test_without_the_native_kernels_it_says_why_and_uses_pytorch(run, monkeypatch, tmp_path):
    chat = load_chat_model(run, "base")
    monkeypatch.setenv("TUNELAB_NATIVE", "0")
    lean = fastdecode.LeanModel(chat.model)
    assert lean.native is None and lean.draft is not None and "TUNELAB_NATIVE=0" in lean.native_note
    with pytest.raises(fastdecode.Unsupported, match="TUNELAB_NATIVE=0"):
        fastdecode.LeanModel(chat.model, native=True)
    monkeypatch.delenv("TUNELAB_NATIVE")
    # a machine without a compiler: the build is refused with the reason, nothing cached
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    try:
        native.choose_isa(native._cpu_flags(), "")
        cpu_ok = True
    except native.NativeUnavailable:
        cpu_ok = False
    if cpu_ok:
        with pytest.raises(native.NativeUnavailable, match="no C compiler"):
            native.load()
        assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").iterdir())
        # a cache folder that cannot be written: refused with the reason too
        monkeypatch.delenv("CC")
        blocker = tmp_path / "file-not-folder"
        blocker.write_text("x")
        monkeypatch.setenv("TUNELAB_CACHE", str(blocker))
        with pytest.raises(native.NativeUnavailable, match="building"):
            native.load()


def _native_or_skip():
    try:
        return native.load()
    except native.NativeUnavailable as err:
        pytest.skip(f"native kernels unavailable here: {err}")


def _head_only_model(lib, vocab: int = 200, hidden: int = 96, rows: int = 3):
    """A model with no layers (final norm and an int4 head) and its buffers, made with torch."""
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(vocab, hidden, generator=generator)
    buffers = {
        "norm": torch.ones(hidden),
        "head": head,
        "blocks": torch.empty(-(-vocab // 16) * (hidden // 32) * 320, dtype=torch.uint8),
        "dims": torch.tensor([0, hidden, 2, 1, 16, 32, vocab], dtype=torch.int64),
        "x": torch.randn(rows, hidden, generator=generator),
        "logits": torch.full((rows, vocab), float("nan")),
        "cache": torch.zeros(1, 1, 8, 16),
        "angles": torch.zeros(8, 16),
    }
    assert lib.tl_pack_int4(head.data_ptr(), vocab, hidden, buffers["blocks"].data_ptr()) == 0
    buffers["table"] = torch.tensor([buffers["norm"].data_ptr(), 0, buffers["blocks"].data_ptr(), 0], dtype=torch.int64)
    buffers["caches"] = torch.tensor([buffers["cache"].data_ptr()], dtype=torch.int64)
    model = lib.tl_model(buffers["dims"].data_ptr(), buffers["table"].data_ptr(), 1e-5)
    buffers["scratch"] = torch.zeros(lib.tl_scratch_floats(model, rows))
    return model, buffers


def _head_only_forward(lib, model, b) -> int:
    """One pass over b["x"] (a copy: the pass overwrites its input) into b["logits"]; no torch ops."""
    rows = b["x"].shape[0]
    x = b["x"].clone() if "x_work" not in b else b["x_work"]
    b["x_work"] = x
    return lib.tl_forward(
        model,
        x.data_ptr(),
        rows,
        0,
        b["caches"].data_ptr(),
        b["caches"].data_ptr(),
        8,
        b["angles"].data_ptr(),
        b["angles"].data_ptr(),
        b["logits"].data_ptr(),
        0,
        b["scratch"].data_ptr(),
    )


@pytest.mark.parametrize("isa", list(native.ISAS))
def test_int4_packing_keeps_each_weight_within_half_a_step(isa):
    """A head-only model (no layers) in int4 against the same product in float32 with the
    weights each moved by at most half a quantization step: the logits differ by no more
    than that bound, and the top choices mostly agree."""
    lib = _lib_or_skip(isa)
    model, b = _head_only_model(lib)  # 200 rows: the last block of 16 is padded
    try:
        assert _head_only_forward(lib, model, b) == 0
    finally:
        lib.tl_model_free(model)
    hidden, head, logits = b["head"].shape[1], b["head"], b["logits"]
    normed = torch.nn.functional.rms_norm(b["x"], (hidden,), b["norm"], 1e-5)
    exact = normed @ head.T
    groups = head.view(head.shape[0], -1, 32)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 15 / 2).repeat_interleave(32, 1)  # [vocab, hidden]
    bound = normed.abs() @ half_step.T * 1.01 + 1e-3  # plus float16 rounding of scale and minimum
    assert torch.isfinite(logits).all()
    assert ((logits - exact).abs() <= bound).all()
    assert (logits - exact).abs().max() > 0  # it is quantized
    assert (logits.argmax(-1) == exact.argmax(-1)).sum() >= 2


def _child_pass(lib, model, buffers, queue):
    # no torch operations here: torch's own OpenMP pool does not survive fork() either
    status = _head_only_forward(lib, model, buffers)
    queue.put((status, buffers["logits"].tolist()))


@pytest.mark.parametrize("isa", list(native.ISAS))
def test_a_forked_process_runs_the_native_pass_alone(isa):
    """Threads do not survive fork(): a child process runs the native pass on its own
    thread instead of waiting for workers that are not there."""
    import multiprocessing

    lib = _lib_or_skip(isa)
    model, buffers = _head_only_model(lib)
    assert _head_only_forward(lib, model, buffers) == 0  # the parent's pool is running now
    expected = buffers["logits"].tolist()
    buffers["logits"].fill_(float("nan"))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_pass, args=(lib, model, buffers, queue))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    lib.tl_model_free(model)
    assert not alive, "the forked child hung in the native forward pass"
    status, logits = queue.get(timeout=10)
    assert child.exitcode == 0 and status == 0 and logits == expected


def test_a_qwen2_model_with_attention_biases_decodes_the_same():
    """Qwen2-style decoders add a bias to q, k and v: the lean passes (native and PyTorch)
    must carry it through the check and the draft."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases large enough to matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0, 0.5)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0]
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    leans = {"pytorch": fastdecode.LeanModel(model, native=False)}
    for isa in _runnable_isas():
        leans[isa] = fastdecode.LeanModel(model, native=isa)
    for name, lean in leans.items():
        with torch.inference_mode():
            lean.target.reserve(len(prompt) + 30)
            lean.target.forward(prompt[:-4])
            rows = lean.check(prompt[-4:], len(prompt) - 4)
            assert torch.allclose(rows, reference[-4:], atol=1e-4), name
        assert list(lean.greedy(prompt, 20, set())) == expected, name


def test_a_shape_the_kernels_do_not_take_falls_back_to_pytorch(run, monkeypatch):
    _native_or_skip()  # the refusal is only reached where the kernels load
    chat = load_chat_model(run, "base")

    monkeypatch.setattr(
        fastdecode._Native,
        "refusal",
        staticmethod(lambda cfg: "the native kernels need a head size divisible by 16 (it is 12)"),
    )
    lean = fastdecode.LeanModel(chat.model)
    assert lean.native is None and lean.draft is not None and "head size" in lean.native_note
    prompt = chat.encode_prompt(normalize_messages(PROMPTS[0]))
    assert list(lean.greedy(prompt, 20, chat.stop_ids)) == _hf_greedy(chat, prompt, 20)
    with pytest.raises(fastdecode.Unsupported, match="head size"):
        fastdecode.LeanModel(chat.model, native=True)


def test_the_kernels_refuse_real_shapes_they_cannot_run():
    """The shape guard on real model configs: SmolLM2's shape passes; sizes the kernels'
    vectors and int4 groups do not divide are refused with the size named."""
    smollm2 = {"hidden": 576, "inter": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}
    assert fastdecode._Native.refusal(smollm2) == ""
    assert "hidden size divisible by 32 (it is 48)" in fastdecode._Native.refusal({**smollm2, "hidden": 48})
    assert "MLP width divisible by 32 (it is 100)" in fastdecode._Native.refusal({**smollm2, "inter": 100})
    assert "head size divisible by 16" in fastdecode._Native.refusal({**smollm2, "heads": 8, "head_dim": 72})
    assert "at most 512 (it is 1024)" in fastdecode._Native.refusal({**smollm2, "heads": 1, "head_dim": 1024})


def test_a_model_whose_shape_the_kernels_refuse_decodes_on_pytorch():
    """A real Llama model with heads of 24 dimensions (not a multiple of 16): the native
    kernels refuse it, the PyTorch path decodes it, and the reply is generate()'s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _native_or_skip()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    lean = fastdecode.LeanModel(model)
    assert lean.native is None and "head size divisible by 16, at most 512 (it is 24)" in lean.native_note
    with pytest.raises(fastdecode.Unsupported, match="head size"):
        fastdecode.LeanModel(model, native=True)
    prompt = [5, 17, 42, 99, 7]
    with torch.inference_mode():
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert list(lean.greedy(prompt, 16, set())) == expected


@pytest.mark.parametrize(
    ("shape", "named"),
    [
        (
            {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 3},
            "hidden size divisible by 32 (it is 48)",
        ),
        (
            {"hidden_size": 64, "intermediate_size": 100, "num_attention_heads": 4},
            "MLP width divisible by 32 (it is 100)",
        ),
        (
            {"hidden_size": 96, "intermediate_size": 64, "num_attention_heads": 3, "head_dim": 16},
            "attention width divisible by 32 (it is 48)",
        ),
    ],
)
def test_real_models_with_widths_the_kernels_refuse(shape, named):
    """Real Llama models whose hidden size, MLP width or attention width (heads x head size) is
    not a multiple of 32: native=True is refused with the size named, from the model's own
    config; without it the lean decoder refuses the model as a whole (its 4-bit draft needs
    groups of 32 columns too), so chat falls back to generate()."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _native_or_skip()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, num_hidden_layers=1, num_key_value_heads=1, max_position_embeddings=64, **shape
    )
    model = LlamaForCausalLM(config).eval()
    assert named in fastdecode._Native.refusal(fastdecode.model_config(model))
    with pytest.raises(fastdecode.Unsupported, match=re.escape(named)):
        fastdecode.LeanModel(model, native=True)
    with pytest.raises(fastdecode.Unsupported, match="groups of 32 columns"):
        fastdecode.LeanModel(model)
