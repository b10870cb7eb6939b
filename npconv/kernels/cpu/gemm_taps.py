"""An implicit GEMM: a strided convolution's filters as the rows of ``A``, its taps read in place from phase-split
planes (no patch matrix), on npconv's micro-kernel (``gemm.microkernel_taps12`` and its partial row blocks).

Layout. Each image's input is a set of phase-split planes (as ``bicluster.pack_phase`` or the SVD form's
reduction writes them): a row of ``Mq`` values per plane row, so that output position ``(oy, ox)`` of tap ``k``
reads ``b[i*bimg + oy*Mq + ox + koff[k]]``, whatever the stride. The product runs over padded positions
``q = oy*Mq + ox`` (``ox < Mq``), ``OH*Mq`` of them per image in panels of ``NR``; the columns ``ox >= OW`` are
computed and dropped (``Mq - OW`` of each ``Mq``: ZF conv2's 5 x 5 / 2 on a 55 x 55 map, 26 of 28), and so are the
positions past the image's last row. A tile runs into a scratch tile and its valid positions are copied into
``c`` in runs of at most ``OW`` values, compact: ``c[r*ldc + i*cimg + oy*OW + ox]``.

Why: the patch matrix of such a conv (``K`` = channels x taps rows, ``OH*OW`` columns an image) is written once and
read once per product, ``K/stride^2`` times the size of the planes it is made of; here the planes stay in the
caches while every row block runs over them.

:func:`gemm_taps_phase` is the product that makes such planes: a 1x1 product (the SVD form's reduction of a
group's input channels, read in place from the layer's input through row offsets) whose tiles are stored split by
the stride phases, so that no packed, phase-split copy of the input is made.
"""
from __future__ import annotations

import numba
import numpy as np

from .gemm import TAPS1_BYTES, microkernel_taps1, microkernel_taps12, microkernel_taps_rows4, microkernel_taps_rows8
from .gemm import prefetch_run
from ._pack import deinterleave2

__all__ = ["gemm_taps_images", "gemm_taps_phase", "taps_panel", "phase_panel", "zero_phase_borders", "zero_borders",
           "taps_rows"]


@numba.njit(cache=True, nogil=True, inline="always")
def taps_rows(coef, src, sbase, offs, T, dst, dbase, OH, OW, Ms, tmp, slack):
    """A depthwise pass's rows, compacted: ``dst[dbase + oi*OW + e] = sum_{t < T} coef[t] * src[sbase + offs[t] +
    oi*Ms + e]`` for ``oi < OH``, ``e < OW`` (source rows ``Ms`` apart, output rows ``OW`` apart), in runs of
    ``RUN = gemm.TAPS1_BYTES / itemsize`` values on the one-row tile (``gemm.microkernel_taps1``).

    A run stores all ``RUN`` values, past its row's end into the next rows, which the next runs then overwrite; a run
    that would pass the ``OH*OW`` values goes through ``tmp`` (``RUN`` values) and only its part is copied. Against
    the pass over whole source rows followed by a copy of each row's first ``OW`` values, this writes each output
    once, from registers: the CP front end's vertical pass and copy into Z (ZF conv2, 26 x 26 outputs from rows of
    32) went 287 -> 167 ns a component. The source is read up to ``RUN`` values past a row's ``OW`` (those values
    land in overwritten or dropped outputs only): the caller keeps them readable.

    With ``slack``, ``dst`` is writable for ``RUN`` values past the ``OH*OW`` (values nobody reads, or that are
    written later): the last run stores straight, without ``tmp`` and the copy. Inlined at its call sites: a call
    of it had cost more than the copy (ZF conv2 rows, 13 of 26 outputs from rows of 32, one thread: 150 ns a call,
    123 inlined, 91 without the copy either)."""
    RUN = TAPS1_BYTES // dst.itemsize
    P = OH * OW
    for oi in range(OH):
        for c0 in range(0, OW, RUN):
            s0 = sbase + oi * Ms + c0
            if slack or oi * OW + c0 + RUN <= P:
                microkernel_taps1(coef, 0, src, s0, offs, dst, dbase + oi * OW + c0, 0, T, 0, coef, 0)
            else:
                microkernel_taps1(coef, 0, src, s0, offs, tmp, 0, 0, T, 0, coef, 0)
                d = dst[dbase + oi * OW + c0:]
                for e in range(min(RUN, OW - c0)):
                    d[e] = tmp[e]


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_taps_images(ap, M, K, MR, NR, b, bimg, koff, Mq, OH, OW, nimg, c, ldc, cimg, mgroups):
    """``c[r*ldc + i*cimg + oy*OW + ox] = sum_k A[r, k] * b[i*bimg + oy*Mq + ox + koff[k]]`` for ``r < M``,
    ``oy < OH``, ``ox < OW``, ``i < nimg`` (module docstring); ``ap`` is ``A`` (M, K) packed by ``gemm.pack_a`` for
    the 12-row tile (``MR`` = 12, ``NR`` its two vectors). A job is (image, panel of ``NR`` padded positions, group
    of row blocks; ``mgroups`` groups); a partial last row block runs the 8- or 4-row tile when it fits. ``b`` must
    be readable up to ``(nimg - 1)*bimg + ceil(OH*Mq / NR)*NR + max(koff)``."""
    Lq = OH * Mq
    nblk = (M + MR - 1) // MR
    npan = (Lq + NR - 1) // NR
    for job in numba.prange(nimg * npan * mgroups):
        i, q0, ib0, ib1 = _job(job, mgroups, npan, nblk, NR)
        taps_panel(ap, M, K, MR, NR, b, i * bimg, koff, Mq, OH, OW, q0, ib0, ib1, c, ldc, i * cimg,
                   np.empty(MR * NR, c.dtype))


