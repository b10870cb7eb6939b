"""The direct (im2col-free) path of conv2d (``algorithm="direct"``, and what ``"auto"`` sends to it): the whole
convolution against the naive loops and against the im2col + GEMM path, the "auto" choice, and the option's
validation."""
import numpy as np
import pytest

import npconv.functional._direct as DR
from npconv.functional import conv2d
from tests.reference import conv2d_einsum, conv2d_naive, count_calls, tolerance

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,F,K,stride,padding", [
    (3, 8, (5, 5), (1, 1), (2, 2, 2, 2)),
    (3, 6, (7, 7), (2, 2), (1, 1, 1, 1)),        # a ZF conv1-like first layer
    (1, 5, (3, 2), (2, 3), (0, 1, 2, 0)),        # uneven strides and padding, a short last filter block
    (4, 9, (1, 4), (1, 2), (0, 0, 1, 1)),
    (2, 4, (3, 3), (3, 3), (0, 0, 0, 0)),
    (40, 33, (5, 5), (2, 1), (1, 2, 0, 1)),       # a wide dense layer: 1000 taps a filter, blocks not all full
])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "numba"])
def test_direct_matches_naive_loops(rng, monkeypatch, dtype, C, F, K, stride, padding, bias, microkernel):
    # the filters both ways: npconv's GEMM micro-kernel (where the CPU has one; here also for sparse blocks) and the
    # numba passes
    monkeypatch.setattr(DR, "USE_MICROKERNEL", microkernel)
    monkeypatch.setattr(DR, "_MK_MIN_FILL", 0.0)
    x = rng.standard_normal((2, C, 13, 16)).astype(dtype)
    w = rng.standard_normal((F, C) + K).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    y = conv2d(x, w, b, stride=stride, padding=padding, algorithm="direct")
    assert y.dtype == dtype
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, stride, padding), *tolerance(dtype))


