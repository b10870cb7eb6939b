"""Numba kernels for 2-D max and average pooling.

The input is a C-contiguous array of planes ``(P, H, W)`` (an NCHW batch viewed as ``P = N*C`` planes); the
planes are processed in parallel (``prange``). The geometry (kernel, stride, padding, output size) arrives already
validated from :mod:`npconv.functional.pooling`, which also allocates the output (NumPy, not numba, so that a
large output gets NumPy's transparent-huge-page advice: 4 KiB page faults on a fresh 140 MiB output cost tens of
milliseconds on a virtual machine); the padding is never materialised: every window is clipped to
the real input, which is the same as padding with ``-inf`` (max) or ``0`` (average).
"""
from __future__ import annotations

import contextlib

import numba
import numpy as np

__all__ = ["max_pool2d_planes", "avg_pool2d_planes", "serial_if_small", "SMALL_WORK"]

#: below this many input elements a kernel call runs on one thread: starting a parallel region costs more
#: (tens of microseconds idle, milliseconds when the cores are oversubscribed) than the work itself
SMALL_WORK = 1 << 15


@contextlib.contextmanager
def serial_if_small(n_elements):
    """Run the enclosed numba call on one thread when ``n_elements`` < ``SMALL_WORK``.

    Only the calling thread's numba setting changes (``numba.set_num_threads`` is thread-local), and it is
    restored on exit, so the user's thread count still governs every call large enough to be parallel.
    """
    if n_elements >= SMALL_WORK:
        yield
        return
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(prev)


@numba.njit(cache=True, nogil=True, inline="always")
def _max_nan(v, m):
    """max(v, m) where a NaN in either wins (PyTorch's max pooling); written as a select so loops vectorise."""
    c = (v > m) | (v != v)
    return v if c else m


