"""Biclustered approximations refitted in the data metric (``bicluster(..., data_cov=S)``).

References independent of the refit: the closed-form data-metric optimum of a rank-K matrix approximation
(Eckart-Young on ``W L``, ``L L^T = S``), reached by the SVD form when its reduction keeps every input channel;
the data error ``tr(D S D^T)`` evaluated here from the rebuilt kernel; the Frobenius error of the weight fit,
which the data metric equals when ``S = I``; and the output error of the layers on the inputs themselves.
"""
import numpy as np
import pytest

from npconv.decompose.bicluster import bicluster
from npconv.decompose.metrics import patch_covariance

FORMS = [("svd", dict(ranks=(2, 3))), ("cp", dict(rank=3))]


def _cov(rng, D, n=3000, decay=4.0, rank=None):
    """Second moment of correlated, anisotropic samples (optionally confined to ``rank`` dimensions)."""
    r = D if rank is None else rank
    A = rng.standard_normal((D, r)) * np.exp(-np.arange(r) / (D / decay))[None, :]
    X = rng.standard_normal((n, r)) @ A.T
    return X.T @ X / n


def _data_error(W, Wt, S):
    F = W.shape[0]
    D = (W - Wt).reshape(F, -1).astype(np.float64)
    Wm = W.reshape(F, -1).astype(np.float64)
    return float(np.sqrt(np.sum((D @ S) * D) / np.sum((Wm @ S) * Wm)))


def _eckart_young_data(W, t, S):
    """The closed-form optimum of min ||(W - A) L||_F over rank-t A (L L^T = S), as a relative data error."""
    F = W.shape[0]
    Wm = W.reshape(F, -1)
    ev, Q = np.linalg.eigh(S)
    L = Q * np.sqrt(np.clip(ev, 0, None))
    U = np.linalg.svd(Wm @ L, full_matrices=False)[0][:, :t]
    return _data_error(W, (U @ (U.T @ Wm)).reshape(W.shape), S)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_svd_form_with_every_input_channel_reaches_the_closed_form_optimum(rng, dtype):
    F, C, X, Y = 12, 4, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    S = _cov(rng, C * X * Y)
    res = bicluster(W.astype(dtype), 1, 1, method="svd", ranks=(C, 5), data_cov=S, data_iter=300, tol=0.0)
    best = _eckart_young_data(W, 5, S)
    got = _data_error(W, res.to_tensor().astype(np.float64), S)
    assert got == pytest.approx(best, rel=1e-5 if dtype == np.float32 else 1e-9)
    assert res.meta["data_errors"][0] > 1.2 * best      # the weight fit was far from it
    assert res.meta["data_metric"] is True and res.reduce.dtype == dtype


@pytest.mark.parametrize("method,kw", FORMS)
def test_data_errors_are_non_increasing_and_are_the_rebuilt_kernels(rng, method, kw):
    F, C, X, Y = 10, 6, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    S = _cov(rng, C * X * Y)
    weights = bicluster(W, 2, 2, method=method, random_state=1, **kw)
    res = bicluster(W, 2, 2, method=method, random_state=1, data_cov=S, data_iter=30, **kw)
    e = np.array(res.meta["data_errors"])
    assert len(e) >= 2 and np.all(np.diff(e) <= 1e-12 * e[0])
    # the first entry is the weight fit's data error, the last the returned factors'
    assert e[0] == pytest.approx(_data_error(W, weights.to_tensor(), S), rel=1e-10)
    assert e[-1] == pytest.approx(_data_error(W, res.to_tensor(), S), rel=1e-10)
    assert e[-1] < 0.7 * e[0]
    # same groups as the weight fit; errors/block_errors describe the refitted kernel in the Frobenius norm
    np.testing.assert_array_equal(res.in_perm, weights.in_perm)
    np.testing.assert_array_equal(res.out_perm, weights.out_perm)
    rel = np.linalg.norm(W - res.to_tensor()) / np.linalg.norm(W)
    assert res.errors[0] == pytest.approx(rel, rel=1e-10)


@pytest.mark.parametrize("method,kw", FORMS)
def test_identity_covariance_is_the_frobenius_metric(rng, method, kw):
    F, C, X, Y = 8, 4, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    weights = bicluster(W, 2, 2, method=method, random_state=0, **kw)
    res = bicluster(W, 2, 2, method=method, random_state=0, data_cov=np.eye(C * X * Y), **kw)
    assert res.meta["data_errors"][0] == pytest.approx(weights.errors[0], rel=1e-10)
    assert res.errors[0] == pytest.approx(res.meta["data_errors"][-1], rel=1e-10)
    assert res.errors[0] <= weights.errors[0] * (1 + 1e-12)


