"""The CUDA paths, checked on a machine with a GPU: one short script, one table.

    python -m bench.gpu_check --tokenizer DIR [--out DIR] [--steps 20]

It builds a small random Llama from a config (no download: ``--tokenizer`` is a directory
holding the embedded model's tokenizer), detects the hardware, then trains it through the
real launcher (``engine.launch.submit`` -> ``python -m engine.train``, or ``accelerate launch``
with DeepSpeed) on ``assets/datasets/pip_chat.jsonl`` with every method: LoRA, DoRA, QLoRA
(bitsandbytes 4-bit NF4 on CUDA), full, LoRA under ZeRO-2 and ZeRO-3 (one process), and a DPO
stage where the config has one. Precision is left to the hardware plan (bf16 on compute
capability >= 8.0). Each tuned run then answers one prompt through ``engine.inference``.

The CPU suite cannot reach these paths; this script is what a session with a lent GPU runs.
It prints a markdown table (and writes it to ``--out``/gpu_check.md) and exits non-zero when
a case fails. On a machine without a GPU it runs the same cases on the CPU, slowly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "assets" / "datasets" / "pip_chat.jsonl"


def build_model(tokenizer_dir: Path, target: Path) -> Path:
    """A ~50M-parameter Llama with the given tokenizer, random weights, saved to ``target``."""
    from engine.models import TinySpec, build_tiny_model

    spec = TinySpec(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        max_position_embeddings=2048,
    )
    return build_tiny_model(target, spec, tokenizer_dir=tokenizer_dir)


def cases(steps: int, dpo_data: Path) -> list[tuple[str, dict]]:
    from engine.config import TrainingConfig

    base_training = {"max_steps": steps, "batch_size": 8, "logging_steps": 1, "save_steps": 1000, "eval_steps": 10}
    lora = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05}
    out = [
        ("lora", {"method": lora, "training": {**base_training, "learning_rate": 1e-3}}),
        ("dora", {"method": {**lora, "name": "dora"}, "training": {**base_training, "learning_rate": 1e-3}}),
        ("qlora", {"method": {**lora, "name": "qlora"}, "training": {**base_training, "learning_rate": 1e-3}}),
        ("full", {"method": {"name": "full"}, "training": {**base_training, "learning_rate": 1e-4}}),
    ]
    for stage in ("zero2", "zero3"):
        out.append(
            (
                f"lora {stage}",
                {
                    "method": lora,
                    "training": {**base_training, "learning_rate": 1e-3},
                    "distributed": {"num_processes": 1, "deepspeed": stage},
                },
            )
        )
    if "stage" in TrainingConfig.__dataclass_fields__:  # preference tuning, where the config has it
        if dpo_data.is_file():
            out.append(
                (
                    "lora dpo",
                    {
                        "method": lora,
                        "training": {**base_training, "learning_rate": 5e-5, "stage": "dpo", "batch_size": 4},
                        "data": {"path": str(dpo_data), "max_length": 512},
                    },
                )
            )
    return out


def run_case(name: str, overrides: dict, model_dir: Path, runs_dir: Path) -> dict:
    from engine import launch, runs
    from engine.config import RunConfig

    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(DATA), "max_length": 256, "validation_split": 0.1},
        "output": {"runs_dir": str(runs_dir), "run_id": name.replace(" ", "-")},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    config = RunConfig.from_dict(raw)
    started = time.time()
    run = launch.submit(config, runs_dir)
    while runs.refresh_status(run).get("state") not in runs.FINAL_STATES:
        if time.time() - started > 600:
            launch.stop(run)
            break
        time.sleep(1)
    status = runs.refresh_status(run)
    rows = [r for r in runs.read_metrics(run) if r.get("loss") is not None]
    result = {
        "case": name,
        "state": status.get("state"),
        "precision": status.get("precision"),
        "seconds": round(time.time() - started, 1),
        "loss first": rows[0]["loss"] if rows else None,
        "loss last": rows[-1]["loss"] if rows else None,
        "tokens/s": rows[-1].get("tokens_per_second") if rows else None,
        "GPU peak MB": max((r.get("gpu_memory_peak_mb") or 0) for r in rows) if rows else None,
        "error": status.get("error_class") or "",
    }
    if result["state"] != "completed":
        result["error"] = (result["error"] + " " + " | ".join(runs.tail_log(run, 6).splitlines()[-3:]))[:300]
        return result
    try:
        from engine import inference

        settings = inference.GenerationSettings(max_new_tokens=16, greedy=True)
        text = "".join(
            e.text for e in inference.stream_chat(run, "tuned", "Who are you?", settings) if e.kind == "text"
        )
        result["reply"] = text[:40]
    except Exception as err:  # the table reports it; the script's exit code fails the check
        result["error"] = f"chat: {type(err).__name__}: {err}"[:300]
        traceback.print_exc()
    return result


def table(rows: list[dict]) -> str:
    keys = ["case", "state", "precision", "seconds", "loss first", "loss last", "tokens/s", "GPU peak MB", "reply"]
    keys += ["error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            loss = isinstance(v, float) and k.startswith("loss")
            cells.append(f"{v:.3f}" if loss else str(v if v is not None else ""))
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, type=Path, help="directory with the embedded tokenizer")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="where the runs and the table go")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument(
        "--dpo-data",
        type=Path,
        default=REPO.parent / "shared" / "datasets" / "dpo_en_demo.json",
        help="preference data for the DPO case (the public demo file beside the checkout)",
    )
    args = parser.parse_args(argv)

    from engine import hardware

    args.out.mkdir(parents=True, exist_ok=True)
    profile = hardware.detect(args.out)
    model_dir = build_model(args.tokenizer, args.out / "model")
    plan = hardware.recommend(profile, model_dir, num_examples=120, max_length=256)
    header = [f"hardware: {profile.summary()}", f"plan: {json.dumps(plan.to_dict()['reasons'])[:600]}"]
    print("\n".join(header), flush=True)
    rows = []
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    for name, overrides in cases(args.steps, args.dpo_data):
        if wanted and name not in wanted:
            continue
        print(f"-- {name}", flush=True)
        rows.append(run_case(name, overrides, model_dir, args.out / "runs"))
        print(json.dumps(rows[-1]), flush=True)
    text = "\n".join(header) + "\n\n" + table(rows) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    failed = [r["case"] for r in rows if r["state"] != "completed" or r["error"]]
    print("failed: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
