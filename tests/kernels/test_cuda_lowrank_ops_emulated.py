"""npconv.kernels.cuda.ops_lowrank itself, without a GPU: the CuPy stand-in (NumPy + the CPU emulator) replaces
CuPy, so the dispatch, argument packing, shared-memory sizing and launch geometry of the factored layers' GPU
entry points run end to end. References: the dense conv of the rebuilt kernel (tests/reference.py), in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import conv2d_einsum
from test_cuda_lowrank_emulated import mono_dense_kernel

from npconv.kernels.cuda import loader, ops_lowrank

pytestmark = pytest.mark.cpuemu


@pytest.fixture
def fc(fake_cupy):
    """The CuPy stand-in, with ops_lowrank's module cache cleared around the test."""
    ops_lowrank.clear_cache()
    yield fake_cupy
    ops_lowrank.clear_cache()


@pytest.fixture
def launched(monkeypatch, fc):
    """Names of the kernels launched, in order: ops.py's sources and _lowrank.cu alike (every launch gets its kernel
    from ``loader.get_kernel``)."""
    names = []
    real_ops = loader.get_kernel

    def spy_ops(source, name, dtype):
        names.append(name)
        return real_ops(source, name, dtype)
    monkeypatch.setattr(loader, "get_kernel", spy_ops)
    return names


def check(y, ref, dtype, taps=9):
    from cuda_emulator import fake_cupy
    assert isinstance(y, fake_cupy.ndarray), "GPU entry points must return device arrays"
    assert y.dtype == dtype and y.shape == ref.shape
    tol = (2e-5 if dtype == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def strided(fc, a):
    """A device view of ``a``'s values that is not C-contiguous."""
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    assert not view.flags.c_contiguous
    return fc.ndarray.__new__(fc.ndarray, view.shape, view.dtype, big, 0, view.strides)


def mono_inputs(rng, dtype, N, C, H, W, a, KH, KW):
    Cp = max(a) + 1
    return (rng.standard_normal((N, C, H, W)).astype(dtype), rng.standard_normal((Cp, C)).astype(dtype),
            np.asarray(a), rng.standard_normal((len(a), KH, KW)).astype(dtype),
            rng.standard_normal(len(a)).astype(dtype))


# --- monochromatic --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_monochromatic_fused(fc, launched, rng, dtype, order, contiguous):
    a = [2, 0, 2, 2, 1, 2, 2, 2, 2, 2, 2]                # colour 2 has 9 filters: two register passes
    x, T, a, S, b = mono_inputs(rng, dtype, 2, 3, 19, 21, a, 7, 7)
    dev = (lambda v: fc.asarray(v)) if contiguous else (lambda v: strided(fc, v))
    y = ops_lowrank.monochromatic_conv2d(dev(x), dev(T), a, dev(S), fc.asarray(b), stride=(2, 2),
                                         padding=(1, 1, 1, 1))
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), b, stride=(2, 2), padding=(1, 1, 1, 1)), dtype, 3 * 49)
    assert launched == ["mono_conv"]


def test_monochromatic_image_chunks_and_no_bias(fc, launched, monkeypatch, rng, dtype):
    """More images than grid z (``_MAX_GRID_YZ`` lowered to 2): one launch per 2 images, on views of x and y."""
    monkeypatch.setattr(ops_lowrank, "_MAX_GRID_YZ", 2)
    x, T, a, S, _ = mono_inputs(rng, dtype, 5, 2, 6, 7, [1, 0, 1], 3, 2)
    y = ops_lowrank.monochromatic_conv2d(fc.asarray(x), fc.asarray(T), a, fc.asarray(S), None, stride=(1, 2),
                                         padding=(0, 1, 1, 0))
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), None, stride=(1, 2), padding=(0, 1, 1, 0)), dtype, 12)
    assert launched == ["mono_conv"] * 3


