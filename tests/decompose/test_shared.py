"""Shared separable filters: exact recovery when the blocks really share S filters, monotone refit, cost,
determinism and validation."""
import numpy as np
import pytest
from reference import count_calls

from npconv.decompose import cost
from npconv.decompose.bicluster import bicluster
from npconv.decompose.shared import SharedSeparableResult, share_filters, shared_separable

DTYPES = [np.float32, np.float64]


def _synthetic_shared(rng, F, C, X, Y, G, H, K, S):
    """Bicluster-CP kernel whose G*H*K components use only S separable filters (distinct inside a block)."""
    vs = rng.standard_normal((S, X))
    hs = rng.standard_normal((S, Y))
    ig = np.array_split(rng.permutation(C), G)
    og = np.array_split(rng.permutation(F), H)
    W = np.zeros((F, C, X, Y))
    for ci in ig:
        for fo in og:
            pick = rng.choice(S, size=K, replace=False)
            A = rng.standard_normal(K)[None, :] + 0.35 * rng.standard_normal((ci.size, K))
            E = rng.standard_normal(K)[None, :] + 0.35 * rng.standard_normal((fo.size, K))
            W[np.ix_(fo, ci)] = np.einsum("fk,ck,kx,ky->fcxy", E, A, vs[pick], hs[pick])
    return W


def _rebuild(res):
    """Independent rebuild from the shared factors, one channel pair and component at a time."""
    F, C, X, Y = res.shape
    W = np.zeros((F, C, X, Y))
    in_g = np.repeat(np.arange(len(res.in_offsets) - 1), np.diff(res.in_offsets))
    out_g = np.repeat(np.arange(len(res.out_offsets) - 1), np.diff(res.out_offsets))
    for i, f in enumerate(res.out_perm):
        for j, c in enumerate(res.in_perm):
            g, h = in_g[j], out_g[i]
            for k in range(res.rank):
                s = res.assign[g, h, k]
                W[f, c] += res.expand[i, g, k] * res.reduce[j, h, k] * np.outer(res.vertical[s], res.horizontal[s])
    return W


@pytest.mark.parametrize("dtype", DTYPES)
def test_recovers_a_kernel_built_from_shared_filters(rng, dtype):
    W = _synthetic_shared(rng, 8, 6, 3, 3, 3, 2, 2, 3)
    res = shared_separable(W.astype(dtype), 3, 2, rank=2, n_filters=3, n_iter=3000, tol=0.0, refit_iter=50,
                           random_state=0)
    assert isinstance(res, SharedSeparableResult) and res.vertical.shape == (3, 3)
    assert res.reduce.dtype == dtype
    rel = np.linalg.norm(_rebuild(res) - W) / np.linalg.norm(W)
    assert rel < (1e-4 if dtype == np.float32 else 1e-6)
    np.testing.assert_allclose(res.to_tensor(), _rebuild(res), rtol=1e-5, atol=1e-5)


def test_errors_non_increasing_and_final_error_is_true(rng):
    W = rng.standard_normal((8, 8, 3, 3))
    res = shared_separable(W, 4, 2, rank=3, n_filters=5, refit_iter=15, tol=0.0, random_state=1)
    e = np.asarray(res.errors)
    assert e.size >= 2 and np.all(np.diff(e) <= 0)
    assert e[-1] == pytest.approx(np.linalg.norm(W - _rebuild(res)) / np.linalg.norm(W), rel=1e-9)
    # sharing cannot beat the unshared approximation it started from by construction of the clustering only
    assert res.meta["bicluster_error"] is not None


def test_share_filters_from_an_existing_result_and_filter_usage(rng):
    W = rng.standard_normal((6, 6, 3, 2))
    base = bicluster(W, 3, 2, method="cp", rank=2, random_state=0)
    res = share_filters(W, base, 2, refit_iter=0, random_state=0)
    assert len(res.errors) == 1
    np.testing.assert_array_equal(res.in_perm, base.in_perm)
    used = res.used_filters()
    assert len(used) == 3 and all(set(u.tolist()) <= {0, 1} for u in used)
    np.testing.assert_allclose(np.linalg.norm(res.vertical, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(res.horizontal, axis=1), 1.0)


def test_cost_formula(rng):
    W = rng.standard_normal((8, 8, 3, 3))
    res = shared_separable(W, 4, 2, rank=3, n_filters=2, refit_iter=2, random_state=0)
    u = np.array([len(a) for a in res.used_filters()])
    # input 8x9x9, stride 1, no padding: output 7x7, vertical pass over 7 rows x 9 columns
    c = res.cost((8, 9, 9))
    assert c.macs == int((2 * u).sum() * (3 * 7 * 9 + 3 * 49) + 8 * 2 * 3 * 49 + 8 * 4 * 3 * 49)
    assert c.params == res.n_params() == 8 * 2 * 3 + 2 * 3 + 2 * 3 + 8 * 4 * 3
    # with small input groups and few shared filters it is cheaper than the unshared layer
    plain = cost.bicluster_cp_cost((8, 9, 9), 8, 3, 4, 2, 3)
    assert c.macs < plain.macs
    paper = res.cost((8, 9, 9), stride=1, form="paper")
    assert isinstance(paper.macs, float) and paper.macs > 0


def test_deterministic_for_a_random_state(rng):
    W = rng.standard_normal((6, 6, 3, 3)).astype(np.float32)
    a = shared_separable(W, 3, 2, rank=2, n_filters=3, random_state=4)
    b = shared_separable(W, 3, 2, rank=2, n_filters=3, random_state=4)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)


