"""Experiment tracking on transformers' own integrations: Trackio, TensorBoard, MLflow, W&B.

``training.report_to`` names the trackers of a run (several allowed; ``[]`` or ``none``:
only tunelab's own metrics.jsonl; engine.config.tracker_list reads the forms it may take).
The trainer passes the names to ``TrainingArguments.report_to``, so transformers' callbacks
do the logging; this module only decides where each tracker writes and how a person opens
it, and checks that the tracker is installed before a run exists.

Every tracker writes locally by default, beside the runs, so the runs of one runs directory
are compared in one place::

    runs/.tracking/tensorboard/<run-id>/   TensorBoard event files (one folder a run)
    runs/.tracking/mlruns/                 an MLflow file store, experiment "tunelab"
    runs/.tracking/trackio/                a Trackio store, project "tunelab"
    runs/.tracking/wandb/                  W&B files (offline unless WANDB_API_KEY is set)

A tracking server set in the environment wins: ``MLFLOW_TRACKING_URI``, ``TRACKIO_DIR``,
``TENSORBOARD_LOGGING_DIR``, ``WANDB_DIR`` and ``WANDB_MODE`` are left as they are. Keys and
tokens (``WANDB_API_KEY``, ``MLFLOW_TRACKING_TOKEN``, ``HF_TOKEN``) are read by the trackers
from the environment only: tunelab never writes them to config.yaml, command.txt, the log
or environment.json (tests/test_tracking.py checks every file of a run for them).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

PROJECT = "tunelab"  # the Trackio project, MLflow experiment and W&B project of every run
TRACKING_DIR = ".tracking"  # in the runs directory, beside the runs (it holds no status.json: not a run)

# tracker (engine.config.TRACKERS) -> (the module that must import, how to install it)
INSTALL = {
    "trackio": ("trackio", "pip install trackio"),
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
    "wandb": ("wandb", "pip install 'tunelab[wandb]' (or pip install wandb)"),
}


def missing(names: list[str]) -> list[tuple[str, str]]:
    """The named trackers that are not installed, each with its install command."""
    return [(n, INSTALL[n][1]) for n in names if importlib.util.find_spec(INSTALL[n][0]) is None]


def tracking_root(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve().parent / TRACKING_DIR


def environment(run_dir: str | Path, names: list[str], env: dict | None = None) -> dict[str, str]:
    """The environment variables the trainer sets for ``names`` (only those not set already)."""
    env = os.environ if env is None else env
    run_dir = Path(run_dir).resolve()
    root = tracking_root(run_dir)
    wanted: dict[str, str] = {}
    if "tensorboard" in names:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(root / "tensorboard" / run_dir.name)
    if "mlflow" in names:
        wanted["MLFLOW_EXPERIMENT_NAME"] = PROJECT
        if not env.get("MLFLOW_TRACKING_URI"):
            # A local file store: it needs no database package (mlflow-skinny is enough);
            # MLflow 3 keeps it in maintenance mode and asks for this opt-in.
            wanted["MLFLOW_TRACKING_URI"] = (root / "mlruns").as_uri()
            wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "trackio" in names:
        wanted["TRACKIO_DIR"] = str(root / "trackio")
    if "wandb" in names:
        wanted["WANDB_DIR"] = str(root / "wandb")
        wanted["WANDB_PROJECT"] = PROJECT
        if not env.get("WANDB_API_KEY"):
            wanted["WANDB_MODE"] = "offline"  # no key: files only, `wandb sync` uploads them later
    return {k: v for k, v in wanted.items() if not env.get(k)}


def prepare(run_dir: str | Path, names: list[str]) -> dict[str, str]:
    """Set the trackers' locations in this process's environment (the trainer calls it before
    the Trainer exists: transformers' callbacks read them when they start)."""
    values = environment(run_dir, names)
    os.environ.update(values)
    for path_var in ("TENSORBOARD_LOGGING_DIR", "TRACKIO_DIR", "WANDB_DIR"):
        if path_var in values:
            Path(values[path_var]).mkdir(parents=True, exist_ok=True)
    return values


@dataclass
class Location:
    """Where one tracker keeps a run, and the command that opens it."""

    tracker: str
    where: str
    command: str


def locations(run_dir: str | Path, names: list[str]) -> list[Location]:
    """For the Runs tab and ``tunelab runs show``: one entry per tracker of the run."""
    run_dir = Path(run_dir).resolve()
    root = tracking_root(run_dir)
    out = []
    for name in names:
        if name == "tensorboard":
            where = root / "tensorboard"
            out.append(Location(name, str(where / run_dir.name), f"tensorboard --logdir {shlex.quote(str(where))}"))
        elif name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            command = f"mlflow ui --backend-store-uri {shlex.quote(uri)}" if uri else ""
            if not uri:
                uri = (root / "mlruns").as_uri()
                command = f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {shlex.quote(uri)}"
            out.append(Location(name, f"{uri} (experiment {PROJECT})", command))
        elif name == "trackio":
            where = os.environ.get("TRACKIO_DIR") or str(root / "trackio")
            out.append(
                Location(
                    name,
                    f"{where} (project {PROJECT})",
                    f"TRACKIO_DIR={shlex.quote(where)} trackio show --project {PROJECT}",
                )
            )
        elif name == "wandb":
            where = root / "wandb"
            sync = f"wandb sync {shlex.quote(str(where))}/offline-run-*"
            out.append(Location(name, f"{where} (project {PROJECT})", sync))
    return out


def run_locations(run_dir: str | Path) -> list[Location]:
    """The trackers of a run, read from its config.yaml (none when it cannot be read)."""
    from engine.config import ConfigError, RunConfig

    try:
        config = RunConfig.load(Path(run_dir) / "config.yaml")
    except ConfigError:
        return []  # a run without a readable config has no trackers to show
    return locations(run_dir, config.training.report_to)
