"""npconv's own GEMM micro-kernel, written in LLVM IR through a numba intrinsic.

Why: OpenBLAS's SGEMM, which the dense conv and the factored layers call, keeps its accumulators in registers but
packs both operands first and runs its own threads; numba's auto-vectoriser cannot keep a register tile of
accumulators across a reduction loop (it keeps them in memory, or unrolls to scalars), so a GEMM written in plain
numba code runs at a few GFLOP/s. This module emits the register tile directly: ``MR x NV`` vector accumulators
(LLVM ``<VW x float>`` values carried by phi nodes through the ``k`` loop), one broadcast of ``A`` per row and one
vector load of ``B`` per column vector each step, ``llvm.fma`` for every product. LLVM allocates the registers and
schedules the loop for the host CPU (numba compiles for it), so the same IR serves AVX-512 (16 floats a vector)
and AVX2 (8) with the tile chosen to fit the register file (:func:`tile_shape`).

The micro-kernel computes one tile::

    C[i, j] (op)= sum_{k < K} A[aoff + k*MR + i] * B[boff + k*ldb + j]      i < MR, j < NV*VW

``A`` is packed (for each ``k`` the ``MR`` values of a row block, contiguous); ``B`` is read in place, row ``k`` at
``boff + k*ldb``, which covers both a row-major matrix and a panel-major copy. ``mode`` selects the write:
0 stores the sum, 1 adds it to ``C``, 2 stores the sum plus ``bias[boff_bias + i]`` on each row.
Callers guarantee that every address the tile touches is in bounds (:mod:`npconv.kernels.cpu.gemm` routes edge
tiles through a scratch tile).
"""
from __future__ import annotations

import functools

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .plan import run as _plan_run
from .plan import watch as _watch

__all__ = ["tile_shape", "taps_tile_shapes", "microkernel", "microkernel_rows4", "microkernel_rows8",
           "microkernel_cols1", "microkernel_taps12", "microkernel_taps8", "microkernel_taps4",
           "microkernel_taps_rows4", "microkernel_taps_rows8", "microkernel_taps1", "TAPS1_BYTES", "prefetch_write",
           "prefetch_read", "prefetch_run", "matmul_local",
           "pack_a", "gemm_images", "matmul", "gemm_stream", "matmul_stream", "STREAM_MAX_K", "KC_BYTES",
           "PREFETCH_PANELS"]


@functools.lru_cache(maxsize=None)
def _target_features():
    """The CPU features numba compiles for: ``NUMBA_CPU_FEATURES`` when set, none known for another
    ``NUMBA_CPU_NAME`` without them (the callers then keep BLAS), else the host's."""
    feats = numba.config.CPU_FEATURES
    if feats:
        return frozenset(f[1:] for f in feats.split(",") if f.startswith("+"))
    if numba.config.CPU_NAME not in (None, "host"):
        return frozenset()
    try:
        import llvmlite.binding as llb
        return frozenset(k for k, v in llb.get_host_cpu_features().items() if v)
    except Exception:   # pragma: no cover - llvmlite without host feature queries
        return frozenset()


def tile_shape(dtype, features=None):
    """(VW, MR, NV) of the register tile for ``dtype`` on this CPU, or None where the micro-kernel is not used.

    AVX-512 (32 vector registers): 12 rows x 2 vectors = 24 accumulators, 2 loads of B and 12 broadcasts of A per
    24 FMAs. AVX2 (16 registers): 6 x 2 = 12 accumulators. Without AVX2 the callers keep BLAS.
    """
    feats = _target_features() if features is None else set(features)
    item = np.dtype(dtype).itemsize
    if "avx512f" in feats:
        return 64 // item, 12, 2
    if "avx2" in feats and "fma" in feats:
        return 32 // item, 6, 2
    return None


def taps_tile_shapes(dtype, features=None):
    """The (VW, MR, NV) tiles of the ``microkernel_taps*`` kernels for ``dtype`` on this CPU, largest first (the
    direct conv picks the one whose rows its filter groups fill best), or () where there is no micro-kernel: on
    AVX-512 12 x 2, 8 x 3 and 4 x 3 vectors (24, 24 and 12 accumulators of 32 registers), on AVX2 4 x 3."""
    shape = tile_shape(dtype, features)
    if shape is None:
        return ()
    VW = shape[0]
    return ((VW, 12, 2), (VW, 8, 3), (VW, 4, 3)) if shape[1] == 12 else ((VW, 4, 3),)


def _typed_tile(arrs, shape_of):
    """The tile for the arrays' common float dtype, or None (typing fails) for other argument types."""
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" for t in arrs):
        return None, None
    if len(set(t.dtype for t in arrs)) != 1 or arrs[0].dtype not in (types.float32, types.float64):
        return None, None
    is32 = arrs[0].dtype == types.float32
    return is32, shape_of(np.float32 if is32 else np.float64)


