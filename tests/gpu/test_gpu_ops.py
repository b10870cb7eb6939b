"""The GPU path on a real device: every op in npconv.kernels.cuda.ops on CuPy arrays against independent NumPy
references (float64), both dtypes, contiguous and non-contiguous inputs; the functional API on CuPy against the
same call on NumPy; a NumPy/CuPy mix is a TypeError.

Skipped without a CUDA device; ``NPCONV_REQUIRE_GPU=1`` makes the skips failures (for the GPU machine).
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_emulator.numpy_reference import (avg_pool_ref, bias_relu_ref, lrn_ref, max_pool_ref, normalize_ref,
                                           softmax_ref, tolerance)
from gpu_helpers import to_gpu
from reference import conv2d_einsum, count_calls

pytestmark = pytest.mark.gpu


def check(cp, y, ref, dtype):
    assert isinstance(y, cp.ndarray), f"expected a cupy.ndarray, got {type(y).__name__}"
    assert y.dtype == dtype and y.shape == ref.shape
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=rtol, atol=atol)


CONV_CASES = {
    "im2col": ((2, 6, 9, 8), (5, 6, 3, 3), (2, 1), (1, 0, 2, 1), (1, 2), 1),
    "im2col-groups": ((2, 6, 7, 7), (4, 3, 3, 2), (1, 1), (1, 1, 0, 1), (1, 1), 2),
    "depthwise-5x1": ((2, 4, 9, 6), (8, 1, 5, 1), (1, 1), (2, 2, 0, 0), (1, 1), 4),
    "depthwise-1x5": ((1, 3, 6, 9), (3, 1, 1, 5), (1, 2), (0, 0, 2, 2), (1, 1), 3),
    "pointwise": ((2, 6, 5, 4), (7, 6, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "direct-7x7s2": ((2, 3, 23, 21), (20, 3, 7, 7), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    "direct-C1-dilated": ((1, 1, 9, 9), (4, 1, 3, 3), (1, 1), (2, 0, 1, 1), (2, 2), 1),
    "zf-conv2-like": ((2, 24, 27, 27), (64, 24, 5, 5), (2, 2), (0, 0, 0, 0), (1, 1), 1),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d(cp, rng, dtype, contiguous, case, with_bias):
    from npconv.kernels.cuda import ops
    xs, ws, stride, pad, dil, groups = CONV_CASES[case]
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if with_bias else None
    y = ops.conv2d(to_gpu(cp, x, contiguous), to_gpu(cp, w, contiguous), None if b is None else cp.asarray(b),
                   stride=stride, padding=pad, dilation=dil, groups=groups)
    ref = conv2d_einsum(x, w, b, stride=stride, padding=pad, dilation=dil, groups=groups)
    rtol, atol = tolerance(dtype)
    scale = max(1.0, float(np.sqrt(np.prod(ws[1:]))) / 4)       # long float32 sums: tolerance grows with K
    assert y.dtype == dtype
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=rtol * scale, atol=atol * scale)


def test_conv2d_batch_chunks(cp, rng, dtype, monkeypatch):
    from npconv.kernels.cuda import ops
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in [(5, 5, 8, 6), (6, 5, 3, 3), (6,)])
    monkeypatch.setattr(ops, "WORKSPACE_BYTES", 2 * (45 + 6) * 48 * dtype.itemsize)   # two images per chunk
    y = ops.conv2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), stride=(1, 1), padding=(1, 1, 1, 1),
                   dilation=(1, 1), groups=1)
    check(cp, y, conv2d_einsum(x, w, b, padding=(1, 1, 1, 1)), dtype)


WINOGRAD_CASES = {
    # x shape, w shape, padding (stride 1, no dilation, groups 1)
    "odd-output": ((2, 5, 7, 9), (6, 5, 3, 3), (1, 1, 1, 1)),
    "uneven-padding": ((3, 5, 6, 8), (3, 5, 3, 3), (2, 0, 0, 1)),
    "zf-conv3-like": ((4, 64, 13, 13), (96, 64, 3, 3), (1, 1, 1, 1)),
}


@pytest.mark.parametrize("case", sorted(WINOGRAD_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_winograd(cp, rng, dtype, contiguous, monkeypatch, case, with_bias):
    """The Winograd F(2x2, 3x3) path (thresholds lowered so small shapes take it; two images per chunk)."""
    from npconv.kernels.cuda import ops
    xs, ws, pad = WINOGRAD_CASES[case]
    taken = count_calls(monkeypatch, ops, "_conv_winograd")
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)
    OH, OW = xs[2] + pad[0] + pad[1] - 2, xs[3] + pad[2] + pad[3] - 2
    tiles = -(-OH // 2) * -(-OW // 2)
    monkeypatch.setattr(ops, "WORKSPACE_BYTES", 2 * 16 * (xs[1] + ws[0]) * tiles * dtype.itemsize)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if with_bias else None
    y = ops.conv2d(to_gpu(cp, x, contiguous), to_gpu(cp, w, contiguous), None if b is None else cp.asarray(b),
                   stride=(1, 1), padding=pad, dilation=(1, 1), groups=1)
    assert taken, "the Winograd path was not taken"
    ref = conv2d_einsum(x, w, b, padding=pad)
    rtol, atol = tolerance(dtype)
    scale = max(1.0, float(np.sqrt(np.prod(ws[1:]))) / 4)       # long float32 sums: tolerance grows with K
    assert y.dtype == dtype
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=rtol * scale, atol=atol * scale)


def test_conv2d_winograd_default_rule_at_zf_conv3_batch_48(cp, rng):
    """ZF conv3 at batch 48 (2352 tiles) takes Winograd with the default thresholds and agrees with the CPU
    convolution in float64."""
    from npconv.kernels.cuda import ops
    x = rng.standard_normal((48, 256, 13, 13)).astype(np.float32)
    w = (rng.standard_normal((384, 256, 3, 3)) / 48).astype(np.float32)
    assert ops.use_winograd(48, 256, 384, 1, (3, 3), (1, 1), (1, 1), (13, 13))
    y = ops.conv2d(cp.asarray(x), cp.asarray(w), None, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
                   groups=1)
    from npconv.functional import conv2d
    ref = conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(cp, rng, dtype, contiguous, with_bias):
    from npconv.kernels.cuda import ops
    x, w = rng.standard_normal((4, 30)).astype(dtype), rng.standard_normal((9, 30)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype) if with_bias else None
    y = ops.linear(to_gpu(cp, x, contiguous), to_gpu(cp, w, contiguous), None if b is None else cp.asarray(b))
    check(cp, y, x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b), dtype)


POOL_CASES = [
    (7, 7, (3, 3), (2, 2), (0, 0), (3, 3)),
    (8, 8, (3, 3), (2, 2), (1, 1), (5, 5)),      # PyTorch ceil mode: the last window reaches past the padding
    (6, 9, (2, 3), (2, 3), (0, 1), (3, 4)),      # ceil mode
    (55, 55, (3, 3), (2, 2), (0, 0), (27, 27)),  # ZF-net pool1
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_pools(cp, rng, dtype, contiguous, case):
    from npconv.kernels.cuda import ops
    H, W, kernel, stride, pad, out_hw = case
    n = 2 * 3 * H * W
    x = (rng.permutation(n).reshape(2, 3, H, W) * 0.25 - n / 8).astype(dtype)     # tie-free
    y = ops.max_pool2d(to_gpu(cp, x, contiguous), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw)
    check(cp, y, max_pool_ref(x, kernel, stride, pad, out_hw), dtype)
    for cip in (True, False):
        y = ops.avg_pool2d(to_gpu(cp, x, contiguous), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw,
                           count_include_pad=cip)
        check(cp, y, avg_pool_ref(x, kernel, stride, pad, out_hw, cip), dtype)


@pytest.mark.parametrize("size", [5, 4])
def test_local_response_norm(cp, rng, dtype, contiguous, size):
    from npconv.kernels.cuda import ops
    x = (rng.standard_normal((2, 9, 5, 4)) * 4).astype(dtype)
    y = ops.local_response_norm(to_gpu(cp, x, contiguous), size=size, alpha=1e-2, beta=0.75, k=2.0)
    check(cp, y, lrn_ref(x, size, 1e-2, 0.75, 2.0), dtype)


def test_activations_and_normalize(cp, rng, dtype, contiguous):
    from npconv.kernels.cuda import ops
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    x[0, 0, 0, 0] = np.nan
    y = ops.relu(to_gpu(cp, x, contiguous))
    assert np.isnan(cp.asnumpy(y)[0, 0, 0, 0])                    # NaN stays NaN
    check(cp, y[1], np.maximum(x[1], 0).astype(np.float64), dtype)

    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    ref = bias_relu_ref(x, b)
    y = to_gpu(cp, x, contiguous)
    assert ops.bias_relu(y, cp.asarray(b)) is y                   # in place, on the array given
    check(cp, y, ref, dtype)

    mean, scale = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    y = ops.normalize(to_gpu(cp, x, contiguous), mean=cp.asarray(mean), scale=cp.asarray(scale))
    check(cp, y, normalize_ref(x, mean, scale), dtype)


@pytest.mark.parametrize("R,L", [(3, 10), (3000, 7), (4, 5000)])
def test_softmax(cp, rng, dtype, contiguous, R, L):
    from npconv.kernels.cuda import ops
    x = (rng.standard_normal((R, L)) * 30 + 500).astype(dtype)    # exp overflows without the max shift
    y = ops.softmax(to_gpu(cp, x, contiguous))
    check(cp, y, softmax_ref(x), dtype)


# --- through the functional API ---------------------------------------------------------------------------------

def _functional(name):
    import npconv.functional as F
    fn = getattr(F, name, None)
    if fn is None:
        pytest.fail(f"npconv.functional.{name} is missing")
    return fn


FUNCTIONAL_CALLS = {
    "conv2d": lambda F, a, rng, dt: F(a((2, 3, 11, 11)), a((8, 3, 3, 3)), a((8,)), stride=2, padding=1),
    "linear": lambda F, a, rng, dt: F(a((3, 12)), a((5, 12)), a((5,))),
    "max_pool2d": lambda F, a, rng, dt: F(a((2, 3, 8, 8)), 3, stride=2, padding=1, ceil_mode=True),
    "avg_pool2d": lambda F, a, rng, dt: F(a((2, 3, 8, 8)), 3, stride=2, padding=1, ceil_mode=True,
                                          count_include_pad=False),
    "local_response_norm": lambda F, a, rng, dt: F(a((2, 7, 3, 3)), size=5, alpha=1e-3, beta=0.75, k=2.0),
    "relu": lambda F, a, rng, dt: F(a((2, 3, 4, 4))),
    "softmax": lambda F, a, rng, dt: F(a((4, 10))),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL_CALLS))
def test_functional_gpu_matches_cpu(cp, dtype, name):
    fn = _functional(name)
    results = []
    for to_device in (False, True):
        rng = np.random.default_rng(7)                              # the same inputs for both calls

        def a(shape):
            v = rng.standard_normal(shape).astype(dtype)
            return cp.asarray(v) if to_device else v
        results.append(FUNCTIONAL_CALLS[name](fn, a, rng, dtype))
    cpu, gpu = results
    assert isinstance(gpu, cp.ndarray) and isinstance(cpu, np.ndarray)
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(cp.asnumpy(gpu), cpu, rtol=rtol, atol=atol)


def test_mixed_numpy_and_cupy_is_a_type_error(cp):
    from npconv._backend import get_array_module
    x = np.zeros((1, 3, 5, 5), np.float32)
    w = cp.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(TypeError, match="mix"):
        get_array_module(x, w)
    with pytest.raises(TypeError):
        _functional("conv2d")(x, w)
    with pytest.raises(TypeError):
        _functional("linear")(cp.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32))
