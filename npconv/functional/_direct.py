"""The direct (im2col-free) convolution on the CPU: the Python side of ``kernels.cpu.lowrank.fused_direct_conv``.

The kernel reads zero-padded polyphase bands of the input planes in place and runs the filters over them: on
npconv's GEMM micro-kernel where the CPU has one (``fused_direct_conv_mk``: register tiles of 12, 8 or 4 filters,
the taps as shifted views of the plane), else 4 filters at a time, 7 taps per pass (``fused_direct_conv``; see the
kernel module's docstring). It serves

* the factored layers of :mod:`npconv.functional.lowrank` (the monochromatic filters, whose input plane is a colour
  made on the fly; the first stage of a low-rank conv and the vertical separable pass when they are small);
* dense :func:`npconv.functional.conv2d` calls with few taps per filter, few filters and small images
  (``use_direct``), where the im2col matrix is a shallow GEMM operand: the first layer of a CIFAR-size network.
  Measured on 2 cores against im2col + GEMM, the two interleaved in one process (2026-11-26): CIFAR conv1
  (3 -> 64, 5x5, 32x32) 1.00-1.06x at batch 1, 1.41-1.50x at batch 16 and 128; 3 -> 64 3x3 1.22x (batch 1) and
  1.71x (batch 16); 8 -> 64 3x3 1.41x and 4 -> 64 5x5 1.18x at batch 16. Where GEMM stays: ZF conv1 (3 -> 96,
  7x7 / 2 on 224x224; GEMM 0.96-0.99 ms against 1.14-1.20 at batch 1, 34 against 39-40 ms at batch 32, in
  processes where the GEMM path ran at its usual speed), a 4 -> 64 5x5 conv on 112x112 at batch 1 (0.87x), a
  3 -> 128 5x5 conv (1.02x), and convs with more taps.
"""
from __future__ import annotations

import functools

import numpy as np

from .._validate import out_size
from ..kernels.cpu import plan as _PL
from ._prepared import prepared

__all__ = ["dense_direct", "direct_conv_cpu", "direct_eligible", "use_direct"]

#: target size of one job's buffer of polyphase rows (it should stay in the L2 cache), in bytes
_BAND_BYTES = 384 * 2**10
#: the filters on npconv's GEMM micro-kernel (``kernels/cpu/gemm.py``, ``microkernel_taps``) where the CPU has one,
#: else the numba filter passes; a module constant for same-process comparisons, not a user setting
USE_MICROKERNEL = True
#: dense convs run on the direct kernel with the micro-kernel (``use_direct``) from this batch and this kernel size
#: (X*Y) on: against im2col + the micro-kernel GEMM (2 cores, same process, interleaved, 2026-11-26), at batch 8,
#: 16 and 128: CIFAR conv2 (64 -> 128, 5x5, 16x16) 1.06x, 1.29x, 1.33x; ZF conv2 (5x5 / 2, 55x55) 1.04x, 1.04x,
#: 1.07x; AlexNet conv2 (5x5, 27x27) 1.12x (batch 8), 1.15x (128); ZF conv1 (7x7 / 2, 224x224) 1.18x, 1.21x (8,
#: 128). At batches 2-4 it was 0.82-0.98x, at batch 1 0.59-0.80x (1.05x for ZF conv1). 3x3 layers: not measured
#: against im2col (Winograd takes them at such batches when it is eligible).
DIRECT_MK_MIN_BATCH = 8
DIRECT_MK_MIN_TAPS = 25
#: ... when the filter blocks of a tile's rows are at least this full (ZF conv1, monochromatic, 2 cores, with the
#: 8-row tile only, against the numba passes at batch 1 and 128: 16 or 24 filters a colour, full blocks,
#: 1.21-1.27x faster; 12 a colour, 0.75 full, 1.03-1.05x; 4 a colour, half full, 0.76-0.83x)
_MK_MIN_FILL = 0.7
#: a dense conv takes the direct kernel when it has at most this many taps per filter (C * KH * KW) ...
DENSE_DIRECT_MAX_TAPS = 100
#: ... at most this many filters ...
DENSE_DIRECT_MAX_FILTERS = 64
#: ... output planes of at most this many positions (the GEMM gets enough columns per image beyond it) ...
DENSE_DIRECT_MAX_PLANE = 4096
#: ... and at least this many multiply-adds (below it the direct path's fixed cost, about 25 us, dominates)
DENSE_DIRECT_MIN_MACS = 1 << 20


def direct_eligible(dilation, groups):
    """Whether the direct kernel can run a dense conv: no dilation and one group."""
    return groups == 1 and tuple(dilation) == (1, 1)


