"""max_pool2d / avg_pool2d against a naive loop reference (written here), PyTorch, and on bad input."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.reference import tolerance
from npconv.functional import pooling
from npconv.functional.pooling import avg_pool2d, max_pool2d, pool2d_out_hw

DTYPES = [np.float32, np.float64]


# --- independent reference -----------------------------------------------------------------------------------

def ref_len(n, k, s, p, ceil):
    """Pooled length, written out from the PyTorch rule (not via npconv._validate)."""
    if ceil:
        o = math.ceil((n + 2 * p - k) / s) + 1
        if (o - 1) * s >= n + p:  # last window would start in the right padding
            o -= 1
    else:
        o = math.floor((n + 2 * p - k) / s) + 1
    return o


def ref_pool(x, kernel, stride, padding, ceil, mode, include_pad=True):
    """Explicitly padded array + Python loops over every output; slicing clips windows at the padded edge."""
    x = np.asarray(x, dtype=np.float64)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = ref_len(H, kh, sh, ph, ceil), ref_len(W, kw, sw, pw, ceil)
    fill = -np.inf if mode == "max" else 0.0
    padded = np.full((N, C, H + 2 * ph, W + 2 * pw), fill)
    padded[:, :, ph:ph + H, pw:pw + W] = x
    real = np.zeros((H + 2 * ph, W + 2 * pw))
    real[ph:ph + H, pw:pw + W] = 1.0
    out = np.empty((N, C, oh, ow))
    for n in range(N):
        for c in range(C):
            for i in range(oh):
                for j in range(ow):
                    rows = slice(i * sh, i * sh + kh)
                    cols = slice(j * sw, j * sw + kw)
                    win = padded[n, c, rows, cols]
                    vals = [float(v) for v in win.ravel()]
                    if mode == "max":
                        out[n, c, i, j] = max(vals)
                    else:
                        den = win.size if include_pad else real[rows, cols].sum()
                        out[n, c, i, j] = sum(vals) / den
    return out


def tie_free(shape, rng, dtype, negative=False):
    """Distinct values (a permutation), optionally all negative so that zero padding would be caught."""
    size = int(np.prod(shape))
    v = rng.permutation(size).astype(np.float64)
    v = (v - size) * 0.37 if negative else (v - size / 2) * 0.37
    return v.reshape(shape).astype(dtype)


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --- fixed cases ---------------------------------------------------------------------------------------------

CASES = [
    # (shape, kernel, stride, padding, ceil)
    ((2, 3, 7, 7), (3, 3), (2, 2), (1, 1), False),
    ((2, 3, 7, 7), (3, 3), (2, 2), (1, 1), True),
    ((1, 2, 6, 6), (3, 3), (2, 2), (0, 0), True),    # ceil adds a window that overhangs the input
    ((1, 2, 5, 8), (2, 3), (2, 1), (1, 0), False),   # rectangular everything
    ((1, 2, 5, 8), (2, 3), (3, 2), (1, 1), True),
    ((2, 1, 4, 4), (4, 4), (4, 4), (0, 0), False),   # global pooling
    ((1, 1, 5, 5), (2, 2), (3, 3), (1, 1), True),    # stride > kernel
    ((1, 3, 1, 1), (1, 1), (1, 1), (0, 0), False),   # 1x1 input
    ((1, 1, 3, 3), (2, 2), (2, 2), (1, 1), True),    # ceil window dropped (would start in the padding)
    # 3-wide windows at column stride 2 (the even/odd split of the max-pool kernel), wide enough for its
    # vector loops: even and odd widths, with and without padding, ceil mode
    ((2, 2, 9, 40), (3, 3), (2, 2), (1, 1), False),
    ((1, 2, 8, 37), (3, 3), (2, 2), (0, 0), True),
    ((1, 1, 6, 34), (2, 3), (1, 2), (0, 1), False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,padding,ceil", CASES)
def test_max_pool_matches_reference(shape, kernel, stride, padding, ceil, dtype, rng):
    x = tie_free(shape, rng, dtype, negative=True)
    got = max_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil)
    check(got, ref_pool(x, kernel, stride, padding, ceil, "max"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("shape,kernel,stride,padding,ceil", CASES)
def test_avg_pool_matches_reference(shape, kernel, stride, padding, ceil, include_pad, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    got = avg_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil, count_include_pad=include_pad)
    check(got, ref_pool(x, kernel, stride, padding, ceil, "avg", include_pad), dtype)


def test_known_values_by_hand():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(max_pool2d(x, 2)[0, 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(avg_pool2d(x, 2)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    # padding 1, kernel 2, stride 2: corner window holds only x[0,0] = 0 plus three padding zeros
    y_in = avg_pool2d(x + 1, 2, padding=1, count_include_pad=True)
    y_ex = avg_pool2d(x + 1, 2, padding=1, count_include_pad=False)
    assert y_in[0, 0, 0, 0] == 1 / 4 and y_ex[0, 0, 0, 0] == 1.0
    # ceil mode on 5x5, kernel 2, stride 2: the last window covers one column/row only
    z = np.ones((1, 1, 5, 5))
    a = avg_pool2d(z, 2, ceil_mode=True)
    assert a.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(a, 1.0)  # the overhang past the (zero) padding is not counted


def test_stride_defaults_to_kernel(rng):
    x = tie_free((1, 2, 9, 9), rng, np.float64)
    np.testing.assert_array_equal(max_pool2d(x, 3), max_pool2d(x, 3, stride=3))
    np.testing.assert_array_equal(avg_pool2d(x, (3, 2)), avg_pool2d(x, (3, 2), stride=(3, 2)))
    assert max_pool2d(x, 3).shape == (1, 2, 3, 3)


def test_max_pool_pads_with_minus_infinity(rng):
    x = -1.0 - rng.random((1, 1, 4, 4))
    y = max_pool2d(x, 3, stride=1, padding=1)
    assert (y < -1.0).all()  # zero padding would give 0 on the border


@pytest.mark.parametrize("padding,ceil", [((1, 1), False), ((0, 0), True)])
def test_max_pool_nan_anywhere_3x3_stride2(rng, padding, ceil):
    """A NaN at each input position makes exactly the outputs whose window holds it NaN."""
    x0 = tie_free((1, 1, 7, 35), rng, np.float64)
    for r in range(7):
        for c in range(35):
            x = x0.copy()
            x[0, 0, r, c] = np.nan
            got = max_pool2d(x, 3, stride=2, padding=padding, ceil_mode=ceil)
            mark = np.zeros_like(x0)
            mark[0, 0, r, c] = 1.0
            hit = ref_pool(mark, (3, 3), (2, 2), padding, ceil, "max") > 0
            np.testing.assert_array_equal(np.isnan(got), hit)
            np.testing.assert_array_equal(got[~hit], ref_pool(x0, (3, 3), (2, 2), padding, ceil, "max")[~hit])


def test_max_pool_propagates_nan(rng):
    x = tie_free((1, 1, 4, 4), rng, np.float64)
    x[0, 0, 0, 1] = np.nan
    y = max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1:]).any() and not np.isnan(y[0, 0, 0, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transpose", "channel_step", "reversed", "batch_slice"])
def test_non_contiguous_inputs(view, dtype, rng):
    base = tie_free((3, 4, 9, 8), rng, dtype)
    x = {"transpose": base.transpose(0, 1, 3, 2), "channel_step": base[:, ::2],
         "reversed": base[..., ::-1], "batch_slice": base[1:]}[view]
    assert not x.flags.c_contiguous or view == "batch_slice"
    for ceil in (False, True):
        check(max_pool2d(x, 3, stride=2, padding=1, ceil_mode=ceil),
              ref_pool(x, (3, 3), (2, 2), (1, 1), ceil, "max"), dtype)
        check(avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=ceil, count_include_pad=False),
              ref_pool(x, (3, 3), (2, 2), (1, 1), ceil, "avg", False), dtype)


def test_empty_batch_and_channels():
    x = np.zeros((0, 3, 5, 5), np.float32)
    assert max_pool2d(x, 2).shape == (0, 3, 2, 2)
    assert avg_pool2d(np.zeros((2, 0, 5, 5)), 2).shape == (2, 0, 2, 2)


def test_pool2d_out_hw():
    assert pool2d_out_hw(7, 7, 3, stride=2, padding=1) == (4, 4)
    assert pool2d_out_hw(6, 6, 3, stride=2, ceil_mode=True) == (3, 3)
    assert pool2d_out_hw(3, 3, 2, stride=2, padding=1, ceil_mode=True) == (2, 2)
    assert pool2d_out_hw(5, 8, (2, 3), stride=(3, 2), padding=(1, 1), ceil_mode=True) == (2, 5)  # 3rd row window would start in the padding


# --- property tests ------------------------------------------------------------------------------------------

@st.composite
def pool_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = draw(st.integers(max(1, kh - 2 * ph), 9))
    W = draw(st.integers(max(1, kw - 2 * pw), 9))
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    ceil = draw(st.booleans())
    include_pad = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return (N, C, H, W), (kh, kw), (sh, sw), (ph, pw), ceil, include_pad, dtype, seed


@settings(max_examples=40, deadline=None)
@given(pool_configs())
def test_property_max_pool(cfg):
    shape, k, s, p, ceil, _, dtype, seed = cfg
    x = tie_free(shape, np.random.default_rng(seed), dtype, negative=bool(seed % 2))
    check(max_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil), ref_pool(x, k, s, p, ceil, "max"), dtype)


@settings(max_examples=40, deadline=None)
@given(pool_configs())
def test_property_avg_pool(cfg):
    shape, k, s, p, ceil, include_pad, dtype, seed = cfg
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    got = avg_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=include_pad)
    check(got, ref_pool(x, k, s, p, ceil, "avg", include_pad), dtype)


# --- PyTorch as an oracle ------------------------------------------------------------------------------------

@pytest.mark.torch
@settings(max_examples=30, deadline=None)
@given(pool_configs())
def test_torch_oracle_property(cfg):
    import torch
    import torch.nn.functional as F
    shape, k, s, p, ceil, include_pad, dtype, seed = cfg
    x = tie_free(shape, np.random.default_rng(seed), dtype, negative=True)
    t = torch.from_numpy(x)
    want_max = F.max_pool2d(t, k, stride=s, padding=p, ceil_mode=ceil).numpy()
    want_avg = F.avg_pool2d(t, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=include_pad).numpy()
    check(max_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil), want_max, dtype)
    check(avg_pool2d(x, k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=include_pad), want_avg, dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,padding,ceil", CASES)
def test_torch_oracle_cases(shape, kernel, stride, padding, ceil, dtype, rng):
    import torch
    import torch.nn.functional as F
    x = tie_free(shape, rng, dtype)
    t = torch.from_numpy(x)
    check(max_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil),
          F.max_pool2d(t, kernel, stride=stride, padding=padding, ceil_mode=ceil).numpy(), dtype)
    for inc in (True, False):
        check(avg_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil, count_include_pad=inc),
              F.avg_pool2d(t, kernel, stride=stride, padding=padding, ceil_mode=ceil,
                           count_include_pad=inc).numpy(), dtype)


@pytest.mark.torch
def test_torch_oracle_nan():
    import torch
    import torch.nn.functional as F
    x = np.arange(32, dtype=np.float64).reshape(1, 2, 4, 4)
    x[0, 1, 2, 3] = np.nan
    want = F.max_pool2d(torch.from_numpy(x), 2).numpy()
    np.testing.assert_array_equal(max_pool2d(x, 2), want)


# --- bad input -----------------------------------------------------------------------------------------------

BAD = [
    # (kwargs changes, error type, words the message must contain)
    (dict(x=np.zeros((2, 3, 4))), ValueError, ["x", "4 dimensions"]),
    (dict(x=np.zeros((1, 1, 2, 4, 4))), ValueError, ["x", "4 dimensions"]),
    (dict(x=np.zeros((1, 1, 4, 4), np.int64)), TypeError, ["x", "float32", "int64"]),
    (dict(x=np.zeros((1, 1, 4, 4), np.float16)), TypeError, ["x", "float16"]),
    (dict(x=[[[[1.0, 2.0]]]]), TypeError, ["x", "list"]),
    (dict(kernel=0), ValueError, ["kernel", ">= 1", "0"]),
    (dict(kernel=(2, -1)), ValueError, ["kernel", "-1"]),
    (dict(kernel=2.0), TypeError, ["kernel", "float"]),
    (dict(kernel=(2, 2, 2)), ValueError, ["kernel", "length 3"]),
    (dict(stride=-1), ValueError, ["stride", "-1"]),
    (dict(stride=0), ValueError, ["stride", "0"]),
    (dict(stride=(1, "2")), TypeError, ["stride", "str"]),
    (dict(padding=2), ValueError, ["padding", "kernel // 2", "(2, 2)"]),
    (dict(padding=(0, 2)), ValueError, ["padding", "half"]),
    (dict(padding=-1), ValueError, ["padding", "-1"]),
    (dict(padding=(1, 1, 1, 1)), ValueError, ["padding", "length 4"]),
    (dict(ceil_mode=1), TypeError, ["ceil_mode", "bool"]),
    (dict(ceil_mode="yes"), TypeError, ["ceil_mode", "bool"]),
    (dict(kernel=7), ValueError, ["kernel", "x", "5x5"]),          # output size <= 0
    (dict(kernel=(1, 6), padding=0), ValueError, ["kernel", "width"]),
    (dict(x=np.zeros((1, 1, 0, 5))), ValueError, ["x", "spatial"]),
]


@pytest.mark.parametrize("fn", [max_pool2d, avg_pool2d])
@pytest.mark.parametrize("change,err,words", BAD)
def test_bad_input(fn, change, err, words):
    kw = dict(x=np.zeros((1, 2, 5, 5)), kernel=3, stride=None, padding=0, ceil_mode=False)
    kw.update(change)
    x, kernel = kw.pop("x"), kw.pop("kernel")
    with pytest.raises(err) as info:
        fn(x, kernel, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("value", [1, None, "true"])
def test_bad_count_include_pad(value):
    with pytest.raises(TypeError, match="count_include_pad"):
        avg_pool2d(np.zeros((1, 1, 4, 4)), 2, count_include_pad=value)


def test_options_are_keyword_only():
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(TypeError):
        max_pool2d(x, 2, 2)
    with pytest.raises(TypeError):
        avg_pool2d(x, 2, 2)


# --- GPU dispatch (mocked: checks the normalised arguments handed to kernels.cuda.ops) -------------------------

class _NotNumpy:
    """Stands in for cupy: every attribute is numpy's, but the module object is not numpy."""

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    ops = types.ModuleType("npconv.kernels.cuda.ops")

    def record(name):
        def fn(*args, **kwargs):
            calls.append((name, args, kwargs))
            return "from-gpu"
        return fn

    ops.max_pool2d, ops.avg_pool2d = record("max_pool2d"), record("avg_pool2d")
    pkg = types.ModuleType("npconv.kernels.cuda")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda", pkg)
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda.ops", ops)
    monkeypatch.setattr(pooling, "get_array_module", lambda *a, **k: _NotNumpy())
    return calls


