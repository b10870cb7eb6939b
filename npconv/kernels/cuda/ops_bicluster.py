"""GPU entry points of the biclustered factored layers (CuPy arrays), with their own kernels in ``_bicluster.cu``.

``npconv.functional.bicluster`` validates the factors and normalises the arguments (stride pair, padding as
``(top, bottom, left, right)``, the group offsets as host integer arrays), then calls these functions for CuPy
arrays. The output dtype is the input dtype (float32 or float64). The factor layout is that of
:mod:`npconv.decompose.bicluster` / :mod:`npconv.decompose.shared`: input group g is
``in_perm[in_off[g]:in_off[g+1]]``, stacked factor rows follow the permuted order, likewise for the outputs.

Every form ends the same way. The front end writes ``Z`` (NH, G*K, m*P) for a chunk of m images (P = OH*OW):
row ``(h*G + g)*K + k`` holds component k of block (g, h). The expansion of output group h is then one cuBLAS GEMM,
``expand_h (F_h, G*K) @ Z_h (G*K, m*P)``, and ``bic_scatter`` writes its rows to the output channels
``out_perm[out_off[h]:out_off[h+1]]`` of NCHW, adding the bias; for at most :data:`EXPAND_TILED_MAX_COLUMNS` columns
``bic_expand`` does every group's product, the scatter and the bias in one launch. How each form builds Z:

  * CP (:func:`bicluster_cp_conv2d`): one fused kernel, ``bic_cp_front``. A block takes one input group, KC
    components (h, k) and a tile of output pixels, looping over the images (:func:`cp_tiling` picks the tile and KC).
    First a thread per (component, input column of the tile) reduces the group's channels (read through in_perm)
    down that column, each channel's rows loaded at once into registers, and runs the vertical X x 1 pass (row
    stride) there, into shared memory; then a thread per output pixel runs the horizontal 1 x Y pass (column stride)
    of each component straight into Z. Taps of 3, 5 and 7 and the common (X, row stride) pairs are specialised.
  * SVD (:func:`bicluster_svd_conv2d`): ``bic_gather`` copies x through in_perm into a channel-major matrix (C, m*H*W),
    so each group's C_g -> NH*K1 reduction is one cuBLAS GEMM on contiguous rows (for at most
    :data:`REDUCE_TILED_MAX_COLUMNS` columns ``bic_reduce`` reads x through in_perm and does every group's
    reduction in one launch); ``bic_svd_spatial`` then runs the
    K1 -> K2 X x Y conv of every block (g, h) directly (16 filters per block in registers, their weights in shared
    memory one chunk of K1 channels at a time, no im2col matrix), from the reduction's output to Z; on small grids
    (:data:`SVD_SPLIT_MAX_BLOCKS`) ``bic_svd_spatial_split`` splits the K1 channels among blocks, and the expansion
    sums the splits.
  * Shared separable (:func:`shared_separable_conv2d`): ``bic_shared_filter`` filters each input channel once per
    shared filter its group uses (vertical then horizontal pass through shared memory), into Q; ``bic_shared_combine``
    forms each component as the C_g-term combination of its group's filtered maps, into Z. For at most
    :data:`EXPAND_TILED_MAX_COLUMNS` columns ``bic_expand_shared`` forms the combination as the fused expansion's
    tiles load it, so the form makes two launches and no Z.

When a tile does not fit its shared-memory budget even with one row of outputs (very large kernels), or a grid
dimension would pass 65535, a form falls back to the composition of generic ops (the functions ``_cp_composed``,
``_svd_composed``, ``_shared_composed`` of :mod:`npconv.functional.bicluster`: grouped 1x1 and depthwise convs through
:func:`npconv.kernels.cuda.ops.conv2d`). The batch is processed in chunks of images whose intermediates fit
:data:`WORKSPACE_BYTES`. The budgets and tile shapes here were not tuned on a GPU; the expansion rule and the SVD
splits were measured (docs/gpu_results.md).

Small host arrays go to the device on every call: the offsets, and for the shared form its filter lists (computed on
the host from ``assign``, memoised by content). A device ``assign`` is copied to the host for that (a
synchronisation); :class:`npconv.layers.bicluster.SharedSeparableConv2d` keeps its ``assign`` on the host.

Launches go through :func:`_launch`, which packs the arguments from :data:`LAUNCH_SIGNATURES` (parameter kinds as in
``ops.LAUNCH_SIGNATURES``, plus ``IPTR``, a C-contiguous int32 device array). :func:`source_text` builds the module
exactly as ``loader.source_text`` builds the package sources; ``_bicluster.cu`` starts with an underscore so that
``loader`` and the tests of ``ops.LAUNCH_SIGNATURES`` leave it to this module.
"""
from __future__ import annotations

import collections
import functools

import numpy as np

