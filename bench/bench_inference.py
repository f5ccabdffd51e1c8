"""Inference benchmark: decode speed and time to first token of every chat backend, and
how closely the int4 export follows the tuned PyTorch model.

    python -m bench.bench_inference [--run runs/<id>] [--new-tokens 64] [--repeats 3]

Without --run it makes a run directory on the embedded SmolLM2-135M with a LoRA adapter
of random weights (small enough that the model still speaks). The run is exported to
ONNX int4 and fp32 (engine.export), then each backend answers the same probe chats
greedily with a fixed reply length (min_new_tokens = max_new_tokens), one model in
memory at a time:

* PyTorch base fp32 with transformers' own ``generate`` (the plain reference every
  speed-up is measured against),
* PyTorch base fp32, tuned (adapter unmerged) and tuned merged, through engine.inference's
  chat loop (greedy replies there use the speculative decoder of engine.fastdecode, with
  its native kernels where the machine allows),
* ONNX fp32 and ONNX int4 through onnxruntime-genai.

It prints a Markdown table and writes bench/results/inference.json and .md, with each
backend's weight bytes read per second against the copy bandwidth measured in the same
run (bytes of the weights one plain decode step reads: a model's parameters, an export's
initializers without the rotary tables), and how many greedy replies of the chat loop
equal generate()'s. Agreement is
teacher-forced: along the tuned PyTorch greedy reply, the share of positions where the
export's greedy choice is the same token.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EXTRA_PROBES = [
    "What is the capital of Italy?",
    "Give me three tips for better sleep.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue? Answer in two sentences.",
    "List the planets of the solar system.",
]


def make_demo_run(root: Path, base: str = "smollm2-135m-instruct", scale: float = 0.01, seed: int = 0) -> Path:
    """A run directory whose adapter is a LoRA (r=16, all linear layers) with random weights,
    the same for the same seed (so int4 agreement is comparable between runs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.config import MethodConfig, ModelConfig, RunConfig
    from engine.models import resolve_model

    run_dir = root / "bench-lora"
    run_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
    torch.manual_seed(seed)  # PEFT draws the A matrices from the global generator
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(run_dir / "adapter")
    RunConfig(
        model=ModelConfig(name_or_path=base), method=MethodConfig(name="lora", r=16, alpha=32, target_modules=targets)
    ).save(run_dir / "config.yaml")
    return run_dir


def _probes() -> list[list[dict]]:
    from engine.export import PROBES

    return [p["messages"] for p in PROBES] + [[{"role": "user", "content": q}] for q in EXTRA_PROBES]


class PlainGenerate:
    """transformers' own ``model.generate`` on a loaded PyTorch model (the plain reference).

    Time to first token comes from a 1-token call, the decode rate from the rest of an
    N-token call on the same prompt."""

    def __init__(self, chat_model):
        self.chat = chat_model

    def reply(self, messages, new_tokens: int) -> tuple[float, float]:
        import torch

        from engine.inference import normalize_messages

        ids = torch.tensor([self.chat.encode_prompt(normalize_messages(messages))])
        eos = min(self.chat.stop_ids)
        with torch.inference_mode():
            start = time.perf_counter()
            self.chat.model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=eos)
            first = time.perf_counter() - start
            start = time.perf_counter()
            self.chat.model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos
            )
            total = time.perf_counter() - start
        return (new_tokens - 1) / max(total - first, 1e-9), first


