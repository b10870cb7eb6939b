import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npconv.functional import conv as conv_module
from npconv.functional import conv2d
from tests.reference import conv2d_einsum, conv2d_naive
from tests.reference import tolerance

DTYPES = [np.float32, np.float64]


def _case(rng, N, C, H, W, F, KH, KW, groups, dtype):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C // groups, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,padding,dilation,groups", [
    ((1, 1), (0, 0, 0, 0), (1, 1), 1),
    ((2, 2), (1, 1, 1, 1), (1, 1), 1),
    ((2, 1), (2, 0, 1, 3), (1, 2), 1),
    ((1, 1), (1, 1, 1, 1), (2, 2), 2),
    ((3, 2), (0, 1, 0, 1), (1, 1), 3),
    ((1, 1), (1, 1, 1, 1), (1, 1), 6),   # depthwise
])
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_conv2d_matches_naive_loops(rng, monkeypatch, dtype, stride, padding, dilation, groups, microkernel):
    # the "gemm" algorithm's product both ways: npconv's micro-kernel (where the CPU has one) and BLAS
    monkeypatch.setattr(conv_module, "USE_MICROKERNEL", microkernel)
    monkeypatch.setattr(conv_module, "_MK_PACK_COLUMNS", 0)     # the micro-kernel on small functional calls too
    x, w, b = _case(rng, 2, 6, 9, 8, 12, 3, 3, groups, dtype)
    y = conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = conv2d_naive(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_without_bias_and_pointwise(rng, dtype):
    x, w, _ = _case(rng, 3, 4, 5, 7, 6, 1, 1, 2, dtype)
    np.testing.assert_allclose(conv2d(x, w, groups=2), conv2d_naive(x, w, groups=2), *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_conv2d_batch_chunking_large_batch(rng, monkeypatch, dtype, microkernel):
    # many small images: several images share one GEMM, and the result must be scattered back per image
    monkeypatch.setattr(conv_module, "USE_MICROKERNEL", microkernel)
    monkeypatch.setattr(conv_module, "_MK_PACK_COLUMNS", 0)     # the micro-kernel on small functional calls too
    x, w, b = _case(rng, 37, 3, 6, 6, 5, 3, 3, 1, dtype)
    y = conv2d(x, w, b, padding=1, algorithm="gemm")
    np.testing.assert_allclose(y, conv2d_einsum(x, w, b, padding=(1, 1, 1, 1)), *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_conv2d_gemm_wide_layer_several_chunks(rng, monkeypatch, dtype, microkernel):
    # more filters than a row block, more taps than a K block, a partial last column panel, two chunks of images
    monkeypatch.setattr(conv_module, "USE_MICROKERNEL", microkernel)
    monkeypatch.setattr(conv_module, "_MK_PACK_COLUMNS", 0)     # the micro-kernel on small functional calls too
    monkeypatch.setattr(conv_module, "_TARGET_COLUMNS", 300)
    x, w, b = _case(rng, 5, 40, 13, 11, 29, 3, 3, 1, dtype)
    y = conv2d(x, w, b, padding=(1, 0, 2, 1), algorithm="gemm")
    np.testing.assert_allclose(y, conv2d_einsum(x, w, b, padding=(1, 0, 2, 1)), *tolerance(dtype))


def test_conv2d_functional_call_packs_only_when_it_pays(rng, monkeypatch):
    """Without a layer to keep the packed weights, small calls take BLAS (packing would cost more than the kernel
    gains), large ones the micro-kernel; both give the convolution."""
    if conv_module._tile(np.dtype(np.float32)) is None:
        pytest.skip("this CPU has no GEMM micro-kernel")
    from npconv.kernels.cpu import gemm as KG
    calls = []
    monkeypatch.setattr(KG, "matmul", lambda *a, _f=KG.matmul, **k: (calls.append(1), _f(*a, **k))[1])
    x, w, b = _case(rng, 2, 4, 9, 8, 5, 3, 3, 1, np.float32)
    np.testing.assert_allclose(conv2d(x, w, b, padding=1, algorithm="gemm"),
                               conv2d_einsum(x, w, b, padding=(1, 1, 1, 1)), *tolerance(np.float32))
    assert not calls
    monkeypatch.setattr(conv_module, "_MK_PACK_COLUMNS", 2 * 9 * 8)
    np.testing.assert_allclose(conv2d(x, w, b, padding=1, algorithm="gemm"),
                               conv2d_einsum(x, w, b, padding=(1, 1, 1, 1)), *tolerance(np.float32))
    assert calls


@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv2d_without_input_channels_gives_the_bias(algorithm, with_bias):
    x = np.ones((2, 0, 9, 8), np.float32)
    w = np.ones((5, 0, 3, 3), np.float32)
    b = np.arange(5, dtype=np.float32) if with_bias else None
    y = conv2d(x, w, b, padding=1, algorithm=algorithm)
    want = np.zeros((2, 5, 9, 8), np.float32) + (0 if b is None else b[None, :, None, None])
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct"])
@pytest.mark.parametrize("stride,padding", [(10**6, 0), ((1, 10**6), 1), ((10**6, 2), (2, 1)), ((9, 4), (0, 3))])
def test_conv2d_stride_beyond_the_input(rng, algorithm, stride, padding):
    # one output along an axis whatever the stride: the result of the one window, without buffers sized by it
    x, w, b = _case(rng, 2, 3, 9, 9, 4, 3, 3, 1, np.float64)
    y = conv2d(x, w, b, stride=stride, padding=padding, algorithm=algorithm)
    s = stride if isinstance(stride, tuple) else (stride, stride)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, s, (p[0], p[0], p[1], p[1])), *tolerance(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_non_contiguous_inputs(rng, dtype):
    big = rng.standard_normal((3, 8, 12, 14)).astype(dtype)
    x = big[:, ::2, 1:, ::-1]                        # strided, offset, reversed
    assert not x.flags.c_contiguous
    w = np.asfortranarray(rng.standard_normal((5, 4, 3, 2)).astype(dtype))
    b = rng.standard_normal(10).astype(dtype)[::2]
    y = conv2d(x, w, b, stride=(2, 1), padding=(1, 0))
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, (2, 1), (1, 1, 0, 0)), *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_zf_like_first_layer(rng, dtype):
    x, w, b = _case(rng, 2, 3, 31, 29, 8, 7, 7, 1, dtype)
    y = conv2d(x, w, b, stride=2, padding=1)
    np.testing.assert_allclose(y, conv2d_einsum(x, w, b, (2, 2), (1, 1, 1, 1)), *tolerance(dtype))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_conv2d_property_random_geometry(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    groups = data.draw(st.sampled_from([1, 1, 2, 3]))
    C = groups * data.draw(st.integers(1, 3))
    F = groups * data.draw(st.integers(1, 3))
    KH, KW = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    dh, dw = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    sh, sw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    pad = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    H = data.draw(st.integers(max(1, dh * (KH - 1) + 1 - pad[0] - pad[1]), 10))
    W = data.draw(st.integers(max(1, dw * (KW - 1) + 1 - pad[2] - pad[3]), 10))
    N = data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from(DTYPES))
    x, w, b = _case(rng, N, C, H, W, F, KH, KW, groups, dtype)
    y = conv2d(x, w, b, stride=(sh, sw), padding=pad, dilation=(dh, dw), groups=groups)
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, (sh, sw), pad, (dh, dw), groups), *tolerance(dtype))


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,F,K,stride,pad,groups", [(3, 16, 7, 2, 1, 1), (16, 32, 5, 2, 0, 1), (32, 32, 3, 1, 1, 4),
                                                     (8, 8, 3, 1, 1, 8)])
