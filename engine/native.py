"""Build and load engine/kernels/lean.c, the lean decoder's native forward pass.

The library is compiled with the system C compiler (``$CC``, else ``cc``) for the CPU it
runs on the first time it is needed, in about a second, and cached under
``<tunelab cache>/kernels/`` by a key of the source, the compiler, the instruction set and
the CPU's flags. Two instruction sets are built from the same source:

* ``avx512``: x86-64 with AVX-512 (``avx512f``), F16C and FMA;
* ``avx2``: x86-64 with AVX2, F16C and FMA (most laptops, the AMD EPYC machines here).

:func:`choose_isa` picks the best one the CPU reports; ``TUNELAB_NATIVE`` overrides it
(``avx2`` or ``avx512`` asks for that one, ``0`` turns the kernels off). Anywhere else
(another architecture, an older CPU, no compiler) :func:`load` raises
:class:`NativeUnavailable` with the reason and engine.fastdecode keeps its PyTorch path.
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
# instruction set -> the CPU flags it needs and the compiler flags that target it, best first.
# The AVX2 build is made for this CPU with AVX-512 switched off, so that it is also what an
# AVX-512 machine runs when asked for it (TUNELAB_NATIVE=avx2: tests and benchmarks).
ISAS = {
    "avx512": ({"avx512f", "f16c", "fma"}, ["-march=native"]),
    "avx2": ({"avx2", "f16c", "fma"}, ["-march=native", "-mno-avx512f"]),
}
_lock = threading.Lock()
_loaded: dict[str, object] = {}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why."""


def _cpu_flags(cpuinfo_text: str | None = None) -> set[str]:
    """This CPU's flags from /proc/cpuinfo (or from ``cpuinfo_text``), as engine.hardware reads them."""
    from engine.hardware import read_cpuinfo

    return set(read_cpuinfo(cpuinfo_text).flags)


def choose_isa(flags: set[str], requested: str | None = None, machine: str | None = None) -> str:
    """The instruction set the kernels are built for on a CPU with ``flags``.

    ``requested`` is ``TUNELAB_NATIVE``'s value (read when None): "" / "1" / "auto" for
    the best the CPU has, "avx512" or "avx2" for that one, "0" for none. Raises
    NativeUnavailable with the reason (naming the missing flags) when none can run."""
    requested = (os.environ.get("TUNELAB_NATIVE", "") if requested is None else requested).strip().lower()
    machine = (platform.machine() if machine is None else machine).lower()
    if requested in ("0", "off", "no", "false"):
        raise NativeUnavailable(f"TUNELAB_NATIVE={requested}")
    if machine not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"the native kernels are written for x86-64, not {machine}")
    if requested in ("", "1", "auto", "on", "yes", "true"):
        for isa, (needs, _) in ISAS.items():
            if needs <= flags:
                return isa
        missing = " ".join(sorted(ISAS["avx2"][0] - flags))
        raise NativeUnavailable(f"the native kernels need AVX2 with FMA and F16C or AVX-512 (this CPU lacks {missing})")
    if requested not in ISAS:
        raise NativeUnavailable(f"TUNELAB_NATIVE={requested!r} is none of 0, auto, {', '.join(ISAS)}")
    missing = ISAS[requested][0] - flags
    if missing:
        raise NativeUnavailable(
            f"TUNELAB_NATIVE={requested} asks for CPU flags this CPU lacks: {' '.join(sorted(missing))}"
        )
    return requested


def _compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if not path:
        raise NativeUnavailable(f"no C compiler ({cc!r} is not on PATH)")
    return path


def library_path(flags: set[str] | None = None, isa: str = "avx512") -> Path:
    """Where the library compiled for ``isa`` on this source, compiler and CPU (``flags``:
    its /proc/cpuinfo flags, read when not given) is cached."""
    from engine.models import cache_root

    flags = _cpu_flags() if flags is None else flags
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(_compiler().encode())
    key.update(" ".join(ISAS[isa][1]).encode())
    key.update(" ".join(sorted(flags)).encode())
    return cache_root() / "kernels" / f"lean-{isa}-{key.hexdigest()[:16]}.so"


def _build(target: Path, isa: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [_compiler(), "-O3", *ISAS[isa][1], "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lm", "-lpthread"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed: {err}") from err
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"compiling {SOURCE.name} for {isa} failed: {first}")
        os.replace(out, target)  # atomic: a concurrent build of the same key is harmless


def load(threads: int | None = None, isa: str | None = None):
    """The loaded library (ctypes) for ``isa`` (None: :func:`choose_isa`'s choice), its
    thread pool started with ``threads`` threads. ``lib.isa`` names its instruction set."""
    flags = _cpu_flags()
    isa = choose_isa(flags, isa)
    lib = _loaded.get(isa)
    if lib is not None:  # loaded earlier in this process: the checks below have passed
        return lib
    with _lock:
        lib = _loaded.get(isa)
        if lib is None:
            path = library_path(flags, isa)
            if not path.is_file():
                try:
                    _build(path, isa)
                except OSError as err:  # e.g. a read-only cache folder
                    raise NativeUnavailable(f"building {path} failed: {err}") from err
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                raise NativeUnavailable(f"loading {path} failed: {err}") from err
            _declare(lib)
            lib.isa = lib.tl_isa().decode()
            if lib.isa != isa:
                raise NativeUnavailable(f"{path} was built for {lib.isa}, not {isa}")
            if threads is None:
                import torch

                threads = torch.get_num_threads()
            lib.tl_init(max(1, int(threads)))
            _loaded[isa] = lib
    return lib


def _declare(lib) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.tl_isa.argtypes = []
    lib.tl_isa.restype = ctypes.c_char_p
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
