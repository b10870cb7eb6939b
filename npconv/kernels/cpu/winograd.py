"""Numba kernels of the Winograd F(2x2, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016).

A 3x3, stride-1 convolution computes each 2x2 output tile from a 4x4 input tile ``d`` as
``Y = A^T [ (G g G^T) .* (B^T d B) ] A`` with

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

Summed over input channels, the elementwise product becomes 16 independent matrix products, one per position
``xi`` of the 4x4 transformed tile: ``M[xi] (F, T) = U[xi] (F, C) @ V[xi] (C, T)`` over the T tiles of a chunk of
images. That is 16 multiplies per 4 outputs instead of 36: 2.25x fewer multiply-adds than the direct form (fewer
where the tiles overhang an odd-sized output). The GEMMs are BLAS calls made by the caller
(:mod:`npconv.functional.winograd`); these kernels do the three transforms:

* :func:`weight_transform` ``U[xi, f, c] = (G g_fc G^T)[xi]``;
* :func:`input_transform` ``V[xi, c, t] = (B^T d_t B)[xi]``, tile ``t = i * TH * TW + ty * TW + tx`` of image
  ``n0 + i`` reading the zero-padded input (each job copies its plane, padded, into scratch first, so the
  transform has no bounds tests);
* :func:`output_transform` ``y[n0 + i, f, 2ty + a, 2tx + b] = (A^T M_t A)[a, b] + bias[f]``, cropped to the
  output size.

The three arrays U, V and M are each 16 matrices, and every transform touches all 16 at once. Laid out back to
back, their starts are a multiple of 4 KiB apart whenever the matrix size is (e.g. 256 x 384 floats), so the 16
streams fall into the same L1 cache set and evict each other: the weight transform of AlexNet conv5 measured 1.6 ms
that way and about 0.1 ms with the matrices padded apart. The kernels therefore take flat buffers and the stride
between matrices, which the driver pads (``_winograd._stride``).
"""
from __future__ import annotations

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .gemm import TileIR



@numba.njit(parallel=True, cache=True, nogil=True)
def weight_transform(w, Uf, FC):
    """U from the 3x3 filters w (F, C, 3, 3) (C-contiguous): ``Uf[xi * FC + f * C + c] = (G w[f, c] G^T)[xi]``
    (xi = 4a + b), computed in float64. ``FC`` >= F*C is the stride between the 16 matrices (see the module
    docstring on 4K aliasing). Flat offsets, no per-filter slices (numba's slice cost dominated a slicing version)."""
    F = w.shape[0]
    C = w.shape[1]
    wf = w.reshape(F * C * 9)
    for f in numba.prange(F):
        for c in range(C):
            o = (f * C + c) * 9
            d = f * C + c
            # the filter's rows (a0 a1 a2), (b0 b1 b2), (c0 c1 c2)
            a0 = np.float64(wf[o])
            a1 = np.float64(wf[o + 1])
            a2 = np.float64(wf[o + 2])
            b0 = np.float64(wf[o + 3])
            b1 = np.float64(wf[o + 4])
            b2 = np.float64(wf[o + 5])
            c0 = np.float64(wf[o + 6])
            c1 = np.float64(wf[o + 7])
            c2 = np.float64(wf[o + 8])
            # t = G g (4x3), rows: g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2 (written out: numba kept a loop over the rows
            # with its branches, 16x slower)
            p0 = 0.5 * (a0 + b0 + c0)
            p1 = 0.5 * (a1 + b1 + c1)
            p2 = 0.5 * (a2 + b2 + c2)
            m0 = 0.5 * (a0 - b0 + c0)
            m1 = 0.5 * (a1 - b1 + c1)
            m2 = 0.5 * (a2 - b2 + c2)
            # each row (t0 t1 t2) of t gives the U row (t0, (t0+t1+t2)/2, (t0-t1+t2)/2, t2)
            Uf[d] = a0
            Uf[FC + d] = 0.5 * (a0 + a1 + a2)
            Uf[2 * FC + d] = 0.5 * (a0 - a1 + a2)
            Uf[3 * FC + d] = a2
            Uf[4 * FC + d] = p0
            Uf[5 * FC + d] = 0.5 * (p0 + p1 + p2)
            Uf[6 * FC + d] = 0.5 * (p0 - p1 + p2)
            Uf[7 * FC + d] = p2
            Uf[8 * FC + d] = m0
            Uf[9 * FC + d] = 0.5 * (m0 + m1 + m2)
            Uf[10 * FC + d] = 0.5 * (m0 - m1 + m2)
            Uf[11 * FC + d] = m2
            Uf[12 * FC + d] = c0
            Uf[13 * FC + d] = 0.5 * (c0 + c1 + c2)
            Uf[14 * FC + d] = 0.5 * (c0 - c1 + c2)
            Uf[15 * FC + d] = c2


