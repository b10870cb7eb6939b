"""2-D convolution (cross-correlation, as in every CNN framework), NCHW.

CPU algorithm: for a chunk of images, a numba kernel packs the receptive fields of one group of channels into a
column matrix ``col`` of shape (C/groups*KH*KW, chunk*OH*OW), reading each input plane from a padded,
stride-phase-split copy so that every packed row is contiguous copies; one matrix product ``w_g @ col`` then gives
that group's outputs for the whole chunk. Where the CPU has AVX2 or AVX-512 the product is npconv's own GEMM
micro-kernel (``kernels/cpu/gemm.py``), which stores each image's output rows directly with the bias; a layer keeps
the weights packed for it, and a functional call too small to pay for packing them (``_MK_PACK_COLUMNS``) takes
BLAS. On the BLAS path the bias rides in the GEMM as a row of ones when the output is larger than the weights, a
chunk of one image writes straight into the output, and a larger chunk goes through a staging buffer whose scatter
adds the bias. The chunk is chosen so that the product has enough columns to run at full speed and the workspace
stays under ``_WORKSPACE_BYTES`` whatever the batch size. A 1x1, stride-1, unpadded convolution skips the packing.
A grouped convolution with one input channel per group (depthwise) runs as direct numba loops. Other
algorithms are chosen where they are faster (``algorithm="auto"``): Winograd F(2x2, 3x3) for large enough 3x3
layers (``_winograd.py``), the im2col-free direct kernel (``_direct.py``) for convs with few taps per filter,
such as a network's first layer (3 channels), and, on the micro-kernel, for 5x5 and larger kernels from 8 images
on; and, where the CPU has AVX-512, ahead of them for convs with many taps per filter, the lanes kernel
(``_lanes.py``: a direct conv whose register tile is a run of output positions by 32 filters, with no patch
matrix and no padded positions).

GPU: CuPy arrays go to ``npconv.kernels.cuda.ops.conv2d`` (im2col kernel + cuBLAS).
"""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module
from .._workspace import WS
from ..kernels.cpu import plan as _PL
from ._prepared import prepared
from .._validate import (as_pair, as_padding4, check_float_array, check_int, check_out, check_same_dtype, fill_out,
                         out_size)

__all__ = ["conv2d", "conv2d_output_shape", "normalize_conv_args", "auto_algorithm", "ALGORITHMS"]

#: the values of conv2d's ``algorithm`` option
ALGORITHMS = ("auto", "gemm", "winograd", "direct", "lanes")

#: upper bound of the packing buffer (and GEMM output staging) per call, in bytes
_WORKSPACE_BYTES = 48 * 2**20
#: GEMM columns per chunk (images are batched up to this many output positions): measured against 640 and 2048
#: (interleaved runs, batch 64, 2 cores) it was as fast or faster on 4 of 5 ZF/AlexNet/CIFAR layers, 1.35x on
#: CIFAR conv1 (few GEMM rows: per-chunk overheads dominate), 5% slower on CIFAR conv2
_TARGET_COLUMNS = 4096
#: outputs below this many values get their bias from one NumPy pass (9 us for AlexNet conv4 at batch 1) rather
#: than a parallel numba kernel (51 us, mostly waking the threads)
_SERIAL_BIAS = 1 << 18
#: the dense "gemm" algorithm's product: npconv's micro-kernel (``kernels/cpu/gemm.py``) where the CPU has AVX2 or
#: AVX-512, else BLAS. A module constant for same-process comparisons, not a user setting.
USE_MICROKERNEL = True
#: a functional call (no layer cache to keep the packed weights in) uses the micro-kernel from this many GEMM
#: columns (images x output positions) on
_MK_PACK_COLUMNS = 4096