def test_gpu_dispatch_arguments(fake_gpu):
    x = np.zeros((2, 3, 7, 6), np.float32)[:, :, :, ::-1]
    assert max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True) == "from-gpu"
    assert avg_pool2d(x, (3, 2), padding=(1, 0), count_include_pad=False) == "from-gpu"
    (n1, a1, k1), (n2, a2, k2) = fake_gpu
    assert n1 == "max_pool2d" and n2 == "avg_pool2d"
    assert a1[0].flags.c_contiguous and a1[0].shape == x.shape
    assert k1 == dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), out_hw=(4, 4))
    assert k2 == dict(kernel=(3, 2), stride=(3, 2), padding=(1, 0), out_hw=(3, 3), count_include_pad=False)


# --- the parallel path (inputs above SMALL_WORK) and the thread setting --------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_large_input_parallel_path(dtype, rng):
    from npconv.kernels.cpu.pool import SMALL_WORK
    x = tie_free((2, 16, 33, 32), rng, dtype)
    assert x.size >= SMALL_WORK
    check(max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True),
          ref_pool(x, (3, 3), (2, 2), (1, 1), True, "max"), dtype)
    check(avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False),
          ref_pool(x, (2, 2), (2, 2), (0, 0), True, "avg", False), dtype)


def test_serial_if_small_restores_the_thread_count():
    import numba
    from npconv.kernels.cpu.pool import SMALL_WORK, serial_if_small
    before = numba.get_num_threads()
    with serial_if_small(10):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with serial_if_small(10):
            raise RuntimeError("inside")
    assert numba.get_num_threads() == before
    with serial_if_small(SMALL_WORK):
        assert numba.get_num_threads() == before
    max_pool2d(np.zeros((1, 1, 4, 4)), 2)
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kernel,stride,padding,ceil", CASES)
def test_max_pool_relu_option_pools_the_rectified_input(shape, kernel, stride, padding, ceil, dtype, rng):
    """relu=True equals pooling max(x, 0) (tie-free values of both signs, a NaN, a window of negatives only)."""
    x = tie_free(shape, rng, dtype)
    x.flat[len(x.flat) // 3] = np.nan
    x[..., :2, :2] = -np.abs(x[..., :2, :2]) - 1
    # the reference loops use Python's max, which does not propagate NaN: the NaN stands in as +inf there
    ref = ref_pool(np.where(np.isnan(x), np.inf, np.maximum(x, 0)), kernel, stride, padding, ceil, "max")
    got = max_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil, relu=True)
    np.testing.assert_array_equal(np.isnan(got), np.isinf(ref))
    check(got[~np.isnan(got)], ref[~np.isinf(ref)], dtype)
    assert (got[~np.isnan(got)] >= 0).all()
    out = np.full_like(got, 7)
    assert max_pool2d(x, kernel, stride=stride, padding=padding, ceil_mode=ceil, relu=True, out=out) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("value", [1, None, "true"])
def test_max_pool_relu_must_be_bool(value, rng):
    x = rng.standard_normal((1, 1, 4, 4))
    with pytest.raises(TypeError, match="relu must be a bool"):
        max_pool2d(x, 2, relu=value)
