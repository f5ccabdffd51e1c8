"""Reproducible runs: what a run was made of (``environment.json``) and its recipe.

The trainer writes ``RUN/environment.json`` when it starts:

* the tunelab version and, from a git checkout, its commit (and whether it had changes);
* the versions of the Python packages that decide the numbers (torch, transformers, TRL,
  PEFT, ...), and the torch build (CUDA, threads);
* the CPU (model, instruction sets) and the GPUs, from engine.hardware;
* the dataset: its path and the sha256 of its bytes (every file of a directory, in order);
* the seeds (training and data split).

A recipe is ``config.yaml`` + ``command.txt`` + ``environment.json``, no weights: a zip
from the Runs tab or ``tunelab runs recipe RUN``. ``tunelab train --config
recipe/config.yaml`` trains the same run again; on the same machine (same CPU kind, same
threads) the losses are equal step for step (tests/test_recipe.py). When the dataset's
sha256 no longer matches the recipe's, ``tunelab train`` says so before it starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

from engine import runs

# The packages whose versions decide what a run computes.
PACKAGES = (
    "tunelab",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
    "bitsandbytes",
    "deepspeed",
    "onnxruntime",
    "onnxruntime-genai",
)
RECIPE_FILES = (runs.CONFIG_FILE, runs.COMMAND_FILE, runs.ENVIRONMENT_FILE)


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes; for a directory, of its files' relative names and bytes in
    sorted order; None when there is nothing on disk (a Hub dataset id)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(directory: Path | None = None) -> dict | None:
    """The commit of the checkout tunelab runs from, and whether it has changes; None
    when it is not a git checkout (an installed package) or git is absent."""
    directory = directory or Path(__file__).resolve().parent.parent
    if not (directory / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "changed": bool(dirty.stdout.strip())}


def torch_build() -> dict:
    import torch

    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "git": torch.version.git_version,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def environment(config) -> dict:
    """What ``environment.json`` holds for a run of ``config`` (no secret: no environment
    variable's value is read)."""
    from engine import hardware

    profile = hardware.detect(config.output.runs_dir or ".")
    data_path = str(config.data.path)
    return {
        "tunelab": {"version": package_versions()["tunelab"], "git": git_commit()},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch": torch_build(),
        "cpu": {
            "model": profile.cpu.model,
            "logical_cores": profile.cpu.logical_cores,
            "isa": profile.cpu.isa,
        },
        "gpus": [
            {"name": g.name, "memory_gb": round(g.memory_gb, 1), "compute_capability": list(g.compute_capability)}
            for g in profile.gpus
        ],
        "dataset": {"path": data_path, "sha256": file_sha256(data_path)},
        "seeds": {"training": config.training.seed, "data": config.data.seed},
    }


def dataset_warning(config_path: str | Path, config) -> str | None:
    """A sentence when ``config_path`` is a recipe (an environment.json beside it) whose
    dataset's sha256 differs from the file's now; None when it matches or is not recorded."""
    recorded = runs.read_json(Path(config_path).parent / runs.ENVIRONMENT_FILE) or {}
    expected = (recorded.get("dataset") or {}).get("sha256")
    if not expected:
        return None
    now = file_sha256(config.data.path)
    if now == expected:
        return None
    what = "is missing" if now is None else f"has changed (sha256 {now[:12]}..., the recipe's {expected[:12]}...)"
    return f"data.path {config.data.path} {what}: this run will not reproduce the recipe's losses"


def write_recipe(run_dir: str | Path, dest: str | Path) -> Path:
    """Zip ``run_dir``'s recipe (config.yaml without its run id, command.txt,
    environment.json) into ``dest`` under ``<run-id>-recipe/``; no weights."""
    from engine.config import RunConfig

    run_dir = Path(run_dir)
    dest = Path(dest)
    folder = f"{run_dir.name}-recipe"
    config = RunConfig.load(run_dir / runs.CONFIG_FILE)
    config.output.run_id = None  # a new run gets a new id; the runs directory stays as it was
    config.training.resume = False
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder}/{runs.CONFIG_FILE}", config.to_yaml())
        for name in RECIPE_FILES[1:]:
            if (run_dir / name).is_file():
                zf.write(run_dir / name, f"{folder}/{name}")
    return dest