def normalize_conv_args(x, w, b, stride, padding, dilation, groups):
    """Validate a conv2d call; return (stride pair, padding 4-tuple, dilation pair, groups, (OH, OW))."""
    check_float_array(x, "x", ndim=4)
    check_float_array(w, "w", ndim=4)
    check_same_dtype("x", x, w=w)
    if b is not None:
        check_float_array(b, "b", ndim=1)
        check_same_dtype("x", x, b=b)
    groups = check_int(groups, "groups", min_value=1)
    stride = as_pair(stride, "stride", min_value=1)
    dilation = as_pair(dilation, "dilation", min_value=1)
    pad = as_padding4(padding, "padding")
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    if C % groups:
        raise ValueError(f"groups ({groups}) must divide the input channels of x ({C})")
    if F % groups:
        raise ValueError(f"groups ({groups}) must divide the output channels of w ({F})")
    if Cg != C // groups:
        raise ValueError(f"w must have C/groups = {C // groups} input channels (x has {C} channels, "
                         f"groups={groups}), got w.shape[1] = {Cg} (w.shape {tuple(w.shape)})")
    if min(F, KH, KW) < 1:
        raise ValueError(f"w must have at least one filter and a non-empty kernel, got shape {tuple(w.shape)}")
    if b is not None and b.shape[0] != F:
        raise ValueError(f"b must have shape ({F},) to match w's {F} filters, got {tuple(b.shape)}")
    OH = out_size(H, KH, stride[0], pad[0], pad[1], dilation[0], what="output height")
    OW = out_size(W, KW, stride[1], pad[2], pad[3], dilation[1], what="output width")
    return stride, pad, dilation, groups, (OH, OW)


def conv2d_output_shape(in_shape, w_shape, *, stride=1, padding=0, dilation=1):
    """Output shape (F, OH, OW) of a conv on an input (C, H, W) (no batch axis)."""
    C, H, W = in_shape
    F, _, KH, KW = w_shape
    st, pd, dl = as_pair(stride, "stride"), as_padding4(padding), as_pair(dilation, "dilation")
    return (F, out_size(H, KH, st[0], pd[0], pd[1], dl[0], what="output height"),
            out_size(W, KW, st[1], pd[2], pd[3], dl[1], what="output width"))


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, algorithm="auto", out=None):
    """2-D convolution of ``x`` (N, C, H, W) with ``w`` (F, C/groups, KH, KW), plus ``b`` (F,) if given.

    Parameters
    ----------
    stride, dilation : int or (int, int)
        Vertical and horizontal step, and spacing of the kernel taps (1 = none). Both >= 1.
    padding : int, (int, int) or (top, bottom, left, right)
        Zero padding; a pair means (vertical, horizontal) on both sides.
    groups : int
        Channel groups: input and output channels are split into ``groups`` blocks convolved separately.
    algorithm : {"auto", "gemm", "winograd", "direct", "lanes"}
        CPU algorithm. "gemm": im2col + GEMM. "winograd": Winograd F(2x2, 3x3) (3x3 kernels, stride 1, no
        dilation, no groups; 2.25x fewer multiply-adds, float32 results differ from "gemm" by a few units in the
        last place times the channel count). "direct": the im2col-free kernel of ``npconv.functional._direct``
        (no dilation, no groups). "lanes": a direct conv with the filters in the vector lanes
        (``npconv.functional._lanes``; no groups; needs AVX-512, else a ValueError). "auto": "lanes" for convs
        with many taps per filter (channels x kernel of at least 512, a kernel larger than 1x1) where the CPU has
        it (``_lanes.use_lanes``), unless Winograd is eligible and has 128 channels or more and 32 tiles
        (``_winograd.winograd_beats_lanes``); else Winograd where it is eligible and the call is large enough
        for it to be faster (``_winograd.use_winograd``), else the direct kernel for convs with few taps per
        filter, such as a network's first layer (``_direct.use_direct``), else "gemm". CuPy
        arrays take "auto" only (the GPU path chooses its own kernels). Winograd's transforms add and subtract
        inputs, so an infinite input gives NaN where the other algorithms give an infinity (NaN inputs give NaN
        everywhere alike); choose "gemm" where infinities must come through as such.
    out : array, optional
        Where to write the result: an array of exactly the result's shape and dtype, C-contiguous, writeable, of
        the input's kind (NumPy or CuPy) and not overlapping any input; otherwise a TypeError or ValueError. On
        the CPU the kernels write into it directly, so a caller that evaluates the same shapes repeatedly reuses
        its memory instead of faulting in fresh pages every call (``Network.forward`` does this). On the GPU the
        result is computed as usual and copied into ``out`` (CuPy's memory pool already makes allocation cheap).

    Returns an array of shape (N, F, OH, OW) (``out`` when given) with the dtype of ``x`` (float32 or float64;
    ``w`` and ``b`` must have the same dtype). NumPy inputs run on the CPU, CuPy inputs on the GPU; a mix is a
    TypeError. Non-finite weights are not checked here (layers check them once, when they are built or loaded).
    """
    return _conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, algorithm=algorithm,
                   out=out)