@numba.njit(cache=True, fastmath=False, parallel=True)
def max_pool2d_planes(x, kh, kw, sh, sw, ph, pw, oh, ow, relu, out):
    """Max over each window of the planes ``x`` (P, H, W), written to ``out`` (P, oh, ow) of the same dtype;
    with ``relu``, ``max(., 0)`` of it (the pooling of ReLU(x): max commutes with the monotone ReLU).

    Windows start at ``(i*sh - ph, j*sw - pw)``; the part outside the input counts as ``-inf``. A NaN in a
    window makes that output NaN (as in PyTorch). Separable: for each output row, the column maxima over the
    window's rows go to a row buffer (a contiguous, vectorisable loop over 1-D row views); then the maxima of all
    ``kw``-wide windows of that buffer are taken in ``kw`` contiguous sweeps, and the outputs whose window lies
    inside the row pick every ``sw``-th of them (the earlier per-tap sweeps with stride ``sw`` did not vectorise:
    ZF pool1 at batch 128 went from 37.7 to 24.5-25 ms); the few border outputs clip their window. 3-wide windows
    at stride 2 split the buffer into its even and odd columns instead, so every output is one contiguous
    three-way maximum (ZF pool1: 24.5 -> 17.6 ms, pool2: 7.5 -> 6.2 ms).
    """
    P, H, W = x.shape
    # output columns [j_lo, j_hi) have their whole window inside [0, W)
    j_lo = min(ow, (pw + sw - 1) // sw)
    j_hi = max(j_lo, min(ow, (W - kw + pw) // sw + 1))
    for p in numba.prange(P):
        buf = np.empty(W, dtype=x.dtype)
        hmax = np.empty(W, dtype=x.dtype)
        ev = np.empty(W // 2 + 2, dtype=x.dtype)
        od = np.empty(W // 2 + 2, dtype=x.dtype)
        xp = x[p]
        op = out[p]
        for i in range(oh):
            h0 = i * sh - ph
            hs = max(h0, 0)
            he = min(h0 + kh, H)
            if he <= hs:  # cannot happen with validated geometry; keeps the kernel safe on its own
                for w in range(W):
                    buf[w] = -np.inf
            elif he - hs == 1:
                r0 = xp[hs]
                for w in range(W):
                    buf[w] = r0[w]
            else:       # the first two rows in one sweep
                r0 = xp[hs]
                r1 = xp[hs + 1]
                for w in range(W):
                    buf[w] = _max_nan(r1[w], r0[w])
            for h in range(hs + 2, he):
                r = xp[h]
                for w in range(W):
                    buf[w] = _max_nan(r[w], buf[w])
            orow = op[i]
            base = j_lo * sw - pw
            if j_hi > j_lo and sw == 2 and kw == 3:
                # 3-wide windows at stride 2 (AlexNet/ZF pooling): split the row buffer into its even and odd
                # columns (a full stride-2 interleave group, which vectorises with shuffles), then every output
                # is max(even[j], odd[j], even[j + 1]) -- contiguous
                n = j_hi - j_lo
                hb = buf[base:]
                for m in range(n):
                    ev[m] = hb[2 * m]
                    od[m] = hb[2 * m + 1]
                ev[n] = hb[2 * n]
                ov = orow[j_lo:]
                e1 = ev[1:]
                for m in range(n):
                    ov[m] = _max_nan(e1[m], _max_nan(od[m], ev[m]))
            elif j_hi > j_lo:
                # the maxima of every kw-wide window of the row buffer (contiguous sweeps that vectorise), then
                # the outputs pick every sw-th one
                nwin = (j_hi - 1 - j_lo) * sw + 1
                hb = buf[base:]
                if kw == 1:
                    for w in range(nwin):
                        hmax[w] = hb[w]
                else:
                    h1 = hb[1:]
                    for w in range(nwin):
                        hmax[w] = _max_nan(h1[w], hb[w])
                for k in range(2, kw):
                    hk = hb[k:]
                    for w in range(nwin):
                        hmax[w] = _max_nan(hk[w], hmax[w])
                for j in range(j_lo, j_hi):
                    orow[j] = hmax[(j - j_lo) * sw]
            for jj in range(j_lo + ow - j_hi):  # the border outputs: [0, j_lo) and [j_hi, ow)
                j = jj if jj < j_lo else jj - j_lo + j_hi
                w0 = j * sw - pw
                m = -np.inf
                for w in range(max(w0, 0), min(w0 + kw, W)):
                    m = _max_nan(buf[w], m)
                orow[j] = m
            if relu:
                zero = orow.dtype.type(0)
                for j in range(ow):
                    orow[j] = _max_nan(orow[j], zero)


@numba.njit(cache=True, fastmath=False, parallel=True)
def avg_pool2d_planes(x, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad, out):
    """Mean over each window of the planes ``x`` (P, H, W), written to ``out`` (P, oh, ow) of the same dtype
    (float64 accumulation).

    The divisor is the window clipped to the padded input ``[-ph, H+ph) x [-pw, W+pw)`` when
    ``count_include_pad`` is true, else the window clipped to the real input ``[0, H) x [0, W)``.
    Separable like :func:`max_pool2d_planes`: column sums over the window's rows, then row sums.
    """
    P, H, W = x.shape
    for p in numba.prange(P):
        buf = np.empty(W, dtype=np.float64)
        for i in range(oh):
            h0 = i * sh - ph
            hs = max(h0, 0)
            he = min(h0 + kh, H)
            if count_include_pad:
                hn = min(h0 + kh, H + ph) - h0
            else:
                hn = he - hs
            for w in range(W):
                buf[w] = 0.0
            for h in range(hs, he):
                for w in range(W):
                    buf[w] += x[p, h, w]
            for j in range(ow):
                w0 = j * sw - pw
                ws = max(w0, 0)
                we = min(w0 + kw, W)
                if count_include_pad:
                    wn = min(w0 + kw, W + pw) - w0
                else:
                    wn = we - ws
                acc = 0.0
                for w in range(ws, we):
                    acc += buf[w]
                out[p, i, j] = acc / (hn * wn)
