"""Uploaded datasets: where they are kept, how many, and which are removed to make room.

An upload arrives in a temporary folder (Gradio's cache) that may be cleaned before a
queued or resumed run reads it, so :func:`stable_copy` copies it under the user's runs
directory: ``<user root>/.uploads/<content hash>/<name>`` (:func:`uploads_dir`). The same
file is stored once, and keeps its sanitised name (the run id is made from it).

Quotas (engine.security, read at each call): an upload over ``MAX_UPLOAD_BYTES``
(TUNELAB_MAX_UPLOAD_MB) is refused; a user keeps at most ``MAX_UPLOADS_PER_USER``
(TUNELAB_MAX_UPLOADS) uploads, and a new one removes the oldest uploads that no run trains
on (:func:`make_room_for_upload`); when runs use every one, the upload is refused with a
sentence saying what to do.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from engine import security
from engine.security import UnsafeInputError, safe_filename
from engine.util import fmt_bytes

UPLOADS_DIRNAME = ".uploads"


def uploads_dir(user_root: str | Path) -> Path:
    """The folder of one user's uploads, inside their runs directory."""
    return Path(user_root) / UPLOADS_DIRNAME


def uploads_in_use(runs_dir: Path) -> set[Path]:
    """The upload folders that a run in ``runs_dir`` trains on (read from each config.yaml)."""
    import yaml

    used = set()
    for config in Path(runs_dir).glob("*/config.yaml"):
        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # a run being written; it is not counted as using an upload
        path = (data.get("data") or {}).get("path")
        if path:
            used.add(Path(str(path)).resolve().parent)
    return used


def make_room_for_upload(uploads: Path, limit: int) -> None:
    """Keep at most ``limit`` uploads per user: the oldest ones that no run trains on are
    removed to make room; when every upload is in use, UnsafeInputError says what to do."""
    if not uploads.is_dir():
        return
    kept = sorted((p for p in uploads.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if len(kept) < limit:
        return
    used = uploads_in_use(uploads.parent)
    for folder in list(kept):
        if len(kept) < limit:
            return
        if folder.resolve() not in used:
            shutil.rmtree(folder)
            kept.remove(folder)
    if len(kept) >= limit:
        raise UnsafeInputError(
            f"You have {len(kept)} uploaded files, the most this app keeps per person ({limit}, "
            "TUNELAB_MAX_UPLOADS), and runs use every one of them: delete runs you no longer need on the "
            "Runs tab, then upload again."
        )


def stable_copy(src: str | Path, uploads: Path, max_uploads: int | None = None) -> Path:
    """Copy an upload out of the temporary cache into ``uploads`` (see the module docstring)
    and return the copy's path.

    Refuses files over MAX_UPLOAD_BYTES, and a new file beyond ``max_uploads`` (default
    MAX_UPLOADS_PER_USER) when no older unused upload can make room.
    """
    src = Path(src)
    size = src.stat().st_size
    if size > security.MAX_UPLOAD_BYTES:
        raise UnsafeInputError(
            f"{safe_filename(src.name)} is {fmt_bytes(size)}; uploads are limited to "
            f"{fmt_bytes(security.MAX_UPLOAD_BYTES)} here (TUNELAB_MAX_UPLOAD_MB)"
        )
    digest = hashlib.sha256()
    with src.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    dest = uploads / digest.hexdigest()[:16] / safe_filename(src.name)
    if not dest.exists():
        make_room_for_upload(uploads, security.MAX_UPLOADS_PER_USER if max_uploads is None else max_uploads)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return dest
