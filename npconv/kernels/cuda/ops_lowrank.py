"""GPU entry points of the factored layers (CuPy arrays), with their own kernels in ``_lowrank.cu``.

``npconv.functional.lowrank`` validates and normalises the arguments (stride pairs, padding as
``(top, bottom, left, right)``, the colour assignment as a host integer array) and calls these functions for CuPy
arrays. The output dtype is the input dtype (float32 or float64).

How each layer runs:
  * monochromatic: one fused kernel, ``mono_conv``. A block takes one image, one colour (or a share of its filters,
    :func:`mono_splits`, when the grid would be small) and a tile of output pixels; it builds the colour
    (``sum_c T[p, c] x[c]``) of the input tile the output tile reads, in shared memory, then runs every filter of
    that colour (or share) on it in passes of 8, 4 or 2 filters (chosen from how many are left), each thread
    holding 8 output pixels (2 rows x 4 columns) of the pass in registers. The C' colour images are never written
    to global memory and the filters need no sorting or gathering of the output.
    :func:`mono_tiling` picks the tile. When no tile fits in shared memory (very large kernels), it falls back
    to the composition: a cuBLAS colour transform, then one convolution per colour through
    :func:`npconv.kernels.cuda.ops.conv2d`.
  * separable: one launch of ``sep_conv4/8/16`` (K rounded up to 4, 8 or 16; :func:`sep_conv_plan`): a block
    computes the vertical pass of the input its output tile reads into shared memory, then the horizontal pass from
    there, for all the filters or, in a small grid (:data:`SEP_MIN_BLOCKS`), a share of them. Above rank 16, or when
    no tile fits :data:`SEP_SMEM_BUDGET` (or above :data:`SEP_CONV_MAX_PIXELS` output pixels), two passes of
    ``factor_conv``, a direct conv (no im2col matrix): the vertical X x 1 pass with the row stride and the
    top/bottom padding, then the horizontal 1 x Y pass with the column stride, the left/right padding and the bias.
  * low-rank conv: for t <= :data:`LR_CONV_MAX_RANK` one launch of ``lr_conv8/16/32`` (t rounded up to 8, 16 or
    32) when a channel's first-stage weights fit :data:`LR_SMEM_BUDGET` (:func:`lr_conv_plan`): a thread computes
    the t first-stage values of its output pixel in registers, then its F outputs with the bias, so the t maps are
    never written; from :data:`LR_CONV_PX2_MIN_PIXELS` output pixels on, two pixels a thread (``_px2``, for ranks
    up to 16). Otherwise two stages: the first (t filters) on ``factor_conv``, then the 1x1 stage ``second (F, t) @ h``
    with the bias, for t <= :data:`LR_EXPAND_MAX_RANK` one launch of ``lr_expand8/16/32`` that reads h once and
    writes each output once (:func:`lr_expand`), for larger t one cuBLAS GEMM batched over the images and ``ops``'
    ``bias_add``.
A conv stage runs on ``factor_conv`` when it has at most :data:`DIRECT_MAX_FILTERS` filters and the weights of one
input channel for 16 filters fit :data:`FACTOR_SMEM_BUDGET`; otherwise it goes to ``ops.conv2d`` (im2col +
cuBLAS, or its own direct kernels). These two thresholds have not been measured on a GPU; the low-rank conv's paths
and ``LR_CONV_PX2_MIN_PIXELS`` were, on an H100 (docs/gpu_lowrank.md, docs/gpu_results.md).

Launches go through :func:`_launch`, which packs the arguments from :data:`LAUNCH_SIGNATURES` (this module's table,
in the form of ``ops.LAUNCH_SIGNATURES`` plus one kind, ``IPTR``, a C-contiguous ``int32`` device array). The
source is built by :func:`source_text` exactly as ``loader.source_text`` builds the package sources (the two dtype
``#define`` lines, then ``_prelude.cu``); ``_lowrank.cu`` starts with an underscore so that ``loader`` and the
tests of ``ops.LAUNCH_SIGNATURES`` leave it to this module.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ... import _backend
from . import loader, ops, replay
from ._gemm import matmul as _matmul
from .ops import I32, IPTR, PTR, REAL  # the kinds of the launch table; ops.launch packs every launch

__all__ = [
    "lowrank_conv2d", "monochromatic_conv2d", "separable_conv2d", "factor_conv", "conv_stage",
    "LAUNCH_SIGNATURES", "SOURCE", "source_text", "get_kernel", "clear_cache", "mono_tiling", "mono_splits",
    "factor_chunk", "uses_factor_conv", "DIRECT_MAX_FILTERS", "FACTOR_SMEM_BUDGET", "MONO_SMEM_BUDGET",
    "MONO_MIN_BLOCKS", "MONO_SHARE_FILTERS", "SEP_MIN_BLOCKS",
    "filter_shares", "lr_expand", "lr_expand_plan", "lr_conv_plan", "LR_EXPAND_MAX_RANK", "LR_EXPAND_RANKS",
    "LR_SMEM_BUDGET", "LR_CONV_MAX_RANK", "LR_CONV_THREADS", "LR_CONV_PX2_MIN_PIXELS", "LR_CONV_PX2_RANKS",
    "LR_CONV_UNROLL", "SEP_CONV_MAX_PIXELS", "SEP_CONV_RANKS", "SEP_TILE_COLS", "SEP_FILTERS_PER_PASS",
    "SEP_TILE_ROWS", "SEP_SMEM_BUDGET", "sep_conv_plan", "SepConvPlan",
    "LrExpandPlan", "LrConvPlan",
    "MONO_FILTERS_PER_PASS", "FACTOR_FILTERS_PER_BLOCK", "MONO_COLS_PER_THREAD", "MONO_ROWS_PER_THREAD",
    "MONO_TILE_WIDTHS", "MONO_MAX_THREADS", "MonoTiling", "mono_row_stride",
]

#: the kernel source of this module (a file of npconv.kernels.cuda)
SOURCE = "_lowrank"
#: filters of mono_conv's widest register pass (NPCONV_MONO_FT in _lowrank.cu); its weight buffer holds this many
MONO_FILTERS_PER_PASS = 8
#: filters per block of factor_conv (NPCONV_FACTOR_FT in _lowrank.cu)
FACTOR_FILTERS_PER_BLOCK = 16
#: output columns and rows per mono_conv thread (NPCONV_MONO_RX, NPCONV_MONO_RY): columns TW apart, rows TH apart
MONO_COLS_PER_THREAD = 4
MONO_ROWS_PER_THREAD = 2
#: the block widths (blockDim.x) mono_conv is compiled for, and its most threads per block (its launch bound)
MONO_TILE_WIDTHS = (32, 16, 8)
MONO_MAX_THREADS = 256
#: shared memory a mono_conv block may use (colour tile + weights of one pass), bytes
MONO_SMEM_BUDGET = 24 * 1024
#: a mono_conv grid of fewer blocks (tiles x colours x images) splits each colour's filters over up to this many
#: blocks, in whole passes: at batch 1 a ZF conv1 with 4 colours is 56 blocks of 24 filters each, a quarter of an
#: H100's 132 multiprocessors busy with one block apiece
MONO_MIN_BLOCKS = 512
#: the fewest filters of a mono_conv share (a multiple of the kernel's NPCONV_MONO_SHARE, 4: a share is whole 8- and
#: 4-filter passes). At batch 1 a ZF conv1 with 4 colours of 24 filters is then 56 x 6 blocks of 4 filters: on an
#: H100 its kernel took 31.0 us (35.5-36.2 us in 3 shares of 8, another session); the calls were level with shares
#: of 8 (C' = 4, 6 at batches 1 and 8: 0.99-1.03x)
MONO_SHARE_FILTERS = 4
#: shared memory a factor_conv block may use for one chunk of input channels, bytes
FACTOR_SMEM_BUDGET = 16 * 1024
#: a conv stage with at most this many filters runs on factor_conv (more: ops.conv2d, im2col + cuBLAS)
DIRECT_MAX_FILTERS = 128
#: the low-rank conv's 1x1 stage runs on lr_expand for ranks up to this (0: always the GEMM and bias_add)
LR_EXPAND_MAX_RANK = 32
#: the ranks lr_expand is compiled for (its kernels lr_expand<TB>) and the pixels a thread of each holds
LR_EXPAND_RANKS = {8: 4, 16: 4, 32: 2}
#: shared memory of an lr_expand block (the weights and biases of its filters), bytes
LR_SMEM_BUDGET = 16 * 1024
#: the whole low-rank conv runs on lr_conv (one launch) for ranks up to this when its weights fit (0: never). On an
#: H100, ZF conv1 rank 8: 0.54 ms at batch 128 against 0.76 for factor_conv + lr_expand, 0.08 against 0.12 at batch 1
LR_CONV_MAX_RANK = 32
#: threads of an lr_conv block
LR_CONV_THREADS = 128
#: lr_conv takes two output pixels a thread (``lr_conv<TB>_px2``) from this many output pixels (N * OH * OW) on, one
#: below: a small batch needs every thread it can get, a large one the shared index arithmetic and weight loads (H100,
#: ZF conv1: 1.20-1.24x faster at batch 128, level at batch 8 (96800 pixels))
LR_CONV_PX2_MIN_PIXELS = 1 << 16
#: the ranks lr_conv's two-pixel kernels are compiled for (not 32: 64 accumulators of double would spill)
LR_CONV_PX2_RANKS = (8, 16)
#: the separable conv runs in one launch of sep_conv<KB> (the vertical pass of each output tile's input into shared
#: memory, then the horizontal pass) up to this many output pixels (N * OH * OW), as two factor_conv passes above.
#: No bound: on an H100 (ZF conv1, ranks 4 and 8, bench/gpu_profile.py lowrank) one launch was 1.05-1.11x faster at
#: batch 128 (1.5 million pixels; 750 against 243 + 625 us of kernels) and level or faster at batches 1 and 8
SEP_CONV_MAX_PIXELS = 1 << 62
#: the ranks (K rounded up) sep_conv is compiled for; output columns of its tile (NPCONV_SEP_TC), filters a pass of
#: its horizontal phase (NPCONV_SEP_FT), and the tile rows it tries, largest first, within SEP_SMEM_BUDGET
SEP_CONV_RANKS = (4, 8, 16)
SEP_TILE_COLS = 32
SEP_FILTERS_PER_PASS = 16
SEP_TILE_ROWS = (4, 2, 1)
#: shared memory of a sep_conv block, bytes
SEP_SMEM_BUDGET = 32 * 1024
#: a sep_conv grid of fewer blocks shares the filters among up to this many blocks a tile (grid z), in whole passes
#: of SEP_FILTERS_PER_PASS, each computing the tile's K maps. On an H100, ZF conv1 (112 tiles of 4 x 32 pixels an
#: image): at batch 1 the call 1.02-1.12x faster than unshared with this bound at 256, 512 or 1024 (the kernel 19.0
#: us in 3 shares, the bound at 512, against 27.3 us in one); at batch 8 (896 tiles) 1024 (2 shares) 1.06-1.09x
#: faster, 256 and 512 (no shares) level. lr_conv lost from the same sharing: its first stage is most of its work
SEP_MIN_BLOCKS = 1024
#: input values an lr_conv thread loads ahead of their multiply-adds (NPCONV_LRC_UNROLL in _lowrank.cu)
LR_CONV_UNROLL = 4

_BLOCK = 256
_MAX_GRID = 1 << 18                 # blocks of a grid-stride launch, so grid * block <= 2^26
_MAX_GRID_YZ = 65535
_INDEX_LIMIT = 2**31 - 2**26        # elements an int-indexed grid-stride loop may cover without overflow


#: kernel name -> (source file, parameter kinds). PTR: a C-contiguous device array of the dtype; IPTR: a
#: C-contiguous int32 device array; I32: ``np.int32``; REAL: a scalar of the dtype.
LAUNCH_SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # x, T, spatial, order, starts, bias, y, N, C, H, W, F, KH, KW, SH, SW, PT, PL, OH, OW, tiles_w, RS, has_bias,
    # splits
    "mono_conv": (SOURCE, (PTR, PTR, PTR, IPTR, IPTR, PTR, PTR) + (I32,) * 17),
    # x, w, bias, y, N, C, H, W, F, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, CC, has_bias
    "factor_conv": (SOURCE, (PTR,) * 4 + (I32,) * 17),
    # h, second, bias, y, N, T, F, P, FB, has_bias
    **{f"lr_expand{tb}": (SOURCE, (PTR,) * 4 + (I32,) * 6) for tb in LR_EXPAND_RANKS},
    # x, first, second, bias, y, N, C, H, W, T, F, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, CC, FC, has_bias
    **{f"lr_conv{tb}": (SOURCE, (PTR,) * 5 + (I32,) * 19) for tb in LR_EXPAND_RANKS},
    **{f"lr_conv{tb}_px2": (SOURCE, (PTR,) * 5 + (I32,) * 19) for tb in LR_CONV_PX2_RANKS},
    # x, vertical, horizontal, bias, y, N, C, H, W, K, F, X, Y, SH, SW, PT, PL, OH, OW, tiles_w, has_bias, FS
    **{f"sep_conv{kb}": (SOURCE, (PTR,) * 5 + (I32,) * 17) for kb in SEP_CONV_RANKS},
}


# --- the module (built and memoized by the loader, like the package sources) -------------------------------------

def source_text(dtype) -> str:
    """The CUDA C text of ``_lowrank.cu`` for ``dtype``, exactly as ``cupy.RawModule`` gets it
    (:func:`loader.source_text`)."""
    return loader.source_text(SOURCE, dtype)


def get_kernel(name, dtype):
    """The kernel ``npconv_<name>_<f32|f64>`` of ``_lowrank.cu`` (a ``cupy.RawKernel``), from the loader's
    memoized module."""
    if name not in LAUNCH_SIGNATURES:
        raise ValueError(f"no kernel {name!r} in {SOURCE}.cu; known: {sorted(LAUNCH_SIGNATURES)}")
    return loader.get_kernel(SOURCE, name, dtype)


def clear_cache() -> None:
    """Forget the memoized modules (the loader's, which hold this source's too)."""
    loader.clear_cache()


def _cupy():
    return _backend.require_cupy()


def _launch(name, dtype, grid, block, args, shared_mem=0):
    """Pack ``args`` as :data:`LAUNCH_SIGNATURES` declares for kernel ``name`` and launch it (``ops.launch``)."""
    ops.launch(LAUNCH_SIGNATURES, name, dtype, grid, block, args, shared_mem)


def _out_len(size, k, s, lo, hi, d=1):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


def _geometry(x, KH, KW, stride, padding, dilation):
    """(N, C, H, W, SH, SW, PT, PL, DH, DW, OH, OW) of a direct conv of ``x`` with a KH x KW kernel, as ints."""
    N, C, H, W = (int(v) for v in x.shape)
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    return N, C, H, W, sh, sw, pt, pl, dh, dw, _out_len(H, KH, sh, pt, pb, dh), _out_len(W, KW, sw, pl, pr, dw)


# --- factor_conv: the direct conv of the two-stage layers ---------------------------------------------------------

def factor_chunk(C, KH, KW, itemsize):
    """Input channels per shared-memory chunk of factor_conv (0 when not even one fits the budget)."""
    per_channel = KH * KW * FACTOR_FILTERS_PER_BLOCK * itemsize
    return min(C, FACTOR_SMEM_BUDGET // per_channel)


def uses_factor_conv(F, C, KH, KW, itemsize) -> bool:
    """Whether a conv stage (F filters, C channels, KH x KW, groups 1) runs on factor_conv."""
    return F <= DIRECT_MAX_FILTERS and factor_chunk(C, KH, KW, itemsize) >= 1


def lowrank_linear(x, a, b_fac, bias):
    """Rank-t dense layer of CuPy arrays: ``(x @ b_fac.T) @ a.T + bias`` with x (N, in), a (out, t), b_fac (t, in),
    bias (out,) or None: two cuBLAS products (``_gemm.matmul``, so inside a CUDA-graph recording too) and the bias
    in one launch. Returns a new (N, out) array."""
    cp = _cupy()
    y = _matmul(_matmul(x, b_fac.T), a.T)
    if bias is not None and y.size:
        y = ops.contiguous(cp, y)
        N, O = (int(v) for v in y.shape)
        ops._launch_1d("bias_add", y.dtype, y.size, (y, ops.contiguous(cp, bias), N, O, 1), "the linear output")
    replay.complete(y)
    return y


def factor_conv(x, w, b, *, stride, padding, dilation):
    """Direct convolution of CuPy arrays on ``factor_conv``: x (N, C, H, W), w (F, C, KH, KW), b (F,) or None;
    ``stride``/``dilation`` pairs, ``padding`` (top, bottom, left, right). Returns a new (N, F, OH, OW) array.

    Raises ValueError when the weights of one input channel for 16 filters do not fit
    :data:`FACTOR_SMEM_BUDGET` (see :func:`uses_factor_conv`)."""
    cp = _cupy()
    x, w, b = ops.contiguous(cp, x), ops.contiguous(cp, w), ops.contiguous(cp, b)
    dt = x.dtype
    F, _, KH, KW = (int(v) for v in w.shape)
    N, C, H, W, sh, sw, pt, pl, dh, dw, OH, OW = _geometry(x, KH, KW, stride, padding, dilation)
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    CC = factor_chunk(C, KH, KW, dt.itemsize)
    if CC < 1:
        raise ValueError(f"factor_conv: a {KH}x{KW} kernel needs {KH * KW * FACTOR_FILTERS_PER_BLOCK * dt.itemsize} "
                         f"bytes of shared memory per input channel, more than FACTOR_SMEM_BUDGET "
                         f"({FACTOR_SMEM_BUDGET}); use ops.conv2d")
    total = N * OH * OW
    if total > _INDEX_LIMIT:
        raise ValueError(f"the convolution output has {total} pixels (N*OH*OW); the CUDA kernels index with 32-bit "
                         f"ints and take at most {_INDEX_LIMIT}: split the batch")
    fblocks = -(-F // FACTOR_FILTERS_PER_BLOCK)
    if fblocks > _MAX_GRID_YZ:
        raise ValueError(f"factor_conv takes at most {_MAX_GRID_YZ * FACTOR_FILTERS_PER_BLOCK} filters, got {F}")
    has_bias = b is not None
    grid = (min(-(-total // _BLOCK), _MAX_GRID), fblocks)
    _launch("factor_conv", dt, grid, (_BLOCK,),
            (x, w, b if has_bias else w, y, N, C, H, W, F, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW, CC, has_bias),
            shared_mem=CC * KH * KW * FACTOR_FILTERS_PER_BLOCK * dt.itemsize)
    replay.complete(y)
    return y


def conv_stage(x, w, b, *, stride, padding, dilation=(1, 1)):
    """One conv stage of a factored layer (groups 1): ``factor_conv`` when :func:`uses_factor_conv`, else
    :func:`ops.conv2d`. Arguments as :func:`factor_conv`."""
    F, C, KH, KW = (int(v) for v in w.shape)
    if uses_factor_conv(F, C, KH, KW, x.dtype.itemsize):
        return factor_conv(x, w, b, stride=stride, padding=padding, dilation=dilation)
    return ops.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=1)


# --- the layers ----------------------------------------------------------------------------------------------------

def lowrank_conv2d(x, first, second, bias, *, stride, padding, dilation):
    """Rank-t conv of CuPy arrays: x (N, C, H, W), first (t, C, X, Y), second (F, t), bias (F,) or None.
    Returns a new (N, F, OH, OW) array."""
    cp = _cupy()
    t, C, KH, KW = (int(v) for v in first.shape)
    if t <= LR_CONV_MAX_RANK:
        plan = lr_conv_plan(t, C, KH, KW, int(second.shape[0]), x.dtype.itemsize)
        if plan is not None:
            return _lr_conv(cp, x, first, second, bias, plan, stride, padding, dilation)
    h = conv_stage(x, first, None, stride=stride, padding=padding, dilation=dilation)
    N, t, OH, OW = (int(v) for v in h.shape)
    second, bias = ops.contiguous(cp, second, h.dtype), ops.contiguous(cp, bias, h.dtype)
    F = int(second.shape[0])
    plan = lr_expand_plan(t, F, h.dtype.itemsize) if t <= LR_EXPAND_MAX_RANK else None
    if plan is not None:
        return _lr_expand(cp, h.reshape(N, t, OH * OW), second, bias, plan).reshape(N, F, OH, OW)
    out = _matmul(second, h.reshape(N, t, OH * OW)).reshape(N, F, OH, OW)
    if bias is not None and out.size:
        out = ops.contiguous(cp, out)
        ops._launch_1d("bias_add", out.dtype, out.size, (out, bias, N, F, OH * OW), "the convolution output")
    return out


def separable_conv2d(x, vertical, horizontal, bias, *, stride, padding):
    """Separable conv of CuPy arrays: vertical (K, C, X, 1) with the row stride and the top/bottom padding, then
    horizontal (F, K, 1, Y) with the column stride, the left/right padding and the bias (F,) or None."""
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    K, C, X = (int(v) for v in vertical.shape[:3])
    F, Y = int(horizontal.shape[0]), int(horizontal.shape[3])
    N, _, H, W = (int(v) for v in x.shape)
    pixels = N * _out_len(H, X, sh, pt, pb) * _out_len(W, Y, sw, pl, pr)
    if pixels <= SEP_CONV_MAX_PIXELS:
        plan = sep_conv_plan(K, C, X, Y, sw, x.dtype.itemsize)
        if plan is not None:
            return _sep_conv(_cupy(), x, vertical, horizontal, bias, plan, (sh, sw), (pt, pb, pl, pr))
    h = conv_stage(x, vertical, None, stride=(sh, 1), padding=(pt, pb, 0, 0))
    return conv_stage(h, horizontal, bias, stride=(1, sw), padding=(0, 0, pl, pr))


class SepConvPlan(NamedTuple):
    """The launch shape of sep_conv: kernel ``sep_conv<KB>``, ``TR`` output rows a tile (blocks of ``TR *
    SEP_TILE_COLS`` threads) and ``smem`` bytes of dynamic shared memory."""
    KB: int
    TR: int
    smem: int


def sep_conv_plan(K, C, X, Y, SW, itemsize):
    """The :class:`SepConvPlan` of the fused separable conv (rank K, C input channels, X x 1 then 1 x Y, column
    stride SW), or None when K is above the largest compiled rank (:data:`SEP_CONV_RANKS`) or not even a one-row
    tile fits :data:`SEP_SMEM_BUDGET`. Memoised (by the arguments and the module's limits)."""
    return _sep_conv_plan(int(K), int(C), int(X), int(Y), int(SW), int(itemsize), SEP_CONV_RANKS, SEP_TILE_COLS,
                          SEP_FILTERS_PER_PASS, SEP_TILE_ROWS, SEP_SMEM_BUDGET)


@functools.lru_cache(maxsize=256)
def _sep_conv_plan(K, C, X, Y, SW, itemsize, ranks, TC, FT, rows, budget):
    KB = next((kb for kb in ranks if K <= kb), None)
    if KB is None or K < 1:
        return None
    for TR in rows:
        smem = (K * Y * FT + FT + C * X * KB + KB * TR * ((TC - 1) * SW + Y)) * itemsize
        if smem <= budget:
            return SepConvPlan(KB, TR, smem)
    return None


def _sep_conv(cp, x, vertical, horizontal, bias, plan, stride, padding):
    """The whole separable conv in one launch of ``sep_conv<KB>`` per 65535 images (``plan`` from
    :func:`sep_conv_plan`)."""
    x = ops.contiguous(cp, x)
    dt = x.dtype
    V, Hz = ops.contiguous(cp, vertical, dt), ops.contiguous(cp, horizontal, dt)
    bias = ops.contiguous(cp, bias, dt)
    K, C, X = (int(v) for v in V.shape[:3])
    F, Y = int(Hz.shape[0]), int(Hz.shape[3])
    N, _, H, W, sh, sw, pt, pl, _, _, OH, OW = _geometry(x, X, Y, stride, padding, (1, 1))
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    tiles_w = -(-OW // SEP_TILE_COLS)
    grid_x = -(-OH // plan.TR) * tiles_w
    has_bias = bias is not None
    passes = -(-F // SEP_FILTERS_PER_PASS)
    for n0 in range(0, N, _MAX_GRID_YZ):                 # one image per grid y: a launch per 65535 images
        n1 = min(N, n0 + _MAX_GRID_YZ)
        FS = -(-passes // filter_shares(grid_x * (n1 - n0), SEP_MIN_BLOCKS, passes)) * SEP_FILTERS_PER_PASS
        _launch(f"sep_conv{plan.KB}", dt, (grid_x, n1 - n0, -(-F // FS)), (plan.TR * SEP_TILE_COLS,),
                (x[n0:n1], V, Hz, bias if has_bias else Hz, y[n0:n1], n1 - n0, C, H, W, K, F, X, Y, sh, sw, pt, pl,
                 OH, OW, tiles_w, has_bias, FS), shared_mem=plan.smem)
    replay.complete(y)
    return y


class LrExpandPlan(NamedTuple):
    """The launch shape of lr_expand: kernel ``lr_expand<TB>``, ``PIX`` pixels a thread, ``block`` threads,
    ``FB`` filters a block and ``smem`` bytes of dynamic shared memory."""
    TB: int
    PIX: int
    block: int
    FB: int
    smem: int


def lr_expand_plan(t, F, itemsize):
    """The :class:`LrExpandPlan` of ``lr_expand`` for rank t and F filters; None when t is above the largest
    compiled rank (:data:`LR_EXPAND_RANKS`) or below 1. A block is 256 threads and takes every filter the budget
    (:data:`LR_SMEM_BUDGET`) allows. Memoised."""
    return _lr_expand_plan(int(t), int(F), int(itemsize), LR_SMEM_BUDGET, tuple(sorted(LR_EXPAND_RANKS.items())))


@functools.lru_cache(maxsize=256)
def _lr_expand_plan(t, F, itemsize, budget, ranks):
    TB = next((tb for tb, _ in ranks if t <= tb), None)
    if TB is None or t < 1 or F < 1:
        return None
    FB = min(F, max(1, budget // ((TB + 1) * itemsize)))
    return LrExpandPlan(TB, dict(ranks)[TB], _BLOCK, FB, FB * (TB + 1) * itemsize)


def lr_expand(h, second, bias):
    """The low-rank conv's 1x1 stage on ``lr_expand<TB>``: h (N, t, OH, OW) or (N, t, P), second (F, t), bias (F,)
    or None (CuPy arrays of one dtype). Returns a new (N, F, P) array, ``second @ h[n] + bias`` for each image n.

    Raises ValueError when t is not between 1 and the largest compiled rank (:func:`lr_expand_plan`)."""
    cp = _cupy()
    h, second, bias = ops.contiguous(cp, h), ops.contiguous(cp, second), ops.contiguous(cp, bias)
    N, t = (int(v) for v in h.shape[:2])
    P = int(np.prod(h.shape[2:], dtype=np.int64))
    plan = lr_expand_plan(t, int(second.shape[0]), h.dtype.itemsize)
    if plan is None:
        raise ValueError(f"lr_expand: rank t = {t} must be between 1 and {max(LR_EXPAND_RANKS)}; use the GEMM path")
    return _lr_expand(cp, h.reshape(N, t, P), second, bias, plan)


def _lr_expand(cp, h, second, bias, plan):
    """``lr_expand`` on contiguous arrays, h (N, t, P), with its plan."""
    dt = h.dtype
    N, t, P = (int(v) for v in h.shape)
    F = int(second.shape[0])
    if tuple(second.shape) != (F, t) or (bias is not None and tuple(bias.shape) != (F,)):
        raise ValueError(f"lr_expand: second must be (F, {t}) and bias (F,), got {tuple(second.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    y = cp.empty((N, F, P), dtype=dt)
    if y.size == 0:
        return y
    if P > _INDEX_LIMIT:
        raise ValueError(f"lr_expand: {P} pixels an image; the kernel indexes pixels with 32-bit ints and takes at "
                         f"most {_INDEX_LIMIT}")
    fblocks = -(-F // plan.FB)
    if fblocks > _MAX_GRID_YZ:
        raise ValueError(f"lr_expand takes at most {_MAX_GRID_YZ * plan.FB} filters, got {F}")
    has_bias = bias is not None
    grid_x = -(-P // (plan.PIX * plan.block))
    for n0 in range(0, N, _MAX_GRID_YZ):                 # one image per grid z: a launch per 65535 images
        n1 = min(N, n0 + _MAX_GRID_YZ)
        _launch(f"lr_expand{plan.TB}", dt, (grid_x, fblocks, n1 - n0), (plan.block,),
                (h[n0:n1], second, bias if has_bias else second, y[n0:n1], n1 - n0, t, F, P, plan.FB, has_bias),
                shared_mem=plan.smem)
    return y


class LrConvPlan(NamedTuple):
    """The launch shape of lr_conv: kernel ``lr_conv<TB>``, ``CC`` input channels a phase-1 chunk, ``FC`` filters
    a phase-2 chunk and ``smem`` bytes of dynamic shared memory (the larger phase's)."""
    TB: int
    CC: int
    FC: int
    smem: int


def lr_conv_plan(t, C, KH, KW, F, itemsize):
    """The :class:`LrConvPlan` of the fused low-rank conv (rank t, C input channels, KH x KW, F filters), or None
    when t is not a compiled rank (:data:`LR_EXPAND_RANKS`) or one channel's first-stage weights do not fit
    :data:`LR_SMEM_BUDGET`. Memoised (by the arguments and the module's limits)."""
    return _lr_conv_plan(int(t), int(C), int(KH), int(KW), int(F), int(itemsize), LR_SMEM_BUDGET,
                         tuple(sorted(LR_EXPAND_RANKS)), LR_CONV_UNROLL)


@functools.lru_cache(maxsize=256)
def _lr_conv_plan(t, C, KH, KW, F, itemsize, budget, ranks, unroll):
    TB = next((tb for tb in ranks if t <= tb), None)
    if TB is None or t < 1 or F < 1 or C < 1:
        return None

    def phase1(cc):                     # bytes of a chunk of cc channels: taps padded to the unroll, TB each
        return -(-cc * KH * KW // unroll) * unroll * TB * itemsize
    if phase1(1) > budget:
        return None
    CC = C
    while phase1(CC) > budget:
        CC = max(1, min(CC - 1, CC * budget // phase1(CC)))
    FC = min(F, max(1, budget // ((TB + 1) * itemsize)))
    return LrConvPlan(TB, CC, FC, max(phase1(CC), FC * (TB + 1) * itemsize))


def _lr_conv(cp, x, first, second, bias, plan, stride, padding, dilation):
    """The whole low-rank conv in one launch of ``lr_conv<TB>`` (``plan`` from :func:`lr_conv_plan`)."""
    x, first = ops.contiguous(cp, x), ops.contiguous(cp, first, x.dtype)
    second, bias = ops.contiguous(cp, second, x.dtype), ops.contiguous(cp, bias, x.dtype)
    dt = x.dtype
    t, _, KH, KW = (int(v) for v in first.shape)
    F = int(second.shape[0])
    N, C, H, W, sh, sw, pt, pl, dh, dw, OH, OW = _geometry(x, KH, KW, stride, padding, dilation)
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    total = N * OH * OW
    if total > _INDEX_LIMIT:
        raise ValueError(f"the convolution output has {total} pixels (N*OH*OW); the CUDA kernels index with 32-bit "
                         f"ints and take at most {_INDEX_LIMIT}: split the batch")
    has_bias = bias is not None
    pix = 2 if total >= LR_CONV_PX2_MIN_PIXELS and plan.TB in LR_CONV_PX2_RANKS else 1
    _launch(f"lr_conv{plan.TB}{'_px2' if pix == 2 else ''}", dt, (-(-total // (pix * LR_CONV_THREADS)),),
            (LR_CONV_THREADS,),
            (x, first, second, bias if has_bias else second, y, N, C, H, W, t, F, KH, KW, sh, sw, pt, pl, dh, dw, OH,
             OW, plan.CC, plan.FC, has_bias), shared_mem=plan.smem)
    replay.complete(y)
    return y


class MonoTiling(NamedTuple):
    """The launch shape of a mono_conv block: ``TW`` x ``TH`` threads for an output tile of
    ``MONO_ROWS_PER_THREAD * TH`` rows and ``MONO_COLS_PER_THREAD * TW`` columns; ``RS`` the colour tile's row stride
    and ``smem`` the dynamic shared memory, in bytes."""
    TW: int
    TH: int
    RS: int
    smem: int


def mono_row_stride(TW, SH, SW, TIW):
    """The colour tile's row stride (elements): room for the SW column phases of ``ceil(TIW / SW)`` values each,
    padded, when the block is narrower than a warp and the padding exists, so that ``SH * RS = TW (mod 32)``: the
    warp's rows of threads then read consecutive banks."""
    rs = SW * -(-TIW // SW)
    if TW < 32:
        for pad in range(32):
            if (SH * (rs + pad) - TW) % 32 == 0:
                return rs + pad
    return rs


def _mono_shape(TW, TH, KH, KW, SH, SW, itemsize):
    """(TIH, TIW, RS, smem bytes) of a TW x TH block: the layout of _lowrank.cu's mono_conv."""
    TIH = (MONO_ROWS_PER_THREAD * TH - 1) * SH + KH
    TIW = (MONO_COLS_PER_THREAD * TW - 1) * SW + KW
    RS = mono_row_stride(TW, SH, SW, TIW)
    return TIH, TIW, RS, (KH * KW * MONO_FILTERS_PER_PASS + TIH * RS) * itemsize


def mono_tiling(OH, OW, C, KH, KW, SH, SW, itemsize):
    """The :class:`MonoTiling` of a mono_conv launch, or None when not even the smallest tile fits
    :data:`MONO_SMEM_BUDGET`. Memoised (by the arguments and the budget): a layer asks on every call.

    Among the block widths of :data:`MONO_TILE_WIDTHS` and the row counts that keep a block within
    :data:`MONO_MAX_THREADS` and the budget, it takes the one with the fewest estimated instructions over the whole
    output (an issue count from the kernel's loops, not a measurement): the colour tile costs about ``6 + 3C`` per
    value, halo included, and a thread about 48 per tap for its 8 pixels of a 4-filter pass, counted for every thread
    of every tile, idle or not, in whole warps and for at least 64 threads a block (smaller blocks leave an SM's
    block slots idle). Ties go to the wider block (a warp on one row: whole rows of stores)."""
    return _mono_tiling(int(OH), int(OW), int(C), int(KH), int(KW), int(SH), int(SW), int(itemsize),
                        MONO_SMEM_BUDGET)


@functools.lru_cache(maxsize=256)
def _mono_tiling(OH, OW, C, KH, KW, SH, SW, itemsize, budget):
    best = None
    KK = KH * KW
    for TW in MONO_TILE_WIDTHS:
        tiles_w = -(-OW // (MONO_COLS_PER_THREAD * TW))
        for TH in range(1, MONO_MAX_THREADS // TW + 1):
            TIH, TIW, RS, smem = _mono_shape(TW, TH, KH, KW, SH, SW, itemsize)
            if smem > budget:
                break                                   # taller tiles only need more
            tiles = tiles_w * -(-OH // (MONO_ROWS_PER_THREAD * TH))
            threads = max(-(-TW * TH // 32) * 32, 64)  # whole warps, and at least 2 of them
            cost = tiles * (TIH * TIW * (6 + 3 * C) + threads * (KK * 48 + 200))
            if best is None or cost < best[0]:
                best = (cost, MonoTiling(TW, TH, RS, smem))
    return None if best is None else best[1]


def _colour_groups(assignment, Cp):
    """(order, starts): the filters sorted by colour (stable) and where each colour's filters begin, int32."""
    a = np.asarray(assignment, np.int64)
    order = np.argsort(a, kind="stable")
    starts = np.searchsorted(a[order], np.arange(Cp + 1))
    return order.astype(np.int32), starts.astype(np.int32)


def _device_colour_groups(cp, assignment, Cp):
    """``_colour_groups`` and the per-colour filter indices, on the device, copied once per assignment
    (``ops.on_device``)."""
    a = np.ascontiguousarray(assignment, np.int64)

    def build():
        order, starts = _colour_groups(a, Cp)
        return (cp.asarray(order), cp.asarray(starts), [cp.asarray(np.flatnonzero(a == c)) for c in range(Cp)],
                int(np.diff(starts).max(initial=0)))
    return ops.on_device(cp, ("colour groups", a.tobytes(), int(Cp)), build)


def filter_shares(blocks, min_blocks, units, limit=_MAX_GRID_YZ):
    """Into how many shares a kernel whose grid has ``blocks`` blocks splits its filters (``units`` indivisible
    groups of them), each share a block of its own for the same pixels: 1 from ``min_blocks`` blocks on, else enough
    to reach it, at most ``units`` and ``limit`` (the grid dimension's). At a small batch the extra blocks (the
    pixels' shared work done once a share) put more of the GPU to work."""
    if blocks >= min_blocks or units <= 1:
        return 1
    return max(1, min(-(-min_blocks // max(blocks, 1)), units, limit))


def mono_splits(blocks, largest, Cp):
    """How many blocks share each colour's filters in a mono_conv grid of ``blocks`` blocks (tiles x colours x
    images) whose largest colour has ``largest`` filters: 1 from :data:`MONO_MIN_BLOCKS` blocks on, else enough to
    reach it, at most one per :data:`MONO_SHARE_FILTERS` filters, and within the grid's y limit."""
    return filter_shares(blocks, MONO_MIN_BLOCKS, -(-largest // MONO_SHARE_FILTERS), _MAX_GRID_YZ // max(Cp, 1))


def monochromatic_conv2d(x, color_transform, assignment, spatial, bias, *, stride, padding):
    """Monochromatic conv of CuPy arrays: x (N, C, H, W), color_transform (C', C), ``assignment`` a host (NumPy)
    integer array (F,) with values in [0, C'), spatial (F, X, Y), bias (F,) or None. Returns (N, F, OH, OW)."""
    cp = _cupy()
    x, T, S, b = (ops.contiguous(cp, a) for a in (x, color_transform, spatial, bias))
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    Cp = int(T.shape[0])
    F, KH, KW = (int(v) for v in S.shape)
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    OH, OW = _out_len(H, KH, sh, pt, pb), _out_len(W, KW, sw, pl, pr)
    tiling = mono_tiling(max(OH, 1), max(OW, 1), C, KH, KW, sh, sw, dt.itemsize)
    if tiling is None or Cp > _MAX_GRID_YZ:
        return _monochromatic_composed(cp, x, T, assignment, S, b, (sh, sw), (pt, pb, pl, pr), (OH, OW))
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    TW, TH, RS, smem = tiling
    tiles_w = -(-OW // (MONO_COLS_PER_THREAD * TW))
    n_tiles = -(-OH // (MONO_ROWS_PER_THREAD * TH)) * tiles_w
    if n_tiles >= 2**31:
        raise ValueError(f"the output ({OH} x {OW}) has too many tiles for one launch")
    order, starts, _, largest = _device_colour_groups(cp, assignment, Cp)
    has_bias = b is not None
    for n0 in range(0, N, _MAX_GRID_YZ):                 # one image per grid z: a launch per 65535 images
        n1 = min(N, n0 + _MAX_GRID_YZ)
        splits = mono_splits(n_tiles * Cp * (n1 - n0), largest, Cp)
        _launch("mono_conv", dt, (n_tiles, Cp * splits, n1 - n0), (TW, TH),
                (x[n0:n1], T, S, order, starts, b if has_bias else S, y[n0:n1],
                 n1 - n0, C, H, W, F, KH, KW, sh, sw, pt, pl, OH, OW, tiles_w, RS, has_bias, splits), shared_mem=smem)
    replay.complete(y)
    return y


def _monochromatic_composed(cp, x, T, assignment, S, b, stride, padding, out_hw):
    """The fallback: colours by one batched cuBLAS GEMM, then one ``ops.conv2d`` per colour."""
    N, C, H, W = (int(v) for v in x.shape)
    Cp = int(T.shape[0])
    F, KH, KW = (int(v) for v in S.shape)
    out = cp.empty((N, F) + tuple(out_hw), dtype=x.dtype)
    if out.size == 0:
        return out
    z = _matmul(T, x.reshape(N, C, H * W)).reshape(N, Cp, H, W)
    for c, di in enumerate(_device_colour_groups(cp, assignment, Cp)[2]):
        if di.size == 0:
            continue
        out[:, di] = ops.conv2d(cp.ascontiguousarray(z[:, c:c + 1]), cp.ascontiguousarray(S[di][:, None]), None,
                                stride=stride, padding=padding, dilation=(1, 1), groups=1)
    if b is not None:
        out += b.reshape(1, F, 1, 1)
    return out


replay.watch(__name__)
