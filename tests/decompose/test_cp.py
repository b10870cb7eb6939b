"""CP decomposition (greedy and ALS): exact recovery, monotone errors, determinism, validation."""
import numpy as np
import pytest

from npconv.decompose.cp import CPResult, cp_als, cp_greedy, cp_to_tensor, khatri_rao, max_cp_rank

DTYPES = [np.float32, np.float64]


def _outer_sum(weights, factors):
    """Independent rebuild: explicit sum of outer products."""
    shape = tuple(f.shape[0] for f in factors)
    out = np.zeros(shape)
    for r in range(weights.shape[0]):
        term = np.asarray(weights[r], np.float64)
        for f in factors:
            term = np.multiply.outer(term, f[:, r].astype(np.float64))
        out += term
    return out


def _random_cp(rng, shape, rank, orthogonal=False):
    if orthogonal:
        fac = [np.linalg.qr(rng.standard_normal((n, rank)))[0] for n in shape]
        w = np.linspace(5.0, 1.0, rank)
    else:
        fac = [rng.standard_normal((n, rank)) for n in shape]
        w = np.ones(rank)
    return _outer_sum(w, fac), w, fac


def _congruence(a, b):
    """|cosine| between matched columns after the best permutation (greedy matching, fine for small ranks)."""
    an = a / np.linalg.norm(a, axis=0)
    bn = b / np.linalg.norm(b, axis=0)
    c = np.abs(an.T @ bn)
    return c.max(axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 6, 5), (6, 5, 4, 3)])
def test_als_recovers_known_cp_rank(rng, dtype, shape):
    T, _, fac = _random_cp(rng, shape, 3)
    res = cp_als(T.astype(dtype), 3, n_iter=500, tol=0.0, random_state=0)
    assert isinstance(res, CPResult) and res.weights.dtype == dtype
    rebuilt = _outer_sum(res.weights, res.factors)
    rel = np.linalg.norm(rebuilt - T) / np.linalg.norm(T)
    assert rel < (1e-4 if dtype == np.float32 else 1e-8)
    assert res.errors[-1] == pytest.approx(rel, abs=1e-5 if dtype == np.float32 else 1e-9)
    for a_true, a_fit in zip(fac, res.factors):
        assert _congruence(a_true, a_fit.astype(np.float64)).min() > 0.999


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_recovers_orthogonal_tensor_exactly(rng, dtype):
    T, w, fac = _random_cp(rng, (8, 6, 5, 4), 4, orthogonal=True)
    res = cp_greedy(T.astype(dtype), 4, tol=1e-12, random_state=0)
    np.testing.assert_allclose(np.sort(res.weights)[::-1], w, rtol=1e-4 if dtype == np.float32 else 1e-9)
    rel = np.linalg.norm(_outer_sum(res.weights, res.factors) - T) / np.linalg.norm(T)
    assert rel < (1e-4 if dtype == np.float32 else 1e-9)
    for a_true, a_fit in zip(fac, res.factors):
        assert _congruence(a_true, a_fit.astype(np.float64)).min() > 0.9999


