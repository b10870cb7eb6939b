"""A direct convolution with the filters in the vector lanes, on a register tile of npconv's micro-kernel family.

The GEMM micro-kernel (``gemm.py``) broadcasts the filters' weights and loads the positions as vectors, so its
positions must be contiguous in memory: a patch matrix (im2col), or tap offsets into planes whose rows are padded,
which computes the padding's positions too. Here the roles are swapped: a tile is ``MR`` output positions (the rows,
one broadcast each per step) by ``NV`` vectors of filters (``NR = NV * VW`` of them, their weights loaded as
vectors), so the positions need not be a vector: a tile is ``MR`` consecutive positions of one output row, read in
place from the input planes through tap offsets, and a row of ``OW`` positions costs ``ceil(OW / MR) * MR`` of them,
with ``MR`` chosen per layer from 4 to 14 to fit ``OW`` (13 for a 13-wide map, 14 for 28, 11 for 55 or 110). The
whole reduction (every channel and tap) runs in the registers, with no K blocks and no partial sums in memory.

Layout. The input is copied once per call into zero-padded planes split by the column phases of the stride
(:func:`pack_lanes_input`: each channel ``sw`` planes of ``Hp`` rows of ``Wq`` values, phase ``pw`` holding padded
columns ``xc*sw + pw``), so that output column ``ox`` of tap column ``kw`` reads column ``ox + (kw*dw) // sw`` of
phase ``(kw*dw) % sw``: consecutive positions are consecutive values for every stride, and the tile's ``MR`` broadcasts
are at constant offsets ``0 .. MR - 1`` from one base. Tap ``k`` = (channel, kernel row, kernel column) is at
``koff[k]`` from the position's base. The weights are packed k-major per block of ``NR`` filters (``gemm.pack_a``
with ``NR`` rows). A tile's sums go to a scratch tile (position-major) and are copied into the ``NR`` output planes
with the bias.

The register tile needs 32 vector registers (``MR * NV`` accumulators, ``NV`` weight vectors and a broadcast):
AVX-512 only (:func:`lanes_tile`).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from ._pack import pack_plane
from .gemm import TileIR, tile_shape

__all__ = ["lanes_tile", "lanes_rows", "LANES_ROWS", "conv_lanes", "pack_lanes_input"]

#: the tile heights (output positions a tile) there are kernels for
LANES_ROWS = tuple(range(4, 15))


def lanes_tile(dtype):
    """(VW, NV) of the lanes tile for ``dtype`` on this CPU (``NV`` vectors of ``VW`` filters), or None: it needs
    AVX-512's 32 vector registers (the GEMM tile of 12 rows)."""
    shape = tile_shape(dtype)
    if shape is None or shape[1] != 12:
        return None
    return shape[0], 2