def test_direct_micro_kernel_only_for_full_blocks(rng, monkeypatch):
    """The micro-kernel runs the filters when its row blocks are full enough, else the numba passes do; both give
    the convolution."""
    from npconv.kernels.cpu import gemm as KG
    from npconv.kernels.cpu import lowrank as KL
    tiles = KG.taps_tile_shapes(np.float32)
    if not tiles:
        pytest.skip("this CPU has no GEMM micro-kernel")
    rows = sorted(t[1] for t in tiles)
    calls = []
    monkeypatch.setattr(KL, "fused_direct_conv_mk", lambda *a, _f=KL.fused_direct_conv_mk: (calls.append(1), _f(*a))[1])
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    for F in (8, 5, 1):
        # one group of F filters: the micro-kernel when some tile's blocks of rows are at least 0.7 full
        used = max(F / (-(-F // r) * r) for r in rows) >= 0.7
        calls.clear()
        w = rng.standard_normal((F, 3, 3, 3)).astype(np.float32)
        y = conv2d(x, w, padding=1, algorithm="direct")
        np.testing.assert_allclose(y, conv2d_einsum(x, w, None, (1, 1), (1, 1, 1, 1)), *tolerance(np.float32))
        assert bool(calls) == used


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_non_contiguous_and_out(rng, dtype):
    big = rng.standard_normal((3, 6, 40, 22)).astype(dtype)
    x = big[:, ::2, ::2, :]                                  # (3, 3, 20, 22), strided
    assert not x.flags.c_contiguous
    w = np.asfortranarray(rng.standard_normal((10, 3, 5, 5)).astype(dtype))
    b = rng.standard_normal(20).astype(dtype)[::2]
    out = np.full((3, 10, 20, 22), np.nan, dtype)
    y = conv2d(x, w, b, padding=2, algorithm="direct", out=out)
    assert y is out
    np.testing.assert_allclose(y, conv2d_einsum(x, w, b, (1, 1), (2, 2, 2, 2)), *tolerance(dtype))


def test_auto_chooses_direct_for_few_taps(rng, monkeypatch):
    calls = count_calls(monkeypatch, DR, "direct_conv_cpu")
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    w = rng.standard_normal((64, 3, 5, 5)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    assert DR.use_direct(x.shape, w.shape, (1, 1), 1, (32, 32))          # CIFAR conv1: 75 taps, 20 M MACs
    y = conv2d(x, w, b, padding=2)
    assert calls == [1]
    np.testing.assert_allclose(y, conv2d(x, w, b, padding=2, algorithm="gemm"), rtol=1e-4, atol=1e-4)
    conv2d(x[:1, :, :8, :8], w[:4], padding=2)                          # too little work (0.08 M MACs)
    conv2d(x[:, :, :, :], rng.standard_normal((96, 3, 5, 5)).astype(np.float32), padding=2)   # 96 filters
    xl = rng.standard_normal((1, 3, 80, 80)).astype(np.float32)
    conv2d(xl, w, padding=2)                                            # 6400 positions per plane
    xc = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    conv2d(xc, rng.standard_normal((8, 16, 5, 5)).astype(np.float32))   # 400 taps: GEMM
    conv2d(x, w, padding=2, dilation=2)                                 # not eligible
    assert calls == [1]
    assert not DR.use_direct((4, 6, 32, 32), (6, 2, 5, 5), (1, 1), 3, (32, 32))   # grouped


@pytest.mark.parametrize("kwargs,match", [(dict(dilation=2), "dilation"), (dict(groups=2), "groups")])
def test_direct_ineligible_is_an_error(rng, kwargs, match):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 4 // kwargs.get("groups", 1), 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=rf'algorithm="direct".*{match}'):
        conv2d(x, w, algorithm="direct", **kwargs)


def test_use_direct_bounds(monkeypatch):
    """The documented bounds of the auto choice, each on both sides (shapes only; nothing is run): the numba
    kernel's bounds (the micro-kernel's rule switched off), then the micro-kernel's."""
    monkeypatch.setattr(DR, "USE_MICROKERNEL", False)
    ok = dict(x_shape=(8, 4, 64, 64), w_shape=(64, 4, 5, 5), dilation=(1, 1), groups=1, out_hw=(64, 64))
    assert DR.use_direct(**ok)                                               # 100 taps, 64 filters, 4096 positions
    assert not DR.use_direct(**{**ok, "w_shape": (64, 4, 6, 5)})             # 120 taps
    assert not DR.use_direct(**{**ok, "w_shape": (65, 4, 5, 5)})             # 65 filters
    assert not DR.use_direct(**{**ok, "out_hw": (64, 65)})                   # 4160 positions
    assert not DR.use_direct(**{**ok, "x_shape": (1, 4, 8, 8), "out_hw": (8, 8)})   # 0.4 M multiply-adds
    assert DR.use_direct(**{**ok, "x_shape": (1, 4, 13, 13), "out_hw": (13, 13)})   # 1.08 M: enough
    assert not DR.use_direct(**{**ok, "dilation": (1, 2)})
    assert not DR.use_direct(**{**ok, "groups": 2})
    if not DR._taps_tiles(np.float32):
        return
    monkeypatch.setattr(DR, "USE_MICROKERNEL", True)
    wide = dict(x_shape=(8, 96, 55, 55), w_shape=(256, 96, 5, 5), dilation=(1, 1), groups=1, out_hw=(26, 26))
    assert DR.use_direct(**wide)                                             # 8 images, 5x5, 256 filters
    assert not DR.use_direct(**{**wide, "x_shape": (7, 96, 55, 55)})          # 7 images
    assert not DR.use_direct(**{**wide, "w_shape": (256, 96, 4, 6)})          # 24 taps a channel
    assert not DR.use_direct(**{**wide, "w_shape": (31, 96, 5, 5)})           # 31 filters
    assert not DR.use_direct(**{**wide, "groups": 2})


def test_auto_algorithm_names_what_auto_runs():
    from npconv.functional.conv import auto_algorithm
    one = ((1, 1), (1, 1), 1)
    assert auto_algorithm((4, 3, 32, 32), (64, 3, 5, 5), *one, (32, 32)) == "direct"      # CIFAR conv1
    assert auto_algorithm((1, 3, 224, 224), (96, 3, 7, 7), (2, 2), (1, 1), 1, (110, 110)) == "gemm"   # ZF conv1
    if DR._taps_tiles(np.float32):
        # ... at batch 8 and more on the micro-kernel's direct path
        assert auto_algorithm((8, 3, 224, 224), (96, 3, 7, 7), (2, 2), (1, 1), 1, (110, 110)) == "direct"
    assert auto_algorithm((8, 256, 13, 13), (384, 256, 3, 3), *one, (13, 13)) == "winograd"
