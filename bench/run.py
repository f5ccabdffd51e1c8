"""`make bench`: the benchmarks in one run (all of them, or the sections named with --only).

Each writes its JSON and Markdown table to bench/results/; this prints the tables at the
end. Run it on an otherwise idle machine: the figures are wall-clock speeds.

    python -m bench.run                      # every section
    python -m bench.run --only inference     # just one (comma-separated for several)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _train(argv: list[str]) -> int:
    from bench import bench_train

    return bench_train.main(argv)


def _dpo(argv: list[str]) -> int:
    from bench import bench_dpo

    return bench_dpo.main(argv)


def _inference(argv: list[str]) -> int:
    from bench import bench_inference

    return bench_inference.main(argv)


def _serve(argv: list[str]) -> int:
    from bench import bench_serve

    return bench_serve.main(argv)


def _eval(argv: list[str]) -> int:
    from bench import bench_eval

    return bench_eval.main(argv)


def _exports(argv: list[str]) -> int:
    from bench import bench_exports

    return bench_exports.main(argv)


# section -> (what it measures, its entry point, the result tables it writes)
SECTIONS = {
    "train": ("training speed and loss: tunelab vs the TRL script", _train, ("train.md",)),
    "dpo": ("DPO speed and reward accuracy: tunelab vs a plain TRL DPOTrainer script", _dpo, ("dpo.md",)),
    "inference": (
        "decode speed, time to first token and export agreement of every chat backend",
        _inference,
        ("inference.md",),
    ),
    "serve": (
        "the OpenAI-compatible API under 1, 4 and 8 concurrent streaming clients",
        _serve,
        ("serve.md",),
    ),
    "eval": (
        "evaluation: batched greedy generation against one at a time, PyTorch and ONNX",
        _eval,
        ("eval.md",),
    ),
    "exports": (
        "every ONNX export variant of a short cpu-lora run: size, speed, agreement, perplexity change, verdict",
        _exports,
        ("exports.md",),
    ),
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.splitlines()[0],
        epilog="sections: " + "; ".join(f"{k}: {v[0]}" for k, v in SECTIONS.items()),
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"Comma-separated sections to run (default: all of {', '.join(SECTIONS)}).",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        parser.error(
            f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}"
        )
    started = time.perf_counter()
    rc = 0
    for name in chosen:
        print(f"\n## bench section: {name}\n", flush=True)
        rc = SECTIONS[name][1]([]) or rc
    print("\n# Benchmark results\n")
    for name in chosen:
        for table in SECTIONS[name][2]:
            path = RESULTS / table
            if path.exists():
                print(path.read_text())
    print(f"(make bench took {(time.perf_counter() - started) / 60:.1f} min; sections: {', '.join(chosen)})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
