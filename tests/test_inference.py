"""The streaming chat generator over the base, tuned and ONNX backends.

The tiny model is trained for a few seconds on three chats (tiny_runs.chat_base), so it
answers them and stops at <|im_end|>; the tuned run adds a random LoRA adapter, and its
ONNX fp32 export must make the same greedy choices as PyTorch.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
from pathlib import Path

import pytest
import torch
from tiny_runs import CHATS, chat_base, make_adapter_run, make_full_run, shared_adapter_run

from engine import export, inference
from engine.inference import (
    ChatEvent,
    GenerationSettings,
    InferenceError,
    OnnxChatModel,
    TorchChatModel,
    build_chat_model,
    load_chat_model,
    normalize_messages,
    stream_chat,
)

OPEN_PROMPT = [{"role": "user", "content": "Tell me something about the sea, please."}]


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return chat_base(tiny_model_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory) -> Path:
    run_dir = shared_adapter_run(tmp_path_factory.getbasetemp(), base_dir)
    export.export_onnx(run_dir, "fp32")
    return run_dir


@pytest.fixture(scope="module")
def tuned(run) -> TorchChatModel:
    return load_chat_model(run, "tuned")


@pytest.fixture(scope="module")
def onnx(run) -> OnnxChatModel:
    return load_chat_model(run, "onnx", precision="fp32")


@pytest.fixture(scope="module")
def base(run) -> TorchChatModel:
    return load_chat_model(run, "base")


def _events(model, messages, settings, **kwargs) -> list[ChatEvent]:
    return list(model.generate(messages, settings, **kwargs))


# ---------------------------------------------------------------- replies and stopping


def test_base_model_answers_and_stops_at_im_end(base):
    for question, answer in CHATS:
        events = _events(
            base, [{"role": "user", "content": question}], GenerationSettings(greedy=True, max_new_tokens=40)
        )
        assert [e.kind for e in events][-1] == "done" and all(e.kind == "text" for e in events[:-1])
        text = "".join(e.text for e in events[:-1])
        stats = events[-1].stats
        assert text == answer
        assert stats.finish_reason == "eos" and stats.new_tokens < 40
        assert 2 not in stats.token_ids and "<|im_end|>" not in text


def test_every_backend_stops_at_im_end(tuned, onnx):
    for model in (tuned, onnx):
        text, stats = model.complete(
            [{"role": "user", "content": CHATS[0][0]}], GenerationSettings(greedy=True, max_new_tokens=40)
        )
        assert stats.finish_reason == "eos", model.label
        assert text and "<|im_end|>" not in text


@pytest.mark.parametrize("backend", ["tuned", "onnx"])
def test_a_stopped_generation_stops(backend, tuned, onnx):
    model = {"tuned": tuned, "onnx": onnx}[backend]
    settings = GenerationSettings(greedy=True, max_new_tokens=60, min_new_tokens=60)
    stop = threading.Event()
    pieces = 0
    stats = None
    for event in model.generate(OPEN_PROMPT, settings, stop=stop):
        if event.kind == "text":
            pieces += 1
            if pieces == 3:
                stop.set()
        elif event.kind == "done":
            stats = event.stats
    assert stats.finish_reason == "stopped"
    assert 3 <= stats.new_tokens < 10
    # without the stop it runs to the end
    assert model.complete(OPEN_PROMPT, settings)[1].new_tokens == 60


def test_stop_from_another_thread_and_before_start(tuned):
    settings = GenerationSettings(greedy=True, max_new_tokens=500, min_new_tokens=500)
    stop = threading.Event()
    first = threading.Event()
    result = {}

    def consume():
        for event in tuned.generate(OPEN_PROMPT, settings, stop=stop):
            if event.kind == "text":
                first.set()
            elif event.kind == "done":
                result["stats"] = event.stats

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(60)
    stop.set()
    worker.join(60)
    assert result["stats"].finish_reason == "stopped" and result["stats"].new_tokens < 500

    already = threading.Event()
    already.set()
    text, stats = tuned.complete(OPEN_PROMPT, settings, stop=already)
    assert text == "" and stats.new_tokens == 0 and stats.finish_reason == "stopped"


def test_stats_describe_the_reply(tuned):
    settings = GenerationSettings(greedy=True, max_new_tokens=12, min_new_tokens=12)
    text, stats = tuned.complete(OPEN_PROMPT, settings)
    assert stats.backend == "tuned"
    assert stats.prompt_tokens == len(tuned.encode_prompt(normalize_messages(OPEN_PROMPT)))
    assert stats.new_tokens == len(stats.token_ids) == 12 and stats.finish_reason == "length"
    assert text == tuned.decode(stats.token_ids)
    assert 0 < stats.ttft_s <= stats.total_s
    assert stats.decode_tokens_per_s > 0 and stats.tokens_per_s > 0
    assert "12 tokens" in stats.summary()
    assert set(stats.to_dict()) >= {"ttft_s", "decode_tokens_per_s", "tokens_per_s", "finish_reason"}


# ---------------------------------------------------------------- settings mean the same everywhere


@pytest.mark.parametrize(
    "settings",
    [
        GenerationSettings(greedy=True, max_new_tokens=24),
        GenerationSettings(temperature=0.0, max_new_tokens=24),
        GenerationSettings(temperature=1.0, top_k=1, seed=5, max_new_tokens=24),
        GenerationSettings(temperature=1.0, top_k=0, top_p=1e-6, seed=5, max_new_tokens=24),
        GenerationSettings(greedy=True, repetition_penalty=1.5, max_new_tokens=24),
        GenerationSettings(greedy=True, min_new_tokens=20, max_new_tokens=24),
    ],
    ids=["greedy", "temperature0", "top_k1", "top_p_tiny", "repetition_penalty", "min_new_tokens"],
)
def test_deterministic_settings_give_the_same_tokens_on_pytorch_and_onnx(settings, tuned, onnx):
    for messages in (OPEN_PROMPT, [{"role": "user", "content": CHATS[1][0]}]):
        _, pt = tuned.complete(messages, settings)
        _, ox = onnx.complete(messages, settings)
        assert pt.token_ids == ox.token_ids
        assert pt.finish_reason == ox.finish_reason


def test_repetition_penalty_changes_the_reply(tuned):
    plain = tuned.complete(OPEN_PROMPT, GenerationSettings(greedy=True, max_new_tokens=24, min_new_tokens=24))[1]
    penalised = tuned.complete(
        OPEN_PROMPT, GenerationSettings(greedy=True, max_new_tokens=24, min_new_tokens=24, repetition_penalty=2.0)
    )[1]
    assert plain.token_ids != penalised.token_ids
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))


@pytest.mark.parametrize("backend", ["tuned", "onnx"])
def test_sampling_draws_from_the_top_k_and_repeats_with_a_seed(backend, tuned, onnx):
    model = {"tuned": tuned, "onnx": onnx}[backend]
    settings = GenerationSettings(temperature=3.0, top_k=3, top_p=1.0, seed=11, max_new_tokens=16, min_new_tokens=16)
    _, first = model.complete(OPEN_PROMPT, settings)
    _, again = model.complete(OPEN_PROMPT, settings)
    assert first.token_ids == again.token_ids
    # every sampled token is among the 3 most likely at its position (PyTorch logits;
    # min_new_tokens rules out <|im_end|> first, on both backends)
    prompt = tuned.encode_prompt(normalize_messages(OPEN_PROMPT))
    logits = tuned.logits(prompt + first.token_ids)
    logits[:, sorted(tuned.stop_ids)] = float("-inf")
    for i, token in enumerate(first.token_ids):
        top3 = torch.topk(logits[len(prompt) - 1 + i], 3).indices.tolist()
        assert token in top3
    replies = {
        tuple(
            model.complete(
                OPEN_PROMPT,
                GenerationSettings(temperature=3.0, top_k=3, seed=seed, max_new_tokens=16, min_new_tokens=16),
            )[1].token_ids
        )
        for seed in range(4)
    }
    assert len(replies) > 1


def test_cached_decode_loop_equals_full_recompute(tuned):
    """The KV-cache decoder is an implementation detail: a decoder that recomputes the
    whole sequence at each step (no cache) must choose the same tokens."""

    class RecomputeDecoder:
        def __init__(self, model, device):
            self.model, self.device, self.ids = model, device, []

        def _last(self):
            return self.model(input_ids=torch.tensor([self.ids]), use_cache=False).logits[0, -1].float()

        def prefill(self, ids):
            self.ids = list(ids)
            return self._last()

        def step(self, token_id):
            self.ids.append(token_id)
            return self._last()

    reference = TorchChatModel(
        tuned.model,
        tuned.tokenizer,
        backend="tuned",
        label="recompute",
        source="test",
        decoder_factory=RecomputeDecoder,
    )
    settings = GenerationSettings(greedy=True, max_new_tokens=20, min_new_tokens=20)
    for messages in (OPEN_PROMPT, [{"role": "user", "content": CHATS[2][0]}]):
        assert reference.complete(messages, settings)[1].token_ids == tuned.complete(messages, settings)[1].token_ids


def test_settings_are_checked():
    for bad in (
        dict(max_new_tokens=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(temperature=-1.0),
        dict(repetition_penalty=0.0),
        dict(min_new_tokens=9, max_new_tokens=8),
    ):
        with pytest.raises(InferenceError, match=next(iter(bad)) if "min" not in str(bad) else "min_new_tokens"):
            GenerationSettings(**bad)
    assert GenerationSettings(temperature=0).is_greedy and GenerationSettings(top_k=1).is_greedy
    assert not GenerationSettings().is_greedy


# ---------------------------------------------------------------- chat template and text


def test_multi_turn_and_system_prompt_use_the_chat_template(tuned, onnx):
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ]
    rendered = tuned.render(normalize_messages(messages, system="You are terse."))
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    )
    # the same text through ONNX Runtime GenAI's template engine, with and without a system prompt
    for system in ("You are terse.", None):
        normalized = normalize_messages(messages, system=system)
        assert onnx.render(normalized) == tuned.render(normalized)
        assert onnx.encode_prompt(normalized) == tuned.encode_prompt(normalized)
    # the system argument replaces a system message already there
    replaced = normalize_messages([{"role": "system", "content": "old"}, *messages], system="new")
    assert [m["content"] for m in replaced if m["role"] == "system"] == ["new"]


def test_streamed_pieces_join_to_the_text_even_inside_emoji(tuned):
    text = "Naïve café — 日本語 🙂👩‍💻 done"
    ids = tuned.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = inference._Detokenizer(tuned.decode)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streams, not all at the end


def test_bad_messages_are_named():
    cases = [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"messages\[1\]\.role: 'bot'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content: must be text"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
            r"messages\[1\]\.role: a system message may only come first",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "last message must come from the user",
        ),
        ([], "non-empty list"),
        (["hello"], r"messages\[0\]: must be a dict"),
    ]
    for messages, pattern in cases:
        with pytest.raises(InferenceError, match=pattern):
            normalize_messages(messages)
    assert normalize_messages("just text") == [{"role": "user", "content": "just text"}]


# ---------------------------------------------------------------- loading and the cache


def test_models_are_loaded_once_and_reloaded_when_their_files_change(base_dir, tmp_path):
    run = make_adapter_run(tmp_path, base_dir, name="cache-run", seed=3)
    messages: list[str] = []
    first = load_chat_model(run, "tuned", progress=messages.append)
    assert any("Loading" in m for m in messages) and any("loaded in" in m for m in messages)
    messages.clear()
    assert load_chat_model(run, "tuned", progress=messages.append) is first
    assert messages == []
    events = list(
        stream_chat(
            run, "tuned", [{"role": "user", "content": "Hi!"}], GenerationSettings(greedy=True, max_new_tokens=4)
        )
    )
    assert events[0].kind == "text" and events[-1].kind == "done"  # no loading the second time

    make_adapter_run(tmp_path, base_dir, name="cache-run", seed=4)  # "retrained"
    second = load_chat_model(run, "tuned")
    assert second is not first
    assert not torch.equal(first.logits([1, 2, 3]), second.logits([1, 2, 3]))


def test_stream_chat_reports_loading_first(base_dir, tmp_path):
    run = make_adapter_run(tmp_path, base_dir, name="status-run", seed=5)
    inference.unload_all()
    events = list(stream_chat(run, "base", "Hi!", GenerationSettings(greedy=True, max_new_tokens=8), system="Be kind."))
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["status", "status"] and kinds[-1] == "done" and "text" in kinds
    assert "Loading" in events[0].text and "loaded in" in events[1].text


def test_missing_model_files_give_clear_messages(base_dir, tmp_path):
    run = make_full_run(tmp_path, base_dir, base_dir, name="no-weights")
    import shutil

    shutil.rmtree(run / "model")
    with pytest.raises(InferenceError, match="no adapter/adapter_config.json nor model/config.json"):
        load_chat_model(run, "tuned")
    with pytest.raises(InferenceError, match="tunelab export .* --format onnx --precision int4"):
        load_chat_model(run, "onnx", precision="int4")
    with pytest.raises(InferenceError, match="backend: 'gpu' is not one of base, tuned, onnx"):
        load_chat_model(run, "gpu")
    with pytest.raises(InferenceError, match="not a run directory"):
        load_chat_model(tmp_path / "nowhere", "tuned")


def test_full_finetune_run_and_bare_model_dirs(base_dir, tmp_path):
    run = make_full_run(tmp_path, base_dir, base_dir, name="full")
    tuned = load_chat_model(run, "tuned")
    assert tuned.label.startswith("Tuned (PyTorch, full)")
    assert tuned.complete("Hi!", GenerationSettings(greedy=True, max_new_tokens=20))[0] == CHATS[0][1]
    bare = build_chat_model(inference.resolve_target(base_dir, "base"))
    assert bare.complete("Hi!", GenerationSettings(greedy=True, max_new_tokens=20))[0] == CHATS[0][1]


def test_onnx_export_directory_can_be_chatted_with_directly(run):
    model = build_chat_model(inference.resolve_target(run / "export" / "onnx-fp32", "onnx"))
    assert model.complete("Hi!", GenerationSettings(greedy=True, max_new_tokens=20))[1].finish_reason == "eos"


def test_onnx_sessions_use_every_core_unless_told_otherwise(run, monkeypatch, tmp_path):
    import os

    export_dir = run / "export" / "onnx-fp32"
    monkeypatch.delenv("TUNELAB_ONNX_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert OnnxChatModel(export_dir).threads == cores
    monkeypatch.setenv("TUNELAB_ONNX_THREADS", "1")
    one = OnnxChatModel(export_dir)
    assert one.threads == 1
    assert one.complete("Hi!", GenerationSettings(greedy=True, max_new_tokens=5))[1].new_tokens > 0
    monkeypatch.setenv("TUNELAB_ONNX_THREADS", "0")
    assert OnnxChatModel(export_dir).threads is None  # ONNX Runtime's own default
    monkeypatch.setenv("TUNELAB_ONNX_THREADS", "many")
    with pytest.raises(InferenceError, match="TUNELAB_ONNX_THREADS"):
        OnnxChatModel(export_dir)
    monkeypatch.delenv("TUNELAB_ONNX_THREADS")
    # a count written into the export's own genai_config.json is kept
    config = {"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}
    assert inference.onnx_threads(config) is None


# ---------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunelab chat")
    inference.add_cli_arguments(parser)
    return inference.run_cli(parser.parse_args(argv))


def test_chat_cli_one_prompt(run, capsys):
    assert _cli([str(run), "--backend", "base", "--prompt", "Hi!", "--greedy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reply"] == CHATS[0][1] and result["stats"]["finish_reason"] == "eos"
    assert (
        _cli(
            [
                str(run),
                "--backend",
                "onnx",
                "--precision",
                "fp32",
                "--prompt",
                "What is 2+2?",
                "--temperature",
                "0",
                "--system",
                "Be brief.",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens/s" in captured.err
    assert _cli([str(run), "--backend", "onnx", "--precision", "int8", "--prompt", "Hi"]) == 1
    assert "tunelab export" in capsys.readouterr().err
    assert _cli([str(run), "--prompt", "Hi", "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err


def test_chat_cli_repl_keeps_the_history(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\n\n/reset\nWhat is 2+2?\n/exit\n"))
    assert _cli([str(run), "--backend", "base", "--greedy", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert CHATS[0][1] in captured.out and CHATS[1][1] in captured.out
    assert "history cleared" in captured.err


# ---------------------------------------------------------------- the embedded model


@pytest.mark.integration
def test_embedded_model_on_pytorch_and_onnx_int4(embedded_dir, tmp_path):
    """SmolLM2-135M: a sensible greedy answer that stops at <|im_end|>, and its int4 export
    agrees with PyTorch on most greedy tokens."""
    base = build_chat_model(inference.resolve_target(embedded_dir, "base"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = GenerationSettings(greedy=True, max_new_tokens=48)
    text, stats = base.complete(messages, settings)
    assert "Paris" in text and stats.finish_reason == "eos"
    onnx_dir = export.build_onnx(embedded_dir, tmp_path / "onnx-int4", "int4")
    onnx = OnnxChatModel(onnx_dir)
    prompt = base.encode_prompt(normalize_messages(messages))
    assert onnx.encode_prompt(normalize_messages(messages)) == prompt
    reference = stats.token_ids + [2]
    predicted, _ = onnx.score_continuation(prompt, reference)
    agreement = sum(a == b for a, b in zip(predicted, reference)) / len(reference)
    assert agreement >= 0.5  # int4 costs a 135M model ~1 token in 3 (see bench/); a broken export gives ~0
    onnx_text, onnx_stats = onnx.complete(messages, settings)
    assert "Paris" in onnx_text and onnx_stats.finish_reason == "eos"
