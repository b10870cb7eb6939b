"""The biclustered layers on a real device: each function and layer on CuPy arrays against the dense conv of the
kernel rebuilt from the factors by loops (tests/bicluster_reference.py) and against the same call on NumPy arrays
(the CPU path), both dtypes, contiguous and non-contiguous inputs, unequal groups, stride and 4-sided padding; the
kernel paths of ops_bicluster (dedicated kernels, the composed fallback, batch chunks, the image loop); ZF conv2's
groupings (CP G=48 H=2, SVD G=H=2 (19, 51)) on 55 x 55 inputs.

Skipped without a CUDA device; ``NPCONV_REQUIRE_GPU=1`` makes the skips failures. The test code itself can be run
on the CPU emulator: ``PYTHONPATH=tests/cuda_emulator/as_cupy python -m pytest tests/gpu/test_gpu_bicluster.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from bicluster_reference import dense_kernel, make_factors
from gpu_helpers import to_gpu
from reference import conv2d_einsum

pytestmark = pytest.mark.gpu
KINDS = ["cp", "svd", "shared"]
RANKS = {"cp": 3, "svd": (2, 3), "shared": (3, 4)}
FLOATS = {"cp": (2, 3, 4, 5), "svd": (2, 3, 4), "shared": (2, 4, 5, 6)}


def funcs():
    from npconv.functional import bicluster as FB
    return {"cp": FB.bicluster_cp_conv2d, "svd": FB.bicluster_svd_conv2d, "shared": FB.shared_separable_conv2d}


def check(cp, y, ref, dtype, taps):
    """GPU float32 sums (FMA-contracted, in another order) of ``taps`` products: tolerance grows with the sum."""
    assert isinstance(y, cp.ndarray), f"expected a cupy.ndarray, got {type(y).__name__}"
    assert y.dtype == dtype and y.shape == ref.shape
    tol = (5e-5 if dtype == np.float32 else 1e-11) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def on_gpu(cp, kind, f, contiguous=True):
    """The factors with the float arrays on the device (index arrays stay on the host)."""
    return [to_gpu(cp, a, contiguous) if i in FLOATS[kind] else a for i, a in enumerate(f)]


GEOMS = {
    # name: (stride, (top, bottom, left, right))
    "s1-p1": ((1, 1), (1, 1, 1, 1)),
    "s2-asym": ((2, 2), (2, 0, 1, 3)),
    "s2x1-p0": ((2, 1), (0, 0, 0, 0)),
}


@pytest.mark.parametrize("expand", ["gemm", "fused"])
@pytest.mark.parametrize("geom", sorted(GEOMS))
@pytest.mark.parametrize("kind", KINDS)
def test_functional_matches_dense_conv_and_cpu(cp, rng, dtype, contiguous, monkeypatch, kind, geom, expand):
    """The expansion as a cuBLAS GEMM and a scatter a group, or as one bic_expand launch (few columns); the SVD
    form's gather and reductions likewise (bic_gather and a GEMM a group, or one bic_reduce launch)."""
    from npconv.kernels.cuda import ops_bicluster
    monkeypatch.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", 0 if expand == "gemm" else 10**6)
    monkeypatch.setattr(ops_bicluster, "REDUCE_TILED_MAX_COLUMNS", 0 if expand == "gemm" else 10**6)
    stride, pad = GEOMS[geom]
    C, F, X, Y = 7, 9, 3, 4
    f = make_factors(kind, rng, dtype, C, F, X, Y, (1, 4, 2), (2, 3, 4), RANKS[kind])
    x = rng.standard_normal((3, C, 17, 15)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    fn = funcs()[kind]
    y = fn(to_gpu(cp, x, contiguous), *on_gpu(cp, kind, f, contiguous), cp.asarray(b), stride=stride, padding=pad)
    check(cp, y, conv2d_einsum(x, dense_kernel(kind, f), b, stride=stride, padding=pad), dtype, C * X * Y * 4)
    check(cp, y, fn(x, *f, b, stride=stride, padding=pad), dtype, C * X * Y * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_device_index_arrays_and_no_bias(cp, rng, dtype, kind):
    if not hasattr(cp.ndarray, "get"):
        pytest.skip("this cupy (the CPU-emulator stand-in) has no ndarray.get, which the validation of device index "
                    "arrays uses")
    f = make_factors(kind, rng, dtype, 6, 8, 5, 1, (3, 3), (5, 3), RANKS[kind])
    x = rng.standard_normal((2, 6, 13, 9)).astype(dtype)
    fn = funcs()[kind]
    y = fn(cp.asarray(x), *[cp.asarray(a) for a in f], None, stride=2, padding=(2, 2, 0, 0))
    check(cp, y, conv2d_einsum(x, dense_kernel(kind, f), None, stride=(2, 2), padding=(2, 2, 0, 0)), dtype, 6 * 5 * 4)


def make_layer(kind, f, b, **geom):
    from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
    from npconv.decompose.shared import SharedSeparableResult
    from npconv.layers.bicluster import BiclusterConv2d, SharedSeparableConv2d
    if kind == "shared":
        return SharedSeparableConv2d(**dict(zip(SharedSeparableResult.FACTORS, f)), bias=b, **geom)
    names = (BiclusterCPResult if kind == "cp" else BiclusterSVDResult).FACTORS
    return BiclusterConv2d(form=kind, **dict(zip(names, f)), bias=b, **geom)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_gpu_matches_cpu(cp, rng, dtype, contiguous, kind):
    if not hasattr(cp.ndarray, "get"):
        pytest.skip("this cupy (the CPU-emulator stand-in) has no ndarray.get, which the layer uses to read its group "
                    "offsets back from the device")
    f = make_factors(kind, rng, np.float64, 6, 10, 3, 3, (2, 1, 3), (6, 4), RANKS[kind])
    layer = make_layer(kind, f, rng.standard_normal(10), stride=(2, 1), padding=(1, 0, 2, 1))
    x = rng.standard_normal((2, 6, 21, 19)).astype(dtype)
    want = layer(x)
    layer.to_gpu()
    assert layer.on_gpu
    check(cp, layer(to_gpu(cp, x, contiguous)), want, dtype, 6 * 9 * 4)
    if kind == "shared":
        assert isinstance(layer.params["assign"], np.ndarray), "assign stays in host memory"
    with pytest.raises(TypeError, match="device"):
        layer(x)


@pytest.mark.parametrize("rules", [{"SVD_SPLIT_MAX_BLOCKS": 1 << 62}, {"SVD_SPLIT_MAX_BLOCKS": 0},
                                   {"SHARED_FUSED_MAX_COLUMNS": 1 << 62}],
                         ids=["svd-split", "svd-no-split", "shared-fused"])
def test_small_batch_rules(cp, rng, dtype, monkeypatch, rules):
    """The small-batch variants of the rules, each way: the SVD layer's spatial stage with its K1 channels split among
    blocks or not, the shared layer's combination fused into the expansion (off by default); against the CPU path,
    recorded and then replayed on another input."""
    if not hasattr(cp.ndarray, "get"):
        pytest.skip("this cupy (the CPU-emulator stand-in) has no ndarray.get, which the layer uses")
    from npconv.kernels.cuda import ops_bicluster
    kind = "shared" if "SHARED_FUSED_MAX_COLUMNS" in rules else "svd"
    for k, v in rules.items():
        monkeypatch.setattr(ops_bicluster, k, v)
    f = make_factors(kind, rng, np.float64, 6, 10, 3, 3, (2, 1, 3), (6, 4), RANKS[kind])
    layer = make_layer(kind, f, rng.standard_normal(10), stride=(2, 1), padding=(1, 0, 2, 1))
    xs = [rng.standard_normal((1, 6, 21, 19)).astype(dtype) for _ in range(2)]
    wants = [layer(x) for x in xs]
    layer.to_gpu()
    for x, want in zip(xs, wants):                       # recorded, then replayed
        check(cp, layer(cp.asarray(x)), want, dtype, 6 * 9 * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_to_gpu_and_back(cp, rng, kind):
    if not hasattr(cp.ndarray, "get"):
        pytest.skip("this cupy (the CPU-emulator stand-in) has no ndarray.get, which Layer.to_cpu uses")
    f = make_factors(kind, rng, np.float64, 6, 10, 3, 3, (2, 1, 3), (6, 4), RANKS[kind])
    layer = make_layer(kind, f, None, stride=1, padding=1)
    x = rng.standard_normal((1, 6, 9, 9))
    want = layer(x)
    layer.to_gpu().to_cpu()
    assert not layer.on_gpu and all(type(v) is np.ndarray for v in layer.params.values())
    np.testing.assert_array_equal(layer(x), want)


def test_mixed_numpy_and_cupy_is_a_type_error(cp, rng):
    f = make_factors("cp", rng, np.float32, 6, 8, 3, 3, (3, 3), (4, 4), 2)
    with pytest.raises(TypeError, match="mix"):
        funcs()["cp"](cp.asarray(rng.standard_normal((1, 6, 8, 8)).astype(np.float32)), *f)


# --- the kernel paths ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,budget", [("cp", "CP_SMEM_BUDGET"), ("svd", "SVD_SMEM_BUDGET"),
                                         ("shared", "SHARED_SMEM_BUDGET")])
def test_composed_fallback(cp, rng, dtype, monkeypatch, kind, budget):
    from npconv.kernels.cuda import ops_bicluster
    monkeypatch.setattr(ops_bicluster, budget, 16)
    f = make_factors(kind, rng, dtype, 5, 6, 3, 2, (2, 3), (4, 2), RANKS[kind])
    x = rng.standard_normal((2, 5, 9, 8)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    y = funcs()[kind](cp.asarray(x), *on_gpu(cp, kind, f), cp.asarray(b), stride=(1, 2), padding=(1, 0, 0, 1))
    check(cp, y, conv2d_einsum(x, dense_kernel(kind, f), b, stride=(1, 2), padding=(1, 0, 0, 1)), dtype, 5 * 6 * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_chunks_and_image_loop(cp, rng, dtype, monkeypatch, kind):
    """A tiny workspace (one image per chunk) and a grid z limit of 4 for 7 images (the kernels' image loops)."""
    from npconv.kernels.cuda import ops_bicluster
    f = make_factors(kind, rng, dtype, 4, 6, 3, 3, (1, 3), (3, 3), RANKS[kind])
    x = rng.standard_normal((7, 4, 10, 9)).astype(dtype)
    ref = conv2d_einsum(x, dense_kernel(kind, f), None, stride=(1, 1), padding=(1, 1, 1, 1))
    monkeypatch.setattr(ops_bicluster, "_MAX_GRID_YZ", 4)
    check(cp, funcs()[kind](cp.asarray(x), *on_gpu(cp, kind, f), None, padding=1), ref, dtype, 4 * 9 * 4)
    monkeypatch.setattr(ops_bicluster, "WORKSPACE_BYTES", 1)
    check(cp, funcs()[kind](cp.asarray(x), *on_gpu(cp, kind, f), None, padding=1), ref, dtype, 4 * 9 * 4)


@pytest.mark.parametrize("form", ["cp-K6", "cp-K12", "svd-19-51"])
def test_zf_conv2_groupings(cp, rng, dtype, form):
    """ZF conv2 (96 -> 256, 5x5, stride 2) on 55 x 55: the paper's biclustered CP (G=48, H=2) and SVD (G=H=2)."""
    if form.startswith("cp"):
        kind = "cp"
        f = make_factors("cp", rng, dtype, 96, 256, 5, 5, (2,) * 48, (128, 128), int(form[4:]))
    else:
        kind = "svd"
        f = make_factors("svd", rng, dtype, 96, 256, 5, 5, (48, 48), (128, 128), (19, 51))
    x = rng.standard_normal((2, 96, 55, 55)).astype(dtype)
    b = rng.standard_normal(256).astype(dtype)
    fn = funcs()[kind]
    y = fn(cp.asarray(x), *on_gpu(cp, kind, f), cp.asarray(b), stride=2, padding=0)
    assert y.shape == (2, 256, 26, 26)
    check(cp, y, fn(x, *f, b, stride=2, padding=0), dtype, 96 * 25 * 12)
