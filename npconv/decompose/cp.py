"""CP (canonical polyadic / PARAFAC) decomposition of N-way tensors (paper section 4.2).

A rank-``R`` CP model of an N-way tensor ``T`` (shape ``(I_0, ..., I_{N-1})``) is

    T ~= sum_r  weights[r] * A_0[:, r] o A_1[:, r] o ... o A_{N-1}[:, r]

with unit-norm factor columns. Two fits are offered:

* :func:`cp_greedy` -- the paper's algorithm: find the best rank-1 term of the residual by alternating least
  squares over one factor at a time (the higher-order power method), subtract it, repeat ``rank`` times.
* :func:`cp_als` -- joint CP-ALS: each factor in turn is the least-squares solution with the others fixed,
  ``A_n = T_(n) KR_n (V_n)^-1`` where ``KR_n`` is the Khatri-Rao product of the other factors and ``V_n`` the
  Hadamard product of their Gram matrices; columns are then normalised into ``weights``.

Both compute in float64 and return factors in the input's dtype. ``errors`` is the relative Frobenius error
``||T - T~|| / ||T||``: per sweep for ALS, per added component for greedy. Both histories are non-increasing:
each step is an exact least-squares minimisation, and a step that rounding would make worse is not taken (ALS
stops and keeps the previous iterate; greedy gives that component weight 0). Results are deterministic for a
given ``random_state``: components are sorted by decreasing weight (ALS) and the signs are fixed so that the
largest-magnitude entry of every column of ``A_0 ... A_{N-2}`` is positive (weights stay >= 0, the last factor
absorbs the sign).
"""
from __future__ import annotations

import math
import time
from typing import ClassVar

import numpy as np

from .._validate import check_int, check_option, check_real
from ._result import Decomposition, check_factor, check_random_state, check_tensor, result_class

__all__ = ["CPResult", "cp_als", "cp_greedy", "cp_to_tensor", "khatri_rao", "max_cp_rank"]

_INITS = ("svd", "random")


# --------------------------------------------------------------------------------------------------------------
# result type
# --------------------------------------------------------------------------------------------------------------
@result_class
class CPResult(Decomposition):
    """A CP model: ``weights, factors = cp_als(T, R)``.

    ``weights`` (R,) >= 0; ``factor_matrices`` is a tuple of N arrays (I_n, R) with unit-norm columns (the
    ``factors`` property returns the same tuple). Unpacking yields ``(weights, factors)``. ``to_tensor()``
    rebuilds the N-way tensor. ``meta``: ``shape``, ``rank``, ``method`` ("als" or "greedy"), ``n_iter``,
    ``init``, ``converged``, ``time_s``.
    """
    FACTORS: ClassVar[tuple] = ("weights", "factor_matrices")
    weights: np.ndarray
    factor_matrices: tuple

    def _validate(self):
        w = check_factor(self.weights, "weights", ndim=1)
        if not isinstance(self.factor_matrices, (tuple, list)) or len(self.factor_matrices) < 2:
            raise TypeError("factor_matrices must be a tuple of at least two (I_n, rank) arrays, got "
                            f"{type(self.factor_matrices).__name__}")
        mats = tuple(self.factor_matrices)
        for n, a in enumerate(mats):
            check_factor(a, f"factor_matrices[{n}]", ndim=2, shape=(None, w.shape[0]), dtype=w.dtype)
        object.__setattr__(self, "factor_matrices", mats)

    @property
    def factors(self) -> tuple:
        """The factor matrices ``(A_0, ..., A_{N-1})``, each (I_n, rank)."""
        return self.factor_matrices

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple:
        return tuple(a.shape[0] for a in self.factor_matrices)

    def __iter__(self):
        return iter((self.weights, self.factor_matrices))

    def __len__(self):
        return 2

    def n_params(self) -> int:
        return int(self.weights.size + sum(a.size for a in self.factor_matrices))

    def to_tensor(self):
        return cp_to_tensor(self.weights, self.factor_matrices)

    def __repr__(self):
        err = f", error={self.errors[-1]:.4g}" if self.errors else ""
        return f"CPResult(shape={self.shape}, rank={self.rank}, dtype={self.weights.dtype}{err})"