class TileIR:
    """The LLVM IR pieces of a register-tile kernel, for one codegen call: the float and vector types, the
    ``llvm.fma`` of the vector type, splats, vector pointers into arrays, and a reduction loop over ``k`` that
    carries vector accumulators in phi nodes (:meth:`k_loop`). Shared by this module's tiles and the lanes kernel
    (``conv_lanes.py``)."""

    def __init__(self, context, builder, signature, is32, VW):
        self.context, self.builder, self.signature = context, builder, signature
        self.i64 = ir.IntType(64)
        self.i32 = ir.IntType(32)
        self.vty = ir.VectorType(ir.FloatType() if is32 else ir.DoubleType(), VW)
        self.fma_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vty, [self.vty] * 3),
                                                     "llvm.fma.v%d%s" % (VW, "f32" if is32 else "f64"))
        self.zero = ir.Constant(self.vty, [0.0] * VW)
        self._undef = ir.Constant(self.vty, ir.Undefined)
        self._splat0 = ir.Constant(ir.VectorType(self.i32, VW), [0] * VW)

    def const(self, n):
        return ir.Constant(self.i64, n)

    def data(self, k, v):
        """The data pointer of array argument ``k`` (its value ``v``)."""
        return self.context.make_array(self.signature.args[k])(self.context, self.builder, v).data

    def splat(self, s):
        b = self.builder
        return b.shuffle_vector(b.insert_element(self._undef, s, ir.Constant(self.i32, 0)), self._undef, self._splat0)

    def vptr(self, base, off):
        """A vector pointer to ``base[off]``."""
        return self.builder.bitcast(self.builder.gep(base, [off]), self.vty.as_pointer())

    def fma(self, a, b, c):
        return self.builder.call(self.fma_fn, [a, b, c])

    def k_loop(self, K_v, nacc, step, name):
        """``for k < K``: ``accs = step(k, accs)`` over ``nacc`` vector accumulators starting at zero; returns their
        final values (zero for ``K <= 0``), the builder positioned after the loop."""
        b = self.builder
        pre = b.block
        loop = b.append_basic_block(name + ".loop")
        done = b.append_basic_block(name + ".done")
        b.cbranch(b.icmp_signed(">", K_v, self.const(0)), loop, done)
        b.position_at_end(loop)
        kphi = b.phi(self.i64)
        kphi.add_incoming(self.const(0), pre)
        accs = []
        for _ in range(nacc):
            p = b.phi(self.vty)
            p.add_incoming(self.zero, pre)
            accs.append(p)
        new = step(kphi, accs)
        knext = b.add(kphi, self.const(1))
        tail = b.block
        kphi.add_incoming(knext, tail)
        for p, n in zip(accs, new):
            p.add_incoming(n, tail)
        b.cbranch(b.icmp_signed("<", knext, K_v), loop, done)
        b.position_at_end(done)
        fin = []
        for n in new:
            p = b.phi(self.vty)
            p.add_incoming(self.zero, pre)
            p.add_incoming(n, tail)
            fin.append(p)
        return fin


