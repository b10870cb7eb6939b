"""The biclustered SVD layer in one parallel pass: its reduction, its block convolutions and its expansion back to back
in the thread's buffers, one job an image's band of output rows.

The unfused CPU path (``functional.bicluster._svd_cpu``) runs a chunk of images through three kinds of implicit
GEMM, each a parallel region per input group, block or output group (``gemm_taps.gemm_taps_phase``,
``gemm_taps.gemm_taps_images``, ``gemm.gemm_images``), its intermediates through the shared cache: for ZF conv2
(G = H = 2, K1 = 19, K2 = 51) 8 regions a chunk. Here a job is (image, band of ``BR`` output rows), and its thread
runs:

1. each input group's reduction (``H*K1`` rows over the group's channels, read in place from the input rows the
   band needs), stored split by the stride phases into the thread's ``z1`` (``Rb = BR + (X - 1) // SH`` rows a row
   phase; :func:`~npconv.kernels.cpu.gemm_taps.phase_panel`), whose positions no input maps to are zeroed first
   (:func:`~npconv.kernels.cpu.gemm_taps.zero_borders`);
2. each block's convolution, its ``K1`` reduced channels' planes read in place through tap offsets, into the
   thread's ``z2`` (:func:`~npconv.kernels.cpu.gemm_taps.taps_panel`);
3. each output group's expansion from ``z2`` into the band's outputs of the group's channels, with the bias
   (:func:`~npconv.kernels.cpu.gemm.matmul_local`).

The functional layer runs it at every batch size, in bands as the fused CP layer
(``functional.bicluster._fused_band_rows``: only where the images alone would leave a thread idle, e.g. 1 or 5
images on 2 threads); each band repeats ``(X - 1) // SH`` rows of the reduction. Until the twenty-third session it
ran only where every thread had an image and the images shared out evenly; against that, one process, ZF conv2:
1 image 1.03-1.05x best and 1.01-1.04x median in four of five runs (the fifth 1.16 / 1.19, a noisy phase), 3 images
0.995-1.05x best, 1.10 median (the twenty-second session had measured 0.99-1.09 / 0.97 at 1 image).
"""
from __future__ import annotations

import numba
import numpy as np

from .bicluster import band_job
from .gemm import matmul_local
from .gemm_taps import phase_panel, taps_panel, zero_borders

__all__ = ["svd_fused_sizes", "svd_fused"]