def lanes_rows(OW):
    """The tile height for an output row of ``OW`` positions: the one in :data:`LANES_ROWS` that computes the fewest
    positions for the row (``ceil(OW / MR) * MR``), the tallest on a tie (fewer tiles, each loading its weights
    once for more positions)."""
    return min(LANES_ROWS, key=lambda mr: (-(-OW // mr) * mr, -mr))


def _lanes_codegen(is32, VW, MR, NV):
    """LLVM IR of one tile: ``c[coff + i*NR + j] = sum_k x[xoff + i + koff[k]] * w[woff + k*NR + j]`` for ``i < MR``,
    ``j < NR = NV*VW``, ``k < K``."""
    NR = NV * VW

    def codegen(context, builder, signature, args):
        w_v, woff_v, x_v, xoff_v, koff_v, c_v, coff_v, K_v = args
        t = TileIR(context, builder, signature, is32, VW)
        Wb = builder.gep(t.data(0, w_v), [woff_v])
        X = builder.gep(t.data(2, x_v), [xoff_v])
        KOFF = t.data(4, koff_v)
        C = builder.gep(t.data(5, c_v), [coff_v])

        def step(kphi, accs):
            ko = builder.load(builder.gep(KOFF, [kphi]))
            wrow = builder.mul(kphi, t.const(NR))
            wvs = [builder.load(t.vptr(Wb, builder.add(wrow, t.const(v * VW))), align=1) for v in range(NV)]
            new = []
            for i in range(MR):
                # the positions' broadcasts: constant offsets from one base, so one pointer serves the tile
                s = t.splat(builder.load(builder.gep(X, [builder.add(ko, t.const(i))])))
                for v in range(NV):
                    new.append(t.fma(s, wvs[v], accs[i * NV + v]))
            return new

        fin = t.k_loop(K_v, MR * NV, step, "npc_lanes")
        for q in range(MR * NV):
            builder.store(fin[q], t.vptr(C, t.const(q * VW)), align=1)
        return context.get_dummy_value()

    return codegen


def _lanes_intrinsic(MR):
    def microkernel_lanes(typingctx, w, woff, x, xoff, koff, c, coff, K):
        arrs = (w, x, c)
        if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" for t in arrs):
            return None
        if len(set(t.dtype for t in arrs)) != 1 or w.dtype not in (types.float32, types.float64):
            return None
        if not (isinstance(koff, types.Array) and koff.dtype == types.int64 and koff.ndim == 1):
            return None
        is32 = w.dtype == types.float32
        tile = lanes_tile(np.float32 if is32 else np.float64)
        if tile is None:
            return None
        i8 = types.int64
        return types.void(w, i8, x, i8, koff, c, i8, i8), _lanes_codegen(is32, tile[0], MR, tile[1])
    microkernel_lanes.__doc__ = f"""``microkernel_lanes{MR}(w, woff, x, xoff, koff, c, coff, K)``: {MR} positions by
    :func:`lanes_tile`'s filters, ``c[coff + i*NR + j] = sum_k x[xoff + i + koff[k]] * w[woff + k*NR + j]``."""
    return intrinsic(microkernel_lanes)


microkernel_lanes4 = _lanes_intrinsic(4)
microkernel_lanes5 = _lanes_intrinsic(5)
microkernel_lanes6 = _lanes_intrinsic(6)
microkernel_lanes7 = _lanes_intrinsic(7)
microkernel_lanes8 = _lanes_intrinsic(8)
microkernel_lanes9 = _lanes_intrinsic(9)
microkernel_lanes10 = _lanes_intrinsic(10)
microkernel_lanes11 = _lanes_intrinsic(11)
microkernel_lanes12 = _lanes_intrinsic(12)
microkernel_lanes13 = _lanes_intrinsic(13)
microkernel_lanes14 = _lanes_intrinsic(14)


@numba.njit(cache=True, nogil=True)
def _tile(MR, w, woff, x, xoff, koff, c, K):
    """The tile of ``MR`` rows (one of :data:`LANES_ROWS`) into ``c``."""
    if MR == 14:
        microkernel_lanes14(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 13:
        microkernel_lanes13(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 12:
        microkernel_lanes12(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 11:
        microkernel_lanes11(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 10:
        microkernel_lanes10(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 9:
        microkernel_lanes9(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 8:
        microkernel_lanes8(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 7:
        microkernel_lanes7(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 6:
        microkernel_lanes6(w, woff, x, xoff, koff, c, 0, K)
    elif MR == 5:
        microkernel_lanes5(w, woff, x, xoff, koff, c, 0, K)
    else:
        microkernel_lanes4(w, woff, x, xoff, koff, c, 0, K)


@numba.njit(parallel=True, cache=True, nogil=True)
def conv_lanes(wp, F, K, NR, MR, xq, ximg, koff, OH, OW, rowstep, nimg, out, bias, has_bias, nchunk):
    """``out[n, f, oy, ox] = sum_k W[f, k] * xq[n*ximg + oy*rowstep + ox + koff[k]] (+ bias[f])`` (``out`` flat,
    NCHW); ``wp`` is ``W`` (F, K) packed by ``gemm.pack_a`` in blocks of ``NR`` filters, ``xq`` the planes of
    :func:`pack_lanes_input` (readable ``MR`` values past the last position of every row). A job is (block of
    ``NR`` filters, one of ``nchunk`` runs of tiles); a tile is ``MR`` positions of one output row."""
    P = OH * OW
    tpr = (OW + MR - 1) // MR
    ntile = nimg * OH * tpr
    nfb = (F + NR - 1) // NR
    per = (ntile + nchunk - 1) // nchunk
    for job in numba.prange(nfb * nchunk):
        fb = job // nchunk
        ch = job - fb * nchunk
        scratch = np.empty(MR * NR, out.dtype)
        nf = min(NR, F - fb * NR)
        for t in range(ch * per, min(ntile, (ch + 1) * per)):
            row = t // tpr
            ox0 = (t - row * tpr) * MR
            n = row // OH
            oy = row - n * OH
            _tile(MR, wp, fb * K * NR, xq, n * ximg + oy * rowstep + ox0, koff, scratch, K)
            m = min(MR, OW - ox0)
            for f in range(nf):
                ff = fb * NR + f
                bv = bias[ff] if has_bias else 0.0
                d = out[(n * F + ff) * P + oy * OW + ox0:]
                for e in range(m):
                    d[e] = scratch[e * NR + f] + bv


@numba.njit(parallel=True, cache=True, nogil=True)
def pack_lanes_input(x, pt, pl, sw, Hp, Wq, xq):
    """``xq[(((n*C + c)*sw + pw)*Hp + y)*Wq + xc] = x_padded[n, c, y, xc*sw + pw]`` (zero outside ``x``, ``pt``
    rows above and ``pl`` columns left of it), for ``y < Hp``, ``xc < Wq``: each channel's plane padded and split
    by the column phases (``_pack.pack_plane`` with one row phase)."""
    N, C = x.shape[0], x.shape[1]
    planes = xq[:N * C * sw * Hp * Wq].reshape(N * C, 1, sw, Hp, Wq)
    for job in numba.prange(N * C):
        pack_plane(x[job // C, job % C], pt, pl, np.int64(1), sw, planes[job])


from .plan import watch as _watch  # noqa: E402  (planned kernels: kernels/cpu/plan.py)
_watch(__name__)
