"""Factored (low-rank, monochromatic, separable) layers, executed as their factors.

None of these functions rebuilds the approximated kernel: each runs the cheaper sequence of operations that the
factorisation stands for, so its cost is the factored cost of :mod:`npconv.decompose.cost`.

* :func:`lowrank_linear` -- ``y = (x b^T) a^T + bias``: two GEMMs, ``t (in + out)`` multiply-adds per sample.
* :func:`lowrank_conv2d` -- a conv to ``t`` channels, then a 1x1 conv (one GEMM per image) to F channels.
* :func:`monochromatic_conv2d` -- the C' x C colour transform of the input, then one single-channel X x Y filter
  per output channel reading its colour's channel.
* :func:`separable_conv2d` -- a vertical (X x 1, row stride) conv to K channels, then a horizontal (1 x Y,
  column stride) conv to F channels.

CPU (NumPy arrays): convolutions with few filters per input group (all of the monochromatic filters; the first
stage of a low-rank conv and the vertical separable pass when they have few filters and taps) run on the direct
polyphase kernel of :mod:`npconv.kernels.cpu.lowrank`, which reads the input planes in place instead of packing
an im2col matrix; the others go through :func:`npconv.functional.conv2d` (im2col + BLAS). The direct kernel's
workspace is one band of polyphase rows per running job (about ``_direct._BAND_BYTES``), whatever the batch size;
the intermediate maps of the two-stage layers (low-rank conv, separable) are made for a chunk of images at a time,
at most ``_WORKSPACE_BYTES``, in a per-thread workspace reused across calls (``npconv._workspace.WS``).

GPU (CuPy arrays): after the same validation, the convolutions go to :mod:`npconv.kernels.cuda.ops_lowrank`: the
monochromatic layer is one fused kernel (colour transform on the fly into shared memory, then the single-channel
filters of each colour); the separable passes run on a direct kernel with no im2col matrix; the low-rank conv of
rank up to 32 is one kernel (each pixel's first-stage values in registers, then its outputs with the bias), larger
ranks a direct first stage and a cuBLAS GEMM. The low-rank linear layer is two cuBLAS GEMMs on either device. See
docs/gpu_lowrank.md.
"""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module, is_cupy_array, to_numpy
from .._workspace import WS
from .._validate import (as_pair, as_padding4, check_array, check_float_array, check_out, check_same_dtype, fill_out,
                         out_size)
from . import _direct
from ._direct import dense_direct, direct_conv_cpu
from ._prepared import prepared
from .conv import conv2d

__all__ = ["lowrank_linear", "lowrank_conv2d", "monochromatic_conv2d", "separable_conv2d"]

#: upper bound of the intermediate maps of a two-stage layer held at once (CPU), in bytes
_WORKSPACE_BYTES = 32 * 2**20
#: the low-rank conv's 1x1 stage on npconv's GEMM micro-kernel where the CPU has one, else BLAS; a module constant
#: for same-process comparisons, not a user setting
USE_MICROKERNEL = True
#: a generic (all-channels) conv stage runs on the direct kernel when it has at most this many filters (the first
#: without the GEMM micro-kernel, the second with it) ...
_DIRECT_MAX_FILTERS = 32
#: (on the micro-kernel, ZF conv1's separable forms, whose horizontal pass has 96 filters of 28 or 56 taps, against
#: im2col + GEMM, same process, 8 rounds, 2-core Zen 4 VM: rank 4 1.56x / rank 8 1.07-1.27x faster at batch 128,
#: 1.00-1.13x / 1.29-1.54x at batch 1; low-rank first stages of 48 and 64 filters on ZF conv1 1.02-1.30x at batches
#: 1 and 32 (best times), of 48 filters on CIFAR conv2 (64 -> 128, 5x5) 1.01-1.04x)
_DIRECT_MAX_FILTERS_MK = 128
#: ... and at most this many taps per filter; otherwise im2col + GEMM (BLAS wins once the GEMM has enough rows)
_DIRECT_MAX_TAPS = 512


# ----------------------------------------------------------------------------------------------------- helpers
def _gpu_ops():
    """The GPU entry points (imported on first use; importing them does not import CuPy)."""
    from ..kernels.cuda import ops_lowrank
    return ops_lowrank


