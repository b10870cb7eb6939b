"""The CP layer in one parallel pass: its front end and its expansion fused per band of output rows.

The unfused CPU path (``functional.bicluster._cp_cpu``) runs a chunk of images through the front end
(:func:`npconv.kernels.cpu.cp_front_gemm.cp_front_gemm`), which writes the chunk's intermediate ``Z`` (``H*G*K``
rows of ``P`` values an image: 1.56 MB for ZF conv2 at ``K = 6``), and then through one product per output group
(``gemm.gemm_images``), which reads ``Z`` back: three parallel regions a chunk, each ended by a join, and ``Z``
through the shared cache. Here one job is one (image, band of ``BR`` output rows):

1. for each input group: its channels' rows that the band needs packed into the thread's scratch (padded and
   phase-split, ``bicluster.group_planes``; ``Rb = BR + (X - 1) // SH`` rows a row phase, so neighbouring bands repeat
   ``(X - 1) // SH`` rows of the packing and the horizontal pass), the folded reduction and horizontal pass as an
   implicit GEMM (``microkernel_taps12``, 12 components a tile, as in ``cp_front_gemm``), then per component the
   vertical pass into the band's ``Zb`` (``gemm_taps.taps_rows``), a thread-local block of ``H*G*K`` rows of
   ``BR*OW`` values. With ``pf``, each channel's packing fetches the rows of the plane packed next
   (``_pack.pack_plane_ahead``; against fetching the next group's rows spread over this group's components, as
   until the twenty-third session: batch 128, K = 6 / 8 / 12, 1.02 / 1.01 / 1.01 faster, best and median alike);
2. for each output group ``h``: ``expand_h @ Zb[h]`` on the micro-kernel (K blocks of ``gemm.KC_BYTES``, the
   output tile in a scratch tile), stored into the band's output positions of the group's channels
   (``out_perm``) with the bias.

``Z`` is written and read by one core, and a batch is one parallel region with one join. Bands only where the
images alone leave a thread idle (``functional.bicluster._fused_band_rows``): the repeated rows cost more than
keeping ``Zb`` in L2 saves (ZF conv2, K = 6, 16 images, one thread: 4 bands of 7 rows an image 28.2 ms, one band of
26 rows 24.9; the front end 11.7 against 8.9 ms, the expansion the same, 16.3-16.9 ms).
"""
from __future__ import annotations

import numba
import numpy as np

from .bicluster import band_job, group_planes, next_plane
from .cp_front_gemm import front_tiles
from .gemm import TAPS1_BYTES, matmul_local
from .gemm_taps import taps_rows

__all__ = ["cp_fused_geometry", "cp_fused_scratch_size", "cp_fused", "band_layout", "vertical_offsets", "zb_row",
           "packed_len"]


@numba.njit(cache=True, nogil=True, inline="always")
def cp_fused_geometry(BR, X, SH, SW, Mp, NR):
    """(Rb, RMp, plane) of a band of ``BR`` output rows: packed rows a row phase, a row phase's items in the
    accumulator rows (whole panels of ``NR``), and items of a packed channel (``SH*SW*Rb*Mp``). Jitted, so that the
    kernels and the scratch sizes the functional layer computes share one definition (as :func:`zb_row` and
    :func:`packed_len`)."""
    Rb = BR + (X - 1) // SH
    RMp = (Rb * Mp + NR - 1) // NR * NR
    return Rb, RMp, SH * SW * Rb * Mp