from ... import _backend
from . import loader, ops, replay
from ._gemm import matmul as _matmul
from .ops import I32, IPTR, PTR  # the kinds of the launch table; ops.launch packs every launch

__all__ = [
    "bicluster_cp_conv2d", "bicluster_svd_conv2d", "shared_separable_conv2d", "LAUNCH_SIGNATURES", "SOURCE",
    "source_text", "get_kernel", "clear_cache", "cp_tiling", "shared_tiling", "svd_chunk", "shared_launch_plan",
    "CP_TILE_ROWS", "CP_MAX_THREADS", "CP_SPECIALISED", "CP_IMAGES_PER_BLOCK", "cp_front_kernel",
    "SVD_FILTERS_PER_BLOCK", "TILE_W", "TILE_ROWS", "CP_SMEM_BUDGET", "SHARED_SMEM_BUDGET", "SVD_SMEM_BUDGET",
    "WORKSPACE_BYTES", "EXPAND_TILED_MAX_COLUMNS", "EXPAND_TILE", "EXPAND_THREADS", "REDUCE_TILED_MAX_COLUMNS",
    "SHARED_FUSED_MAX_COLUMNS", "SVD_SPLIT_MAX_BLOCKS", "SVD_SPLITS",
]

#: the kernel source of this module (a file of npconv.kernels.cuda)
SOURCE = "_bicluster"
#: most output rows of a bic_cp_front tile (NPCONV_BIC_TH in _bicluster.cu) and most threads of its block
CP_TILE_ROWS = 8
CP_MAX_THREADS = 256
#: the (X, row stride) pairs with an entry point of their own, ``bic_cp_front_x<X>s<stride>`` (a column of the
#: tile in registers); others take ``bic_cp_front``
CP_SPECIALISED = ((3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2))
#: images a bic_cp_front block loops over (grid z = ceil(images / this)): its weights are staged once for them.
#: Measured on an H100 (ZF conv2 CP K = 6, 8, 12 at batch 128, in alternation): 2 images 1.09x, 4 images 1.13-1.15x
#: faster layers than 1.
CP_IMAGES_PER_BLOCK = 4
#: filters per bic_svd_spatial block (NPCONV_BIC_FT in _bicluster.cu)
SVD_FILTERS_PER_BLOCK = 16
#: when the SVD form's spatial stage would run at most SVD_SPLIT_MAX_BLOCKS blocks (small batches), it splits the K1
#: channels among SVD_SPLITS blocks (bic_svd_spatial_split: that many times the blocks, a fraction of each thread's
#: serial work); each split writes its own rows of Z and the expansion sums them, its matrix repeated along K2 (that
#: much more expansion work). Measured on an H100 (132 SMs; twenty-seventh session, docs/gpu_results.md), ZF conv2
#: (19, 51), whose unsplit grid is 48 blocks an image up to 4 images: 2 splits made the layer 1.29-1.42x faster at
#: batch 1 (48 blocks), 1.30x at 2 (96), 1.22x at 3 (144), and 0.96x, 0.90x, 0.87x at 4, 6, 8 (192, 288, 384);
#: 4 splits 1.31-1.44x at batch 1, less at 2 and 3.
SVD_SPLIT_MAX_BLOCKS = 160
SVD_SPLITS = 2
#: output columns per tile of bic_shared_filter (blockDim.x; also the most of a bic_cp_front tile), and the rows
#: bic_shared_filter tries, largest first
TILE_W = 32
TILE_ROWS = (8, 4, 2, 1)
#: shared memory a bic_cp_front block may use (weights + the vertical pass's tiles), bytes
CP_SMEM_BUDGET = 32 * 1024
#: shared memory a bic_shared_filter block may use (input tile + vertical pass), bytes
SHARED_SMEM_BUDGET = 24 * 1024
#: shared memory a bic_svd_spatial block may use for one chunk of K1 channels' weights, bytes
SVD_SMEM_BUDGET = 16 * 1024
#: the expansion takes one fused launch (bic_expand) for at most this many columns (images x output positions), a
#: cuBLAS GEMM and a scatter a group above. Measured on an H100 (docs/gpu_results.md), ZF conv2 CP K = 8 and 12 (729
#: positions an image): fused, a call is 1.3-1.9x faster queued at batches 1-4 (a single call's latency 1.3-1.5x at
#: batches 1-2, level at 4), and slower at batch 8.
EXPAND_TILED_MAX_COLUMNS = 4096
#: the SVD form's gather and reduction take one fused launch (bic_reduce) for at most this many columns (images x
#: input pixels), bic_gather and a cuBLAS GEMM an input group above. Timed on an H100 (fifteenth session,
#: docs/gpu_results.md) on ZF conv2 (3025 input pixels an image): fused, a layer call was 1.49-2.05x faster queued and
#: 1.53-1.83x in latency at batches 1, 2, 4 and 8; batch 8 (24200 columns) is the largest measured, hence the bound.
REDUCE_TILED_MAX_COLUMNS = 24576
#: the shared separable form forms its combination inside the expansion (one bic_expand_shared launch) for at most
#: this many columns (images x output positions) where the expansion is one launch; above it, bic_shared_combine into
#: Z and then the expansion (bic_expand). On an H100 (twenty-fifth session, ZF conv2 K 6 S 4, layers replayed), at
#: batch 1 bic_expand_shared took 101 us of the layer's 114 at 4% occupancy, and the layer ran 0.70x the dense layer's
#: speed fused against 1.46x unfused (batch 8 is above EXPAND_TILED_MAX_COLUMNS: no one-launch expansion there).
#: Hence never fused.
SHARED_FUSED_MAX_COLUMNS = 0
#: bic_expand's tile (rows x columns, NPC_TG_BM x NPC_TG_BN in _bicluster.cu) and threads a block (NPC_TG_THREADS)
EXPAND_TILE = (32, 32)
EXPAND_THREADS = 64
#: bound on the intermediates of one chunk of images (Z, the GEMM result, and the form's own buffers), bytes
WORKSPACE_BYTES = 256 * 2**20