def _check_bias(x, bias, F):
    if bias is None:
        return
    check_float_array(bias, "bias", ndim=1)
    check_same_dtype("x", x, bias=bias)
    if bias.shape[0] != F:
        raise ValueError(f"bias must have shape ({F},) (one per output channel), got {tuple(bias.shape)}")


def _use_direct(n_filters, n_taps):
    """Whether a full conv stage runs on the direct kernel (few filters: an im2col matrix would cost more to
    pack than the small GEMM saves) rather than im2col + GEMM."""
    mk = _direct.USE_MICROKERNEL and bool(_direct._taps_tiles(np.float32))
    return n_filters <= (_DIRECT_MAX_FILTERS_MK if mk else _DIRECT_MAX_FILTERS) and n_taps <= _DIRECT_MAX_TAPS


def _generic_conv(x, w, bias, stride, pad, out=None):
    """A full conv (all input channels to every filter): direct kernel for few taps, else im2col + GEMM.

    ``out`` (C-contiguous, the output's shape) receives the result when given."""
    F, C, X, Y = w.shape
    if _use_direct(F, C * X * Y):
        return dense_direct(x, w, bias, stride, pad, out=out)
    return conv2d(x, np.ascontiguousarray(w), bias, stride=stride, padding=pad, out=out)


# ------------------------------------------------------------------------------------------------------ linear
def lowrank_linear(x, a, b_fac, bias=None):
    """Rank-t dense layer: ``y = (x @ b_fac.T) @ a.T + bias``.

    Parameters
    ----------
    x : (N, in) array;  a : (out, t);  b_fac : (t, in);  bias : (out,) or None
        All of one dtype (float32 or float64), all NumPy or all CuPy.

    Returns (N, out) in x's dtype: two GEMMs, ``t (in + out)`` multiply-adds per sample.
    """
    xp = get_array_module(x, a, b_fac, bias, names=("x", "a", "b_fac", "bias"))
    check_float_array(x, "x", ndim=2)
    check_float_array(a, "a", ndim=2)
    check_float_array(b_fac, "b_fac", ndim=2)
    check_same_dtype("x", x, a=a, b_fac=b_fac)
    if b_fac.shape[1] != x.shape[1]:
        raise ValueError(f"b_fac must have shape (t, {x.shape[1]}) to match x's {x.shape[1]} features, "
                         f"got {tuple(b_fac.shape)}")
    if a.shape[1] != b_fac.shape[0]:
        raise ValueError(f"a must have shape (out, {b_fac.shape[0]}) to match b_fac's rank, got {tuple(a.shape)}")
    _check_bias(x, bias, a.shape[0])
    if xp is not np:
        return _gpu_ops().lowrank_linear(x, a, b_fac, bias)
    y = np.matmul(np.matmul(x, b_fac.T), a.T)
    if bias is not None:
        y += bias
    return y


# -------------------------------------------------------------------------------------------------- low-rank conv
def lowrank_conv2d(x, first, second, bias=None, *, stride=1, padding=0, dilation=1, out=None):
    """Rank-t convolution: a conv with ``first`` (t, C, X, Y) to t channels, then the 1x1 conv ``second``.

    Parameters
    ----------
    x : (N, C, H, W);  first : (t, C, X, Y);  second : (F, t) or (F, t, 1, 1);  bias : (F,) or None
    stride, dilation : int or pair;  padding : int, pair or (top, bottom, left, right)
        Of the original conv (the 1x1 stage has none).
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns (N, F, H', W') in x's dtype (``out`` when given).
    """
    get_array_module(x, first, second, bias, names=("x", "first", "second", "bias"))   # refuses NumPy with CuPy
    check_float_array(x, "x", ndim=4)
    check_float_array(first, "first", ndim=4)
    check_float_array(second, "second", ndim=(2, 4))
    check_same_dtype("x", x, first=first, second=second)
    if second.ndim == 4:
        if second.shape[2:] != (1, 1):
            raise ValueError(f"second must be (F, t) or (F, t, 1, 1), got {tuple(second.shape)}")
        second = second.reshape(second.shape[0], second.shape[1])
    t = first.shape[0]
    if second.shape[1] != t:
        raise ValueError(f"second must have shape (F, {t}) to match first's {t} channels, got {tuple(second.shape)}")
    if first.shape[1] != x.shape[1]:
        raise ValueError(f"first must have shape (t, {x.shape[1]}, X, Y) to match x's {x.shape[1]} channels, "
                         f"got {tuple(first.shape)}")
    _check_bias(x, bias, second.shape[0])
    st = as_pair(stride, "stride")
    pad = as_padding4(padding)
    dil = as_pair(dilation, "dilation")
    F = second.shape[0]
    N, _, H, W = x.shape
    Ho = out_size(H, dil[0] * (first.shape[2] - 1) + 1, st[0], pad[0], pad[1], what="output height")
    Wo = out_size(W, dil[1] * (first.shape[3] - 1) + 1, st[1], pad[2], pad[3], what="output width")
    check_out(out, (N, F, Ho, Wo), x.dtype, like=x,
              inputs=(("x", x), ("first", first), ("second", second), ("bias", bias)))
    return lowrank_core(x, first, second, bias, st, pad, dil, out)


