"""npconv.kernels.cuda.ops_bicluster itself, without a GPU: the CuPy stand-in (NumPy + the CPU emulator) replaces
CuPy, so the biclustered layers' GPU entry points run end to end (dispatch, index conversion, chunking of the batch,
launch geometry, the cuBLAS stand-in for the expansion GEMMs, the scatter by out_perm, the fallbacks).

References: the dense conv of the kernel rebuilt from the factors by loops (tests/bicluster_reference.py,
tests/reference.py), in float64; and the CPU path of npconv.functional.bicluster on the same NumPy arrays.
"""
from __future__ import annotations

import numpy as np
import pytest
from bicluster_reference import cp_front_name, dense_kernel, make_factors
from reference import conv2d_einsum, conv2d_naive

from npconv.functional import bicluster as FB
from npconv.kernels.cuda import loader, ops_bicluster

pytestmark = pytest.mark.cpuemu
KINDS = ["cp", "svd", "shared"]
RANKS = {"cp": 3, "svd": (2, 3), "shared": (3, 4)}
# which of the factor arrays are float arrays (moved to the device); the others are index arrays
FLOATS = {"cp": (2, 3, 4, 5), "svd": (2, 3, 4), "shared": (2, 4, 5, 6)}
ENTRY = {"cp": ops_bicluster.bicluster_cp_conv2d, "svd": ops_bicluster.bicluster_svd_conv2d,
         "shared": ops_bicluster.shared_separable_conv2d}
CPU = {"cp": FB.bicluster_cp_conv2d, "svd": FB.bicluster_svd_conv2d, "shared": FB.shared_separable_conv2d}
def front(kind, X, SH, fused=True):
    """The front end's launches of ``kind`` for X x Y filters at row stride SH: for few columns (``fused``) the SVD
    form's gather and reductions are one bic_reduce launch (else bic_gather and cuBLAS GEMMs), and the shared form's
    combination is part of its expansion (else bic_shared_combine)."""
    return {"cp": [cp_front_name(X, SH)], "svd": ["bic_reduce" if fused else "bic_gather", "bic_svd_spatial"],
            "shared": ["bic_shared_filter"] + ([] if fused else ["bic_shared_combine"])}[kind]


SHARED_FUSED_DEFAULT = ops_bicluster.SHARED_FUSED_MAX_COLUMNS


@pytest.fixture(autouse=True)
def fused_shared_combination(monkeypatch):
    """The shared form's combination fused into its expansion (bic_expand_shared) wherever the expansion is one
    launch, and the SVD form's spatial stage unsplit (bic_svd_spatial, as on large grids), as these tests expect; the
    defaults (``SHARED_FUSED_MAX_COLUMNS`` 0, never fused; ``SVD_SPLIT_MAX_BLOCKS``, the small grids of these tests
    split) have tests of their own."""
    monkeypatch.setattr(ops_bicluster, "SHARED_FUSED_MAX_COLUMNS", 1 << 62)
    monkeypatch.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", 0)


def launches(kind, X, SH, fused=True, NH=3):
    """Every launch of ``kind``: the front end, then the expansion (one fused launch for few columns, else a scatter
    after each of the NH output groups' GEMMs)."""
    tail = ["bic_expand_shared" if kind == "shared" else "bic_expand"] if fused else ["bic_scatter"] * NH
    return front(kind, X, SH, fused) + tail


@pytest.fixture
def fc(fake_cupy):
    """The CuPy stand-in, with ops_bicluster's module cache cleared around the test."""
    ops_bicluster.clear_cache()
    yield fake_cupy
    ops_bicluster.clear_cache()


@pytest.fixture
def launched(monkeypatch, fc):
    """Names of the kernels launched, in order: ops.py's sources and _bicluster.cu alike (every launch gets its kernel
    from ``loader.get_kernel``)."""
    names = []
    real_ops = loader.get_kernel

    def spy_ops(source, name, dtype):
        names.append(name)
        return real_ops(source, name, dtype)
    monkeypatch.setattr(loader, "get_kernel", spy_ops)
    return names


