"""The files of an evaluation (``RUN/eval/<name>/``) read back: the run's evaluations and
their state, the newest summary, and its table. Light (engine.runs only), so the model card
(engine.hub) and the UI read evaluations without importing engine.evaluate's machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine import runs

EVAL_DIR = "eval"  # engine.launch.JOBS_DIR: the queue looks for jobs there
SPEC_FILE = "spec.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


class EvalError(ValueError):
    """A problem the person can fix: a bad backend name, data, check or a busy run."""


def eval_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL_DIR


def fmt_entry(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['value']:.1f} [{low:.1f}, {high:.1f}]"


SUMMARY_TABLE_HEAD = ("metric", "examples")


def summary_table(summary: dict, head: tuple[str, str] = SUMMARY_TABLE_HEAD) -> str:
    """The backends x metrics table (markdown): aggregate [95% interval]. ``head``: the words
    for its "metric" header and "examples" row (the web page gives them in the visitor's language)."""
    backends = summary["backends"]
    names = []
    for entry in backends.values():
        names += [m for m in entry["metrics"] if m not in names]
    lines = [f"| {head[0]} | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for metric in names:
        cells = []
        for entry in backends.values():
            value = entry["metrics"].get(metric)
            cells.append(
                f"{value['value']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"
                if value and metric in ("loss", "perplexity")
                else fmt_entry(value)
            )
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{e['tokens_per_s']:.1f}" for e in backends.values()) + " |")
    lines.append(f"| {head[1]} | " + " | ".join(str(e["examples"]) for e in backends.values()) + " |")
    return "\n".join(lines)


def list_evals(run_dir: str | Path) -> list[dict]:
    """The run's evaluations, newest first: name, state, progress, partial."""
    root = eval_root(run_dir)
    out = []
    if not root.is_dir():
        return out
    for path in root.iterdir():
        if not (path / SPEC_FILE).is_file():
            continue
        status = runs.refresh_status(path) if (path / runs.STATUS_FILE).is_file() else {"state": "completed"}
        summary = runs.read_json(path / SUMMARY_FILE) or {}
        out.append(
            {
                "name": path.name,
                "dir": str(path),
                "state": status.get("state"),
                "progress": status.get("progress"),
                "partial": summary.get("partial"),
                "created": (path / SPEC_FILE).stat().st_mtime,
            }
        )
    return sorted(out, key=lambda e: e["created"], reverse=True)


def latest_summary(run_dir: str | Path) -> dict | None:
    """The newest evaluation summary of a run (for the model card), or None."""
    found = [
        runs.read_json(Path(e["dir"]) / SUMMARY_FILE)
        for e in list_evals(run_dir)
        if (Path(e["dir"]) / SUMMARY_FILE).is_file()
    ]
    return found[0] if found else None


def read_results(eval_dir: Path) -> list[dict]:
    path = Path(eval_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}, line {number}: not JSON ({err.msg})") from err
    return rows
