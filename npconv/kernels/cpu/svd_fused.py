"""The biclustered SVD layer in one parallel pass, one image a job: its reduction, its block convolutions and its
expansion back to back in the thread's cache.

The unfused CPU path (``functional.bicluster._svd_cpu``) runs a chunk of images through three kinds of implicit
GEMM, each a parallel region per input group, block or output group (``gemm_taps.gemm_taps_phase``,
``gemm_taps.gemm_taps_images``, ``gemm.gemm_images``), its intermediates through the shared cache: for ZF conv2
(G = H = 2, K1 = 19, K2 = 51) 8 regions a chunk of 3 images. Here a job is one image, and its thread runs:

1. each input group's reduction (``H*K1`` rows over the group's channels, read in place from the input), stored
   split by the stride phases into the thread's ``z1`` (:func:`~npconv.kernels.cpu.gemm_taps.phase_panel`);
2. each block's convolution, its ``K1`` reduced channels' planes read in place through tap offsets, into the
   thread's ``z2`` (:func:`~npconv.kernels.cpu.gemm_taps.taps_panel`);
3. each output group's expansion from ``z2`` into the image's output channels, with the bias
   (:func:`~npconv.kernels.cpu.gemm.matmul_local`).

The functional layer runs it where every thread has an image and the slices are even enough
(``functional.bicluster._fused_images_ok``).
"""
from __future__ import annotations

import numba
import numpy as np

from .gemm import matmul_local
from .gemm_taps import phase_panel, taps_panel

__all__ = ["svd_fused_sizes", "svd_fused"]


def svd_fused_sizes(G, H, R1, K2p, plane, P, F_max, MR, NR, Y):
    """Items of one thread's ``z1`` (``G*R1`` phase-split channels of ``plane`` items, and the slack the block
    convolutions' last panel reads past the last one), ``z2`` (``H*G*K2p`` rows of ``P``, and ``NR`` slack for the
    expansion's last panel) and output tile (the largest output group's rows, rounded up to ``MR``, by ``NR``); each
    a multiple of 64 bytes for float32 and float64."""
    r16 = lambda n: -(-n // 16) * 16  # noqa: E731
    return r16(G * R1 * plane + 2 * NR + Y + 16), r16(H * G * K2p * P + NR), r16(-(-F_max // MR) * MR * NR)


@numba.njit(parallel=True, cache=True, nogil=True)
def svd_fused(x, in_offsets, red_pk, red_po, red_koff, R1, sp_pk, sp_po, sp_koff, K2p, KXY, OH, OW, SH, SW, R, M,
              pt, pl, epack, eoff, out_offsets, out_perm, bias, has_bias, y, z1s, z2s, tiles, MR, NR, pfb):
    """The biclustered SVD layer (module docstring) for every image of ``x`` (N, C, H, W) into ``y`` (N, F, OH, OW),
    C-contiguous.

    ``red_pk``: each input group's reduction (``R1`` x ``C_g``) packed by ``gemm.pack_a`` for ``MR`` rows, group
    ``g`` at ``red_po[g]:red_po[g + 1]``; ``red_koff`` the input channels' plane offsets in group order (group
    ``g``'s at ``in_offsets[g]:in_offsets[g + 1]``). ``sp_pk``: block ``b = g*H + h``'s spatial matrix (``K2p`` x
    ``KXY``) packed, at ``sp_po[b]:sp_po[b + 1]``; ``sp_koff`` (G*H, KXY) its taps' offsets in ``z1`` (channels
    ``plane`` apart). ``epack``/``eoff``: each output group's expansion (``F_h`` x ``G*K2p``) packed, from
    ``eoff[h]``; ``out_offsets``/``out_perm`` the output groups; ``bias`` read where ``has_bias``. ``z1s``, ``z2s``,
    ``tiles``: one row a thread (:func:`svd_fused_sizes`), ``z1s``'s phase-split borders zero
    (``gemm_taps.zero_phase_borders``). ``pfb``: the reduction's B-panel prefetch distance (``gemm.PREFETCH_PANELS``).
    """
    N, C, H_in, W_in = x.shape
    G = in_offsets.shape[0] - 1
    H = out_offsets.shape[0] - 1
    F = y.shape[1]
    plane = SH * SW * R * M
    P = OH * OW
    HW = H_in * W_in
    GK = G * K2p
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    nblk_r = (R1 + MR - 1) // MR
    nblk_s = (K2p + MR - 1) // MR
    Lq = OH * M
    for n in numba.prange(N):
        t = numba.get_thread_id()
        z1 = z1s[t]
        z2 = z2s[t]
        tile = tiles[t]
        sc = np.empty(MR * NR, y.dtype)
        # 1. the reductions, split by the stride phases into z1
        for g in range(G):
            ap = red_pk[red_po[g]:red_po[g + 1]]
            koff = red_koff[in_offsets[g]:in_offsets[g + 1]]
            for q0 in range(0, HW, NR):
                phase_panel(ap, R1, in_offsets[g + 1] - in_offsets[g], MR, NR, xf, n * C * HW, koff, H_in, W_in, q0,
                            0, nblk_r, z1, plane, g * R1 * plane, SH, SW, R, M, pt, pl, pfb, sc)
        # 2. the block convolutions, from z1's planes into z2 (rows (h*G + g)*K2p + k)
        for b in range(G * H):
            g = b // H
            h = b - g * H
            ap = sp_pk[sp_po[b]:sp_po[b + 1]]
            for q0 in range(0, Lq, NR):
                taps_panel(ap, K2p, KXY, MR, NR, z1, 0, sp_koff[b], M, OH, OW, q0, 0, nblk_s, z2, P,
                           (h * G + g) * K2p * P, sc)
        # 3. the expansions into the image's output channels
        for h in range(H):
            matmul_local(epack, eoff[h], out_offsets[h + 1] - out_offsets[h], GK, MR, NR, z2, h * GK * P, P, P, yf,
                         n * F * P, P, out_perm, out_offsets[h], bias, has_bias, tile)