def strided(fc, a):
    """A device view of ``a``'s values that is not C-contiguous."""
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    assert not view.flags.c_contiguous
    return fc.ndarray.__new__(fc.ndarray, view.shape, view.dtype, big, 0, view.strides)


def check(fc, y, ref, dtype, taps):
    assert isinstance(y, fc.ndarray), "GPU entry points must return device arrays"
    assert y.dtype == dtype and y.shape == ref.shape
    tol = (2e-5 if dtype == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def run(fc, kind, x, f, b, stride, padding, dev=None, dev_index=False):
    """ops_bicluster's entry point on device copies (``dev``: how float arrays go to the device); the index arrays
    stay on the host unless ``dev_index``."""
    dev = dev or fc.asarray
    args = [dev(a) if i in FLOATS[kind] else (fc.asarray(a) if dev_index and i != 1 and i != len(f) - 1 else a)
            for i, a in enumerate(f)]
    return ENTRY[kind](dev(x), *args, None if b is None else fc.asarray(b), stride=stride, padding=padding)


GEOMS = {
    # name: (stride, (top, bottom, left, right))
    "s1-p1": ((1, 1), (1, 1, 1, 1)),
    "s2-asym": ((2, 2), (2, 0, 1, 3)),
    "s2x1": ((2, 1), (0, 1, 0, 2)),
}


@pytest.mark.parametrize("expand", ["gemm", "fused"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("geom", sorted(GEOMS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_dense_conv_and_cpu(fc, launched, monkeypatch, rng, dtype, order, kind, geom, contiguous, expand):
    """Unequal groups on both sides (1, 4, 2 input channels; 2, 3, 4 output channels), odd sizes, bias; the
    expansion as a GEMM and a scatter a group, or as one bic_expand launch; likewise the SVD form's gather and
    reductions (bic_gather and a GEMM a group, or one bic_reduce launch)."""
    monkeypatch.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", 0 if expand == "gemm" else 10**6)
    monkeypatch.setattr(ops_bicluster, "REDUCE_TILED_MAX_COLUMNS", 0 if expand == "gemm" else 10**6)
    stride, pad = GEOMS[geom]
    C, F, X, Y = 7, 9, 3, 4
    f = make_factors(kind, rng, dtype, C, F, X, Y, (1, 4, 2), (2, 3, 4), RANKS[kind])
    x = rng.standard_normal((2, C, 11, 10)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = run(fc, kind, x, f, b, stride, pad, dev=None if contiguous else (lambda a: strided(fc, a)))
    check(fc, y, conv2d_einsum(x, dense_kernel(kind, f), b, stride=stride, padding=pad), dtype, C * X * Y * 4)
    check(fc, y, CPU[kind](x, *f, b, stride=stride, padding=pad), dtype, C * X * Y * 4)
    assert launched == launches(kind, X, stride[0], fused=expand == "fused")


@pytest.mark.parametrize("kind", KINDS)
def test_device_index_arrays_and_no_bias(fc, launched, rng, dtype, kind):
    """in_perm, out_perm (and assign) given as device int64 arrays, as a layer holds them after to_gpu(); against
    the naive loop conv of the rebuilt kernel."""
    f = make_factors(kind, rng, dtype, 6, 8, 2, 3, (3, 3), (5, 3), RANKS[kind])
    x = rng.standard_normal((1, 6, 7, 9)).astype(dtype)
    y = run(fc, kind, x, f, None, (1, 2), (0, 1, 1, 0), dev_index=True)
    check(fc, y, conv2d_naive(x, dense_kernel(kind, f), None, stride=(1, 2), padding=(0, 1, 1, 0)), dtype, 100)
    assert launched == launches(kind, 2, 1)      # 56 output positions: the fused expansion


@pytest.mark.parametrize("kind,per_block", [("cp", 1), ("cp", 3), ("svd", 1), ("shared", 1)])
def test_image_loop_and_batch_chunks(fc, launched, monkeypatch, rng, dtype, kind, per_block):
    """A grid z limit of 4 for 5 images (the kernels' image loops; for CP also 3 images a block by its own rule,
    ``CP_IMAGES_PER_BLOCK``, which the other forms do not read), then a workspace of two images' intermediates
    (chunks of 2 + 2 + 1 images)."""
    monkeypatch.setattr(ops_bicluster, "CP_IMAGES_PER_BLOCK", per_block)
    C, F, X, Y, H, W = 4, 6, 3, 3, 16, 15                       # CP: 8 x 8 tiles of 3 components, 2 chunks
    f = make_factors(kind, rng, dtype, C, F, X, Y, (1, 3), (3, 3), RANKS[kind])
    x = rng.standard_normal((5, C, H, W)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = conv2d_einsum(x, dense_kernel(kind, f), b, stride=(2, 2), padding=(1, 1, 1, 1))
    monkeypatch.setattr(ops_bicluster, "_MAX_GRID_YZ", 4)      # still >= G * kchunks, C and G * NH here
    check(fc, run(fc, kind, x, f, b, (2, 2), (1, 1, 1, 1)), ref, dtype, 200)
    assert launched.count(front(kind, X, 2)[0]) == 1

    P, HW = 8 * 8, H * W                                        # output 8 x 8
    if kind == "cp":
        per_image = (2 * 2 * 3 + 3) * P                         # Z (NH*G*K rows) + one group's GEMM result
    elif kind == "svd":
        per_image = C * HW + 2 * 2 * 2 * HW + 2 * 2 * 3 * P + 3 * P     # gathered x, reduction, Z, GEMM result
    else:
        assign, in_off = f[3], f[1]
        qrows = sum((in_off[g + 1] - in_off[g]) * len(set(assign[g].ravel().tolist())) for g in range(2))
        per_image = (qrows + 2 * 2 * 3 + 3) * P                 # filtered maps, Z, GEMM result
    monkeypatch.setattr(ops_bicluster, "WORKSPACE_BYTES", 2 * per_image * dtype.itemsize + 1)
    del launched[:]
    check(fc, run(fc, kind, x, f, b, (2, 2), (1, 1, 1, 1)), ref, dtype, 200)
    assert launched.count(front(kind, X, 2)[0]) == 3


def test_svd_channel_chunks_and_pixel_loop(fc, launched, monkeypatch, rng, dtype, order):
    """bic_svd_spatial with the weights of 2 of the K1 = 5 channels per shared-memory chunk (2 + 2 + 1) and a grid
    of one block of 256 threads for 312 output pixels (the grid-stride loop runs twice)."""
    X, Y = 3, 2
    monkeypatch.setattr(ops_bicluster, "SVD_SMEM_BUDGET", 2 * X * Y * 16 * dtype.itemsize)
    monkeypatch.setattr(ops_bicluster, "_MAX_GRID", 1)
    assert ops_bicluster.svd_chunk(5, X, Y, dtype.itemsize) == 2
    f = make_factors("svd", rng, dtype, 6, 5, X, Y, (2, 4), (2, 3), (5, 18))        # K2 = 18: two filter blocks
    x = rng.standard_normal((2, 6, 14, 13)).astype(dtype)
    y = run(fc, "svd", x, f, None, (1, 1), (1, 0, 0, 0))
    check(fc, y, conv2d_einsum(x, dense_kernel("svd", f), None, padding=(1, 0, 0, 0)), dtype, 6 * 6 * 5 * 18)
    assert y.shape[2:] == (13, 12) and launched == ["bic_reduce", "bic_svd_spatial", "bic_expand"]


def test_svd_reduction_paths_by_chunk(fc, launched, monkeypatch, rng, dtype):
    """Chunks of 2 + 2 + 1 images (a workspace of two images' intermediates) with room for one image's columns in
    bic_reduce: the two full chunks gather and reduce by GEMMs, the last one by bic_reduce; then, with one input
    group and K1 = 33, a grid limit of 2 below bic_reduce's ceil(NH*K1 / 32) = 3 row tiles sends the chunk to the
    GEMMs."""
    C, F, X, Y, H, W = 5, 6, 3, 3, 9, 8
    f = make_factors("svd", rng, dtype, C, F, X, Y, (1, 3, 1), (2, 4), (2, 3))
    x = rng.standard_normal((5, C, H, W)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = conv2d_einsum(x, dense_kernel("svd", f), b, stride=(1, 1), padding=(1, 1, 1, 1))
    HW = H * W
    per_image = C * HW + 3 * 2 * 2 * HW + 2 * 3 * 3 * HW + 4 * HW      # gathered x, reduction, Z, GEMM result
    monkeypatch.setattr(ops_bicluster, "WORKSPACE_BYTES", 2 * per_image * dtype.itemsize + 1)
    monkeypatch.setattr(ops_bicluster, "REDUCE_TILED_MAX_COLUMNS", HW)
    check(fc, run(fc, "svd", x, f, b, (1, 1), (1, 1, 1, 1)), ref, dtype, C * X * Y * 3)
    assert [n for n in launched if n in ("bic_gather", "bic_reduce")] == ["bic_gather", "bic_gather", "bic_reduce"]
    del launched[:]
    f = make_factors("svd", rng, dtype, C, F, X, Y, (C,), (2, 4), (33, 3))
    monkeypatch.setattr(ops_bicluster, "_MAX_GRID_YZ", 2)        # G * NH = 2 blocks (g, h): the kernels still run
    monkeypatch.setattr(ops_bicluster, "REDUCE_TILED_MAX_COLUMNS", 10**6)
    y = run(fc, "svd", x[:1], f, b, (1, 1), (1, 1, 1, 1))
    check(fc, y, conv2d_einsum(x[:1], dense_kernel("svd", f), b, padding=(1, 1, 1, 1)), dtype, C * X * Y * 33)
    assert launched == ["bic_gather", "bic_svd_spatial", "bic_expand"]


def test_shared_expansion_paths_by_chunk(fc, launched, monkeypatch, rng, dtype):
    """Chunks of 2 + 2 + 1 images with room for one image's columns in the fused expansion: the two full chunks
    combine into Z and expand by GEMMs and scatters (Z allocated once, for both), the last one by bic_expand_shared."""
    C, F, X, Y, H, W = 5, 6, 3, 2, 8, 9
    f = make_factors("shared", rng, dtype, C, F, X, Y, (1, 3, 1), (2, 4), RANKS["shared"])
    x = rng.standard_normal((5, C, H, W)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = conv2d_einsum(x, dense_kernel("shared", f), b, stride=(1, 1), padding=(1, 1, 0, 1))
    P = 8 * 9
    assign, in_off = f[3], f[1]
    qrows = sum((in_off[g + 1] - in_off[g]) * len(set(assign[g].ravel().tolist())) for g in range(3))
    per_image = (qrows + 2 * 3 * 3 + 4) * P                     # filtered maps, Z, GEMM result
    monkeypatch.setattr(ops_bicluster, "WORKSPACE_BYTES", 2 * per_image * dtype.itemsize + 1)
    monkeypatch.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", P)
    check(fc, run(fc, "shared", x, f, b, (1, 1), (1, 1, 0, 1)), ref, dtype, C * X * Y * 3)
    assert launched == (["bic_shared_filter", "bic_shared_combine", "bic_scatter", "bic_scatter"] * 2
                        + ["bic_shared_filter", "bic_expand_shared"])


@pytest.mark.parametrize("kind,budget", [("cp", "CP_SMEM_BUDGET"), ("svd", "SVD_SMEM_BUDGET"),
                                         ("shared", "SHARED_SMEM_BUDGET")])
def test_fallback_when_the_tile_does_not_fit(fc, launched, monkeypatch, rng, dtype, kind, budget):
    """No tile fits the (lowered) budget: the composed path of npconv.functional.bicluster runs instead."""
    monkeypatch.setattr(ops_bicluster, budget, 16)
    f = make_factors(kind, rng, dtype, 5, 6, 3, 2, (2, 3), (4, 2), RANKS[kind])
    x = rng.standard_normal((2, 5, 7, 8)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    y = run(fc, kind, x, f, b, (1, 2), (1, 0, 0, 1))
    ref = conv2d_einsum(x, dense_kernel(kind, f), b, stride=(1, 2), padding=(1, 0, 0, 1))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-10)
    assert not [n for n in launched if n.startswith("bic_")]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(fc, launched, rng, dtype, kind):
    f = make_factors(kind, rng, dtype, 4, 6, 3, 3, (2, 2), (3, 3), RANKS[kind])
    y = run(fc, kind, np.zeros((0, 4, 8, 8), dtype), f, None, (1, 1), (0, 0, 0, 0))
    assert y.shape == (0, 6, 6, 6) and y.dtype == dtype and launched == []


@pytest.mark.parametrize("expand", ["gemm", "fused"])
def test_zf_conv2_cp_shape_small_batch(fc, launched, monkeypatch, rng, expand):
    """ZF conv2's grouping (96 -> 256 channels, G = 48, H = 2, K = 6, 5x5, stride 2) on a 23 x 23 input, float32:
    128 rows a group (4 tiles of bic_expand) and 288 components."""
    monkeypatch.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", 0 if expand == "gemm" else 10**6)
    dtype = np.dtype(np.float32)
    f = make_factors("cp", rng, dtype, 96, 256, 5, 5, (2,) * 48, (128, 128), 6)
    x = rng.standard_normal((1, 96, 23, 23)).astype(dtype)
    y = run(fc, "cp", x, f, None, (2, 2), (0, 0, 0, 0))
    check(fc, y, CPU["cp"](x, *f, None, stride=2, padding=0), dtype, 2 * 25 * 48 * 6)
    assert launched == launches("cp", 5, 2, fused=expand == "fused", NH=2)


def test_launch_refuses_wrong_argument_types(fc, rng):
    x = fc.asarray(rng.standard_normal((1, 1, 4, 4)))
    with pytest.raises(TypeError, match="takes 10 arguments"):
        ops_bicluster._launch("bic_scatter", x.dtype, (1,), (32,), (x,))
    args = [x, fc.asarray(np.zeros(3, np.int64)), x] + [1] * 3
    with pytest.raises(TypeError, match="argument 1: expected a C-contiguous int32 array"):
        ops_bicluster._launch("bic_gather", x.dtype, (1,), (32,), tuple(args))
    with pytest.raises(ValueError, match="does not fit a 32-bit int"):
        ops_bicluster._launch("bic_gather", x.dtype, (1,), (32,),
                              (x, fc.asarray(np.zeros(1, np.int32)), x, 2**31, 1, 1))
    with pytest.raises(ValueError, match="no kernel 'nope'"):
        ops_bicluster.get_kernel("nope", np.float32)


def test_shared_combination_unfused_by_default(fc, launched, monkeypatch, rng, dtype, order):
    """SHARED_FUSED_MAX_COLUMNS (the module's default, not the autouse fixture's) below the columns:
    bic_shared_combine into Z, then one bic_expand launch (not bic_expand_shared), the same result."""
    monkeypatch.setattr(ops_bicluster, "SHARED_FUSED_MAX_COLUMNS", SHARED_FUSED_DEFAULT)
    assert SHARED_FUSED_DEFAULT < 5 * 10                  # the output: 5 x 10 columns
    C, F, X, Y = 7, 9, 3, 4
    f = make_factors("shared", rng, dtype, C, F, X, Y, (1, 4, 2), (2, 3, 4), RANKS["shared"])
    x = rng.standard_normal((1, C, 11, 10)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = run(fc, "shared", x, f, b, (2, 1), (1, 0, 2, 1))
    check(fc, y, conv2d_einsum(x, dense_kernel("shared", f), b, stride=(2, 1), padding=(1, 0, 2, 1)), dtype,
          C * X * Y * 4)
    assert launched == ["bic_shared_filter", "bic_shared_combine", "bic_expand"]


@pytest.mark.parametrize("splits,used", [(2, 2), (3, 3), (4, 3), (9, 5)])
@pytest.mark.parametrize("expand", ["fused", "gemm"])
def test_svd_spatial_with_channel_splits(fc, launched, monkeypatch, rng, dtype, order, splits, used, expand):
    """SVD_SPLIT_MAX_BLOCKS at or above the unsplit grid's blocks (of the whole batch: ceil(3 * 91 / 256) = 2 pixel
    blocks x 2 filter blocks x G * NH = 4): bic_svd_spatial_split splits the K1 = 5 channels into ``used`` blocks of
    ceil(5 / splits) channels (SVD_SPLITS = 4 gives 2 + 2 + 1, none empty; 9 gives one a channel) along grid z, each
    writing its own rows of Z, and the expansion (one bic_expand launch, or a GEMM and a scatter a group) sums them:
    the same result as the dense conv and the CPU path, in chunks of images too. One block fewer in the rule and
    bic_svd_spatial runs unsplit."""
    X, Y = 3, 2
    f = make_factors("svd", rng, dtype, 6, 5, X, Y, (2, 4), (2, 3), (5, 18))        # G = 2, NH = 2
    x = rng.standard_normal((3, 6, 14, 13)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    stride, pad = (2, 1), (1, 0, 0, 1)
    ref = conv2d_einsum(x, dense_kernel("svd", f), b, stride=stride, padding=pad)
    blocks = 2 * 2 * 4
    monkeypatch.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", blocks)
    monkeypatch.setattr(ops_bicluster, "SVD_SPLITS", splits)
    if expand == "gemm":
        monkeypatch.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", 0)
    per_image = 6 * 14 * 13 + 2 * 2 * 5 * 14 * 13 + 2 * 2 * used * 18 * 7 * 13 + 3 * 7 * 13
    monkeypatch.setattr(ops_bicluster, "WORKSPACE_BYTES", 2 * per_image * dtype.itemsize + 1)   # chunks of 2 + 1
    grids = []
    real_launch = ops_bicluster._launch

    def spy(name, dt, grid, block, args, **kw):
        if name.startswith("bic_svd_spatial"):
            grids.append((name, grid[2], int(args[-1]) if name.endswith("split") else 1))
        return real_launch(name, dt, grid, block, args, **kw)
    monkeypatch.setattr(ops_bicluster, "_launch", spy)
    y = run(fc, "svd", x, f, b, stride, pad)
    assert grids == [("bic_svd_spatial_split", 4 * used, used)] * 2    # two chunks, G * NH * splits blocks along z
    check(fc, y, ref, dtype, 6 * X * Y * 18)
    check(fc, y, CPU["svd"](x, *f, b, stride=stride, padding=pad), dtype, 6 * X * Y * 18)
    del grids[:]
    monkeypatch.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", blocks - 1)
    check(fc, run(fc, "svd", x, f, b, stride, pad), ref, dtype, 6 * X * Y * 18)
    assert grids and grids == [("bic_svd_spatial", 4, 1)] * len(grids)
    # within the rule, but the splits would pass grid z's limit (lowered to G * NH = 4): unsplit, not the fallback
    del grids[:]
    monkeypatch.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", blocks)
    monkeypatch.setattr(ops_bicluster, "_MAX_GRID_YZ", 4)
    check(fc, run(fc, "svd", x, f, b, stride, pad), ref, dtype, 6 * X * Y * 18)
    assert grids and grids == [("bic_svd_spatial", 4, 1)] * len(grids)
