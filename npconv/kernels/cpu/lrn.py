"""Numba kernel for cross-channel local response normalisation (LRN).

``y[n, c, s] = x[n, c, s] / (k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} x[n, c', s]^2) ** beta``,
channels outside ``[0, C)`` counting as zero. The input is a C-contiguous ``(N, C, S)`` array (``S = H*W``).

The window sum is a running sum over the channels: moving from channel ``c-1`` to ``c`` adds the square of
channel ``c + (size-1)//2`` and removes the square of channel ``c - 1 - size//2``, so the cost is O(C) per pixel
whatever ``size`` is. The sums are kept in float64 for a block of pixels at a time (contiguous inner loops), and
the blocks of every image run in parallel (``prange``). Rounding left over by the subtraction is clamped at zero.
For a float32 output the power ``(k + alpha/size * sum) ** -beta`` is then taken in float32.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["lrn_across_channels"]

#: pixels per block: the float64 window sums of one block stay in L1
_BLOCK = 512


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
    nblk = (S + _BLOCK - 1) // _BLOCK
    for t in numba.prange(N * nblk):
        n = t // nblk
        s0 = (t % nblk) * _BLOCK
        L = min(s0 + _BLOCK, S) - s0
        acc = np.zeros(L, dtype=np.float64)
        # 1-D row views indexed from 0 by the bare loop variable: the loops vectorise (3-D indexing did not)
        # the window of channel 0: channels 0 .. after (those that exist)
        for c in range(min(after, C - 1) + 1):
            xa = x[n, c, s0:s0 + L]
            for q in range(L):
                v = np.float64(xa[q])
                acc[q] += v * v
        for c in range(C):
            if c > 0:
                a = c + after
                if a < C:
                    xa = x[n, a, s0:s0 + L]
                    for q in range(L):
                        v = np.float64(xa[q])
                        acc[q] += v * v
                r = c - 1 - before
                if r >= 0:
                    xr = x[n, r, s0:s0 + L]
                    for q in range(L):
                        v = np.float64(xr[q])
                        acc[q] -= v * v
            xc = x[n, c, s0:s0 + L]
            oc = out[n, c, s0:s0 + L]
            if single:
                # float32 output: the window sum stays float64, the power is taken in float32 (16 lanes; the
                # float64 square roots and division were most of the time: ZF norm1 b128 17 -> 13.5 ms)
                if mode == 1:
                    for q in range(L):
                        b32 = np.float32(k + coef * max(acc[q], 0.0))
                        inv = np.float32(1.0) / np.sqrt(b32)
                        oc[q] = xc[q] * (inv * np.sqrt(inv))
                elif mode == 2:
                    for q in range(L):
                        b32 = np.float32(k + coef * max(acc[q], 0.0))
                        oc[q] = xc[q] / np.sqrt(b32)
                elif mode == 3:
                    for q in range(L):
                        b32 = np.float32(k + coef * max(acc[q], 0.0))
                        oc[q] = xc[q] / b32
                else:
                    for q in range(L):
                        base = k + coef * max(acc[q], 0.0)
                        oc[q] = xc[q] * base ** (-beta)
            elif mode == 1:
                for q in range(L):
                    base = k + coef * max(acc[q], 0.0)
                    inv = 1.0 / math.sqrt(base)
                    oc[q] = xc[q] * (inv * math.sqrt(inv))
            elif mode == 2:
                for q in range(L):
                    base = k + coef * max(acc[q], 0.0)
                    oc[q] = xc[q] / math.sqrt(base)
            elif mode == 3:
                for q in range(L):
                    base = k + coef * max(acc[q], 0.0)
                    oc[q] = xc[q] / base
            else:
                for q in range(L):
                    base = k + coef * max(acc[q], 0.0)
                    oc[q] = xc[q] * base ** (-beta)
