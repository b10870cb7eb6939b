"""The CP front end's reduction and horizontal pass as an implicit GEMM on npconv's micro-kernel.

:func:`npconv.kernels.cpu.bicluster.cp_front` folds a group's ``C_g -> 1`` reductions into the horizontal taps
(``hcoef[j, hk, b] = reduce[j, hk] * horizontal[g, hk, b]``) and runs them 4 components at a time in vectorised
numba loops: each output vector costs a load and a store of 4 accumulator rows per input channel (about 430 ns a
ZF conv2 component, one thread). Over all ``H*K`` components of a group at once, the same sums are a product:

    acc[hk, p, e] = sum_{t = (j, b)} A_g[hk, t] * xs[j, p, b % SW, e + b // SW]      (e over a row phase's R*Mp items)

``A_g`` (``H*K`` x ``C_g*Y``, the folded coefficients) is packed once per layer for the 12-row tile, and the input
taps are read in place from the group's phase-split planes through tap offsets (``gemm.microkernel_taps12``; the
8- and 4-row tiles for a partial last row block). The tile keeps its 24 accumulators in registers over all
``C_g*Y`` taps and stores each output once: 385-424 ns a ZF conv2 component (85-93 GFLOP/s, one thread). The
vertical pass then runs per component as in ``cp_front`` (``gemm_taps.taps_rows``). The whole layer against the loop
front end (the same vertical pass and packing; with the next job's input fetched ahead), ZF conv2, same process:
1.01-1.08x best at batch 128 (medians 1.04-1.10), 1.07-1.25x at batch 8, 0.96-1.04x at batch 1.

Compiled only where the micro-kernel's 12-row tile exists (AVX-512): the functional layer calls
:func:`cp_front_gemm` only then (``functional.bicluster._cp_gemm_front``), else ``cp_front``.
"""
from __future__ import annotations

import numba
import numpy as np

from .bicluster import front_job, group_planes, next_plane
from .gemm import microkernel_taps12, microkernel_taps_rows4, microkernel_taps_rows8
from .gemm_taps import taps_rows

__all__ = ["cp_gemm_scratch_size", "cp_gemm_plane", "cp_gemm_tap_offsets", "front_tiles", "cp_front_gemm"]