def _conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, algorithm="auto", out=None, prep=None):
    """:func:`conv2d`, with ``prep``: a layer's per-dtype parameter cache (``functional/_prepared.py``), where the CPU
    path keeps the weights packed for its GEMM micro-kernel."""
    xp = get_array_module(x, w, b, names=("x", "w", "b"))
    stride, pad, dilation, groups, (OH, OW) = normalize_conv_args(x, w, b, stride, padding, dilation, groups)
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a string, one of {ALGORITHMS}, got {type(algorithm).__name__}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    check_out(out, (x.shape[0], w.shape[0], OH, OW), x.dtype, like=x, inputs=(("x", x), ("w", w), ("b", b)))
    if xp is not np:
        if algorithm != "auto":
            raise ValueError(f'algorithm={algorithm!r} selects a CPU algorithm; CuPy arrays take algorithm="auto" '
                             "(the GPU path chooses its own kernels)")
        from ..kernels.cuda import ops
        return fill_out(ops.conv2d(x, w, b, stride=stride, padding=pad, dilation=dilation, groups=groups), out)
    from . import _direct as DR
    from . import _lanes as LN
    from . import _winograd as WG
    x, stride, pad = _single_output_axes(x, w.shape, stride, pad, dilation, OH, OW)
    if w.shape[1] == 0:
        # no input channels: every output is its bias (the kernels would have no taps to start their sums with)
        y = np.empty((x.shape[0], w.shape[0], OH, OW), x.dtype) if out is None else out
        y[...] = 0 if b is None else np.asarray(b).reshape(-1, 1, 1)
        return y
    if algorithm == "winograd":
        if not WG.winograd_eligible(w.shape, stride, dilation, groups):
            raise ValueError(f'algorithm="winograd" needs a 3x3 kernel, stride 1, dilation 1 and groups=1; got kernel '
                             f"{tuple(w.shape[2:])}, stride {stride}, dilation {dilation}, groups {groups}")
    elif algorithm == "direct":
        if not DR.direct_eligible(dilation, groups):
            raise ValueError(f'algorithm="direct" needs dilation 1 and groups=1; got dilation {dilation}, '
                             f"groups {groups}")
    elif algorithm == "lanes":
        if not LN.lanes_eligible(x.dtype, groups):
            raise ValueError('algorithm="lanes" needs groups=1 and a CPU with AVX-512 (its register tile); got '
                             f"groups {groups}" + ("" if LN.lanes_eligible(x.dtype, 1) else ", and this CPU has no "
                                                   "AVX-512"))
    elif algorithm == "auto":
        algorithm = auto_algorithm(x.shape, w.shape, stride, dilation, groups, (OH, OW), dtype=x.dtype)
    if algorithm == "winograd":
        return WG.conv2d_winograd_cpu(np.ascontiguousarray(x), np.ascontiguousarray(w),
                                      None if b is None else np.ascontiguousarray(b), pad, OH, OW, out=out,
                                      prep=prep)
    if algorithm == "direct":
        return DR.dense_direct(x, w, b, stride, pad, out=out, prep=prep)
    if algorithm == "lanes":
        return LN.conv2d_lanes_cpu(x, w, b, stride, pad, dilation, OH, OW, out=out, prep=prep)
    return _conv2d_cpu(x, w, b, stride, pad, dilation, groups, OH, OW, out, prep)


