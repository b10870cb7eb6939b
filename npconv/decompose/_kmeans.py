"""k-means (k-means++ seeding + Lloyd iterations), optionally with exactly balanced clusters.

Used by the monochromatic approximation (clustering the filters' colour vectors) and by biclustering
(clustering input and output channels). The data are small (tens to hundreds of points), so this is plain
NumPy; determinism comes from ``random_state``.

With ``equal_size=True`` every cluster gets ``n // k`` or ``n // k + 1`` points (exactly ``n / k`` when ``k``
divides ``n``). The assignment step is then a minimum-cost assignment of points to cluster *slots*
(``scipy.optimize.linear_sum_assignment``): each centre offers ``n // k`` mandatory slots and one optional slot;
mandatory slots carry a large negative offset so that every one of them is filled, and the ``n % k`` leftover
points take the cheapest optional slots.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.optimize import linear_sum_assignment

from .._validate import check_int
from ._result import Decomposition, check_factor, check_random_state, result_class

__all__ = ["kmeans", "KMeansResult"]


@result_class
class KMeansResult(Decomposition):
    """k-means result: ``centers, labels = kmeans(X, k)``.

    ``centers`` (k, d), ``labels`` (n,) int64 in ``[0, k)``; ``errors`` is the inertia (sum of squared
    distances to the assigned centre) per Lloyd iteration of the best restart; ``to_tensor()`` returns
    ``centers[labels]``, the quantised data. ``meta``: ``inertia``, ``n_iter``, ``equal_size``, ``n_init``.
    """
    FACTORS: ClassVar[tuple] = ("centers", "labels")
    centers: np.ndarray
    labels: np.ndarray

    def _validate(self):
        c = check_factor(self.centers, "centers", ndim=2)
        lab = check_factor(self.labels, "labels", ndim=1, integer=True)
        if lab.size and (lab.min() < 0 or lab.max() >= c.shape[0]):
            raise ValueError(f"labels must lie in [0, {c.shape[0]}), got values in [{lab.min()}, {lab.max()}]")

    @property
    def inertia(self) -> float:
        return float(self.meta["inertia"])

    def to_tensor(self):
        return self.centers[self.labels]


def _sq_dists(X, C):
    """Squared Euclidean distances (n, k), clipped at 0 against round-off."""
    d = (X * X).sum(1)[:, None] - 2.0 * (X @ C.T) + (C * C).sum(1)[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _kmeanspp(X, k, rng):
    """k-means++ seeding: the first centre uniformly, each next one with probability proportional to D^2."""
    n = X.shape[0]
    idx = [int(rng.integers(n))]
    d2 = _sq_dists(X, X[idx])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0.0:  # all remaining points coincide with chosen centres: pick any unchosen point
            rest = np.setdiff1d(np.arange(n), idx)
            j = int(rng.choice(rest))
        else:
            j = int(rng.choice(n, p=d2 / total))
        idx.append(j)
        np.minimum(d2, _sq_dists(X, X[j:j + 1])[:, 0], out=d2)
    return X[idx].copy()


def _assign_balanced(D, k):
    """Labels minimising the total cost ``D[i, label_i]`` with cluster sizes in {n // k, n // k + 1}."""
    n = D.shape[0]
    q, r = divmod(n, k)
    cols = [D] * q
    big = 0.0
    if r:
        # offset so that any mandatory slot beats any optional one: larger than the whole cost range
        big = float(D.max() - D.min()) * n + 1.0
        cols = [D - big] * q + [D]
    cost = np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
    rows, slot = linear_sum_assignment(cost)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = slot % k
    return labels


def _assign_nonempty(D, k):
    """Nearest-centre labels, then every empty cluster takes one point: the cheapest move (least increase of
    ``D[i, label_i]``) out of a cluster of >= 2 points, first index on ties. Points tied between centres (duplicate
    points, coinciding centres) are thus split, so with n >= k points no cluster is left empty."""
    labels = np.argmin(D, axis=1)
    counts = np.bincount(labels, minlength=k)
    rows = np.arange(D.shape[0])
    for e in np.flatnonzero(counts == 0):
        increase = D[:, e] - D[rows, labels]
        increase[counts[labels] < 2] = np.inf       # never empty another cluster
        j = int(np.argmin(increase))
        counts[labels[j]] -= 1
        counts[e] += 1
        labels[j] = e
    return labels


def _lloyd(X, centers, equal_size, max_iter, tol, report):
    k = centers.shape[0]
    history = []
    labels = None
    for it in range(max_iter):
        D = _sq_dists(X, centers)
        new = _assign_balanced(D, k) if equal_size else _assign_nonempty(D, k)
        inertia = float(D[np.arange(X.shape[0]), new].sum())
        history.append(inertia)
        report(it, inertia)
        converged = labels is not None and np.array_equal(new, labels)
        labels = new
        if converged:
            break
        # update step (no cluster is empty: both assignments fill every cluster when n >= k)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, X)
        new_centers = sums / counts[:, None]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if shift <= tol * max(float((X * X).sum()), 1e-300):
            # centres stopped moving: one last assignment against the final centres
            D = _sq_dists(X, centers)
            labels = _assign_balanced(D, k) if equal_size else _assign_nonempty(D, k)
            history.append(float(D[np.arange(X.shape[0]), labels].sum()))
            break
    return centers, labels, history, it + 1


def kmeans(X, k, *, equal_size=False, n_init=10, max_iter=100, tol=1e-10, random_state=None, callback=None):
    """Cluster the rows of ``X`` into ``k`` clusters.

    Parameters
    ----------
    X : ndarray (n, d), float32 or float64, finite
    k : int, 1 <= k <= n
    equal_size : bool
        Balance the clusters exactly (sizes ``n // k`` or ``n // k + 1``) with a capacity-constrained
        assignment step.
    n_init : int >= 1
        Restarts from independent k-means++ seeds; the one with the lowest final inertia is kept.
    max_iter : int >= 1
        Lloyd iterations per restart.
    tol : float >= 0
        Stop when the squared centre shift is below ``tol * ||X||_F^2`` (or when labels stop changing).
    random_state : None, int, SeedSequence or numpy.random.Generator
    callback : callable or None
        Called after every assignment step as ``callback({"restart": r, "iteration": i, "inertia": v})``.

    Returns
    -------
    KMeansResult
        ``centers`` (k, d) in X's dtype and ``labels`` (n,) int64. Every cluster has at least one point, also
        with fewer distinct points than ``k`` (tied points are split between clusters). Cluster ids are
        renumbered by first occurrence in ``labels`` so that results are canonical.
    """
    if not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a numpy.ndarray, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_points, n_features), got shape {X.shape}")
    check_factor(X, "X", ndim=2)
    n = X.shape[0]
    k = check_int(k, "k", min_value=1)
    if n == 0:
        raise ValueError("X must have at least one row")
    if k > n:
        raise ValueError(f"k must be <= the number of points ({n}), got {k}")
    n_init = check_int(n_init, "n_init", min_value=1)
    max_iter = check_int(max_iter, "max_iter", min_value=1)
    if not isinstance(equal_size, (bool, np.bool_)):
        raise TypeError(f"equal_size must be a bool, got {type(equal_size).__name__}")
    tol = float(tol)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rng = check_random_state(random_state)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")

    Xd = np.asarray(X, dtype=np.float64)
    best = None
    for restart in range(n_init):
        def report(it, inertia, _r=restart):
            if callback is not None:
                callback({"restart": _r, "iteration": it, "inertia": inertia})
        c0 = _kmeanspp(Xd, k, rng)
        centers, labels, hist, n_iter = _lloyd(Xd, c0, bool(equal_size), max_iter, tol, report)
        if best is None or hist[-1] < best[2][-1] - 1e-12 * abs(best[2][-1]):
            best = (centers, labels, hist, n_iter)
    centers, labels, hist, n_iter = best
    # canonical numbering: clusters in order of first appearance (unused ids, if any, last)
    order = list(dict.fromkeys(labels.tolist()))
    order += [c for c in range(k) if c not in set(order)]
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return KMeansResult(centers[order].astype(X.dtype), remap[labels], errors=hist,
                        meta={"inertia": hist[-1], "n_iter": n_iter, "equal_size": bool(equal_size),
                              "n_init": n_init, "k": k})
