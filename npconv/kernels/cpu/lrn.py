"""Numba kernel for cross-channel local response normalisation (LRN).

``y[n, c, s] = x[n, c, s] / (k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} x[n, c', s]^2) ** beta``,
channels outside ``[0, C)`` counting as zero. The input is a C-contiguous ``(N, C, S)`` array (``S = H*W``).

For a block of pixels, every channel's square is computed once (float64), then each window sum is added afresh
from them: ``min(size, C)`` additions per output and no running subtraction (a running sum would let one NaN or
infinity, or the rounding of one very large channel, spoil every later channel of the pixel). The inner loops are
contiguous, and the blocks of every image run in parallel (``prange``). For a float32 output the power
``(k + alpha/size * sum) ** -beta`` is then taken in float32.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["lrn_across_channels"]

#: pixels per block at most
_BLOCK = 512
#: bytes of a block's float64 squares (all channels): fewer pixels a block for many channels
_SQ_BYTES = 256 * 1024


@numba.njit(cache=True, fastmath=False, parallel=True)
def lrn_across_channels(x, size, alpha, beta, k, out):
    """LRN of a C-contiguous ``x`` (N, C, S) across its channel axis, written to ``out`` (same shape and dtype,
    allocated by the caller)."""
    N, C, S = x.shape
    before = size // 2          # channels below c in the window
    after = (size - 1) // 2     # channels above c in the window
    coef = alpha / size
    # 0: general pow, 1: beta == 0.75 (AlexNet/Caffe default), 2: beta == 0.5, 3: beta == 1
    mode = 0
    if beta == 0.75:
        mode = 1
    elif beta == 0.5:
        mode = 2
    elif beta == 1.0:
        mode = 3
    single = out.itemsize == 4
    # pixels per block: the block's float64 squares of every channel stay within _SQ_BYTES (L2)
    blk = min(_BLOCK, max(16, _SQ_BYTES // (8 * max(C, 1)) // 16 * 16))
    nblk = (S + blk - 1) // blk
    for t in numba.prange(N * nblk):
        n = t // nblk
        s0 = (t % nblk) * blk
        L = min(s0 + blk, S) - s0
        acc = np.empty(L, dtype=np.float64)
        sq = np.empty((C, L), dtype=np.float64)
        for j in range(C):
            xa = x[n, j, s0:s0 + L]
            row = sq[j]
            for q in range(L):
                v = np.float64(xa[q])
                row[q] = v * v
        for c in range(C):
            # the window's sum added afresh from the squares (no running subtraction: a non-finite value, or the
            # rounding of one very large channel, then affects only the windows that hold it)
            lo = max(0, c - before)
            hi = min(C - 1, c + after)
            s_0 = sq[lo]
            for q in range(L):
                acc[q] = s_0[q]
            for r in range(lo + 1, hi + 1):
                s_r = sq[r]
                for q in range(L):
                    acc[q] += s_r[q]
            xc = x[n, c, s0:s0 + L]
            oc = out[n, c, s0:s0 + L]
            if single:
                # float32 output: the window sum stays float64, the power is taken in float32 (16 lanes; the
                # float64 square roots and division were most of the time: ZF norm1 b128 17 -> 13.5 ms)
                if mode == 1:
                    for q in range(L):
                        b32 = np.float32(k + coef * acc[q])
                        inv = np.float32(1.0) / np.sqrt(b32)
                        oc[q] = xc[q] * (inv * np.sqrt(inv))
                elif mode == 2:
                    for q in range(L):
                        b32 = np.float32(k + coef * acc[q])
                        oc[q] = xc[q] / np.sqrt(b32)
                elif mode == 3:
                    for q in range(L):
                        b32 = np.float32(k + coef * acc[q])
                        oc[q] = xc[q] / b32
                else:
                    for q in range(L):
                        base = k + coef * acc[q]
                        oc[q] = xc[q] * base ** (-beta)
            elif mode == 1:
                for q in range(L):
                    base = k + coef * acc[q]
                    inv = 1.0 / math.sqrt(base)
                    oc[q] = xc[q] * (inv * math.sqrt(inv))
            elif mode == 2:
                for q in range(L):
                    base = k + coef * acc[q]
                    oc[q] = xc[q] / math.sqrt(base)
            elif mode == 3:
                for q in range(L):
                    base = k + coef * acc[q]
                    oc[q] = xc[q] / base
            else:
                for q in range(L):
                    base = k + coef * acc[q]
                    oc[q] = xc[q] * base ** (-beta)
