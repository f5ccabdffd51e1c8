"""`make bench`: the training benchmark, then the inference benchmark, in one run.

Each writes its JSON and Markdown table to bench/results/; this prints both tables at the
end. Run it on an otherwise idle machine: the figures are wall-clock speeds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import bench_inference, bench_train

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    rc = bench_train.main([]) or bench_inference.main([])
    print("\n# Benchmark results\n")
    for name in ("train.md", "inference.md"):
        path = RESULTS / name
        if path.exists():
            print(path.read_text())
    print(f"(make bench took {(time.perf_counter() - started) / 60:.1f} min)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
