"""Separable (vertical then horizontal) factorisation: exact recovery, optimality, data metric, validation."""
import numpy as np
import pytest

from npconv.decompose.separable import SeparableResult, separable

DTYPES = [np.float32, np.float64]


def _compose(V, H):
    """W[f, c, x, y] = sum_k H[f, k, 0, y] V[k, c, x, 0], by explicit loops over k."""
    K, C, X, _ = V.shape
    F, _, _, Y = H.shape
    W = np.zeros((F, C, X, Y))
    for k in range(K):
        W += H[:, k, 0, :][:, None, None, :] * V[k, :, :, 0][None, :, :, None]
    return W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F,C,X,Y,K", [(8, 3, 5, 5, 4), (6, 2, 3, 7, 2), (4, 1, 1, 3, 1)])
def test_exact_recovery(rng, dtype, F, C, X, Y, K):
    V = rng.standard_normal((K, C, X, 1))
    H = rng.standard_normal((F, K, 1, Y))
    W = _compose(V, H).astype(dtype)
    res = separable(W, K)
    assert isinstance(res, SeparableResult)
    v, h = res
    assert v.shape == (K, C, X, 1) and h.shape == (F, K, 1, Y) and v.dtype == h.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(_compose(v.astype(np.float64), h.astype(np.float64)), W,
                               atol=tol * np.abs(W).max() * 10)
    np.testing.assert_allclose(res.to_tensor(), W, atol=tol * np.abs(W).max() * 10)


def test_optimal_rank(rng):
    W = rng.standard_normal((6, 3, 4, 5))
    M = np.zeros((3 * 4, 6 * 5))              # M[(c, x), (f, y)] built by loops
    for f in range(6):
        for c in range(3):
            for x in range(4):
                for y in range(5):
                    M[c * 4 + x, f * 5 + y] = W[f, c, x, y]
    s = np.linalg.svd(M, compute_uv=False)
    for K in (1, 3, 7):
        res = separable(W, K)
        best = np.sqrt((s[K:] ** 2).sum() / (s ** 2).sum())
        assert res.error == pytest.approx(best, rel=1e-9)
        assert np.linalg.norm(W - res.to_tensor()) / np.linalg.norm(W) == pytest.approx(best, rel=1e-9)


def test_data_metric(rng):
    F, C, X, Y = 5, 2, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    # vertical input columns with very unequal scales
    P = rng.standard_normal((500, C * X)) * np.array([3.0, 0.1, 1.0, 2.0, 0.05, 1.5])
    Sv = P.T @ P / 500
    M = W.transpose(1, 2, 0, 3).reshape(C * X, F * Y)
    err = lambda r: np.linalg.norm(P @ (M - r.to_tensor().transpose(1, 2, 0, 3).reshape(C * X, F * Y)))  # noqa
    r_data, r_plain = separable(W, 2, data_cov=Sv), separable(W, 2)
    assert err(r_data) < err(r_plain)
    # a full (C X Y) patch second moment whose diagonal column blocks are Sv gives the same fit
    S_full = np.kron(Sv, np.eye(Y))          # index (c, x, y) with y fastest
    r_full = separable(W, 2, data_cov=S_full)
    np.testing.assert_allclose(r_full.to_tensor(), r_data.to_tensor(), atol=1e-8)
    with pytest.raises(ValueError, match="shape"):
        separable(W, 2, data_cov=np.eye(4))


@pytest.mark.parametrize("rank,exc", [(0, ValueError), (13, ValueError), (2.5, TypeError)])
def test_bad_rank(rng, rank, exc):
    with pytest.raises(exc, match="rank"):
        separable(rng.standard_normal((4, 3, 4, 5)), rank)   # limit min(12, 20)


def test_bad_tensor():
    with pytest.raises(ValueError, match="all zeros"):
        separable(np.zeros((2, 2, 3, 3)), 1)
    with pytest.raises(ValueError, match="non-finite"):
        separable(np.full((2, 2, 3, 3), np.inf), 1)
    with pytest.raises(ValueError, match="vertical"):
        SeparableResult(np.ones((2, 3, 3, 2)), np.ones((4, 2, 1, 3)))
    with pytest.raises(ValueError, match="horizontal"):
        SeparableResult(np.ones((2, 3, 3, 1)), np.ones((4, 3, 1, 3)))


def test_full_patch_metric_refinement(rng):
    """With correlated columns in the patch second moment, the fit is refined in the full metric: the reported
    errors (recomputed here from the rebuilt kernel) do not increase and end below the column-averaged fit's."""
    F, C, X, Y = 6, 3, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    # patches of images smooth along the rows: strong correlations between the columns of a patch
    img = np.cumsum(rng.standard_normal((300, C, X, Y + 6)), axis=3)[:, :, :, :Y]
    P = img.reshape(300, -1)
    S = P.T @ P / 300

    def data_err(res):
        D = (W - res.to_tensor()).reshape(F, -1)
        return np.sqrt(np.sum((D @ S) * D) / np.sum((W.reshape(F, -1) @ S) * W.reshape(F, -1)))

    refined = separable(W, 2, data_cov=S)
    averaged = separable(W, 2, data_cov=S, data_iter=0)
    e = np.array(refined.meta["data_errors"])
    assert np.all(np.diff(e) <= 1e-12) and len(e) >= 2
    assert e[0] == pytest.approx(data_err(averaged), rel=1e-9)
    assert e[-1] == pytest.approx(data_err(refined), rel=1e-9)
    assert e[-1] < 0.9 * e[0]
    assert "data_errors" not in averaged.meta
    with pytest.raises(ValueError, match="data_iter must be >= 0"):
        separable(W, 2, data_cov=S, data_iter=-1)