@pytest.mark.parametrize("min_blocks", [1, 512], ids=["whole-colours", "split-colours"])
@pytest.mark.parametrize("sizes", [[1] * 40, [3, 1, 17, 5, 4], [96]], ids=["40-singletons", "1-3-4-5-17", "one-colour"])
def test_monochromatic_colour_groups(fc, launched, monkeypatch, rng, dtype, order, sizes, min_blocks):
    """Colour groups of every size the pass selection distinguishes, through ops_lowrank's own tiling (ZF-like
    7x7 stride 2 on a small image, so the tile is cut on both edges); each colour's filters in one block, or shared
    by several (``MONO_MIN_BLOCKS``: the small grid of a small batch)."""
    monkeypatch.setattr(ops_lowrank, "MONO_MIN_BLOCKS", min_blocks)
    a = [p for p, k in enumerate(sizes) for _ in range(k)]
    a = [a[i] for i in np.random.default_rng(3).permutation(len(a))]
    x, T, a, S, b = mono_inputs(rng, dtype, 1, 3, 23, 37, a, 7, 7)
    y = ops_lowrank.monochromatic_conv2d(fc.asarray(x), fc.asarray(T), a, fc.asarray(S), fc.asarray(b),
                                         stride=(2, 2), padding=(1, 1, 1, 1))
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), b, stride=(2, 2), padding=(1, 1, 1, 1)), dtype, 3 * 49)
    assert launched == ["mono_conv"]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_monochromatic_fallback_when_the_tile_does_not_fit(fc, launched, monkeypatch, rng, dtype, with_bias):
    monkeypatch.setattr(ops_lowrank, "MONO_SMEM_BUDGET", 64)           # no tile fits: the composed path
    x, T, a, S, b = mono_inputs(rng, dtype, 2, 3, 9, 8, [0, 3, 3, 0, 3], 3, 3)     # colours 1, 2 unused
    b = b if with_bias else None
    y = ops_lowrank.monochromatic_conv2d(fc.asarray(x), fc.asarray(T), a, fc.asarray(S),
                                         None if b is None else fc.asarray(b), stride=(1, 1), padding=(1, 1, 1, 1))
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), b, stride=(1, 1), padding=(1, 1, 1, 1)), dtype, 27)
    assert "mono_conv" not in launched and launched.count("conv_direct") == 2      # one conv per used colour


def test_monochromatic_empty_batch(fc, launched, dtype):
    y = ops_lowrank.monochromatic_conv2d(fc.zeros((0, 3, 8, 8), dtype), fc.zeros((2, 3), dtype), np.array([0, 1]),
                                         fc.zeros((2, 3, 3), dtype), None, stride=(1, 1), padding=(0, 0, 0, 0))
    assert y.shape == (0, 2, 6, 6) and y.dtype == dtype and launched == []


# --- factor_conv and the two-stage layers ----------------------------------------------------------------------------

def test_factor_conv_chunks_channels(fc, launched, monkeypatch, rng, dtype, order):
    """A shared-memory budget of 2 channels per chunk for 7 channels: chunks 2+2+2+1; strided input."""
    F, C, KH, KW = 18, 7, 3, 2
    monkeypatch.setattr(ops_lowrank, "FACTOR_SMEM_BUDGET", 2 * KH * KW * 16 * dtype.itemsize)
    assert ops_lowrank.factor_chunk(C, KH, KW, dtype.itemsize) == 2
    x = rng.standard_normal((3, C, 8, 9)).astype(dtype)
    w, b = rng.standard_normal((F, C, KH, KW)).astype(dtype), rng.standard_normal(F).astype(dtype)
    y = ops_lowrank.factor_conv(strided(fc, x), fc.asarray(w), fc.asarray(b), stride=(1, 2), padding=(2, 0, 1, 1),
                                dilation=(2, 1))
    check(y, conv2d_einsum(x, w, b, stride=(1, 2), padding=(2, 0, 1, 1), dilation=(2, 1)), dtype, C * KH * KW)
    assert launched == ["factor_conv"]