def one_reply(model, messages, new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, time to first token) of one greedy reply of fixed length."""
    from engine.inference import GenerationSettings

    if isinstance(model, PlainGenerate):
        return model.reply(messages, new_tokens)
    settings = GenerationSettings(greedy=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    _, stats = model.complete(messages, settings)
    return stats.decode_tokens_per_s, stats.ttft_s


def measure_round_robin(models: dict, probes, new_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s and time to first token of each model over probes x repeats.

    The models take turns reply by reply, so a change in the machine's load (other
    processes on a shared machine) affects all of them alike instead of one."""
    samples = {name: ([], []) for name in models}
    for name, model in models.items():
        one_reply(model, probes[0], 8)  # warm-up
    for _ in range(repeats):
        for messages in probes:
            for name, model in models.items():
                rate, ttft = one_reply(model, messages, new_tokens)
                samples[name][0].append(rate)
                samples[name][1].append(ttft)
    return {
        name: {
            "decode_tokens_per_s": round(statistics.median(rates), 2),
            "ttft_s": round(statistics.median(ttfts), 4),
            "best_decode_tokens_per_s": round(max(rates), 2),
            "samples": len(rates),
        }
        for name, (rates, ttfts) in samples.items()
    }


def same_as_generate(chat, probes, new_tokens: int) -> dict:
    """How many greedy replies of the chat loop equal transformers' ``generate`` token for token."""
    import torch

    from engine.inference import GenerationSettings, normalize_messages

    identical = 0
    for messages in probes:
        prompt = chat.encode_prompt(normalize_messages(messages))
        with torch.inference_mode():
            out = chat.model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=sorted(chat.stop_ids),
                pad_token_id=min(chat.stop_ids),
            )
        reference = [t for t in out[0, len(prompt) :].tolist() if t not in chat.stop_ids]
        _, stats = chat.complete(messages, GenerationSettings(greedy=True, max_new_tokens=new_tokens))
        identical += int(stats.token_ids == reference)
    return {"identical": identical, "replies": len(probes)}


# tables of which one decode step reads a single row: the rotary cos/sin caches of an export
ROW_TABLES = ("cos_cache", "sin_cache")


def onnx_weight_bytes(model_path: Path) -> int:
    """Bytes of an ONNX model's initializers (in the file or its external data), less the
    rotary tables, of which a decode step reads one row."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name.endswith(ROW_TABLES):
            continue
        external = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in external:
            total += int(external["length"])
        elif tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def weights_read_per_token(model) -> int:
    """Bytes of weights one plain decode step reads: parameters (PyTorch) or the export's
    initializers (ONNX; an embedding tied to the output layer is counted once, as the
    output layer reads all of it)."""
    if isinstance(model, PlainGenerate):
        model = model.chat
    export_dir = getattr(model, "export_dir", None)
    if export_dir is not None:
        return onnx_weight_bytes(Path(export_dir) / "model.onnx")
    return sum(p.numel() * p.element_size() for p in model.model.parameters())


def greedy_references(model, probes, new_tokens: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, greedy reply ids, reply ids with the end-of-turn token) per probe."""
    from engine.inference import GenerationSettings, normalize_messages

    out = []
    for messages in probes:
        prompt = model.encode_prompt(normalize_messages(messages))
        _, stats = model.complete(messages, GenerationSettings(greedy=True, max_new_tokens=new_tokens))
        ended = list(stats.token_ids) + ([2] if stats.finish_reason == "eos" else [])
        out.append((prompt, list(stats.token_ids), ended))
    return out


def agreement(references, model, probes, new_tokens: int) -> dict:
    """Teacher-forced greedy agreement and exact greedy replies of ``model`` vs the references."""
    from engine.inference import GenerationSettings

    agree = total = exact = 0
    for (prompt, reply, ended), messages in zip(references, probes):
        predicted, _ = model.score_continuation(prompt, ended)
        agree += sum(int(a == b) for a, b in zip(predicted, ended))
        total += len(ended)
        _, mine = model.complete(messages, GenerationSettings(greedy=True, max_new_tokens=new_tokens))
        exact += int(mine.token_ids == reply)
    return {"token_agreement": round(agree / total, 4), "tokens": total, "greedy_identical": f"{exact}/{len(probes)}"}


