"""The Winograd F(2x2, 3x3) path of conv2d: its transforms against the textbook matrices, the whole convolution
against the naive loops, the "auto" choice, and the option's validation."""
import numpy as np
import pytest

import npconv.functional._winograd as WG
from npconv.functional import conv2d
from npconv.kernels.cpu import winograd as KW
from tests.reference import conv2d_einsum, conv2d_naive, count_calls, tolerance

DTYPES = [np.float32, np.float64]

# the F(2x2, 3x3) matrices, written out independently of the kernels (Lavin and Gray 2016)
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def test_matrices_compute_a_correlation(rng):
    """The reference matrices themselves: A^T[(G g G^T) .* (B^T d B)]A is the 2x2 valid correlation of d by g."""
    d = rng.standard_normal((4, 4))
    g = rng.standard_normal((3, 3))
    y = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_transform(rng, dtype):
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    stride = 5 * 3 + 7                                   # matrices padded apart, as the driver does
    buf = np.full(16 * stride, np.nan, dtype)
    KW.weight_transform(w, buf, stride)
    U = buf.reshape(16, stride)[:, :15].reshape(16, 5, 3)
    assert np.isnan(buf.reshape(16, stride)[:, 15:]).all()   # the padding is left alone
    for f in range(5):
        for c in range(3):
            expect = G @ w[f, c].astype(np.float64) @ G.T
            np.testing.assert_allclose(U[:, f, c].reshape(4, 4), expect, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W,pt,pl", [(6, 6, 0, 0), (7, 5, 1, 1), (5, 8, 2, 0), (1, 1, 1, 1), (2, 4, 1, 0),
                                      (13, 13, 1, 1), (9, 31, 1, 1), (4, 17, 0, 2)])
