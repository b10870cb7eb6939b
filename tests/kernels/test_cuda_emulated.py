"""Every CUDA kernel, run on the CPU emulator with hand-written launches, against NumPy references.

Each test runs in both thread orders (forward with a full grid of 256-thread blocks; reverse with a small grid of
64-thread blocks, so the grid-stride loops wrap), for float32 and float64. Outputs start as NaN, so an element
no thread writes fails the comparison.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_emulator.numpy_reference import (avg_pool_ref, bias_relu_ref, lrn_ref, max_pool_ref, normalize_ref,
                                           softmax_ref, tolerance)
from reference import conv2d_einsum

pytestmark = pytest.mark.cpuemu
i32 = np.int32


@pytest.fixture(params=[("forward", None), ("reverse", (3, 64))], ids=["forward-fullgrid", "reverse-smallgrid"])
def cfg(request):
    return request.param


def run(kernel, total, args, cfg, *, block=256, grid_y=1, shared_mem=0):
    order, small = cfg
    if small:
        grid, block = (small[0], grid_y), (small[1],)
    else:
        grid = (max(1, -(-total // block)), grid_y)
        block = (block,)
    kernel(grid, block, args, shared_mem=shared_mem, order=order)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def nan_like(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def out_len(size, k, s, lo, hi, d):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


# --- convolution kernels ---------------------------------------------------------------------------------------

CONV_CASES = [
    # N, C, H, W, KH, KW, stride, (top, bottom, left, right), dilation
    (2, 3, 7, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 2, 9, 8, 3, 2, (2, 3), (0, 2, 1, 0), (1, 1)),
    (1, 3, 10, 11, 3, 3, (2, 1), (2, 2, 2, 2), (2, 3)),
    (2, 1, 5, 6, 2, 2, (1, 1), (3, 0, 0, 3), (1, 1)),     # padding wider than the kernel: all-zero windows
    (1, 4, 6, 6, 5, 1, (1, 1), (2, 2, 0, 0), (1, 1)),     # 5x1
]


def im2col_ref(x, KH, KW, stride, pad, dil):
    """col[(c, kh, kw), (n, oh, ow)] by slicing a zero-padded copy of x."""
    N, C, H, W = x.shape
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = stride, pad, dil
    OH, OW = out_len(H, KH, sh, pt, pb, dh), out_len(W, KW, sw, pl, pr, dw)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    col = np.empty((C, KH, KW, N, OH, OW))
    for kh in range(KH):
        for kw in range(KW):
            win = xp[:, :, kh * dh:kh * dh + sh * (OH - 1) + 1:sh, kw * dw:kw * dw + sw * (OW - 1) + 1:sw]
            col[:, kh, kw] = win.transpose(1, 0, 2, 3)
    return col.reshape(C * KH * KW, N * OH * OW), OH, OW


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col(emulated, rng, dtype, cfg, case):
    N, C, H, W, KH, KW, stride, pad, dil = case
    x = randn(rng, (N, C, H, W), dtype)
    ref, OH, OW = im2col_ref(x, KH, KW, stride, pad, dil)
    col = nan_like(ref.shape, dtype)
    k = emulated.kernel("im2col", "im2col", dtype)
    run(k, col.size, (x, col, *map(i32, (N, C, H, W, KH, KW, *stride, pad[0], pad[2], *dil, OH, OW))), cfg)
    np.testing.assert_array_equal(col, ref.astype(dtype))


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_scatter(emulated, rng, dtype, cfg, with_bias):
    FG, NB, P, F, F0 = 3, 2, 7, 8, 4
    r = randn(rng, (FG, NB, P), dtype)
    b = randn(rng, (F,), dtype)
    y = nan_like((NB, F, P), dtype)
    k = emulated.kernel("im2col", "conv_scatter", dtype)
    run(k, r.size, (r, b, y, *map(i32, (FG, NB, P, F, F0, with_bias))), cfg)
    ref = r.transpose(1, 0, 2) + (b[F0:F0 + FG, None] if with_bias else 0)
    np.testing.assert_array_equal(y[:, F0:F0 + FG], ref)
    assert np.isnan(y[:, :F0]).all() and np.isnan(y[:, F0 + FG:]).all()   # other channels untouched


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("F", [5, 20])
def test_conv_direct(emulated, rng, dtype, cfg, case, F):
    N, C, H, W, KH, KW, stride, pad, dil = case
    x, w, b = randn(rng, (N, C, H, W), dtype), randn(rng, (F, C, KH, KW), dtype), randn(rng, (F,), dtype)
    ref = conv2d_einsum(x, w, b, stride=stride, padding=pad, dilation=dil)
    OH, OW = ref.shape[2:]
    y = nan_like(ref.shape, dtype)
    FT = 16
    k = emulated.kernel("conv_direct", "conv_direct", dtype)
    run(k, N * OH * OW, (x, w, b, y, *map(i32, (N, C, H, W, F, KH, KW, *stride, pad[0], pad[2], *dil, OH, OW, 1))),
        cfg, grid_y=-(-F // FT), shared_mem=C * KH * KW * FT * dtype.itemsize)
    check(y, ref, dtype)


# --- Winograd F(2x2, 3x3): each transform against the matrix products of Lavin & Gray, written out here ----------

WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=float)
WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=float)
WINO_CASES = [
    # N, C, F, H, W, (top, bottom, left, right) padding
    (2, 3, 5, 7, 9, (1, 1, 1, 1)),     # odd output: 7x9, a half tile on each axis
    (1, 2, 4, 6, 6, (0, 0, 0, 0)),     # no padding: 4x4 output, whole tiles
    (2, 2, 3, 5, 8, (2, 0, 0, 1)),     # uneven padding
]


def wino_geometry(H, W, pad):
    OH, OW = H + pad[0] + pad[1] - 2, W + pad[2] + pad[3] - 2
    return OH, OW, -(-OH // 2), -(-OW // 2)


def wino_input_ref(x, pad, TH, TW):
    """V (16, C, N*TH*TW): B^T d B of each 4x4 window (zero outside the image)."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, 2 * TH + 2, 2 * TW + 2))
    src = np.asarray(x, np.float64)[:, :, max(0, -pad[0]):, max(0, -pad[2]):]
    h, w = min(H, xp.shape[2] - pad[0]), min(W, xp.shape[3] - pad[2])
    xp[:, :, pad[0]:pad[0] + h, pad[2]:pad[2] + w] = src[:, :, :h, :w]
    V = np.empty((4, 4, C, N, TH, TW))
    for th in range(TH):
        for tw in range(TW):
            d = xp[:, :, 2 * th:2 * th + 4, 2 * tw:2 * tw + 4]            # (N, C, 4, 4)
            V[:, :, :, :, th, tw] = np.einsum("ai,ncij,bj->abcn", WINO_BT, d, WINO_BT)
    return V.reshape(16, C, N * TH * TW)


