"""Numba kernel of the factored conv layers: direct convolution on polyphase planes, built band by band.

Why not im2col here: a factored layer's convolutions have few taps per output channel (the monochromatic layer
has one X x Y single-channel filter per output channel, 4-24 filters per colour). An im2col matrix would be
X*Y/stride^2 times larger than the plane it comes from and would be read by only a handful of filters, so the
packing, not the arithmetic, would set the time. This kernel reads small input planes in place.

Layout. A strided convolution is made stride-free by splitting each zero-padded input plane into its
``Dh x Dw`` polyphase components ``Q[c, ph, pw, q, m] = xpad[c, q*Dh + ph, m*Dw + pw]``. Tap ``(c, x, y)`` of
output pixel ``(i, j)`` reads ``Q[c, x % Dh, y % Dw, i + x // Dh, j + y // Dw]``: with each component flattened,
output position ``v = i*Wq + j`` reads ``plane[v + off(c, x, y)]`` -- one contiguous stream per tap, whatever the
stride. Outputs are computed for all ``j < Wq`` (the ``Wq - Wo`` extra columns are discarded), so a band of rows
is one long vectorisable loop.

Work split. A job is (image, filter group, band of output rows). It builds, in a private cache-sized buffer, the
polyphase rows its band needs of the group's input planes -- each plane is either an input channel or, for the
monochromatic layer, a colour ``sum_c T[p, c] x[c]`` (the colour transform is fused here, so the C' colour
channels never exist as full images) -- then runs the group's filters over the band, 4 filters at a time: a
chunk of output positions is accumulated in a small buffer seven taps at a time (each input vector load feeds 4
filters, each accumulator load/store covers 7 taps), then written to the output rows with the bias.
"""
from __future__ import annotations

import numba
import numpy as np

from ._pack import split_row2
from .gemm import microkernel_taps4, microkernel_taps8, microkernel_taps12, prefetch_write

__all__ = ["fused_direct_conv", "fused_direct_conv_mk", "aligned_rows", "CHUNK"]

#: output positions per accumulation chunk (rounded down to whole rows of Wq; the 4 accumulator rows, 96 KiB in
#: float32, stay in L2). On ZF conv1 (monochromatic, C'=6) 6144 ran 8-10% faster than 2048 at batch 1, 16 and 128
#: (same-process A/B): fewer, longer sweeps and fewer bursts of output writes; 12288 was slower again.
CHUNK = 6144


@numba.njit(cache=True, fastmath=False, nogil=True)
def _gather_copy(dst, src, Dw, cnt):
    """dst[m] = src[m * Dw] for m < cnt, in blocks of 16 (a constant stride 2 measured slower: LLVM gathers)."""
    nb = cnt // 16
    for b in range(nb):
        s = src[16 * Dw * b:]
        d = dst[16 * b:]
        for m in range(16):
            d[m] = s[m * Dw]
    for m in range(16 * nb, cnt):
        dst[m] = src[m * Dw]