def test_input_transform(rng, dtype, H, W, pt, pl):
    """Tile rows of 1 to 16 tiles (the kernel takes seven at a time, storing 8 lanes where that is safe), three
    images; the gaps between the 16 matrices stay unwritten."""
    N, C = 3, 3
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    OH, OW = H + 2 * pt - 2, W + 2 * pl - 2     # symmetric padding for the reference's padded copy
    TH, TW = -(-OH // 2), -(-OW // 2)
    T = N * TH * TW
    stride = C * T + 5
    buf = np.full(16 * stride, np.nan, dtype)
    scratch = np.empty((8, (2 * TH + 2) * (2 * TW + 2) + 4 * (2 * TW + 2)), dtype)
    KW.input_transform(x, 0, N, pt, pl, TH, TW, buf, T, stride, scratch)
    assert np.isnan(buf.reshape(16, stride)[:, C * T:]).all()
    V = buf.reshape(16, stride)[:, :C * T].reshape(16, C, T)
    xp = np.zeros((N, C, 2 * TH + 2, 2 * TW + 2))
    xp[:, :, pt:pt + H, pl:pl + W] = x[:, :, :2 * TH + 2 - pt, :2 * TW + 2 - pl]
    for i in range(N):
        for c in range(C):
            for ty in range(TH):
                for tx in range(TW):
                    d = xp[i, c, 2 * ty:2 * ty + 4, 2 * tx:2 * tx + 4]
                    got = V[:, c, i * TH * TW + ty * TW + tx].reshape(4, 4)
                    np.testing.assert_allclose(got, BT @ d @ BT.T, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("OH,OW", [(4, 6), (5, 5), (3, 4), (1, 1)])
def test_output_transform(rng, dtype, OH, OW):
    N, F = 2, 3
    TH, TW = -(-OH // 2), -(-OW // 2)
    T = N * TH * TW
    stride = F * T + 3
    buf = rng.standard_normal(16 * stride).astype(dtype)
    Mt = buf.reshape(16, stride)[:, :F * T].reshape(16, F, T)
    b = rng.standard_normal(F).astype(dtype)
    y = np.full((N, F, OH, OW), np.nan, dtype)
    KW.output_transform(buf, T, stride, 0, N, TH, TW, b, True, y)
    full = np.zeros((N, F, 2 * TH, 2 * TW))
    for i in range(N):
        for f in range(F):
            for ty in range(TH):
                for tx in range(TW):
                    m = Mt[:, f, i * TH * TW + ty * TW + tx].astype(np.float64).reshape(4, 4)
                    full[i, f, 2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2] = AT @ m @ AT.T + b[f]
    np.testing.assert_allclose(y, full[:, :, :OH, :OW], *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W,padding", [
    (9, 8, (1, 1, 1, 1)), (7, 7, (0, 0, 0, 0)), (6, 11, (1, 0, 2, 1)), (3, 3, (2, 2, 2, 2)), (4, 5, (0, 1, 0, 0)),
])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_naive_loops(rng, dtype, H, W, padding, bias):
    x = rng.standard_normal((2, 5, H, W)).astype(dtype)
    w = rng.standard_normal((4, 5, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if bias else None
    y = conv2d(x, w, b, padding=padding, algorithm="winograd")
    assert y.dtype == dtype
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, padding=padding), *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [False, True], ids=["functional", "layer"])
def test_winograd_alexnet_like_and_non_contiguous(rng, monkeypatch, dtype, layer):
    """Several chunks of images (an uneven last one); the input a strided view, the weights Fortran-ordered; a
    functional call (one batched BLAS product) and a layer (its 16 products on the micro-kernel, in one call)."""
    monkeypatch.setattr(WG, "_TARGET_TILES", 5 * 49)
    big = rng.standard_normal((12, 40, 15, 30)).astype(dtype)
    x = big[:, :, 1:14, ::2][:, :, :, :13]             # (12, 40, 13, 13), not contiguous
    w = np.asfortranarray(rng.standard_normal((36, 40, 3, 3)).astype(dtype) / 10)
    b = rng.standard_normal(36).astype(dtype)
    if layer:
        from npconv.functional.conv import _conv2d
        y = _conv2d(x, w, b, padding=1, algorithm="winograd", prep={})
    else:
        y = conv2d(x, w, b, padding=1, algorithm="winograd")
    ref = conv2d_einsum(x, w, b, padding=(1, 1, 1, 1))
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=atol * 4)


def test_auto_chooses_by_shape(rng, monkeypatch):
    calls = count_calls(monkeypatch, WG, "conv2d_winograd_cpu")
    big = rng.standard_normal((8, 32, 13, 13)).astype(np.float32)
    w3 = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    assert WG.use_winograd(big.shape, w3.shape, (1, 1), (1, 1), 1, (13, 13))
    conv2d(big, w3, padding=1)
    assert calls == [1]
    conv2d(big, w3, padding=1, algorithm="gemm")      # forced im2col
    conv2d(big[:1], w3, padding=1)                     # too few tiles
    conv2d(big, w3, stride=2, padding=1)               # not eligible
    conv2d(big[:, :8], w3[:, :8], padding=1)           # too few channels
    assert calls == [1]
    # both algorithms give the same convolution
    np.testing.assert_allclose(conv2d(big, w3, padding=1), conv2d(big, w3, padding=1, algorithm="gemm"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=2), "stride"), (dict(dilation=2), "dilation"), (dict(groups=2), "groups"),
])
def test_winograd_ineligible_is_an_error(rng, kwargs, match):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 4 // kwargs.get("groups", 1), 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        conv2d(x, w, algorithm="winograd", **kwargs)


def test_winograd_needs_3x3(rng):
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"3x3 kernel.*\(5, 5\)"):
        conv2d(x, rng.standard_normal((4, 4, 5, 5)).astype(np.float32), algorithm="winograd")


def test_algorithm_option_validated(rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"algorithm must be one of .*'fft'"):
        conv2d(x, w, algorithm="fft")
    with pytest.raises(TypeError, match="algorithm must be a string.*int"):
        conv2d(x, w, algorithm=1)