# --------------------------------------------------------------------------------------------------------------
# small linear-algebra helpers
# --------------------------------------------------------------------------------------------------------------
def khatri_rao(mats):
    """Column-wise Kronecker product of ``mats`` (each (I_m, R)), the last matrix varying fastest.

    Row ``(i_0, ..., i_k)`` (C order) of the result is ``prod_m mats[m][i_m, :]``, so that for the C-order
    unfolding ``T_(n) = moveaxis(T, n, 0).reshape(I_n, -1)`` one has ``T_(n) = A_n diag(w) khatri_rao(others).T``.
    """
    mats = list(mats)
    if not mats:
        raise ValueError("mats must hold at least one matrix")
    R = mats[0].shape[1]
    out = mats[0]
    for m in mats[1:]:
        if m.shape[1] != R:
            raise ValueError(f"all matrices must have {R} columns, got {m.shape[1]}")
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, R)
    return out


def cp_to_tensor(weights, factors):
    """Rebuild ``sum_r weights[r] * factors[0][:, r] o ... o factors[-1][:, r]`` (in the factors' dtype)."""
    factors = list(factors)
    shape = tuple(a.shape[0] for a in factors)
    first = factors[0] * weights[None, :]
    rest = khatri_rao(factors[1:])
    return (first @ rest.T).reshape(shape)


