"""Shared argument checks and the conv/pool geometry arithmetic (one place for both).

Every public function validates first. Errors are ValueError (a bad value) or TypeError (a bad
type), and the message names the argument, what was expected and what was got.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from ._backend import FLOAT_DTYPES, is_cupy_array

__all__ = [
    "check_array", "check_float_array", "check_same_dtype", "as_pair", "as_padding4",
    "out_size", "pool_out_size", "check_option", "check_finite", "check_int", "check_real", "check_out",
    "fill_out", "raise_with_context",
]


def _is_array(x):
    return isinstance(x, np.ndarray) or is_cupy_array(x)


def check_array(x, name, *, ndim=None):
    """``x`` must be a NumPy or CuPy array, with ``ndim`` dimensions (an int or a tuple of allowed ints)."""
    if not _is_array(x):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got {x.ndim} (shape {tuple(x.shape)})")
    return x


def check_float_array(x, name, *, ndim=None):
    """An array of dtype float32 or float64 (the dtype policy: kept as given, never promoted)."""
    check_array(x, name, ndim=ndim)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    return x


def check_same_dtype(ref_name, ref, **others):
    for name, a in others.items():
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {a.dtype}")


def check_int(v, name, *, min_value=None, max_value=None):
    if type(v) is not int:   # exact int: the common case, without the slow abstract-base-class checks below
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
        v = operator.index(v)
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {v}")
    if max_value is not None and v > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {v}")
    return v


def check_real(v, name, *, min_value=None, positive=False, finite=True):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} ({v!r})")
    v = float(v)
    if finite and not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {v}")
    return v


def as_pair(v, name, *, min_value=1):
    """An int or a pair of ints -> a tuple of two ints, each >= ``min_value``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got a sequence of length {len(v)}")
        return (check_int(v[0], name, min_value=min_value), check_int(v[1], name, min_value=min_value))
    v = check_int(v, name, min_value=min_value)
    return (v, v)


def as_padding4(padding, name="padding"):
    """Padding -> (top, bottom, left, right).

    Accepts an int (all sides), a pair (vertical, horizontal) or a 4-tuple (top, bottom, left, right).
    """
    if isinstance(padding, str):
        raise ValueError(f"{name} must be an int, a pair or a (top, bottom, left, right) tuple, "
                         f"got the string {padding!r}")
    if isinstance(padding, (tuple, list)):
        if len(padding) == 2:
            ph, pw = check_int(padding[0], name, min_value=0), check_int(padding[1], name, min_value=0)
            return (ph, ph, pw, pw)
        if len(padding) == 4:
            return tuple([check_int(p, name, min_value=0) for p in padding])
        raise ValueError(f"{name} must have 1, 2 or 4 entries, got {len(padding)}")
    p = check_int(padding, name, min_value=0)
    return (p, p, p, p)


def out_size(size, kernel, stride, pad_lo, pad_hi, dilation=1, *, what="output"):
    """Output length of a convolution along one axis; a ValueError when it is zero or less."""
    eff = dilation * (kernel - 1) + 1
    n = (size + pad_lo + pad_hi - eff) // stride + 1
    if n <= 0:
        raise ValueError(
            f"the {what} size would be {n} (input {size} + padding {pad_lo}+{pad_hi}, kernel {kernel}, "
            f"dilation {dilation}, stride {stride}); it must be >= 1")
    return n


def pool_out_size(size, kernel, stride, pad, ceil_mode, *, what="pooled output"):
    """Pooling output length with PyTorch/Caffe semantics.

    floor mode: ``(size + 2*pad - kernel) // stride + 1``. ceil mode rounds up instead, but a window that
    would start inside the right padding (at or past ``size + pad``) is dropped, so every window overlaps
    the input (PyTorch's rule; Caffe applies the same correction).
    """
    span = size + 2 * pad - kernel
    if span < 0:
        raise ValueError(f"the {what} size would be <= 0 (input {size} + 2*padding {pad} < kernel {kernel})")
    if ceil_mode:
        n = -(-span // stride) + 1
        if (n - 1) * stride >= size + pad:
            n -= 1
    else:
        n = span // stride + 1
    return n


def check_option(value, name, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)!r}, got {value!r}")
    return value


def check_finite(a, name):
    """NaN or inf in weights is a ValueError (it would silently poison every output)."""
    if a is None:
        return
    xp = np if isinstance(a, np.ndarray) else __import__("cupy")
    if not bool(xp.isfinite(a).all()):
        bad = int((~xp.isfinite(a)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def check_out(out, shape, dtype, *, like, inputs=(), name="out"):
    """Validate an ``out=`` argument; returns ``out`` (``None`` stays ``None``: the caller allocates).

    ``out`` must be an array of the same kind as ``like`` (NumPy for NumPy inputs, CuPy for CuPy inputs), with
    exactly ``shape`` and ``dtype``, C-contiguous and writeable, and it must not overlap any of ``inputs``
    (pairs ``(name, array)``): the kernels read their inputs while they write, so in-place is not supported.
    """
    if out is None:
        return None
    want_gpu = is_cupy_array(like)
    if not _is_array(out) or is_cupy_array(out) != want_gpu:
        kind = "cupy.ndarray" if want_gpu else "numpy.ndarray"
        raise TypeError(f"{name} must be a {kind} (like the input), got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (the result's), got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the result's), got {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got an array with strides {tuple(out.strides)}")
    if not want_gpu and not out.flags.writeable:
        raise ValueError(f"{name} must be writeable, got a read-only array")
    xp = __import__("cupy") if want_gpu else np
    for in_name, a in inputs:
        if a is not None and _is_array(a) and is_cupy_array(a) == want_gpu and xp.may_share_memory(out, a):
            raise ValueError(f"{name} must not overlap {in_name} (in-place evaluation is not supported)")
    return out


def fill_out(y, out):
    """``y`` itself when ``out`` is None, else ``out`` holding a copy of ``y`` (paths that compute elsewhere)."""
    if out is None:
        return y
    out[...] = y
    return out


def raise_with_context(exc, context):
    """Raise a new exception of ``exc``'s type whose message is ``"{context}: {exc}"`` (e.g. ``"layer 'fc1'
    (linear)"``), chained from ``exc``; ``exc`` itself when that type cannot be built from one message. For an
    ``except`` clause: nothing runs on the path without an error."""
    try:
        new = type(exc)(f"{context}: {exc}")
    except Exception:
        new = None
    if not isinstance(new, BaseException):
        raise exc
    raise new from exc