@pytest.mark.parametrize("F,C", [(5, 3), (1, 1)])
def test_wino_filter(emulated, rng, dtype, cfg, F, C):
    w = randn(rng, (F, C, 3, 3), dtype)
    u = nan_like((16, F, C), dtype)
    run(emulated.kernel("winograd", "wino_filter", dtype), F * C, (w, u, i32(F), i32(C)), cfg)
    ref = np.einsum("ai,fcij,bj->abfc", WINO_G, w.astype(np.float64), WINO_G).reshape(16, F, C)
    check(u, ref, dtype)


@pytest.mark.parametrize("case", WINO_CASES)
def test_wino_input(emulated, rng, dtype, cfg, case):
    N, C, F, H, W, pad = case
    OH, OW, TH, TW = wino_geometry(H, W, pad)
    x = randn(rng, (N, C, H, W), dtype)
    v = nan_like((16, C, N * TH * TW), dtype)
    run(emulated.kernel("winograd", "wino_input", dtype), C * N * TH * TW,
        (x, v, *map(i32, (N, C, H, W, pad[0], pad[2], TH, TW))), cfg)
    check(v, wino_input_ref(x, pad, TH, TW), dtype)


@pytest.mark.parametrize("case", WINO_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_wino_output(emulated, rng, dtype, cfg, case, with_bias):
    N, C, F, H, W, pad = case
    OH, OW, TH, TW = wino_geometry(H, W, pad)
    m = randn(rng, (16, F, N * TH * TW), dtype)
    b = randn(rng, (F,), dtype)
    y = nan_like((N, F, OH, OW), dtype)
    run(emulated.kernel("winograd", "wino_output", dtype), F * N * TH * TW,
        (m, b, y, *map(i32, (N, F, OH, OW, TH, TW, with_bias))), cfg)
    tiles = np.einsum("ai,ijfntu,bj->fntaub", WINO_AT, m.astype(np.float64).reshape(4, 4, F, N, TH, TW), WINO_AT)
    ref = tiles.reshape(F, N, 2 * TH, 2 * TW)[:, :, :OH, :OW].transpose(1, 0, 2, 3)
    check(y, ref + (b[None, :, None, None] if with_bias else 0), dtype)


@pytest.mark.parametrize("case", WINO_CASES)
def test_winograd_transforms_compose_to_the_convolution(emulated, rng, dtype, cfg, case):
    """filter -> input -> 16 products -> output, all three kernels, equals the direct convolution (einsum)."""
    N, C, F, H, W, pad = case
    OH, OW, TH, TW = wino_geometry(H, W, pad)
    x, w, b = randn(rng, (N, C, H, W), dtype), randn(rng, (F, C, 3, 3), dtype), randn(rng, (F,), dtype)
    u, v = nan_like((16, F, C), dtype), nan_like((16, C, N * TH * TW), dtype)
    run(emulated.kernel("winograd", "wino_filter", dtype), F * C, (w, u, i32(F), i32(C)), cfg)
    run(emulated.kernel("winograd", "wino_input", dtype), v.size // 16,
        (x, v, *map(i32, (N, C, H, W, pad[0], pad[2], TH, TW))), cfg)
    m = np.matmul(u, v)
    y = nan_like((N, F, OH, OW), dtype)
    run(emulated.kernel("winograd", "wino_output", dtype), m.size // 16,
        (m, b, y, *map(i32, (N, F, OH, OW, TH, TW, 1))), cfg)
    check(y, conv2d_einsum(x, w, b, padding=pad), dtype)


DEPTHWISE_CASES = [
    # N, C, M, H, W, KH, KW, stride, padding, dilation
    (2, 3, 1, 8, 7, 5, 1, (1, 1), (2, 2, 0, 0), (1, 1)),
    (1, 4, 1, 6, 9, 1, 5, (1, 2), (0, 0, 2, 2), (1, 1)),
    (2, 2, 2, 9, 9, 3, 3, (2, 2), (1, 2, 0, 1), (2, 1)),
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_depthwise_conv(emulated, rng, dtype, cfg, case, with_bias):
    N, C, M, H, W, KH, KW, stride, pad, dil = case
    x, w, b = randn(rng, (N, C, H, W), dtype), randn(rng, (C * M, 1, KH, KW), dtype), randn(rng, (C * M,), dtype)
    ref = conv2d_einsum(x, w, b if with_bias else None, stride=stride, padding=pad, dilation=dil, groups=C)
    OH, OW = ref.shape[2:]
    y = nan_like(ref.shape, dtype)
    k = emulated.kernel("depthwise", "depthwise_conv", dtype)
    run(k, y.size, (x, w, b, y, *map(i32, (N, C, H, W, M, KH, KW, *stride, pad[0], pad[2], *dil, OH, OW,
                                           with_bias))), cfg)
    check(y, ref, dtype)


# --- pooling ------------------------------------------------------------------------------------------------------

POOL_CASES = [
    # H, W, kernel, stride, padding, out_hw (floor or PyTorch ceil mode, worked out by hand)
    (7, 7, (3, 3), (2, 2), (0, 0), (3, 3)),        # floor
    (8, 8, (3, 3), (2, 2), (1, 1), (5, 5)),        # ceil: last window starts on the last row, reaches past padding
    (6, 9, (2, 3), (2, 3), (0, 1), (3, 4)),        # ceil: (9+2-3)/3 -> 3.67 -> 4 windows in W
    (5, 5, (3, 3), (1, 1), (1, 1), (5, 5)),        # "same" pooling
    (13, 13, (3, 3), (2, 2), (0, 0), (6, 6)),      # ZF-net pool
]


def tie_free(rng, shape, dtype):
    """Distinct values (a permutation of a spread grid), so the maximum of every window is unique."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.25 - n / 8).astype(dtype)


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool(emulated, rng, dtype, cfg, case):
    H, W, kernel, stride, pad, out_hw = case
    x = tie_free(rng, (2, 3, H, W), dtype)
    y = nan_like((2, 3, *out_hw), dtype)
    k = emulated.kernel("pool", "max_pool", dtype)
    run(k, y.size, (x, y, *map(i32, (6, H, W, *kernel, *stride, *pad, *out_hw))), cfg)
    np.testing.assert_array_equal(y, max_pool_ref(x, kernel, stride, pad, out_hw))


def test_max_pool_propagates_nan(emulated, dtype, cfg):
    x = np.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    y = nan_like((1, 1, 2, 2), dtype)
    y[...] = 0
    run(emulated.kernel("pool", "max_pool", dtype), y.size, (x, y, *map(i32, (1, 4, 4, 2, 2, 2, 2, 0, 0, 2, 2))), cfg)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 7 and y[0, 0, 1, 1] == 15


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool(emulated, rng, dtype, cfg, case, count_include_pad):
    H, W, kernel, stride, pad, out_hw = case
    x = randn(rng, (2, 3, H, W), dtype)
    y = nan_like((2, 3, *out_hw), dtype)
    k = emulated.kernel("pool", "avg_pool", dtype)
    run(k, y.size, (x, y, *map(i32, (6, H, W, *kernel, *stride, *pad, *out_hw, count_include_pad))), cfg)
    check(y, avg_pool_ref(x, kernel, stride, pad, out_hw, count_include_pad), dtype)


# --- normalisation, activations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,C", [(5, 8), (4, 7), (9, 3), (1, 4)])
def test_lrn(emulated, rng, dtype, cfg, size, C):
    x = randn(rng, (2, C, 3, 5), dtype) * 3
    alpha, beta, k = 1e-2, 0.75, 2.0
    y = nan_like(x.shape, dtype)
    kern = emulated.kernel("lrn", "lrn", dtype)
    run(kern, y.size, (x, y, *map(i32, (2, C, 15, size)), dtype.type(alpha), dtype.type(beta), dtype.type(k)), cfg)
    check(y, lrn_ref(x, size, alpha, beta, k), dtype)


@pytest.mark.parametrize("S", [1, 6])
def test_bias_add_and_bias_relu(emulated, rng, dtype, cfg, S):
    N, C = 3, 5
    y0 = randn(rng, (N, C, S), dtype)
    y0[0, 0, 0] = np.nan
    b = randn(rng, (C,), dtype)
    y = y0.copy()
    run(emulated.kernel("elementwise", "bias_add", dtype), y.size, (y, b, *map(i32, (N, C, S))), cfg)
    np.testing.assert_array_equal(y, y0 + b[None, :, None])
    y = y0.copy()
    run(emulated.kernel("elementwise", "bias_relu", dtype), y.size, (y, b, *map(i32, (N, C, S))), cfg)
    np.testing.assert_array_equal(y[0, 0, 0], np.nan)            # NaN stays NaN
    ref = bias_relu_ref(y0, b).astype(dtype)
    ref[0, 0, 0] = np.nan
    np.testing.assert_array_equal(y, ref)


def test_relu(emulated, rng, dtype, cfg):
    x = randn(rng, (4, 33), dtype)
    x[1, 2] = np.nan
    y = nan_like(x.shape, dtype)
    run(emulated.kernel("elementwise", "relu", dtype), x.size, (x, y, i32(x.size)), cfg)
    ref = np.where(np.isnan(x), x, np.maximum(x, 0))
    np.testing.assert_array_equal(y, ref)
    run(emulated.kernel("elementwise", "relu", dtype), x.size, (x, x, i32(x.size)), cfg)   # in place
    np.testing.assert_array_equal(x, ref)


def test_normalize(emulated, rng, dtype, cfg):
    x = randn(rng, (2, 3, 4, 5), dtype)
    mean, scale = randn(rng, (3,), dtype), np.abs(randn(rng, (3,), dtype)) + 0.5
    y = nan_like(x.shape, dtype)
    run(emulated.kernel("elementwise", "normalize", dtype), x.size, (x, mean, scale, y, *map(i32, (2, 3, 20))), cfg)
    check(y, normalize_ref(x, mean, scale), dtype)


@pytest.mark.parametrize("R,L,grid", [(3, 10, 3), (5, 300, 2), (2, 128, 2), (1, 1, 1)])
def test_softmax_rows(emulated, rng, dtype, cfg, R, L, grid):
    x = randn(rng, (R, L), dtype) * 30 + 500        # large values: exp would overflow without the max shift
    y = nan_like(x.shape, dtype)
    emulated.kernel("softmax", "softmax_rows", dtype)((grid,), (128,), (x, y, i32(R), i32(L)), order=cfg[0])
    check(y, softmax_ref(x), dtype)


def test_softmax_nan_row(emulated, dtype, cfg):
    x = np.zeros((2, 5), dtype)
    x[0, 3] = np.nan
    x[1, 1] = np.inf
    y = nan_like(x.shape, dtype)
    emulated.kernel("softmax", "softmax_rows", dtype)((2,), (128,), (x, y, i32(2), i32(5)), order=cfg[0])
    assert np.isnan(y).all()      # as in PyTorch: a NaN or +inf in a row makes the whole row NaN
