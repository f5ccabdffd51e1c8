"""Training benchmark: tunelab's LoRA run against a plain TRL SFTTrainer script, same model,
data, LoRA settings, batch, steps, learning rate and precision, in one run.

    python -m bench.bench_train [--steps 30] [--batch 8] [--data assets/datasets/pip_chat.jsonl]

Each trainer runs in its own process, one after the other (never two at once). For each:
non-padding tokens per second of ``trainer.train()``, peak resident memory, the final
training loss, and the validation loss of the saved adapter, measured afterwards by one
evaluator for all (assistant tokens only, on the same held-out split). Model FLOPs
utilisation counts 4·N FLOPs per token for an adapter (forward 2·N, backward through the
frozen weights 2·N, no weight gradients) against the matmul peak measured in the same run.

Writes bench/results/train.json and train.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def split_data(data: Path, out: Path, seed: int = 42) -> tuple[Path, Path, int]:
    """Write train.jsonl / val.jsonl with the split tunelab itself would make."""
    from engine.data import load_records, split_records

    result = load_records(str(data))
    train, val = split_records(result.records, 0.1, seed)
    paths = []
    for name, records in (("train", train), ("val", val)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], len(train)


def run_tunelab(
    model_dir: Path, train: Path, out: Path, steps: int, batch: int, precision: str, max_length: int
) -> dict:
    from engine.config import RunConfig

    run_dir = out / f"tunelab-{precision}"
    cfg = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(train), "validation_split": 0.0, "max_length": max_length},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "training": {
                "max_steps": steps,
                "batch_size": batch,
                "learning_rate": 2e-4,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.05,
                "precision": precision,
                "save_steps": 10_000,
                "logging_steps": 1,
            },
            "output": {"runs_dir": str(out)},
        }
    )
    config_path = out / f"tunelab-{precision}.yaml"
    cfg.save(config_path)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "--config", str(config_path), "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tunelab training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    status = json.loads((run_dir / "status.json").read_text())
    tokens = status["tokens_seen"]
    seconds = train_rows[-1]["elapsed_s"]
    return {
        "trainer": f"tunelab ({precision})",
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "final_loss": train_rows[-1]["loss"],
        "mean_loss_last5": sum(r["loss"] for r in train_rows[-5:]) / len(train_rows[-5:]),
        "peak_rss_mb": max(r.get("memory_peak_mb") or 0 for r in train_rows),
        "wall_seconds": time.perf_counter() - started,
        "adapter": str(run_dir / "adapter"),
    }


def run_trl(model_dir: Path, train: Path, out: Path, steps: int, batch: int, precision: str, max_length: int) -> dict:
    adapter = out / f"trl-{precision}"
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.trl_baseline",
            "--model-dir",
            str(model_dir),
            "--data",
            str(train),
            "--out",
            str(adapter),
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--precision",
            precision,
            "--max-length",
            str(max_length),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TRL baseline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(trainer=f"TRL script ({precision})", wall_seconds=time.perf_counter() - started, adapter=str(adapter))
    return result


def validation_loss(model_dir: Path, adapter: str, val: Path, max_length: int) -> float:
    """Mean loss over assistant tokens of the validation split, base + adapter, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.templates import training_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for line in val.read_text().splitlines():
            messages = json.loads(line)["messages"]
            ids, mask = training_example(messages, tokenizer, tokenizer.chat_template)
            ids, mask = ids[:max_length], mask[:max_length]
            labels = torch.tensor([i if m else -100 for i, m in zip(ids, mask)])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum", ignore_index=-100)
            total += float(loss)
            count += int((labels[1:] != -100).sum())
    return total / max(count, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO / "assets" / "datasets" / "pip_chat.jsonl"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="Comma-separated; bf16 is skipped on a CPU without bf16 instructions (it would be "
        "emulated there, and tunelab trains such a CPU in fp32).",
    )
    args = parser.parse_args(argv)

    from bench.machine import describe, matmul_peak_flops
    from engine.hardware import ModelShape, choose_precision, detect
    from engine.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    params = ModelShape.from_dir(model_dir).params
    machine = describe()
    profile = detect()
    precisions, skipped = [], []
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        if precision == "bf16" and not profile.gpus and not profile.cpu.native_bf16:
            skipped.append(
                f"bf16 skipped: this CPU ({profile.cpu.model}) has no bf16 instructions (no AVX512-BF16 "
                "or AMX), so bf16 would be emulated and its timing says nothing; tunelab trains here in fp32."
            )
            continue
        precisions.append(precision)
    peaks = {"fp32": matmul_peak_flops("float32")}
    if "bf16" in precisions:
        peaks["bf16"] = matmul_peak_flops("bfloat16")
    auto_precision, auto_reason = choose_precision(profile)
    print(f"machine: {machine}\nmatmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"tunelab's automatic precision here: {auto_precision} ({auto_reason})", flush=True)
    for line in skipped:
        print(line, flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        out = Path(tmp)
        train, val, n_train = split_data(Path(args.data), out)
        for precision in precisions:
            for runner in (run_trl, run_tunelab):
                print(f"training: {runner.__name__} {precision} ...", flush=True)
                row = runner(model_dir, train, out, args.steps, args.batch, precision, args.max_length)
                row["precision"] = precision
                row["val_loss"] = validation_loss(model_dir, row.pop("adapter"), val, args.max_length)
                row["mfu"] = 4 * params * row["tokens_per_second"] / peaks[precision]
                print(f"  {row['tokens_per_second']:.0f} tokens/s, val loss {row['val_loss']:.4f}", flush=True)
                results.append(row)

    by = {(r["trainer"].split(" ")[0], r["precision"]): r for r in results}
    speedups = {}
    for precision in {r["precision"] for r in results}:
        ours, theirs = by.get(("tunelab", precision)), by.get(("TRL", precision))
        if ours and theirs:
            speedups[precision] = {
                "tokens_per_second_ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
                "val_loss_relative_diff": (ours["val_loss"] - theirs["val_loss"]) / theirs["val_loss"],
            }
    table = [
        f"Training: SmolLM2-135M-Instruct, LoRA r16/alpha32 all-linear, {args.steps} steps x batch {args.batch}, "
        f"{n_train} training chats ({Path(args.data).name}), max length {args.max_length}.",
        "",
        "| trainer | precision | tokens/s (non-padding) | MFU | peak RSS | final train loss | val loss |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        table.append(
            f"| {r['trainer'].split(' (')[0]} | {r['precision']} | {r['tokens_per_second']:.0f} | {r['mfu']:.1%} | "
            f"{r['peak_rss_mb']:.0f} MB | {r['mean_loss_last5']:.3f} | {r['val_loss']:.4f} |"
        )
    table.append("")
    for precision, s in sorted(speedups.items()):
        table.append(
            f"- {precision}: tunelab is {s['tokens_per_second_ratio']:.2f}x the TRL script's tokens/s; "
            f"validation loss differs by {s['val_loss_relative_diff']:+.1%}."
        )
    table.append(
        "- matmul peak measured in this run: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; MFU counts 4·N FLOPs per token (N = {params / 1e6:.1f}M)."
    )
    table += [f"- {line}" for line in skipped]
    table.append(
        f"- final train loss = mean of the last 5 logged steps. tunelab's automatic precision here: {auto_precision}."
    )
    text = "\n".join(table)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.md").write_text(text + "\n")
    (RESULTS / "train.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "matmul_peak_flops": peaks,
                "steps": args.steps,
                "batch": args.batch,
                "results": results,
                "speedups": speedups,
                "auto_precision": auto_precision,
                "skipped": skipped,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