def svd_fused_sizes(G, H, R1, K2p, plane, Pb, F_max, MR, NR, Y):
    """Items of one thread's ``z1`` (``G*R1`` phase-split channels of a band's ``plane`` items, and the slack the
    block convolutions' last panel reads past the last one), ``z2`` (``H*G*K2p`` rows of a band's ``Pb`` outputs, and
    ``NR`` slack for the expansion's last panel) and output tile (the largest output group's rows, rounded up to
    ``MR``, by ``NR``); each a multiple of 64 bytes for float32 and float64."""
    r16 = lambda n: -(-n // 16) * 16  # noqa: E731
    return r16(G * R1 * plane + 2 * NR + Y + 16), r16(H * G * K2p * Pb + NR), r16(-(-F_max // MR) * MR * NR)


@numba.njit(parallel=True, cache=True, nogil=True)
def svd_fused(x, in_offsets, red_pk, red_po, red_koff, R1, sp_pk, sp_po, sp_koff, K2p, KXY, X, OH, OW, BR, SH, SW, M,
              pt, pl, epack, eoff, out_offsets, out_perm, bias, has_bias, y, z1s, z2s, tiles, MR, NR, pfb):
    """The biclustered SVD layer (module docstring) for every image of ``x`` (N, C, H, W) into ``y`` (N, F, OH, OW),
    C-contiguous; bands of ``BR`` output rows (the last may have fewer), ``X`` the kernel's height.

    ``red_pk``: each input group's reduction (``R1`` x ``C_g``) packed by ``gemm.pack_a`` for ``MR`` rows, group
    ``g`` at ``red_po[g]:red_po[g + 1]``; ``red_koff`` the input channels' plane offsets in group order (group
    ``g``'s at ``in_offsets[g]:in_offsets[g + 1]``). ``sp_pk``: block ``b = g*H + h``'s spatial matrix (``K2p`` x
    ``KXY``) packed, at ``sp_po[b]:sp_po[b + 1]``; ``sp_koff`` (G*H, KXY) its taps' offsets in a band's ``z1``
    (channels of ``SH*SW*Rb*M`` items). ``epack``/``eoff``: each output group's expansion (``F_h`` x ``G*K2p``)
    packed, from ``eoff[h]``; ``out_offsets``/``out_perm`` the output groups; ``bias`` read where ``has_bias``.
    ``z1s``, ``z2s``, ``tiles``: one row a thread (:func:`svd_fused_sizes`). ``pfb``: the reduction's B-panel
    prefetch distance (``gemm.PREFETCH_PANELS``).
    """
    N, C, H_in, W_in = x.shape
    G = in_offsets.shape[0] - 1
    H = out_offsets.shape[0] - 1
    F = y.shape[1]
    nbands = (OH + BR - 1) // BR
    Rb = BR + (X - 1) // SH
    plane = SH * SW * Rb * M
    P = OH * OW
    HW = H_in * W_in
    GK = G * K2p
    ldz = BR * OW
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    nblk_r = (R1 + MR - 1) // MR
    nblk_s = (K2p + MR - 1) // MR
    for job in numba.prange(N * nbands):
        n, o0, ob = band_job(job, nbands, BR, OH)
        t = numba.get_thread_id()
        z1 = z1s[t]
        z2 = z2s[t]
        tile = tiles[t]
        sc = np.empty(MR * NR, y.dtype)
        # the band's input rows: padded rows o0*SH .. (o0 + Rb)*SH - 1, i.e. input rows from y_lo; the band's planes
        # see them with a top padding of ptb
        y_lo = min(H_in, max(0, o0 * SH - pt))
        y_hi = min(H_in, max(y_lo, (o0 + Rb) * SH - pt))
        ptb = y_lo + pt - o0 * SH
        zero_borders(z1, G * R1, SH, SW, Rb, M, y_hi - y_lo, W_in, ptb, pl)
        # 1. the reductions, split by the stride phases into z1
        for g in range(G):
            ap = red_pk[red_po[g]:red_po[g + 1]]
            koff = red_koff[in_offsets[g]:in_offsets[g + 1]]
            for q0 in range(0, (y_hi - y_lo) * W_in, NR):
                phase_panel(ap, R1, in_offsets[g + 1] - in_offsets[g], MR, NR, xf, n * C * HW + y_lo * W_in, koff,
                            y_hi - y_lo, W_in, q0, np.int64(0), nblk_r, z1, plane, g * R1 * plane, SH, SW, Rb, M, ptb,
                            pl, pfb, sc)
        # 2. the block convolutions, from z1's planes into z2 (rows (h*G + g)*K2p + k, ldz apart)
        for b in range(G * H):
            g = b // H
            h = b - g * H
            ap = sp_pk[sp_po[b]:sp_po[b + 1]]
            for q0 in range(0, ob * M, NR):
                taps_panel(ap, K2p, KXY, MR, NR, z1, np.int64(0), sp_koff[b], M, ob, OW, q0, np.int64(0), nblk_s, z2,
                           ldz, (h * G + g) * K2p * ldz, sc)
        # 3. the expansions into the band's outputs
        for h in range(H):
            matmul_local(epack, eoff[h], out_offsets[h + 1] - out_offsets[h], GK, MR, NR, z2, h * GK * ldz, ldz,
                         ob * OW, yf, n * F * P + o0 * OW, P, out_perm, out_offsets[h], bias, has_bias, tile)


from .plan import watch as _watch  # noqa: E402  (planned kernels: kernels/cpu/plan.py)
_watch(__name__)