_BLOCK = 256
_MAX_GRID = 1 << 18                 # blocks of a grid-stride launch, so grid * block <= 2^26
_MAX_GRID_YZ = 65535
_INDEX_LIMIT = 2**31 - 2**26        # elements an int-indexed grid-stride loop may cover without overflow

#: kernel name -> (source file, parameter kinds). PTR: a C-contiguous device array of the dtype; IPTR: a
#: C-contiguous int32 device array; I32: ``np.int32``.
LAUNCH_SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # x, in_perm, in_off, reduce, vertical, horizontal, z,
    # m, C, H, W, G, NH, K, X, Y, SH, SW, PT, PL, OH, OW, TW, TH, KC, tiles_w, kchunks
    **{name: (SOURCE, (PTR, IPTR, IPTR, PTR, PTR, PTR, PTR) + (I32,) * 20)
       for name in ["bic_cp_front"] + [f"bic_cp_front_x{X}s{S}" for X, S in CP_SPECIALISED]},
    # x, perm, xg, m, C, HW
    "bic_gather": (SOURCE, (PTR, IPTR, PTR) + (I32,) * 3),
    # z1, spatial, z, m, G, NH, K1, K2, H, W, X, Y, SH, SW, PT, PL, OH, OW, CC (bic_svd_spatial_split: and KS)
    "bic_svd_spatial": (SOURCE, (PTR, PTR, PTR) + (I32,) * 16),
    "bic_svd_spatial_split": (SOURCE, (PTR, PTR, PTR) + (I32,) * 17),
    # x, in_perm, chan_group, in_off, used_ptr, used_filter, qoff, vertical, horizontal, q,
    # m, C, H, W, X, Y, SH, SW, PT, PL, OH, OW, tiles_w
    "bic_shared_filter": (SOURCE, (PTR,) + (IPTR,) * 6 + (PTR,) * 3 + (I32,) * 13),
    # q, reduce, slot, in_off, used_ptr, qoff, z, m, P, G, NH, K
    "bic_shared_combine": (SOURCE, (PTR, PTR, IPTR, IPTR, IPTR, IPTR, PTR) + (I32,) * 5),
    # r, out_perm, bias, y, Fh, m, P, F, o0, has_bias
    "bic_scatter": (SOURCE, (PTR, IPTR, PTR, PTR) + (I32,) * 6),
    # z, expand, out_off, out_perm, bias, y, m, P, F, GK, has_bias
    "bic_expand": (SOURCE, (PTR, PTR, IPTR, IPTR, PTR, PTR) + (I32,) * 5),
    # q, reduce, slot, in_off, used_ptr, qoff, expand, out_off, out_perm, bias, y, m, P, F, G, NH, K, has_bias
    "bic_expand_shared": (SOURCE, (PTR, PTR) + (IPTR,) * 4 + (PTR, IPTR, IPTR, PTR, PTR) + (I32,) * 7),
    # x, in_perm, in_off, reduce, z1, m, C, HW, HK1
    "bic_reduce": (SOURCE, (PTR, IPTR, IPTR, PTR, PTR) + (I32,) * 4),
}


# --- the module ------------------------------------------------------------------------------------------------

def source_text(dtype) -> str:
    """The CUDA C text of ``_bicluster.cu`` for ``dtype``, exactly as ``cupy.RawModule`` gets it
    (:func:`loader.source_text`)."""
    return loader.source_text(SOURCE, dtype)


