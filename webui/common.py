"""What the tabs share: the app context (who is asking, and which runs are theirs),
engine-error reporting, and small formatters.

Nothing here holds per-user state: that lives in ``gr.State`` inside each tab. The only
process-wide things are the context (paths and options from the command line) and a cache
of tokenizers, which are read-only.

Several people on one app (a Space, a team server): :meth:`AppContext.runs_for` gives each
signed-in user a directory of their own (engine.security.user_dir), and every handler that
receives a run id, a path or a model reference from the page checks it against that
directory with :meth:`AppContext.run_dir` / :meth:`AppContext.check_model`, which raise
``gr.Error`` with a sentence, never a stack trace, in the visitor's language
(webui.i18n: the request says which).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.util import is_hub_id
from webui.i18n import engine_message, lang_of, tr

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "assets" / "datasets"
EMBEDDED_MODEL = "smollm2-135m-instruct"

log = logging.getLogger("tunelab.webui")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def oauth_configured(env: dict | None = None) -> bool:
    """Whether the app runs in a Space with "Sign in with Hugging Face" enabled:
    ``hf_oauth: true`` in the Space's README makes the Hub set OAUTH_CLIENT_ID (and
    OAUTH_CLIENT_SECRET, OAUTH_SCOPES, OPENID_PROVIDER_URL) beside SPACE_ID and
    SYSTEM=spaces. Outside a Space Gradio would replace the sign-in with the machine's own
    Hugging Face login (and fail to start without one), so SYSTEM=spaces is required too."""
    env = os.environ if env is None else env
    return bool(env.get("SPACE_ID") and env.get("OAUTH_CLIENT_ID") and env.get("SYSTEM") == "spaces")


def oauth_username(request) -> str | None:
    """The Hugging Face user name of a request signed in with OAuth (None if not signed in
    or the sign-in has expired). Reads the session gradio's OAuth routes write."""
    if request is None:
        return None
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    if isinstance(scope, dict):
        session = scope.get("session") or {}
    else:
        session = getattr(underlying, "session", None) or {}
    info = session.get("oauth_info") if hasattr(session, "get") else None
    if not isinstance(info, dict):
        return None
    expires_at = info.get("expires_at")
    if isinstance(expires_at, (int, float)) and expires_at < time.time():
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return str(name) if name else None