def kernel_build_cost() -> dict:
    """What compiling the native kernels costs on a fresh machine (built once into a
    temporary folder, whatever the cache holds), and which instruction set they are for."""
    from engine import native

    try:
        isa = native.choose_isa(native._cpu_flags())
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            native._build(Path(tmp) / "lean.so", isa)
            seconds = time.perf_counter() - t0
    except native.NativeUnavailable as err:
        return {"available": False, "reason": str(err)}
    return {"available": True, "isa": isa, "compile_s": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="Run directory to benchmark (default: a demo LoRA run).")
    parser.add_argument("--new-tokens", type=int, default=64, help="Reply length per probe (default 64).")
    parser.add_argument("--repeats", type=int, default=2, help="Passes over the probes per backend (default 2).")
    parser.add_argument("--probes", type=int, default=4, help="Probe chats timed per pass (default 4).")
    parser.add_argument("--block-size", type=int, default=None, help="int4 block size (default: engine.export's).")
    parser.add_argument("--out", default=str(RESULTS), help="Directory for inference.json / inference.md.")
    parser.add_argument(
        "--work",
        default=None,
        help="Keep the demo run in this directory (reused next time) instead of a temporary one.",
    )
    args = parser.parse_args(argv)

    from engine import export
    from engine.inference import GenerationSettings, OnnxChatModel, Target, build_chat_model, resolve_target
    from engine.util import dir_size

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    tmp_root = None
    if args.run:
        run_dir = Path(args.run)
    elif args.work and (Path(args.work) / "bench-lora" / "config.yaml").is_file():
        run_dir = Path(args.work) / "bench-lora"
    else:
        root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
        tmp_root = None if args.work else root
        print("Making a demo run: embedded SmolLM2-135M + a random LoRA adapter...", flush=True)
        run_dir = make_demo_run(root)
    block_size = args.block_size or export.DEFAULT_BLOCK_SIZE
    result: dict = {
        "run": str(run_dir) if args.run else "demo: smollm2-135m-instruct + random LoRA r=16",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "int4_block_size": block_size,
    }
    try:
        from bench.machine import describe, memory_bandwidth

        result["machine"] = {**describe(), "bandwidth_gbs": round(memory_bandwidth() / 1e9, 1)}
    except ImportError as err:
        result["machine"] = {"note": f"bench.machine unavailable: {err}"}
    result["machine"]["load_average_before"] = [round(x, 2) for x in os.getloadavg()]

    builds = {}
    for precision in ("fp32", "int4"):
        t0 = time.perf_counter()
        messages: list[str] = []

        def show(message: str) -> None:
            messages.append(message)
            print("  " + message, flush=True)

        path = export.export_onnx(run_dir, precision, block_size=block_size, progress=show)
        builds[precision] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "bytes": dir_size(path),
            "reused": any(f"ONNX {precision} export is up to date" in m for m in messages),
        }
    result["exports"] = builds

    probes_all = _probes()
    timed = probes_all[: args.probes]
    source = export.run_source(run_dir)
    result["first_reply_costs"] = {"native_kernels": kernel_build_cost()}
    print("Loading the backends...", flush=True)
    base = build_chat_model(resolve_target(run_dir, "base"))
    tuned = build_chat_model(resolve_target(run_dir, "tuned"))
    models = {
        "pytorch_base_generate": PlainGenerate(base),
        "pytorch_base": base,
        "pytorch_tuned": tuned,
        "pytorch_tuned_merged": build_chat_model(Target("tuned", "merged", model_dir=run_dir / "export" / "merged")),
        "onnx_fp32": OnnxChatModel(run_dir / "export" / "onnx-fp32"),
        "onnx_int4": OnnxChatModel(run_dir / "export" / "onnx-int4"),
    }
    # the lean decoder of each PyTorch chat model is built on its first greedy reply: timed here, apart
    builds = result["first_reply_costs"]["lean_decoder_s"] = {}
    for name in LEAN_BUILDS:
        t0 = time.perf_counter()
        lean = models[name].lean_model()
        builds[name] = round(time.perf_counter() - t0, 2)
        if lean is None:
            result["first_reply_costs"].setdefault("lean_decoder_notes", {})[name] = models[name].lean_note
    print(f"Timing {len(models)} backends in turn ({args.repeats} x {len(timed)} replies each)...", flush=True)
    rows = measure_round_robin(models, timed, args.new_tokens, args.repeats)
    print("Greedy references of tuned PyTorch and agreement of the exports...", flush=True)
    references = greedy_references(tuned, probes_all, args.new_tokens)
    agreements = {
        name: agreement(references, models[name], probes_all, args.new_tokens) for name in ("onnx_fp32", "onnx_int4")
    }
    print("Greedy replies of the chat loop vs transformers' generate()...", flush=True)
    result["chat_loop_vs_generate"] = same_as_generate(base, probes_all, args.new_tokens)
    result["chat_loop_decoder"] = base.decoder_name(GenerationSettings(greedy=True, max_new_tokens=args.new_tokens), 64)
    weight_bytes = {name: weights_read_per_token(model) for name, model in models.items()}
    del models, base, tuned
    gc.collect()
    bandwidth = result["machine"].get("bandwidth_gbs")
    for name, row in rows.items():
        row["weight_bytes"] = weight_bytes[name]
        row["weights_gbs"] = round(weight_bytes[name] * row["decode_tokens_per_s"] / 1e9, 2)
        if bandwidth:
            row["share_of_bandwidth"] = round(row["weights_gbs"] / bandwidth, 3)
    result["backends"] = rows
    result["agreement_vs_tuned_pytorch"] = agreements
    plain_rate = rows["pytorch_base_generate"]["decode_tokens_per_s"]
    result["int4_speedup_vs_pytorch_fp32"] = round(rows["onnx_int4"]["decode_tokens_per_s"] / plain_rate, 2)
    result["chat_loop_speedup_vs_generate"] = round(rows["pytorch_base"]["decode_tokens_per_s"] / plain_rate, 2)
    result["target_int4_5x"] = result["int4_speedup_vs_pytorch_fp32"] >= 5.0
    result["target_int4_60pct_bandwidth"] = rows["onnx_int4"].get("share_of_bandwidth", 0) >= 0.6
    identical = result["chat_loop_vs_generate"]
    result["target_chat_2x_same_greedy"] = (
        result["chat_loop_speedup_vs_generate"] >= 2.0 and identical["identical"] == identical["replies"]
    )
    result["target_chat_ttft_no_worse"] = rows["pytorch_base"]["ttft_s"] <= rows["pytorch_base_generate"]["ttft_s"]
    result["method"] = source["config"].method.name
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    from bench.machine import write_results

    write_results(args.out, "inference", result, to_markdown(result))
    if tmp_root is not None:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


