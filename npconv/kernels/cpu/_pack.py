"""Shared packing helper of the numba kernels: one input plane, zero-padded and split by the stride phases.

In the phase-split layout ``dst[p, q, r, m] = x_padded[r * sh + p, m * sw + q]`` every tap of a strided
convolution reads contiguous runs: the tap at padded offset (a, b) of output (oh, ow) is
``dst[a % sh, b % sw, oh + a // sh, ow + b // sw]``. The zero padding is materialised once, so the consumers
have no bounds tests. Used by the dense im2col (``im2col.py``), the biclustered front ends (``bicluster.py``) and
the lanes kernel (``conv_lanes.py``, one row phase).
"""
from __future__ import annotations

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .gemm import prefetch_read

#: unstrided planes up to this many padded elements are zeroed whole before the copy
_SMALL_PLANE = 4096


def _vector_width(dtype):
    """Values of a 64-byte vector of ``dtype`` (an AVX-512 register; LLVM splits it where the CPU's are narrower)."""
    return 16 if dtype == types.float32 else 8


@intrinsic
def deinterleave2(typingctx, src, soff, da, aoff, na, ma, db, boff, nb, mb):
    """``deinterleave2(src, soff, da, aoff, na, ma, db, boff, nb, mb)``: for ``e < ma``, ``da[aoff + e] =
    src[soff + 2e]`` if ``e < na`` else 0; for ``e < mb``, ``db[boff + e] = src[soff + 2e + 1]`` if ``e < nb`` else 0;
    ``na <= ma`` and ``nb <= mb`` at most a vector (16 float32 or 8 float64 values). Two masked vector loads, two
    shuffles, two masked stores: only the values named are read or written (with ``na = nb = 0`` nothing is read:
    a run of zeros). ``src``, ``da`` and ``db`` are 1-D contiguous arrays of one float dtype.

    Why not loops: LLVM turns a loop that stores zeros into a call of ``memset``, and a row's few padding values
    then cost a library call each (the stride-2 split of a 55-wide row took 80 cycles, most of them in four such
    calls)."""
    arrs = (src, da, db)
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" for t in arrs):
        return None
    if len({t.dtype for t in arrs}) != 1 or src.dtype not in (types.float32, types.float64):
        return None
    VW = _vector_width(src.dtype)

    def codegen(context, builder, signature, args):
        src_v, soff_v, da_v, aoff_v, na_v, ma_v, db_v, boff_v, nb_v, mb_v = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fty = ir.FloatType() if src.dtype == types.float32 else ir.DoubleType()
        vty = ir.VectorType(fty, VW)
        mty = ir.VectorType(ir.IntType(1), VW)
        lty = ir.VectorType(i64, VW)
        name = "v%d%s.p0" % (VW, "f32" if VW == 16 else "f64")
        align = ir.Constant(i32, src.dtype.bitwidth // 8)
        load = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mty, vty]),
                                              "llvm.masked.load." + name)
        store = cgutils.get_or_insert_function(builder.module,
                                               ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), i32, mty]),
                                               "llvm.masked.store." + name)

        def i64_of(k):
            return context.cast(builder, args[k], signature.args[k], types.int64)

        def ptr(k, off_k, extra=0):
            data = context.make_array(signature.args[k])(context, builder, args[k]).data
            return builder.bitcast(builder.gep(data, [builder.add(i64_of(off_k), ir.Constant(i64, extra))]),
                                   vty.as_pointer())

        def below(first, n):
            """The mask of lanes ``first + l < n``."""
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(lty, ir.Undefined), n,
                                                                  ir.Constant(i32, 0)),
                                           ir.Constant(lty, ir.Undefined),
                                           ir.Constant(ir.VectorType(i32, VW), [0] * VW))
            return builder.icmp_signed("<", ir.Constant(lty, [first + l for l in range(VW)]), splat)

        na64, nb64 = i64_of(4), i64_of(8)
        zero = ir.Constant(vty, [0.0] * VW)
        evens = ir.Constant(ir.VectorType(i32, VW), [2 * l for l in range(VW)])
        odds = ir.Constant(ir.VectorType(i32, VW), [2 * l + 1 for l in range(VW)])
        full = ir.Constant(i64, VW)
        whole = builder.and_(builder.icmp_signed("==", na64, full), builder.icmp_signed("==", nb64, full))
        with builder.if_else(whole, likely=True) as (then, otherwise):
            with then:
                # a whole vector of each (a row's interior): plain loads and stores, masks cost twice the time
                lo = builder.load(ptr(0, 1), align=1)
                hi = builder.load(ptr(0, 1, VW), align=1)
                builder.store(builder.shuffle_vector(lo, hi, evens), ptr(2, 3), align=1)
                builder.store(builder.shuffle_vector(lo, hi, odds), ptr(6, 7), align=1)
            with otherwise:
                # source values 0 .. need - 1 are read: 2*na - 1 for the last even one, 2*nb for the last odd one
                last_even = builder.sub(builder.add(na64, na64), ir.Constant(i64, 1))
                odd_end = builder.add(nb64, nb64)
                need = builder.select(builder.icmp_signed(">", last_even, odd_end), last_even, odd_end)
                lo = builder.call(load, [ptr(0, 1), align, below(0, need), zero])
                hi = builder.call(load, [ptr(0, 1, VW), align, below(VW, need), zero])
                even = builder.select(below(0, na64), builder.shuffle_vector(lo, hi, evens), zero)
                odd = builder.select(below(0, nb64), builder.shuffle_vector(lo, hi, odds), zero)
                builder.call(store, [even, ptr(2, 3), align, below(0, i64_of(5))])
                builder.call(store, [odd, ptr(6, 7), align, below(0, i64_of(9))])
        return context.get_dummy_value()

    return types.void(src, soff, da, aoff, na, ma, db, boff, nb, mb), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def split_row2(src, W, pl, da, db):
    """One input row split by the two column phases of stride 2, zero-padded by ``pl`` columns on the left:
    ``da[m] = src[2m - pl + pl % 2]`` and ``db[m] = src[2m - pl + 1 - pl % 2]`` where those columns exist, 0
    elsewhere (da is phase ``pl % 2``, db the other; both have the same length).

    Input columns 2e and 2e+1 land at ``m = e + pl // 2`` of da and ``m = e + (pl + 1) // 2`` of db, so one pass
    reads the row once and writes both phases, a vector of each at a time (:func:`deinterleave2`: masked loads, two
    shuffles, masked stores, the padding's zeros included). Against a loop of paired scalar copies and zero loops, a
    55 x 55 float32 channel (ZF conv2's input) packed at stride 2 in 0.60-0.71 us instead of 1.47-1.54 (one thread);
    one strided gather per phase had run at half the speed of that loop (the polyphase fill of the monochromatic ZF
    conv1).
    """
    M = da.shape[0]
    VW = 64 // src.itemsize
    sa = min(pl // 2, M)
    sb = min((pl + 1) // 2, M)
    na = max(0, min(M - sa, (W + 1) // 2))
    nbb = max(0, min(M - sb, W // 2))
    # the left padding's zeros
    for z in range(0, max(sa, sb), VW):
        deinterleave2(src, 0, da, z, 0, max(0, min(VW, sa - z)), db, z, 0, max(0, min(VW, sb - z)))
    # the row's values, then the right padding's zeros
    ta = M - sa
    tb = M - sb
    for e0 in range(0, max(ta, tb), VW):
        deinterleave2(src, 2 * e0, da, sa + e0, max(0, min(VW, na - e0)), max(0, min(VW, ta - e0)),
                      db, sb + e0, max(0, min(VW, nbb - e0)), max(0, min(VW, tb - e0)))


@numba.njit(cache=True, nogil=True)
def pack_plane(xin, pt, pl, sh, sw, dst):
    """dst[p, q, r, m] = xin[r*sh + p - pt, m*sw + q - pl] (0 outside): one channel, phase-split and padded.

    xin (H, W); dst (sh, sw, R, M). Stride-2 columns are split with paired contiguous stores.
    """
    _pack(xin, pt, pl, sh, sw, dst, dst.reshape(dst.size), np.int64(-1))   # -1: no fetch


@numba.njit(cache=True, nogil=True)
def pack_plane_ahead(xin, pt, pl, sh, sw, dst, nflat, noff):
    """:func:`pack_plane`, and the next plane to be packed fetched into the cache meanwhile: as each row of ``xin``
    is read, the same row of the (H, W) plane at ``nflat[noff:]`` (``nflat`` 1-D contiguous; none with ``noff``
    < 0). A packing job that streams its channels from memory then finds each in the cache: ZF conv2's 55 x 55
    float32 channels, 32 images (37 MB) packed one after another on one thread, 1.50-1.53 us a channel without,
    0.89-0.92 with (one to eight channels ahead alike; 0.65-0.68 from L1). Fetching a whole plane at once before
    packing the current one was slower than no fetch (2.7 us: some 190 lines requested at once)."""
    _pack(xin, pt, pl, sh, sw, dst, nflat, noff)


@numba.njit(cache=True, nogil=True, inline="always")
def _fetch_row(nflat, noff, ih, W):
    """prefetch_read of the cache lines of row ``ih`` of the (., W) plane at ``nflat[noff:]`` (``noff`` >= 0)."""
    s = noff + ih * W
    for e in range(s, s + W, 64 // nflat.itemsize):
        prefetch_read(nflat, e)
    prefetch_read(nflat, s + W - 1)


@numba.njit(cache=True, nogil=True)
def _pack(xin, pt, pl, sh, sw, dst, nflat, noff):
    """:func:`pack_plane_ahead` (``noff`` < 0: :func:`pack_plane`)."""
    SH, SW, R, M = dst.shape
    H = xin.shape[0]
    W = xin.shape[1]
    if SH == 1 and SW == 1 and R * M <= _SMALL_PLANE:
        # a small unstrided plane: zero it whole, then copy the interior rows -- two long loops instead of three
        # short ones per row (13x13 maps packed 2.2x faster, the per-row overhead dominating)
        flat = dst.reshape(R * M)
        for e in range(R * M):
            flat[e] = 0
        r_lo = min(max(pt, 0), R)
        r_hi = max(r_lo, min(R, H + pt))
        m_lo = min(max(pl, 0), M)
        m_hi = max(m_lo, min(M, W + pl))
        for r in range(r_lo, r_hi):
            if noff >= 0:
                _fetch_row(nflat, noff, r - pt, W)
            sv = xin[r - pt, m_lo - pl:]
            dv = flat[r * M + m_lo:]
            for e in range(m_hi - m_lo):
                dv[e] = sv[e]
        return
    for p in range(SH):
        for r in range(R):
            ih = r * sh + p - pt
            if ih < 0 or ih >= H:
                for q in range(SW):
                    d = dst[p, q, r]
                    for m in range(M):
                        d[m] = 0
                continue
            if noff >= 0:
                _fetch_row(nflat, noff, ih, W)
            src = xin[ih]
            if sw == 1:
                d = dst[p, 0, r]
                m_lo = min(pl, M)
                m_hi = min(M, W + pl)
                for m in range(m_lo):
                    d[m] = 0
                dv = d[m_lo:m_hi]
                sv = src[m_lo - pl:m_hi - pl]
                for e in range(m_hi - m_lo):
                    dv[e] = sv[e]
                for m in range(m_hi, M):
                    d[m] = 0
            elif sw == 2:
                split_row2(src, W, pl, dst[p, pl % 2, r], dst[p, 1 - pl % 2, r])
            else:
                for q in range(SW):
                    d = dst[p, q, r]
                    off = q - pl
                    for m in range(M):
                        col = m * sw + off
                        if col >= 0 and col < W:
                            d[m] = src[col]
                        else:
                            d[m] = 0