@numba.njit(cache=True, nogil=True)
def taps_panel(ap, M, K, MR, NR, b, bbase, koff, Mq, OH, OW, q0, ib0, ib1, c, ldc, cbase, scratch):
    """One panel of :func:`gemm_taps_images` for one image: padded positions ``q0 .. q0 + NR - 1``, row blocks
    ``ib0 .. ib1 - 1``, the image's input from ``b[bbase:]``, its output at ``c[r*ldc + cbase + ...]``; ``scratch``
    (``MR * NR`` values) the tile."""
    Lq = OH * Mq
    # the panel's output rows: oy from q0 // Mq, each a run of columns [ox0, ox1) of padded positions
    oy_first = q0 // Mq
    oy_last = min(OH - 1, (min(q0 + NR, Lq) - 1) // Mq)
    for ib in range(ib0, ib1):
        rows = min(MR, M - ib * MR)
        _tile(ap, ib * K * MR, rows, MR, b, bbase + q0, koff, K, scratch)
        for oy in range(oy_first, oy_last + 1):
            e0 = max(q0, oy * Mq) - q0
            e1 = min(q0 + NR, oy * Mq + OW) - q0
            if e1 <= e0:
                continue
            dbase = cbase + oy * OW + (q0 + e0 - oy * Mq)
            for r in range(rows):
                d = c[(ib * MR + r) * ldc + dbase:]
                src = scratch[r * NR + e0:]
                for e in range(e1 - e0):
                    d[e] = src[e]


@numba.njit(cache=True, nogil=True)
def _job(job, mgroups, npan, nblk, NR):
    """Job ``job`` of the implicit GEMMs: its image, its panel's first position and its row blocks ``ib0 .. ib1 - 1``
    (``nblk`` row blocks in ``mgroups`` groups; a panel's groups are consecutive jobs)."""
    g = job % mgroups
    t = job // mgroups
    i = t // npan
    bper = (nblk + mgroups - 1) // mgroups
    ib0 = g * bper
    return i, (t - i * npan) * NR, ib0, min(nblk, ib0 + bper)


@numba.njit(cache=True, nogil=True)
def _tile(ap, aoff, rows, MR, b, boff, koff, K, scratch):
    """One tile of ``rows`` rows (the 12-row tile, or the 8- or 4-row one for a partial block) into ``scratch``."""
    if rows <= 4 < MR:
        microkernel_taps_rows4(ap, aoff, b, boff, koff, scratch, 0, scratch.shape[0] // MR, K, 0, scratch, 0)
    elif rows <= 8 < MR:
        microkernel_taps_rows8(ap, aoff, b, boff, koff, scratch, 0, scratch.shape[0] // MR, K, 0, scratch, 0)
    else:
        microkernel_taps12(ap, aoff, b, boff, koff, scratch, 0, scratch.shape[0] // MR, K, 0, scratch, 0)


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_taps_phase(ap, M, K, MR, NR, b, bimg, koff, H, W, nimg, z, zrow, zimg, sh, sw, R, Mz, pt, pl, mgroups,
                    pfb):
    """A 1x1 product over each image's ``H x W`` positions, stored split by the stride phases of a later strided
    conv: ``z[r*zrow + i*zimg + ((ph*sw + pw)*R + yr)*Mz + xc] = sum_k A[r, k] * b[i*bimg + y*W + x + koff[k]]``
    with ``y + pt = yr*sh + ph``, ``x + pl = xc*sw + pw``, for ``r < M``, ``y < H``, ``x < W``, ``i < nimg``. ``koff``
    gives each of the K input rows' offsets (the SVD form's reduction: a group's input channels, read in place from
    the layer's input); ``ap`` as in :func:`gemm_taps_images`. Input positions past the planes (``yr >= R`` or
    ``xc >= Mz``: rows and columns the strided conv never reads) are computed and not stored. The planes' borders
    (padding) are not written (:func:`zero_phase_borders`). The last panel of an image, which would read past its
    plane (past ``b``'s end for the last one), runs on a copy of its valid columns. ``pfb`` > 0: each row block's
    turn fetches its share of the K rows of the panel ``pfb`` on (``gemm.PREFETCH_PANELS``)."""
    Lq = H * W
    nblk = (M + MR - 1) // MR
    npan = (Lq + NR - 1) // NR
    for job in numba.prange(nimg * npan * mgroups):
        i, q0, ib0, ib1 = _job(job, mgroups, npan, nblk, NR)
        phase_panel(ap, M, K, MR, NR, b, i * bimg, koff, H, W, q0, ib0, ib1, z, zrow, i * zimg, sh, sw, R, Mz, pt,
                    pl, pfb, np.empty(MR * NR, z.dtype))


@numba.njit(cache=True, nogil=True)
def phase_panel(ap, M, K, MR, NR, b, bbase, koff, H, W, q0, ib0, ib1, z, zrow, zbase, sh, sw, R, Mz, pt, pl, pfb,
                scratch):
    """One panel of :func:`gemm_taps_phase` for one image: input positions ``q0 .. q0 + NR - 1``, row blocks
    ``ib0 .. ib1 - 1``, the image's input rows at ``b[bbase + koff[k]:]``, its planes at ``z[r*zrow + zbase:]``;
    ``scratch`` (``MR * NR`` values) the tile."""
    Lq = H * W
    cols = min(NR, Lq - q0)
    # the tiles' B: the input in place, or for the image's last panel a copy of its valid columns, zeros after them
    bt = b
    kt = koff
    tb = bbase + q0
    if cols < NR:
        bt = np.zeros(K * NR, b.dtype)
        kt = np.empty(K, np.int64)
        tb = np.int64(0)
        for k in range(K):
            kt[k] = k * NR
            src = b[bbase + q0 + koff[k]:]
            dst = bt[k * NR:]
            for e in range(cols):
                dst[e] = src[e]
    nbb = ib1 - ib0
    for ib in range(ib0, ib1):
        rows = min(MR, M - ib * MR)
        if pfb > 0 and q0 + pfb * NR < Lq:
            ii = ib - ib0
            for k in range(K * ii // nbb, K * (ii + 1) // nbb):
                prefetch_run(b, bbase + q0 + pfb * NR + koff[k], NR)
        _tile(ap, ib * K * MR, rows, MR, bt, tb, kt, K, scratch)
        # the panel's positions row by row, each row's run split by the column phases
        for y in range(q0 // W, (q0 + cols - 1) // W + 1):
            xa = max(q0, y * W) - y * W
            xb = min(q0 + cols, (y + 1) * W) - y * W
            yp = y + pt
            ph = yp % sh
            yr = yp // sh
            xb = min(xb, Mz * sw - pl)      # input columns past the planes are never read: not stored
            if yr >= R:
                continue
            if sw == 2:
                _split_run2(scratch, y * W + xa - q0, NR, rows, z, (ib * MR) * zrow, zrow,
                            zbase + (ph * 2 * R + yr) * Mz, R * Mz, xa + pl, xb - xa)
                continue
            for pw in range(sw):
                xf = xa + (pw - (xa + pl)) % sw
                if xf >= xb:
                    continue
                cnt = (xb - xf + sw - 1) // sw
                dbase = zbase + ((ph * sw + pw) * R + yr) * Mz + (xf + pl) // sw
                sbase = y * W + xf - q0
                for r in range(rows):
                    d = z[(ib * MR + r) * zrow + dbase:]
                    sv = scratch[r * NR + sbase:]
                    if sw == 1:
                        for e in range(cnt):     # a contiguous run: vectorised
                            d[e] = sv[e]
                    else:
                        for e in range(cnt):
                            d[e] = sv[e * sw]


@numba.njit(cache=True, nogil=True, inline="always")
def _split_run2(tile, s0, NR, rows, z, z0, zrow, pbase, pstride, c0, n):
    """:func:`phase_panel`'s store of one run at stride 2: tile columns ``s0 .. s0 + n - 1`` of each of ``rows`` tile
    rows (``NR`` apart) are padded input columns ``c0 .. c0 + n - 1`` of one row; column ``c`` goes to column ``c // 2``
    of phase plane ``c % 2`` (planes ``pstride`` apart from ``z[z0 + pbase:]``, tile row ``r`` at ``r * zrow``). Both
    phases in one pass, a vector of each at a time (``_pack.deinterleave2``: masked loads, two shuffles, masked
    stores), instead of a strided scalar loop per phase: the fused SVD layer's reductions, ZF conv2 at batch 1,
    0.14 ms before (0.06 of it these stores)."""
    VW = 64 // z.itemsize
    pa = c0 % 2
    na = (n + 1) // 2                # columns c0, c0 + 2, ...: phase pa
    nb = n // 2                      # columns c0 + 1, c0 + 3, ...: the other phase
    da = z0 + pbase + pa * pstride + c0 // 2
    db = z0 + pbase + (1 - pa) * pstride + (c0 + 1) // 2
    for r in range(rows):
        so = r * NR + s0
        zo = r * zrow
        for e0 in range(0, na, VW):
            ka = min(VW, na - e0)
            kb = max(0, min(VW, nb - e0))
            deinterleave2(tile, so + 2 * e0, z, da + zo + e0, ka, ka, z, db + zo + e0, kb, kb)


@numba.njit(parallel=True, cache=True, nogil=True)
def zero_phase_borders(z, nplanes, sh, sw, R, Mz, H, W, pt, pl):
    """Zeros in the positions of phase-split planes that no input position ``y < H``, ``x < W`` maps to (the
    padding, and the rounding of the planes' size): ``z`` holds ``nplanes`` blocks of ``sh*sw`` planes of
    ``R x Mz`` values, position ``(yr, xc)`` of phase ``(ph, pw)`` standing for input position
    ``(yr*sh + ph - pt, xc*sw + pw - pl)``."""
    for job in numba.prange(nplanes * sh * sw):
        _zero_plane_borders(z, job, sh, sw, R, Mz, H, W, pt, pl)


@numba.njit(cache=True, nogil=True)
def zero_borders(z, nplanes, sh, sw, R, Mz, H, W, pt, pl):
    """:func:`zero_phase_borders` in the calling thread (the fused SVD layer's band planes, ``svd_fused.py``), each
    phase's bounds worked out once for all the blocks."""
    for ph in range(sh):
        r_lo, r_hi = _bounds(R, H, pt, ph, sh)
        for pw in range(sw):
            c_lo, c_hi = _bounds(Mz, W, pl, pw, sw)
            for blk in range(nplanes):
                _zero_plane(z, (blk * sh * sw + ph * sw + pw) * R * Mz, R, Mz, r_lo, r_hi, c_lo, c_hi)


@numba.njit(cache=True, nogil=True)
def _zero_plane_borders(z, job, sh, sw, R, Mz, H, W, pt, pl):
    """Plane ``job`` (block ``job // (sh*sw)``, phase ``(job // sw) % sh, job % sw``) of :func:`zero_phase_borders`."""
    ph = (job // sw) % sh
    pw = job % sw
    r_lo, r_hi = _bounds(R, H, pt, ph, sh)
    c_lo, c_hi = _bounds(Mz, W, pl, pw, sw)
    _zero_plane(z, ((job // (sh * sw)) * sh * sw + ph * sw + pw) * R * Mz, R, Mz, r_lo, r_hi, c_lo, c_hi)


@numba.njit(cache=True, nogil=True, inline="always")
def _bounds(n, size, pad, phase, stride):
    """The positions ``i < n`` of a phase-split plane's axis that hold input positions (``i*stride + phase - pad``
    in ``[0, size)``), as ``(lo, hi)``."""
    lo = min(n, max(0, (pad - phase + stride - 1) // stride))
    return lo, max(lo, min(n, (size + pad - phase + stride - 1) // stride))


@numba.njit(cache=True, nogil=True, inline="always")
def _zero_plane(z, base, R, Mz, r_lo, r_hi, c_lo, c_hi):
    """Zeros in the ``R x Mz`` plane at ``z[base:]`` outside rows ``[r_lo, r_hi)`` and columns ``[c_lo, c_hi)``: the
    rows above and below as two runs, then the border columns of the rows between, a column at a time down the rows.
    Row by row (a loop over each row's one or two border values, which LLVM makes a ``memset`` call), each plane's
    bounds worked out anew from its index, :func:`zero_borders` took 12.8 us for a band of the fused SVD layer on ZF
    conv2 (304 planes of 15 x 28 values: 2.5% of the layer at batch 1), 3.0-4.9 us this way (twenty-eighth session)."""
    for e in range(base, base + r_lo * Mz):
        z[e] = 0
    for e in range(base + r_hi * Mz, base + R * Mz):
        z[e] = 0
    for c in range(c_lo):
        for yr in range(r_lo, r_hi):
            z[base + yr * Mz + c] = 0
    for c in range(c_hi, Mz):
        for yr in range(r_lo, r_hi):
            z[base + yr * Mz + c] = 0
