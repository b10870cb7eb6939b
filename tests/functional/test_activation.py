"""relu, bias_relu_, softmax, flatten and dropout against naive references (written here), PyTorch, bad input."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.reference import tolerance
from npconv.functional import activation
from npconv.functional.activation import bias_relu_, dropout, flatten, relu, softmax

DTYPES = [np.float32, np.float64]


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == np.shape(ref)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --- relu ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (2, 7), (2, 3, 4, 5)])
def test_relu(shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    ref = np.array([v if v > 0 else 0.0 for v in x.ravel().tolist()]).reshape(shape)
    got = relu(x)
    check(got, ref, dtype)
    assert got is not x and (x < 0).any()  # a new array; the input is untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_non_contiguous_and_nan(dtype, rng):
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype).transpose(0, 2, 1, 3)[:, ::2]
    check(relu(x), np.where(x > 0, x, 0), dtype)
    y = np.array([-1.0, np.nan, 2.0], dtype)
    r = relu(y)
    assert r[0] == 0 and np.isnan(r[1]) and r[2] == 2
    z = relu(np.array(-3.0, dtype))
    assert isinstance(z, np.ndarray) and z.shape == () and z.dtype == np.dtype(dtype) and z == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_large_parallel_path_and_out(dtype, rng):
    """Above the serial threshold (the threads' blocks, a ragged last block), with NaN, into a NaN-filled ``out``
    and into an ``out`` that already holds a result (overwritten completely)."""
    n = 3 * (1 << 16) + 17
    x = rng.standard_normal(n).astype(dtype)
    x[[5, 1 << 16, n - 1]] = np.nan
    ref = np.where(np.isnan(x), np.nan, np.where(x > 0, x, 0))
    got = relu(x)
    np.testing.assert_array_equal(got, ref)
    out = np.full((3, n), np.nan, dtype)[1]
    assert relu(x, out=out) is out
    np.testing.assert_array_equal(out, ref)
    x4 = x[:n - 17].reshape(3, 4, 128, 128)
    out4 = np.full(x4.shape, 7.0, dtype)
    assert relu(x4, out=out4) is out4
    np.testing.assert_array_equal(out4, ref[:n - 17].reshape(x4.shape))


def test_relu_bad_out(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    with pytest.raises(TypeError, match="out must have dtype float32"):
        relu(x, out=np.empty(x.shape, np.float64))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 4, 5\)"):
        relu(x, out=np.empty((2, 3, 4, 6), np.float32))
    with pytest.raises(ValueError, match="out must not overlap x"):
        relu(x, out=x)


@pytest.mark.parametrize("bad,err,word", [
    (np.array([1, -2]), TypeError, "int64"), ([1.0, -1.0], TypeError, "list"),
    (np.array([1, 2], np.float16), TypeError, "float16")])
def test_relu_bad_input(bad, err, word):
    with pytest.raises(err) as info:
        relu(bad)
    assert "x" in str(info.value) and word in str(info.value)


# --- bias_relu_ ----------------------------------------------------------------------------------------------

def ref_bias_relu(y, b):
    y = np.asarray(y, dtype=np.float64).copy()
    N, C, H, W = y.shape
    for n in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    v = y[n, c, h, w] + (0.0 if b is None else float(b[c]))
                    y[n, c, h, w] = v if v > 0 else 0.0
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (2, 4, 64, 81)])    # the second above the serial threshold
def test_bias_relu_in_place(with_bias, dtype, shape, rng):
    y = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if with_bias else None
    ref = ref_bias_relu(y, b)
    out = bias_relu_(y, b)
    assert out is y
    check(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transpose", "channel_step", "reversed"])
def test_bias_relu_non_contiguous(view, dtype, rng):
    base = rng.standard_normal((2, 6, 4, 5)).astype(dtype)
    y = {"transpose": base.transpose(0, 1, 3, 2), "channel_step": base[:, ::2],
         "reversed": base[:, :, ::-1]}[view]
    b = rng.standard_normal(y.shape[1]).astype(dtype)
    ref = ref_bias_relu(y, b)
    untouched = base[:, 1::2].copy() if view == "channel_step" else None
    assert bias_relu_(y, b) is y
    check(y, ref, dtype)
    if untouched is not None:
        np.testing.assert_array_equal(base[:, 1::2], untouched)  # only the view was written


def test_bias_relu_nan_and_non_contiguous_bias(rng):
    y = np.array([[[[np.nan, -3.0]], [[1.0, -0.5]]]])
    b = np.array([9.0, 1.0, 0.25])[::2]  # [9.0, 0.25], strided
    bias_relu_(y, b)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 6.0
    np.testing.assert_array_equal(y[0, 1, 0], [1.25, 0.0])


BIAS_RELU_BAD = [
    (dict(y=np.zeros((2, 3, 4))), ValueError, ["y", "4 dimensions"]),
    (dict(y=np.zeros((1, 3, 2, 2), np.int32)), TypeError, ["y", "int32"]),
    (dict(b=np.zeros(2)), ValueError, ["b", "(3,)", "(2,)"]),
    (dict(b=np.zeros((3, 1))), ValueError, ["b", "1 dimensions"]),
    (dict(b=np.zeros(3, np.float32)), TypeError, ["b", "float64", "float32"]),
    (dict(b=[0.0, 0.0, 0.0]), TypeError, ["b", "list"]),
]


@pytest.mark.parametrize("change,err,words", BIAS_RELU_BAD)
def test_bias_relu_bad_input(change, err, words):
    kw = dict(y=np.zeros((1, 3, 2, 2)), b=np.zeros(3))
    kw.update(change)
    with pytest.raises(err) as info:
        bias_relu_(kw["y"], kw["b"])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bias_relu_read_only():
    y = np.zeros((1, 3, 2, 2))
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writeable"):
        bias_relu_(y, np.zeros(3))


# --- softmax -------------------------------------------------------------------------------------------------

def ref_softmax(x, axis):
    """math.exp over Python lists, one 1-D slice at a time (max-subtracted)."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.moveaxis(x, axis, -1)
    out = np.empty_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx].tolist()
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = math.fsum(e)
        out[idx] = [v / s for v in e]
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 10), -1), ((4, 10), 0), ((4, 10), 1), ((2, 3, 4, 5), 1),
                                        ((2, 3, 4, 5), -2), ((7,), 0), ((3, 1), 1)])
