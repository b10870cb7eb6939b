"""svd_lowrank and conv_svd: exact recovery, Eckart-Young optimality, the data metric, ranks and validation."""
import numpy as np
import pytest

from npconv.decompose.svd import ConvLowRankResult, LowRankResult, conv_svd, resolve_rank, svd_lowrank

DTYPES = [np.float32, np.float64]


def _tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-11


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((20, 30), 4), ((30, 7), 7), ((1, 5), 1)])
def test_exact_recovery(rng, dtype, shape, r):
    W = (rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1]))).astype(dtype)
    res = svd_lowrank(W, r)
    assert isinstance(res, LowRankResult)
    a, b = res
    assert a.shape == (shape[0], r) and b.shape == (r, shape[1]) and a.dtype == b.dtype == dtype
    np.testing.assert_allclose(a @ b, W, rtol=0, atol=_tol(dtype) * np.abs(W).max() * 10)
    assert res.error < _tol(dtype) * 10 and res.rank == r
    np.testing.assert_allclose(a.T.astype(np.float64) @ a, np.eye(r), atol=_tol(dtype) * 10)


@pytest.mark.parametrize("t", [1, 3, 9])
def test_eckart_young(rng, t):
    W = rng.standard_normal((15, 12))
    s = np.linalg.svd(W, compute_uv=False)
    best = np.sqrt((s[t:] ** 2).sum()) / np.sqrt((s ** 2).sum())
    res = svd_lowrank(W, t)
    assert res.error == pytest.approx(best, rel=1e-10)
    assert np.linalg.norm(W - res.to_tensor()) / np.linalg.norm(W) == pytest.approx(best, rel=1e-10)


def test_deterministic_signs(rng):
    W = rng.standard_normal((8, 6))
    r1, r2 = svd_lowrank(W, 3), svd_lowrank(W.copy(), 3)
    np.testing.assert_array_equal(r1.a, r2.a)
    for k in range(3):
        assert r1.a[np.argmax(np.abs(r1.a[:, k])), k] > 0


@pytest.mark.parametrize("frac,expected", [(0.5, 6), (1.0, 12), (1e-6, 1), (0.26, 3)])
def test_fraction_rank(rng, frac, expected):
    # (20, 30): out*in/(out+in) = 12
    assert resolve_rank(frac, 20, 30) == expected
    assert svd_lowrank(rng.standard_normal((20, 30)), frac).rank == expected


@pytest.mark.parametrize("rank,exc", [(0, ValueError), (-1, ValueError), (8, ValueError), (0.0, ValueError),
                                      (1.5, ValueError), (True, TypeError), ("3", TypeError), (None, TypeError)])
def test_bad_rank(rng, rank, exc):
    with pytest.raises(exc, match="rank"):
        svd_lowrank(rng.standard_normal((7, 9)), rank)


@pytest.mark.parametrize("W,exc,msg", [
    (np.zeros((4, 5)), ValueError, "all zeros"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "non-finite"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "non-finite"),
    (np.ones(5), ValueError, "2 dimensions"),
    (np.ones((3, 3), np.int32), TypeError, "float32 or float64"),
    ([[1.0, 2.0]], TypeError, "ndarray"),
])
def test_bad_tensor(W, exc, msg):
    with pytest.raises(exc, match=msg):
        svd_lowrank(W, 1)


def test_data_metric_matches_closed_form(rng):
    out_f, in_f, t = 10, 8, 3
    W = rng.standard_normal((out_f, in_f))
    X = rng.standard_normal((500, in_f)) @ rng.standard_normal((in_f, in_f))
    S = X.T @ X / X.shape[0]
    res = svd_lowrank(W, t, data_cov=S)
    # independent closed form: truncate W L (L = chol(S)) and map back with L^-1
    L = np.linalg.cholesky(S)
    U, s, Vt = np.linalg.svd(W @ L)
    ref = (U[:, :t] * s[:t]) @ Vt[:t] @ np.linalg.inv(L)
    np.testing.assert_allclose(res.to_tensor(), ref, atol=1e-9)
    plain = svd_lowrank(W, t)
    e_data = np.linalg.norm((W - res.to_tensor()) @ X.T)
    e_plain = np.linalg.norm((W - plain.to_tensor()) @ X.T)
    assert e_data <= e_plain * (1 + 1e-12)
    assert res.meta["data_metric"] and not plain.meta["data_metric"]


def test_data_metric_singular_cov(rng):
    """Inputs confined to a 3-dim subspace: the fit is exact on the data at rank 3 (no inverse is needed)."""
    W = rng.standard_normal((9, 12))
    X = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 12))
    S = X.T @ X / 200
    res = svd_lowrank(W, 3, data_cov=S)
    assert np.linalg.norm((W - res.to_tensor()) @ X.T) < 1e-9 * np.linalg.norm(W @ X.T)


@pytest.mark.parametrize("cov,msg", [
    (np.eye(5), "shape"), (np.triu(np.ones((6, 6))), "symmetric"), (-np.eye(6), "positive semi-definite"),
    (np.zeros((6, 6)), "all zeros"), (np.full((6, 6), np.nan), "non-finite"),
])
def test_bad_cov(rng, cov, msg):
    with pytest.raises(ValueError, match=msg):
        svd_lowrank(rng.standard_normal((4, 6)), 2, data_cov=cov)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_svd_exact(rng, dtype):
    F, C, X, Y, t = 12, 3, 5, 3, 4
    A = rng.standard_normal((F, t))
    B = rng.standard_normal((t, C, X, Y))
    W = np.einsum("ft,tcxy->fcxy", A, B).astype(dtype)
    res = conv_svd(W, t)
    assert isinstance(res, ConvLowRankResult)
    a, b = res
    assert a.shape == (F, t) and b.shape == (t, C, X, Y) and b.dtype == dtype
    np.testing.assert_allclose(res.to_tensor(), W, atol=_tol(dtype) * np.abs(W).max() * 10)
    assert conv_svd(W, 1.0).rank == min(F, int(F * C * X * Y / (F + C * X * Y)))
    with pytest.raises(ValueError, match="rank"):
        conv_svd(W, F + 1)
    with pytest.raises(ValueError, match="4 dimensions"):
        conv_svd(W[0], 2)


def test_conv_svd_data_metric(rng):
    W = rng.standard_normal((8, 2, 3, 3))
    P = rng.standard_normal((300, 18)) * np.linspace(0.1, 3, 18)
    S = P.T @ P / 300
    r_data, r_plain = conv_svd(W, 3, data_cov=S), conv_svd(W, 3)
    M = W.reshape(8, -1)
    e = lambda r: np.linalg.norm((M - r.to_tensor().reshape(8, -1)) @ P.T)  # noqa: E731
    assert e(r_data) < e(r_plain)
