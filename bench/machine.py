"""Measure the machine a benchmark runs on: matmul peak (fp32, bf16), memory bandwidth,
and a description (cores, ISA, RAM), so every figure is read against ceilings measured in
the same run."""

from __future__ import annotations

import os
import platform
import time


def matmul_peak_flops(dtype_name: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of an n x n matmul over about ``seconds``."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write counted), the ceiling of memory-bound decode."""
    import torch

    src = torch.empty(mb * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - start))
    return best


def describe() -> dict:
    """Cores, ISA, RAM and library versions of this machine."""
    import torch

    from engine.hardware import detect

    prof = detect()
    return {
        "cpu": prof.cpu.model,
        "logical_cores": prof.cpu.logical_cores,
        "torch_threads": torch.get_num_threads(),
        "isa": [k for k, v in prof.cpu.isa.items() if v],
        "ram_gb": round(prof.ram_bytes / 1024**3, 1),
        "gpus": [g.name for g in prof.gpus],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def write_results(out_dir, name: str, result: dict, markdown: str) -> None:
    """Print a benchmark's Markdown table and write ``<name>.json`` and ``<name>.md`` in ``out_dir``."""
    import json
    from pathlib import Path

    print()
    print(markdown)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


if __name__ == "__main__":
    import json

    print(
        json.dumps(
            {
                **describe(),
                "fp32_gflops": round(matmul_peak_flops("float32") / 1e9),
                "bf16_gflops": round(matmul_peak_flops("bfloat16") / 1e9),
                "bandwidth_gbs": round(memory_bandwidth() / 1e9, 1),
            },
            indent=2,
        )
    )
