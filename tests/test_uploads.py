"""Upload quotas and their garbage collection (engine.uploads), without the web app."""

from __future__ import annotations

import os

import pytest

from engine import security, uploads
from engine.security import UnsafeInputError


def _upload(root, tmp_path, name: str, age_s: int, limit: int = 10):
    src = tmp_path / "incoming" / name
    src.parent.mkdir(exist_ok=True)
    src.write_text(f'{{"file": "{name}"}}\n')
    stored = uploads.stable_copy(src, uploads.uploads_dir(root), max_uploads=limit)
    os.utime(stored.parent, (1_000_000 + age_s, 1_000_000 + age_s))  # older uploads have smaller times
    return stored


def _run_using(root, name: str, path) -> None:
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  path: {path}\n", encoding="utf-8")


def test_uploads_live_under_the_users_root_once_per_content(tmp_path):
    root = tmp_path / "alice"
    first = _upload(root, tmp_path, "data.jsonl", 0)
    assert first.parent.parent == root / ".uploads" == uploads.uploads_dir(root)
    again = uploads.stable_copy(tmp_path / "incoming" / "data.jsonl", uploads.uploads_dir(root))
    assert again == first and len(list(uploads.uploads_dir(root).iterdir())) == 1
    assert not list(root.rglob("*.partial"))


def test_the_oldest_unused_uploads_make_room_and_used_ones_are_kept(tmp_path):
    root = tmp_path / "alice"
    old_used = _upload(root, tmp_path, "a.jsonl", 1, limit=3)
    old_unused = _upload(root, tmp_path, "b.jsonl", 2, limit=3)
    newer = _upload(root, tmp_path, "c.jsonl", 3, limit=3)
    _run_using(root, "run-a", old_used)
    (root / "being-written").mkdir()
    (root / "being-written" / "config.yaml").write_text("data: [unclosed\n", encoding="utf-8")  # not read
    assert uploads.uploads_in_use(root) == {old_used.parent.resolve()}

    fourth = _upload(root, tmp_path, "d.jsonl", 4, limit=3)
    assert old_used.exists() and newer.exists() and fourth.exists()
    assert not old_unused.parent.exists()  # the oldest one no run uses


def test_when_runs_use_every_upload_a_new_one_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "alice"
    stored = [_upload(root, tmp_path, f"{i}.jsonl", i, limit=2) for i in range(2)]
    for i, path in enumerate(stored):
        _run_using(root, f"run-{i}", path)
    with pytest.raises(UnsafeInputError, match="TUNELAB_MAX_UPLOADS") as refused:
        _upload(root, tmp_path, "new.jsonl", 9, limit=2)
    assert "Runs tab" in str(refused.value) and all(p.exists() for p in stored)


def test_the_limits_are_read_from_engine_security_at_each_call(tmp_path, monkeypatch):
    root = tmp_path / "alice"
    src = tmp_path / "big.jsonl"
    src.write_bytes(b"x" * 100)
    monkeypatch.setattr(security, "MAX_UPLOAD_BYTES", 99)
    with pytest.raises(UnsafeInputError, match=r"uploads are limited to 99 B here \(TUNELAB_MAX_UPLOAD_MB\)"):
        uploads.stable_copy(src, uploads.uploads_dir(root))
    assert not uploads.uploads_dir(root).exists()
    monkeypatch.setattr(security, "MAX_UPLOAD_BYTES", 100)
    monkeypatch.setattr(security, "MAX_UPLOADS_PER_USER", 1)
    kept = uploads.stable_copy(src, uploads.uploads_dir(root))
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"y" * 10)
    assert uploads.stable_copy(other, uploads.uploads_dir(root)).exists() and not kept.exists()