@dataclass
class AppContext:
    """Options of one running app (from the command line / environment)."""

    runs_dir: Path = field(default_factory=lambda: Path(os.environ.get("TUNELAB_RUNS_DIR", "runs")))
    extra_models: list[str] = field(default_factory=list)
    samples_dir: Path = SAMPLES_DIR
    chat_concurrency: int = 4
    poll_seconds: float = 1.0
    # A login is configured (--auth / TUNELAB_AUTH).
    auth: bool = False
    # "Sign in with Hugging Face" (a Space with hf_oauth: true).
    oauth: bool = field(default_factory=oauth_configured)
    # Several people on one app: each user sees only their own runs. None = decide:
    # TUNELAB_MULTI_USER when it is set, else on whenever a login (auth or OAuth) exists.
    multi_user: bool | None = None
    # The OpenAI-compatible API served at /v1 (engine.serve.Api), with --api.
    api: object | None = None

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir).expanduser().resolve()
        env_models = os.environ.get("TUNELAB_EXTRA_MODELS", "")
        for item in env_models.split(os.pathsep):
            if item.strip() and item.strip() not in self.extra_models:
                self.extra_models.append(item.strip())
        if self.multi_user is None:
            setting = os.environ.get("TUNELAB_MULTI_USER", "").strip()
            self.multi_user = _truthy(setting) if setting else (self.auth or self.oauth)

    # ---- who is asking, and what is theirs

    def user_of(self, request=None) -> str | None:
        """The user behind ``request`` (gr.Request): the --auth login name, ``hf:<name>``
        for a Hugging Face sign-in, or, in multi-user mode with no login configured at all,
        ``session:<id>`` (a workspace that lasts as long as the page). None: nobody
        signed in."""
        name = getattr(request, "username", None)
        if name:
            return str(name)
        hf_name = oauth_username(request) if self.oauth else None
        if hf_name:
            return f"hf:{hf_name}"
        if self.multi_user and not self.auth and not self.oauth:
            session = getattr(request, "session_hash", None)
            if session:
                return f"session:{session}"
        return None

    def display_name(self, request=None) -> str | None:
        user = self.user_of(request)
        if user is None:
            return None
        return user.split(":", 1)[1] if user.startswith(("hf:", "session:")) else user

    def runs_for(self, request=None) -> Path:
        """The runs directory of the user behind ``request``: the shared one, or, in
        multi-user mode, ``runs/users/<user>`` (engine.security.user_dir). In multi-user
        mode a request with no user is refused with a gr.Error saying how to sign in."""
        if not self.multi_user:
            return self.runs_dir
        from engine.security import user_dir

        user = self.user_of(request)
        if user is None:
            import gradio as gr

            lang = lang_of(request)
            how = tr(lang, "common.sign_in_hf" if self.oauth else "common.log_in")
            raise gr.Error(tr(lang, "common.sign_in_first", how=how), title=tr(lang, "common.not_signed_in_title"))
        return user_dir(self.runs_dir, user, True)

    def listing_dir(self, request=None) -> Path | None:
        """Like :meth:`runs_for`, but None instead of an error (for lists filled on page load)."""
        if self.multi_user and self.user_of(request) is None:
            return None
        return self.runs_for(request)

    def run_dir(self, request, value, must_exist: bool = True) -> Path:
        """The run directory named by ``value`` from the page (a run id, or a run directory
        path as the pickers hold), checked to be one of this user's runs.

        Raises gr.Error for an empty value, a run id with separators or dots that would
        leave the directory, a path outside the user's runs, or (``must_exist``) a run
        that is not there.
        """
        import gradio as gr

        from engine.security import UnsafeInputError, owns, safe_run_id, within

        lang = lang_of(request)
        if not value:
            raise gr.Error(tr(lang, "common.pick_run"))
        root = self.runs_for(request)
        text = str(value)
        name = Path(text).name if ("/" in text or "\\" in text) else text
        try:
            path = within(root, safe_run_id(name))
        except UnsafeInputError as err:
            raise gr.Error(error_message(err, lang), title=tr(lang, "common.refused")) from None
        if name != text and not (owns(root, text) and Path(text).resolve() == path):
            raise gr.Error(tr(lang, "common.not_your_run", name=name), title=tr(lang, "common.refused"))
        if must_exist and not (path / "status.json").is_file() and not (path / "config.yaml").is_file():
            raise gr.Error(tr(lang, "common.no_such_run", name=name), title=tr(lang, "common.not_found"))
        return path

    def check_model(self, request, ref: str) -> str:
        """A model reference from the page, refused in multi-user mode when it is a local
        path outside the model list and the user's own runs (one user must not load
        another's files). Hub ids (``org/name``) and the listed models always pass."""
        import gradio as gr

        from engine.security import owns

        lang = lang_of(request)
        ref = (ref or "").strip()
        if not ref:
            raise gr.Error(tr(lang, "common.choose_model"))
        if not self.multi_user or ref in self.model_choices():
            return ref
        path = Path(ref).expanduser()
        if is_hub_id(ref):  # a Hub id that is not a local folder
            return ref
        if path.is_absolute() and owns(self.runs_for(request), path):
            return ref
        raise gr.Error(tr(lang, "common.model_refused", ref=ref), title=tr(lang, "common.refused"))

    def model_choices(self) -> list[str]:
        """The embedded default first, then extra local model directories."""
        return [EMBEDDED_MODEL, *self.extra_models]

    def sample_datasets(self) -> list[str]:
        """File names of the sample datasets shipped in assets/datasets."""
        if not self.samples_dir.is_dir():
            return []
        suffixes = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
        return sorted(p.name for p in self.samples_dir.iterdir() if p.suffix.lower() in suffixes)

    def sample_path(self, name: str, request=None) -> Path:
        """The path of a sample dataset named on the page (only the listed ones)."""
        import gradio as gr

        if name not in self.sample_datasets():
            lang = lang_of(request)
            raise gr.Error(tr(lang, "common.not_a_sample", name=name), title=tr(lang, "common.refused"))
        return self.samples_dir / name


# --------------------------------------------------------------------------- errors


def error_message(err: BaseException, lang: str | None = None) -> str:
    """The sentence shown in the page for an engine error: its coded message in ``lang``
    (engine.messages), else its English text; secrets removed, never blank."""
    from engine.security import redact

    text = (engine_message(lang, err) or str(err)).strip()
    if not text:
        text = f"{type(err).__name__} (no message)"
    return redact(text)