def get_kernel(name, dtype):
    """The kernel ``npconv_<name>_<f32|f64>`` of ``_bicluster.cu`` (a ``cupy.RawKernel``), from the loader's
    memoized module."""
    if name not in LAUNCH_SIGNATURES:
        raise ValueError(f"no kernel {name!r} in {SOURCE}.cu; known: {sorted(LAUNCH_SIGNATURES)}")
    return loader.get_kernel(SOURCE, name, dtype)


def clear_cache() -> None:
    """Forget the memoized modules (the loader's, which hold this source's too)."""
    loader.clear_cache()


def _cupy():
    return _backend.require_cupy()


def _launch(name, dtype, grid, block, args, shared_mem=0):
    """Pack ``args`` as :data:`LAUNCH_SIGNATURES` declares for kernel ``name`` and launch it (``ops.launch``)."""
    ops.launch(LAUNCH_SIGNATURES, name, dtype, grid, block, args, shared_mem)


def _launch_1d(name, dtype, total, args):
    """A grid-stride kernel over ``total`` elements (nothing to do when ``total`` is 0)."""
    if total == 0:
        return
    if total > _INDEX_LIMIT:
        raise ValueError(f"{name}: {total} elements; the CUDA kernels index with 32-bit ints and take at most "
                         f"{_INDEX_LIMIT}: split the batch")
    _launch(name, dtype, (min(-(-total // _BLOCK), _MAX_GRID),), (_BLOCK,), args)


def _ints(cp, a):
    """A C-contiguous int32 device copy of an index array. A device array is converted on the device; a host array
    (offsets, the shared-filter plan) is copied once per content (``ops.on_device``)."""
    if _backend.is_cupy_array(a):
        return ops.contiguous(cp, a, np.int32)
    h = np.ascontiguousarray(a, dtype=np.int32)
    return ops.on_device(cp, ("ints", h.tobytes(), h.shape), lambda: cp.asarray(h))


def _host_offsets(off):
    return np.ascontiguousarray(_backend.to_numpy(off), dtype=np.int64)


def _largest(off):
    """The size of the largest group of host int64 offsets ``off``, memoised by content (np.diff and max cost 2.5 us
    a call, a tenth of a layer's Python at batch 1)."""
    return _largest_of(off.tobytes())


@functools.lru_cache(maxsize=256)
def _largest_of(off_bytes):
    return int(np.diff(np.frombuffer(off_bytes, np.int64)).max())


def _out_len(size, k, s, lo, hi):
    return (size + lo + hi - k) // s + 1


# --- launch geometry -------------------------------------------------------------------------------------------

def _tile(X, Y, SH, SW, itemsize, budget, bytes_of):
    for TH in TILE_ROWS:
        TIH, TIW = (TH - 1) * SH + X, (TILE_W - 1) * SW + Y
        smem = bytes_of(TH, TIH, TIW) * itemsize
        if smem <= budget:
            return TILE_W, TH, smem
    return None


CpTiling = collections.namedtuple("CpTiling", "TW TH KC smem")


def _balanced(n, most):
    """The smallest part of ``n`` items that needs as few parts as parts of at most ``most`` items do."""
    return -(-n // -(-n // most))


def cp_front_kernel(X, SH):
    """The entry point of bic_cp_front for X taps at row stride SH."""
    return f"bic_cp_front_x{X}s{SH}" if (X, SH) in CP_SPECIALISED else "bic_cp_front"


def cp_tiling(X, Y, SH, SW, itemsize, cg_max, OH, OW, HK):
    """The launch geometry of bic_cp_front (:class:`CpTiling`: tile columns and rows, components a block, dynamic
    shared-memory bytes), or None when even one row and one component do not fit :data:`CP_SMEM_BUDGET`; memoised
    (with the module's limits in the key).

    A tile is at most :data:`TILE_W` columns and :data:`CP_TILE_ROWS` rows, split evenly over the output (26
    columns: one tile of 26, not one of 32 with 6 idle), with at most :data:`CP_MAX_THREADS` threads, one an output
    pixel. The components a block (KC, of the ``HK`` = NH*K of a group) are as many as the block's threads can take
    in phase A, a thread per (component, input column of the tile: TIW = (TW-1)*SW + Y), evened over the chunks.
    The layout (``_bicluster.cu``): KC * (X + Y + cg_max + TH*TIW) reals, rounded up to an even count, then cg_max
    8-byte channel offsets."""
    return _cp_tiling(X, Y, SH, SW, itemsize, cg_max, OH, OW, HK, TILE_W, CP_TILE_ROWS, CP_MAX_THREADS,
                      CP_SMEM_BUDGET)


@functools.lru_cache(maxsize=256)
def _cp_tiling(X, Y, SH, SW, itemsize, cg_max, OH, OW, HK, TILE_W, CP_TILE_ROWS, CP_MAX_THREADS, CP_SMEM_BUDGET):
    TW = _balanced(OW, TILE_W)
    TH = _balanced(OH, max(1, min(CP_TILE_ROWS, CP_MAX_THREADS // TW)))
    TIW = (TW - 1) * SW + Y

    def size(KC, TH):
        reals = KC * (X + Y + cg_max + TH * TIW)
        return (reals + (reals & 1)) * itemsize + 8 * cg_max
    for th in range(TH, 0, -1):
        KC = _balanced(HK, max(1, min(HK, (TW * th) // TIW)))
        while KC > 1 and size(KC, th) > CP_SMEM_BUDGET:
            KC -= 1
        if size(KC, th) <= CP_SMEM_BUDGET:
            return CpTiling(TW, th, KC, size(KC, th))
    return None


def shared_tiling(X, Y, SH, SW, itemsize):
    """(tile columns, tile rows, shared-memory bytes) of a bic_shared_filter block, or None when even one row of
    :data:`TILE_W` outputs does not fit :data:`SHARED_SMEM_BUDGET`."""
    return _tile(X, Y, SH, SW, itemsize, SHARED_SMEM_BUDGET, lambda TH, TIH, TIW: TIH * TIW + TH * TIW)


def svd_chunk(K1, X, Y, itemsize):
    """K1 channels per shared-memory chunk of bic_svd_spatial (0 when not even one channel's weights for
    :data:`SVD_FILTERS_PER_BLOCK` filters fit :data:`SVD_SMEM_BUDGET`)."""
    return min(K1, SVD_SMEM_BUDGET // (X * Y * SVD_FILTERS_PER_BLOCK * itemsize))


def _images_per_chunk(N, per_image, largest, itemsize):
    """Images per chunk: the chunk's intermediates (``per_image`` elements an image) within WORKSPACE_BYTES, and
    the largest buffer (``largest`` elements an image) within the 32-bit index range of the kernels."""
    if largest > _INDEX_LIMIT:
        raise ValueError(f"the intermediates of one image have {largest} elements; the CUDA kernels index with "
                         f"32-bit ints and take at most {_INDEX_LIMIT}")
    nb = max(1, min(N, WORKSPACE_BYTES // max(1, per_image * itemsize)))
    return min(nb, _INDEX_LIMIT // max(1, largest))


SharedPlan = collections.namedtuple("SharedPlan", "chan_group used_ptr used_filter slot qoff")


@functools.lru_cache(maxsize=64)
def _shared_plan(assign_bytes, shape, in_off_bytes, n_filters):
    from ...functional.bicluster import shared_plan
    assign = np.frombuffer(assign_bytes, np.int64).reshape(shape)
    in_off = np.frombuffer(in_off_bytes, np.int64)
    used_ptr, used_filter, slot = shared_plan(assign, n_filters)
    sizes = np.diff(in_off)
    qoff = np.concatenate([[0], np.cumsum(sizes * np.diff(used_ptr))])
    chan_group = np.repeat(np.arange(sizes.shape[0]), sizes)
    arrays = [np.ascontiguousarray(a, dtype=np.int32) for a in (chan_group, used_ptr, used_filter, slot, qoff)]
    for a in arrays:
        a.flags.writeable = False         # memoised: shared between calls
    return SharedPlan(*arrays)


def shared_launch_plan(assign, in_off, n_filters) -> SharedPlan:
    """The host int32 arrays the shared-separable kernels take, memoised by content:

    ``chan_group`` (C,) the group of each channel in permuted order; ``used_ptr`` (G+1,) and ``used_filter``: group g
    uses the shared filters ``used_filter[used_ptr[g]:used_ptr[g+1]]`` (ascending); ``slot`` (G, NH, K) the position
    of ``assign[g, h, k]`` in that list; ``qoff`` (G+1,) the first row of group g in Q (group g has C_g * U_g rows,
    channel-major: row ``qoff[g] + j * U_g + u`` is channel j of the group filtered by its u-th filter)."""
    return _shared_plan(*_shared_key(assign, in_off, n_filters))


def _shared_key(assign, in_off, n_filters):
    a = np.ascontiguousarray(_backend.to_numpy(assign), dtype=np.int64)
    off = np.ascontiguousarray(_backend.to_numpy(in_off), dtype=np.int64)
    return a.tobytes(), a.shape, off.tobytes(), int(n_filters)


def _device_shared_plan(cp, assign, in_off, n_filters):
    """:func:`shared_launch_plan` and its arrays on the device (memoised with ``ops.on_device``, one key for all five:
    at batch 1 a lookup per array was a tenth of the layer's Python)."""
    key = _shared_key(assign, in_off, n_filters)
    plan = _shared_plan(*key)
    return plan, ops.on_device(cp, ("shared-plan",) + key, lambda: tuple(cp.asarray(a) for a in plan))


# --- the common tail and the fallback ------------------------------------------------------------------------------

def _expand_grid(L, Fh, NH):
    """The grid of the fused expansion (``bic_expand``, ``bic_expand_shared``) for ``L`` columns, or None when the
    expansion takes cuBLAS GEMMs and scatters instead: above :data:`EXPAND_TILED_MAX_COLUMNS` columns, or a grid
    dimension past 65535."""
    grid = (-(-L // EXPAND_TILE[1]), -(-Fh // EXPAND_TILE[0]), NH)
    if L > EXPAND_TILED_MAX_COLUMNS or grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        return None
    return grid


def _expand_scatter(cp, z, expand, d_out_perm, out_off, Fh, bias, y, m, P):
    """Per output group h: ``r = expand_h (F_h, G*K) @ z[h]`` (cuBLAS), then bic_scatter writes r into the chunk's
    output ``y`` (m, F, OH, OW) at channels out_perm[out_off[h] ...], adding the bias (``Fh``: the largest group's
    size). With at most :data:`EXPAND_TILED_MAX_COLUMNS` columns (m*P) one bic_expand launch does all of it for every
    group."""
    dt = z.dtype
    F, G, K = (int(v) for v in expand.shape)
    has_bias = bias is not None
    b = bias if has_bias else expand          # a dummy pointer of the right dtype when there is no bias
    NH = out_off.shape[0] - 1
    grid = _expand_grid(m * P, Fh, NH)
    if grid is not None:
        _launch("bic_expand", dt, grid, (EXPAND_THREADS,),
                (z, expand, _ints(cp, out_off), d_out_perm, b, y, m, P, F, G * K, has_bias))
        return
    for h in range(NH):
        o0, o1 = int(out_off[h]), int(out_off[h + 1])
        r = cp.ascontiguousarray(_matmul(expand[o0:o1].reshape(o1 - o0, G * K), z[h]))
        _launch_1d("bic_scatter", dt, r.size, (r, d_out_perm, b, y, o1 - o0, m, P, F, o0, has_bias))


def _composed(form, cp, x, in_perm, in_off, arrays, out_perm, out_off, bias, stride, padding):
    """The fallback: the composition of generic ops of npconv.functional.bicluster (index arrays on the device)."""
    from ...functional import bicluster as FB
    run = {"cp": FB._cp_composed, "svd": FB._svd_composed, "shared": FB._shared_composed}[form]
    return run(x, cp.asarray(in_perm), _host_offsets(in_off), *arrays, cp.asarray(out_perm),
               _host_offsets(out_off), bias, tuple(stride), tuple(padding))


# --- the layers ----------------------------------------------------------------------------------------------------

def bicluster_cp_conv2d(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias, *,
                        stride, padding):
    """Biclustered CP conv of CuPy arrays: x (N, C, H, W), reduce (C, NH, K), vertical (G, NH, K, X), horizontal
    (G, NH, K, Y), expand (F, G, K), bias (F,) or None; ``in_perm``/``out_perm`` index arrays (host or device),
    ``in_off``/``out_off`` offsets; ``stride`` a pair, ``padding`` (top, bottom, left, right). Returns
    (N, F, OH, OW)."""
    cp = _cupy()
    x, reduce, vertical, horizontal, expand, bias = (ops.contiguous(cp, a) for a in
                                                     (x, reduce, vertical, horizontal, expand, bias))
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    G, NH, K, X = (int(v) for v in vertical.shape)
    Y = int(horizontal.shape[3])
    F = int(expand.shape[0])
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    OH, OW = _out_len(H, X, sh, pt, pb), _out_len(W, Y, sw, pl, pr)
    in_off_h = _host_offsets(in_off)
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    tiling = cp_tiling(X, Y, sh, sw, dt.itemsize, _largest(in_off_h), OH, OW, NH * K)
    kchunks = -(-NH * K // tiling.KC) if tiling is not None else 0
    if tiling is None or G * kchunks > _MAX_GRID_YZ:
        return _composed("cp", cp, x, in_perm, in_off, (reduce, vertical, horizontal, expand), out_perm, out_off,
                         bias, stride, padding)
    TW, TH, KC, smem = tiling
    front = cp_front_kernel(X, sh)
    tiles_w = -(-OW // TW)
    tiles = -(-OH // TH) * tiles_w
    if tiles >= 2**31:
        raise ValueError(f"the output ({OH} x {OW}) has too many tiles for one launch")
    out_off_h = _host_offsets(out_off)
    d_in_perm, d_in_off, d_out_perm = _ints(cp, in_perm), _ints(cp, in_off_h), _ints(cp, out_perm)
    P = OH * OW
    rows = NH * G * K
    Fh = _largest(out_off_h)
    nb = _images_per_chunk(N, (rows + Fh) * P, max(rows, Fh) * P, dt.itemsize)
    zbuf = cp.empty(rows * nb * P, dtype=dt)
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        z = zbuf[:rows * m * P].reshape(NH, G * K, m * P)
        _launch(front, dt, (tiles, G * kchunks, min(-(-m // CP_IMAGES_PER_BLOCK), _MAX_GRID_YZ)), (TW * TH,),
                (x[n0:n0 + m], d_in_perm, d_in_off, reduce, vertical, horizontal, z,
                 m, C, H, W, G, NH, K, X, Y, sh, sw, pt, pl, OH, OW, TW, TH, KC, tiles_w, kchunks), shared_mem=smem)
        _expand_scatter(cp, z, expand, d_out_perm, out_off_h, Fh, bias, y[n0:n0 + m], m, P)
    replay.complete(y)                   # launches and _matmul products only
    return y


def bicluster_svd_conv2d(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, *, stride, padding):
    """Biclustered two-stage-SVD conv of CuPy arrays: reduce (C, NH, K1), spatial (G, NH, K2, K1, X, Y), expand
    (F, G, K2); the rest as :func:`bicluster_cp_conv2d`."""
    cp = _cupy()
    x, reduce, spatial, expand, bias = (ops.contiguous(cp, a) for a in (x, reduce, spatial, expand, bias))
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    G, NH, K2, K1, X, Y = (int(v) for v in spatial.shape)
    F = int(expand.shape[0])
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    OH, OW = _out_len(H, X, sh, pt, pb), _out_len(W, Y, sw, pl, pr)
    FT = SVD_FILTERS_PER_BLOCK
    CC = svd_chunk(K1, X, Y, dt.itemsize)
    fblocks = -(-K2 // FT)
    KS = 1
    if min(-(-(N * OH * OW) // _BLOCK), _MAX_GRID) * fblocks * G * NH <= SVD_SPLIT_MAX_BLOCKS:
        KS = -(-K1 // -(-K1 // max(1, int(SVD_SPLITS))))      # splits of ceil(K1 / SVD_SPLITS) channels, none empty
        if G * NH * KS > _MAX_GRID_YZ:                          # no room along grid z: unsplit
            KS = 1
    if CC < 1 or G * NH > _MAX_GRID_YZ or fblocks > _MAX_GRID_YZ:
        return _composed("svd", cp, x, in_perm, in_off, (reduce, spatial, expand), out_perm, out_off, bias,
                         stride, padding)
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    in_off_h, out_off_h = _host_offsets(in_off), _host_offsets(out_off)
    d_in_perm, d_out_perm = _ints(cp, in_perm), _ints(cp, out_perm)
    HK1 = NH * K1
    HW, P = H * W, OH * OW
    rows1, rows2 = G * HK1, NH * G * KS * K2
    if KS > 1:   # the expansion sums the splits: row (g, s, k2) of Z takes expand[:, g, k2]
        repeated = cp.empty((F, G, KS, K2), dtype=dt)
        repeated[...] = expand[:, :, None, :]
        expand = repeated.reshape(F, G, KS * K2)
    Fh = _largest(out_off_h)
    nb = _images_per_chunk(N, C * HW + rows1 * HW + rows2 * P + Fh * P,
                           max(C * HW, rows1 * HW, rows2 * P, Fh * P), dt.itemsize)
    # the gather and the reductions: one bic_reduce launch for a chunk of few columns, else bic_gather and a GEMM a
    # group (its operands made on the first such chunk)
    reduce_grid = (-(-HK1 // EXPAND_TILE[0]), G)
    fused_ok = max(reduce_grid) <= _MAX_GRID_YZ
    red_t = xg_buf = None
    z1_buf = cp.empty(rows1 * nb * HW, dtype=dt)
    z2_buf = cp.empty(rows2 * nb * P, dtype=dt)
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        z1 = z1_buf[:rows1 * m * HW].reshape(rows1, m * HW)
        if fused_ok and m * HW <= REDUCE_TILED_MAX_COLUMNS:
            _launch("bic_reduce", dt, (-(-(m * HW) // EXPAND_TILE[1]),) + reduce_grid, (EXPAND_THREADS,),
                    (x[n0:n0 + m], d_in_perm, _ints(cp, in_off_h), reduce, z1, m, C, HW, HK1))
        else:
            if red_t is None:
                # per group, the reduction matrix (NH*K1, C_g): rows (h, k1), columns the group's channels in
                # permuted order
                red_t = [cp.ascontiguousarray(reduce[int(in_off_h[g]):int(in_off_h[g + 1])].reshape(-1, HK1).T)
                         for g in range(G)]
                xg_buf = cp.empty(C * nb * HW, dtype=dt)
            xg = xg_buf[:C * m * HW].reshape(C, m * HW)
            _launch_1d("bic_gather", dt, xg.size, (x[n0:n0 + m], d_in_perm, xg, m, C, HW))
            for g in range(G):
                _matmul(red_t[g], xg[int(in_off_h[g]):int(in_off_h[g + 1])], out=z1[g * HK1:(g + 1) * HK1])
        z2 = z2_buf[:rows2 * m * P].reshape(NH, G * KS * K2, m * P)
        grid = (min(-(-(m * P) // _BLOCK), _MAX_GRID), fblocks, G * NH * KS)
        _launch("bic_svd_spatial_split" if KS > 1 else "bic_svd_spatial", dt, grid, (_BLOCK,),
                (z1, spatial, z2, m, G, NH, K1, K2, H, W, X, Y, sh, sw, pt, pl, OH, OW, CC) + ((KS,) if KS > 1 else ()),
                shared_mem=CC * X * Y * FT * dt.itemsize)
        _expand_scatter(cp, z2, expand, d_out_perm, out_off_h, Fh, bias, y[n0:n0 + m], m, P)
    replay.complete(y)                   # launches and _matmul products only
    return y


def shared_separable_conv2d(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm, out_off,
                            bias, *, stride, padding):
    """Biclustered CP conv with shared separable filters, of CuPy arrays: reduce (C, NH, K), ``assign`` (G, NH, K)
    integer (host or device; a device one is copied to the host), vertical (S, X), horizontal (S, Y), expand
    (F, G, K); the rest as :func:`bicluster_cp_conv2d`."""
    cp = _cupy()
    x, reduce, vertical, horizontal, expand, bias = (ops.contiguous(cp, a) for a in
                                                     (x, reduce, vertical, horizontal, expand, bias))
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    _, NH, K = (int(v) for v in reduce.shape)
    S, X = (int(v) for v in vertical.shape)
    Y = int(horizontal.shape[1])
    G = int(assign.shape[0])
    F = int(expand.shape[0])
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    OH, OW = _out_len(H, X, sh, pt, pb), _out_len(W, Y, sw, pl, pr)
    tiling = shared_tiling(X, Y, sh, sw, dt.itemsize)
    if tiling is None or C > _MAX_GRID_YZ:
        return _composed("shared", cp, x, in_perm, in_off, (reduce, cp.asarray(assign), vertical, horizontal, expand),
                         out_perm, out_off, bias, stride, padding)
    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    TW, TH, smem = tiling
    tiles_w = -(-OW // TW)
    tiles = -(-OH // TH) * tiles_w
    if tiles >= 2**31:
        raise ValueError(f"the output ({OH} x {OW}) has too many tiles for one launch")
    in_off_h, out_off_h = _host_offsets(in_off), _host_offsets(out_off)
    plan, (d_group, d_used_ptr, d_used_filter, d_slot, d_qoff) = _device_shared_plan(cp, assign, in_off_h, S)
    d_in_perm, d_in_off, d_out_perm = _ints(cp, in_perm), _ints(cp, in_off_h), _ints(cp, out_perm)
    P = OH * OW
    QR = int(plan.qoff[-1])
    rows = NH * G * K
    Fh = _largest(out_off_h)
    nb = _images_per_chunk(N, (QR + rows + Fh) * P, max(QR, rows, Fh) * P, dt.itemsize)
    q_buf = cp.empty(QR * nb * P, dtype=dt)
    z_buf = None
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        q = q_buf[:QR * m * P].reshape(QR, m * P)
        _launch("bic_shared_filter", dt, (tiles, C, min(m, _MAX_GRID_YZ)), (TW, TH),
                (x[n0:n0 + m], d_in_perm, d_group, d_in_off, d_used_ptr, d_used_filter, d_qoff, vertical, horizontal,
                 q, m, C, H, W, X, Y, sh, sw, pt, pl, OH, OW, tiles_w), shared_mem=smem)
        grid = _expand_grid(m * P, Fh, NH)
        if grid is not None and m * P <= SHARED_FUSED_MAX_COLUMNS:
            # few columns: the combination formed as the expansion's tiles load it (no Z)
            has_bias = bias is not None
            _launch("bic_expand_shared", dt, grid, (EXPAND_THREADS,),
                    (q, reduce, d_slot, d_in_off, d_used_ptr, d_qoff, expand, _ints(cp, out_off_h), d_out_perm,
                     bias if has_bias else expand, y[n0:n0 + m], m, P, F, G, NH, K, has_bias))
            continue
        if z_buf is None:
            z_buf = cp.empty(rows * nb * P, dtype=dt)
        z = z_buf[:rows * m * P].reshape(NH, G * K, m * P)
        _launch_1d("bic_shared_combine", dt, z.size,
                   (q, reduce, d_slot, d_in_off, d_used_ptr, d_qoff, z, m, P, G, NH, K))
        _expand_scatter(cp, z, expand, d_out_perm, out_off_h, Fh, bias, y[n0:n0 + m], m, P)
    replay.complete(y)                   # launches and _matmul products only
    return y


replay.watch(__name__)