def lowrank_core(x, first, second, bias, st, pad, dil, out):
    """:func:`lowrank_conv2d` of validated arguments (``second`` (F, t), ``st``/``dil`` pairs, ``pad`` a 4-tuple,
    ``out`` checked or None), on x's device; layers call it directly (their factors were checked once)."""
    if is_cupy_array(x):
        return fill_out(_gpu_ops().lowrank_conv2d(x, first, second, bias, stride=st, padding=pad, dilation=dil),
                        out)
    t = first.shape[0]
    F = second.shape[0]
    N = x.shape[0]
    Ho = out_size(x.shape[2], dil[0] * (first.shape[2] - 1) + 1, st[0], pad[0], pad[1], what="output height")
    Wo = out_size(x.shape[3], dil[1] * (first.shape[3] - 1) + 1, st[1], pad[2], pad[3], what="output width")
    if out is None:
        out = np.empty((N, F, Ho, Wo), x.dtype)
    second = np.ascontiguousarray(second)
    P = Ho * Wo
    chunk = int(max(1, min(N, _WORKSPACE_BYTES // max(t * P * x.dtype.itemsize, 1))))
    tile = _mk_tile(x.dtype)
    from ..kernels.cpu import gemm as KG
    # the micro-kernel's last panel reads whole vectors past the last column of the last image
    slack = tile[0] * tile[2] if tile is not None else 0
    # the rank-t intermediate of a chunk lives in the reused workspace (a fresh one faulted in tens of MiB a call)
    h_buf = WS.get("lowrank.h", chunk * t * P + slack, x.dtype)
    h_buf[chunk * t * P:] = 0
    packed = KG.pack_a(second, tile[1]) if tile is not None else None
    outf = out.reshape(-1)
    for n0 in range(0, N, chunk):
        xc = x[n0:n0 + chunk]
        m = xc.shape[0]
        h = h_buf[:m * t * P].reshape(m, t, Ho, Wo)
        if dil == (1, 1):
            _generic_conv(xc, first, None, st, pad, out=h)
        else:
            conv2d(xc, first, None, stride=st, padding=pad, dilation=dil, out=h)
        if tile is not None and t <= KG.STREAM_MAX_K and tile[1] % 4 == 0:
            # the 1x1 stage on the GEMM micro-kernel, the bias added as the tiles are stored (np.matmul, then a bias
            # pass, wrote the output twice and read it once); a shallow product writes its rows front to back
            KG.matmul_stream(packed, F, t, tile, h_buf, t * P, P, outf[n0 * F * P:], nimg=m, bias=bias)
        elif tile is not None:
            for i in range(m):
                KG.matmul(packed, F, t, tile, h_buf[i * t * P:], P, P, outf[(n0 + i) * F * P:], bias=bias)
        else:
            np.matmul(second, h.reshape(m, t, P), out=out[n0:n0 + m].reshape(m, F, P))
    if bias is not None and tile is None:
        out += bias.reshape(1, F, 1, 1)
    return out


def _mk_tile(dt):
    """The GEMM micro-kernel's tile for ``dt`` (``kernels/cpu/gemm.py``), or None (BLAS then)."""
    from ..kernels.cpu import gemm as KG
    return KG.tile_shape(dt) if USE_MICROKERNEL else None


# ------------------------------------------------------------------------------------------------ monochromatic
def _check_mono(x, color_transform, assignment, spatial, bias):
    check_float_array(x, "x", ndim=4)
    check_float_array(color_transform, "color_transform", ndim=2)
    check_float_array(spatial, "spatial", ndim=3)
    check_array(assignment, "assignment", ndim=1)
    check_same_dtype("x", x, color_transform=color_transform, spatial=spatial)
    if assignment.dtype.kind not in "iu":
        raise TypeError(f"assignment must be an integer array, got dtype {assignment.dtype}")
    Cp, C = color_transform.shape
    if C != x.shape[1]:
        raise ValueError(f"color_transform must have shape (C', {x.shape[1]}) to match x's channels, "
                         f"got {tuple(color_transform.shape)}")
    F = spatial.shape[0]
    if assignment.shape[0] != F:
        raise ValueError(f"assignment must have {F} entries (one per spatial filter), got {assignment.shape[0]}")
    a = to_numpy(assignment).astype(np.int64)
    if F and (a.min() < 0 or a.max() >= Cp):
        raise ValueError(f"assignment must lie in [0, {Cp}) (the number of colours), got values in "
                         f"[{a.min()}, {a.max()}]")
    _check_bias(x, bias, F)
    return a


def monochromatic_conv2d(x, color_transform, assignment, spatial, bias=None, *, stride=1, padding=0, out=None):
    """Monochromatic convolution (Denton et al. 2014, section 4.1), executed as its factors.

    Parameters
    ----------
    x : (N, C, H, W)
    color_transform : (C', C) -- the colours; the input is first mapped to C' colour channels
    assignment : (F,) integers in [0, C') -- the colour each output channel reads
    spatial : (F, X, Y) -- one single-channel filter per output channel
    bias : (F,) or None
    stride : int or pair;  padding : int, pair or (top, bottom, left, right)
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns (N, F, H', W') (``out`` when given) with
    ``y[n, f] = corr(sum_c T[a_f, c] x[n, c], spatial[f]) + bias[f]``, i.e. the conv with
    ``W[f, c] = T[a_f, c] * spatial[f]``. Cost: ``C C' H W + X Y F H' W'`` multiply-adds per image.
    Clusters of any sizes (empty ones included) are handled.
    """
    get_array_module(x, color_transform, spatial, bias, names=("x", "color_transform", "spatial", "bias"))  # no mixing
    a = _check_mono(x, color_transform, assignment, spatial, bias)
    st = as_pair(stride, "stride")
    pad = as_padding4(padding)
    F, X, Y = spatial.shape
    Ho = out_size(x.shape[2], X, st[0], pad[0], pad[1], what="output height")
    Wo = out_size(x.shape[3], Y, st[1], pad[2], pad[3], what="output width")
    check_out(out, (x.shape[0], F, Ho, Wo), x.dtype, like=x,
              inputs=(("x", x), ("color_transform", color_transform), ("spatial", spatial), ("bias", bias)))
    return mono_core(x, color_transform, a, spatial, bias, st, pad, out)


def _mono_weights(color_transform, a, spatial):
    """The filters by colour (order, group bounds), only the colours some filter reads (their rows of the colour
    transform, and each group's colour plane), and the filters' taps as rows."""
    F, X, Y = spatial.shape
    order = np.argsort(a, kind="stable")
    counts = np.bincount(a, minlength=color_transform.shape[0])
    keep = np.flatnonzero(counts)
    bounds = np.concatenate(([0], np.cumsum(counts[keep])))
    return (order, bounds, np.arange(keep.shape[0]), np.ascontiguousarray(spatial.reshape(F, X * Y)),
            np.ascontiguousarray(color_transform[keep]))


def mono_core(x, color_transform, a, spatial, bias, st, pad, out, prep=None):
    """:func:`monochromatic_conv2d` of validated arguments (``a`` the host integer assignment, ``st`` a pair, ``pad``
    a 4-tuple, ``out`` checked or None), on x's device; layers call it directly (their factors were checked once).
    ``prep``, for the CPU path, as in :mod:`npconv.functional._prepared` (a layer's cache)."""
    if is_cupy_array(x):
        return fill_out(_gpu_ops().monochromatic_conv2d(x, color_transform, a, spatial, bias, stride=st,
                                                        padding=pad), out)
    F, X, Y = spatial.shape
    order, bounds, planes, wt, T = prepared(prep, ("cpu-mono", x.dtype),
                                            lambda: _mono_weights(color_transform, a, spatial))
    return direct_conv_cpu(np.ascontiguousarray(x), wt, order, bounds, planes, 1, X, Y, bias, st, pad, F,
                           transform=T, out=out)


# ---------------------------------------------------------------------------------------------------- separable
def separable_conv2d(x, vertical, horizontal, bias=None, *, stride=1, padding=0, out=None):
    """Separable convolution: ``vertical`` (K, C, X, 1) then ``horizontal`` (F, K, 1, Y).

    The vertical pass takes the row stride and the top/bottom padding, the horizontal pass the column stride and
    the left/right padding, so the result equals the conv with ``W[f, c, x, y] = sum_k H[f, k, 0, y] V[k, c, x, 0]``
    and the given ``stride`` and ``padding``. Returns (N, F, H', W') in x's dtype; ``out``, optional, is where
    to write it (see :func:`npconv.functional.conv2d`'s ``out``).
    """
    get_array_module(x, vertical, horizontal, bias, names=("x", "vertical", "horizontal", "bias"))  # no mixing
    check_float_array(x, "x", ndim=4)
    check_float_array(vertical, "vertical", ndim=4)
    check_float_array(horizontal, "horizontal", ndim=4)
    check_same_dtype("x", x, vertical=vertical, horizontal=horizontal)
    K, C, X, one = vertical.shape
    if one != 1:
        raise ValueError(f"vertical must have shape (K, C, X, 1), got {tuple(vertical.shape)}")
    if C != x.shape[1]:
        raise ValueError(f"vertical must have shape (K, {x.shape[1]}, X, 1) to match x's channels, "
                         f"got {tuple(vertical.shape)}")
    if horizontal.shape[1] != K or horizontal.shape[2] != 1:
        raise ValueError(f"horizontal must have shape (F, {K}, 1, Y) to match vertical's {K} filters, "
                         f"got {tuple(horizontal.shape)}")
    F = horizontal.shape[0]
    _check_bias(x, bias, F)
    st = as_pair(stride, "stride")
    pt, pb, pl, pr = as_padding4(padding)
    # validates the output size of the whole conv (an impossible geometry fails before any work)
    Ho = out_size(x.shape[2], X, st[0], pt, pb, what="output height")
    Wo = out_size(x.shape[3], horizontal.shape[3], st[1], pl, pr, what="output width")
    N = x.shape[0]
    check_out(out, (N, F, Ho, Wo), x.dtype, like=x,
              inputs=(("x", x), ("vertical", vertical), ("horizontal", horizontal), ("bias", bias)))
    return separable_core(x, vertical, horizontal, bias, st, (pt, pb, pl, pr), out)


def separable_core(x, vertical, horizontal, bias, st, pad, out):
    """:func:`separable_conv2d` of validated arguments (``st`` a pair, ``pad`` a 4-tuple, ``out`` checked or None),
    on x's device; layers call it directly (their factors were checked once)."""
    if is_cupy_array(x):
        return fill_out(_gpu_ops().separable_conv2d(x, vertical, horizontal, bias, stride=st, padding=pad), out)
    pt, pb, pl, pr = pad
    K, X = vertical.shape[0], vertical.shape[2]
    F = horizontal.shape[0]
    N = x.shape[0]
    Ho = out_size(x.shape[2], X, st[0], pt, pb, what="output height")
    Wo = out_size(x.shape[3], horizontal.shape[3], st[1], pl, pr, what="output width")
    W = x.shape[3]
    per_img = K * Ho * W * x.dtype.itemsize
    chunk = int(max(1, min(N, _WORKSPACE_BYTES // max(per_img, 1))))
    if out is None:
        out = np.empty((N, F, Ho, Wo), x.dtype)
    # the K-channel intermediate of a chunk lives in the reused workspace
    h_buf = WS.get("separable.h", chunk * K * Ho * W, x.dtype)
    for n0 in range(0, N, chunk):
        xc = x[n0:n0 + chunk]
        m = xc.shape[0]
        h = h_buf[:m * K * Ho * W].reshape(m, K, Ho, W)
        _generic_conv(xc, vertical, None, (st[0], 1), (pt, pb, 0, 0), out=h)
        _generic_conv(h, horizontal, bias, (1, st[1]), (0, 0, pl, pr), out=out[n0:n0 + m])
    return out
