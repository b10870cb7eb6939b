"""The biclustered layers' CuPy branch end to end, without a GPU: ``tests/cuda_emulator/as_cupy`` (an importable
``cupy`` made of NumPy and the CPU emulator) is installed as ``cupy`` for the test, so
``npconv.functional.bicluster`` and ``npconv.layers.bicluster`` take their GPU path (type dispatch, validation,
``run_validated``, ops_bicluster, the kernels) on "device" arrays. Each result is compared with the same call on NumPy
arrays (the CPU path) and with the dense conv of the kernel rebuilt from the factors by loops.
"""
from __future__ import annotations

import numpy as np
import pytest
from bicluster_reference import dense_kernel, make_factors
from reference import conv2d_einsum
from test_cuda_lowrank_functional_emulated import cp, to_dev  # noqa: F401  (cp: a fixture)

from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
from npconv.decompose.shared import SharedSeparableResult
from npconv.functional import bicluster as FB
from npconv.kernels.cuda import loader, ops_bicluster
from npconv.layers.bicluster import BiclusterConv2d, SharedSeparableConv2d

pytestmark = pytest.mark.cpuemu
KINDS = ["cp", "svd", "shared"]
RANKS = {"cp": 3, "svd": (2, 3), "shared": (3, 4)}
FLOATS = {"cp": (2, 3, 4, 5), "svd": (2, 3, 4), "shared": (2, 4, 5, 6)}
FUNCS = {"cp": FB.bicluster_cp_conv2d, "svd": FB.bicluster_svd_conv2d, "shared": FB.shared_separable_conv2d}


@pytest.fixture
def bcp(cp, monkeypatch):  # noqa: F811  (the imported fixture)
    """The emulated ``cupy`` (see test_cuda_lowrank_functional_emulated.cp); records the bicluster kernels launched
    in ``bcp.launched``."""
    ops_bicluster.clear_cache()
    launched = []
    real = loader.get_kernel

    def spy(source, name, dtype):
        if source == ops_bicluster.SOURCE:
            launched.append(name)
        return real(source, name, dtype)
    monkeypatch.setattr(loader, "get_kernel", spy)
    monkeypatch.setattr(cp, "launched", launched, raising=False)
    yield cp
    ops_bicluster.clear_cache()