@intrinsic
def input_tile_row(typingctx, sc, soff, M, V, voff, CT, n, full):
    """``input_tile_row(sc, soff, M, V, voff, CT, n, full)``: ``V[voff + xi*CT + tx] = (B^T d_tx B)[xi]`` for the
    ``n`` <= 7 consecutive tiles ``d_tx`` of one tile row, from the 4 padded rows at ``sc[soff + r*M]`` (16 values
    readable from each). Vectorised over the tiles: the rows' combinations (``B^T d``) as 16-value vectors, the
    columns' as 8-lane vectors gathered from them by shuffles (tile ``tx`` reads lanes ``2tx .. 2tx + 3``). With
    ``full`` it stores all 8 lanes of each of the 16 results (the caller makes sure the 8th lands on a value
    written later), else lanes ``< n`` one by one. The same additions in the same order as the textbook form, so
    the results are bitwise those of scalar code."""
    if not (isinstance(sc, types.Array) and isinstance(V, types.Array) and sc.dtype == V.dtype
            and sc.dtype in (types.float32, types.float64)):
        return None
    is32 = sc.dtype == types.float32
    i8 = types.int64

    def codegen(context, builder, signature, args):
        sc_v, soff_v, M_v, V_v, voff_v, CT_v, n_v, full_v = args
        t = TileIR(context, builder, signature, is32, 8)
        fty = ir.FloatType() if is32 else ir.DoubleType()
        v16 = ir.VectorType(fty, 16)
        v8 = ir.VectorType(fty, 8)
        i32 = ir.IntType(32)
        S = builder.gep(t.data(0, sc_v), [soff_v])
        Vb = builder.gep(t.data(3, V_v), [voff_v])
        a0, a1, a2, a3 = (builder.load(builder.bitcast(builder.gep(S, [builder.mul(M_v, t.const(r))]),
                                                       v16.as_pointer()), align=1) for r in range(4))
        rows = [builder.fsub(a0, a2), builder.fadd(a1, a2), builder.fsub(a2, a1), builder.fsub(a1, a3)]
        undef = ir.Constant(v16, ir.Undefined)

        def lanes(v, first):
            # lanes first, first + 2, ...: lane 16 and up are the undefined operand's (never stored)
            idx = [min(first + 2 * j, 16) for j in range(8)]
            return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(i32, 8), idx))

        full = builder.icmp_signed("!=", full_v, t.const(0))
        for k in range(4):
            e0, e1, e2, e3 = (lanes(rows[k], f) for f in range(4))
            outs = [builder.fsub(e0, e2), builder.fadd(e1, e2), builder.fsub(e2, e1), builder.fsub(e1, e3)]
            for j in range(4):
                base = builder.gep(Vb, [builder.mul(CT_v, t.const(4 * k + j))])
                with builder.if_else(full) as (whole, part):
                    with whole:
                        builder.store(outs[j], builder.bitcast(base, v8.as_pointer()), align=1)
                    with part:
                        for lane in range(7):
                            with builder.if_then(builder.icmp_signed("<", t.const(lane), n_v)):
                                builder.store(builder.extract_element(outs[j], ir.Constant(i32, lane)),
                                              builder.gep(base, [t.const(lane)]))
        return context.get_dummy_value()

    return types.void(sc, i8, i8, V, i8, i8, i8, i8), codegen