def test_factor_conv_refuses_a_kernel_too_large(fc, dtype):
    w = fc.zeros((4, 1, 40, 40), dtype)
    with pytest.raises(ValueError, match="FACTOR_SMEM_BUDGET"):
        ops_lowrank.factor_conv(fc.zeros((1, 1, 41, 41), dtype), w, None, stride=(1, 1), padding=(0, 0, 0, 0),
                                dilation=(1, 1))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("t,fused,expand,expect", [
    (6, 32, 32, ["lr_conv8"]),
    (12, 32, 32, ["lr_conv16"]),
    (20, 32, 32, ["lr_conv32"]),
    (6, 0, 32, ["factor_conv", "lr_expand8"]),                 # LR_CONV_MAX_RANK 0: two stages
    (12, 0, 32, ["im2col", "conv_scatter", "lr_expand16"]),   # first stage above DIRECT_MAX_FILTERS: ops.conv2d
    (20, 16, 32, ["im2col", "conv_scatter", "lr_expand32"]),
    (6, 0, 0, ["factor_conv", "bias_add"]),                    # LR_EXPAND_MAX_RANK 0 too: the GEMM, then bias_add
    (40, 32, 32, ["im2col", "conv_scatter", "bias_add"]),      # above the largest compiled rank
], ids=lambda v: str(v) if isinstance(v, int) else None)
def test_lowrank_conv2d(fc, launched, monkeypatch, rng, dtype, t, fused, expand, expect, with_bias):
    """One launch of lr_conv<TB> for t <= LR_CONV_MAX_RANK; else the first stage on factor_conv when t <=
    DIRECT_MAX_FILTERS (lowered to 8 here) or ops.conv2d, and the 1x1 stage with its bias on lr_expand<TB> for t <=
    LR_EXPAND_MAX_RANK, else a GEMM and bias_add (none without a bias). Strided input and second factor."""
    monkeypatch.setattr(ops_lowrank, "DIRECT_MAX_FILTERS", 8)
    monkeypatch.setattr(ops_lowrank, "LR_CONV_MAX_RANK", fused)
    monkeypatch.setattr(ops_lowrank, "LR_EXPAND_MAX_RANK", expand)
    N, C, F = 2, 6, 10
    x = rng.standard_normal((N, C, 9, 10)).astype(dtype)
    first = rng.standard_normal((t, C, 3, 3)).astype(dtype)
    second = rng.standard_normal((F, t)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if with_bias else None
    y = ops_lowrank.lowrank_conv2d(strided(fc, x), fc.asarray(first), strided(fc, second),
                                   None if b is None else fc.asarray(b),
                                   stride=(2, 1), padding=(1, 1, 0, 2), dilation=(1, 2))
    dense = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, stride=(2, 1), padding=(1, 1, 0, 2), dilation=(1, 2)), dtype, C * 9 * t)
    assert launched == [k for k in expect if with_bias or k != "bias_add"]


@pytest.mark.parametrize("t,px2_from,expect", [(7, 10**9, "lr_conv8"), (7, 144, "lr_conv8_px2"),
                                               (7, 145, "lr_conv8"), (14, 0, "lr_conv16_px2"),
                                               (20, 0, "lr_conv32")])
def test_lr_conv_pixels_a_thread(fc, launched, monkeypatch, rng, dtype, t, px2_from, expect):
    """Two pixels a thread from LR_CONV_PX2_MIN_PIXELS output pixels on (here 2 images of 8 x 9 = 144), for the
    ranks of LR_CONV_PX2_RANKS only; the same output either way."""
    monkeypatch.setattr(ops_lowrank, "LR_CONV_PX2_MIN_PIXELS", px2_from)
    x = rng.standard_normal((2, 4, 8, 9)).astype(dtype)
    first, second = rng.standard_normal((t, 4, 3, 3)).astype(dtype), rng.standard_normal((13, t)).astype(dtype)
    b = rng.standard_normal(13).astype(dtype)
    y = ops_lowrank.lowrank_conv2d(fc.asarray(x), fc.asarray(first), fc.asarray(second), fc.asarray(b),
                                   stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1))
    dense = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, padding=(1, 1, 1, 1)), dtype, 36 * t)
    assert launched == [expect]


