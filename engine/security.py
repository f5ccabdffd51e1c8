"""Safety for a shared deployment (a public Hugging Face Space, a team server).

* :func:`safe_filename` and :func:`safe_run_id` refuse path traversal in anything a user names.
* :func:`user_dir` gives each signed-in user a directory of their own; :func:`owns` checks a path
  lies inside it, so one user cannot list, fetch or delete another's runs.
* :func:`redact` removes secrets taken from the environment (``HF_TOKEN`` and friends) from any
  text before it is written to disk or sent to a page.
* :class:`DemoLimits` caps what a public demo may train (``TUNELAB_DEMO=1``).
* Upload limits: :data:`MAX_UPLOAD_BYTES` and :data:`MAX_UPLOADS_PER_USER`.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from engine.messages import Message, coded

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY", "TUNELAB_AUTH")
MAX_UPLOAD_BYTES = int(os.environ.get("TUNELAB_MAX_UPLOAD_MB", "200")) * 1024 * 1024
MAX_UPLOADS_PER_USER = int(os.environ.get("TUNELAB_MAX_UPLOADS", "20"))
# What one browser session may keep in the server's memory: its state is dropped after an hour
# idle, and the Data tab keeps at most this many records of a dataset for its preview.
SESSION_TTL_S = 3600
PREVIEW_MAX_RECORDS = int(os.environ.get("TUNELAB_PREVIEW_RECORDS", "5000"))
ANONYMOUS = "local"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeInputError(ValueError):
    """A name or path from a user that would escape its directory, or exceed a limit."""


def safe_filename(name: str) -> str:
    """A file name from a user, reduced to its last component and a safe alphabet.

    Refuses names that are empty or made only of dots after cleaning, so nothing can
    resolve outside the directory it is joined to.
    """
    if not isinstance(name, str):
        raise UnsafeInputError("file name must be text")
    base = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    base = re.sub(r"[^\w.\-]+", "_", base).strip("._ ")
    if not base or set(base) <= {"."}:
        raise UnsafeInputError(f"file name {name!r} is not usable")
    return base[:160]


def safe_run_id(run_id: str) -> str:
    """Validate a run id: letters, digits, '.', '_' and '-', no leading dot, no separators."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise coded(UnsafeInputError, "run_id_invalid", run_id=repr(run_id))
    return run_id


def within(root: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` onto ``root`` and refuse a result outside ``root`` (symlinks resolved)."""
    root_path = Path(root).resolve()
    path = root_path.joinpath(*parts).resolve()
    if path != root_path and root_path not in path.parents:
        raise UnsafeInputError(f"{'/'.join(parts)!r} points outside {root_path}")
    return path


def user_key(username: str | None) -> str:
    """A directory name for a user: readable, and unique even when names differ only in case or symbols."""
    if not username:
        return ANONYMOUS
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", username)[:40].strip("_") or "user"
    digest = hashlib.sha256(username.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def user_dir(base: str | os.PathLike, username: str | None, multi_user: bool) -> Path:
    """The directory holding one user's runs and uploads.

    With ``multi_user`` off (a local, single-person app) everyone shares ``base``; with it on,
    each user has ``base/users/<key>`` and nothing outside it is reachable through the app.
    """
    base = Path(base)
    if not multi_user:
        return base
    path = base / "users" / user_key(username)
    path.mkdir(parents=True, exist_ok=True)
    return path


def owns(user_root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``user_root`` (after resolving symlinks and '..')."""
    root = Path(user_root).resolve()
    target = Path(path).resolve()
    return target == root or root in target.parents


def secrets_from_env(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = []
    for name in SECRET_ENV_VARS:
        value = env.get(name, "")
        if len(value) >= 6:
            values.append(value)
            if name == "TUNELAB_AUTH" and ":" in value:
                values.extend(p for p in value.split(":", 1)[1:] if len(p) >= 6)
    return values


_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """Replace secret values from the environment and anything shaped like a Hub token."""
    if not text:
        return text
    for secret in secrets_from_env(env):
        text = text.replace(secret, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


@dataclass
class DemoLimits:
    """What a public demo allows; enabled by TUNELAB_DEMO=1 (or ``--demo``)."""

    enabled: bool = False
    max_steps: int = 60
    max_records: int = 2000
    max_length: int = 512
    methods: tuple[str, ...] = ("lora", "dora")
    models: tuple[str, ...] = ("smollm2-135m-instruct",)
    extra_models: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "DemoLimits":
        env = os.environ if env is None else env
        enabled = env.get("TUNELAB_DEMO", "").lower() in ("1", "true", "yes", "on")
        limits = cls(enabled=enabled)
        if env.get("TUNELAB_DEMO_MAX_STEPS"):
            limits.max_steps = int(env["TUNELAB_DEMO_MAX_STEPS"])
        if env.get("TUNELAB_DEMO_MODELS"):
            limits.extra_models = [m.strip() for m in env["TUNELAB_DEMO_MODELS"].split(",") if m.strip()]
        return limits

    def check(self, config) -> None:
        """Raise UnsafeInputError naming every limit the run config goes over."""
        if not self.enabled:
            return
        problems = []
        allowed_models = set(self.models) | set(self.extra_models)
        if config.model.name_or_path not in allowed_models:
            problems.append(
                Message(
                    "demo_model",
                    {"model": repr(config.model.name_or_path), "allowed": ", ".join(sorted(allowed_models))},
                )
            )
        if config.method.name not in self.methods:
            problems.append(
                Message("demo_method", {"method": repr(config.method.name), "allowed": ", ".join(self.methods)})
            )
        steps = config.training.max_steps
        if steps == -1 or steps > self.max_steps:
            problems.append(Message("demo_steps", {"value": steps, "limit": self.max_steps}))
        if config.data.max_length > self.max_length:
            problems.append(Message("demo_max_length", {"value": config.data.max_length, "limit": self.max_length}))
        if config.distributed.num_processes > 1 or config.distributed.deepspeed != "none":
            problems.append(Message("demo_distributed"))
        if config.model.trust_remote_code:
            problems.append(Message("demo_remote_code"))
        if problems:
            raise coded(UnsafeInputError, "demo_limits", problems=problems)

    def clamp(self, config) -> None:
        """Make a config fit the demo in place (used to pre-fill the form)."""
        if not self.enabled:
            return
        if config.training.max_steps == -1 or config.training.max_steps > self.max_steps:
            config.training.max_steps = self.max_steps
        config.data.max_length = min(config.data.max_length, self.max_length)


def remote_code_allowed(env: dict[str, str] | None = None) -> bool:
    """The operator's switch (TUNELAB_ALLOW_REMOTE_CODE=1): off by default."""
    env = os.environ if env is None else env
    return env.get("TUNELAB_ALLOW_REMOTE_CODE", "").lower() in ("1", "true", "yes", "on")


def check_remote_code(config, env: dict[str, str] | None = None) -> None:
    """Refuse ``model.trust_remote_code: true`` unless the operator has enabled it."""
    if config.model.trust_remote_code and not remote_code_allowed(env):
        raise coded(UnsafeInputError, "remote_code_disabled")