def max_cp_rank(shape) -> int:
    """The generic upper bound of the CP rank: ``min_n prod_{m != n} I_m`` (a rank-R fit with R at this bound
    is exact, so larger ranks are refused)."""
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    return min(total // s for s in shape)


def _unfold(T, n):
    """C-order mode-n unfolding (I_n, prod of the other sizes), columns in :func:`khatri_rao` order."""
    return np.ascontiguousarray(np.moveaxis(T, n, 0).reshape(T.shape[n], -1))


def _split_point(shape):
    """Head/tail split ``s`` (1 <= s < N) of the dimension tree: the one with the least side work
    (``prod(head) + prod(tail)``: the Khatri-Rao products and the partial contractions scale with it)."""
    N = len(shape)
    best = min(range(1, N), key=lambda s: (math.prod(shape[:s]) + math.prod(shape[s:]), s))
    return best


def _contract_partial(P, local, j):
    """Mode-``j`` MTTKRP of the partial tensor ``P`` (shape ``(J_0, ..., J_{k-1}, R)``) with the factors
    ``local`` (each (J_m, R)), skipping ``local[j]``:
    ``M[i, r] = sum P[..., i, ..., r] prod_{m != j} local[m][i_m, r]``."""
    k = P.ndim - 1
    if k == 1:
        return P
    R = P.shape[-1]
    others = [local[m] for m in range(k) if m != j]
    Pj = np.moveaxis(P, j, 0).reshape(P.shape[j], -1, R)
    return np.einsum("irk,rk->ik", Pj, khatri_rao(others))


def _mode_gram(Td, n):
    """``T_(n) T_(n)^T`` (I_n, I_n) without forming the unfolding."""
    axes = [m for m in range(Td.ndim) if m != n]
    return np.tensordot(Td, Td, axes=(axes, axes))


def _solve_gram(V, M):
    """``M @ inv(V)`` for a symmetric positive semi-definite ``V`` (R, R); pseudo-inverse if singular.

    NumPy's LAPACK (the BLAS the rest of npconv uses): SciPy's separately bundled OpenBLAS, when threaded,
    was measured to take milliseconds for these tiny systems on a busy machine.
    """
    try:
        X = np.linalg.solve(V, M.T).T
        if np.isfinite(X).all():
            return X
    except np.linalg.LinAlgError:
        pass
    return M @ np.linalg.pinv(V, hermitian=True)


def _leading_left_vector(Td, n, rng):
    """Unit leading left singular vector of the mode-n unfolding of ``Td``.

    Exact (Gram matrix + eigh) when ``I_n <= 64``; otherwise a power iteration on ``T_(n) T_(n)^T`` started
    from the largest-norm column of the unfolding.
    """
    m = Td.shape[n]
    if m <= 64:
        G = _mode_gram(Td, n)
        u = np.linalg.eigh(G)[1][:, -1]
    else:
        M = _unfold(Td, n)
        col = int(np.argmax((M * M).sum(0)))
        u = M[:, col].copy()
        nrm = np.linalg.norm(u)
        if nrm == 0.0:
            u = rng.standard_normal(m)
            nrm = np.linalg.norm(u)
        u /= nrm
        prev = 0.0
        for _ in range(30):
            u = M @ (M.T @ u)
            s = np.linalg.norm(u)
            if s == 0.0:
                break
            u /= s
            if abs(s - prev) <= 1e-6 * s:
                break
            prev = s
    nrm = np.linalg.norm(u)
    if not nrm > 0.0 or not np.isfinite(nrm):
        u = rng.standard_normal(m)
        nrm = np.linalg.norm(u)
    return u / nrm


def _canonicalize(weights, mats):
    """Sort components by decreasing weight; make the largest-|.| entry of every column of all factors but the
    last positive, moving the sign into the last factor. Returns new arrays."""
    order = np.argsort(-weights, kind="stable")
    weights = weights[order].copy()
    mats = [a[:, order].copy() for a in mats]
    R = weights.shape[0]
    cols = np.arange(R)
    for n in range(len(mats) - 1):
        a = mats[n]
        idx = np.argmax(np.abs(a), axis=0)
        s = np.sign(a[idx, cols])
        s[s == 0] = 1.0
        a *= s
        mats[-1] *= s
    return weights, mats


# --------------------------------------------------------------------------------------------------------------
# validation shared by both fits
# --------------------------------------------------------------------------------------------------------------
def _check_tensor(T, name="T"):
    if isinstance(T, np.ndarray) and T.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (a 2-, 3- or 4-way tensor), got shape {T.shape}")
    T = check_tensor(T, name, ndim=getattr(T, "ndim", 0))
    Td = np.asarray(T, dtype=np.float64)
    return Td, float(np.linalg.norm(Td.ravel()))


def _check_common(T, rank, n_iter, tol, init, callback):
    Td, norm = _check_tensor(T)
    rank = check_int(rank, "rank", min_value=1)
    rmax = max_cp_rank(T.shape)
    if rank > rmax:
        raise ValueError(f"rank must be <= {rmax} for a tensor of shape {T.shape} (min over n of the product of "
                         f"the other dimensions, where the fit is already exact), got {rank}")
    n_iter = check_int(n_iter, "n_iter", min_value=1)
    tol = check_real(tol, "tol", min_value=0.0)
    if not isinstance(init, str):
        raise TypeError(f"init must be one of {list(_INITS)!r}, got {type(init).__name__} ({init!r})")
    check_option(init, "init", _INITS)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return Td, norm, rank, n_iter, tol


# --------------------------------------------------------------------------------------------------------------
# CP-ALS
# --------------------------------------------------------------------------------------------------------------
def _init_als(Td, rank, init, rng):
    mats = []
    for n, I in enumerate(Td.shape):
        if init == "random":
            a = rng.standard_normal((I, rank))
        else:
            G = _mode_gram(Td, n)
            k = min(rank, I)
            a = np.linalg.eigh(G)[1][:, ::-1][:, :k]
            if k < rank:
                # uniform [0, 1) columns complete the start (they converged more reliably than normal ones
                # on low-rank-plus-noise tensors whose rank exceeds a mode size)
                a = np.concatenate([a, rng.random((I, rank - k))], axis=1)
        nrm = np.linalg.norm(a, axis=0)
        nrm[nrm == 0] = 1.0
        mats.append(a / nrm)
    return mats


def _als_error(Td, norm, M_last, A_last, V_last, mats, n_last):
    """Relative error of the model whose factor ``n_last`` is the unnormalised ``A_last`` (others unit-norm).

    Uses ``||T||^2 - 2 <T, T~> + ||T~||^2`` (cheap, from the last MTTKRP), and an explicit rebuild when the
    error is so small that the formula would lose its digits to cancellation.
    """
    iprod = float(np.sum(M_last * A_last))
    rec2 = float(np.sum(V_last * (A_last.T @ A_last)))
    e2 = norm * norm - 2.0 * iprod + rec2
    if e2 > 1e-6 * norm * norm:
        return math.sqrt(e2) / norm
    full = list(mats)
    full[n_last] = A_last
    diff = Td - cp_to_tensor(np.ones(A_last.shape[1]), full)
    return float(np.linalg.norm(diff.ravel())) / norm


def cp_als(T, rank, *, n_iter=200, tol=1e-8, init="svd", random_state=None, callback=None):
    """Joint CP decomposition by alternating least squares.

    Parameters
    ----------
    T : ndarray, N >= 2 dimensions, float32 or float64, finite, not all zero
    rank : int, 1 <= rank <= :func:`max_cp_rank` (T.shape)
    n_iter : int >= 1
        Maximum number of ALS sweeps (one sweep updates every factor once).
    tol : float >= 0
        Stop when a sweep lowers the relative error by less than ``tol``.
    init : "svd" or "random"
        "svd": factor n starts as the leading ``rank`` left singular vectors of the mode-n unfolding (uniform
        [0, 1) random columns beyond ``I_n``); "random": standard normal entries.
    random_state : None, int, SeedSequence or Generator
        Used by ``init="random"`` and to complete an "svd" start when ``rank > I_n``.
    callback : callable or None
        Called after every sweep as ``callback({"iteration": i, "error": e})``.

    Returns
    -------
    CPResult
        ``errors`` holds the relative error after every accepted sweep (non-increasing).

    Notes
    -----
    The matricised-tensor-times-Khatri-Rao products (MTTKRP) are computed with a two-level dimension tree:
    the modes are split into a head ``[0, s)`` and a tail ``[s, N)``; one GEMM contracts the tensor with the
    Khatri-Rao product of the tail factors, which serves every head mode (the tail factors do not change while
    the head is updated), and one GEMM with the head factors serves every tail mode. A sweep therefore costs
    two passes over the tensor (``2 * size * rank`` multiply-adds) instead of ``N``.
    """
    Td, norm, rank, n_iter, tol = _check_common(T, rank, n_iter, tol, init, callback)
    rng = check_random_state(random_state)
    t0 = time.perf_counter()
    N = Td.ndim
    shape = Td.shape
    s = _split_point(shape)
    T2 = Td.reshape(math.prod(shape[:s]), -1)
    mats = _init_als(Td, rank, init, rng)
    grams = [a.T @ a for a in mats]
    weights = np.ones(rank)
    errors = []
    converged = False
    it = 0
    err = None
    for it in range(1, n_iter + 1):
        prev = ([a.copy() for a in mats], weights.copy(), [g.copy() for g in grams])
        for half in (0, 1):
            modes = range(0, s) if half == 0 else range(s, N)
            if half == 0:
                P = (T2 @ khatri_rao(mats[s:])).reshape(shape[:s] + (rank,))
            else:
                P = (T2.T @ khatri_rao(mats[:s])).reshape(shape[s:] + (rank,))
            base = 0 if half == 0 else s
            for n in modes:
                local = [mats[m] for m in modes]
                M = _contract_partial(P, local, n - base)
                V = np.ones((rank, rank))
                for m in range(N):
                    if m != n:
                        V *= grams[m]
                A = _solve_gram(V, M)
                if n == N - 1:
                    err = _als_error(Td, norm, M, A, V, mats, n)
                nrm = np.linalg.norm(A, axis=0)
                weights = nrm.copy()
                nrm[nrm == 0] = 1.0
                mats[n] = A / nrm
                grams[n] = mats[n].T @ mats[n]
        if errors and err > errors[-1]:
            # rounding made this sweep worse: keep the previous iterate and stop
            mats, weights, grams = prev
            converged = True
            it -= 1
            break
        errors.append(err)
        if callback is not None:
            callback({"iteration": it, "error": err})
        if len(errors) >= 2 and errors[-2] - errors[-1] < tol:
            converged = True
            break
        if err == 0.0:
            converged = True
            break
    weights, mats = _canonicalize(weights, mats)
    dt = T.dtype
    return CPResult(weights.astype(dt), tuple(a.astype(dt) for a in mats), errors=errors,
                    meta={"shape": tuple(T.shape), "rank": rank, "method": "als", "init": init,
                          "n_iter": it, "converged": converged, "time_s": time.perf_counter() - t0})


# --------------------------------------------------------------------------------------------------------------
# greedy rank-1 (the paper's algorithm)
# --------------------------------------------------------------------------------------------------------------
def _kron_vectors(vecs):
    out = vecs[0]
    for v in vecs[1:]:
        out = np.multiply.outer(out, v).ravel()
    return out


def _contract_vec(P, vecs, j):
    """Contract the k-way ``P`` with every vector of ``vecs`` except ``vecs[j]`` (a vector of length J_j)."""
    k = P.ndim
    if k == 1:
        return P
    Pj = np.moveaxis(P, j, 0).reshape(P.shape[j], -1)
    return Pj @ _kron_vectors([vecs[m] for m in range(k) if m != j])


def _rank1_als(Rsd, s, init, rng, n_iter, tol):
    """Best rank-1 term ``lam * a_0 o ... o a_{N-1}`` of the residual tensor ``Rsd``.

    Higher-order power method: each unit vector in turn is the (normalised) least-squares solution with the
    others fixed; ``lam = <R, a_0 o ... o a_{N-1}>`` after the last update, so ``||R - lam a||^2 = ||R||^2 - lam^2``.
    The contractions use the same head/tail split as :func:`cp_als` (two passes over the tensor per sweep).
    """
    shape = Rsd.shape
    N = len(shape)
    R2 = Rsd.reshape(math.prod(shape[:s]), -1)
    if init == "random":
        vecs = [rng.standard_normal(I) for I in shape]
        vecs = [v / np.linalg.norm(v) for v in vecs]
    else:
        vecs = [np.zeros(shape[0])] + [_leading_left_vector(Rsd, n, rng) for n in range(1, N)]
    lam = 0.0
    it = 0
    for it in range(1, n_iter + 1):
        lam_prev = lam
        for half in (0, 1):
            if half == 0:
                modes = range(0, s)
                P = (R2 @ _kron_vectors(vecs[s:])).reshape(shape[:s])
            else:
                modes = range(s, N)
                P = (R2.T @ _kron_vectors(vecs[:s])).reshape(shape[s:])
            base = modes[0]
            for n in modes:
                a = _contract_vec(P, [vecs[m] for m in modes], n - base)
                lam = float(np.linalg.norm(a))
                if lam == 0.0:
                    # the residual is orthogonal to the current directions: restart this factor at random
                    a = rng.standard_normal(shape[n])
                    vecs[n] = a / np.linalg.norm(a)
                    continue
                vecs[n] = a / lam
        if abs(lam - lam_prev) <= tol * max(lam, 1e-300):
            break
    return lam, vecs, it


def cp_greedy(T, rank, *, n_iter=100, tol=1e-7, init="svd", random_state=None, callback=None):
    """Greedy CP decomposition (the paper's algorithm): ``rank`` successive best rank-1 fits of the residual.

    Parameters
    ----------
    T : ndarray, N >= 2 dimensions, float32 or float64, finite, not all zero
    rank : int, 1 <= rank <= :func:`max_cp_rank` (T.shape)
    n_iter : int >= 1
        Maximum alternating sweeps for each rank-1 term.
    tol : float >= 0
        A rank-1 fit stops when a sweep changes its weight by less than ``tol`` (relative).
    init : "svd" or "random"
        Start of each rank-1 fit: "svd" takes the leading left singular vector of every mode-n unfolding of
        the residual (n >= 1); "random" takes random unit vectors.
    random_state : None, int, SeedSequence or Generator
    callback : callable or None
        Called after every component as ``callback({"component": k, "error": e, "iterations": i})``.

    Returns
    -------
    CPResult
        Components in the order found (non-increasing weights up to ties); ``errors[k]`` is the relative error
        after ``k + 1`` components (non-increasing). A component that would not lower the residual (the
        residual is already at rounding level) is kept with weight 0.
    """
    Td, norm, rank, n_iter, tol = _check_common(T, rank, n_iter, tol, init, callback)
    rng = check_random_state(random_state)
    t0 = time.perf_counter()
    N = Td.ndim
    shape = Td.shape
    Rsd = Td.copy()
    s = _split_point(shape)
    weights = np.zeros(rank)
    mats = [np.zeros((I, rank)) for I in shape]
    errors = []
    res2 = norm * norm
    total_it = 0
    for k in range(rank):
        lam, vecs, it = _rank1_als(Rsd, s, init, rng, n_iter, tol)
        total_it += it
        term = lam * _kron_vectors(vecs).reshape(shape)
        new = Rsd - term
        new2 = float(np.sum(new * new))
        if not new2 < res2:
            lam, new, new2 = 0.0, Rsd, res2  # no progress at rounding level: a zero-weight component
        for n in range(N):
            mats[n][:, k] = vecs[n]
        weights[k] = lam
        Rsd = new
        res2 = new2
        err = math.sqrt(res2) / norm
        errors.append(err)
        if callback is not None:
            callback({"component": k, "error": err, "iterations": it})
    # deterministic signs (order is the greedy order)
    cols = np.arange(rank)
    for n in range(N - 1):
        a = mats[n]
        idx = np.argmax(np.abs(a), axis=0)
        s = np.sign(a[idx, cols])
        s[s == 0] = 1.0
        a *= s
        mats[-1] *= s
    dt = T.dtype
    return CPResult(weights.astype(dt), tuple(a.astype(dt) for a in mats), errors=errors,
                    meta={"shape": tuple(T.shape), "rank": rank, "method": "greedy", "init": init,
                          "n_iter": total_it, "converged": True, "time_s": time.perf_counter() - t0})
