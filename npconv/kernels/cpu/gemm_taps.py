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
"""
from __future__ import annotations

import numba
import numpy as np

from .gemm import microkernel_taps12, microkernel_taps_rows4, microkernel_taps_rows8

__all__ = ["gemm_taps_images"]


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_taps_images(ap, M, K, MR, NR, b, bimg, koff, Mq, OH, OW, nimg, c, ldc, cimg, mgroups):
    """``c[r*ldc + i*cimg + oy*OW + ox] = sum_k A[r, k] * b[i*bimg + oy*Mq + ox + koff[k]]`` for ``r < M``,
    ``oy < OH``, ``ox < OW``, ``i < nimg`` (module docstring); ``ap`` is ``A`` (M, K) packed by ``gemm.pack_a`` for
    the 12-row tile (``MR`` = 12, ``NR`` its two vectors). A job is (image, panel of ``NR`` padded positions, group
    of row blocks; ``mgroups`` groups); a partial last row block runs the 8- or 4-row tile when it fits. ``b`` must
    be readable up to ``(nimg - 1)*bimg + ceil(OH*Mq / NR)*NR + max(koff)``."""
    nblk = (M + MR - 1) // MR
    Lq = OH * Mq
    npan = (Lq + NR - 1) // NR
    bper = (nblk + mgroups - 1) // mgroups
    for job in numba.prange(nimg * npan * mgroups):
        g = job % mgroups
        t = job // mgroups
        i = t // npan
        q0 = (t - i * npan) * NR
        ib0 = g * bper
        ib1 = min(nblk, ib0 + bper)
        scratch = np.empty(MR * NR, c.dtype)
        # the panel's output rows: oy from q0 // Mq, each a run of columns [ox0, ox1) of padded positions
        oy_first = q0 // Mq
        oy_last = min(OH - 1, (min(q0 + NR, Lq) - 1) // Mq)
        for ib in range(ib0, ib1):
            rows = min(MR, M - ib * MR)
            aoff = ib * K * MR
            if rows <= 4 < MR:
                microkernel_taps_rows4(ap, aoff, b, i * bimg + q0, koff, scratch, 0, NR, K, 0, scratch, 0)
            elif rows <= 8 < MR:
                microkernel_taps_rows8(ap, aoff, b, i * bimg + q0, koff, scratch, 0, NR, K, 0, scratch, 0)
            else:
                microkernel_taps12(ap, aoff, b, i * bimg + q0, koff, scratch, 0, NR, K, 0, scratch, 0)
            for oy in range(oy_first, oy_last + 1):
                e0 = max(q0, oy * Mq) - q0
                e1 = min(q0 + NR, oy * Mq + OW) - q0
                if e1 <= e0:
                    continue
                dbase = i * cimg + oy * OW + (q0 + e0 - oy * Mq)
                for r in range(rows):
                    d = c[(ib * MR + r) * ldc + dbase:]
                    src = scratch[r * NR + e0:]
                    for e in range(e1 - e0):
                        d[e] = src[e]