@pytest.mark.parametrize("method,kw", [("svd", dict(ranks=(2, 2))), ("cp", dict(rank=2))])
def test_exact_bicluster_structure_stays_exact(rng, method, kw):
    from tests.decompose.test_bicluster import _synthetic
    K = kw.get("rank") or kw["ranks"]
    W, _, _ = _synthetic(rng, 10, 8, 3, 3, 2, 2, method, K)
    S = _cov(rng, 8 * 9)
    res = bicluster(W, 2, 2, method=method, n_iter=2000, tol=0.0, random_state=0, data_cov=S, **kw)
    assert res.meta["data_errors"][-1] < 1e-6
    assert _data_error(W, res.to_tensor(), S) < 1e-6


@pytest.mark.parametrize("method,kw", FORMS)
def test_singular_covariance(rng, method, kw):
    """Inputs confined to a subspace: a singular S needs no regularisation and gives finite factors."""
    F, C, X, Y = 8, 4, 3, 3
    W = rng.standard_normal((F, C, X, Y))
    S = _cov(rng, C * X * Y, rank=10)
    res = bicluster(W, 2, 2, method=method, random_state=0, data_cov=S, **kw)
    assert all(np.isfinite(f).all() for f in res)
    e = np.array(res.meta["data_errors"])
    assert np.all(np.diff(e) <= 1e-12 * e[0]) and e[-1] < e[0]


@pytest.mark.parametrize("method,kw", FORMS)
def test_the_layer_output_error_falls_on_the_data_itself(rng, method, kw):
    """Real inputs: patch covariance of a batch, output error of the built layers on that batch."""
    from npconv.layers import Conv2d
    F, C = 10, 6
    W = rng.standard_normal((F, C, 3, 3))
    # images with strong channel correlation and smooth spatial structure
    base = rng.standard_normal((40, 2, 10, 10))
    x = np.einsum("nkhw,kc->nchw", base, rng.standard_normal((2, C))) + 0.05 * rng.standard_normal((40, C, 10, 10))
    S = patch_covariance(x, 3, padding=1)
    exact = Conv2d(W, padding=1)
    ref = exact(x)
    errs = {}
    for name, cov in (("weights", None), ("data", S)):
        res = bicluster(W, 2, 2, method=method, random_state=0, data_cov=cov, **kw)
        y = res.to_layer(padding=1)(x)
        errs[name] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert errs["data"] < 0.6 * errs["weights"]
    # the reported data error is that output error (second moment over every patch of the batch)
    res = bicluster(W, 2, 2, method=method, random_state=0, data_cov=S, **kw)
    assert res.meta["data_errors"][-1] == pytest.approx(errs["data"], rel=1e-8)


def test_deterministic_and_callback(rng):
    W = rng.standard_normal((8, 4, 3, 3))
    S = _cov(rng, 36)
    seen = []
    a = bicluster(W, 2, 2, method="cp", rank=2, random_state=5, data_cov=S, callback=seen.append)
    b = bicluster(W, 2, 2, method="cp", rank=2, random_state=5, data_cov=S)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)
    sweeps = [d for d in seen if d["stage"] == "data_fit"]
    assert [d["sweep"] for d in sweeps] == list(range(1, len(sweeps) + 1))
    assert [d["error"] for d in sweeps] == list(a.meta["data_errors"][1:])


def test_validation(rng):
    W = rng.standard_normal((8, 4, 3, 3))
    with pytest.raises(ValueError, match=r"data_cov must have shape \(36, 36\), got \(35, 35\)"):
        bicluster(W, 2, 2, method="cp", rank=2, data_cov=np.eye(35))
    with pytest.raises(ValueError, match="data_cov must be symmetric"):
        bicluster(W, 2, 2, method="cp", rank=2, data_cov=np.triu(np.ones((36, 36))))
    with pytest.raises(ValueError, match="data_cov must be positive semi-definite"):
        bicluster(W, 2, 2, method="cp", rank=2, data_cov=-np.eye(36))
    with pytest.raises(TypeError, match="data_cov must be a numpy.ndarray, got list"):
        bicluster(W, 2, 2, method="cp", rank=2, data_cov=np.eye(36).tolist())
    with pytest.raises(ValueError, match="data_iter must be >= 1, got 0"):
        bicluster(W, 2, 2, method="cp", rank=2, data_cov=np.eye(36), data_iter=0)
    with pytest.raises(ValueError, match="data_cov gives the layer's output zero energy"):
        S = np.zeros((36, 36))
        S[0, 0] = 1.0
        W0 = W.copy()
        W0[:, 0, 0, 0] = 0.0
        bicluster(W0, 2, 2, method="cp", rank=2, data_cov=S)

