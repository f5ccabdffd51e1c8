"""Export benchmark: every ONNX export variant of a trained run, with its verdict.

    python -m bench.bench_exports [--run runs/<id>] [--variants int8,int4-hqq,...]

Without --run it trains assets/configs/cpu-lora.yaml on the embedded SmolLM2-135M for a few
steps (training.max_steps, --steps) into a work directory. Each variant of
engine.config.ONNX_VARIANTS is built one at a time (engine.export.export_onnx; a failed build
is listed with its error), then one parity report measures them all against the tuned
PyTorch model (engine.export.write_parity_report: greedy agreement on the probe chats,
perplexity change on the validation split, decode speed, time to first token). The table
(bench/results/exports.md and .json) gives per variant: size, decode tokens/s and its ratio to
int8's, time to first token, token agreement, perplexity change and the verdict, and says
which variant auto mode keeps (the first of engine.config.AUTO_ORDER that is faithful) and
whether the CPU target of the default export is met (faithful and >= 1.5x int8's decode speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TARGET_SPEEDUP_VS_INT8 = 1.5


def train_demo_run(work: Path, steps: int) -> Path:
    """A short LoRA run of assets/configs/cpu-lora.yaml (in its own process, as the app does)."""
    runs_dir = work / "runs"
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "train",
        "--config",
        str(REPO / "assets" / "configs" / "cpu-lora.yaml"),
        "--foreground",
        "--set",
        f"output.runs_dir={runs_dir}",
        "--set",
        f"training.max_steps={steps}",
        "--set",
        f"training.eval_steps={steps}",
        "--set",
        f"training.save_steps={steps}",
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    runs = sorted(p for p in runs_dir.iterdir() if (p / "adapter" / "adapter_config.json").is_file())
    if not runs:
        raise SystemExit(f"training left no adapter under {runs_dir}")
    return runs[-1]


def rows_of(report: dict, failures: dict[str, str]) -> list[dict]:
    from engine.config import ONNX_VARIANTS

    speed = report.get("speed", {})
    int8 = (speed.get("onnx_int8") or {}).get("decode_tokens_per_s")
    rows = []
    for name in ONNX_VARIANTS:
        if name in failures:
            rows.append({"variant": f"onnx-{name}", "error": failures[name]})
            continue
        info = report.get("onnx", {}).get(name)
        if not info:
            continue
        tps = (speed.get(f"onnx_{name}") or {}).get("decode_tokens_per_s")
        rows.append(
            {
                "variant": f"onnx-{name}",
                "size_bytes": report.get("sizes_bytes", {}).get(f"onnx-{name}"),
                "decode_tokens_per_s": tps,
                "vs_int8": round(tps / int8, 2) if tps and int8 else None,
                "ttft_s": (speed.get(f"onnx_{name}") or {}).get("ttft_s"),
                "token_agreement": info.get("token_agreement"),
                "greedy_identical": info.get("greedy_identical"),
                "perplexity_change": info["verdict"].get("perplexity_change"),
                "verdict": info["verdict"]["verdict"],
            }
        )
    return rows


def auto_choice(rows: list[dict]) -> str | None:
    from engine.config import AUTO_ORDER

    by_name = {r["variant"]: r for r in rows}
    for name in AUTO_ORDER:
        if (by_name.get(f"onnx-{name}") or {}).get("verdict") == "faithful":
            return f"onnx-{name}"
    return None


def to_markdown(result: dict) -> str:
    lines = [
        "# ONNX export variants",
        "",
        f"Run {result['run']} ({result['machine']}); perplexity on the {result['perplexity_source']}; "
        f"{result['probes']} probe chats of {result['new_tokens']} greedy tokens for the agreement.",
        "",
        "| variant | size | decode tokens/s | vs int8 | time to first token | token agreement | "
        "greedy identical | perplexity change | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | build failed: {r['error'][:120]} |")
            continue
        lines.append(
            f"| {r['variant']} | {r['size_bytes'] / 1e6:.1f} MB | {r['decode_tokens_per_s']:.1f} | "
            f"{'-' if r['vs_int8'] is None else format(r['vs_int8'], '.2f') + 'x'} | {r['ttft_s'] * 1000:.0f} ms | "
            f"{r['token_agreement']:.1%} | {r['greedy_identical']} | "
            f"{'-' if r['perplexity_change'] is None else format(r['perplexity_change'], '+.1%')} | {r['verdict']} |"
        )
    chosen = result["auto_choice"]
    lines += [
        "",
        f"Auto mode keeps: **{chosen or 'none (no faithful variant)'}**. "
        f"Target of the default CPU export (faithful and >= {TARGET_SPEEDUP_VS_INT8}x int8's decode speed): "
        f"{'met by ' + ', '.join(result['target_met_by']) if result['target_met_by'] else 'met by no int4 variant'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from engine import export
    from engine.config import ONNX_VARIANTS

    parser = argparse.ArgumentParser(prog="python -m bench.bench_exports", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="A trained run directory (default: train a short cpu-lora run).")
    parser.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "tunelab-bench-exports"),
        help="Where the demo run is trained.",
    )
    parser.add_argument("--steps", type=int, default=10, help="Training steps of the demo run.")
    parser.add_argument("--variants", default=",".join(ONNX_VARIANTS), help="Comma-separated variants to build.")
    args = parser.parse_args(argv)
    run_dir = Path(args.run) if args.run else train_demo_run(Path(args.work), args.steps)
    failures: dict[str, str] = {}
    builds: dict[str, float] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        started = time.perf_counter()
        try:
            export.export_onnx(run_dir, name, progress=lambda m: None)
        except export.ExportError as err:
            failures[name] = str(err)
            print(f"onnx-{name}: build failed: {err}", flush=True)
            continue
        builds[name] = round(time.perf_counter() - started, 1)
        print(f"onnx-{name}: built in {builds[name]} s", flush=True)
    report = export.write_parity_report(run_dir, progress=lambda m: print(m, flush=True))
    rows = rows_of(report, failures)
    int4_faithful_fast = [
        r["variant"]
        for r in rows
        if r.get("verdict") == "faithful"
        and r["variant"].startswith("onnx-int4")
        and (r.get("vs_int8") or 0) >= TARGET_SPEEDUP_VS_INT8
    ]
    result = {
        "run": str(run_dir),
        "machine": f"{platform.processor() or platform.machine()}, {_cpu_name()}",
        "perplexity_source": report["perplexity"]["source"],
        "probes": len(report["probes"]),
        "new_tokens": report["new_tokens"],
        "build_seconds": builds,
        "rows": rows,
        "auto_choice": auto_choice(rows),
        "target_met_by": int4_faithful_fast,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "exports.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    markdown = to_markdown(result)
    (RESULTS / "exports.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
