"""Activations and shape ops: ``relu``, ``bias_relu_`` (fused, in place), ``softmax``, ``flatten``, ``dropout``.

CPU: ``relu`` is ``np.maximum(x, 0)``, or a parallel numba pass for large contiguous arrays; ``softmax`` and
``bias_relu_`` are numba kernels (no temporaries).
GPU: CuPy arrays go to ``npconv.kernels.cuda.ops.relu`` / ``softmax``; ``flatten`` and ``dropout`` need no kernel.
"""
from __future__ import annotations

import numba
import numpy as np

from .._backend import get_array_module
from .._validate import check_float_array, check_int, check_out, check_real, fill_out
from ..kernels.cpu.pool import SMALL_WORK, serial_if_small

__all__ = ["relu", "bias_relu_", "softmax", "flatten", "dropout"]


# --- CPU kernels ---------------------------------------------------------------------------------------------

@numba.njit(cache=True, fastmath=False, parallel=True)
def _bias_relu_nchw(y, b):
    """In place: ``y[n, c] = max(y[n, c] + b[c], 0)`` for a 4-D ``y`` of any strides (NaN stays NaN)."""
    N, C, H, W = y.shape
    for t in numba.prange(N * C):
        n = t // C
        c = t % C
        bc = b[c]
        for h in range(H):
            for w in range(W):
                v = y[n, c, h, w] + bc
                if v < 0:
                    v = 0
                y[n, c, h, w] = v


@numba.njit(cache=True, fastmath=False, parallel=True)
def _relu_flat(x, out):
    """``out[i] = max(x[i], 0)`` over 1-D contiguous arrays, in blocks across the threads (NaN stays NaN)."""
    n = x.shape[0]
    blk = 1 << 16
    for b in numba.prange((n + blk - 1) // blk):
        lo = b * blk
        xs = x[lo:min(n, lo + blk)]
        os = out[lo:min(n, lo + blk)]
        zero = xs.dtype.type(0)
        for i in range(xs.shape[0]):
            v = xs[i]
            os[i] = zero if v < zero else v


@numba.njit(cache=True, fastmath=False, parallel=True)
def _softmax_rows(x):
    """Softmax of each row of a C-contiguous 2-D ``x`` (max-subtracted, float64 sums) -> a new array."""
    R, L = x.shape
    out = np.empty_like(x)
    for r in numba.prange(R):
        m = -np.inf
        for j in range(L):
            v = x[r, j]
            if v > m or v != v:
                m = v
        s = 0.0
        for j in range(L):
            e = np.exp(np.float64(x[r, j]) - m)
            out[r, j] = e
            s += e
        inv = 1.0 / s
        for j in range(L):
            out[r, j] = out[r, j] * inv
    return out


# --- public functions ----------------------------------------------------------------------------------------

def relu(x, *, out=None):
    """``max(x, 0)`` elementwise, any shape, with the dtype of ``x`` (NaN stays NaN).

    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``); it may not overlap ``x`` (for
        an in-place ReLU of a 4-D array see :func:`bias_relu_`). Without it the result is a new array. A large
        result should go into a reused ``out``: a fresh 567 MiB array costs 36-200 ms of page faults on the
        development machine, several times the ReLU itself (``Network.forward`` passes one).
    """
    check_float_array(x, "x")
    xp = get_array_module(x, names=("x",))
    check_out(out, x.shape, x.dtype, like=x, inputs=(("x", x),))
    if xp is not np:
        from ..kernels.cuda import ops
        return fill_out(ops.relu(xp.ascontiguousarray(x)), out)
    y = np.empty_like(x) if out is None else out
    if x.size >= SMALL_WORK and x.flags.c_contiguous and y.flags.c_contiguous:
        _relu_flat(x.reshape(-1), y.reshape(-1))   # both cores: NumPy's maximum runs on one
    else:
        np.maximum(x, x.dtype.type(0), out=y)  # out=: a 0-d input stays an array
    return y


def bias_relu_(y, b):
    """Fused bias + ReLU **in place** on an NCHW ``y``: ``y[n, c] = max(y[n, c] + b[c], 0)``; returns ``y``.

    ``y`` is a writeable 4-D float32/float64 array (any strides; it is modified), ``b`` a (C,) array of the same
    dtype, or None for a plain in-place ReLU. Meant for the conv layer, which owns its freshly computed output.
    On the CPU a numba kernel does both steps in one pass; CuPy arrays use two in-place CuPy operations.
    """
    check_float_array(y, "y", ndim=4)
    if b is not None:
        check_float_array(b, "b", ndim=1)
        if b.dtype != y.dtype:
            raise TypeError(f"b must have the dtype of y ({y.dtype}), got {b.dtype}")
        if b.shape[0] != y.shape[1]:
            raise ValueError(f"b must have shape ({y.shape[1]},) to match the channels of y, got {tuple(b.shape)}")
    xp = get_array_module(y, b, names=("y", "b"))
    if xp is np and not y.flags.writeable:
        raise ValueError("y must be writeable (bias_relu_ works in place), got a read-only array")
    if xp is not np:
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        xp.maximum(y, 0, out=y)
        return y
    if b is None:
        if y.size >= SMALL_WORK and y.flags.c_contiguous:
            flat = y.reshape(-1)
            _relu_flat(flat, flat)      # element i is read before it is written: safe in place
        else:
            np.maximum(y, y.dtype.type(0), out=y)
    else:
        with serial_if_small(y.size):
            _bias_relu_nchw(y, np.ascontiguousarray(b))
    return y


def softmax(x, *, axis=-1):
    """Numerically stable softmax of ``x`` along ``axis`` (the row maximum is subtracted before ``exp``).

    Any shape with at least one dimension; returns a new C-contiguous array with the shape and dtype of ``x``.
    A row holding NaN or +inf gives NaN, as in PyTorch.
    """
    check_float_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension, got a 0-d array")
    axis = check_int(axis, "axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim - 1}] for x with {x.ndim} dimensions, got {axis}")
    axis %= x.ndim
    xp = get_array_module(x, names=("x",))
    moved = xp.moveaxis(x, axis, -1)
    shape = moved.shape
    L = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    x2 = xp.ascontiguousarray(moved).reshape(rows, L)
    if x2.size == 0:
        y2 = x2.copy()
    elif xp is not np:
        from ..kernels.cuda import ops
        y2 = ops.softmax(x2)
    else:
        with serial_if_small(x2.size):
            y2 = _softmax_rows(x2)
    return xp.ascontiguousarray(xp.moveaxis(y2.reshape(shape), -1, axis))


def flatten(x):
    """(N, d1, d2, ...) -> (N, d1*d2*...), C order (a view when NumPy/CuPy can reshape without copying)."""
    check_float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (a batch axis and features), got {x.ndim} "
                         f"(shape {tuple(x.shape)})")
    feats = int(np.prod(x.shape[1:], dtype=np.int64))
    return x.reshape(x.shape[0], feats)


def dropout(x, *, p=0.5):
    """Dropout at inference: the identity (returns ``x`` itself, never scaled).

    Training-time dropout scales the kept units by ``1/(1-p)`` (inverted dropout, as in PyTorch), so inference
    needs no rescaling. ``p`` is still validated (a real number in [0, 1)) so that a bad configuration fails.
    """
    check_float_array(x, "x")
    p = check_real(p, "p", min_value=0.0)
    if not p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    return x