def use_direct(x_shape, w_shape, dilation, groups, out_hw):
    """Whether ``conv2d(algorithm="auto")`` runs the direct kernel on the CPU: eligible, and within the
    ``DENSE_DIRECT_*`` bounds (taps per filter, filters, output plane, multiply-adds)."""
    if not direct_eligible(dilation, groups):
        return False
    F, C, KH, KW = w_shape
    taps = C * KH * KW
    plane = out_hw[0] * out_hw[1]
    macs = x_shape[0] * F * plane * taps
    if (taps <= DENSE_DIRECT_MAX_TAPS and F <= DENSE_DIRECT_MAX_FILTERS and plane <= DENSE_DIRECT_MAX_PLANE
            and macs >= DENSE_DIRECT_MIN_MACS):
        return True
    # on the micro-kernel (its tiles then at least 0.9 full), from a few images up, kernels of 5x5 and more
    return (USE_MICROKERNEL and bool(_taps_tiles(np.float32)) and x_shape[0] >= DIRECT_MK_MIN_BATCH
            and KH * KW >= DIRECT_MK_MIN_TAPS and F >= 32)


def _taps_tiles(dtype):
    from ..kernels.cpu import gemm as KG
    return KG.taps_tile_shapes(dtype)


def _pack_blocks(wt, blk_f, blk_nf, MR, dtype):
    """Each filter block's taps packed k-major for the micro-kernel (``gemm.pack_a`` of the blocks' rows stacked),
    the rows past its filters zero (flat)."""
    from ..kernels.cpu import gemm as KG
    rows = np.ascontiguousarray(wt, dtype=dtype)[blk_f]                       # (nblk, MR, Tn)
    rows[np.arange(MR)[None, :] >= blk_nf[:, None]] = 0
    return KG.pack_a(rows.reshape(-1, rows.shape[2]), MR)


def _bias_or_zeros(bias, F, dtype):
    if bias is None:
        return np.zeros(F, dtype)
    return np.ascontiguousarray(bias)


