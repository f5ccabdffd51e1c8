"""DPO benchmark: tunelab's DPO run against a plain TRL DPOTrainer script, same model, pairs,
LoRA settings, batch, steps, learning rate, beta, max length and precision, in one run.

    python -m bench.bench_dpo [--steps 20] [--batch 4] [--max-length 512] [--data dpo_en_demo.json]

The pairs default to the public dpo_en_demo.json beside the checkout (../shared/datasets).
Each trainer runs in its own process, one after the other. For each: non-padding tokens per
second of training, peak resident memory, and the final reward accuracy and margin (means of
the last 5 logged steps). Both read the same pairs (engine.data), written once as
conversational prompt/chosen/rejected records for the TRL script.

Writes bench/results/dpo.json and dpo.md and prints the table.
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
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "dpo_en_demo.json"


def write_pairs(data: Path, out: Path) -> tuple[Path, int]:
    """The pairs of ``data`` as conversational JSONL (what TRL's DPOTrainer reads)."""
    from engine.data import load_records

    pairs = load_records(data).pairs
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path, len(pairs)


def run_tunelab(model_dir: Path, pairs: Path, out: Path, args, precision: str) -> dict:
    from engine.config import RunConfig

    run_dir = out / f"tunelab-{precision}"
    cfg = RunConfig.from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(pairs), "validation_split": 0.0, "max_length": args.max_length},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {
                "stage": "dpo",
                "beta": 0.1,
                "max_steps": args.steps,
                "batch_size": args.batch,
                "learning_rate": 5e-5,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.1,
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
        raise RuntimeError(f"tunelab DPO failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    tokens = json.loads((run_dir / "status.json").read_text())["tokens_seen"]
    seconds = rows[-1]["elapsed_s"]
    last = rows[-5:]
    return {
        "trainer": f"tunelab ({precision})",
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "reward_accuracy": sum(r["rewards_accuracies"] for r in last) / len(last),
        "reward_margin": sum(r["rewards_margins"] for r in last) / len(last),
        "peak_rss_mb": max(r.get("memory_peak_mb") or 0 for r in rows),
        "wall_seconds": time.perf_counter() - started,
    }


def run_trl(model_dir: Path, pairs: Path, out: Path, args, precision: str) -> dict:
    started = time.perf_counter()
    command = [sys.executable, "-m", "bench.trl_dpo_baseline", "--model-dir", str(model_dir), "--data", str(pairs)]
    command += ["--out", str(out / f"trl-{precision}"), "--steps", str(args.steps), "--batch", str(args.batch)]
    command += ["--precision", precision, "--max-length", str(args.max_length)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL DPO baseline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(trainer=f"TRL script ({precision})", wall_seconds=time.perf_counter() - started)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="A model reference (engine.models).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args(argv)

    from bench.machine import describe
    from engine.hardware import choose_precision, detect
    from engine.models import resolve_model

    if not Path(args.data).is_file():
        print(f"DPO benchmark skipped: {args.data} not found (pass --data PAIRS)", flush=True)
        return 0
    model_dir = resolve_model(args.model)
    precision = choose_precision(detect())[0] if args.precision == "auto" else args.precision
    machine = describe()
    print(f"machine: {machine}\nprecision: {precision}", flush=True)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-dpo-") as tmp:
        out = Path(tmp)
        pairs, n_pairs = write_pairs(Path(args.data), out)
        for runner in (run_trl, run_tunelab):
            print(f"training: {runner.__name__} {precision} ...", flush=True)
            row = runner(model_dir, pairs, out, args, precision)
            row["precision"] = precision
            print(
                f"  {row['tokens_per_second']:.1f} tokens/s, reward accuracy {row['reward_accuracy']:.2f}", flush=True
            )
            results.append(row)
    ours, theirs = results[1], results[0]
    ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
    table = [
        f"DPO: {Path(args.model).name}, LoRA r16/alpha32 all-linear, beta 0.1, {args.steps} steps x batch "
        f"{args.batch} pairs, max length {args.max_length}, {n_pairs} pairs ({Path(args.data).name}), {precision}.",
        "",
        "| trainer | tokens/s (non-padding) | peak RSS | reward accuracy (last 5) | reward margin (last 5) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        table.append(
            f"| {r['trainer'].split(' (')[0]} | {r['tokens_per_second']:.1f} | {r['peak_rss_mb']:.0f} MB | "
            f"{r['reward_accuracy']:.2f} | {r['reward_margin']:.3f} |"
        )
    table += [
        "",
        f"- tunelab is {ratio:.2f}x the TRL script's tokens/s. Its changes from TRL's DPOTrainer on the CPU: "
        "log-probabilities of the answer positions only (TRL's fused head projects every position there), "
        "on padding-free rows (its padded batch end to end, one causal attention per sequence).",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "- TRL 1.16's DPO turns padding_free off: the TRL script pads its batches; tunelab packs them itself "
        "(engine.train.pack_rows).",
    ]
    text = "\n".join(table)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dpo.md").write_text(text + "\n")
    payload = {"machine": machine, "steps": args.steps, "batch": args.batch, "results": results, "ratio": ratio}
    (RESULTS / "dpo.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