def test_lr_conv_chunks(fc, launched, monkeypatch, rng, dtype, order):
    """A budget that takes 2 of 5 input channels a phase-1 chunk and 24 of 40 filters a phase-2 chunk: same
    output."""
    t, C, KH, KW, F = 7, 5, 3, 3, 40
    budget = 3 * 9 * 8 * dtype.itemsize       # 2 channels: 18 taps padded to 20 (x 8) fit, 3 do not; 24 x (8 + 1)
    monkeypatch.setattr(ops_lowrank, "LR_SMEM_BUDGET", budget)
    plan = ops_lowrank.lr_conv_plan(t, C, KH, KW, F, dtype.itemsize)
    assert plan == (8, 2, 24, budget)
    x = rng.standard_normal((2, C, 8, 9)).astype(dtype)
    first, second = rng.standard_normal((t, C, KH, KW)).astype(dtype), rng.standard_normal((F, t)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = ops_lowrank.lowrank_conv2d(fc.asarray(x), fc.asarray(first), fc.asarray(second), fc.asarray(b),
                                   stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1))
    dense = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, padding=(1, 1, 1, 1)), dtype, C * 9 * t)
    assert launched == ["lr_conv8"]


def test_lr_conv_plan_rule(monkeypatch):
    """Hand-computed plans: the compiled rank, the channels of a phase-1 chunk (taps padded to 4, TB weights each),
    the filters of a phase-2 chunk, and None when one channel's weights do not fit the budget."""
    monkeypatch.setattr(ops_lowrank, "LR_SMEM_BUDGET", 16 * 1024)
    plan = ops_lowrank.lr_conv_plan
    # ZF conv1 rank 8: 3 channels of 49 taps = 147, padded 148, x 8 x 4 B = 4736 B; 96 filters x 9 x 4 B = 3456 B
    assert plan(8, 3, 7, 7, 96, 4) == (8, 3, 96, 4736)
    assert plan(16, 3, 7, 7, 96, 8) == (16, 2, 96, 96 * 17 * 8)      # 3 channels: 148 x 16 x 8 B > 16 KiB
    assert plan(32, 3, 7, 7, 96, 8) == (32, 1, 62, 62 * 33 * 8)      # 52 taps x 32 x 8 B; 16 KiB // (33 x 8 B)
    assert plan(17, 256, 3, 3, 4096, 4) == (32, 14, 124, 128 * 32 * 4)  # 14 x 9 = 126 taps, padded 128
    assert plan(33, 3, 3, 3, 10, 4) is None and plan(0, 3, 3, 3, 10, 4) is None
    assert plan(32, 1, 11, 11, 10, 8) is None                        # 124 taps x 32 x 8 B > 16 KiB


def test_lr_expand_plan_rule(monkeypatch):
    """Hand-computed plans: the compiled rank a t rounds up to and the filters a 256-thread block within the
    shared-memory budget."""
    monkeypatch.setattr(ops_lowrank, "LR_SMEM_BUDGET", 16 * 1024)
    plan = ops_lowrank.lr_expand_plan
    assert plan(8, 96, 4) == (8, 4, 256, 96, 96 * 9 * 4)
    assert plan(17, 20, 4) == (32, 2, 256, 20, 20 * 33 * 4)
    assert plan(12, 4096, 8) == (16, 4, 256, 120, 120 * 17 * 8)   # 16 KiB / (17 x 8 B) = 120 filters
    assert plan(33, 10, 4) is None and plan(0, 10, 4) is None


def test_lr_expand(fc, launched, rng, dtype, order):
    """lr_expand itself, 4-D h of 3 images, 37 filters."""
    N, t, F = 3, 9, 37
    h = rng.standard_normal((N, t, 7, 11)).astype(dtype)
    second, b = rng.standard_normal((F, t)).astype(dtype), rng.standard_normal(F).astype(dtype)
    y = ops_lowrank.lr_expand(fc.asarray(h), fc.asarray(second), fc.asarray(b))
    ref = np.einsum("ft,ntp->nfp", second.astype(np.float64), h.reshape(N, t, -1).astype(np.float64)) + b[:, None]
    check(y, ref, dtype, t)
    assert launched == ["lr_expand16"]


