"""Evaluation benchmark: examples per second of batched greedy generation (engine.evaluate)
against the same backend's plain one-at-a-time greedy loop, and whether the answers are the
same.

    python -m bench.bench_eval [--run runs/<id>] [--examples 64] [--batch 8] [--new-tokens 48]

The prompts are the Pip sample's (assets/datasets/pip_chat.jsonl): each record's conversation
up to its last user turn, as ``tunelab eval`` builds them. PyTorch: the run's base model (the
embedded SmolLM2-135M by default) in float32, one prompt at a time through engine.inference's
plain decode loop (EagerDecoder: prefill, then one token per step on a KV cache) against
continuous batches (engine.evaluate.torch_greedy_batch: ``batch`` rows answer together, a
finished row's place goes to the next prompt at once). ONNX: the run's
exports (the default variant and int4) through onnxruntime-genai, one generator per prompt against one generator
with ``batch_size`` > 1. Without --run a run with a small random LoRA is made and exported
(bench.bench_inference.make_demo_run). Writes bench/results/eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PIP = Path(__file__).resolve().parent.parent / "assets" / "datasets" / "pip_chat.jsonl"


def pip_prompts(count: int) -> list[list[dict]]:
    from engine.data import load_records
    from engine.evaluate import examples_from_records

    examples, _ = examples_from_records(load_records(PIP).records)
    if len(examples) < count:
        raise SystemExit(f"{PIP} has {len(examples)} examples, fewer than --examples {count}")
    return [e.prompt for e in examples[:count]]


def one_at_a_time(model, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The backend's plain greedy loop, one prompt after another (the stop tokens end a reply)."""
    from engine.inference import GenerationSettings, TorchChatModel

    if isinstance(model, TorchChatModel):
        model = TorchChatModel(
            model.model,
            model.tokenizer,
            backend=model.backend,
            label=model.label,
            source=model.source,
            chat_template=model.chat_template,
            fast_decode=False,
        )
    settings = GenerationSettings(max_new_tokens=new_tokens, greedy=True)
    replies = []
    for ids in prompt_ids:
        reply = []
        for token in model.token_stream(ids, settings):
            if token in model.stop_ids:
                break
            reply.append(token)
        replies.append(reply)
    return replies


def batched(model, prompt_ids: list[list[int]], new_tokens: int, batch: int) -> list[list[int]]:
    from engine.evaluate import batch_generator, onnx_greedy_batch

    # ONNX: the batched loop an evaluation does not use yet (its answers differ), measured
    # so that its speed and its agreement are on record.
    generate = batch_generator(model)
    if generate is not None:  # continuous batching: `batch` rows at a time over all prompts
        return generate(model, prompt_ids, new_tokens, batch_size=batch)
    replies = []
    for start in range(0, len(prompt_ids), batch):
        replies += onnx_greedy_batch(model, prompt_ids[start : start + batch], new_tokens)
    return replies


def measure(name: str, model, prompts, new_tokens: int, batch: int) -> dict:
    from engine.inference import normalize_messages

    ids = [model.encode_prompt(normalize_messages(p)) for p in prompts]
    started = time.perf_counter()
    single = one_at_a_time(model, ids, new_tokens)
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    together = batched(model, ids, new_tokens, batch)
    batch_s = time.perf_counter() - started
    row = {
        "backend": name,
        "examples": len(prompts),
        "batch": batch,
        "one_at_a_time_examples_per_s": len(prompts) / single_s,
        "batched_examples_per_s": len(prompts) / batch_s,
        "speedup": single_s / batch_s,
        "same_answers": sum(a == b for a, b in zip(single, together)),
        "new_tokens": sum(len(r) for r in single),
    }
    print(
        f"{name}: one at a time {row['one_at_a_time_examples_per_s']:.2f} examples/s, batch {batch} "
        f"{row['batched_examples_per_s']:.2f} examples/s ({row['speedup']:.1f}x), same answers "
        f"{row['same_answers']}/{len(prompts)}",
        flush=True,
    )
    return row


def to_markdown(result: dict) -> str:
    lines = [
        "# Evaluation: batched greedy generation",
        "",
        f"{result['examples']} Pip prompts, at most {result['new_tokens']} new tokens, on {result['machine']}. "
        "Target: batch 8 at least 3x the one-at-a-time loop, with the same answers.",
        "",
        "| backend | one at a time (examples/s) | batch {b} (examples/s) | speed-up | same answers |".format(
            b=result["batch"]
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['backend']} | {row['one_at_a_time_examples_per_s']:.2f} | {row['batched_examples_per_s']:.2f} "
            f"| {row['speedup']:.1f}x | {row['same_answers']}/{row['examples']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench import machine
    from engine.config import DEFAULT_ONNX_VARIANT

    parser = argparse.ArgumentParser(prog="python -m bench.bench_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="A run with ONNX exports (default: a demo run made here).")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument(
        "--onnx",
        default=f"{DEFAULT_ONNX_VARIANT},int4",
        help="ONNX variants to measure, comma-separated (default: the default export, then int4).",
    )
    args = parser.parse_args(argv)

    from engine import export
    from engine.inference import load_chat_model

    prompts = pip_prompts(args.examples)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-eval-") as tmp:
        if args.run:
            run_dir = Path(args.run)
        else:
            from bench.bench_inference import make_demo_run

            run_dir = make_demo_run(Path(tmp))
        rows = [measure("PyTorch base fp32", load_chat_model(run_dir, "base"), prompts, args.new_tokens, args.batch)]
        for variant in [] if args.skip_onnx else args.onnx.split(","):
            if not (run_dir / "export" / f"onnx-{variant}" / "genai_config.json").is_file():
                export.export_onnx(run_dir, variant)
            onnx = load_chat_model(run_dir, "onnx", precision=variant)
            rows.append(measure(f"ONNX {variant}", onnx, prompts, args.new_tokens, args.batch))
            del onnx
    described = machine.describe()
    result = {
        "examples": args.examples,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "machine": f"{described['cpu']}, {described['logical_cores']} logical cores",
        "described": described,
        "rows": rows,
    }
    markdown = to_markdown(result)
    machine.write_results(RESULTS, "eval", result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
