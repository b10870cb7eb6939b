"""The shared-separable layer in one parallel pass on the fused CP layer's machinery, its sharing executed.

A shared-separable layer (``decompose.shared``) is a biclustered CP layer whose ``G*H*K`` separable spatial filters
come from a collection of ``S`` shared ones: component ``(h, k)`` of input group ``g`` filters with shared filter
``used_filter[used_ptr[g] + slot[g, h, k]]``. Filtering is linear and per channel, so it commutes with the
reduction: each of a group's ``C_g`` channels is filtered once by each of the ``U_g`` shared filters the group uses,
and each component is then a ``C_g``-term combination of those maps (``reduce`` its coefficients). One job is one
(image, band of ``BR`` output rows), as in :func:`npconv.kernels.cpu.cp_fused.cp_fused`:

1. for each input group: its channels' rows that the band needs packed (``bicluster.group_planes``); for each
   channel, the horizontal passes of the ``U_g`` filters the group uses as an implicit GEMM on the micro-kernel
   (``A_g``, ``U_g`` x ``Y``, the filters' horizontal taps, by the channel's planes through tap offsets:
   ``cp_front_gemm.front_tiles``), and each one's vertical pass into the thread's ``Q``, row ``u*U_g + s``
   (``gemm_taps.taps_rows``); then each component's combination of its filter's ``C_g`` maps into the band's
   ``Zb``;
2. each output group's expansion ``expand_h @ Zb[h]`` into the band's outputs with the bias
   (``gemm.matmul_local``), as in the CP layer.

The products run ``U_g`` rows of ``Y`` taps a channel where the CP layer's run ``H*K`` rows of ``C_g*Y`` taps a
group (ZF conv2 at G = 48, K = 6, S = 4: at most 2 x 4 rows of 5 taps against 12 rows of 10), the vertical passes
``C_g*U_g`` rows against ``H*K``; the combinations cost ``H*K*C_g`` multiply-adds an output position. Until the
twenty-eighth session the shared layer ran fused on numba passes (``bicluster.shared_group`` a group, as the unfused
front end still does): this is 1.10-1.23x faster (docs/benchmarks.md).
"""
from __future__ import annotations

import numba
import numpy as np

from .bicluster import band_job, group_planes, next_plane
from .cp_front_gemm import front_tiles
from .cp_fused import band_layout, cp_fused_geometry, packed_len, vertical_offsets, zb_row
from .gemm import matmul_local
from .gemm_taps import taps_rows

__all__ = ["shared_gemm_scratch_size", "shared_gemm_fused"]