LABELS = {
    "pytorch_base_generate": "PyTorch base fp32, transformers generate()",
    "pytorch_base": "PyTorch base fp32, tunelab chat loop",
    "pytorch_tuned": "PyTorch tuned, adapter unmerged, chat loop",
    "pytorch_tuned_merged": "PyTorch tuned, merged, chat loop",
    "onnx_fp32": "ONNX fp32 (onnxruntime-genai)",
    "onnx_int4": "ONNX int4 (onnxruntime-genai)",
}


# the chat models whose lean decoder build is timed, with their short names
LEAN_BUILDS = {"pytorch_base": "base", "pytorch_tuned": "tuned unmerged", "pytorch_tuned_merged": "tuned merged"}


def _build_time(build: dict) -> str:
    return "reused (built earlier)" if build.get("reused") else f"{build['seconds']} s"


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def _first_reply_costs(result: dict) -> str:
    costs = result.get("first_reply_costs", {})
    kernels = costs.get("native_kernels", {})
    if kernels.get("available"):
        parts = [
            f"compiling the native {kernels['isa']} kernels {kernels['compile_s']} s (once per machine, then cached)"
        ]
    else:
        parts = [f"no native kernels ({kernels.get('reason', 'not measured')})"]
    builds = [f"{LEAN_BUILDS[name]} {seconds} s" for name, seconds in costs.get("lean_decoder_s", {}).items()]
    if builds:
        parts.append("building the lean decoder (float32 copy + 4-bit draft): " + ", ".join(builds))
    return "; ".join(parts)


