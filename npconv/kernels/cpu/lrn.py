"""Numba kernel for cross-channel local response normalisation (LRN).

``y[n, c, s] = x[n, c, s] / (k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} x[n, c', s]^2) ** beta``,
channels outside ``[0, C)`` counting as zero. The input is a C-contiguous ``(N, C, S)`` array (``S = H*W``).

Fast path: the window sum is a running sum over the channels. Moving from channel ``c-1`` to ``c`` adds the square
of channel ``c + (size-1)//2`` and removes the square of channel ``c - 1 - size//2``, so the cost is O(C) per pixel
whatever ``size`` is. The sums are float64, for a block of pixels at a time (contiguous inner loops), and the
blocks of every image run in parallel (``prange``). For a float32 output the power ``(k + alpha/size * sum) **
-beta`` is then taken in float32.

A running sum cannot forget: one NaN or infinity that enters it spoils every later channel of the pixel, and the
rounding left by a square much larger than the rest spoils the small sums after it. So each block is checked at
its end. The check finds a non-finite final sum, or a rounding bound ``C * 2^-52 * alpha/size * peak`` (``peak``
the largest window sum seen) that is not small against ``k``. A block that fails it is computed again the exact way
(:func:`_block_direct`): each window's sum is added afresh from the channels' squares, ``min(size, C)`` additions
per output. Ordinary activations never fail it: with AlexNet's settings (``alpha/size = 2e-5``, ``k = 2``) and
96 channels, window sums up to 6.8e7 pass.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["lrn_across_channels"]

#: pixels per block: the float64 window sums of one block stay in L1
_BLOCK = 512
#: bytes of the exact path's float64 squares (all channels of a sub-block of pixels; L2)
_SQ_BYTES = 256 * 1024
#: the fast path's result stands when ``C * alpha/size * peak <= _ROUNDING_SLACK * k``: its rounding, about
#: ``C * 2^-52`` of ``alpha/size * peak``, is then below 2^-36 of the denominator
_ROUNDING_SLACK = 65536.0


# error_model="numpy" as in the prange kernel: no zero-division checks, which would keep the loops from vectorising
@numba.njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def _normalise(xc, oc, acc, L, k, coef, beta, mode, single, pk):
    """``oc[q] = xc[q] * (k + coef * acc[q]) ** -beta`` for ``q < L`` (``mode``: 1 beta 0.75, 2 beta 0.5, 3 beta 1,
    0 any), and ``pk[q] = max(pk[q], acc[q])``."""
    if single:
        # float32 output: the window sum stays float64, the power is taken in float32 (16 lanes; the float64
        # square roots and division were most of the time: ZF norm1 b128 17 -> 13.5 ms)
        if mode == 1:
            for q in range(L):
                pk[q] = max(pk[q], acc[q])
                b32 = np.float32(k + coef * acc[q])
                inv = np.float32(1.0) / np.sqrt(b32)
                oc[q] = xc[q] * (inv * np.sqrt(inv))
        elif mode == 2:
            for q in range(L):
                pk[q] = max(pk[q], acc[q])
                b32 = np.float32(k + coef * acc[q])
                oc[q] = xc[q] / np.sqrt(b32)
        elif mode == 3:
            for q in range(L):
                pk[q] = max(pk[q], acc[q])
                b32 = np.float32(k + coef * acc[q])
                oc[q] = xc[q] / b32
        else:
            for q in range(L):
                pk[q] = max(pk[q], acc[q])
                base = k + coef * acc[q]
                oc[q] = xc[q] * base ** (-beta)
    elif mode == 1:
        for q in range(L):
            pk[q] = max(pk[q], acc[q])
            base = k + coef * acc[q]
            inv = 1.0 / math.sqrt(base)
            oc[q] = xc[q] * (inv * math.sqrt(inv))
    elif mode == 2:
        for q in range(L):
            pk[q] = max(pk[q], acc[q])
            base = k + coef * acc[q]
            oc[q] = xc[q] / math.sqrt(base)
    elif mode == 3:
        for q in range(L):
            pk[q] = max(pk[q], acc[q])
            base = k + coef * acc[q]
            oc[q] = xc[q] / base
    else:
        for q in range(L):
            pk[q] = max(pk[q], acc[q])
            base = k + coef * acc[q]
            oc[q] = xc[q] * base ** (-beta)


@numba.njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def _block_direct(x, n, s0, L, before, after, k, coef, beta, mode, single, out):
    """Pixels ``s0 .. s0 + L - 1`` of image ``n`` the exact way: every channel's square once (float64), then each
    window's sum added afresh from them (a NaN, an infinity or a very large channel affects only the windows that
    hold it), in sub-blocks whose squares stay within ``_SQ_BYTES``."""
    C = x.shape[1]
    sub = max(16, _SQ_BYTES // (8 * max(C, 1)) // 16 * 16)
    for a0 in range(s0, s0 + L, sub):
        Ls = min(sub, s0 + L - a0)
        sq = np.empty((C, Ls), dtype=np.float64)
        for j in range(C):
            xa = x[n, j, a0:a0 + Ls]
            row = sq[j]
            for q in range(Ls):
                v = np.float64(xa[q])
                row[q] = v * v
        acc = np.empty(Ls, dtype=np.float64)
        pk = np.zeros(Ls, dtype=np.float64)
        for c in range(C):
            lo = max(0, c - before)
            hi = min(C - 1, c + after)
            s_lo = sq[lo]
            for q in range(Ls):
                acc[q] = s_lo[q]
            for r in range(lo + 1, hi + 1):
                s_r = sq[r]
                for q in range(Ls):
                    acc[q] += s_r[q]
            _normalise(x[n, c, a0:a0 + Ls], out[n, c, a0:a0 + Ls], acc, Ls, k, coef, beta, mode, single, pk)


@numba.njit(cache=True, fastmath=False, parallel=True)
def lrn_across_channels(x, size, alpha, beta, k, out):
    """LRN of a C-contiguous ``x`` (N, C, S) across its channel axis, written to ``out`` (same shape and dtype,
    allocated by the caller)."""
    N, C, S = x.shape
    before = size // 2          # channels below c in the window
    after = (size - 1) // 2     # channels above c in the window
    coef = alpha / size
    # 0: general pow, 1: beta == 0.75 (AlexNet/Caffe default), 2: beta == 0.5, 3: beta == 1
    mode = np.int64(0)
    if beta == 0.75:
        mode = np.int64(1)
    elif beta == 0.5:
        mode = np.int64(2)
    elif beta == 1.0:
        mode = np.int64(3)
    single = out.itemsize == 4
    nblk = (S + _BLOCK - 1) // _BLOCK
    for t in numba.prange(N * nblk):
        n = t // nblk
        s0 = (t % nblk) * _BLOCK
        L = min(s0 + _BLOCK, S) - s0
        acc = np.zeros(L, dtype=np.float64)
        pk = np.zeros(L, dtype=np.float64)
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
            _normalise(x[n, c, s0:s0 + L], out[n, c, s0:s0 + L], acc, L, k, coef, beta, mode, single, pk)
        # the check (module docstring): a non-finite value entered the running sum (it stays non-finite), or its
        # rounding may not be small against k
        redo = False
        for q in range(L):
            if not (acc[q] - acc[q] == 0.0) or C * coef * pk[q] > _ROUNDING_SLACK * k:
                redo = True
        if redo:
            _block_direct(x, n, s0, L, before, after, k, coef, beta, mode, single, out)
