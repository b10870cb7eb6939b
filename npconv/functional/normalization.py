"""Cross-channel local response normalisation (LRN) and per-channel input normalisation, NCHW.

LRN follows PyTorch's convention (``torch.nn.functional.local_response_norm``)::

    y_c = x_c / (k + alpha/size * sum_{c'=c-size//2}^{c+(size-1)//2} x_{c'}^2) ** beta

with channels outside ``[0, C)`` counting as zero. Caffe's ``LRN`` (``ACROSS_CHANNELS``, ``local_size``, ``alpha``,
``beta``, ``k``) also divides ``alpha`` by the window size, so its parameters carry over unchanged. The AlexNet
paper and cuda-convnet write ``k + alpha * sum``: use ``alpha = alpha_paper * size`` here (docs/layers.md).

CPU: a numba kernel with a running sum over the channels, O(C) per pixel (:mod:`npconv.kernels.cpu.lrn`).
GPU: CuPy arrays go to ``npconv.kernels.cuda.ops.local_response_norm`` / ``normalize``.
"""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module
from .._validate import check_array, check_finite, check_float_array, check_int, check_out, check_real, fill_out

__all__ = ["local_response_norm", "normalize"]


def local_response_norm(x, *, size, alpha=1e-4, beta=0.75, k=2.0, out=None):
    """Local response normalisation of ``x`` (N, C, H, W) across channels.

    Parameters
    ----------
    size : int
        Number of channels in the window (>= 1): ``size//2`` below the channel, ``(size-1)//2`` above it.
        May exceed C (the missing channels are zero).
    alpha : float
        Scale of the window sum, >= 0; it is divided by ``size`` (PyTorch and Caffe convention).
    beta : float
        Exponent, >= 0.
    k : float
        Additive constant, > 0 (so the base is always positive).
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns an array of the shape and dtype of ``x`` (``out`` when given).
    """
    check_float_array(x, "x", ndim=4)
    size = check_int(size, "size", min_value=1)
    alpha = check_real(alpha, "alpha", min_value=0.0)
    beta = check_real(beta, "beta", min_value=0.0)
    k = check_real(k, "k", positive=True)
    xp = get_array_module(x, names=("x",))
    check_out(out, x.shape, x.dtype, like=x, inputs=(("x", x),))
    if xp is not np:
        from ..kernels.cuda import ops
        return fill_out(ops.local_response_norm(xp.ascontiguousarray(x), size=size, alpha=alpha, beta=beta, k=k),
                        out)
    from ..kernels.cpu.lrn import lrn_across_channels
    from ..kernels.cpu.pool import serial_if_small
    N, C, H, W = x.shape
    xs = np.ascontiguousarray(x).reshape(N, C, H * W)
    y = np.empty((N, C, H, W), x.dtype) if out is None else out
    with serial_if_small(xs.size):
        lrn_across_channels(xs, size, alpha, beta, k, y.reshape(N, C, H * W))
    return y


def _per_channel(v, name, x, C):
    """``mean``/``std``: a 1-D array of C values in x's dtype (a list or tuple is converted to it)."""
    if isinstance(v, (list, tuple)):
        xp = get_array_module(x)
        try:
            v = xp.asarray(np.asarray(v, dtype=np.float64), dtype=x.dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of real numbers or an array, got {v!r}") from exc
    check_array(v, name, ndim=1)
    if v.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {v.dtype}")
    if v.shape[0] != C:
        raise ValueError(f"{name} must have one entry per channel of x ({C}), got shape {tuple(v.shape)}")
    check_finite(v, name)
    return v


def normalize(x, *, mean, std):
    """Per-channel normalisation ``(x[:, c] - mean[c]) / std[c]`` of ``x`` (N, C, H, W).

    ``mean`` and ``std`` are 1-D arrays of C finite values in the dtype of ``x`` (lists/tuples are converted to
    it); every ``std`` must be > 0. Returns a new array of the shape and dtype of ``x``.
    """
    check_float_array(x, "x", ndim=4)
    C = x.shape[1]
    mean = _per_channel(mean, "mean", x, C)
    std = _per_channel(std, "std", x, C)
    if not bool((std > 0).all()):
        raise ValueError(f"std must be > 0 for every channel, got a minimum of {float(std.min())}")
    xp = get_array_module(x, mean, std, names=("x", "mean", "std"))
    return _normalize(xp, x, mean, std, None if xp is np else xp.ascontiguousarray(1 / std))


def _normalize(xp, x, mean, std, scale):
    """``normalize`` on checked arguments (the ``Normalize`` layer checks its arrays once, when it is built):
    ``xp`` the array module of x, ``mean``/``std`` of x's dtype and device; ``scale`` (= 1/std, contiguous) is
    used on the GPU only. No check here synchronises the device."""
    if xp is not np:
        from ..kernels.cuda import ops
        return ops.normalize(xp.ascontiguousarray(x), mean=mean, scale=scale)
    C = x.shape[1]
    out = np.subtract(x, mean.reshape(1, C, 1, 1))
    np.divide(out, std.reshape(1, C, 1, 1), out=out)
    return out
