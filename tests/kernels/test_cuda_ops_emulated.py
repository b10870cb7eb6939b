"""npconv.kernels.cuda.ops itself, run without a GPU: a CuPy stand-in (NumPy + the CPU emulator) replaces CuPy,
so the dispatch, chunking, argument packing and launch geometry of ops.py are exercised end to end.

References: tests/reference.py (convolution), cuda_emulator.numpy_reference (the rest), PyTorch when installed.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_emulator.numpy_reference import (avg_pool_ref, bias_relu_ref, lrn_ref, max_pool_ref, normalize_ref,
                                           softmax_ref, tolerance)
from reference import conv2d_einsum

from npconv.kernels.cuda import loader, ops

pytestmark = pytest.mark.cpuemu


@pytest.fixture
def launched(monkeypatch, fake_cupy):
    """The names of the kernels ops.py launches (in order)."""
    names = []
    real = loader.get_kernel

    def spy(source, name, dtype):
        names.append(name)
        return real(source, name, dtype)
    monkeypatch.setattr(loader, "get_kernel", spy)
    return names


def dev(fc, a):
    return fc.asarray(a)


def check(y, ref, dtype):
    from cuda_emulator import fake_cupy
    assert isinstance(y, fake_cupy.ndarray), "ops must return device arrays"
    assert y.dtype == dtype and y.shape == ref.shape
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=rtol, atol=atol)


CONV_CASES = {
    # name: (x shape, w shape, stride, padding, dilation, groups, expected kernels)
    "im2col": ((2, 6, 9, 8), (5, 6, 3, 3), (2, 1), (1, 0, 2, 1), (1, 2), 1, {"im2col", "conv_scatter"}),
    "im2col-groups": ((2, 6, 7, 7), (4, 3, 3, 2), (1, 1), (1, 1, 0, 1), (1, 1), 2, {"im2col", "conv_scatter"}),
    "depthwise-5x1": ((2, 4, 9, 6), (8, 1, 5, 1), (1, 1), (2, 2, 0, 0), (1, 1), 4, {"depthwise_conv"}),
    "depthwise-1x5": ((1, 3, 6, 9), (3, 1, 1, 5), (1, 2), (0, 0, 2, 2), (1, 1), 3, {"depthwise_conv"}),
    "pointwise": ((2, 6, 5, 4), (7, 6, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, {"bias_add"}),
    "direct": ((2, 3, 11, 10), (20, 3, 7, 7), (2, 2), (1, 1, 1, 1), (1, 1), 1, {"conv_direct"}),
    "direct-C1-dilated": ((1, 1, 9, 9), (4, 1, 3, 3), (1, 1), (2, 0, 1, 1), (2, 2), 1, {"conv_direct"}),
    "pointwise-strided": ((1, 5, 6, 6), (3, 5, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1, {"im2col", "conv_scatter"}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_paths(fake_cupy, launched, rng, dtype, order, case, with_bias):
    xs, ws, stride, pad, dil, groups, kernels = CONV_CASES[case]
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if with_bias else None
    y = ops.conv2d(dev(fake_cupy, x), dev(fake_cupy, w), None if b is None else dev(fake_cupy, b),
                   stride=stride, padding=pad, dilation=dil, groups=groups)
    check(y, conv2d_einsum(x, w, b, stride=stride, padding=pad, dilation=dil, groups=groups), dtype)
    assert set(launched) == (kernels - ({"bias_add"} if not with_bias else set()))


def test_conv2d_chunks_the_batch_and_takes_noncontiguous_input(fake_cupy, launched, monkeypatch, rng, dtype, order):
    x_full = rng.standard_normal((5, 9, 8, 6)).astype(dtype)
    x = x_full[:, ::2].transpose(0, 1, 3, 2)          # (5, 5, 6, 8), not contiguous
    w = rng.standard_normal((6, 5, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    K, P = 5 * 9, 6 * 8
    monkeypatch.setattr(ops, "WORKSPACE_BYTES", 2 * (K + 6) * P * dtype.itemsize)   # two images per chunk
    y = ops.conv2d(dev(fake_cupy, x), dev(fake_cupy, w), dev(fake_cupy, b), stride=(1, 1), padding=(1, 1, 1, 1),
                   dilation=(1, 1), groups=1)
    check(y, conv2d_einsum(x, w, b, padding=(1, 1, 1, 1)), dtype)
    assert launched.count("im2col") == 3                 # chunks of 2, 2 and 1 images


WINOGRAD_CASES = {
    # name: (x shape, w shape, padding); stride 1, no dilation, groups 1
    "odd-output": ((2, 5, 7, 9), (6, 5, 3, 3), (1, 1, 1, 1)),
    "uneven-padding": ((3, 5, 6, 8), (3, 5, 3, 3), (2, 0, 0, 1)),
    "no-padding": ((1, 6, 6, 6), (4, 6, 3, 3), (0, 0, 0, 0)),
}


@pytest.mark.parametrize("case", sorted(WINOGRAD_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_winograd_path(fake_cupy, launched, monkeypatch, rng, dtype, order, case, with_bias):
    """Above the (lowered) thresholds a 3x3 stride-1 conv takes Winograd, in chunks of two images; the result is
    the convolution of the einsum reference, for non-contiguous input too."""
    xs, ws, pad = WINOGRAD_CASES[case]
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 1)
    OH, OW = xs[2] + pad[0] + pad[1] - 2, xs[3] + pad[2] + pad[3] - 2
    tiles = -(-OH // 2) * -(-OW // 2)
    monkeypatch.setattr(ops, "WORKSPACE_BYTES", 2 * 16 * (xs[1] + ws[0]) * tiles * dtype.itemsize)
    x = rng.standard_normal((xs[0], xs[1], xs[3], xs[2])).astype(dtype).transpose(0, 1, 3, 2)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if with_bias else None
    y = ops.conv2d(dev(fake_cupy, x), dev(fake_cupy, w), None if b is None else dev(fake_cupy, b),
                   stride=(1, 1), padding=pad, dilation=(1, 1), groups=1)
    check(y, conv2d_einsum(x, w, b, padding=pad), dtype)
    assert set(launched) == {"wino_filter", "wino_input", "wino_output"}
    assert launched.count("wino_input") == -(-xs[0] // 2) and launched.count("wino_filter") == 1


@pytest.mark.parametrize("N,C,F,hw,k,stride,groups,expect", [
    (128, 256, 384, 13, 3, 1, 1, True),      # ZF conv3 at batch 128: 128*49 tiles
    (1, 256, 384, 13, 3, 1, 1, False),       # batch 1: 49 tiles, im2col
    (128, 8, 384, 13, 3, 1, 1, False),       # too few input channels
    (128, 256, 384, 13, 3, 2, 1, False),     # stride 2
    (128, 256, 384, 13, 5, 1, 1, False),     # 5x5
    (128, 256, 384, 13, 3, 1, 2, False),     # grouped
])
def test_use_winograd_rule(N, C, F, hw, k, stride, groups, expect):
    OH = (hw + 2 - k) // stride + 1
    assert ops.use_winograd(N, C, F, groups, (k, k), (stride, stride), (1, 1), (OH, OH)) is expect


def test_conv2d_direct_falls_back_when_weights_exceed_shared_memory(fake_cupy, launched, rng):
    dtype = np.dtype(np.float64)
    x, w = rng.standard_normal((1, 4, 12, 12)), rng.standard_normal((3, 4, 11, 11))   # 4*121*16*8 B > 48 KiB
    y = ops.conv2d(dev(fake_cupy, x), dev(fake_cupy, w), None, stride=(1, 1), padding=(0, 0, 0, 0),
                   dilation=(1, 1), groups=1)
    check(y, conv2d_einsum(x, w), dtype)
    assert "conv_direct" not in launched and "im2col" in launched


def test_conv2d_empty_batch(fake_cupy, launched, dtype):
    for ws in [(4, 3, 3, 3), (4, 3, 1, 1)]:
        y = ops.conv2d(fake_cupy.zeros((0, 3, 5, 5), dtype), fake_cupy.zeros(ws, dtype), fake_cupy.zeros(4, dtype),
                       stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1)
        assert y.shape == (0, 4, 5 - ws[2] + 1, 5 - ws[3] + 1) and y.dtype == dtype
    assert launched == []


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(fake_cupy, rng, dtype, order, with_bias):
    x = rng.standard_normal((3, 10)).astype(dtype)
    w = rng.standard_normal((10, 7)).astype(dtype).T        # (7, 10), not contiguous
    b = rng.standard_normal(7).astype(dtype) if with_bias else None
    y = ops.linear(dev(fake_cupy, x), dev(fake_cupy, w), None if b is None else dev(fake_cupy, b))
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)
    check(y, ref, dtype)


POOL_CASES = [
    # H, W, kernel, stride, padding, out_hw (hand-computed; ceil mode where noted)
    (8, 8, (3, 3), (2, 2), (1, 1), (5, 5)),      # ceil mode, last window past the padded input
    (6, 9, (2, 3), (2, 3), (0, 1), (3, 4)),      # ceil mode
    (13, 13, (3, 3), (2, 2), (0, 0), (6, 6)),
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_pools(fake_cupy, rng, dtype, order, case):
    H, W, kernel, stride, pad, out_hw = case
    n = 2 * 3 * H * W
    x = (rng.permutation(n).reshape(2, 3, H, W) * 0.5 - n / 4).astype(dtype)      # tie-free
    x_nc = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)    # same values, not contiguous
    y = ops.max_pool2d(dev(fake_cupy, x_nc), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw)
    check(y, max_pool_ref(x, kernel, stride, pad, out_hw), dtype)
    for cip in (True, False):
        y = ops.avg_pool2d(dev(fake_cupy, x), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw,
                           count_include_pad=cip)
        check(y, avg_pool_ref(x, kernel, stride, pad, out_hw, cip), dtype)


@pytest.mark.torch
@pytest.mark.parametrize("case", POOL_CASES)
def test_pools_match_torch_ceil_mode(fake_cupy, rng, case):
    import torch
    H, W, kernel, stride, pad, out_hw = case
    x = rng.standard_normal((2, 3, H, W))
    t = torch.from_numpy(x)
    tm = torch.nn.functional.max_pool2d(t, kernel, stride, pad, ceil_mode=True).numpy()
    assert tm.shape[2:] == out_hw            # the hand-computed sizes are PyTorch's
    y = ops.max_pool2d(dev(fake_cupy, x), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw)
    np.testing.assert_allclose(np.asarray(y), tm, rtol=1e-12)
    for cip in (True, False):
        ta = torch.nn.functional.avg_pool2d(t, kernel, stride, pad, ceil_mode=True, count_include_pad=cip).numpy()
        y = ops.avg_pool2d(dev(fake_cupy, x), kernel=kernel, stride=stride, padding=pad, out_hw=out_hw,
                           count_include_pad=cip)
        np.testing.assert_allclose(np.asarray(y), ta, rtol=1e-12, atol=1e-12)


def test_local_response_norm(fake_cupy, rng, dtype, order):
    x = (rng.standard_normal((2, 7, 4, 3)) * 4).astype(dtype)
    y = ops.local_response_norm(dev(fake_cupy, x), size=5, alpha=1e-2, beta=0.75, k=2.0)
    check(y, lrn_ref(x, 5, 1e-2, 0.75, 2.0), dtype)


@pytest.mark.torch
@pytest.mark.parametrize("size", [5, 4])
def test_local_response_norm_matches_torch(fake_cupy, rng, size):
    import torch
    x = rng.standard_normal((2, 7, 4, 3)) * 4
    ref = torch.nn.functional.local_response_norm(torch.from_numpy(x), size, alpha=1e-2, beta=0.75, k=2.0).numpy()
    y = ops.local_response_norm(dev(fake_cupy, x), size=size, alpha=1e-2, beta=0.75, k=2.0)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12)


def test_activations_and_normalize(fake_cupy, rng, dtype, order):
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    xt = x.transpose(0, 1, 3, 2)                                   # not contiguous
    check(ops.relu(dev(fake_cupy, xt)), np.maximum(xt, 0).astype(np.float64), dtype)

    b = rng.standard_normal(3).astype(dtype)
    y = dev(fake_cupy, x.copy())
    out = ops.bias_relu(y, dev(fake_cupy, b))
    assert out is y
    check(y, bias_relu_ref(x, b), dtype)
    y_nc = dev(fake_cupy, x.copy()).transpose(0, 1, 3, 2)          # in place on a non-contiguous array too
    assert ops.bias_relu(y_nc, dev(fake_cupy, b)) is y_nc
    check(y_nc, bias_relu_ref(xt, b), dtype)
    y2 = dev(fake_cupy, x[:, :, 0, :].copy())                      # (N, C, W) and no bias
    ops.bias_relu(y2, None)
    check(y2, np.maximum(x[:, :, 0, :], 0).astype(np.float64), dtype)

    s = (rng.standard_normal((6, 150)) * 20).astype(dtype)
    check(ops.softmax(dev(fake_cupy, s[:, ::-1])), softmax_ref(s[:, ::-1]), dtype)

    mean, scale = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    check(ops.normalize(dev(fake_cupy, xt), mean=dev(fake_cupy, mean), scale=dev(fake_cupy, scale)),
          normalize_ref(xt, mean, scale), dtype)


def test_index_range_is_checked(fake_cupy):
    x = fake_cupy.zeros((1, 1), np.float32)
    big = ops._INDEX_LIMIT + 1
    with pytest.raises(ValueError, match="32-bit ints"):
        ops._launch_1d("relu", np.dtype(np.float32), big, (x, x, 1))


def test_get_kernel_is_memoized_per_device(fake_cupy, monkeypatch):
    """loader.get_kernel asks the module for a kernel once per (device, source, name, dtype); another device, or a
    cleared cache, asks again."""
    asked = []
    real = loader.get_module

    class Counting:
        def __init__(self, mod):
            self.mod = mod

        def get_function(self, name):
            asked.append(name)
            return self.mod.get_function(name)
    monkeypatch.setattr(loader, "get_module", lambda source, dtype: Counting(real(source, dtype)))
    loader.clear_cache()
    k = loader.get_kernel("elementwise", "relu", np.float32)
    assert loader.get_kernel("elementwise", "relu", np.float32) is k and asked == ["npconv_relu_f32"]
    loader.get_kernel("elementwise", "relu", np.float64)
    monkeypatch.setattr(fake_cupy.cuda.Device, "id", 1)
    loader.get_kernel("elementwise", "relu", np.float32)
    assert asked == ["npconv_relu_f32", "npconv_relu_f64", "npconv_relu_f32"]
    loader.clear_cache()
    loader.get_kernel("elementwise", "relu", np.float32)
    assert len(asked) == 4


def test_contiguous_returns_a_ready_device_array_itself(fake_cupy):
    """ops.contiguous makes no copy (and no CuPy call) for a C-contiguous device array of the wanted dtype, and a
    C-contiguous device copy for anything else: a strided view, another dtype, a host array."""
    a = fake_cupy.asarray(np.arange(12.0).reshape(3, 4))
    assert ops.contiguous(fake_cupy, a) is a and ops.contiguous(fake_cupy, a, np.float64) is a
    assert ops.contiguous(fake_cupy, None) is None
    for got, want in [(ops.contiguous(fake_cupy, a[:, ::2]), np.arange(12.0).reshape(3, 4)[:, ::2]),
                      (ops.contiguous(fake_cupy, a, np.float32), np.arange(12.0).reshape(3, 4)),
                      (ops.contiguous(fake_cupy, np.arange(3.0)), np.arange(3.0))]:
        assert isinstance(got, fake_cupy.ndarray) and got.flags.c_contiguous
        np.testing.assert_array_equal(np.asarray(got), want)
    assert ops.contiguous(fake_cupy, a, np.float32).dtype == np.float32


def test_pack_args_makes_each_int32_once():
    """``ops.pack_args``: Python ints and bools become ``np.int32`` values kept for the next launch (the same
    objects), NumPy ints and 0-d arrays are converted each time, and the 32-bit range is checked either way."""
    kinds = (ops.I32,) * 5
    a = ops.pack_args("k", kinds, np.float32, (7, True, np.int64(9), np.array(11), -3))
    assert [type(v) for v in a] == [np.int32] * 5 and [int(v) for v in a] == [7, 1, 9, 11, -3]
    b = ops.pack_args("k", kinds, np.float32, (7, True, np.int64(9), np.array(11), -3))
    assert a[0] is b[0] and a[1] is b[1] and a[4] is b[4], "Python ints and bools: made once"
    assert ops._I32_MADE.get(7) is a[0]
    for bad in (2**31, -2**31 - 1, np.int64(2**31)):
        with pytest.raises(ValueError, match="does not fit a 32-bit int"):
            ops.pack_args("k", (ops.I32,), np.float32, (bad,))
    assert 2**31 not in ops._I32_MADE