@pytest.mark.parametrize("fit", [cp_als, cp_greedy])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_errors_non_increasing_and_match_rebuild(rng, fit, init):
    T = rng.standard_normal((9, 7, 5))       # no low-rank structure: a long, slowly converging history
    res = fit(T, 6, n_iter=60, tol=0.0, init=init, random_state=3)
    e = np.asarray(res.errors)
    assert e.size >= 2
    assert np.all(np.diff(e) <= 0.0), e
    rel = np.linalg.norm(_outer_sum(res.weights, res.factors) - T) / np.linalg.norm(T)
    assert e[-1] == pytest.approx(rel, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("fit", [cp_als, cp_greedy])
def test_deterministic_for_a_random_state(rng, fit):
    T = rng.standard_normal((6, 5, 4, 3))
    a = fit(T, 4, n_iter=30, init="random", random_state=11)
    b = fit(T, 4, n_iter=30, init="random", random_state=11)
    np.testing.assert_array_equal(a.weights, b.weights)
    for fa, fb in zip(a.factors, b.factors):
        np.testing.assert_array_equal(fa, fb)
    assert a.errors == b.errors


def test_canonical_signs_and_order(rng):
    T = rng.standard_normal((6, 5, 4))
    res = cp_als(T, 3, n_iter=50, random_state=0)
    assert np.all(np.diff(res.weights) <= 0) and np.all(res.weights >= 0)
    for a in res.factors[:-1]:
        idx = np.argmax(np.abs(a), axis=0)
        assert np.all(a[idx, np.arange(a.shape[1])] > 0)
        np.testing.assert_allclose(np.linalg.norm(a, axis=0), 1.0, rtol=1e-10)


def test_result_unpacks_and_rebuilds(rng):
    T = rng.standard_normal((5, 4, 3)).astype(np.float32)
    res = cp_als(T, 2, random_state=0)
    weights, factors = res
    assert weights.shape == (2,) and [f.shape for f in factors] == [(5, 2), (4, 2), (3, 2)]
    assert res.to_tensor().shape == T.shape and res.to_tensor().dtype == np.float32
    np.testing.assert_allclose(res.to_tensor(), _outer_sum(weights, factors), rtol=1e-5, atol=1e-5)
    assert res.n_params() == 2 + 2 * (5 + 4 + 3)
    assert res.meta["method"] == "als" and res.meta["rank"] == 2


def test_callback_called_every_iteration(rng):
    seen = []
    res = cp_als(rng.standard_normal((5, 4, 3)), 2, n_iter=15, tol=0.0, callback=seen.append, random_state=0)
    assert [d["iteration"] for d in seen] == list(range(1, len(res.errors) + 1))
    assert [d["error"] for d in seen] == list(res.errors)
    comp = []
    cp_greedy(rng.standard_normal((5, 4, 3)), 3, callback=comp.append, random_state=0)
    assert [d["component"] for d in comp] == [0, 1, 2]


def test_non_contiguous_input_gives_the_same_fit(rng):
    base = rng.standard_normal((8, 5, 6))
    view = base.transpose(2, 0, 1)[:, ::2]          # non-contiguous
    assert not view.flags.c_contiguous
    a = cp_als(view, 3, n_iter=40, random_state=2)
    b = cp_als(np.ascontiguousarray(view), 3, n_iter=40, random_state=2)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-12)


def test_full_rank_bound_is_exact(rng):
    T = rng.standard_normal((2, 3, 4))
    assert max_cp_rank(T.shape) == 6
    res = cp_greedy(T, 6, random_state=0)   # greedy peeling down to a zero residual is not guaranteed ...
    assert res.errors[-1] < res.errors[0]  # ... but it only ever lowers the error
    res = cp_als(T, 6, n_iter=2000, tol=0.0, random_state=0)
    assert res.errors[-1] < 1e-3


def test_khatri_rao_and_rebuild_helpers(rng):
    a, b, c = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    kr = khatri_rao([a, b, c])
    ref = np.einsum("ir,jr,kr->ijkr", a, b, c).reshape(-1, 2)
    np.testing.assert_allclose(kr, ref)
    w = np.array([2.0, -1.0])
    np.testing.assert_allclose(cp_to_tensor(w, [a, b, c]), _outer_sum(w, [a, b, c]))


@pytest.mark.parametrize("fit", [cp_als, cp_greedy])
def test_validation(fit, rng):
    T = rng.standard_normal((4, 3, 2))
    with pytest.raises(ValueError, match="rank"):
        fit(T, 0)
    with pytest.raises(TypeError, match="rank"):
        fit(T, 1.5)
    with pytest.raises(TypeError, match="rank"):
        fit(T, True)
    with pytest.raises(ValueError, match="rank must be <= 6"):
        fit(T, 7)
    with pytest.raises(ValueError, match="all zeros"):
        fit(np.zeros((3, 3, 3)), 1)
    bad = T.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit(bad, 1)
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        fit(bad, 1)
    with pytest.raises(ValueError, match="init"):
        fit(T, 2, init="hosvd")
    with pytest.raises(TypeError, match="init"):
        fit(T, 2, init=3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fit(np.ones(5), 1)
    with pytest.raises(TypeError, match="dtype"):
        fit(np.ones((3, 3), np.int64), 1)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fit([[1.0, 2.0], [3.0, 4.0]], 1)
    with pytest.raises(ValueError, match="n_iter"):
        fit(T, 2, n_iter=0)
    with pytest.raises(ValueError, match="tol"):
        fit(T, 2, tol=-1.0)
    with pytest.raises(TypeError, match="callback"):
        fit(T, 2, callback=5)
    with pytest.raises(TypeError, match="random_state"):
        fit(T, 2, init="random", random_state="seed")


def test_result_validates_its_factors(rng):
    w = np.ones(2)
    with pytest.raises(ValueError, match=r"factor_matrices\[1\]"):
        CPResult(w, (np.ones((3, 2)), np.ones((4, 3))))
    with pytest.raises(TypeError, match="factor_matrices"):
        CPResult(w, np.ones((3, 2)))
    with pytest.raises(TypeError, match="dtype"):
        CPResult(w, (np.ones((3, 2), np.float32), np.ones((4, 2))))
