"""Build and load engine/kernels/lean.c, the lean decoder's native forward pass.

The library is compiled with the system C compiler (``$CC``, else ``cc``) for the CPU it
runs on (``-march=native``) the first time it is needed, in about a second, and cached
under ``<tunelab cache>/kernels/`` by a key of the source, the compiler and the CPU's
flags. It needs an x86-64 CPU with AVX-512; anywhere else (or with no compiler, or with
``TUNELAB_NATIVE=0``) :func:`load` raises :class:`NativeUnavailable` with the reason and
engine.fastdecode keeps its PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "kernels" / "lean.c"
_lock = threading.Lock()
_loaded: dict[str, object] = {}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why."""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if not path:
        raise NativeUnavailable(f"no C compiler ({cc!r} is not on PATH)")
    return path


def library_path(flags: set[str] | None = None) -> Path:
    """Where the compiled library for this source, compiler and CPU (``flags``: its
    /proc/cpuinfo flags, read when not given) is cached."""
    from engine.models import cache_root

    flags = _cpu_flags() if flags is None else flags
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(_compiler().encode())
    key.update(" ".join(sorted(flags)).encode())
    return cache_root() / "kernels" / f"lean-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [_compiler(), "-O3", "-march=native", "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lm", "-lpthread"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed: {err}") from err
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"compiling {SOURCE.name} failed: {first}")
        os.replace(out, target)  # atomic: a concurrent build of the same key is harmless


def load(threads: int | None = None):
    """The loaded library (ctypes), its thread pool started with ``threads`` threads."""
    if os.environ.get("TUNELAB_NATIVE", "1") == "0":
        raise NativeUnavailable("TUNELAB_NATIVE=0")
    lib = _loaded.get("lean")
    if lib is not None:  # loaded earlier in this process: the checks below have passed
        return lib
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"the native kernels are written for x86-64, not {platform.machine()}")
    flags = _cpu_flags()
    if not {"avx512f", "f16c", "fma"} <= flags:
        raise NativeUnavailable("the native kernels need AVX-512 (this CPU does not report avx512f)")
    with _lock:
        lib = _loaded.get("lean")
        if lib is None:
            path = library_path(flags)
            if not path.is_file():
                try:
                    _build(path)
                except OSError as err:  # e.g. a read-only cache folder
                    raise NativeUnavailable(f"building {path} failed: {err}") from err
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                raise NativeUnavailable(f"loading {path} failed: {err}") from err
            _declare(lib)
            if threads is None:
                import torch

                threads = torch.get_num_threads()
            lib.tl_init(max(1, int(threads)))
            _loaded["lean"] = lib
    return lib


def _declare(lib) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.tl_init.argtypes = [i32]
    lib.tl_init.restype = i32
    lib.tl_model.argtypes = [p, p, f32]
    lib.tl_model.restype = p
    lib.tl_model_free.argtypes = [p]
    lib.tl_model_free.restype = None
    lib.tl_forward.argtypes = [p, p, i64, i64, p, p, i64, p, p, p, i32, p]
    lib.tl_forward.restype = i32
    lib.tl_scratch_floats.argtypes = [p, i64]
    lib.tl_scratch_floats.restype = i64
    lib.tl_pack_int4.argtypes = [p, i64, i64, p]
    lib.tl_pack_int4.restype = i32
