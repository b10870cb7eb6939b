"""Kernel sources and the memoized ``cupy.RawModule`` per (source file, dtype).

Every ``*.cu`` file in this package (package data) is one kernel source; ``_prelude.cu`` is not a source but
the common text put in front of each. A module is specialised for one dtype by two ``#define`` lines at its
top (``NPCONV_REAL`` = ``float``/``double``, ``NPCONV_SFX`` = ``f32``/``f64``), so its entry points are named
``npconv_<name>_f32`` or ``npconv_<name>_f64`` (plain ``extern "C"`` names: no ``name_expressions``).

:func:`source_text` returns exactly the code given to ``cupy.RawModule`` (with :data:`RAWMODULE_OPTIONS`); the
tests compile that same text with NVRTC and run it on the CPU emulator. CuPy is imported only when a module
is actually built, through :func:`npconv._backend.require_cupy`.
"""
from __future__ import annotations

import functools
import threading
from importlib import resources

import numpy as np

from ... import _backend
from . import replay

__all__ = [
    "RAWMODULE_OPTIONS", "DTYPE_SUFFIX", "source_names", "private_source_names", "source_text", "kernel_name",
    "get_module", "get_kernel", "clear_cache",
]

#: options passed to ``cupy.RawModule`` (CuPy adds its own: include paths, ``--std=c++17``, ``-ftz=true``, arch)
RAWMODULE_OPTIONS: tuple[str, ...] = ()

#: the dtype specialisations: dtype -> suffix of the kernel names
DTYPE_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_CTYPE = {"f32": "float", "f64": "double"}

_PRELUDE = "_prelude.cu"
_modules: dict = {}
_kernels: dict = {}
_lock = threading.Lock()


def _files():
    return resources.files(__package__)


@functools.lru_cache(maxsize=None)
def source_names() -> tuple[str, ...]:
    """Names (file stems) of the kernel sources shipped with the package, sorted."""
    return tuple(sorted(p.name[:-3] for p in _files().iterdir()
                        if p.name.endswith(".cu") and not p.name.startswith("_")))


def _suffix(dtype) -> str:
    dt = np.dtype(dtype)
    try:
        return DTYPE_SUFFIX[dt]
    except KeyError:
        raise TypeError(f"dtype must be float32 or float64 for a CUDA kernel, got {dt}") from None


@functools.lru_cache(maxsize=None)
def _read(filename: str) -> str:
    return (_files() / filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def private_source_names() -> tuple[str, ...]:
    """Names of the sources that start with an underscore (``_lowrank``, ``_bicluster``; not the prelude): their
    launch tables live in their own ops modules (``ops_lowrank``, ``ops_bicluster``), not in ``ops``."""
    return tuple(sorted(p.name[:-3] for p in _files().iterdir()
                        if p.name.endswith(".cu") and p.name.startswith("_") and p.name != _PRELUDE))


def source_text(source: str, dtype) -> str:
    """The complete CUDA C text of ``source`` (a name from :func:`source_names` or
    :func:`private_source_names`) specialised for ``dtype``."""
    sfx = _suffix(dtype)
    if source not in source_names() and source not in private_source_names():
        raise ValueError(f"no CUDA source {source!r} in npconv.kernels.cuda; "
                         f"known sources: {', '.join(source_names() + private_source_names())}")
    body = _read(f"{source}.cu")
    return (f"#define NPCONV_REAL {_CTYPE[sfx]}\n#define NPCONV_SFX {sfx}\n"
            f"{_read(_PRELUDE)}\n#line 1 \"{source}.cu\"\n{body}")


def kernel_name(name: str, dtype) -> str:
    """The entry-point name of kernel ``name`` for ``dtype``: ``kernel_name("im2col", float32)`` is
    ``"npconv_im2col_f32"``."""
    return f"npconv_{name}_{_suffix(dtype)}"


def get_module(source: str, dtype):
    """The ``cupy.RawModule`` of ``source`` for ``dtype``, created once per (CuPy module, source, dtype).

    Creating a RawModule is cheap (CuPy compiles on the first ``get_function``, and caches the binary on disk).
    """
    cp = _backend.require_cupy()
    key = (id(cp), source, _suffix(dtype))    # the entry keeps ``cp`` alive, so its id is not reused
    entry = _modules.get(key)
    if entry is None:
        code = source_text(source, dtype)
        with _lock:
            entry = _modules.get(key)
            if entry is None:
                entry = _modules[key] = (cp, cp.RawModule(code=code, options=RAWMODULE_OPTIONS))
    return entry[1]


def get_kernel(source: str, name: str, dtype):
    """The kernel ``npconv_<name>_<f32|f64>`` of ``source`` (a ``cupy.RawKernel``), e.g.
    ``get_kernel("im2col", "im2col", cupy.float32)``; memoized per (CuPy module, current device, source, name,
    dtype): every launch asks for its kernel, and at batch 1 the host's time per launch is the layer's time."""
    cp = _backend.require_cupy()
    key = (id(cp), cp.cuda.Device().id, source, name, _suffix(dtype))
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = get_module(source, dtype).get_function(kernel_name(name, dtype))
        with _lock:
            _kernels[key] = kernel
    return kernel


def clear_cache() -> None:
    """Forget the memoized modules and kernels (the next call builds them again)."""
    with _lock:
        _modules.clear()
        _kernels.clear()
    replay.advance()                # the layers' recorded launches hold kernels of the old modules


replay.watch(__name__)
