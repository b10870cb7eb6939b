"""Array-module lookup by array type, the optional CuPy import, and the dtype policy.

Dispatch is decided by the type of the arrays a function is given, never by global state:
NumPy arrays run on the CPU (numba + BLAS), CuPy arrays on the GPU (RawKernel + cuBLAS).
CuPy is optional. Its import error is kept and re-raised with an install hint only when a
GPU path is actually asked for.
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "get_array_module", "is_cupy_array", "require_cupy", "cupy_available",
    "FLOAT_DTYPES", "result_dtype", "to_numpy",
]

#: the floating dtypes npconv computes in; the output dtype always equals the input dtype
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_cupy = None
_cupy_error: BaseException | None = None
_cupy_tried = False


def _try_cupy():
    global _cupy, _cupy_error, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            import cupy  # noqa: F401  (optional dependency)
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_error = exc
    return _cupy


def _cupy_ndarray_type():
    """CuPy's ndarray type if CuPy is already imported by the caller, else None.

    An array can only be a CuPy array if the caller imported CuPy, so looking in
    ``sys.modules`` avoids importing CuPy (slow) for every NumPy call.
    """
    mod = sys.modules.get("cupy")
    return getattr(mod, "ndarray", None) if mod is not None else None


def is_cupy_array(x) -> bool:
    if type(x) is np.ndarray:       # the common case, without the module lookup (0.7 us -> 0.05 us per call)
        return False
    t = _cupy_ndarray_type()
    return t is not None and isinstance(x, t)


def require_cupy():
    """Return the cupy module, or raise ImportError with the install hint and the original cause."""
    cp = _try_cupy()
    if cp is None:
        raise ImportError(
            "the GPU path needs CuPy: install it with `pip install 'npconv[gpu]'` "
            "(cupy-cuda13x for CUDA 13; see https://docs.cupy.dev/en/stable/install.html). "
            f"Importing cupy failed with: {_cupy_error!r}") from _cupy_error
    return cp


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _try_cupy()
    if cp is None:
        return False
    try:
        return bool(cp.is_available())
    except Exception:
        return False


def get_array_module(*arrays, names=None):
    """Return ``numpy`` or ``cupy`` for the given arrays (``None`` entries are ignored).

    Mixing NumPy and CuPy arrays is a TypeError that names the arguments and their types.
    """
    for a in arrays:
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return np          # all NumPy (or None): the common CPU case, checked by exact type
    t = _cupy_ndarray_type()
    if t is not None and all(a is None or type(a) is t for a in arrays):
        return require_cupy()   # all CuPy: the common GPU case, by exact type (at batch 1 the host time is the time)
    kinds = []
    for i, a in enumerate(arrays):
        if a is None:
            continue
        kinds.append((names[i] if names else f"argument {i}", type(a), is_cupy_array(a)))
    if not kinds or not any(k[2] for k in kinds):
        return np
    if all(k[2] for k in kinds):
        return require_cupy()
    desc = ", ".join(f"{n}: {t.__module__}.{t.__name__}" for n, t, _ in kinds)
    raise TypeError(f"arrays must all be NumPy or all be CuPy arrays, got a mix ({desc}); "
                    "move them with cupy.asarray / cupy.asnumpy first")


def result_dtype(*dtypes):
    return np.result_type(*dtypes)


def to_numpy(x):
    """Return a NumPy array for a NumPy or CuPy array (a device-to-host copy for CuPy)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
