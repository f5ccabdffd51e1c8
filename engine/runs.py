"""The run directory: the whole truth about one training run.

::

    runs/<run-id>/
      config.yaml      the full, resolved config
      command.txt      the exact command line that was launched
      status.json      state, pids, exit code, error class, times (see STATES)
      metrics.jsonl    one JSON object per logging step, appended and flushed
      train.log        the training process's stdout + stderr
      adapter/ | model/, checkpoints/, eval.json, data.json, environment.json, export/

``status.json`` is written by two processes (the supervisor in engine.launch and the
trainer itself), always through :func:`update_status`: a read-modify-write under a lock
file, replaced atomically, so a reader never sees half a file and no writer loses
another's fields.

This module imports nothing heavy (no torch), so the UI and ``tunelab runs`` stay fast.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path

from engine.util import atomic_write_text

# created: the directory exists, nothing launched yet; queued: waiting for the machine;
# running; then one of the three final states.
STATES = ("created", "queued", "running", "completed", "failed", "aborted")
FINAL_STATES = ("completed", "failed", "aborted")
ACTIVE_STATES = ("created", "queued", "running")  # still holds, or waits for, the machine

# Error classes a person understands (status.json "error_class").
ERROR_OOM = "out of memory"
ERROR_BAD_DATA = "bad data"
ERROR_MODEL_NOT_FOUND = "model not found"
ERROR_KILLED = "killed"
ERROR_CONFIG = "config error"
ERROR_OTHER = "error"
ERROR_CLASSES = (ERROR_OOM, ERROR_BAD_DATA, ERROR_MODEL_NOT_FOUND, ERROR_KILLED, ERROR_CONFIG, ERROR_OTHER)

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
EVAL_FILE = "eval.json"
DATA_FILE = "data.json"  # what the run trained on: format, record counts, split (the model card reads it)
ENVIRONMENT_FILE = "environment.json"  # versions, machine, dataset sha256, seeds (engine/recipe.py)
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (missing, still running, ...)."""


# --------------------------------------------------------------------------- creation


def new_run_id(config) -> str:
    """``20260131-142501-lora-pip_chat-3f9a``: sortable by time, readable, unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(str(config.data.path or "data")).stem or "data"
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", data)[:24]
    return f"{stamp}-{config.method.name}-{data}-{secrets.token_hex(2)}"


def create_run(config, runs_dir: str | Path | None = None) -> Path:
    """Make ``runs_dir/<run-id>`` holding config.yaml and a ``created`` status.json.

    The run id is ``config.output.run_id`` when set (it must not exist yet), else a new
    one; the saved copy of the config names it, so the directory alone describes the run.
    """
    from engine.config import ConfigError

    config = copy.deepcopy(config)  # the caller's config keeps its run_id (usually none)
    runs_dir = Path(runs_dir or config.output.runs_dir).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    wanted = config.output.run_id
    if wanted and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", wanted) or len(wanted) > 120):
        raise ConfigError("output.run_id", f"{wanted!r}: use letters, digits, '-', '_' and '.' only")
    for _ in range(20):
        run_id = wanted or new_run_id(config)
        run_dir = runs_dir / run_id
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            if wanted:
                raise ConfigError(
                    "output.run_id",
                    f"a run named {wanted!r} already exists in {runs_dir}; resume it or pick another id",
                ) from None
    else:  # pragma: no cover - 20 collisions of a random suffix in one second
        raise RunError(f"could not make a new run directory in {runs_dir}")
    config.output.run_id = run_id
    config.output.runs_dir = str(runs_dir)
    config.save(run_dir / CONFIG_FILE)
    update_status(run_dir, state="created", run_id=run_id, created_at=time.time(), host=socket.gethostname())
    return run_dir


# --------------------------------------------------------------------------- status.json


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive ``flock`` on ``path`` (created if needed), released on exit or death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_status(run_dir: str | Path) -> dict:
    """status.json as a dict; ``{"state": "unknown"}`` when there is none."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"state": "unknown"}
    except json.JSONDecodeError as err:  # only a hand-edited file can be broken
        return {"state": "unknown", "error": f"{path} is not valid JSON: {err}"}


def update_status(run_dir: str | Path, **fields) -> dict:
    """Merge ``fields`` into status.json (a value of None deletes the key); returns the result."""
    run_dir = Path(run_dir)
    with locked(run_dir / ".status.lock"):
        status = read_status(run_dir)
        if status.get("state") == "unknown" and "state" not in fields:
            status.pop("state")
        for key, value in fields.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        status["updated_at"] = time.time()
        write_json(run_dir / STATUS_FILE, status)
    return status