@numba.njit(cache=True, fastmath=False, nogil=True)
def _fill_band(x, n, c, i0, nq, pt, pl, Dh, Dw, buf):
    """Polyphase rows ``0 .. nq - 1`` of input channel ``c`` for the band starting at output row ``i0``.

    buf is (Dh, Dw, Hb, Wq) with Hb >= nq; rows and columns outside the image are zero.
    """
    H = x.shape[2]
    W = x.shape[3]
    Wq = buf.shape[3]
    for ph in range(Dh):
        for q in range(nq):
            r = (i0 + q) * Dh + ph - pt
            if Dw == 2 and 0 <= r < H:
                # both column phases from one read of the row (pw = pl % 2 takes the even input columns)
                split_row2(x[n, c, r], W, pl, buf[ph, pl % 2, q], buf[ph, 1 - pl % 2, q])
                continue
            for pw in range(Dw):
                dst = buf[ph, pw, q]
                if r < 0 or r >= H:
                    for m in range(Wq):
                        dst[m] = 0
                    continue
                # column m reads input column m*Dw + off: valid for m in [m_lo, m_hi)
                off = pw - pl
                m_lo = 0 if off >= 0 else (-off + Dw - 1) // Dw
                m_hi = min(Wq, (W - 1 - off) // Dw + 1) if W - 1 - off >= 0 else 0
                if m_lo > m_hi:
                    m_lo = m_hi
                for m in range(m_lo):
                    dst[m] = 0
                for m in range(m_hi, Wq):
                    dst[m] = 0
                # slices and non-negative range indices: no wrap-around checks in the copy loop
                _gather_copy(dst[m_lo:], x[n, c, r, m_lo * Dw + off:], Dw, m_hi - m_lo)


@numba.njit(cache=True, nogil=True)
def _band_job(job, nband, band, Ho, Hb):
    """Job ``job`` of the direct kernels: its image, first output row, rows, and the plane rows its band reads (all
    of them are filled)."""
    n = job // nband
    i0 = (job - n * nband) * band
    rows = min(band, Ho - i0)
    return n, i0, rows, rows + (Hb - band)


@numba.njit(cache=True, nogil=True)
def _band_buffers(x, n, i0, nq, pt, pl, Dh, Dw, Hb, Wq, has_T, slack):
    """A job's buffers: every input channel's polyphase rows for the band at output row ``i0`` (``_fill_band``),
    and room for one colour plane when ``has_T``; each with ``slack`` zeros past its end (the tap loads of the
    last positions run over)."""
    C = x.shape[1]
    plane = Dh * Dw * Hb * Wq
    xbuf = np.empty(C * plane + slack, x.dtype)
    for j in range(C * plane, C * plane + slack):
        xbuf[j] = 0
    for c in range(C):
        _fill_band(x, n, c, i0, nq, pt, pl, Dh, Dw, xbuf[c * plane:(c + 1) * plane].reshape(Dh, Dw, Hb, Wq))
    cbuf = np.empty(plane + slack if has_T else 1, x.dtype)
    if has_T:
        for j in range(plane, plane + slack):
            cbuf[j] = 0
    return xbuf, cbuf


@numba.njit(cache=True, nogil=True)
def _colour_plane(xbuf, T, p, C, plane, nphase, Hb, Wq, nq, cbuf):
    """cbuf = sum_c T[p, c] * (channel c's planes in xbuf) over the filled rows of each phase: the first 3 channels
    (an RGB layer's all) in one pass of contiguous loads, so that cbuf is written once, then one axpy a further
    channel. ZF conv1's monochromatic layer at batch 32 spent 7 of 32 ms on the planes with C' = 24 as one pass a
    channel; the one pass made the layer 1.04-1.07x faster at batch 128 for C' = 12 and 24 (1.01-1.03x for 4 and
    8), same process, alternating."""
    n = nq * Wq
    for ph in range(nphase):
        o = ph * Hb * Wq
        d = cbuf[o:o + n]
        s0 = xbuf[o:o + n]
        t0 = T[p, 0]
        if C == 1:
            for j in range(n):
                d[j] = t0 * s0[j]
        elif C == 2:
            s1 = xbuf[plane + o:plane + o + n]
            t1 = T[p, 1]
            for j in range(n):
                d[j] = t0 * s0[j] + t1 * s1[j]
        else:
            s1 = xbuf[plane + o:plane + o + n]
            s2 = xbuf[2 * plane + o:2 * plane + o + n]
            t1 = T[p, 1]
            t2 = T[p, 2]
            for j in range(n):
                d[j] = t0 * s0[j] + t1 * s1[j] + t2 * s2[j]
        for c in range(3, C):
            sc = xbuf[c * plane + o:c * plane + o + n]
            tc = T[p, c]
            for j in range(n):
                d[j] += tc * sc[j]


@numba.njit(cache=True, nogil=True)
def aligned_rows(nrows, ncols, dtype):
    """An uninitialised C-contiguous (nrows, >= ncols) array whose rows start on 64-byte boundaries: the row length
    is ``ncols`` rounded up to 64 bytes.

    Accumulator rows that are read and written in every pass of a kernel run markedly faster aligned (on the
    development machine, 72 -> 87 GMAC/s single-thread for the 7x7 filter pass): unaligned 512-bit accesses
    cross a cache line on every load and store.
    """
    item = np.empty(0, dtype).itemsize
    per = max(1, 64 // item)
    stride = (ncols + per - 1) // per * per
    buf = np.empty(nrows * stride + per, dtype)
    off = ((-buf.ctypes.data) % 64) // item
    return buf[off:off + nrows * stride].reshape(nrows, stride)


@numba.njit(cache=True, fastmath={"contract"}, nogil=True)
def _conv_pass(src, tapoff, Wt, f0, f1, f2, f3, L, acc, t, nt):
    """One pass over ``L`` output positions for taps ``t .. t + nt - 1`` (``nt <= 7``) of the 4 filters f0..f3:
    ``acc[k, :L] (+)= sum_tap Wt[f_k, tap] * src[tapoff[tap] + :L]``, initialising when ``t == 0``.

    Each multiply-add is contracted into an FMA in tap order (a chain per output, not a tree: 7 FMAs per
    filter and pass, not 11 operations).
    """
    A0 = acc[0]
    A1 = acc[1]
    A2 = acc[2]
    A3 = acc[3]
    if nt == 7:
        s0 = src[tapoff[t]:]
        s1 = src[tapoff[t + 1]:]
        s2 = src[tapoff[t + 2]:]
        s3 = src[tapoff[t + 3]:]
        s4 = src[tapoff[t + 4]:]
        s5 = src[tapoff[t + 5]:]
        s6 = src[tapoff[t + 6]:]
        a0 = Wt[f0, t]; a1 = Wt[f0, t + 1]; a2 = Wt[f0, t + 2]; a3 = Wt[f0, t + 3]      # noqa: E702
        a4 = Wt[f0, t + 4]; a5 = Wt[f0, t + 5]; a6 = Wt[f0, t + 6]                      # noqa: E702
        b0 = Wt[f1, t]; b1 = Wt[f1, t + 1]; b2 = Wt[f1, t + 2]; b3 = Wt[f1, t + 3]      # noqa: E702
        b4 = Wt[f1, t + 4]; b5 = Wt[f1, t + 5]; b6 = Wt[f1, t + 6]                      # noqa: E702
        c0 = Wt[f2, t]; c1 = Wt[f2, t + 1]; c2 = Wt[f2, t + 2]; c3 = Wt[f2, t + 3]      # noqa: E702
        c4 = Wt[f2, t + 4]; c5 = Wt[f2, t + 5]; c6 = Wt[f2, t + 6]                      # noqa: E702
        d0 = Wt[f3, t]; d1 = Wt[f3, t + 1]; d2 = Wt[f3, t + 2]; d3 = Wt[f3, t + 3]      # noqa: E702
        d4 = Wt[f3, t + 4]; d5 = Wt[f3, t + 5]; d6 = Wt[f3, t + 6]                      # noqa: E702
        if t == 0:
            for j in range(L):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]; u3 = s3[j]; u4 = s4[j]; u5 = s5[j]; u6 = s6[j]  # noqa: E702
                A0[j] = a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3 + a4 * u4 + a5 * u5 + a6 * u6
                A1[j] = b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3 + b4 * u4 + b5 * u5 + b6 * u6
                A2[j] = c0 * u0 + c1 * u1 + c2 * u2 + c3 * u3 + c4 * u4 + c5 * u5 + c6 * u6
                A3[j] = d0 * u0 + d1 * u1 + d2 * u2 + d3 * u3 + d4 * u4 + d5 * u5 + d6 * u6
        else:
            for j in range(L):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]; u3 = s3[j]; u4 = s4[j]; u5 = s5[j]; u6 = s6[j]  # noqa: E702
                A0[j] = A0[j] + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3 + a4 * u4 + a5 * u5 + a6 * u6
                A1[j] = A1[j] + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3 + b4 * u4 + b5 * u5 + b6 * u6
                A2[j] = A2[j] + c0 * u0 + c1 * u1 + c2 * u2 + c3 * u3 + c4 * u4 + c5 * u5 + c6 * u6
                A3[j] = A3[j] + d0 * u0 + d1 * u1 + d2 * u2 + d3 * u3 + d4 * u4 + d5 * u5 + d6 * u6
        return
    if t == 0:
        for j in range(L):
            A0[j] = 0
            A1[j] = 0
            A2[j] = 0
            A3[j] = 0
    for tap in range(t, t + nt):
        s0 = src[tapoff[tap]:]
        a0 = Wt[f0, tap]
        b0 = Wt[f1, tap]
        c0 = Wt[f2, tap]
        d0 = Wt[f3, tap]
        for j in range(L):
            u0 = s0[j]
            A0[j] += a0 * u0
            A1[j] += b0 * u0
            A2[j] += c0 * u0
            A3[j] += d0 * u0


