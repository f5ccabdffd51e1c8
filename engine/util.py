"""Small helpers shared by engine/ and webui/: Hub ids, tokenizer loading, byte sizes,
directory sizes, and writing a file or a directory in place atomically.

Imports nothing heavy at module level (transformers and huggingface_hub are imported inside
the functions that need them), so any module may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# --------------------------------------------------------------------------- Hub ids


class HubIdError(ValueError):
    """A string that is not a Hugging Face Hub repository id (``owner/name``)."""


def check_hub_id(ref: str) -> str:
    """``ref`` stripped, when it is a Hub repository id of the form ``owner/name`` as the Hub
    accepts it (huggingface_hub's own rules: letters, digits, '-', '_', '.', no '--' or '..',
    at most 96 characters, not ending in '.git', '-' or '.'; and each part starting with a
    letter or a digit); :class:`HubIdError` saying why otherwise."""
    text = (ref or "").strip() if isinstance(ref, str) else ""
    owner, slash, name = text.partition("/")
    if not (slash and owner and name and text.isascii() and owner[0].isalnum() and name[0].isalnum()) or "/" in name:
        raise HubIdError(
            "use OWNER/NAME (a user name or an organisation, then the model name) with letters, digits, '-', '_' or '.'"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise HubIdError(str(err)) from None
    return text


def is_hub_id(ref: str, *, local_wins: bool = True) -> bool:
    """Whether ``ref`` is a Hub repository id (:func:`check_hub_id`). With ``local_wins``
    (the default) a path that exists here is not one: ``org/name`` may be a local folder."""
    try:
        text = check_hub_id(ref)
    except HubIdError:
        return False
    if local_wins:
        try:
            return not Path(text).expanduser().exists()
        except (OSError, ValueError):
            return True
    return True


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer in ``path`` (a local directory), with a pad token (its eos) when it has
    none, so batches can be padded; ``trust_remote_code`` as the run's config says."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- sizes

_UNITS = ("B", "KB", "MB", "GB", "TB")


def fmt_bytes(n: float | None, *, binary: bool = True) -> str:
    """A byte count for people: ``"512 B"``, ``"3.4 KB"``, ``"86.0 MB"``, ``"1.52 GB"`` (bytes
    whole, KB and MB to one decimal, GB and TB to two); ``"-"`` for None. ``binary``: steps of
    1024 (memory, file limits); else steps of 1000 (download sizes, as the Hub shows them)."""
    if n is None:
        return "-"
    step = 1024 if binary else 1000
    size = float(n)
    for unit in _UNITS:
        if abs(size) < step or unit == _UNITS[-1]:
            if unit == "B":
                return f"{size:.0f} B"
            return f"{size:.1f} {unit}" if unit in ("KB", "MB") else f"{size:.2f} {unit}"
        size /= step
    raise AssertionError("unreachable")


def dir_size(path: str | Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0). Files that vanish
    while it counts are left out."""
    path = Path(path)
    try:
        if path.is_file():
            return path.stat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=True).st_size
            except OSError:  # removed meanwhile, or a dangling link
                continue
    return total


# --------------------------------------------------------------------------- writing in place


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Build a directory in a fresh temporary sibling of ``target`` (yielded, created empty)
    and put it in place of ``target`` when the block succeeds; on any error (or interrupt)
    the temporary directory is removed and ``target`` is left as it was.

    An existing ``target`` is swapped out by renames and then removed, so readers see the old
    directory or the new one, never a half-written one."""
    target = Path(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            try:
                tmp.rename(target)
            except BaseException:
                old.rename(target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and a
    rename, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