def process_identity(pid: int) -> float | None:
    """The start time of process ``pid`` (with the pid, it names the process uniquely)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """Is ``pid`` a live (not zombie) process, and the same one that started at ``started``?"""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(proc.create_time() - float(started)) > 1.0:
            return False  # the pid was reused by another process
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def is_active(status: dict) -> bool:
    """Does this status belong to a run that still holds (or waits for) the machine?

    A run on another host (a shared runs directory) is trusted as written.
    """
    if status.get("state") not in ("queued", "running"):
        return False
    if status.get("host") and status["host"] != socket.gethostname():
        return True
    return process_alive(status.get("supervisor_pid"), status.get("supervisor_started")) or process_alive(
        status.get("pid"), status.get("pid_started")
    )


def refresh_status(run_dir: str | Path) -> dict:
    """read_status, but a queued/running run whose processes are all gone is marked failed.

    That is how a supervisor or trainer killed without a chance to write its end (power
    loss, SIGKILL of both, a reboot) is noticed, so the queue never waits on a ghost.
    """
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status.get("state") in ("queued", "running") and not is_active(status):
        with locked(run_dir / ".status.lock"):
            pass  # let a writer that is finishing right now finish
        status = read_status(run_dir)
        if status.get("state") in ("queued", "running") and not is_active(status):
            when = "before it started" if status["state"] == "queued" else "while it was running"
            status = update_status(
                run_dir,
                state="failed",
                error_class=ERROR_KILLED,
                error=f"its processes ended {when} without recording a result (killed, or the machine restarted)",
                ended_at=time.time(),
                log_tail=tail_log(run_dir, 20) or None,
            )
    return status


# --------------------------------------------------------------------------- listing


def list_runs(runs_dir: str | Path, probes: bool = False) -> list[dict]:
    """All runs in ``runs_dir``, newest first: status plus a few config and result fields.
    Probe runs (``tunelab train --probe``) only with ``probes``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    rows = []
    for run_dir in runs_dir.iterdir():
        if not (run_dir / STATUS_FILE).is_file():
            continue
        status = refresh_status(run_dir)
        if status.get("probe") and not probes:
            continue
        row = {
            "run_id": run_dir.name,
            "path": str(run_dir),
            "state": status.get("state"),
            "error_class": status.get("error_class"),
            "created_at": status.get("created_at"),
            "started_at": status.get("started_at"),
            "ended_at": status.get("ended_at"),
            "step": status.get("step"),
            "max_steps": status.get("max_steps"),
            "probe": bool(status.get("probe")),
        }
        row.update(_config_summary(run_dir))
        evaluation = read_json(run_dir / EVAL_FILE)
        if evaluation:
            row["base_eval_loss"] = (evaluation.get("base") or {}).get("loss")
            row["tuned_eval_loss"] = (evaluation.get("tuned") or {}).get("loss")
        rows.append(row)
    rows.sort(key=lambda r: (r.get("created_at") or 0, r["run_id"]), reverse=True)
    return rows


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file of the run directory whole or not at all (a temporary file, renamed)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON file of the run directory, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _config_summary(run_dir: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}
    return {
        "model": (cfg.get("model") or {}).get("name_or_path"),
        "method": (cfg.get("method") or {}).get("name"),
        "data": (cfg.get("data") or {}).get("path"),
        "deepspeed": (cfg.get("distributed") or {}).get("deepspeed"),
        "num_processes": (cfg.get("distributed") or {}).get("num_processes"),
    }


def find_run(ref: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run directory from a path or a run id (an unambiguous prefix is enough)."""
    path = Path(ref).expanduser()
    if (path / STATUS_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return path.resolve()
    runs_dir = Path(runs_dir).expanduser()
    if (runs_dir / str(ref) / STATUS_FILE).is_file():
        return (runs_dir / str(ref)).resolve()
    matches = sorted(p for p in runs_dir.glob(f"{ref}*") if (p / STATUS_FILE).is_file()) if runs_dir.is_dir() else []
    if len(matches) == 1:
        return matches[0].resolve()
    if matches:
        raise RunError(f"{ref!r} matches {len(matches)} runs in {runs_dir}: {', '.join(p.name for p in matches[:5])}")
    raise RunError(f"no run {ref!r} (neither a run directory nor a run id in {runs_dir})")


# --------------------------------------------------------------------------- metrics and log


class MetricsReader:
    """Reads metrics.jsonl incrementally: each call returns only the lines added since the last.

    A line being written (no newline yet) is left for the next call. If the file was
    replaced by a shorter one, reading starts again from the top.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        rows = []
        for line in chunk[: end + 1].splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write; the next lines are still good
        return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every line of metrics.jsonl (for reports and tests; the UI uses MetricsReader)."""
    return MetricsReader(run_dir).read_new()


def tail_log(run_dir: str | Path, n: int = 50) -> str:
    """The last ``n`` lines of train.log (reads only the end of the file)."""
    path = Path(run_dir) / LOG_FILE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ""
    block = 8192
    data = b""
    with path.open("rb") as f:
        pos = size
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    # Progress bars redraw with carriage returns: keep what a terminal would show last.
    lines = []
    for line in data.decode("utf-8", "replace").split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1] if parts else "")
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines[-n:])