def to_markdown(result: dict) -> str:
    machine = result.get("machine", {})
    bandwidth = machine.get("bandwidth_gbs", "?")
    lines = [
        f"Inference on {machine.get('cpu', '?')} ({machine.get('logical_cores', '?')} cores, "
        f"{bandwidth} GB/s copy bandwidth, load average "
        f"{machine.get('load_average_before', ['?'])[0]} before / "
        f"{machine.get('load_average_after', ['?'])[0]} after); "
        f"{result['run']}; {result['new_tokens']} greedy tokens per reply, median over "
        f"{result['backends']['pytorch_base']['samples']} replies.",
        "",
        "| backend | decode tokens/s | time to first token | vs generate() | "
        f"weights read/s (share of {bandwidth} GB/s) | greedy agreement vs tuned PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    plain_rate = result["backends"]["pytorch_base_generate"]["decode_tokens_per_s"]
    plain_ttft = result["backends"]["pytorch_base_generate"]["ttft_s"]
    for name, row in result["backends"].items():
        agree = result["agreement_vs_tuned_pytorch"].get(name)
        agree_text = f"{agree['token_agreement']:.1%} ({agree['greedy_identical']} replies identical)" if agree else "-"
        share = (
            f"{row['weights_gbs']:.1f} GB/s ({row['share_of_bandwidth']:.0%})" if "share_of_bandwidth" in row else "-"
        )
        lines.append(
            f"| {LABELS.get(name, name)} | {row['decode_tokens_per_s']:.1f} | {row['ttft_s'] * 1000:.0f} ms | "
            f"{row['decode_tokens_per_s'] / plain_rate:.2f}x | {share} | {agree_text} |"
        )
    exports = result["exports"]
    same = result["chat_loop_vs_generate"]
    int4 = result["backends"]["onnx_int4"]
    lines += [
        "",
        f"- int4 (block size {result['int4_block_size']}) decodes {result['int4_speedup_vs_pytorch_fp32']}x as fast "
        f"as PyTorch fp32 generate() (target 5x: {_met(result['target_int4_5x'])}) and reads its weights at "
        f"{int4.get('share_of_bandwidth', 0):.0%} of the copy bandwidth (target 60%: "
        f"{_met(result['target_int4_60pct_bandwidth'])}).",
        f"- The chat loop ({result['chat_loop_decoder']} decoder) decodes {result['chat_loop_speedup_vs_generate']}x "
        f"as fast as generate(); its greedy replies equal generate()'s in {same['identical']}/{same['replies']} "
        f"probes (target 2x with identical replies: {_met(result['target_chat_2x_same_greedy'])}).",
        f"- Time to first token (median, warm-up reply excluded): chat loop "
        f"{result['backends']['pytorch_base']['ttft_s'] * 1000:.0f} ms, generate() "
        f"{plain_ttft * 1000:.0f} ms (target no worse: {_met(result['target_chat_ttft_no_worse'])}).",
        f"- One-off costs of a model's first greedy reply, not in the figures above: {_first_reply_costs(result)}.",
        '- "weights read/s" is the weight bytes of one plain decode step times decode tokens/s; the speculative '
        "chat loop checks several tokens per read of the float32 weights, so its figure can pass the ceiling.",
        f"- Export sizes: fp32 {exports['fp32']['bytes'] / 1e6:.0f} MB, int4 {exports['int4']['bytes'] / 1e6:.0f} MB; "
        f"build times: fp32 {_build_time(exports['fp32'])}, int4 {_build_time(exports['int4'])}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