def cp_gemm_plane(R, Mp, NR):
    """Items of a row phase in the accumulator rows: its ``R * Mp`` rounded up to whole panels of ``NR`` (the tile
    stores whole panels; the columns past ``R * Mp`` are computed from the slack and never read)."""
    return -(-(R * Mp) // NR) * NR


def cp_gemm_scratch_size(sh, sw, R, Mp, MR, NR, cg_pack=0):
    """Items of one thread's scratch row for :func:`cp_front_gemm`: ``MR`` accumulator rows of ``sh`` row phases
    (:func:`cp_gemm_plane` each) and ``NR`` items of slack (the vertical pass's last runs read up to ``NR`` items past
    a row's end), and when the jobs pack their own input (``cg_pack``, the largest input group, > 0) that group's
    planes (``sh * sw * R * Mp`` each) and ``NR + Mp`` items of slack; a multiple of 64 bytes, so that rows that
    start aligned stay aligned."""
    plane = sh * sw * R * Mp
    own = cg_pack * plane + NR + Mp if cg_pack else 0
    return MR * sh * cp_gemm_plane(R, Mp, NR) + NR + own


def cp_gemm_tap_offsets(cg, Y, sw, R, Mp, plane):
    """Offsets of the taps ``t = j*Y + b`` (input channel ``j`` of a group, horizontal tap ``b``) from the first
    channel's row phase: channel ``j``'s plane, column phase ``b % sw``, ``b // sw`` columns on."""
    koff = np.empty(cg * Y, np.int64)
    for j in range(cg):
        for b in range(Y):
            koff[j * Y + b] = j * plane + (b % sw) * R * Mp + b // sw
    return koff


@numba.njit(cache=True, nogil=True)
def front_tiles(hpack, aoff, rows, xsrc, xbase, koff, T, acc, SH, SW, RM, RMp, NR):
    """One row block of the folded reduction and horizontal pass: for each of the ``SH`` row phases, its ``RMp /
    NR`` panels of the group's planes (``xsrc[xbase:]``, a row phase ``SW * RM`` items on) through the tap offsets
    ``koff`` (``T`` taps) by the block's packed coefficients (``hpack[aoff:]``), into the accumulator rows ``acc``
    (``SH * RMp`` items a component), on the smallest tile that holds the block's ``rows`` components."""
    PLp = SH * RMp
    for p in range(SH):
        for jp in range(RMp // NR):
            boff = xbase + p * SW * RM + jp * NR
            coff = p * RMp + jp * NR
            if rows <= 4:
                microkernel_taps_rows4(hpack, aoff, xsrc, boff, koff, acc, coff, PLp, T, 0, acc, 0)
            elif rows <= 8:
                microkernel_taps_rows8(hpack, aoff, xsrc, boff, koff, acc, coff, PLp, T, 0, acc, 0)
            else:
                microkernel_taps12(hpack, aoff, xsrc, boff, koff, acc, coff, PLp, T, 0, acc, 0)


@numba.njit(parallel=True, cache=True, nogil=True)
def cp_front_gemm(xflat, x, n0, in_perm, pt, pl, nb, C, SH, SW, R, Mp, in_offsets, hpack, hoff, koff, Y, MR, NR,
                  vertical, OH, OW, nsplit, Zf, zlen, scratch, pf_next):
    """CP front end (module docstring): ``Z[h, g*K + k, i*P:(i+1)*P] = vert_k * (sum_{j, b} hcoef[j, hk, b]
    xs[i, j, shifted by b])`` for every image ``i < nb`` of the chunk and component ``hk = h*K + k``.

    ``xflat`` and the own packing (``xflat`` empty: each job packs its group of image ``n0 + i`` of ``x``) as in
    ``bicluster.cp_front``, but with ``NR + Mp`` items of slack after the packed planes (a row phase's last panel
    reads up to :func:`cp_gemm_plane` ``- R*Mp`` items past it). ``hpack`` holds each group's folded coefficients
    ``A_g`` (``H*K`` x ``C_g*Y``) packed by ``gemm.pack_a`` for ``MR``-row blocks, group ``g`` from ``hoff[g]``;
    ``koff`` (:func:`cp_gemm_tap_offsets` for the largest group) the taps' offsets; ``vertical`` (G, H, K, X);
    Z (H, G*K, nb*P), given flat as ``Zf`` with rows of ``zlen`` (``nb*P``) values. ``MR``, ``NR``: the micro-kernel's
    tile (12 rows, two vectors; ``NR`` is also the runs of the vertical pass, ``gemm.TAPS1_BYTES``). ``pf_next``:
    a job packing its own group fetches the planes it packs next as it packs (``bicluster.group_planes``), for a
    batch whose input streams from memory (until the twenty-third session, a share of the next job's planes before
    each component's vertical pass, as the fused CP layer did; ahead in the packing was 1.01-1.02x faster there).

    One parallel job per (image, input group, slice of the group's row blocks; ``nsplit`` slices, more than one only
    when images x groups alone are too few jobs). For each row block of ``MR`` components: the tiles of every row
    phase's panels into the accumulator rows, then per component the vertical pass and the compaction.
    ``scratch`` (threads, >= :func:`cp_gemm_scratch_size`), rows on 64-byte boundaries.
    """
    G, H, K, X = vertical.shape
    HK = H * K
    P = OH * OW
    RM = R * Mp
    RMp = (RM + NR - 1) // NR * NR
    PLp = SH * RMp
    nblk = (HK + MR - 1) // MR
    own = xflat.shape[0] == 0
    xin = x.reshape(x.size)
    for job in numba.prange(nb * G * nsplit):
        s, _, g, i, j0, cg = front_job(job, nsplit, G, in_offsets)
        T = cg * Y
        sc = scratch[numba.get_thread_id()]
        acc = sc[:MR * PLp + NR]
        nxt = next_plane(x, n0 + i, g + 1, in_perm, in_offsets) if pf_next else np.int64(-1)
        xsrc, xbase = group_planes(own, sc, MR * PLp + NR, NR + Mp, x, n0 + i, in_perm, j0, cg, pt, pl, SH, SW, R, Mp,
                                   xflat, i * C + j0, xin, nxt)
        vcoef = np.empty(X, Zf.dtype)
        tmp = np.empty(NR, Zf.dtype)
        voffs = np.empty(X, np.int64)
        for a in range(X):
            voffs[a] = (a % SH) * RMp + (a // SH) * Mp
        for ib in range(s * nblk // nsplit, (s + 1) * nblk // nsplit):
            rows = min(MR, HK - ib * MR)
            aoff = hoff[g] + ib * T * MR
            # 1. the reduction and the horizontal pass: every row phase's panels, MR components a tile
            front_tiles(hpack, aoff, rows, xsrc, xbase, koff, T, acc, SH, SW, RM, RMp, NR)
            # 2. per component: the vertical pass, each output row straight into Z
            for r in range(rows):
                hk = ib * MR + r
                h = hk // K
                k = hk - h * K
                for a in range(X):
                    vcoef[a] = vertical[g, h, k, a]
                zb = (h * G * K + g * K + k) * zlen + i * P
                taps_rows(vcoef, acc, r * PLp, voffs, X, Zf, zb, OH, OW, Mp, tmp, False)