def _plane_geometry(H, W, X, Y, stride, pad):
    """Output size and polyphase plane width for a kernel X x Y (see kernels.cpu.lowrank)."""
    Dh, Dw = stride
    Ho = out_size(H, X, Dh, pad[0], pad[1], what="output height")
    Wo = out_size(W, Y, Dw, pad[2], pad[3], what="output width")
    Wq = max(-(-(W + pad[2] + pad[3]) // Dw), Wo + (Y - 1) // Dw)
    return Ho, Wo, Wq


@functools.lru_cache(maxsize=64)
def _tap_offsets(Cg, X, Y, Dh, Dw, Hb, Wq):
    """Offsets of the taps (c, x, y), flattened in that order, in a job buffer of Cg planes (Dh, Dw, Hb, Wq)."""
    c, x, y = np.meshgrid(np.arange(Cg), np.arange(X), np.arange(Y), indexing="ij")
    plane = (c * Dh + x % Dh) * Dw + y % Dw
    off = np.ascontiguousarray((plane * (Hb * Wq) + (x // Dh) * Wq + y // Dw).ravel().astype(np.int64))
    off.flags.writeable = False          # shared by the cache
    return off


def _blocks(order, bounds, size=4):
    """Filter blocks of ``size`` (padded by repeating the last id), their sizes, and each group's first block.

    Group g holds the filters ``order[bounds[g]:bounds[g + 1]]`` (no group empty). Vectorised: a loop over the
    filters cost 20 us of a 0.5 ms monochromatic ZF conv1 at batch 1. Memoised by content (read-only arrays): the
    vectorised form still took 14 us a call, a tenth of the bundled CIFAR network's conv1 at batch 1.
    """
    order = np.ascontiguousarray(order, np.int64)
    bounds = np.ascontiguousarray(bounds, np.int64)
    return _blocks_of(order.tobytes(), bounds.tobytes(), size)


@functools.lru_cache(maxsize=64)
def _blocks_of(order_bytes, bounds_bytes, size):
    order = np.frombuffer(order_bytes, np.int64)
    bounds = np.frombuffer(bounds_bytes, np.int64)
    sizes = np.diff(bounds)
    nblk = (sizes + size - 1) // size
    grp_blk = np.concatenate(([0], np.cumsum(nblk))).astype(np.int64)
    gb = np.repeat(np.arange(sizes.shape[0]), nblk)                   # each block's group
    jb = np.arange(grp_blk[-1]) - grp_blk[gb]                          # its index within the group
    pos = np.minimum(size * jb[:, None] + np.arange(size), (sizes[gb] - 1)[:, None])
    blk_f = np.ascontiguousarray(order[bounds[gb][:, None] + pos])
    blk_nf = np.minimum(size, sizes[gb] - size * jb).astype(np.int64)
    for a in (blk_f, blk_nf, grp_blk):
        a.flags.writeable = False          # shared by the cache
    return blk_f, blk_nf, grp_blk


def _band_rows(Ho, margin, n_jobs_per_band, plane_row_bytes):
    """Output rows per job (a job is one image and one band of rows): the job's buffers stay near
    ``_BAND_BYTES`` and there are at least 2 jobs per thread when the batch allows."""
    import numba
    band = max(4, _BAND_BYTES // max(plane_row_bytes, 1) - margin)
    want = 2 * numba.get_num_threads()
    nband = -(-Ho // band)
    if n_jobs_per_band * nband < want:
        nband = -(-want // max(n_jobs_per_band, 1))
    nband = min(nband, Ho)
    return int(-(-Ho // nband))          # equal bands


def direct_conv_cpu(x, wt, order, bounds, group_plane, Cg, X, Y, bias, stride, pad, F, transform=None,
                     out=None, prep=None):
    """Run filters (F, Cg*X*Y taps in ``wt``) on the polyphase planes of ``x`` (optionally colour-transformed).

    Group g, the filters ``order[bounds[g]:bounds[g + 1]]`` (none empty), reads planes
    ``group_plane[g] : group_plane[g] + Cg``.
    ``out`` (a C-contiguous (N, F, H', W') array) receives the result when given. ``prep``: a layer's per-dtype
    parameter cache (``functional/_prepared.py``), where the micro-kernel's packed filters are kept.
    """
    from ..kernels.cpu import lowrank as K

    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    Dh, Dw = stride
    Ho, Wo, Wq = _plane_geometry(H, W, X, Y, stride, pad)
    margin = (X - 1) // Dh + 1
    band = _band_rows(Ho, margin, N, (C + (transform is not None)) * Dh * Dw * Wq * x.dtype.itemsize)
    Hb = band + margin
    tapoff = _tap_offsets(Cg, X, Y, Dh, Dw, Hb, Wq)
    T = transform if transform is not None else np.zeros((1, 1), x.dtype)
    if out is None:
        out = np.empty((N, F, Ho, Wo), x.dtype)
    tile = None
    if USE_MICROKERNEL:
        # the tile whose rows the filter groups fill best (the larger on a tie); none below _MK_MIN_FILL, where
        # the padding rows would cost more than the micro-kernel gains
        best = 0.0
        for cand in _taps_tiles(x.dtype):
            blk_f, blk_nf, grp_blk = _blocks(order, bounds, cand[1])
            fill = blk_nf.sum() / blk_f.size
            if fill >= _MK_MIN_FILL and fill > best:
                tile, best = cand, fill
    if tile is not None:
        VW, MR, NV = tile
        blk_f, blk_nf, grp_blk = _blocks(order, bounds, MR)
        wp = prepared(prep, ("cpu-direct-mk", x.dtype, MR), lambda: _pack_blocks(wt, blk_f, blk_nf, MR, x.dtype))
        _PL.run(K.fused_direct_conv_mk, x, T, transform is not None, np.asarray(group_plane, np.int64), Cg, grp_blk,
                blk_f, blk_nf, tapoff, wp, _bias_or_zeros(bias, F, x.dtype), pad[0], pad[2], Dh, Dw, band, Hb, Wq,
                MR, VW * NV, out)
        _PL.complete(out)       # the whole work: one kernel call (kernels/cpu/plan.py)
        return out
    blk_f, blk_nf, grp_blk = _blocks(order, bounds)
    _PL.run(K.fused_direct_conv, x, T, transform is not None, np.asarray(group_plane, np.int64), Cg, grp_blk, blk_f,
            blk_nf, tapoff, wt, _bias_or_zeros(bias, F, x.dtype), pad[0], pad[2], Dh, Dw, band, Hb, Wq, out)
    _PL.complete(out)
    return out


def dense_direct(x, w, bias, stride, pad, out=None, prep=None):
    """A dense conv (``w`` (F, C, KH, KW), every input channel to every filter) on the direct kernel; stride and
    padding as :func:`direct_conv_cpu` takes them, and ``prep`` likewise."""
    F, C, KH, KW = w.shape
    wt = np.ascontiguousarray(w.reshape(F, C * KH * KW))
    return direct_conv_cpu(x, wt, np.arange(F), [0, F], [0], C, KH, KW, bias, stride, pad, F, out=out, prep=prep)


_PL.watch(__name__)
