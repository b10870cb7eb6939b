"""k-means (plain and exactly balanced), the shared result base, svd_flip and check_random_state."""
import dataclasses
import itertools
import pickle

import numpy as np
import pytest

from npconv.decompose._kmeans import KMeansResult, _assign_balanced, kmeans
from npconv.decompose._result import Decomposition, check_random_state, svd_flip


def _blobs(rng, sizes, d=3, spread=0.05, sep=4.0):
    centres = rng.standard_normal((len(sizes), d)) * sep
    X = np.concatenate([c + spread * rng.standard_normal((s, d)) for c, s in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(X.shape[0])
    return X[perm], truth[perm]


def _same_partition(a, b):
    """Labelings equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("equal_size", [False, True])
def test_recovers_separated_blobs(rng, dtype, equal_size):
    X, truth = _blobs(rng, [10, 10, 10, 10])
    res = kmeans(X.astype(dtype), 4, equal_size=equal_size, random_state=0)
    assert isinstance(res, KMeansResult)
    assert res.centers.dtype == dtype and res.centers.shape == (4, 3)
    assert res.labels.dtype == np.int64 and res.labels.shape == (40,)
    assert _same_partition(res.labels, truth)
    # centres are the cluster means
    for c in range(4):
        np.testing.assert_allclose(res.centers[c], X[res.labels == c].mean(0), rtol=1e-5, atol=1e-5)
    centers, labels = res                           # unpacks into its factors
    np.testing.assert_array_equal(res.to_tensor(), centers[labels])


def test_unequal_blobs_plain(rng):
    X, truth = _blobs(rng, [3, 9, 20])
    res = kmeans(X, 3, random_state=1)
    assert _same_partition(res.labels, truth)
    assert sorted(np.bincount(res.labels).tolist()) == [3, 9, 20]


@pytest.mark.parametrize("n,k", [(96, 6), (97, 6), (10, 3), (7, 7), (5, 1)])
def test_equal_size_counts(rng, n, k):
    X = rng.standard_normal((n, 4))
    res = kmeans(X, k, equal_size=True, random_state=3, n_init=2)
    counts = np.bincount(res.labels, minlength=k)
    assert counts.sum() == n
    assert set(counts.tolist()) <= {n // k, -(-n // k)}


def _brute_balanced_cost(D, k):
    """Minimum of sum D[i, label_i] over labelings with cluster sizes in {n//k, ceil(n/k)} (exhaustive)."""
    n = D.shape[0]
    lo, hi = n // k, -(-n // k)
    best = np.inf
    for lab in itertools.product(range(k), repeat=n):
        cnt = np.bincount(lab, minlength=k)
        if cnt.min() >= lo and cnt.max() <= hi:
            best = min(best, sum(D[i, lab[i]] for i in range(n)))
    return best


@pytest.mark.parametrize("n,k", [(5, 2), (6, 3), (7, 3)])
def test_balanced_assignment_is_optimal(rng, n, k):
    D = rng.random((n, k))
    lab = _assign_balanced(D, k)
    cnt = np.bincount(lab, minlength=k)
    assert cnt.min() >= n // k and cnt.max() <= -(-n // k)
    assert D[np.arange(n), lab].sum() == pytest.approx(_brute_balanced_cost(D, k), abs=1e-12)


def test_balanced_kmeans_global_optimum_tiny(rng):
    X = rng.standard_normal((6, 2))
    res = kmeans(X, 2, equal_size=True, n_init=20, random_state=0)
    best = np.inf
    for comb in itertools.combinations(range(6), 3):
        a = list(comb)
        b = [i for i in range(6) if i not in comb]
        cost = ((X[a] - X[a].mean(0)) ** 2).sum() + ((X[b] - X[b].mean(0)) ** 2).sum()
        best = min(best, cost)
    got = sum(((X[res.labels == c] - X[res.labels == c].mean(0)) ** 2).sum() for c in range(2))
    assert got == pytest.approx(best, rel=1e-10)
    assert res.inertia == pytest.approx(best, rel=1e-10)


def test_deterministic_and_history(rng):
    X = rng.standard_normal((50, 3))
    seen = []
    r1 = kmeans(X, 5, random_state=7, callback=seen.append)
    r2 = kmeans(X, 5, random_state=7)
    np.testing.assert_array_equal(r1.labels, r2.labels)
    np.testing.assert_array_equal(r1.centers, r2.centers)
    assert seen and {"restart", "iteration", "inertia"} <= set(seen[0])
    assert len(r1.errors) >= 1
    # inertia never increases within the kept restart
    assert all(b <= a + 1e-9 for a, b in zip(r1.errors, r1.errors[1:]))
    # canonical numbering: first appearance order
    first = [r1.labels.tolist().index(c) for c in range(5)]
    assert first == sorted(first)


@pytest.mark.parametrize("X,k", [
    (np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), 4),  # 3 distinct < k
    (np.ones((5, 3)), 5),                                                                  # all points tied
    (np.repeat(np.eye(2), 4, axis=0), 3),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_kmeans_never_leaves_a_cluster_empty(X, k, seed):
    """With fewer distinct points than clusters, tied points are split: every cluster keeps a point."""
    res = kmeans(X, k, random_state=seed, n_init=3)
    assert np.bincount(res.labels, minlength=k).min() >= 1
    for c in range(k):                               # centres are the means of their (non-empty) clusters
        np.testing.assert_allclose(res.centers[c], X[res.labels == c].mean(0), atol=1e-12)
    assert res.inertia == pytest.approx(float(((X - res.centers[res.labels]) ** 2).sum()), abs=1e-12)
    again = kmeans(X, k, random_state=seed, n_init=3)
    np.testing.assert_array_equal(res.labels, again.labels)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(k=0), ValueError), (dict(k=11), ValueError), (dict(k=2.0), TypeError),
    (dict(k=2, n_init=0), ValueError), (dict(k=2, equal_size=1), TypeError),
    (dict(k=2, random_state="x"), TypeError), (dict(k=2, callback=3), TypeError),
])
def test_bad_arguments(rng, kwargs, exc):
    with pytest.raises(exc):
        kmeans(rng.standard_normal((10, 2)), **kwargs)


def test_bad_data():
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.zeros(5), 2)
    with pytest.raises(ValueError, match="non-finite"):
        kmeans(np.array([[0.0], [np.nan], [1.0]]), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        kmeans(np.zeros((4, 2), np.int64), 2)


# --- the shared result base ----------------------------------------------------------------------------------
def test_result_base_is_frozen_and_validated():
    r = KMeansResult(np.zeros((2, 3)), np.array([0, 1, 1]), errors=[3, 2.5], meta={"k": 2})
    assert len(r) == 2 and r.errors == (3.0, 2.5) and r.error == 2.5
    assert r.n_params() == 6 + 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.centers = np.ones((2, 3))
    with pytest.raises(TypeError):
        r.meta["k"] = 3                               # read-only mapping
    with pytest.raises(ValueError, match="labels must lie"):
        KMeansResult(np.zeros((2, 3)), np.array([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        KMeansResult(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        KMeansResult(np.full((2, 3), np.inf), np.array([0, 1]))
    with pytest.raises(NotImplementedError):
        Decomposition().to_tensor()
    assert "KMeansResult(centers=<float64 (2, 3)>" in repr(r)


def test_result_pickles_with_read_only_meta():
    r = KMeansResult(np.arange(6.0).reshape(2, 3), np.array([0, 1, 1]), errors=[3, 2.5], meta={"k": 2, "t": (1, 2)})
    back = pickle.loads(pickle.dumps(r))
    assert type(back) is KMeansResult and back.errors == (3.0, 2.5)
    assert dict(back.meta) == {"k": 2, "t": (1, 2)}
    with pytest.raises(TypeError):
        back.meta["k"] = 3                            # still read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.centers = np.ones((2, 3))
    np.testing.assert_array_equal(back.centers, r.centers)
    np.testing.assert_array_equal(back.labels, r.labels)
    assert "KMeansResult(centers=<float64 (2, 3)>" in repr(back)


def test_svd_flip(rng):
    A = rng.standard_normal((7, 5))
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    U2, Vt2 = svd_flip(-U, -Vt)
    np.testing.assert_allclose((U2 * s) @ Vt2, A, atol=1e-12)
    for k in range(5):
        assert U2[np.argmax(np.abs(U2[:, k])), k] > 0
    U3, Vt3 = svd_flip(U, Vt)
    np.testing.assert_array_equal(U2, U3)            # same result whatever the input signs
    np.testing.assert_array_equal(Vt2, Vt3)
    with pytest.raises(ValueError):
        svd_flip(U, Vt[:, :3].T)


def test_check_random_state():
    g = np.random.default_rng(1)
    assert check_random_state(g) is g
    a = check_random_state(5).random(3)
    b = check_random_state(5).random(3)
    np.testing.assert_array_equal(a, b)
    assert isinstance(check_random_state(None), np.random.Generator)
    assert isinstance(check_random_state(np.random.SeedSequence(3)), np.random.Generator)
    with pytest.raises(ValueError):
        check_random_state(-1)
    with pytest.raises(TypeError):
        check_random_state(1.5)
    with pytest.raises(TypeError):
        check_random_state(True)
