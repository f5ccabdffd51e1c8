"""What the tabs share: the app context, engine-error reporting, and small formatters.

Nothing here holds per-user state: that lives in ``gr.State`` inside each tab. The only
process-wide things are the context (paths and options from the command line) and a cache
of tokenizers, which are read-only.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "assets" / "datasets"
EMBEDDED_MODEL = "smollm2-135m-instruct"

log = logging.getLogger("tunelab.webui")


@dataclass
class AppContext:
    """Options of one running app (from the command line / environment)."""

    runs_dir: Path = field(default_factory=lambda: Path(os.environ.get("TUNELAB_RUNS_DIR", "runs")))
    extra_models: list[str] = field(default_factory=list)
    samples_dir: Path = SAMPLES_DIR
    chat_concurrency: int = 4
    poll_seconds: float = 1.0
    # Several people on one app (a Space): each signed-in user sees only their own runs.
    multi_user: bool = field(default_factory=lambda: os.environ.get("TUNELAB_MULTI_USER", "").lower()
                             in ("1", "true", "yes", "on"))

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir).expanduser().resolve()
        env_models = os.environ.get("TUNELAB_EXTRA_MODELS", "")
        for item in env_models.split(os.pathsep):
            if item.strip() and item.strip() not in self.extra_models:
                self.extra_models.append(item.strip())

    def runs_for(self, request=None) -> Path:
        """The runs directory of the user behind ``request`` (gr.Request): the shared one,
        or ``runs/users/<user>`` in multi-user mode (engine.security.user_dir)."""
        if not self.multi_user:
            return self.runs_dir
        from engine.security import user_dir

        return user_dir(self.runs_dir, getattr(request, "username", None), True)

    def model_choices(self) -> list[str]:
        """The embedded default first, then extra local model directories."""
        return [EMBEDDED_MODEL, *self.extra_models]

    def sample_datasets(self) -> list[str]:
        """File names of the sample datasets shipped in assets/datasets."""
        if not self.samples_dir.is_dir():
            return []
        suffixes = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
        return sorted(p.name for p in self.samples_dir.iterdir() if p.suffix.lower() in suffixes)


# --------------------------------------------------------------------------- errors


def error_message(err: BaseException) -> str:
    """The sentence shown in the page for an engine error: its message, never blank."""
    text = str(err).strip()
    if not text:
        text = f"{type(err).__name__} (no message)"
    return text


def engine_errors(fn):
    """Turn an engine exception raised in a handler into ``gr.Error`` with its message.

    Gradio shows a bare "Error" for an ordinary exception unless the app runs with
    show_error; this makes the engine's own sentence (with file, line and field) the
    message of the modal, and the exception class its title. The traceback is logged.
    Works for plain functions and for generators (streaming handlers).
    """
    import gradio as gr

    def convert(err: BaseException) -> gr.Error:
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(error_message(err), title=type(err).__name__, print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001 - re-raised as a message in the page
                raise convert(err) from err

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised as a message in the page
            raise convert(err) from err

    return wrapper


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def escape_md(text: str) -> str:
    """Escape characters that Markdown would interpret in a table cell or a line."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_ref: str):
    """A tokenizer for statistics (read-only; shared by every user)."""
    from transformers import AutoTokenizer

    from engine.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_ref))


CSS = """
.tl-status {font-size: 0.95rem}
.tl-fail {border-left: 4px solid #d33; padding: 0.5rem 0.8rem; background: rgba(221,51,51,0.06)}
.tl-ok {border-left: 4px solid #2a7; padding: 0.5rem 0.8rem; background: rgba(34,170,119,0.06)}
.tl-note {border-left: 4px solid #e9a100; padding: 0.5rem 0.8rem; background: rgba(233,161,0,0.07)}
.tl-progress {width: 100%; height: 14px; border-radius: 7px; background: #e5e7eb; overflow: hidden}
.tl-progress > div {height: 100%; background: linear-gradient(90deg, #6366f1, #22c55e)}
.tl-stats {font-variant-numeric: tabular-nums; font-size: 0.85rem; opacity: 0.85}
.tl-conv {border: 1px solid var(--border-color-primary, #e5e7eb); border-radius: 10px; padding: 8px 10px; margin: 0 0 12px 0}
.tl-conv-head {font-size: 0.8rem; opacity: 0.7; margin-bottom: 6px}
.tl-msg {display: flex; margin: 4px 0}
.tl-msg.user {justify-content: flex-end}
.tl-bubble {max-width: 80%; padding: 6px 10px; border-radius: 12px; white-space: pre-wrap; word-break: break-word; font-size: 0.92rem}
.tl-msg.user .tl-bubble {background: #e0e7ff; color: #1e1b4b}
.tl-msg.assistant .tl-bubble {background: #dcfce7; color: #052e16}
.tl-msg.system .tl-bubble {background: #f3f4f6; color: #374151; font-style: italic; max-width: 100%}
.tl-msg.tool .tl-bubble {background: #fef3c7; color: #451a03; font-family: monospace}
.tl-role {font-size: 0.7rem; font-weight: 600; opacity: 0.65; display: block; margin-bottom: 2px}
"""


def stream_progress(fn, *args, **kwargs):
    """Run ``fn(*args, progress=callback, **kwargs)`` in a thread and yield each progress line
    as it comes; the last item yielded is ``("done", result)``. An exception in ``fn`` is
    re-raised here, in the handler's thread, so the page shows its message.

    Used for long engine calls that report progress as strings (export, model conversion),
    so the page shows what is happening instead of a frozen spinner.
    """
    import queue
    import threading

    lines: "queue.Queue[tuple[str, object]]" = queue.Queue()

    def work():
        try:
            result = fn(*args, progress=lambda msg: lines.put(("line", str(msg))), **kwargs)
        except BaseException as err:  # handed to the handler's thread below
            lines.put(("error", err))
        else:
            lines.put(("done", result))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while True:
        kind, item = lines.get()
        if kind == "error":
            raise item
        yield kind, item
        if kind == "done":
            return


def plot_frame(rows: list[dict], columns: dict[str, str]):
    """A DataFrame for a gr.*Plot with fixed column types, or None when there are no rows.

    The plot decides from the dtypes whether a column is a number or a category. An empty
    frame is never sent: a plot that first received an empty frame does not draw the lines
    of a colour-split frame that comes later (gradio 6.31); one that received None does.
    """
    import pandas as pd

    if not rows:
        return None
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def iterate_in_thread(make_iterator, on_close=None):
    """Drive an engine generator from one thread of its own and yield what it yields.

    Gradio resumes a synchronous generator handler on whatever worker thread is free, so
    each ``next()`` may run on a different thread; torch's grad and inference modes are
    per thread, so a generator that entered ``torch.inference_mode()`` finds it gone after
    such a hop. Running the generator start to end in one thread avoids that. ``on_close``
    is called if the consumer stops early (e.g. to set a stop flag).
    """
    import queue
    import threading

    items: "queue.Queue[tuple[str, object]]" = queue.Queue(maxsize=64)

    def work():
        try:
            for item in make_iterator():
                items.put(("item", item))
        except BaseException as err:  # handed to the consumer below
            items.put(("error", err))
        else:
            items.put(("end", None))

    threading.Thread(target=work, daemon=True).start()
    finished = False
    try:
        while True:
            kind, item = items.get()
            if kind == "error":
                finished = True
                raise item
            if kind == "end":
                finished = True
                return
            yield item
    finally:
        if not finished and on_close is not None:
            on_close()