def shared_gemm_scratch_size(BR, X, SH, SW, Mp, OW, MR, NR, cg_max, q_max, HGK, F_max, itemsize):
    """Items of one thread's scratch row for :func:`shared_gemm_fused`: the accumulator rows (``MR`` rows of ``SH``
    row phases) and ``NR`` slack; the largest group's packed planes (``cp_fused.packed_len``);
    ``Q`` (``q_max`` rows, the most (channel, filter) pairs of a group, of ``cp_fused.zb_row``) and ``NR`` slack;
    ``Zb`` (``HGK`` rows of the same) and ``NR`` slack; the output tile (``F_max`` rows rounded up to ``MR``, by
    ``NR``). Every part a multiple of 64 bytes."""
    _, RMp, plane = cp_fused_geometry(BR, X, SH, SW, Mp, NR)
    acc = MR * SH * RMp + NR
    xg = packed_len(cg_max, plane, NR, Mp, itemsize)
    q = q_max * zb_row(BR, OW, itemsize) + NR
    zb = HGK * zb_row(BR, OW, itemsize) + NR
    tile = -(-F_max // MR) * MR * NR
    return acc + xg + q + zb + tile


@numba.njit(parallel=True, cache=True, nogil=True)
def shared_gemm_fused(x, in_perm, pt, pl, SH, SW, Mp, in_offsets, qpack, qoff, koff, Y, MR, NR, used_ptr,
                      used_filter, vertical, comb, slot, OH, OW, BR, epack, eoff, out_offsets, out_perm, bias,
                      has_bias, y, scratch, pf):
    """The shared-separable layer (module docstring) for every image of ``x`` (N, C, H, W) into ``y`` (N, F, OH, OW),
    C-contiguous.

    ``qpack``: each group's horizontal coefficients ``A_g`` (``U_g`` x ``Y``, module docstring) packed by
    ``gemm.pack_a`` for ``MR`` rows, group ``g`` from ``qoff[g]``; ``koff`` the ``Y`` taps' offsets in a channel's
    planes (``cp_front_gemm.cp_gemm_tap_offsets`` for one channel and a band's planes); ``used_ptr``/``used_filter``
    the filters each group uses and ``slot`` (G, H, K) each component's place in its group's list
    (``functional.bicluster.shared_plan``); ``vertical`` (S, X) and ``comb`` (C, H, K) (the factors' ``reduce``, rows
    in group order); ``epack``/``eoff``/``out_offsets``/``out_perm``/``bias`` as in ``cp_fused``; ``scratch``
    (threads, >= :func:`shared_gemm_scratch_size`), rows on 64-byte boundaries; ``BR`` output rows a band (the last
    may have fewer); ``pf``: fetch the input rows packed next while packing.
    """
    N = x.shape[0]
    G, H, K = slot.shape
    X = vertical.shape[1]
    GK = G * K
    F = y.shape[1]
    P = OH * OW
    nbands, Rb, RM, RMp, PLp, plane, ldz = band_layout(OH, OW, BR, X, SH, SW, Mp, NR, y.itemsize)
    cg_max = 0
    q_max = 0
    for g in range(G):
        cg = in_offsets[g + 1] - in_offsets[g]
        cg_max = max(cg_max, cg)
        q_max = max(q_max, cg * (used_ptr[g + 1] - used_ptr[g]))
    acc_len = MR * PLp + NR
    xg_len = packed_len(cg_max, plane, NR, Mp, y.itemsize)
    q_len = q_max * ldz + NR
    z_len = H * GK * ldz + NR
    yf = y.reshape(y.size)
    xin = x.reshape(x.size)
    for job in numba.prange(N * nbands):
        n, o0, ob = band_job(job, nbands, BR, OH)
        sc = scratch[numba.get_thread_id()]
        acc = sc[:acc_len]
        e0 = acc_len + xg_len
        q = sc[e0:e0 + q_len]
        zb = sc[e0 + q_len:e0 + q_len + z_len]
        tile = sc[e0 + q_len + z_len:]
        vcoef = np.empty(X, y.dtype)
        tmp = np.empty(NR, y.dtype)
        voffs = vertical_offsets(X, SH, RMp, Mp)
        Pb = ob * OW
        for g in range(G):
            j0 = in_offsets[g]
            cg = in_offsets[g + 1] - j0
            u0 = used_ptr[g]
            nu = used_ptr[g + 1] - u0
            nxt = next_plane(x, n, g + 1, in_perm, in_offsets) if pf and (g + 1 < G or nbands == 1) else np.int64(-1)
            xg, _ = group_planes(True, sc, acc_len, NR + Mp, x, n, in_perm, j0, cg, pt - o0 * SH, pl, SH, SW, Rb, Mp,
                                 xin, 0, xin, nxt)
            # 1a. each channel by each filter the group uses: the horizontal passes as a product, the vertical
            # passes into Q (row u*nu + s)
            for u in range(cg):
                for ib in range((nu + MR - 1) // MR):
                    rows = min(MR, nu - ib * MR)
                    front_tiles(qpack, qoff[g] + ib * Y * MR, rows, xg, np.int64(u * plane), koff, Y, acc, SH, SW, RM,
                                RMp, NR)
                    for r in range(rows):
                        f = used_filter[u0 + ib * MR + r]
                        for a in range(X):
                            vcoef[a] = vertical[f, a]
                        taps_rows(vcoef, acc, r * PLp, voffs, X, q, (u * nu + ib * MR + r) * ldz, ob, OW, Mp, tmp,
                                  True)
            # 1b. every component: its filter's maps of the group's channels, combined
            for h in range(H):
                for k in range(K):
                    s = slot[g, h, k]
                    d = zb[(h * GK + g * K + k) * ldz:]
                    c = comb[j0, h, k]
                    src = q[s * ldz:]
                    for e in range(Pb):
                        d[e] = c * src[e]
                    for u in range(1, cg):
                        c = comb[j0 + u, h, k]
                        src = q[(u * nu + s) * ldz:]
                        for e in range(Pb):
                            d[e] += c * src[e]
        # 2. the expansion of each output group from Zb, into the band's output positions
        for h in range(H):
            matmul_local(epack, eoff[h], out_offsets[h + 1] - out_offsets[h], GK, MR, NR, zb, h * GK * ldz, ldz, Pb, yf,
                         n * F * P + o0 * OW, P, out_perm, out_offsets[h], bias, has_bias, tile)


from .plan import watch as _watch  # noqa: E402  (planned kernels: kernels/cpu/plan.py)
_watch(__name__)