@numba.njit(cache=True, nogil=True, inline="always")
def zb_row(BR, OW, itemsize):
    """Items of a row of ``Zb``: a band's ``BR*OW`` outputs and a run of ``gemm.TAPS1_BYTES`` (the vertical pass's
    last run stores past the outputs: ``gemm_taps.taps_rows`` with ``slack``), rounded up to 64 bytes."""
    lv = 64 // itemsize
    return (BR * OW + TAPS1_BYTES // itemsize + lv - 1) // lv * lv


@numba.njit(cache=True, nogil=True, inline="always")
def packed_len(cg_max, plane, NR, Mp, itemsize):
    """Items of a job's packed input group in its scratch row: ``cg_max`` planes of ``plane`` items and ``NR + Mp``
    of slack, rounded up to 64 bytes (a row of ``Mp`` items need not be a multiple of 64 bytes:
    ``functional.bicluster._fused_row``), so that the parts after it stay aligned."""
    lv = 64 // itemsize
    return (cg_max * plane + NR + Mp + lv - 1) // lv * lv


def cp_fused_scratch_size(BR, X, SH, SW, Mp, OW, MR, NR, cg_max, HGK, F_max, itemsize):
    """Items of one thread's scratch row for :func:`cp_fused`: the accumulator rows (``MR`` rows of ``SH`` row
    phases) and ``NR`` slack; the largest group's packed planes and ``NR + Mp`` slack; ``Zb`` (``HGK`` rows of
    :func:`zb_row`) and ``NR`` slack; the output tile (``F_max`` rows, the largest output group, rounded up to
    ``MR``, by ``NR``). Every part a multiple of 64 bytes (the packed planes rounded up:
    :func:`packed_len`)."""
    _, RMp, plane = cp_fused_geometry(BR, X, SH, SW, Mp, NR)
    acc = MR * SH * RMp + NR
    xg = packed_len(cg_max, plane, NR, Mp, itemsize)
    zb = HGK * zb_row(BR, OW, itemsize) + NR
    tile = -(-F_max // MR) * MR * NR
    return acc + xg + zb + tile


@numba.njit(cache=True, nogil=True, inline="always")
def band_layout(OH, OW, BR, X, SH, SW, Mp, NR, itemsize):
    """The fused layers' band geometry (``cp_fused``, ``shared_gemm.shared_gemm_fused``): (bands an image, packed
    rows a row phase ``Rb``, a row phase's items ``RM = Rb*Mp`` and in the accumulator rows ``RMp``, a component's
    accumulator items ``PLp``, a packed channel's items, and the items of a row of ``Zb``: :func:`zb_row`)."""
    Rb, RMp, plane = cp_fused_geometry(BR, X, SH, SW, Mp, NR)
    return (OH + BR - 1) // BR, Rb, Rb * Mp, RMp, SH * RMp, plane, zb_row(BR, OW, itemsize)


@numba.njit(cache=True, nogil=True, inline="always")
def vertical_offsets(X, SH, RMp, Mp):
    """The vertical taps' offsets in a component's accumulator rows: tap ``a`` at row phase ``a % SH``, ``a // SH``
    rows on."""
    voffs = np.empty(X, np.int64)
    for a in range(X):
        voffs[a] = (a % SH) * RMp + (a // SH) * Mp
    return voffs


@numba.njit(parallel=True, cache=True, nogil=True)
def cp_fused(x, in_perm, pt, pl, SH, SW, Mp, in_offsets, hpack, hoff, koff, Y, MR, NR, vertical, OH, OW, BR,
             epack, eoff, out_offsets, out_perm, bias, has_bias, y, scratch, pf):
    """The CP layer (module docstring): ``y[n, out_perm[f]] = sum_{g, k} expand[f, g, k] Z[h(f), g*K + k] (+ bias)``
    for every image ``n`` of ``x`` (N, C, H, W), ``Z`` the CP front end's intermediate as in ``cp_front_gemm``.

    ``hpack``/``hoff``/``koff`` as :func:`~npconv.kernels.cpu.cp_front_gemm.cp_front_gemm` takes them, ``koff`` for
    planes of a band (:func:`cp_fused_geometry`); ``vertical`` (G, H, K, X); ``epack`` each output group's
    expansion (``F_h`` x ``G*K``) packed by ``gemm.pack_a`` for ``MR`` rows, group ``h`` from ``eoff[h]``;
    ``out_offsets``/``out_perm`` the output groups; ``bias`` (F,) read where ``has_bias``; ``y`` (N, F, OH, OW)
    C-contiguous; ``scratch`` (threads, >= :func:`cp_fused_scratch_size`), rows on 64-byte boundaries. ``BR``:
    output rows a band (the last band may have fewer). ``pf``: fetch the input rows packed next while packing (for a
    batch that streams from memory).
    """
    N = x.shape[0]
    G, H, K, X = vertical.shape
    HK = H * K
    GK = G * K
    F = y.shape[1]
    P = OH * OW
    nbands, Rb, RM, RMp, PLp, plane, ldz = band_layout(OH, OW, BR, X, SH, SW, Mp, NR, y.itemsize)
    nblk = (HK + MR - 1) // MR
    cg_max = 0
    for g in range(G):
        cg_max = max(cg_max, in_offsets[g + 1] - in_offsets[g])
    acc_len = MR * PLp + NR
    xg_len = packed_len(cg_max, plane, NR, Mp, y.itemsize)
    z_len = H * GK * ldz + NR
    yf = y.reshape(y.size)
    xin = x.reshape(x.size)
    for job in numba.prange(N * nbands):
        n, o0, ob = band_job(job, nbands, BR, OH)
        sc = scratch[numba.get_thread_id()]
        acc = sc[:acc_len]
        zb = sc[acc_len + xg_len:acc_len + xg_len + z_len]
        tile = sc[acc_len + xg_len + z_len:]
        vcoef = np.empty(X, y.dtype)
        tmp = np.empty(NR, y.dtype)
        voffs = vertical_offsets(X, SH, RMp, Mp)
        # 1. the front end, group by group, into Zb
        for g in range(G):
            j0 = in_offsets[g]
            cg = in_offsets[g + 1] - j0
            T = cg * Y
            # the band's rows (padded row r*SH + p of the band is input row (o0 + r)*SH + p - pt), each channel's
            # packing fetching the plane packed next, with ``pf`` (the next job's first with one band an image)
            nxt = next_plane(x, n, g + 1, in_perm, in_offsets) if pf and (g + 1 < G or nbands == 1) else np.int64(-1)
            xg, _ = group_planes(True, sc, acc_len, NR + Mp, x, n, in_perm, j0, cg, pt - o0 * SH, pl, SH, SW, Rb, Mp,
                                 xin, 0, xin, nxt)
            for ib in range(nblk):
                rows = min(MR, HK - ib * MR)
                aoff = hoff[g] + ib * T * MR
                front_tiles(hpack, aoff, rows, xg, np.int64(0), koff, T, acc, SH, SW, RM, RMp, NR)
                for r in range(rows):
                    hk = ib * MR + r
                    h = hk // K
                    k = hk - h * K
                    for a in range(X):
                        vcoef[a] = vertical[g, h, k, a]
                    taps_rows(vcoef, acc, r * PLp, voffs, X, zb, (h * GK + g * K + k) * ldz, ob, OW, Mp, tmp, True)
        # 2. the expansion of each output group from Zb, into the band's output positions
        Pb = ob * OW
        for h in range(H):
            matmul_local(epack, eoff[h], out_offsets[h + 1] - out_offsets[h], GK, MR, NR, zb, h * GK * ldz, ldz, Pb, yf,
                         n * F * P + o0 * OW, P, out_perm, out_offsets[h], bias, has_bias, tile)


from .plan import watch as _watch  # noqa: E402  (planned kernels: kernels/cpu/plan.py)
_watch(__name__)
