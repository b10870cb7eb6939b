"""Numba packing kernels for convolution as GEMM.

``im2col`` writes a column matrix ``col[(c, kh, kw), (n, oh, ow)]`` for a chunk of images and a range of
channels, so that ``w.reshape(F, -1) @ col`` is the convolution. Rows are independent, so the outer loop is a
``prange``; the inner loop over output columns is split into the zero-padding part and the in-bounds part,
so the copy of a stride-1 row is a plain contiguous loop the compiler vectorises.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def im2col(x, n0, n1, c0, c1, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW, col):
    H = x.shape[2]
    W = x.shape[3]
    P = OH * OW
    nrows = (c1 - c0) * KH * KW
    nimg = n1 - n0
    for job in numba.prange(nrows * nimg):
        r = job // nimg
        i = job - r * nimg
        c = c0 + r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        n = n0 + i
        base = i * P
        # output columns ow whose input column iw = ow*sw - pl + kw*dw lies in [0, W)
        off = kw * dw - pl
        if off >= 0:
            ow_lo = 0
        else:
            ow_lo = (-off + sw - 1) // sw
        if W - 1 - off < 0:
            ow_hi = 0
        else:
            ow_hi = min(OW, (W - 1 - off) // sw + 1)
        if ow_lo > ow_hi:
            ow_lo = ow_hi
        for oh in range(OH):
            ih = oh * sh - pt + kh * dh
            dst = base + oh * OW
            if ih < 0 or ih >= H:
                for ow in range(OW):
                    col[r, dst + ow] = 0
                continue
            for ow in range(ow_lo):
                col[r, dst + ow] = 0
            if sw == 1:
                s0 = ow_lo + off
                for ow in range(ow_lo, ow_hi):
                    col[r, dst + ow] = x[n, c, ih, s0 + (ow - ow_lo)]
            else:
                for ow in range(ow_lo, ow_hi):
                    col[r, dst + ow] = x[n, c, ih, ow * sw + off]
            for ow in range(ow_hi, OW):
                col[r, dst + ow] = 0


@numba.njit(parallel=True, cache=True, nogil=True)
def scatter_chunk_bias(tmp, out, n0, nimg, bias, has_bias):
    """out[n0+i, f, p] = tmp[f, i*P + p] (+ bias[f]): undo the chunk-major GEMM layout."""
    F = out.shape[1]
    P = out.shape[2]
    for job in numba.prange(nimg * F):
        i = job // F
        f = job - i * F
        b = bias[f] if has_bias else 0.0
        for p in range(P):
            out[n0 + i, f, p] = tmp[f, i * P + p] + b


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