def check(cp, got, want, dtype, taps):
    assert isinstance(got, cp.ndarray), f"expected a device array, got {type(got).__name__}"
    assert got.dtype == dtype and got.shape == want.shape
    tol = (2e-5 if np.dtype(dtype) == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.fixture(params=[True, False], ids=["contiguous", "strided"])
def contiguous(request):
    return request.param


@pytest.mark.parametrize("kind", KINDS)
def test_functional(bcp, rng, dtype, contiguous, kind):
    f = make_factors(kind, rng, dtype, 7, 9, 3, 4, (1, 4, 2), (2, 3, 4), RANKS[kind])
    x = rng.standard_normal((2, 7, 11, 10)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    kw = dict(stride=2, padding=(1, 2, 0, 1))
    dev = [to_dev(bcp, a, contiguous) if i in FLOATS[kind] else a for i, a in enumerate(f)]
    got = FUNCS[kind](to_dev(bcp, x, contiguous), *dev, bcp.asarray(b), **kw)
    check(bcp, got, FUNCS[kind](x, *f, b, **kw), dtype, 7 * 12 * 4)
    check(bcp, got, conv2d_einsum(x, dense_kernel(kind, f), b, stride=(2, 2), padding=(1, 2, 0, 1)), dtype, 7 * 12 * 4)
    fused = "bic_expand"          # the shared form's combination is a launch of its own (SHARED_FUSED_MAX_COLUMNS)
    assert bcp.launched[-1] == fused and any(n.startswith("bic_") and n != fused for n in bcp.launched), bcp.launched
    # every array on the device, the index arrays included (the functional API copies those to the host)
    got = FUNCS[kind](bcp.asarray(x), *[bcp.asarray(a) for a in f], None, **kw)
    check(bcp, got, FUNCS[kind](x, *f, None, **kw), dtype, 7 * 12 * 4)


def test_bicluster_conv2d_dispatch(bcp, rng, dtype):
    for kind in ("cp", "svd"):
        f = make_factors(kind, rng, dtype, 6, 8, 3, 3, (2, 4), (5, 3), RANKS[kind])
        x = rng.standard_normal((1, 6, 9, 9)).astype(dtype)
        del bcp.launched[:]
        got = FB.bicluster_conv2d(bcp.asarray(x), *[bcp.asarray(a) if i in FLOATS[kind] else a
                                                    for i, a in enumerate(f)], stride=1, padding=1)
        check(bcp, got, FB.bicluster_conv2d(x, *f, stride=1, padding=1), dtype, 6 * 9 * 3)
        assert {"cp": "bic_cp_front_x3s1", "svd": "bic_svd_spatial_split"}[kind] in bcp.launched   # a small grid


def test_functional_validation_on_device(bcp, rng):
    f = make_factors("cp", rng, np.float64, 6, 8, 3, 3, (3, 3), (4, 4), 2)
    dev = [bcp.asarray(a) if i in FLOATS["cp"] else a for i, a in enumerate(f)]
    x = bcp.asarray(rng.standard_normal((1, 6, 7, 7)))
    with pytest.raises(TypeError, match="mix"):
        FB.bicluster_cp_conv2d(x, *f)                                   # NumPy factors, device input
    with pytest.raises(ValueError, match="in_perm must be a permutation"):
        FB.bicluster_cp_conv2d(x, np.zeros(6, np.int64), *dev[1:])
    with pytest.raises(ValueError, match="output height"):
        FB.bicluster_cp_conv2d(x[:, :, :2], *dev)
    with pytest.raises(TypeError, match="reduce must have the dtype of x"):
        FB.bicluster_cp_conv2d(x, *dev[:2], dev[2].astype(np.float32), *dev[3:])
    assert bcp.launched == []


def make_layer(kind, f, b, **geom):
    if kind == "shared":
        return SharedSeparableConv2d(**dict(zip(SharedSeparableResult.FACTORS, f)), bias=b, **geom)
    names = (BiclusterCPResult if kind == "cp" else BiclusterSVDResult).FACTORS
    return BiclusterConv2d(form=kind, **dict(zip(names, f)), bias=b, **geom)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_on_device(bcp, rng, dtype, contiguous, kind):
    """Layer.to_gpu(), then forward on device input: run_validated takes the dedicated kernels."""
    f = make_factors(kind, rng, np.float64, 6, 10, 3, 3, (2, 1, 3), (6, 4), RANKS[kind])
    layer = make_layer(kind, f, rng.standard_normal(10), stride=(2, 1), padding=(1, 0, 2, 1))
    x = rng.standard_normal((2, 6, 12, 11)).astype(dtype)
    want = layer(x)                                       # the CPU path, weights cast to x's dtype
    assert layer.to_gpu() is layer and layer.on_gpu
    del bcp.launched[:]
    got = layer(to_dev(bcp, x, contiguous))
    check(bcp, got, want, dtype, 6 * 9 * 4)
    assert {"cp": "bic_cp_front_x3s2", "svd": "bic_svd_spatial_split",                  # a small grid: split
            "shared": "bic_shared_filter"}[kind] in bcp.launched
    cached = layer._params_for(to_dev(bcp, x, True))
    for k in ("in_perm", "out_perm"):                     # converted to the kernels' int32 once, not every call
        assert isinstance(cached[k], bcp.ndarray) and cached[k].dtype == np.int32, k
        np.testing.assert_array_equal(np.asarray(cached[k]), layer.result.__getattribute__(k))
    if kind == "shared":
        assert isinstance(layer.params["assign"], np.ndarray) and not isinstance(layer.params["assign"], bcp.ndarray), \
            "assign stays in host memory"
        assert isinstance(layer.params["reduce"], bcp.ndarray)
    with pytest.raises(TypeError, match="device"):
        layer(x)                                          # NumPy input, device weights
    layer.to_cpu()
    assert not layer.on_gpu
    np.testing.assert_array_equal(layer(x), want)