def engine_errors(fn):
    """Turn an engine exception raised in a handler into ``gr.Error`` with its message.

    Gradio shows a bare "Error" for an ordinary exception unless the app runs with
    show_error; this makes the engine's own sentence (with file, line and field) the
    message of the modal, and the exception class its title. The traceback is logged.
    Works for plain functions and for generators (streaming handlers).
    """
    import gradio as gr

    from engine.security import UnsafeInputError

    def convert(err: BaseException, args, kwargs) -> gr.Error:
        log.exception("handler %s failed", fn.__name__)
        request = next((a for a in [*args, *kwargs.values()] if isinstance(a, gr.Request)), None)
        lang = lang_of(request)
        # A refusal of the shared app (path, limit, demo) is not a failure of the engine.
        title = tr(lang, "common.not_allowed") if isinstance(err, UnsafeInputError) else type(err).__name__
        return gr.Error(error_message(err, lang), title=title, print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:  # noqa: BLE001 - re-raised as a message in the page
                raise convert(err, args, kwargs) from err

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised as a message in the page
            raise convert(err, args, kwargs) from err

    return wrapper


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None, lang: str | None = None) -> str:
    """'45 s', '1 min 15 s', '2 h 05 min' (in ``lang``; English by default)."""
    if seconds is None:
        return "-"
    seconds = max(0, float(seconds))
    if seconds < 60:
        return tr(lang, "common.duration.s", s=f"{seconds:.0f}")
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return tr(lang, "common.duration.min", m=minutes, s=sec)
    hours, minutes = divmod(minutes, 60)
    return tr(lang, "common.duration.h", h=hours, m=minutes)


def state_name(state: str, lang: str | None = None) -> str:
    """A run's state (engine.runs) in ``lang``; the engine's word when the locale has none."""
    from webui.i18n import translations

    key = f"train.state.{state}"
    return tr(lang, key) if key in translations()["en"] else state