def _single_output_axes(x, w_shape, stride, pad, dilation, OH, OW):
    """Along an axis with one output, the stride does not matter: make it 1 and keep only the input rows (columns)
    the one window reads, so that a stride far larger than the input does not size the phase-split buffers of the
    CPU kernels by it. Same output; returns (x, stride, pad)."""
    sh, sw = stride
    pt, pb, pl, pr = pad
    H, W = x.shape[2:]
    eh = (w_shape[2] - 1) * dilation[0] + 1
    ew = (w_shape[3] - 1) * dilation[1] + 1
    if OH == 1 and sh > 1 and eh - pt >= 1:
        keep = min(H, eh - pt)              # input rows the window reads; zero rows below make up the rest
        x = x[:, :, :keep]
        sh, pb = 1, eh - pt - keep
    if OW == 1 and sw > 1 and ew - pl >= 1:
        keep = min(W, ew - pl)
        x = x[:, :, :, :keep]
        sw, pr = 1, ew - pl - keep
    return x, (sh, sw), (pt, pb, pl, pr)


def auto_algorithm(x_shape, w_shape, stride, dilation, groups, out_hw, *, dtype=np.float32):
    """The CPU algorithm ``conv2d(algorithm="auto")`` runs for these shapes (normalised pairs for ``stride`` and
    ``dilation``) and ``dtype``: "lanes", "winograd", "direct" or "gemm" (the depthwise and 1x1 special cases are
    part of "gemm")."""
    from . import _direct as DR
    from . import _lanes as LN
    from . import _winograd as WG
    if LN.use_lanes(x_shape, w_shape, dtype, groups, out_hw):
        return "winograd" if WG.winograd_beats_lanes(x_shape, w_shape, stride, dilation, groups, out_hw) else "lanes"
    if WG.use_winograd(x_shape, w_shape, stride, dilation, groups, out_hw):
        return "winograd"
    if DR.use_direct(x_shape, w_shape, dilation, groups, out_hw):
        return "direct"
    return "gemm"