def test_validation(rng):
    W = rng.standard_normal((6, 6, 3, 3))
    base = bicluster(W, 3, 2, method="cp", rank=2, random_state=0)
    with pytest.raises(ValueError, match="n_filters must be smaller than the number of components"):
        share_filters(W, base, 12)
    with pytest.raises(ValueError, match="n_filters must be >= 1"):
        share_filters(W, base, 0)
    with pytest.raises(TypeError, match="BiclusterCPResult"):
        share_filters(W, bicluster(W, 3, 2, method="svd", ranks=(1, 1), random_state=0), 2)
    with pytest.raises(ValueError, match="shape"):
        share_filters(W[:, :, :2], base, 2)
    with pytest.raises(ValueError, match="refit_iter"):
        share_filters(W, base, 2, refit_iter=-1)
    with pytest.raises(ValueError, match="init has"):
        shared_separable(W, 2, 2, rank=2, n_filters=2, init=base)
    with pytest.raises(TypeError, match="init"):
        shared_separable(W, 3, 2, rank=2, n_filters=2, init="base")
    with pytest.raises(ValueError, match="all zeros"):
        shared_separable(np.zeros_like(W), 3, 2, rank=2, n_filters=2)
    parts = dict(zip(SharedSeparableResult.FACTORS, share_filters(W, base, 2, refit_iter=0, random_state=0)))
    with pytest.raises(ValueError, match="assign must index"):
        SharedSeparableResult(**dict(parts, assign=parts["assign"] + 5))


def test_data_metric_fit(rng):
    """With data_cov the input and output factors are refitted in the data metric around the fixed shared
    filters: the reported errors (recomputed here from an independent rebuild) do not increase, and the data
    error ends below the weight fit's."""
    F, C, X, Y = 8, 6, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    A = rng.standard_normal((C * X * Y, C * X * Y)) * np.exp(-np.arange(C * X * Y) / 8.0)[None, :]
    P = rng.standard_normal((2000, C * X * Y)) @ A.T
    Sd = P.T @ P / 2000

    def data_err(res):
        D = (W - _rebuild(res)).reshape(F, -1)
        Wm = W.reshape(F, -1)
        return np.sqrt(np.sum((D @ Sd) * D) / np.sum((Wm @ Sd) * Wm))

    plain = shared_separable(W, 2, 2, rank=3, n_filters=4, random_state=0)
    fit = shared_separable(W, 2, 2, rank=3, n_filters=4, random_state=0, data_cov=Sd)
    e = np.array(fit.meta["data_errors"])
    assert np.all(np.diff(e) <= 1e-12 * e[0])
    assert e[-1] == pytest.approx(data_err(fit), rel=1e-9)
    assert data_err(fit) < 0.8 * data_err(plain)
    assert fit.meta["data_metric"] is True and plain.meta["data_metric"] is False
    # the shared filters stay shared: unit norm, and fewer of them than components
    np.testing.assert_allclose(np.linalg.norm(fit.vertical, axis=1) * np.linalg.norm(fit.horizontal, axis=1), 1.0)
    assert fit.errors[-1] == pytest.approx(np.linalg.norm(W - _rebuild(fit)) / np.linalg.norm(W), rel=1e-9)
    with pytest.raises(ValueError, match=r"data_cov must have shape \(54, 54\)"):
        shared_separable(W, 2, 2, rank=3, n_filters=4, data_cov=np.eye(5))


def test_data_cov_is_checked_once(rng, monkeypatch):
    """shared_separable checks data_cov (an eigenvalue decomposition) once, not in each of its two stages."""
    from npconv.decompose import metrics
    checks = count_calls(monkeypatch, metrics, "_checked_eigh")
    W = rng.standard_normal((8, 6, 3, 3))
    P = rng.standard_normal((500, 54))
    shared_separable(W, 2, 2, rank=3, n_filters=4, random_state=0, data_cov=P.T @ P / 500)
    assert len(checks) == 1


def test_all_zero_block(rng):
    W = rng.standard_normal((8, 6, 3, 3))
    W[:, 4:] = 0.0                                   # dead input channels: an all-zero block per output group
    res = shared_separable(W, 3, 2, rank=2, n_filters=3, random_state=0)
    rebuilt = _rebuild(res)
    assert not np.any(rebuilt[:, 4:])
    np.testing.assert_allclose(res.to_tensor(), rebuilt, rtol=1e-10, atol=1e-12)
    assert res.errors[-1] == pytest.approx(np.linalg.norm(W - rebuilt) / np.linalg.norm(W), rel=1e-9)
    assert res.errors[-1] < 1.0
