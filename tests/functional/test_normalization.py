"""local_response_norm and normalize against naive references (written here), PyTorch, and on bad input."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.reference import tolerance
from npconv.functional import normalization
from npconv.functional.normalization import local_response_norm, normalize

DTYPES = [np.float32, np.float64]


# --- independent references ----------------------------------------------------------------------------------

def ref_lrn(x, size, alpha, beta, k):
    """PyTorch's formula, a direct sum over the clipped channel window for every (n, c)."""
    x = np.asarray(x, dtype=np.float64)
    N, C = x.shape[:2]
    out = np.empty_like(x)
    for n in range(N):
        for c in range(C):
            lo, hi = max(0, c - size // 2), min(C - 1, c + (size - 1) // 2)
            ssq = np.zeros(x.shape[2:])
            for cc in range(lo, hi + 1):
                ssq += x[n, cc] ** 2
            out[n, c] = x[n, c] / (k + alpha / size * ssq) ** beta
    return out


def ref_lrn_paper(x, n_size, alpha_paper, beta, k):
    """AlexNet paper: b_c = a_c / (k + alpha * sum_{max(0,c-n/2)}^{min(C-1,c+n/2)} a^2)^beta (n odd)."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[1]
    out = np.empty_like(x)
    half = n_size // 2
    for c in range(C):
        ssq = sum(x[:, j] ** 2 for j in range(max(0, c - half), min(C - 1, c + half) + 1))
        out[:, c] = x[:, c] / (k + alpha_paper * ssq) ** beta
    return out


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --- LRN -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,alpha,beta,k", [
    (5, 1e-4, 0.75, 2.0),      # AlexNet values (pow fast path)
    (3, 0.5, 0.75, 1.0),       # strong normalisation so errors show
    (4, 0.3, 0.6, 1.5),        # even size: one more channel below than above; general pow
    (2, 0.2, 0.5, 0.7),        # beta 0.5 path
    (1, 1.0, 1.0, 1.0),        # size 1 (own channel only), beta 1 path
    (9, 0.4, 0.75, 1.0),       # window larger than C
    (3, 0.0, 0.75, 2.0),       # alpha 0: x / k**beta
    (3, 0.3, 0.0, 1.0),        # beta 0: identity
])
def test_lrn_matches_reference(size, alpha, beta, k, dtype, rng):
    x = (rng.standard_normal((2, 6, 3, 5)) * 2).astype(dtype)
    check(local_response_norm(x, size=size, alpha=alpha, beta=beta, k=k), ref_lrn(x, size, alpha, beta, k), dtype)


def test_lrn_special_cases_by_hand(rng):
    x = rng.standard_normal((1, 4, 2, 2))
    np.testing.assert_allclose(local_response_norm(x, size=3, alpha=0.0, beta=0.75, k=2.0), x / 2 ** 0.75)
    np.testing.assert_allclose(local_response_norm(x, size=3, alpha=0.5, beta=0.0, k=2.0), x)
    one = np.zeros((1, 3, 1, 1))
    one[0, 1] = 2.0
    # size 1: y = x / (k + alpha * x^2)^beta = 2 / (1 + 1*4)^1
    assert local_response_norm(one, size=1, alpha=1.0, beta=1.0, k=1.0)[0, 1, 0, 0] == pytest.approx(0.4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_many_channels_and_pixels(dtype, rng):
    """More channels than the window and more pixels than one kernel block (512): running sum across blocks."""
    x = rng.standard_normal((1, 12, 23, 29)).astype(dtype)
    check(local_response_norm(x, size=5, alpha=0.8, beta=0.75, k=1.0), ref_lrn(x, 5, 0.8, 0.75, 1.0), dtype)


def test_lrn_running_sum_wide_dynamic_range(rng):
    """A huge channel followed by tiny ones: the window sums must not leave visible cancellation error."""
    x = rng.standard_normal((1, 10, 4, 4)) * 1e-3
    x[:, 2] = 1e4
    got = local_response_norm(x, size=3, alpha=1e-4, beta=0.75, k=1.0)
    np.testing.assert_allclose(got, ref_lrn(x, 3, 1e-4, 0.75, 1.0), rtol=1e-9, atol=0)
    # a channel 1e9 times larger than the rest, a small k: its square dwarfs the others' in any running sum
    x = np.full((1, 6, 1, 1), 1e-3)
    x[0, 0] = 1e6
    got = local_response_norm(x, size=3, alpha=3.0, beta=0.75, k=1e-6)
    np.testing.assert_allclose(got, ref_lrn(x, 3, 3.0, 0.75, 1e-6), rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lrn_non_finite_stays_in_its_windows(bad, dtype):
    """A NaN or infinity affects only the outputs whose window holds it (as in PyTorch), not later channels."""
    x = np.ones((1, 8, 2, 3), dtype)
    x[0, 1, 1, 2] = bad
    got = local_response_norm(x, size=3, alpha=0.5, beta=0.75, k=1.0)
    with np.errstate(invalid="ignore"):
        ref = ref_lrn(x, 3, 0.5, 0.75, 1.0)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[0, 1, 1, 2]) and np.isfinite(got[0, 3:]).all()
    check(np.nan_to_num(got), np.nan_to_num(ref), dtype)


def test_lrn_matches_alexnet_paper_formula_with_scaled_alpha(rng):
    x = rng.standard_normal((2, 7, 3, 3)) * 3
    n, alpha_paper = 5, 0.01
    got = local_response_norm(x, size=n, alpha=alpha_paper * n, beta=0.75, k=2.0)
    np.testing.assert_allclose(got, ref_lrn_paper(x, n, alpha_paper, 0.75, 2.0), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transpose", "channel_step", "reversed"])
def test_lrn_non_contiguous(view, dtype, rng):
    base = rng.standard_normal((2, 8, 5, 4)).astype(dtype)
    x = {"transpose": base.transpose(0, 1, 3, 2), "channel_step": base[:, ::2],
         "reversed": base[:, ::-1, :, ::-1]}[view]
    assert not x.flags.c_contiguous
    check(local_response_norm(x, size=3, alpha=0.5, beta=0.75, k=1.0), ref_lrn(x, 3, 0.5, 0.75, 1.0), dtype)


@settings(max_examples=35, deadline=None)
@given(N=st.integers(1, 2), C=st.integers(1, 9), H=st.integers(1, 4), W=st.integers(1, 4),
       size=st.integers(1, 11), alpha=st.floats(0, 2), beta=st.floats(0, 1.5), k=st.floats(0.1, 3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_property_lrn(N, C, H, W, size, alpha, beta, k, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((N, C, H, W)).astype(dtype)
    check(local_response_norm(x, size=size, alpha=alpha, beta=beta, k=k), ref_lrn(x, size, alpha, beta, k), dtype)


@pytest.mark.torch
@settings(max_examples=30, deadline=None)
@given(C=st.integers(1, 9), size=st.integers(1, 11), alpha=st.floats(1e-4, 2), beta=st.floats(0, 1.5),
       k=st.floats(0.1, 3), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_torch_oracle_lrn(C, size, alpha, beta, k, dtype, seed):
    import torch
    import torch.nn.functional as F
    x = np.random.default_rng(seed).standard_normal((2, C, 3, 4)).astype(dtype)
    want = F.local_response_norm(torch.from_numpy(x), size, alpha=alpha, beta=beta, k=k).numpy()
    check(local_response_norm(x, size=size, alpha=alpha, beta=beta, k=k), want, dtype)


LRN_BAD = [
    (dict(x=np.zeros((2, 3, 4))), ValueError, ["x", "4 dimensions"]),
    (dict(x=np.zeros((1, 3, 2, 2), np.int32)), TypeError, ["x", "int32"]),
    (dict(x=np.zeros((1, 3, 2, 2)).tolist()), TypeError, ["x", "list"]),
    (dict(size=0), ValueError, ["size", ">= 1", "0"]),
    (dict(size=2.5), TypeError, ["size", "int"]),
    (dict(size=True), TypeError, ["size", "int"]),
    (dict(alpha=-1e-4), ValueError, ["alpha", ">= 0"]),
    (dict(alpha=float("nan")), ValueError, ["alpha", "finite"]),
    (dict(alpha="1e-4"), TypeError, ["alpha", "real"]),
    (dict(beta=-0.5), ValueError, ["beta", ">= 0"]),
    (dict(beta=float("inf")), ValueError, ["beta", "finite"]),
    (dict(k=0.0), ValueError, ["k", "> 0"]),
    (dict(k=-1.0), ValueError, ["k", "> 0"]),
    (dict(k=None), TypeError, ["k", "real"]),
]


@pytest.mark.parametrize("change,err,words", LRN_BAD)
def test_lrn_bad_input(change, err, words):
    kw = dict(x=np.ones((1, 3, 2, 2)), size=3, alpha=1e-4, beta=0.75, k=2.0)
    kw.update(change)
    x = kw.pop("x")
    with pytest.raises(err) as info:
        local_response_norm(x, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_lrn_size_is_required_and_keyword_only():
    with pytest.raises(TypeError):
        local_response_norm(np.ones((1, 3, 2, 2)))
    with pytest.raises(TypeError):
        local_response_norm(np.ones((1, 3, 2, 2)), 3)


# --- normalize -----------------------------------------------------------------------------------------------

def ref_normalize(x, mean, std):
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        out[:, c] = (x[:, c] - float(mean[c])) / float(std[c])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_matches_reference(dtype, rng):
    x = rng.random((2, 3, 4, 5)).astype(dtype)
    mean = np.array([0.485, 0.456, 0.406], dtype)
    std = np.array([0.229, 0.224, 0.225], dtype)
    check(normalize(x, mean=mean, std=std), ref_normalize(x, mean, std), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_accepts_sequences_and_keeps_dtype(dtype, rng):
    x = rng.random((1, 2, 3, 3)).astype(dtype)
    got = normalize(x, mean=[0.5, -1.0], std=(2.0, 0.25))
    check(got, ref_normalize(x, [0.5, -1.0], [2.0, 0.25]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_non_contiguous_and_pure(dtype, rng):
    base = rng.random((2, 6, 4, 5)).astype(dtype)
    x = base[:, ::2].transpose(0, 1, 3, 2)
    keep = x.copy()
    mean, std = rng.random(3).astype(dtype), (rng.random(3) + 0.5).astype(dtype)
    check(normalize(x, mean=mean, std=std), ref_normalize(x, mean, std), dtype)
    np.testing.assert_array_equal(x, keep)  # input untouched


NORM_BAD = [
    (dict(x=np.ones((2, 3))), ValueError, ["x", "4 dimensions"]),
    (dict(x=np.ones((1, 3, 2, 2), np.int64)), TypeError, ["x", "int64"]),
    (dict(mean=np.zeros(2)), ValueError, ["mean", "3", "(2,)"]),
    (dict(std=np.ones((3, 1))), ValueError, ["std", "1 dimensions"]),
    (dict(mean=np.zeros(3, np.float32)), TypeError, ["mean", "float64", "float32"]),
    (dict(std=np.ones(3, np.int64)), TypeError, ["std", "int64"]),
    (dict(std=np.array([1.0, 0.0, 1.0])), ValueError, ["std", "> 0"]),
    (dict(std=np.array([1.0, -2.0, 1.0])), ValueError, ["std", "> 0"]),
    (dict(mean=np.array([0.0, np.nan, 0.0])), ValueError, ["mean", "non-finite"]),
    (dict(std=np.array([1.0, np.inf, 1.0])), ValueError, ["std", "non-finite"]),
    (dict(mean=["a", "b", "c"]), TypeError, ["mean", "sequence"]),
    (dict(mean="abc"), TypeError, ["mean", "str"]),
]


@pytest.mark.parametrize("change,err,words", NORM_BAD)
def test_normalize_bad_input(change, err, words):
    kw = dict(x=np.ones((1, 3, 2, 2)), mean=np.zeros(3), std=np.ones(3))
    kw.update(change)
    x = kw.pop("x")
    with pytest.raises(err) as info:
        normalize(x, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# --- GPU dispatch (mocked) -----------------------------------------------------------------------------------

class _NotNumpy:
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

    ops.local_response_norm, ops.normalize = record("local_response_norm"), record("normalize")
    pkg = types.ModuleType("npconv.kernels.cuda")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda", pkg)
    monkeypatch.setitem(sys.modules, "npconv.kernels.cuda.ops", ops)
    monkeypatch.setattr(normalization, "get_array_module", lambda *a, **k: _NotNumpy())
    return calls


def test_gpu_dispatch_arguments(fake_gpu):
    x = np.ones((1, 3, 2, 2), np.float32).transpose(0, 1, 3, 2)[:, :, ::-1]
    assert local_response_norm(x, size=5, alpha=1, beta=0.75, k=2) == "from-gpu"
    std = np.array([2.0, 4.0, 0.5], np.float32)
    assert normalize(x, mean=np.zeros(3, np.float32), std=std) == "from-gpu"
    (n1, a1, k1), (n2, a2, k2) = fake_gpu
    assert n1 == "local_response_norm" and a1[0].flags.c_contiguous
    assert k1 == dict(size=5, alpha=1.0, beta=0.75, k=2.0)
    assert all(type(v) in (int, float) for v in k1.values())
    assert n2 == "normalize" and a2[0].flags.c_contiguous
    np.testing.assert_array_equal(k2["scale"], [0.5, 0.25, 2.0])
    assert k2["scale"].dtype == np.float32 and k2["mean"].shape == (3,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_large_input_parallel_path(dtype, rng):
    """Above SMALL_WORK the kernel runs in parallel over (image, pixel block); several blocks per image."""
    from npconv.kernels.cpu.pool import SMALL_WORK
    x = rng.standard_normal((3, 10, 37, 41)).astype(dtype)
    assert x.size >= SMALL_WORK
    check(local_response_norm(x, size=5, alpha=0.9, beta=0.75, k=1.0), ref_lrn(x, 5, 0.9, 0.75, 1.0), dtype)