def _tile_codegen(is32, VW, MR, NV, taps, astride=None):
    """The LLVM IR of one tile (module docstring). ``taps``: row ``k`` of ``B`` starts at ``boff + koff[k]`` (an
    int64 array argument in the place of ``ldb``) instead of ``boff + k*ldb``. ``astride``: ``A``'s values for step
    ``k`` start at ``aoff + k*astride`` (default ``MR``): a tile of fewer rows than the packing's blocks."""
    astride = MR if astride is None else astride

    def codegen(context, builder, signature, args):
        a_v, aoff_v, b_v, boff_v, ldb_v, c_v, coff_v, ldc_v, K_v, mode_v, bias_v, bb_v = args
        t = TileIR(context, builder, signature, is32, VW)
        A = builder.gep(t.data(0, a_v), [aoff_v])
        B = builder.gep(t.data(2, b_v), [boff_v])
        KOFF = t.data(4, ldb_v) if taps else None
        C = builder.gep(t.data(5, c_v), [coff_v])
        BI = t.data(10, bias_v)

        def step(kphi, accs):
            brow = builder.load(builder.gep(KOFF, [kphi])) if taps else builder.mul(kphi, ldb_v)
            bvs = [builder.load(t.vptr(B, builder.add(brow, t.const(v * VW))), align=1) for v in range(NV)]
            arow = builder.gep(A, [builder.mul(kphi, t.const(astride))])
            new = []
            for i in range(MR):
                s = t.splat(builder.load(builder.gep(arow, [t.const(i)])))
                for v in range(NV):
                    new.append(t.fma(s, bvs[v], accs[i * NV + v]))
            return new

        fin = t.k_loop(K_v, MR * NV, step, "npc_mk")
        add_c = builder.icmp_signed("==", mode_v, t.const(1))
        add_b = builder.icmp_signed("==", mode_v, t.const(2))
        for i in range(MR):
            crow = builder.mul(t.const(i), ldc_v)
            # the bias is read only in mode 2 (its array may be a 1-element placeholder otherwise)
            bsel = builder.select(add_b, builder.add(bb_v, t.const(i)), t.const(0))
            bval = t.splat(builder.load(builder.gep(BI, [bsel])))
            for v in range(NV):
                ptr = t.vptr(C, builder.add(crow, t.const(v * VW)))
                val = fin[i * NV + v]
                with_b = builder.select(add_b, builder.fadd(val, bval), val)
                with cgutils.if_likely(builder, builder.not_(add_c)):
                    builder.store(with_b, ptr, align=1)
                with cgutils.if_unlikely(builder, add_c):
                    builder.store(builder.fadd(builder.load(ptr, align=1), val), ptr, align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def microkernel(typingctx, a, aoff, b, boff, ldb, c, coff, ldc, K, mode, bias, boff_bias):
    """``microkernel(a, aoff, b, boff, ldb, c, coff, ldc, K, mode, bias, boff_bias)``: one ``MR x (NV*VW)`` tile
    (module docstring) of the shape :func:`tile_shape` gives for the arrays' dtype. ``a``, ``b``, ``c`` and
    ``bias`` are 1-D contiguous arrays of one float dtype; offsets and sizes are integers."""
    is32, shape = _typed_tile((a, b, c, bias), tile_shape)
    if shape is None:
        return None
    i8 = types.int64
    return types.void(a, i8, b, i8, i8, c, i8, i8, i8, i8, bias, i8), _tile_codegen(is32, *shape, taps=False)


def _rows_intrinsic(rows):
    def microkernel_part(typingctx, a, aoff, b, boff, ldb, c, coff, ldc, K, mode, bias, boff_bias):
        is32, shape = _typed_tile((a, b, c, bias), tile_shape)
        if shape is None:
            return None
        i8 = types.int64
        return (types.void(a, i8, b, i8, i8, c, i8, i8, i8, i8, bias, i8),
                _tile_codegen(is32, shape[0], rows, shape[2], taps=False, astride=shape[1]))
    microkernel_part.__doc__ = f"""As :func:`microkernel`, the first {rows} rows of a row block only (``A`` packed in
    blocks of :func:`tile_shape`'s ``MR`` rows, which must exceed {rows}): the last, partial row block of a matrix
    whose row count leaves {rows} or fewer (ZF conv2's 256 filters: 21 blocks of 12, then 4 rows)."""
    return intrinsic(microkernel_part)


#: the partial row-block tiles (:func:`gemm_images` takes the smallest that holds the block's rows)
microkernel_rows4 = _rows_intrinsic(4)
microkernel_rows8 = _rows_intrinsic(8)


@intrinsic
def microkernel_cols1(typingctx, a, aoff, b, boff, ldb, c, coff, ldc, K, mode, bias, boff_bias):
    """As :func:`microkernel`, one vector of columns instead of :func:`tile_shape`'s ``NV``: the last panel of a
    matrix whose column count leaves at most one vector there (a 13 x 13 output, 169 columns: 5 panels of 32, then
    9 columns computed as 16 instead of 32)."""
    is32, shape = _typed_tile((a, b, c, bias), tile_shape)
    if shape is None:
        return None
    i8 = types.int64
    return types.void(a, i8, b, i8, i8, c, i8, i8, i8, i8, bias, i8), _tile_codegen(is32, shape[0], shape[1], 1,
                                                                                   taps=False)


def _taps_intrinsic(MR, NV=None):
    """A tap-offset micro-kernel of ``MR`` rows and ``NV`` vectors (``A`` packed in blocks of ``MR``); with ``NV``
    None, the first ``MR`` rows of :func:`tile_shape`'s tile (its vectors, ``A`` packed for its rows)."""
    def microkernel_taps(typingctx, a, aoff, b, boff, koff, c, coff, ldc, K, mode, bias, boff_bias):
        is32, shape = _typed_tile((a, b, c, bias), tile_shape)
        if shape is None or not (isinstance(koff, types.Array) and koff.dtype == types.int64 and koff.ndim == 1):
            return None
        i8 = types.int64
        nv, astride = (NV, None) if NV is not None else (shape[2], shape[1])
        return (types.void(a, i8, b, i8, koff, c, i8, i8, i8, i8, bias, i8),
                _tile_codegen(is32, shape[0], MR, nv, taps=True, astride=astride))
    if NV is not None:
        microkernel_taps.__doc__ = f"""As :func:`microkernel`, with a {MR} x {NV}-vector tile, and row ``k`` of ``B``
        at ``b[boff + koff[k]]`` (``koff`` an int64 array): a convolution's taps as shifted views of one input plane."""
    else:
        microkernel_taps.__doc__ = f"""As :func:`microkernel_rows{MR}` (the first {MR} rows of a row block packed for
        :func:`tile_shape`'s ``MR``), with row ``k`` of ``B`` at ``b[boff + koff[k]]`` as :func:`microkernel_taps12`
        reads it: the last, partial row block of an implicit GEMM (``kernels/cpu/gemm_taps.py``)."""
    return intrinsic(microkernel_taps)


#: the tap-offset kernels by tile (:func:`taps_tile_shapes`); a caller picks one by its MR
microkernel_taps12 = _taps_intrinsic(12, 2)
microkernel_taps8 = _taps_intrinsic(8, 3)
microkernel_taps4 = _taps_intrinsic(4, 3)


@intrinsic
def microkernel_taps1(typingctx, a, aoff, b, boff, koff, c, coff, ldc, K, mode, bias, boff_bias):
    """A one-row tile of :data:`TAPS1_BYTES` (two 64-byte vectors, whatever the CPU: LLVM splits them where its
    vectors are narrower, so that this compiles everywhere): ``c[coff + j] (op)= sum_k a[aoff + k] *
    b[boff + koff[k] + j]`` for ``j < TAPS1_BYTES / itemsize``, the arguments as :func:`microkernel_taps12`'s (``ldc``
    unused). A run of a depthwise pass's output row, its taps as offsets (``gemm_taps.taps_rows``)."""
    is32, shape = _typed_tile((a, b, c, bias), lambda dt: (64 // np.dtype(dt).itemsize, 1, 2))
    if shape is None or not (isinstance(koff, types.Array) and koff.dtype == types.int64 and koff.ndim == 1):
        return None
    i8 = types.int64
    return (types.void(a, i8, b, i8, koff, c, i8, i8, i8, i8, bias, i8),
            _tile_codegen(is32, shape[0], 1, 2, taps=True))


#: bytes of a run of :func:`microkernel_taps1` (128: 32 float32 or 16 float64 values)
TAPS1_BYTES = 128

#: the partial row-block tiles of the tap-offset GEMM (the tile's ``NV`` vectors, ``A`` packed for its ``MR``)
microkernel_taps_rows4 = _taps_intrinsic(4)
microkernel_taps_rows8 = _taps_intrinsic(8)


def _prefetch_intrinsic(rw):
    def prefetch(typingctx, arr, off):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
                and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            a_v, off_v = args
            i32 = ir.IntType(32)
            i8p = ir.IntType(8).as_pointer()
            base = context.make_array(signature.args[0])(context, builder, a_v).data
            off64 = context.cast(builder, off_v, signature.args[1], types.int64)
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            # (address, rw, locality = 2: keep in the outer caches, cache type = data)
            builder.call(fn, [builder.bitcast(builder.gep(base, [off64]), i8p), ir.Constant(i32, rw),
                              ir.Constant(i32, 2), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(arr, off), codegen
    return prefetch


prefetch_write = intrinsic(_prefetch_intrinsic(1))
prefetch_write.__doc__ = """``prefetch_write(arr, off)``: fetch the cache line holding ``arr[off]`` for writing
(``llvm.prefetch`` with rw = 1: ``prefetchw`` on x86), so that stores issued later find it in the cache instead of
each waiting for its line to be read from memory. ``arr`` is a 1-D contiguous array, ``off`` an integer index. A
hint only: it changes no value and never faults; callers keep ``off`` in bounds all the same."""

prefetch_read = intrinsic(_prefetch_intrinsic(0))
prefetch_read.__doc__ = """``prefetch_read(arr, off)``: as :func:`prefetch_write`, for reading (``prefetcht1``)."""



@numba.njit(cache=True, nogil=True, inline="always")
def prefetch_run(b, o, n):
    """``prefetch_read`` of the cache lines under ``b[o:o + n]`` for a run of at most 128 bytes (a panel's row): its
    first value, the value 64 bytes on and its last, each index clamped to ``b``'s last."""
    last = b.shape[0] - 1
    prefetch_read(b, min(o, last))
    prefetch_read(b, min(o + 64 // b.itemsize, last))
    prefetch_read(b, min(o + n - 1, last))

#: :func:`gemm_images` fetches (``prefetch_read``) the B panel this many panels on while it runs the current one,
#: spread over its row blocks. The micro-kernel reads B in place, a panel's ``K`` rows at ``ldb`` apart: a stream per
#: row, which the hardware prefetchers do not follow; where B is not in the caches, each row's lines arrived one
#: latency at a time. 2-core Zen 4 VM, 2026-11-27, one process, 0 against 2 in alternation: the biclustered SVD form
#: at batch 128 (ZF conv2) 1.17-1.24x faster (its reduction 46 -> 28 ms, expansion 41 -> 33, spatial products 95 ->
#: 86), CP K = 6 1.03-1.16x, CP K = 12 1.03x; ZF conv2 (dense) at batch 1 1.05-1.08x; AlexNet conv3-5 at batch 1
#: 0.98-1.00x (B in the caches: the hints only cost their issue). 0 turns it off (a constant for such comparisons).
PREFETCH_PANELS = 2

#: :func:`gemm_images` fetches for writing (``prefetch_write``) the output lines of a tile that goes through its
#: scratch tile (a row map, a panel across images) while the job computes. A module constant for same-process
#: comparisons, not a user setting
WRITE_PREFETCH = True

#: depth of a K block: the B panel's slice (KC x NR values) stays in L1 while every row block of A passes over it
KC_BYTES = 32 * 1024


def pack_a(a, MR):
    """``a`` (M, K) packed for :func:`microkernel`: row blocks of ``MR`` (the last zero-padded), each stored
    k-major, ``[blk, k, r] = a[blk*MR + r, k]``; flat, C-contiguous. (A numba pass: the functional API packs the
    weights on every call, and NumPy's zero-fill, copy and transposing copy took 0.3-0.4 ms for ZF conv2/conv3.)"""
    M, K = a.shape
    nb = -(-M // MR)
    out = np.empty(nb * K * MR, a.dtype)
    _pack_a(np.ascontiguousarray(a), MR, out)
    return out


@numba.njit(parallel=True, cache=True, nogil=True)
def _pack_a(a, MR, out):
    M, K = a.shape
    nb = (M + MR - 1) // MR
    for blk in numba.prange(nb):
        dst = out[blk * K * MR:(blk + 1) * K * MR]
        for r in range(MR):
            row = blk * MR + r
            if row < M:
                src = a[row]
                for k in range(K):
                    dst[k * MR + r] = src[k]
            else:
                for k in range(K):
                    dst[k * MR + r] = 0


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_images(ap, M, K, MR, NR, KC, b, ldb, P, nimg, c, cimg, bias, has_bias, mgroups, rowmap, use_map,
                pfb=0, nbat=1, abat=0, bbat=0, cbat=0, pfw=False):
    """For each image ``i < nimg``: ``c[i*cimg + r(f)*P + p] = sum_k A[f, k] * b[k*ldb + i*P + p] (+ bias[f])``,
    ``f < M``, ``p < P``, where ``r(f) = rowmap[f]`` if ``use_map`` else ``f``; ``ap`` is ``A`` packed by
    :func:`pack_a` with ``MR`` rows a block.

    The ``nimg * P`` columns of ``b`` are cut into panels of ``NR``, whatever the image boundaries (an image's
    last partial panel would waste its unused columns' arithmetic). A job is (panel, group of row blocks); it walks
    ``K`` in blocks of ``KC`` and every row block of its group over the panel's slice of ``b``. A tile inside one
    image and the matrix writes its output rows directly (with the bias); a tile across an image boundary, past
    the last column or past the last row (or any tile, with a row map) runs into a job-local scratch tile, copied
    out in runs of columns; a partial last row block of at most 8 or 4 rows runs a tile of that many rows
    (``microkernel_rows8``, ``microkernel_rows4``), and a whole row block over a last panel of at most ``NR / 2``
    columns a tile of one vector (``microkernel_cols1``; ``NR`` is two vectors). ``b`` must have ``NR`` readable
    values past the last column of its last row (the last panel's loads run over it; those columns are never
    stored). ``pfb`` > 0: each row block's turn also fetches its share of the K block's rows of the panel ``pfb``
    panels on (:data:`PREFETCH_PANELS`); 0, none.

    ``nbat`` > 1 runs that many such products in one parallel region, product ``x`` with ``A`` at
    ``ap[x*abat:]``, ``b`` at ``b[x*bbat:]`` and ``c`` at ``c[x*cbat:]`` (the bias and row map shared): the
    threads are woken once and share all the products' jobs (Winograd's 16 products of a chunk).
    """
    nblk = (M + MR - 1) // MR
    total = nimg * P
    npan = (total + NR - 1) // NR
    bper = (nblk + mgroups - 1) // mgroups
    if K == 0:
        # an empty sum: each output is its bias (or zero)
        for xb in range(nbat):
            for i in range(nimg):
                for f in range(M):
                    bv = bias[f] if has_bias else 0.0
                    row = c[xb * cbat + i * cimg + (rowmap[f] if use_map else f) * P:]
                    for p in range(P):
                        row[p] = bv
        return
    # jobs panel by panel, each panel's row-block groups in turn; but where the last panel is at most half a panel
    # (the one-vector tile, half the work), group by group, so that those cheaper jobs do not all come last in the
    # iteration space, which the threads share in order (AlexNet conv3-5 at batch 1, 13 x 13 outputs: 1.05-1.14x)
    narrow = 2 * (total - (npan - 1) * NR) <= NR
    for bjob in numba.prange(nbat * npan * mgroups):
        xb = bjob // (npan * mgroups)
        job = bjob - xb * (npan * mgroups)
        if narrow:
            g = job // npan
            jp = job - g * npan
        else:
            g = job % mgroups
            jp = job // mgroups
        ib0 = g * bper
        ib1 = min(nblk, ib0 + bper)
        j0 = jp * NR
        cols = min(NR, total - j0)
        i0 = j0 // P
        p0 = j0 - i0 * P
        inside = cols == NR and p0 + NR <= P and not use_map    # direct stores: one image, rows in order
        scratch = np.empty(max(1, (ib1 - ib0) * MR * NR), c.dtype)
        for k0 in range(0, K, KC):
            kc = min(KC, K - k0)
            first = k0 == 0
            for ib in range(ib0, ib1):
                aoff = xb * abat + ib * K * MR + k0 * MR
                boff = xb * bbat + k0 * ldb + j0
                if pfb > 0:
                    # a share of the B panel ``pfb`` panels on, for the same K rows: the job after next reads it
                    ii = ib - ib0
                    nbb = ib1 - ib0
                    for k in range(k0 + kc * ii // nbb, k0 + kc * (ii + 1) // nbb):
                        prefetch_run(b, xb * bbat + k * ldb + j0 + pfb * NR, NR)
                if pfw and first and not inside:
                    # the output lines this block's rows will be copied to, fetched for writing while the job
                    # computes (first image of the panel)
                    q1 = min(cols, P - p0) - 1
                    for r in range(min(MR, M - ib * MR)):
                        f = ib * MR + r
                        o = xb * cbat + i0 * cimg + (rowmap[f] if use_map else f) * P + p0
                        prefetch_write(c, o)
                        prefetch_write(c, o + min(q1, 64 // c.itemsize))
                        prefetch_write(c, o + q1)
                if inside and (ib + 1) * MR <= M:
                    mode = (2 if has_bias else 0) if first else 1
                    microkernel(ap, aoff, b, boff, ldb, c, xb * cbat + i0 * cimg + ib * MR * P + p0, P, kc, mode,
                                bias, ib * MR if has_bias else 0)
                else:
                    # a partial last row block runs the smallest tile that holds its rows
                    rem = M - ib * MR
                    if rem <= 4 < MR:
                        microkernel_rows4(ap, aoff, b, boff, ldb, scratch, (ib - ib0) * MR * NR, NR, kc,
                                          0 if first else 1, bias, 0)
                    elif rem <= 8 < MR:
                        microkernel_rows8(ap, aoff, b, boff, ldb, scratch, (ib - ib0) * MR * NR, NR, kc,
                                          0 if first else 1, bias, 0)
                    elif 2 * cols <= NR:
                        # a last panel of at most one vector of columns: half the tile's arithmetic
                        microkernel_cols1(ap, aoff, b, boff, ldb, scratch, (ib - ib0) * MR * NR, NR, kc,
                                          0 if first else 1, bias, 0)
                    else:
                        microkernel(ap, aoff, b, boff, ldb, scratch, (ib - ib0) * MR * NR, NR, kc,
                                    0 if first else 1, bias, 0)
        for ib in range(ib0, ib1):
            if inside and (ib + 1) * MR <= M:
                continue
            for r in range(min(MR, M - ib * MR)):
                f = ib * MR + r
                bv = bias[f] if has_bias else 0.0
                src = scratch[((ib - ib0) * MR + r) * NR:]
                # runs of columns within one image
                q = 0
                while q < cols:
                    i = (j0 + q) // P
                    p = j0 + q - i * P
                    run = min(cols - q, P - p)
                    dst = c[xb * cbat + i * cimg + (rowmap[f] if use_map else f) * P + p:]
                    sq = src[q:]
                    for e in range(run):
                        dst[e] = sq[e] + bv
                    q += run


@numba.njit(cache=True, nogil=True)
def matmul_local(ap, aoff, M, K, MR, NR, b, boff, ldb, ncols, c, cbase, ldc, rowmap, roff, bias, has_bias, tile):
    """One thread's product into permuted output rows: ``c[cbase + rowmap[roff + f]*ldc + j] = sum_k A[f, k] *
    b[boff + k*ldb + j] (+ bias[rowmap[roff + f]])`` for ``f < M``, ``j < ncols``; ``A`` packed by :func:`pack_a`
    for ``MR`` rows from ``ap[aoff:]``. Panel by panel, K blocks of :data:`KC_BYTES` and every row block over the
    panel's slice, the tiles in ``tile`` (``ceil(M / MR) * MR * NR`` values), then copied out with the bias; the
    tiles as :func:`gemm_images` picks them. ``b`` must have ``NR`` readable values past the last column of its last
    row. The fused layers' expansions (``cp_fused.py``, ``svd_fused.py``, ``shared_gemm.py``), from a block
    of ``b`` in the thread's cache."""
    KC = max(16, KC_BYTES // (NR * c.itemsize))
    nblk = (M + MR - 1) // MR
    for c0 in range(0, ncols, NR):
        cols = min(NR, ncols - c0)
        for k0 in range(0, K, KC):
            kc = min(KC, K - k0)
            mode = 0 if k0 == 0 else 1
            bo = boff + k0 * ldb + c0
            for ib in range(nblk):
                ao = aoff + ib * K * MR + k0 * MR
                rem = M - ib * MR
                if rem <= 4 < MR:
                    microkernel_rows4(ap, ao, b, bo, ldb, tile, ib * MR * NR, NR, kc, mode, bias, 0)
                elif rem <= 8 < MR:
                    microkernel_rows8(ap, ao, b, bo, ldb, tile, ib * MR * NR, NR, kc, mode, bias, 0)
                elif 2 * cols <= NR:
                    microkernel_cols1(ap, ao, b, bo, ldb, tile, ib * MR * NR, NR, kc, mode, bias, 0)
                else:
                    microkernel(ap, ao, b, bo, ldb, tile, ib * MR * NR, NR, kc, mode, bias, 0)
        for f in range(M):
            ch = rowmap[roff + f]
            bv = bias[ch] if has_bias else 0.0
            dst = c[cbase + ch * ldc + c0:]
            src = tile[f * NR:]
            for e in range(cols):
                dst[e] = src[e] + bv


_NO_MAP = np.zeros(1, np.int64)


def matmul(packed, M, K, tile, b, ldb, N, c, *, nimg=1, cimg=0, bias=None, rowmap=None, batch=None):
    """``c[i*cimg + r(f)*N + j] = sum_k A[f, k] * b[k*ldb + i*N + j] (+ bias[f])`` for ``f < M``, ``j < N``,
    ``i < nimg``: :func:`gemm_images` with the K block and the row-block split chosen here. ``packed`` is ``A``
    packed by :func:`pack_a` for ``tile`` (:func:`tile_shape`); ``b`` and ``c`` are flat 1-D views, ``b`` with
    ``NR`` readable values past its last used one; ``rowmap`` (int64, one output row per row of A) permutes the
    output rows. ``batch`` = (n, astride, bstride, cstride): n such products in one call, product ``x`` on
    ``packed[x*astride:]``, ``b[x*bstride:]`` and ``c[x*cstride:]``."""
    VW, MR, NV = tile
    NR = VW * NV
    KC = max(16, KC_BYTES // (NR * c.itemsize))
    nblk = -(-M // MR)
    nb, abat, bbat, cbat = (1, 0, 0, 0) if batch is None else batch
    mgroups = max(1, min(nblk, -(-4 * numba.get_num_threads() // (nb * -(-nimg * N // NR)))))
    has_b = bias is not None
    _plan_run(gemm_images, packed, M, K, MR, NR, KC, b, ldb, N, nimg, c, cimg,
              bias if has_b else np.zeros(1, c.dtype), has_b, mgroups, _NO_MAP if rowmap is None else rowmap,
              rowmap is not None, PREFETCH_PANELS, nb, abat, bbat, cbat, WRITE_PREFETCH)


#: :func:`matmul_stream` is the faster from a product of this depth down (its 4-row tile does a third of the
#: 12-row tile's arithmetic per load, which stops mattering where the output's writes set the time). Measured on a
#: 2-core Zen 4 VM, 96 x K by K x 12100 per image, 128 images (567 MB of output; the low-rank ZF conv1's 1x1 stage):
#: K = 8: 27-32 ms against 71 ms for :func:`matmul` and 49 ms for OpenBLAS without its bias; K = 16: 51-54 against
#: 94-97 and 66-70; K = 32: 93 against 78-89 and 73-83.
STREAM_MAX_K = 16


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_stream(ap, M, K, MR, NR, b, bimg, P, nimg, c, cimg, bias, nsplit):
    """For each image ``i < nimg``: ``c[i*cimg + f*P + p] = sum_k A[f, k] * b[i*bimg + k*P + p] + bias[f]``,
    ``f < M``, ``p < P``; ``ap`` is ``A`` packed by :func:`pack_a` with ``MR`` rows a block, ``bias`` has at least
    ``M`` rounded up to 4 values.

    For shallow products (small ``K``) with a large output, whose time is the output's writes: a job is (image, 4
    rows, 1/``nsplit`` of the columns) and runs ``microkernel_rows4`` over consecutive panels of ``NR`` columns, so
    that each thread writes 4 output rows front to back, streams the hardware prefetchers follow (:func:`gemm_images`
    writes ``MR`` rows a panel at a time, in jobs ordered panel-major, which scatters short runs over every row).
    Rows past ``M`` in the last group go through a scratch tile; the columns past the last whole panel are computed
    one at a time. ``b`` is read only within each image's ``K x P`` block.
    """
    nsub = (M + 3) // 4
    npan = P // NR
    per = (npan + nsplit - 1) // nsplit
    for job in numba.prange(nimg * nsub * nsplit):
        i = job // (nsub * nsplit)
        rest = job - i * nsub * nsplit
        s = rest // nsplit
        part = rest - s * nsplit
        r = 4 * s
        rows = min(4, M - r)
        # the 4-row tile reads A with the packing's stride MR: rows r .. r+3 start r % MR into their block
        aoff = (r // MR) * K * MR + r % MR
        boff = i * bimg
        coff = i * cimg + r * P
        jp0 = part * per
        jp1 = min(npan, jp0 + per)
        if rows == 4:
            for jp in range(jp0, jp1):
                microkernel_rows4(ap, aoff, b, boff + jp * NR, P, c, coff + jp * NR, P, K, 2, bias, r)
        else:
            scratch = np.empty(4 * NR, c.dtype)
            for jp in range(jp0, jp1):
                microkernel_rows4(ap, aoff, b, boff + jp * NR, P, scratch, 0, NR, K, 2, bias, r)
                for rr in range(rows):
                    dst = c[coff + rr * P + jp * NR:]
                    src = scratch[rr * NR:]
                    for q in range(NR):
                        dst[q] = src[q]
        if part == nsplit - 1:
            # the columns past the last whole panel
            for rr in range(rows):
                f = r + rr
                arow = ap[(f // MR) * K * MR + f % MR:]
                for p in range(npan * NR, P):
                    acc = bias[f]
                    for k in range(K):
                        acc += arow[k * MR] * b[boff + k * P + p]
                    c[coff + rr * P + p] = acc


def matmul_stream(packed, M, K, tile, b, bimg, P, c, *, nimg=1, cimg=None, bias=None):
    """``c[i*cimg + f*P + p] = sum_k A[f, k] * b[i*bimg + k*P + p] (+ bias[f])`` for ``f < M``, ``p < P``, ``i < nimg``
    (:func:`gemm_stream`): the product of :func:`matmul` for a shallow ``K`` (up to :data:`STREAM_MAX_K`), each
    image's ``K x P`` block of ``b`` contiguous (``bimg`` apart), ``cimg`` (default ``M * P``) apart in ``c``.
    ``packed`` is ``A`` packed by :func:`pack_a` for ``tile`` (:func:`tile_shape`), whose ``MR`` must be a multiple
    of 4 (the AVX-512 tile; the AVX2 tile's 6-row blocks would split a 4-row group); ``b`` and ``c`` are flat."""
    VW, MR, NV = tile
    if MR % 4:
        raise ValueError(f"tile: matmul_stream needs row blocks of a multiple of 4 rows (the AVX-512 tile's 12), got "
                         f"{MR}; use matmul")
    NR = VW * NV
    cimg = M * P if cimg is None else cimg
    nsub = -(-M // 4)
    bias4 = np.zeros(4 * nsub, c.dtype)
    if bias is not None:
        bias4[:M] = bias
    # enough jobs for every thread twice over
    nsplit = max(1, min(max(1, P // NR), -(-2 * numba.get_num_threads() // (nimg * nsub))))
    gemm_stream(packed, M, K, MR, NR, b, bimg, P, nimg, c, cimg, bias4, nsplit)


_watch(__name__)        # planned kernels (kernels/cpu/plan.py): a rule set here makes the plans stale