@numba.njit(parallel=True, cache=True, nogil=True)
def input_transform(x, n0, nimg, pt, pl, TH, TW, Vf, T, CT, scratch):
    """``Vf[xi * CT + c * T + i*TH*TW + ty*TW + tx] = (B^T d B)[xi]`` for the 4x4 tile d of the padded input of
    image n0 + i, channel c, at padded rows [2ty, 2ty + 4) and columns [2tx, 2tx + 4); ``T`` tiles per channel
    row, ``CT`` >= C*T the stride between the 16 matrices.

    One parallel job per (channel, image), channel-major: the threads' consecutive jobs write one channel's rows of
    the 16 matrices front to back, where image-major jobs wrote each row in short runs from many jobs (ZF conv5 at
    batch 128: the transform 69 -> 35 ms, the layer 1.11x faster; 2-core Zen 4 VM, 2026-11-27). ``scratch``
    (threads, (2*TH + 2) * (2*TW + 2) + 4 * (2*TW + 2)) holds each thread's zero-padded plane, with room past it
    for the 16-value row loads of :func:`input_tile_row`, which transforms seven tiles of a row at a time (2.0-2.3x
    faster than the scalar loops it replaced, bitwise the same results). Offsets are flat: with 13x13 images (7
    tiles a row) numba's per-slice cost made a slicing version 3x slower.
    """
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    R = 2 * TH + 2
    M = 2 * TW + 2
    TT = TH * TW
    for job in numba.prange(nimg * C):
        c = job // nimg
        i = job - c * nimg
        sc = scratch[numba.get_thread_id()]
        xin = x[n0 + i, c]
        # the padded plane: columns [lo, hi) of a row hold input columns, the rest zeros
        lo = min(M, pl)
        hi = max(lo, min(M, W + pl))
        for r in range(R):
            ih = r - pt
            rb = r * M
            if ih < 0 or ih >= H:
                for m in range(M):
                    sc[rb + m] = 0
            else:
                for m in range(lo):
                    sc[rb + m] = 0
                src = xin[ih]
                for m in range(hi - lo):
                    sc[rb + lo + m] = src[m + lo - pl]
                for m in range(hi, M):
                    sc[rb + m] = 0
        o = c * T + i * TT
        for ty in range(TH):
            for tx0 in range(0, TW, 7):
                # seven tiles at a time, all 8 lanes stored where the lanes past the segment land on this
                # image's later tiles (written after by this job), else only the segment's
                t0 = ty * TW + tx0
                input_tile_row(sc, 2 * ty * M + 2 * tx0, M, Vf, o + t0, CT, min(7, TW - tx0),
                               1 if t0 + 8 <= TT else 0)


@numba.njit(parallel=True, cache=True, nogil=True)
def output_transform(Mf, T, FT, n0, nimg, TH, TW, bias, has_bias, y):
    """y[n0 + i, f, 2ty + a, 2tx + b] = (A^T m A)[a, b] (+ bias[f]) for the tiles ``m[xi] = Mf[xi * FT + f * T +
    t]``, cropped to y's (OH, OW). One parallel job per (output channel, image), channel-major as in
    :func:`input_transform` (it reads each channel's rows of the 16 matrices front to back); flat offsets as
    there."""
    F = y.shape[1]
    OH = y.shape[2]
    OW = y.shape[3]
    TT = TH * TW
    nfull = min(TW, OW // 2)
    for job in numba.prange(nimg * F):
        f = job // nimg
        i = job - f * nimg
        b = bias[f] if has_bias else 0.0
        yf = y[n0 + i, f].reshape(OH * OW)
        for ty in range(TH):
            s = f * T + i * TT + ty * TW
            two = 2 * ty + 1 < OH
            y0 = 2 * ty * OW
            y1 = y0 + OW
            for tx in range(TW):
                t = s + tx
                m0 = Mf[t]
                m1 = Mf[FT + t]
                m2 = Mf[2 * FT + t]
                m3 = Mf[3 * FT + t]
                m4 = Mf[4 * FT + t]
                m5 = Mf[5 * FT + t]
                m6 = Mf[6 * FT + t]
                m7 = Mf[7 * FT + t]
                m8 = Mf[8 * FT + t]
                m9 = Mf[9 * FT + t]
                m10 = Mf[10 * FT + t]
                m11 = Mf[11 * FT + t]
                q00 = m0 + m4 + m8
                q01 = m1 + m5 + m9
                q02 = m2 + m6 + m10
                q03 = m3 + m7 + m11
                yf[y0 + 2 * tx] = q00 + q01 + q02 + b
                if tx < nfull:
                    yf[y0 + 2 * tx + 1] = q01 - q02 - q03 + b
                if two:
                    m12 = Mf[12 * FT + t]
                    m13 = Mf[13 * FT + t]
                    m14 = Mf[14 * FT + t]
                    m15 = Mf[15 * FT + t]
                    q10 = m4 - m8 - m12
                    q11 = m5 - m9 - m13
                    q12 = m6 - m10 - m14
                    q13 = m7 - m11 - m15
                    yf[y1 + 2 * tx] = q10 + q11 + q12 + b
                    if tx < nfull:
                        yf[y1 + 2 * tx + 1] = q11 - q12 - q13 + b