@numba.njit(cache=True, nogil=True)
def _conv_block(src, tapoff, Wt, f0, f1, f2, f3, L, acc):
    """acc[k, :L] = sum_t Wt[f_k, t] * src[tapoff[t] + :L] for the 4 filters f0..f3: passes of 7 taps."""
    T = tapoff.shape[0]
    for t in range(0, T, 7):
        _conv_pass(src, tapoff, Wt, f0, f1, f2, f3, L, acc, t, min(7, T - t))


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def fused_direct_conv(x, T, has_T, grp_plane, Cg, grp_blk, blk_f, blk_nf, tapoff, Wt, bias, pt, pl, Dh, Dw,
                      band, Hb, Wq, out):
    """Grouped direct convolution of ``x`` (N, C, H, W) into ``out`` (N, F, Ho, Wo), bias included.

    Group ``g`` reads planes ``grp_plane[g] .. grp_plane[g] + Cg - 1`` of the input channels, or, when
    ``has_T``, the single colour plane ``sum_c T[grp_plane[g], c] x[c]`` (then ``Cg`` must be 1); it owns the
    filter blocks ``grp_blk[g] .. grp_blk[g + 1] - 1``, block ``b`` holding the filters ``blk_f[b, :blk_nf[b]]``
    (unused slots repeat the last id). ``tapoff`` (Tn,) gives, for each flattened tap (c, x, y), its offset in a
    buffer of ``Cg`` planes of shape (Dh, Dw, Hb, Wq); ``Wt`` (F, Tn) holds every filter's taps in that order.
    A job is one image and one band of ``band`` output rows (``Hb >= band + (X - 1) // Dh + 1``).
    """
    N = x.shape[0]
    C = x.shape[1]
    Ho = out.shape[2]
    Wo = out.shape[3]
    G = grp_plane.shape[0]
    nband = (Ho + band - 1) // band
    plane = Dh * Dw * Hb * Wq
    for job in numba.prange(N * nband):
        n, i0, rows, nq = _band_job(job, nband, band, Ho, Hb)
        xbuf, cbuf = _band_buffers(x, n, i0, nq, pt, pl, Dh, Dw, Hb, Wq, has_T, Wq)
        # chunks of whole rows (about CHUNK positions): the write-out is a plain copy of Wo columns per row
        crows = max(1, CHUNK // Wq)
        acc = aligned_rows(np.int64(4), crows * Wq, out.dtype)
        for g in range(G):
            if has_T:
                _colour_plane(xbuf, T, grp_plane[g], C, plane, Dh * Dw, Hb, Wq, nq, cbuf)
                src = cbuf
            else:
                src = xbuf[grp_plane[g] * plane:]
            for b in range(grp_blk[g], grp_blk[g + 1]):
                nb = blk_nf[b]
                f0 = blk_f[b, 0]
                f1 = blk_f[b, 1]
                f2 = blk_f[b, 2]
                f3 = blk_f[b, 3]
                for r0 in range(0, rows, crows):
                    nr = min(crows, rows - r0)
                    _conv_block(src[r0 * Wq:], tapoff, Wt, f0, f1, f2, f3, nr * Wq, acc)
                    for k in range(nb):
                        f = blk_f[b, k]
                        ak = acc[k]
                        bv = bias[f]
                        for r in range(nr):
                            # slices, so the copy indexes from 0 (no wrap-around checks): it vectorises
                            od = out[n, f, i0 + r0 + r]
                            sv = ak[r * Wq:]
                            for q in range(Wo):
                                od[q] = sv[q] + bv


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def fused_direct_conv_mk(x, T, has_T, grp_plane, Cg, grp_blk, blk_f, blk_nf, tapoff, wp, bias, pt, pl, Dh, Dw,
                         band, Hb, Wq, MR, NR, out):
    """:func:`fused_direct_conv` with the filters run by npconv's GEMM micro-kernel (``gemm.microkernel_taps*``,
    the tile of ``MR`` rows (12, 8 or 4) and ``NR`` columns): a block is ``MR`` filters (``blk_f`` (nblk, MR)),
    ``wp`` their taps packed k-major per block (flat: block ``b``, tap ``t``, row ``r`` at ``(b*Tn + t)*MR + r``;
    rows past the block's filters zero). For a band, the block's outputs over ``NR`` consecutive plane positions are one
    register tile whose ``Tn`` reduction steps read the taps' shifted views of the plane (``tapoff``); the block's
    tiles fill a staging buffer for the band, written out row by row with the bias (positions past ``Wo`` in each
    plane row are dropped). Each tile first prefetches, for writing, the output lines its positions are copied to."""
    N = x.shape[0]
    Ho = out.shape[2]
    Wo = out.shape[3]
    G = grp_plane.shape[0]
    Tn = tapoff.shape[0]
    nband = (Ho + band - 1) // band
    plane = Dh * Dw * Hb * Wq
    F = out.shape[1]
    oflat = out.reshape(-1)
    last = oflat.shape[0] - 1
    line = 64 // out.itemsize
    for job in numba.prange(N * nband):
        n, i0, rows, nq = _band_job(job, nband, band, Ho, Hb)
        xbuf, cbuf = _band_buffers(x, n, i0, nq, pt, pl, Dh, Dw, Hb, Wq, has_T, Wq + NR)
        L = rows * Wq
        Lp = (L + NR - 1) // NR * NR
        # the block's outputs over the whole band, then written out row by row per filter: tiles stored straight
        # into the output would scatter short runs over MR output planes (measured 3x slower on ZF conv1)
        stg = np.empty(MR * Lp, out.dtype)
        for g in range(G):
            if has_T:
                _colour_plane(xbuf, T, grp_plane[g], x.shape[1], plane, Dh * Dw, Hb, Wq, nq, cbuf)
                src = cbuf
                soff = 0
            else:
                src = xbuf
                soff = grp_plane[g] * plane
            for b in range(grp_blk[g], grp_blk[g + 1]):
                for p0 in range(0, L, NR):
                    # the output lines that this tile's positions are copied to (below), fetched for writing while
                    # the tiles run: the copy's stores then find them in the cache instead of each waiting for a
                    # line from memory (ZF conv1 at batch 128: monochromatic 1.16x, dense 1.05x faster)
                    r0 = p0 // Wq
                    q0 = min(p0 - r0 * Wq, Wo - 1)
                    for k in range(blk_nf[b]):
                        d = ((n * F + blk_f[b, k]) * Ho + i0 + r0) * Wo + q0
                        prefetch_write(oflat, d)
                        prefetch_write(oflat, min(d + line, last))
                        if NR > 2 * line:     # the 8- and 4-row tiles' 3 vectors
                            prefetch_write(oflat, min(d + 2 * line, last))
                        prefetch_write(oflat, min(d + NR - 1, last))
                    if MR == 12:
                        microkernel_taps12(wp, b * Tn * MR, src, soff + p0, tapoff, stg, p0, Lp, Tn, 0, bias, 0)
                    elif MR == 8:
                        microkernel_taps8(wp, b * Tn * MR, src, soff + p0, tapoff, stg, p0, Lp, Tn, 0, bias, 0)
                    else:
                        microkernel_taps4(wp, b * Tn * MR, src, soff + p0, tapoff, stg, p0, Lp, Tn, 0, bias, 0)
                for k in range(blk_nf[b]):
                    f = blk_f[b, k]
                    bv = bias[f]
                    for r in range(rows):
                        od = out[n, f, i0 + r]
                        sv = stg[k * Lp + r * Wq:]
                        for q in range(Wo):
                            od[q] = sv[q] + bv
