"""Numba packing kernels for convolution as GEMM.

``im2col`` writes a column matrix ``col[(c, kh, kw), (n, oh, ow)]`` for a chunk of images and a range of
channels, so that ``w.reshape(F, -1) @ col`` is the convolution. It packs each input plane once, padded and split
by the stride phases (``_pack.pack_plane``), so that every row of ``col`` is a sequence of contiguous copies the
compiler vectorises (3.7x faster than reading the input with bounds tests and strided loads on ZF conv1, 1.6-3x
on the other ZF/AlexNet layers; measured in this session's profile, see docs/benchmarks.md).
"""
from __future__ import annotations

import numba
import numpy as np

from ._pack import pack_plane


@numba.njit(parallel=True, cache=True, nogil=True)
def im2col(x, n0, n1, c0, c1, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW, nsplit, col, ld):
    """col[((c - c0)*KH*KW + kh*KW + kw)*ld + i*OH*OW + oh*OW + ow] = x_padded[n0 + i, c, oh*sh + kh*dh, ow*sw + kw*dw]:
    the column matrix in the flat, C-contiguous ``col``, rows ``ld`` apart (``ld`` >= the chunk's columns). A flat
    buffer rather than a view of the chunk's columns, which is C-contiguous for a whole chunk and not for a shorter
    last one: numba would compile the kernel for both layouts, the second without contiguous stores.

    One parallel job per (image, channel, slice of the kernel rows): the job copies its input plane, zero-padded
    and split by the stride phases (``pack_plane``), into a small scratch buffer that stays in L1/L2; every
    (kh, kw) row of ``col`` is then OH contiguous runs of OW values read from that buffer, with no bounds tests
    and no strided loads. ``nsplit`` (1..KH, see :func:`row_split`) splits the kernel rows across jobs, for when
    images x channels are too few to keep the threads busy (the first layer of a network at batch 1: 3 channels).
    """
    nimg = n1 - n0
    nch = c1 - c0
    P = OH * OW
    R = -(-((OH - 1) * sh + (KH - 1) * dh + 1) // sh)
    M = -(-((OW - 1) * sw + (KW - 1) * dw + 1) // sw)
    for job in numba.prange(nimg * nch * nsplit):
        s = job % nsplit
        t = job // nsplit
        c = t % nch
        i = t // nch
        buf = np.empty((sh, sw, R, M), x.dtype)
        pack_plane(x[n0 + i, c0 + c], pt, pl, sh, sw, buf)
        for kh in range(s * KH // nsplit, (s + 1) * KH // nsplit):
            a = kh * dh
            for kw in range(KW):
                b = kw * dw
                plane = buf[a % sh, b % sw]
                r = (c * KH + kh) * KW + kw
                dst = col[r * ld + i * P:r * ld + (i + 1) * P]
                r0 = a // sh
                m0 = b // sw
                for oh in range(OH):
                    src = plane[r0 + oh, m0:m0 + OW]
                    d = dst[oh * OW:(oh + 1) * OW]
                    for e in range(OW):
                        d[e] = src[e]


def row_split(nimg, nch, KH):
    """Kernel-row slices per (image, channel) job of :func:`im2col`: enough jobs for 4 per thread."""
    return min(KH, max(1, -(-4 * numba.get_num_threads() // max(1, nimg * nch))))


@numba.njit(parallel=True, cache=True, nogil=True)
def scatter_chunk_bias(tmp, ld, out, f0, F, n0, nimg, bias, has_bias):
    """out[n0+i, f0+f, p] = tmp[f*ld + i*P + p] (+ bias[f]) for f < F: undo the chunk-major GEMM layout of a group's
    F output channels. ``tmp`` flat with rows ``ld`` apart and ``out`` (N, F_all, P) whole, both C-contiguous (views
    of a shorter last chunk or of a group's channels would not be, and numba would compile the kernel again for
    them)."""
    P = out.shape[2]
    for job in numba.prange(nimg * F):
        i = job // F
        f = job - i * F
        b = bias[f] if has_bias else 0.0
        src = tmp[f * ld + i * P:f * ld + (i + 1) * P]
        dst = out[n0 + i, f0 + f]
        for p in range(P):
            dst[p] = src[p] + b


@numba.njit(parallel=True, cache=True, nogil=True)
def add_bias_rows(y, bias):
    """y[f, p] += bias[f] for a 2-D (F, P) block."""
    F, P = y.shape
    for f in numba.prange(F):
        b = bias[f]
        for p in range(P):
            y[f, p] += b


@numba.njit(parallel=True, cache=True, nogil=True)
def depthwise_direct(x, w, bias, has_bias, mult, sh, sw, pt, pl, dh, dw, out):
    """Grouped conv with one input channel per group (depthwise, channel multiplier ``mult``), direct loops.

    x (N, C, H, W), w (C*mult, 1, KH, KW), out (N, C*mult, OH, OW).
    """
    N, C, H, W = x.shape
    F = out.shape[1]
    OH = out.shape[2]
    OW = out.shape[3]
    KH = w.shape[2]
    KW = w.shape[3]
    for job in numba.prange(N * F):
        n = job // F
        f = job - n * F
        c = f // mult
        b = bias[f] if has_bias else 0.0
        for oh in range(OH):
            for ow in range(OW):
                out[n, f, oh, ow] = b
            for kh in range(KH):
                ih = oh * sh - pt + kh * dh
                if ih < 0 or ih >= H:
                    continue
                for kw in range(KW):
                    wv = w[f, 0, kh, kw]
                    off = kw * dw - pl
                    for ow in range(OW):
                        iw = ow * sw + off
                        if iw >= 0 and iw < W:
                            out[n, f, oh, ow] += wv * x[n, c, ih, iw]