def test_conv2d_matches_torch(rng, dtype, C, F, K, stride, pad, groups):
    import torch
    x, w, b = _case(rng, 4, C, 23, 21, F, K, K, groups, dtype)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                     stride=stride, padding=pad, groups=groups).numpy()
    np.testing.assert_allclose(conv2d(x, w, b, stride=stride, padding=pad, groups=groups), ref,
                               *(np.array(tolerance(dtype)) * 10))


# ---------------------------------------------------------------------------------------- bad input
def _ok(rng, dtype=np.float32):
    return _case(rng, 1, 4, 6, 6, 2, 3, 3, 1, dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(stride=-1), ValueError, r"stride must be >= 1, got -1"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(stride=1.5), TypeError, r"stride must be an int"),
    (dict(padding=-2), ValueError, r"padding must be >= 0, got -2"),
    (dict(padding="same"), ValueError, r"padding must be .*got the string 'same'"),
    (dict(padding=(1, 2, 3)), ValueError, r"padding must have 1, 2 or 4 entries, got 3"),
    (dict(dilation=0), ValueError, r"dilation must be >= 1"),
    (dict(groups=3), ValueError, r"groups \(3\) must divide the input channels of x \(4\)"),
    (dict(groups=0), ValueError, r"groups must be >= 1"),
])
def test_conv2d_bad_options(rng, kwargs, exc, match):
    x, w, b = _ok(rng)
    with pytest.raises(exc, match=match):
        conv2d(x, w, b, **kwargs)


def test_conv2d_bad_arrays(rng):
    x, w, b = _ok(rng)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got 3"):
        conv2d(x[0], w, b)
    with pytest.raises(ValueError, match=r"w must have C/groups = 4 input channels .* got w.shape\[1\] = 3"):
        conv2d(x, w[:, :3], b)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\)"):
        conv2d(x, w, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        conv2d(x.astype(np.int64), w, b)
    with pytest.raises(TypeError, match=r"w must have the dtype of x \(float32\), got float64"):
        conv2d(x, w.astype(np.float64), b)
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray or cupy.ndarray, got list"):
        conv2d(x.tolist(), w, b)
    with pytest.raises(ValueError, match=r"output height size would be -1"):
        conv2d(x[:, :, :1], w, b)
    with pytest.raises(ValueError, match=r"output width size would be 0"):
        conv2d(x, w, b, stride=1, dilation=(1, 3))