def _conv2d_cpu(x, w, b, stride, pad, dilation, groups, OH, OW, out=None, prep=None):
    from ..kernels.cpu import im2col as K

    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    Fg = F // groups
    P = OH * OW
    dt = x.dtype
    has_b = b is not None
    bias = np.ascontiguousarray(b) if has_b else np.zeros(1, dt)
    if out is None:
        out = np.empty((N, F, OH, OW), dt)

    if Cg == 1 and groups > 1 and Fg * KH * KW <= 64:
        _PL.run(K.depthwise_direct, x, w, bias, has_b, Fg, stride[0], stride[1], pad[0], pad[2], dilation[0],
                dilation[1], out)
        _PL.complete(out)           # the whole work: one kernel call (kernels/cpu/plan.py)
        return out

    out3 = out.reshape(N, F, P)
    wmat = w.reshape(F, Cg * KH * KW)
    pointwise = KH == 1 and KW == 1 and stride == (1, 1) and pad == (0, 0, 0, 0)
    if pointwise:
        x3 = x.reshape(N, C, H * W)
        for n in range(N):
            for g in range(groups):
                yg = out3[n, g * Fg:(g + 1) * Fg]
                np.matmul(wmat[g * Fg:(g + 1) * Fg], x3[n, g * Cg:(g + 1) * Cg], out=yg)
                if has_b:
                    K.add_bias_rows(yg, bias[g * Fg:(g + 1) * Fg])
        return out

    rows = Cg * KH * KW
    item = dt.itemsize
    # the micro-kernel needs the weights packed: a layer keeps them (prep); a functional call packs them each time,
    # which costs more than the kernel gains below _MK_PACK_COLUMNS columns (ZF conv3 at batch 1: 0.15 ms to pack
    # for a 0.75 ms product)
    tile = _tile(dt) if USE_MICROKERNEL and (prep is not None or N * P >= _MK_PACK_COLUMNS) else None
    if tile is not None:
        return _conv2d_mk(x, wmat, bias, has_b, groups, Cg, KH, KW, tile, stride, pad, dilation, OH, OW, out, prep)
    per_img = (rows + 1 + Fg) * P * item  # packing + staging per image in a chunk
    chunk = max(1, min(N, -(-_TARGET_COLUMNS // P), _WORKSPACE_BYTES // max(per_img, 1)))
    # With one image per chunk and an output larger than the weights, the bias rides in the GEMM (a row of ones
    # under the packed columns, the bias as an extra weight column): no separate pass over a large output, for a
    # copy of the (smaller) weights. Otherwise the bias is added by a pass over the output (one image) or by the
    # scatter out of the staging buffer (several images), which is free.
    aug = has_b and chunk == 1 and rows < P
    kb = rows + 1 if aug else rows
    col = WS.get("conv.col", kb * chunk * P, dt).reshape(kb, chunk * P)
    if aug:
        col[rows] = 1
        wmat = np.concatenate([wmat, bias.reshape(F, 1)], axis=1)
    stage = WS.get("conv.stage", Fg * chunk * P, dt).reshape(Fg, chunk * P) if chunk > 1 else None
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        m = n1 - n0
        cols = col[:, :m * P]
        for g in range(groups):
            K.im2col(x, n0, n1, g * Cg, (g + 1) * Cg, KH, KW, stride[0], stride[1], pad[0], pad[2],
                     dilation[0], dilation[1], OH, OW, K.row_split(m, Cg, KH), col.reshape(-1), chunk * P)
            wg = wmat[g * Fg:(g + 1) * Fg]
            bg = bias[g * Fg:(g + 1) * Fg] if has_b else bias
            if m == 1:
                yg = out3[n0, g * Fg:(g + 1) * Fg]
                np.matmul(wg, cols, out=yg)
                if has_b and not aug:
                    if yg.size < _SERIAL_BIAS:   # waking numba's threads costs more than the pass itself
                        np.add(yg, bg[:, None], out=yg)
                    else:
                        K.add_bias_rows(yg, bg)
            else:
                st = stage[:, :m * P]
                np.matmul(wg, cols, out=st)
                K.scatter_chunk_bias(stage.reshape(-1), chunk * P, out3, g * Fg, Fg, n0, m, bg, has_b)
    return out


def _tile(dt):
    from ..kernels.cpu import gemm as KG
    return KG.tile_shape(dt)


def _conv2d_mk(x, wmat, bias, has_b, groups, Cg, KH, KW, tile, stride, pad, dilation, OH, OW, out, prep):
    """im2col, then npconv's GEMM micro-kernel (``kernels/cpu/gemm.py``) from the packed columns straight into
    each image's output rows, the bias added as the tiles are stored (no staging buffer, no bias pass)."""
    from ..kernels.cpu import gemm as KG
    from ..kernels.cpu import im2col as K
    N = x.shape[0]
    F = wmat.shape[0]
    Fg = F // groups
    rows = wmat.shape[1]
    P = OH * OW
    dt = x.dtype
    VW, MR, NV = tile
    NR = VW * NV
    packs = prepared(prep, ("cpu-conv-mk", dt, MR), lambda: [KG.pack_a(wmat[g * Fg:(g + 1) * Fg], MR)
                                                             for g in range(groups)])
    chunk = max(1, min(N, -(-_TARGET_COLUMNS // P), _WORKSPACE_BYTES // max(rows * P * dt.itemsize, 1)))
    ld = chunk * P
    # NR readable values past the last column: the last panel loads whole vectors
    col_flat = WS.get("conv.col", rows * ld + NR, dt)
    _PL.run(np.copyto, col_flat[rows * ld:], 0)     # (a call, so that a plan repeats it: other paths use the slot)
    outf = out.reshape(-1)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        m = n1 - n0
        for g in range(groups):
            _PL.run(K.im2col, x, n0, n1, g * Cg, (g + 1) * Cg, KH, KW, stride[0], stride[1], pad[0], pad[2],
                    dilation[0], dilation[1], OH, OW, K.row_split(m, Cg, KH), col_flat, ld)
            KG.matmul(packs[g], Fg, rows, tile, col_flat, ld, P, outf[(n0 * F + g * Fg) * P:], nimg=m, cimg=F * P,
                      bias=bias[g * Fg:(g + 1) * Fg] if has_b else None)
    _PL.complete(out)   # the whole work: kernel calls (in several groups or chunks, parts of out: not planned)
    return out


_PL.watch(__name__)
