"""Build and load Lexica's C kernels (``train/kernels/*.c``) with the system C compiler.

The kernels are plain C with no Python or PyTorch headers, so one compiles in about a second;
it is built on first use into a cache folder and loaded with ctypes (which releases the GIL
during a call). Nothing here is required: without a compiler, on a build error, or with
``LEXICA_NATIVE=0``, ``load`` returns None and callers keep their PyTorch path, which gives the
same results more slowly. The reason is logged once per kernel.

Cache: ``LEXICA_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/lexica/native``, else
``~/.cache/lexica/native``. A library's file name hashes its source, the compiler and the flags,
so an edited kernel or another compiler builds anew, and processes that build at once (Ray
workers on one node) each write a private file and rename it into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
DISABLE_ENV = "LEXICA_NATIVE"
CACHE_ENV = "LEXICA_NATIVE_CACHE"


def cache_folder() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lexica" / "native"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    """Optimised, and on x86-64 with AVX2/FMA when this CPU has them (the kernels' vector paths);
    not -march=native, so a cached build also runs on the other nodes of a cluster of one kind."""
    flags = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def compiler() -> str | None:
    named = os.environ.get("CC")
    return shutil.which(named) if named else (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel ``train/kernels/<name>.c``, built if not cached; None if unavailable."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("native kernel %s: disabled by %s; using the PyTorch path", name, DISABLE_ENV)
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("native kernel %s unavailable (%s); using the PyTorch path, which is slower", name, error)
        return None


def kernel(name: str, symbol: str, argtypes: tuple, restype=None):
    """Function ``symbol`` of kernel library ``name`` with its C signature declared (ctypes then
    converts and checks the arguments), or None without the library."""
    library = load(name)
    if library is None:
        return None
    function = getattr(library, symbol)
    function.argtypes, function.restype = list(argtypes), restype
    return function


def build(name: str) -> Path:
    """Path of the built library for ``name``, compiling it if the cache lacks it."""
    source = KERNELS / f"{name}.c"
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    flags = compile_flags()
    key = hashlib.sha256("\0".join([source.read_text(), cc, *flags, platform.machine()]).encode()).hexdigest()
    target = cache_folder() / f"{name}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    os.close(descriptor)
    try:
        # OpenMP first: a kernel then shares PyTorch's OpenMP threads (see topk_rows.c); a compiler
        # without it (clang lacking libomp) builds the kernel's POSIX-threads variant.
        for attempt in (["-fopenmp"], []):
            result = subprocess.run([cc, *flags, *attempt, "-o", partial, str(source)], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed on {source.name}: {result.stderr.strip()[-800:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("built native kernel %s into %s", name, target)
    return target