def test_softmax(shape, axis, dtype, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    got = softmax(x, axis=axis)
    check(got, ref_softmax(x, axis), dtype)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got.sum(axis=axis), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_is_stable_for_large_logits(dtype):
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1001.0, -1002.0]], dtype)
    got = softmax(x)
    assert np.isfinite(got).all()
    check(got, ref_softmax(x, -1), dtype)
    check(softmax(x + 5e4), ref_softmax(x, -1), dtype)  # shift-invariant (integers: the shift is exact)


def test_softmax_nan_and_empty():
    got = softmax(np.array([[1.0, np.nan], [0.0, 0.0]]))
    assert np.isnan(got[0]).all() and (got[1] == 0.5).all()
    assert softmax(np.zeros((3, 0))).shape == (3, 0)
    assert softmax(np.zeros((0, 4), np.float32)).dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_non_contiguous(dtype, rng):
    x = rng.standard_normal((6, 5, 4)).astype(dtype).transpose(2, 0, 1)[:, ::2]
    for axis in (0, 1, 2):
        check(softmax(x, axis=axis), ref_softmax(x, axis), dtype)


@settings(max_examples=35, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 50))
def test_property_softmax(shape, data, dtype, seed, scale):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
    check(softmax(x, axis=axis), ref_softmax(x, axis), dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_torch_oracle(dtype, rng):
    import torch
    x = (rng.standard_normal((3, 4, 5)) * 10).astype(dtype)
    for axis in (0, 1, 2, -1):
        check(softmax(x, axis=axis), torch.softmax(torch.from_numpy(x), dim=axis).numpy(), dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_torch_oracle(dtype, rng):
    import torch
    x = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    np.testing.assert_array_equal(relu(x), torch.relu(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("bad,kw,err,words", [
    (np.zeros((2, 3)), dict(axis=2), ValueError, ["axis", "[-2, 1]", "2"]),
    (np.zeros((2, 3)), dict(axis=-3), ValueError, ["axis", "-3"]),
    (np.zeros((2, 3)), dict(axis=1.0), TypeError, ["axis", "int"]),
    (np.zeros((2, 3)), dict(axis=None), TypeError, ["axis", "int"]),
    (np.array(1.0), dict(), ValueError, ["x", "0-d"]),
    (np.zeros((2, 3), np.int16), dict(), TypeError, ["x", "int16"]),
])
def test_softmax_bad_input(bad, kw, err, words):
    with pytest.raises(err) as info:
        softmax(bad, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_softmax_axis_keyword_only():
    with pytest.raises(TypeError):
        softmax(np.zeros((2, 3)), 0)


# --- flatten -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten(dtype, rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    got = flatten(x)
    assert got.shape == (2, 60) and got.dtype == np.dtype(dtype)
    for n in range(2):
        np.testing.assert_array_equal(got[n], [x[n, c, h, w] for c in range(3) for h in range(4) for w in range(5)])
    assert np.shares_memory(got, x)  # contiguous input: a view
    xt = x.transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(flatten(xt)[1], [xt[1, c, h, w] for c in range(3) for h in range(5)
                                                   for w in range(4)])
    assert flatten(np.zeros((0, 3, 2))).shape == (0, 6)
    assert flatten(np.zeros((4, 3))).shape == (4, 3)


@pytest.mark.parametrize("bad,err,word", [(np.zeros(5), ValueError, "at least 2"),
                                          (np.zeros((2, 3), np.int8), TypeError, "int8")])
def test_flatten_bad_input(bad, err, word):
    with pytest.raises(err) as info:
        flatten(bad)
    assert "x" in str(info.value) and word in str(info.value)


# --- dropout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.99])
def test_dropout_is_identity_at_inference(p, dtype, rng):
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    keep = x.copy()
    assert dropout(x, p=p) is x
    np.testing.assert_array_equal(x, keep)


@pytest.mark.parametrize("p,err", [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
                                   (float("nan"), ValueError), ("0.5", TypeError), (None, TypeError)])
def test_dropout_bad_p(p, err):
    with pytest.raises(err, match="p must"):
        dropout(np.zeros((2, 3)), p=p)


def test_dropout_bad_x():
    with pytest.raises(TypeError, match="x must"):
        dropout(np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError):
        dropout(np.zeros((2, 3)), 0.5)  # p is keyword-only


# --- GPU dispatch (mocked) -----------------------------------------------------------------------------------

class _NotNumpy:
    def __getattr__(self, name):
        return getattr(np, name)


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    ops = types.ModuleType("npconv.kernels.cuda.ops")

    def fake_relu(x):
        calls.append(("relu", x))
        return "from-gpu"

    def fake_softmax(x2):
        calls.append(("softmax", x2))
        return np.full_like(x2, 7.0)

    ops.relu, ops.softmax = fake_relu, fake_softmax
    pkg = types.ModuleType("npconv.kernels.cuda")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda", pkg)
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda.ops", ops)
    monkeypatch.setattr(activation, "get_array_module", lambda *a, **k: _NotNumpy())
    return calls


def test_gpu_dispatch_arguments(fake_gpu, rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert relu(x[:, ::-1]) == "from-gpu"
    got = softmax(x, axis=1)
    (n1, a1), (n2, a2) = fake_gpu
    assert n1 == "relu" and a1.flags.c_contiguous
    assert n2 == "softmax" and a2.ndim == 2 and a2.flags.c_contiguous and a2.shape == (8, 3)
    np.testing.assert_array_equal(a2, np.moveaxis(x, 1, -1).reshape(8, 3))  # rows are the softmax axis
    assert got.shape == x.shape and (got == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_inputs_parallel_path(dtype, rng):
    from npconv.kernels.cpu.pool import SMALL_WORK
    x = (rng.standard_normal((70, 500)) * 4).astype(dtype)
    assert x.size >= SMALL_WORK
    check(softmax(x), ref_softmax(x, -1), dtype)
    y = rng.standard_normal((2, 16, 32, 33)).astype(dtype)
    b = rng.standard_normal(16).astype(dtype)
    ref = np.maximum(y.astype(np.float64) + b.astype(np.float64)[:, None, None], 0)
    assert y.size >= SMALL_WORK
    bias_relu_(y, b)
    check(y, ref, dtype)