def test_lr_expand_refuses_bad_ranks_and_shapes(fc, dtype):
    h = fc.zeros((1, 33, 4, 4), dtype)
    with pytest.raises(ValueError, match="rank t = 33 must be between 1 and 32"):
        ops_lowrank.lr_expand(h, fc.zeros((5, 33), dtype), None)
    with pytest.raises(ValueError, match="rank t = 0"):
        ops_lowrank.lr_expand(fc.zeros((1, 0, 4, 4), dtype), fc.zeros((5, 0), dtype), None)
    with pytest.raises(ValueError, match=r"second must be \(F, 4\) and bias \(F,\), got \(5, 3\)"):
        ops_lowrank.lr_expand(fc.zeros((1, 4, 4, 4), dtype), fc.zeros((5, 3), dtype), None)
    with pytest.raises(ValueError, match=r"got \(5, 4\) and \(6,\)"):
        ops_lowrank.lr_expand(fc.zeros((1, 4, 4, 4), dtype), fc.zeros((5, 4), dtype), fc.zeros(6, dtype))


@pytest.mark.parametrize("K,fused,expect", [(4, 0, ["factor_conv", "factor_conv"]), (4, 10**9, ["sep_conv4"]),
                                             (7, 10**9, ["sep_conv8"]), (16, 10**9, ["sep_conv16"]),
                                             (17, 10**9, ["factor_conv", "factor_conv"])])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_separable_paths(fc, launched, monkeypatch, rng, dtype, with_bias, K, fused, expect):
    """One launch of sep_conv<KB> up to SEP_CONV_MAX_PIXELS output pixels (K up to 16), else two factor_conv
    passes; strided inputs, 3 images, 70 output columns (three column tiles)."""
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", fused)
    N, C, F, X, Y = 3, 2, 19, 3, 4
    x = rng.standard_normal((N, C, 9, 141)).astype(dtype)
    V = rng.standard_normal((K, C, X, 1)).astype(dtype)
    Hz = rng.standard_normal((F, K, 1, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if with_bias else None
    y = ops_lowrank.separable_conv2d(strided(fc, x), strided(fc, V), fc.asarray(Hz),
                                     None if b is None else fc.asarray(b), stride=(2, 2), padding=(1, 2, 1, 0))
    dense = np.einsum("fky,kcx->fcxy", Hz[:, :, 0].astype(np.float64), V[..., 0].astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, stride=(2, 2), padding=(1, 2, 1, 0)), dtype, C * X * K * Y)
    assert launched == expect


def test_sep_conv_one_launch_per_grid_limit_of_images(fc, launched, monkeypatch, rng, dtype):
    """The image loop: a grid-y limit of 2 images (lowered) gives 3 launches for 5 images, offsets per launch."""
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 10**9)
    monkeypatch.setattr(ops_lowrank, "_MAX_GRID_YZ", 2)
    x = rng.standard_normal((5, 3, 8, 10)).astype(dtype)
    V, Hz = rng.standard_normal((5, 3, 3, 1)).astype(dtype), rng.standard_normal((6, 5, 1, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    y = ops_lowrank.separable_conv2d(fc.asarray(x), fc.asarray(V), fc.asarray(Hz), fc.asarray(b), stride=(1, 1),
                                     padding=(1, 1, 1, 1))
    dense = np.einsum("fky,kcx->fcxy", Hz[:, :, 0].astype(np.float64), V[..., 0].astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, padding=(1, 1, 1, 1)), dtype, 45)
    assert launched == ["sep_conv8"] * 3


def test_sep_conv_plan_rule(monkeypatch):
    """Hand-computed plans: K rounded up to 4, 8 or 16, the tallest tile (4, 2 or 1 rows of 32 columns) whose shared
    memory fits SEP_SMEM_BUDGET, and None past K = 16 or when not even one row fits."""
    monkeypatch.setattr(ops_lowrank, "SEP_SMEM_BUDGET", 32 * 1024)
    plan = ops_lowrank.sep_conv_plan
    # ZF conv1 rank 4: 4*7*16 + 16 + 3*7*4 + 4*4*(31*2 + 7) = 448 + 16 + 84 + 1104 = 1652 floats
    assert plan(4, 3, 7, 7, 2, 4) == (4, 4, 1652 * 4)
    assert plan(5, 3, 7, 7, 2, 8) == (8, 4, (5 * 7 * 16 + 16 + 3 * 7 * 8 + 8 * 4 * 69) * 8)
    # 96 channels of 5 taps, K = 16: 4 rows need 16*5*16 + 16 + 96*5*16 + 16*4*(31 + 5) = 11280 floats (45 KB);
    # 2 rows 10128 (40512 B), 1 row 9552 (38208 B): none fits 32 KiB in float32
    assert plan(16, 96, 5, 5, 1, 4) is None
    monkeypatch.setattr(ops_lowrank, "SEP_SMEM_BUDGET", 40 * 1024)
    assert plan(16, 96, 5, 5, 1, 4) == (16, 2, 10128 * 4)
    monkeypatch.setattr(ops_lowrank, "SEP_SMEM_BUDGET", 39 * 1024)
    assert plan(16, 96, 5, 5, 1, 4) == (16, 1, 9552 * 4)
    assert plan(17, 3, 3, 3, 1, 4) is None and plan(0, 3, 3, 3, 1, 4) is None


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_separable_conv2d(fc, launched, monkeypatch, rng, dtype, order, with_bias):
    """The two-pass path (factor_conv twice), taken above SEP_CONV_MAX_PIXELS: a strided vertical factor."""
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 0)
    N, C, K, F, X, Y = 2, 3, 4, 20, 5, 3
    x = rng.standard_normal((N, C, 13, 12)).astype(dtype)
    V = rng.standard_normal((K, C, X, 1)).astype(dtype)
    Hz = rng.standard_normal((F, K, 1, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if with_bias else None
    y = ops_lowrank.separable_conv2d(fc.asarray(x), strided(fc, V), fc.asarray(Hz),
                                     None if b is None else fc.asarray(b), stride=(2, 3), padding=(2, 1, 0, 2))
    dense = np.einsum("fky,kcx->fcxy", Hz[:, :, 0].astype(np.float64), V[..., 0].astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, stride=(2, 3), padding=(2, 1, 0, 2)), dtype, C * X * K * Y)
    assert launched == ["factor_conv", "factor_conv"]


def test_conv_stage_falls_back_to_ops_when_the_kernel_is_too_large(fc, launched, rng):
    dtype = np.dtype(np.float64)
    x, w = rng.standard_normal((1, 2, 13, 13)), rng.standard_normal((3, 2, 12, 12))     # 144*16*8 B > 16 KiB
    y = ops_lowrank.conv_stage(fc.asarray(x), fc.asarray(w), None, stride=(1, 1), padding=(0, 0, 0, 0))
    check(y, conv2d_einsum(x, w), dtype, 288)
    assert "factor_conv" not in launched and launched


def test_mono_splits_rule(monkeypatch):
    """Blocks share a colour's filters only in a grid under MONO_MIN_BLOCKS, in shares of at least
    MONO_SHARE_FILTERS, and never past the grid's y limit."""
    monkeypatch.setattr(ops_lowrank, "MONO_MIN_BLOCKS", 512)
    monkeypatch.setattr(ops_lowrank, "MONO_SHARE_FILTERS", 4)
    assert ops_lowrank.mono_splits(512, 96, 4) == 1                  # enough blocks already
    assert ops_lowrank.mono_splits(56, 4, 4) == 1                    # one 4-filter share a colour: nothing to share
    assert ops_lowrank.mono_splits(56, 8, 4) == 2
    assert ops_lowrank.mono_splits(56, 24, 4) == 6                   # ZF conv1, 4 colours, batch 1: 4 filters a block
    assert ops_lowrank.mono_splits(256, 96, 4) == 2                  # two blocks reach 512
    assert ops_lowrank.mono_splits(1, 10**6, 65535) == 1             # the grid's y is full
    monkeypatch.setattr(ops_lowrank, "MONO_SHARE_FILTERS", 8)        # the rule before shares of 4
    assert ops_lowrank.mono_splits(56, 24, 4) == 3
    monkeypatch.setattr(ops_lowrank, "_MAX_GRID_YZ", 12)
    assert ops_lowrank.mono_splits(1, 96, 4) == 3


def test_filter_shares_rule():
    """Hand-computed: no sharing from min_blocks blocks on or with one unit; else enough shares to reach min_blocks,
    at most the units and the limit."""
    shares = ops_lowrank.filter_shares
    assert shares(512, 512, 6) == 1
    assert shares(95, 512, 1) == 1
    assert shares(95, 512, 12) == 6                                  # ceil(512 / 95)
    assert shares(112, 1024, 6) == 6                                 # ZF conv1 sep_conv at batch 1: 6 passes of 16
    assert shares(896, 1024, 6) == 2                                 # and at batch 8
    assert shares(112, 512, 6) == 5
    assert shares(112, 512, 3) == 3                                  # capped by the units
    assert shares(0, 512, 4) == 4
    assert shares(1, 512, 100, limit=7) == 7


@pytest.fixture
def grids(monkeypatch, fc):
    """(kernel name, grid, last argument) of every launch through ops_lowrank._launch."""
    seen = []
    real = ops_lowrank._launch

    def spy(name, dtype, grid, block, args, shared_mem=0):
        seen.append((name, tuple(grid), int(args[-1])))
        return real(name, dtype, grid, block, args, shared_mem)
    monkeypatch.setattr(ops_lowrank, "_launch", spy)
    return seen


@pytest.mark.parametrize("min_blocks,shares", [(0, 1), (10**6, 3)])
def test_sep_conv_filter_shares(fc, grids, monkeypatch, rng, dtype, min_blocks, shares):
    """Under SEP_MIN_BLOCKS blocks, the 40 filters (3 passes of 16) go to 3 blocks a tile (grid z, FS = 16; the last
    share 8 filters), each computing the tile's K maps; the output equals the dense conv's either way."""
    monkeypatch.setattr(ops_lowrank, "SEP_MIN_BLOCKS", min_blocks)
    N, C, K, F, X, Y = 2, 3, 5, 40, 3, 5
    x = rng.standard_normal((N, C, 11, 37)).astype(dtype)
    V, Hz = rng.standard_normal((K, C, X, 1)).astype(dtype), rng.standard_normal((F, K, 1, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = ops_lowrank.separable_conv2d(fc.asarray(x), fc.asarray(V), fc.asarray(Hz), fc.asarray(b), stride=(1, 2),
                                     padding=(1, 1, 2, 2))
    dense = np.einsum("fky,kcx->fcxy", Hz[:, :, 0].astype(np.float64), V[..., 0].astype(np.float64))
    check(y, conv2d_einsum(x, dense, b, stride=(1, 2), padding=(1, 1, 2, 2)), dtype, C * X * K * Y)
    assert [(g[0], g[1][2], g[2]) for g in grids] == [("sep_conv8", shares, 16 if shares > 1 else 48)]


def test_launch_refuses_wrong_argument_types(fc, rng):
    x = fc.asarray(rng.standard_normal((1, 1, 4, 4)))
    with pytest.raises(TypeError, match="takes 21 arguments"):
        ops_lowrank._launch("factor_conv", x.dtype, (1,), (32,), (x,))
    T = fc.asarray(np.zeros((1, 1)))
    args = [x, T, T, fc.asarray(np.zeros(1, np.int64)), fc.asarray(np.zeros(2, np.int32)), T, x] + [1] * 17
    with pytest.raises(TypeError, match="argument 3: expected a C-contiguous int32 array"):
        ops_lowrank._launch("mono_conv", x.dtype, (1, 1, 1), (32, 1), tuple(args))
    with pytest.raises(ValueError, match="does not fit a 32-bit int"):
        ops_lowrank._launch("factor_conv", x.dtype, (1,), (32,), (x, x, x, x, 2**31) + (1,) * 16)
