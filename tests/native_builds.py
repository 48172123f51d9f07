"""Helpers for the tests of the C kernels (train/kernels/): the compiler requirement and a
portable build (no AVX flags, no OpenMP) that exercises the kernels' generic code on any machine.

Without a C compiler the kernels cannot be built and their tests skip; LEXICA_REQUIRE_NATIVE=1
(set by CI) turns that skip into a failure, so CI always runs them."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest

from lexica.train import native


def require_c_compiler() -> str:
    compiler = native.compiler()
    if compiler is None:
        if os.environ.get("LEXICA_REQUIRE_NATIVE") == "1":
            pytest.fail("LEXICA_REQUIRE_NATIVE=1 but no C compiler was found (install gcc or set CC)")
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    return compiler


def portable_build(name: str, folder: Path, like):
    """Kernel library ``name`` built without AVX flags or OpenMP; returns its function with the
    C signature of ``like`` (the production build's declared function)."""
    path = folder / f"{name}_portable.so"
    subprocess.run([require_c_compiler(), "-O2", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-o", str(path),
                    str(native.KERNELS / f"{name}.c")], check=True)
    function = getattr(ctypes.CDLL(str(path)), like.__name__)
    function.argtypes, function.restype = like.argtypes, like.restype
    return function
