"""2-D max and average pooling, NCHW, with PyTorch/Caffe semantics.

- ``stride`` defaults to ``kernel``; ``padding`` is symmetric (an int or a (vertical, horizontal) pair) and at most
  ``kernel // 2`` per axis, as in PyTorch.
- Max pooling pads with ``-inf`` (padding never wins); average pooling pads with zeros.
- Output size: ``floor((size + 2*pad - kernel) / stride) + 1``; with ``ceil_mode`` the division rounds up, but a
  last window that would start inside the right/bottom padding is dropped (``npconv._validate.pool_out_size``).
- Average divisor: with ``count_include_pad`` the window clipped to the *padded* input (so a ceil-mode window
  hanging past the padding counts only the part inside it, as PyTorch does); without it, the window clipped to
  the real input.

CPU: numba kernels parallel over the N*C planes (:mod:`npconv.kernels.cpu.pool`). GPU: CuPy arrays go to
``npconv.kernels.cuda.ops.max_pool2d`` / ``avg_pool2d``.
"""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module
from .._validate import as_pair, check_float_array, check_out, fill_out, pool_out_size

__all__ = ["max_pool2d", "avg_pool2d", "pool2d_out_hw"]


def _check_bool(v, name):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} ({v!r})")
    return bool(v)


def _pool_args(kernel, stride, padding, ceil_mode):
    """Validate the pooling options -> ((kh, kw), (sh, sw), (ph, pw), ceil_mode)."""
    kh, kw = as_pair(kernel, "kernel", min_value=1)
    if stride is None:
        sh, sw = kh, kw
    else:
        sh, sw = as_pair(stride, "stride", min_value=1)
    ph, pw = as_pair(padding, "padding", min_value=0)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding must be at most half the kernel (padding <= kernel // 2 on each axis, as in "
                         f"PyTorch), got padding ({ph}, {pw}) for kernel ({kh}, {kw})")
    ceil_mode = _check_bool(ceil_mode, "ceil_mode")
    return (kh, kw), (sh, sw), (ph, pw), ceil_mode


def _out_hw(h, w, k, s, p, ceil_mode, where):
    if h < 1 or w < 1:
        raise ValueError(f"{where} must have a non-empty spatial size, got height {h} and width {w}")
    try:
        oh = pool_out_size(h, k[0], s[0], p[0], ceil_mode, what="pooled output height")
        ow = pool_out_size(w, k[1], s[1], p[1], ceil_mode, what="pooled output width")
    except ValueError as exc:
        raise ValueError(f"kernel ({k[0]}, {k[1]}) with padding ({p[0]}, {p[1]}) does not fit {where} of "
                         f"spatial size {h}x{w}: {exc}") from None
    return oh, ow


def pool2d_out_hw(h, w, kernel, *, stride=None, padding=0, ceil_mode=False):
    """Output height and width of a 2-D pooling of an ``h`` x ``w`` input (same options as :func:`max_pool2d`)."""
    k, s, p, ceil_mode = _pool_args(kernel, stride, padding, ceil_mode)
    return _out_hw(h, w, k, s, p, ceil_mode, "the input")


def _prepare(x, kernel, stride, padding, ceil_mode):
    check_float_array(x, "x", ndim=4)
    k, s, p, ceil_mode = _pool_args(kernel, stride, padding, ceil_mode)
    N, C, H, W = x.shape
    oh, ow = _out_hw(H, W, k, s, p, ceil_mode, f"x (shape {tuple(x.shape)})")
    return k, s, p, (oh, ow)


def max_pool2d(x, kernel, *, stride=None, padding=0, ceil_mode=False, relu=False, out=None):
    """2-D max pooling of ``x`` (N, C, H, W).

    Parameters
    ----------
    kernel : int or (int, int)
        Window height and width, >= 1.
    stride : int, (int, int) or None
        Step between windows, >= 1; ``None`` means ``kernel``.
    padding : int or (int, int)
        Implicit ``-inf`` padding on both sides of each axis (vertical, horizontal), at most ``kernel // 2``.
    ceil_mode : bool
        Round the output size up instead of down (a window starting in the padding is dropped).
    relu : bool
        Return ``max(pool(x), 0)``, which equals the pooling of ``relu(x)`` (max commutes with the monotone ReLU),
        in the same pass: ``Network.forward`` uses it for a ReLU followed by max pooling (ZF relu1 + pool1 at batch
        128: 11 ms saved against a separate in-place ReLU of the pooled output).
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns an array (N, C, OH, OW) with the dtype of ``x`` (``out`` when given); a NaN inside a window gives NaN.
    """
    if not isinstance(relu, (bool, np.bool_)):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    k, s, p, (oh, ow) = _prepare(x, kernel, stride, padding, ceil_mode)
    xp = get_array_module(x, names=("x",))
    N, C, H, W = x.shape
    check_out(out, (N, C, oh, ow), x.dtype, like=x, inputs=(("x", x),))
    if xp is not np:
        from ..kernels.cuda import ops
        y = ops.max_pool2d(xp.ascontiguousarray(x), kernel=k, stride=s, padding=p, out_hw=(oh, ow))
        if relu:
            ops.bias_relu(y, None)          # in place, one launch (which a layer's replay records)
        return fill_out(y, out)
    from ..kernels.cpu.pool import max_pool2d_planes, serial_if_small
    planes = np.ascontiguousarray(x).reshape(N * C, H, W)
    y = np.empty((N, C, oh, ow), x.dtype) if out is None else out
    with serial_if_small(planes.size):
        max_pool2d_planes(planes, k[0], k[1], s[0], s[1], p[0], p[1], oh, ow, bool(relu),
                          y.reshape(N * C, oh, ow))
    return y


def avg_pool2d(x, kernel, *, stride=None, padding=0, ceil_mode=False, count_include_pad=True, out=None):
    """2-D average pooling of ``x`` (N, C, H, W).

    Parameters
    ----------
    kernel, stride, padding, ceil_mode
        As in :func:`max_pool2d`; the padding is zeros.
    count_include_pad : bool
        True: divide by the window clipped to the padded input (padding zeros count, a ceil-mode overhang past
        the padding does not). False: divide by the number of real input elements in the window.
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns an array (N, C, OH, OW) with the dtype of ``x`` (``out`` when given; sums accumulate in float64 on
    the CPU).
    """
    k, s, p, (oh, ow) = _prepare(x, kernel, stride, padding, ceil_mode)
    count_include_pad = _check_bool(count_include_pad, "count_include_pad")
    xp = get_array_module(x, names=("x",))
    N, C, H, W = x.shape
    check_out(out, (N, C, oh, ow), x.dtype, like=x, inputs=(("x", x),))
    if xp is not np:
        from ..kernels.cuda import ops
        return fill_out(ops.avg_pool2d(xp.ascontiguousarray(x), kernel=k, stride=s, padding=p, out_hw=(oh, ow),
                                       count_include_pad=count_include_pad), out)
    from ..kernels.cpu.pool import avg_pool2d_planes, serial_if_small
    planes = np.ascontiguousarray(x).reshape(N * C, H, W)
    y = np.empty((N, C, oh, ow), x.dtype) if out is None else out
    with serial_if_small(planes.size):
        avg_pool2d_planes(planes, k[0], k[1], s[0], s[1], p[0], p[1], oh, ow, count_include_pad,
                          y.reshape(N * C, oh, ow))
    return y