def fmt_number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def escape_md(text: str) -> str:
    """Escape characters that Markdown would interpret in a table cell or a line."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_ref: str):
    """A tokenizer for statistics (read-only; shared by every user)."""
    from engine.models import resolve_model
    from engine.util import load_tokenizer as load

    return load(resolve_model(model_ref))


CSS = """
.tl-status {font-size: 0.95rem}
.tl-fail {border-left: 4px solid #d33; padding: 0.5rem 0.8rem; background: rgba(221,51,51,0.06)}
.tl-ok {border-left: 4px solid #2a7; padding: 0.5rem 0.8rem; background: rgba(34,170,119,0.06)}
.tl-note {border-left: 4px solid #e9a100; padding: 0.5rem 0.8rem; background: rgba(233,161,0,0.07)}
.tl-progress {width: 100%; height: 14px; border-radius: 7px; background: #e5e7eb; overflow: hidden}
.tl-progress > div {height: 100%; background: linear-gradient(90deg, #6366f1, #22c55e)}
.tl-stats {font-variant-numeric: tabular-nums; font-size: 0.85rem; opacity: 0.85}
.tl-conv {border: 1px solid var(--border-color-primary, #e5e7eb); border-radius: 10px; padding: 8px 10px;
  margin: 0 0 12px 0}
.tl-conv-head {font-size: 0.8rem; opacity: 0.7; margin-bottom: 6px}
.tl-msg {display: flex; margin: 4px 0}
.tl-msg.user {justify-content: flex-end}
.tl-bubble {max-width: 80%; padding: 6px 10px; border-radius: 12px; white-space: pre-wrap; word-break: break-word;
  font-size: 0.92rem}
.tl-msg.user .tl-bubble {background: #e0e7ff; color: #1e1b4b}
.tl-msg.assistant .tl-bubble {background: #dcfce7; color: #052e16}
.tl-msg.system .tl-bubble {background: #f3f4f6; color: #374151; font-style: italic; max-width: 100%}
.tl-msg.tool .tl-bubble {background: #fef3c7; color: #451a03; font-family: monospace}
.tl-role {font-size: 0.7rem; font-weight: 600; opacity: 0.65; display: block; margin-bottom: 2px}
"""


class MainThreadRunner:
    """Lends the process's main thread to the engine's PyTorch work, while Gradio serves
    from other threads.

    engine.scheduler runs every PyTorch call (loading, generating, the export's
    measurements) on one thread, its ``torch`` lane: PyTorch on the CPU is slower from
    many threads (each with its own OpenMP pool), and torch's inference mode is per thread.
    ``tunelab ui`` starts Gradio without blocking and ``serve`` makes the main thread that
    lane's thread until ``stop()``; without a serving main thread (tests, notebooks) the
    lane runs a thread of its own.
    """

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self.serving = False

    @staticmethod
    def _lane():
        from engine import scheduler

        return scheduler.default().lane(scheduler.TORCH)

    def open(self) -> None:
        """From now on PyTorch work waits for ``serve`` to run it on this thread."""
        self._stop.clear()
        self.serving = True
        self._lane().expect_host()

    def serve(self, until=None) -> None:
        """Run PyTorch work on this (the main) thread until ``stop()`` or ``until()`` is true;
        what is left then goes back to the lane's own thread."""
        self.open()
        try:
            self._lane().host(until=lambda: self._stop.is_set() or (until is not None and until()))
        finally:
            self.serving = False

    def stop(self) -> None:
        self._stop.set()
        self.serving = False
        self._lane().release_host()  # opened but never served: the lane's own thread serves


MAIN_THREAD = MainThreadRunner()


def stream_progress(fn, *args, **kwargs):
    """Run ``fn(*args, progress=callback, **kwargs)`` away from the handler's thread and
    yield each progress line as it comes; the last item yielded is ``("done", result)``. An
    exception in ``fn`` is re-raised here, in the handler's thread, so the page shows its
    message.

    Used for long engine calls that report progress as strings (export, model conversion),
    so the page shows what is happening instead of a frozen spinner. ``fn`` runs on the
    engine's PyTorch thread (engine.scheduler; the main thread when the app serves it).
    """
    from engine import scheduler

    with scheduler.default().progress(scheduler.TORCH, fn, *args, **kwargs) as stream:
        yield from stream


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
    """Drive an engine generator from one thread and yield what it yields.

    Gradio resumes a synchronous generator handler on whatever worker thread is free, so
    each ``next()`` may run on a different thread; torch's grad and inference modes are
    per thread, so a generator that entered ``torch.inference_mode()`` finds it gone after
    such a hop. The generator runs start to end on the engine's PyTorch thread instead
    (engine.scheduler). ``on_close`` is called if the consumer stops early (e.g. to set a
    stop flag); the generator is then closed on that thread after its current item.
    """
    from engine import scheduler

    stream = scheduler.default().stream(scheduler.TORCH, make_iterator)
    try:
        yield from stream
    finally:
        if not stream.finished:
            stream.close()
            if on_close is not None:
                on_close()


def launch_kwargs(ctx: AppContext) -> dict:
    """Arguments of launch() that every entry point (app or single tab) shares.

    Single user: the runs directory may be served (downloads are zipped there). Shared app:
    it is blocked from Gradio's file route altogether, so nobody fetches a file of another
    person's run by its path; downloads are zipped elsewhere (webui.export_tab.downloads_dir)
    and Gradio serves its own copy. Uploads over MAX_UPLOAD_BYTES are refused as they arrive.
    """
    import gradio as gr

    from engine.security import MAX_UPLOAD_BYTES
    from webui.i18n import i18n

    kwargs = {
        "i18n": i18n(),
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald"),
        "css": CSS,
        "show_error": True,
        "max_file_size": MAX_UPLOAD_BYTES,
    }
    if ctx.multi_user:
        kwargs["blocked_paths"] = [str(ctx.runs_dir)]
    else:
        kwargs["allowed_paths"] = [str(ctx.runs_dir)]
    return kwargs


def launch_and_serve(demo, **kwargs) -> None:
    """``demo.launch(**kwargs)`` without blocking, then the main thread runs the engine's
    PyTorch work (MainThreadRunner) until Ctrl-C, and the server is closed."""
    # transformers resolves its names lazily on first use; two handlers doing it at once in
    # different threads (the Data tab's sample and Inspect, back to back) could see a half-
    # imported package: "cannot import name 'AutoTokenizer' from 'transformers'". Resolve
    # the names the handlers use here, in one thread, before any request arrives.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    MAIN_THREAD.open()  # requests arriving before serve() starts wait for it
    try:
        demo.launch(prevent_thread_lock=True, **kwargs)
        MAIN_THREAD.serve()
    except KeyboardInterrupt:
        print("\nKeyboard interruption: closing the server.", flush=True)
    finally:
        MAIN_THREAD.stop()
        demo.close()


def launch_standalone(create) -> None:
    """``python -m webui.<tab>``: serve one tab with the app's launch settings."""
    ctx = AppContext()
    launch_and_serve(create(ctx), **launch_kwargs(ctx))


# A job state (engine.runs.STATES, and "starting") -> its locale key; the Runs, Export and
# Evaluate tabs word states alike.
STATE_KEYS = {
    "created": "runs.state.created",
    "queued": "runs.state.queued",
    "starting": "runs.state.starting",
    "running": "runs.state.running",
    "completed": "runs.state.completed",
    "failed": "runs.state.failed",
    "aborted": "runs.state.aborted",
}


def state_text(lang: str | None, state: str | None) -> str:
    """A job state (engine.runs.STATES) as the page shows it in ``lang``; an unknown one as is."""
    key = STATE_KEYS.get(state or "")
    return tr(lang, key) if key else str(state or "?")
