"""The factored layers on a real device: each layer (and functional call) on CuPy arrays against the same call on
NumPy arrays (the CPU path, itself tested against independent references), both dtypes, contiguous and
non-contiguous inputs; the kernel paths of ops_lowrank (fused monochromatic kernel, its composed fallback,
channel-chunked factor_conv, the ops.conv2d fallback, the fused low-rank conv and its two-stage forms) against the
dense conv of the rebuilt kernel.

Skipped without a CUDA device; ``NPCONV_REQUIRE_GPU=1`` makes the skips failures. The test code itself can be run
on the CPU emulator: ``PYTHONPATH=tests/cuda_emulator/as_cupy python -m pytest tests/gpu/test_gpu_lowrank.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import to_gpu
from reference import conv2d_einsum

pytestmark = pytest.mark.gpu


def check(cp, y, ref, dtype, taps):
    """GPU float32 sums (FMA-contracted, in another order) of ``taps`` products: tolerance grows with the sum."""
    assert isinstance(y, cp.ndarray), f"expected a cupy.ndarray, got {type(y).__name__}"
    assert y.dtype == dtype and y.shape == ref.shape
    tol = (5e-5 if dtype == np.float32 else 1e-11) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def mono_dense(T, a, S):
    """W[f, c] = T[a_f, c] * S[f], by loops (float64)."""
    Wd = np.zeros((S.shape[0], T.shape[1]) + S.shape[1:])
    for f in range(S.shape[0]):
        for c in range(T.shape[1]):
            Wd[f, c] = T[a[f], c] * np.asarray(S[f], np.float64)
    return Wd


def make_layers(rng, C, F, hw):
    """One layer of each factored kind (float64 factors) for (C, hw, hw) inputs, ZF conv1-like geometry."""
    from npconv.layers.lowrank import LowRankConv2d, LowRankLinear, MonochromaticConv2d, SeparableConv2d
    return {
        "monochromatic": MonochromaticConv2d(rng.standard_normal((6, C)), np.repeat(np.arange(6), F // 6),
                                             rng.standard_normal((F, 7, 7)), rng.standard_normal(F), stride=2,
                                             padding=1),
        "monochromatic-unequal": MonochromaticConv2d(rng.standard_normal((5, C)), rng.integers(0, 5, F),
                                                     rng.standard_normal((F, 7, 7)), None, stride=2, padding=1),
        "lowrank": LowRankConv2d(rng.standard_normal((8, C, 7, 7)), rng.standard_normal((F, 8)),
                                 rng.standard_normal(F), stride=2, padding=1),
        "separable": SeparableConv2d(rng.standard_normal((4, C, 7, 1)), rng.standard_normal((F, 4, 1, 7)),
                                     rng.standard_normal(F), stride=2, padding=1),
        "linear": LowRankLinear(rng.standard_normal((10, 6)), rng.standard_normal((6, C * hw * hw)),
                                rng.standard_normal(10)),
    }


LAYER_KINDS = ["monochromatic", "monochromatic-unequal", "lowrank", "separable", "linear"]


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_gpu_matches_cpu(cp, rng, dtype, contiguous, kind):
    C, F, hw = 3, 24, 37
    layer = make_layers(rng, C, F, hw)[kind]
    x = rng.standard_normal((2, C, hw, hw)).astype(dtype)
    want = layer(x)
    layer.to_gpu()
    assert layer.on_gpu
    got = layer(to_gpu(cp, x, contiguous))
    check(cp, got, want, dtype, 3 * 49 * 8)
    with pytest.raises(TypeError, match="mix"):
        layer(x)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_to_gpu_and_back(cp, rng, kind):
    if not hasattr(cp.ndarray, "get"):
        pytest.skip("this cupy (the CPU-emulator stand-in) has no ndarray.get, which Layer.to_cpu uses")
    layer = make_layers(rng, 3, 12, 9)[kind]
    x = rng.standard_normal((1, 3, 9, 9))
    want = layer(x)
    layer.to_gpu().to_cpu()
    assert not layer.on_gpu
    assert all(type(v) is np.ndarray for v in layer.params.values())
    np.testing.assert_array_equal(layer(x), want)


def test_monochromatic_assignment_stays_on_host(cp, rng):
    layer = make_layers(rng, 3, 12, 9)["monochromatic"].to_gpu()
    assert isinstance(layer.params["assignment"], np.ndarray)
    assert isinstance(layer.params["colors"], cp.ndarray) and isinstance(layer.params["spatial"], cp.ndarray)


# --- the kernel paths, against the dense conv of the rebuilt kernel -------------------------------------------------

MONO_CASES = {
    # name: (N, C, H, W, X, Y, stride, (top, bottom, left, right), assignment)
    "zf-like": (2, 3, 45, 43, 7, 7, (2, 2), (1, 1, 1, 1), [p for p in range(6) for _ in range(16)]),
    "unequal-empty": (3, 4, 17, 20, 5, 3, (2, 1), (2, 0, 1, 3), [3, 3, 0, 3, 3, 0, 3, 3, 3, 3, 3, 3]),
    "1x1": (2, 3, 9, 8, 1, 1, (1, 1), (0, 0, 0, 0), [0, 1, 1, 0]),
    "wide-padding": (1, 2, 5, 6, 2, 2, (1, 1), (3, 0, 0, 3), [1, 0, 1]),
    # colours of 1, 3, 4, 5 and 17 filters (every pass width of mono_conv, and spare accumulators), stride 2
    "groups-1-3-4-5-17": (2, 3, 41, 75, 7, 7, (2, 2), (1, 1, 1, 1), list(np.random.default_rng(5).permutation(
        [p for p, k in enumerate([3, 1, 17, 5, 4]) for _ in range(k)]))),
    # 40 colours of 1 to 4 filters, stride 1, a 3x3 kernel and C > 4 (the general colour loop)
    "many-colours-s1": (1, 6, 19, 33, 3, 3, (1, 1), (1, 1, 1, 1), list(np.random.default_rng(6).permutation(
        [p % 40 for p in range(40)] + [p for p in range(40) for _ in range(p % 4)]))),
}


@pytest.mark.parametrize("path", ["fused", "fused-split", "composed"])
@pytest.mark.parametrize("case", sorted(MONO_CASES))
def test_monochromatic_paths(cp, rng, dtype, contiguous, monkeypatch, case, path):
    """The fused kernel with each colour's filters in one block (``MONO_MIN_BLOCKS`` = 1) or shared by several
    (a large ``MONO_MIN_BLOCKS``, as small batches have), and the composed fallback."""
    from npconv.functional.lowrank import monochromatic_conv2d
    from npconv.kernels.cuda import ops_lowrank
    monkeypatch.setattr(ops_lowrank, "MONO_MIN_BLOCKS", 10**6 if path == "fused-split" else 1)
    if path == "composed":
        monkeypatch.setattr(ops_lowrank, "MONO_SMEM_BUDGET", 16)
    N, C, H, W, X, Y, st, pad, a = MONO_CASES[case]
    a = np.asarray(a)
    Cp = int(a.max()) + 1
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    T = rng.standard_normal((Cp, C)).astype(dtype)
    S = rng.standard_normal((len(a), X, Y)).astype(dtype)
    b = rng.standard_normal(len(a)).astype(dtype)
    y = monochromatic_conv2d(to_gpu(cp, x, contiguous), to_gpu(cp, T, contiguous), a, to_gpu(cp, S, contiguous),
                             cp.asarray(b), stride=st, padding=pad)
    check(cp, y, conv2d_einsum(x, mono_dense(T, a, S), b, stride=st, padding=pad), dtype, C * X * Y)


def test_monochromatic_zf_conv1_24_colours(cp, rng, dtype):
    """ZF conv1 (3 -> 96, 7x7, stride 2, padding 1) on a 224 x 224 image with C' = 24 unequal colours (1 to 9
    filters), the case the fused kernel was slow on; against the dense conv of the rebuilt kernel."""
    from npconv.functional.lowrank import monochromatic_conv2d
    a = np.asarray(list(range(24)) + list(np.random.default_rng(8).integers(0, 24, 72)))
    x = rng.standard_normal((1, 3, 224, 224)).astype(dtype)
    T = rng.standard_normal((24, 3)).astype(dtype)
    S = rng.standard_normal((96, 7, 7)).astype(dtype)
    b = rng.standard_normal(96).astype(dtype)
    y = monochromatic_conv2d(cp.asarray(x), cp.asarray(T), a, cp.asarray(S), cp.asarray(b), stride=2, padding=1)
    check(cp, y, conv2d_einsum(x, mono_dense(T, a, S), b, stride=(2, 2), padding=(1, 1, 1, 1)), dtype, 3 * 49)


@pytest.mark.parametrize("budget_channels", [None, 2], ids=["one-chunk", "chunked"])
def test_factor_conv(cp, rng, dtype, contiguous, monkeypatch, budget_channels):
    from npconv.kernels.cuda import ops_lowrank
    N, C, F, KH, KW = 2, 7, 40, 3, 2
    if budget_channels:
        monkeypatch.setattr(ops_lowrank, "FACTOR_SMEM_BUDGET", budget_channels * KH * KW * 16 * dtype.itemsize)
    x = rng.standard_normal((N, C, 19, 17)).astype(dtype)
    w, b = rng.standard_normal((F, C, KH, KW)).astype(dtype), rng.standard_normal(F).astype(dtype)
    geo = dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    y = ops_lowrank.factor_conv(to_gpu(cp, x, contiguous), to_gpu(cp, w, contiguous), cp.asarray(b), **geo)
    check(cp, y, conv2d_einsum(x, w, b, **geo), dtype, C * KH * KW)


@pytest.mark.parametrize("path", ["lr_conv", "lr_expand", "gemm"])
@pytest.mark.parametrize("t", [6, 12, 30, 200], ids=lambda t: f"t{t}")
def test_lowrank_conv2d_paths(cp, rng, dtype, monkeypatch, t, path):
    """One launch of lr_conv<TB> (t <= 32); or the first stage on factor_conv (t <= 128) or im2col, then the 1x1
    stage on lr_expand<TB> or the GEMM and bias_add (LR_EXPAND_MAX_RANK 0, and always for t = 200)."""
    from npconv.functional.lowrank import lowrank_conv2d
    from npconv.kernels.cuda import ops_lowrank
    monkeypatch.setattr(ops_lowrank, "LR_CONV_MAX_RANK", 32 if path == "lr_conv" else 0)
    monkeypatch.setattr(ops_lowrank, "LR_EXPAND_MAX_RANK", 0 if path == "gemm" else 32)
    x = rng.standard_normal((2, 5, 12, 11)).astype(dtype)
    first, second = rng.standard_normal((t, 5, 3, 3)).astype(dtype), rng.standard_normal((9, t)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    y = lowrank_conv2d(cp.asarray(x), cp.asarray(first), cp.asarray(second), cp.asarray(b), stride=1, padding=1)
    dense = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    check(cp, y, conv2d_einsum(x, dense, b, padding=(1, 1, 1, 1)), dtype, 45 * t)


@pytest.mark.parametrize("path", ["lr_conv", "lr_conv-px2", "two-stage"])
@pytest.mark.parametrize("t", [8, 16, 32], ids=lambda t: f"t{t}")
def test_lowrank_zf_conv1_shapes(cp, rng, dtype, monkeypatch, t, path):
    """ZF conv1's low-rank form (3 -> 96, 7x7, stride 2, padding 1, 224 x 224) for 2 images, on lr_conv (one or two
    pixels a thread) or on factor_conv + lr_expand, against the CPU path."""
    from npconv.functional.lowrank import lowrank_conv2d
    from npconv.kernels.cuda import ops_lowrank
    monkeypatch.setattr(ops_lowrank, "LR_CONV_MAX_RANK", 0 if path == "two-stage" else 32)
    monkeypatch.setattr(ops_lowrank, "LR_CONV_PX2_MIN_PIXELS", 0 if path == "lr_conv-px2" else 10**9)
    x = rng.standard_normal((2, 3, 224, 224)).astype(dtype)
    first, second = rng.standard_normal((t, 3, 7, 7)).astype(dtype), rng.standard_normal((96, t)).astype(dtype)
    b = rng.standard_normal(96).astype(dtype)
    y = lowrank_conv2d(cp.asarray(x), cp.asarray(first), cp.asarray(second), cp.asarray(b), stride=2, padding=1)
    check(cp, y, lowrank_conv2d(x, first, second, b, stride=2, padding=1), dtype, 147 * t)


@pytest.mark.parametrize("path", ["sep_conv", "two-pass"])
@pytest.mark.parametrize("K", [3, 8, 16], ids=lambda k: f"K{k}")
def test_separable_paths(cp, rng, dtype, monkeypatch, K, path):
    """The separable conv in one launch (sep_conv<KB>) or two factor_conv passes, against the CPU path: 2 images of
    19 x 75 (3 column tiles), column stride 2, asymmetric padding."""
    from npconv.functional.lowrank import separable_conv2d
    from npconv.kernels.cuda import ops_lowrank
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 10**9 if path == "sep_conv" else 0)
    x = rng.standard_normal((2, 3, 19, 75)).astype(dtype)
    V, Hz = rng.standard_normal((K, 3, 5, 1)).astype(dtype), rng.standard_normal((21, K, 1, 3)).astype(dtype)
    b = rng.standard_normal(21).astype(dtype)
    geo = dict(stride=(1, 2), padding=(2, 1, 0, 1))
    y = separable_conv2d(cp.asarray(x), cp.asarray(V), cp.asarray(Hz), cp.asarray(b), **geo)
    check(cp, y, separable_conv2d(x, V, Hz, b, **geo), dtype, 15 * 3 * K)


@pytest.mark.parametrize("path", ["sep_conv", "sep_conv-unshared", "two-pass"])
def test_separable_zf_conv1_geometry(cp, rng, dtype, monkeypatch, path):
    """ZF conv1 (3 -> 96, 7x7, stride 2, padding 1) on a 224 x 224 image, rank 8, on each path: sep_conv with its
    filters shared among blocks (the 112 tiles of one image are under SEP_MIN_BLOCKS) or not, or two passes."""
    from npconv.functional.lowrank import separable_conv2d
    from npconv.kernels.cuda import ops_lowrank
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 0 if path == "two-pass" else 10**9)
    monkeypatch.setattr(ops_lowrank, "SEP_MIN_BLOCKS", 0 if path == "sep_conv-unshared" else 1024)
    x = rng.standard_normal((1, 3, 224, 224)).astype(dtype)
    V, Hz = rng.standard_normal((8, 3, 7, 1)).astype(dtype), rng.standard_normal((96, 8, 1, 7)).astype(dtype)
    b = rng.standard_normal(96).astype(dtype)
    y = separable_conv2d(cp.asarray(x), cp.asarray(V), cp.asarray(Hz), cp.asarray(b), stride=2, padding=1)
    check(cp, y, separable_conv2d(x, V, Hz, b, stride=2, padding=1), dtype, 3 * 7 * 8 * 7)
