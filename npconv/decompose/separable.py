"""Spatially separable filters in the style of Jaderberg et al. 2014 (their scheme 2).

A conv kernel ``W`` (F, C, X, Y) is replaced by ``K`` vertical filters ``V`` (K, C, X, 1) followed by ``F``
horizontal filters ``H`` (F, K, 1, Y)::

    W~[f, c, x, y] = sum_k H[f, k, 0, y] * V[k, c, x, 0]

i.e. ``W`` reshaped to the (C X) x (F Y) matrix ``M[(c, x), (f, y)] = W[f, c, x, y]`` is approximated with rank K.
Plain fit: the truncated SVD of M (closed form). With ``data_cov`` (the second moment of the layer's input),
the fit minimises ``sum_{f,y} (m - m~)^T S_v (m - m~)`` with ``S_v`` the (C X, C X) second moment of the vertical
input columns: the rank-K truncation of ``L^T M`` (``L L^T = S_v``, regularised), mapped back with ``L^{-T}``.
A full (C X Y, C X Y) patch second moment is accepted too: reduced to ``S_v`` by averaging its diagonal
horizontal-offset blocks (the best S_v that ignores correlations between columns of a patch) for that closed form,
which is then refined in the full metric by alternating exact steps (``_full_metric_refit``).

Executed as a conv with V (stride along rows only, vertical padding) then a conv with H (stride along columns,
horizontal padding): ``K C X H_out W_in + F K Y H_out W_out`` multiply-adds.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.linalg

from .._validate import check_int, check_real
from ._linalg import solve_psd
from ._result import Decomposition, check_factor, check_tensor, result_class, svd_flip
from .metrics import covariance_sqrt

__all__ = ["separable", "SeparableResult"]


@result_class
class SeparableResult(Decomposition):
    """``vertical, horizontal = result``: ``vertical`` (K, C, X, 1), ``horizontal`` (F, K, 1, Y).

    ``errors``: the relative Frobenius error (one value); ``meta``: ``shape``, ``rank``, ``data_metric``.
    """
    FACTORS: ClassVar[tuple] = ("vertical", "horizontal")
    vertical: np.ndarray
    horizontal: np.ndarray

    def _validate(self):
        v = check_factor(self.vertical, "vertical", ndim=4, shape=(None, None, None, 1))
        check_factor(self.horizontal, "horizontal", ndim=4, shape=(None, v.shape[0], 1, None), dtype=v.dtype)

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])

    def to_tensor(self):
        return np.einsum("fky,kcx->fcxy", self.horizontal[:, :, 0, :], self.vertical[:, :, :, 0])

    def to_layer(self, *, bias=None, stride=1, padding=0):
        """A ``SeparableConv2d`` layer executing the vertical then the horizontal convolution."""
        from ..layers.lowrank import SeparableConv2d
        return SeparableConv2d(self.vertical, self.horizontal, bias, stride=stride, padding=padding)


def _vertical_cov(data_cov, C, X, Y):
    """S_v (C X, C X) from a (C X, C X) matrix (returned as is) or a (C X Y, C X Y) patch second moment."""
    n_full = C * X * Y
    if isinstance(data_cov, np.ndarray) and data_cov.shape == (n_full, n_full) and Y > 1:
        S = np.asarray(data_cov, dtype=np.float64).reshape(C, X, Y, C, X, Y)
        return np.einsum("cxyduy->cxdu", S).reshape(C * X, C * X) / Y
    return data_cov


def _full_metric_refit(M, Vf, Hf, S6, n_iter, tol, cg_iter=20):
    """Refine ``Vf`` (C X, K) and ``Hf`` (K, F Y) of ``M ~ Vf Hf`` (M[(c, x), (f, y)] = W[f, c, x, y]) in the full
    patch metric: minimise ``sum_f (w_f - w~_f)^T S (w_f - w~_f)`` over the (C X Y)-vectors w_f of the filters, S
    given as S6 (C, X, Y, C, X, Y). Alternating exact steps: the horizontal factors in closed form (one (K Y)^2
    system for all filters), the vertical ones by conjugate gradients warm-started at the current factors (each
    CG iterate lowers the objective). Returns (Vf, Hf, relative data errors before and after each sweep)."""
    C, X, Y = S6.shape[:3]
    K = Vf.shape[1]
    F = Hf.shape[1] // Y
    D = C * X * Y
    S = S6.reshape(D, D)
    Wf = M.reshape(C, X, F, Y).transpose(2, 0, 1, 3).reshape(F, D)          # filters as rows, (c, x, y)
    SW = Wf @ S                                                               # (F, D)
    ref = float(np.sum(SW * Wf))

    def rebuild(V, H):       # V (K, C, X), H (F, K, Y) -> (F, D): w~[f, c, x, y] = sum_k H[f, k, y] V[k, c, x]
        Hy = np.ascontiguousarray(H.transpose(2, 0, 1))                       # (Y, F, K)
        return np.matmul(Hy, V.reshape(K, C * X)).transpose(1, 2, 0).reshape(F, D)

    def project(Z):          # Z (F, D) -> (K, C, X): sum_{f,y} H[f, k, y] Z[f, c, x, y]
        Zy = np.ascontiguousarray(Z.reshape(F, C * X, Y).transpose(2, 0, 1))   # (Y, F, C X)
        return np.matmul(H.transpose(2, 1, 0), Zy).sum(0).reshape(K, C, X)

    def objective(A):
        R = Wf - A
        return float(np.sum((R @ S) * R))

    V = Vf.T.reshape(K, C, X).copy()
    H = Hf.reshape(K, F, Y).transpose(1, 0, 2).copy()
    errs = [np.sqrt(max(objective(rebuild(V, H)), 0.0) / ref)]
    for _ in range(n_iter):
        # horizontal: w~_f = B h_f with B[(c, x, y), (k, y')] = V[k, c, x] delta(y, y')
        T = np.einsum("kcx,cxydzw->kydzw", V, S6, optimize=True)               # (K, Y, C, X, Y) = B^T S
        G = np.einsum("kydzw,mdz->kymw", T, V, optimize=True).reshape(K * Y, K * Y)
        R = T.reshape(K * Y, D) @ Wf.T                                         # (K Y, F)
        H = solve_psd(G, R).reshape(K, Y, F)
        H = H.transpose(2, 0, 1).copy()                                        # (F, K, Y)

        # vertical: CG on the normal equations A(V) = b, A(V)[k, c, x] = sum_{f,y} H[f,k,y] (S w~_f(V))[c, x, y]
        def apply(Vx):
            return project(rebuild(Vx, H) @ S)

        b = project(SW)
        r = b - apply(V)
        p = r.copy()
        rr = float(np.sum(r * r))
        rr0 = rr
        for _ in range(cg_iter):
            if rr <= 1e-24 * max(rr0, 1e-300):
                break
            Ap = apply(p)
            pAp = float(np.sum(p * Ap))
            if pAp <= 0:
                break
            alpha = rr / pAp
            V = V + alpha * p
            r = r - alpha * Ap
            rr_new = float(np.sum(r * r))
            p = r + (rr_new / rr) * p
            rr = rr_new
        e = np.sqrt(max(objective(rebuild(V, H)), 0.0) / ref)
        if e > errs[-1] * (1 + 1e-12):
            break            # rounding: keep the previous factors
        errs.append(e)
        Vf = V.reshape(K, C * X).T.copy()
        Hf = H.transpose(1, 0, 2).reshape(K, F * Y).copy()
        if errs[-2] - e <= tol * errs[-2]:
            break
    return Vf, Hf, errs


def separable(W, rank, *, data_cov=None, data_iter=10, tol=1e-4):
    """Rank-K vertical/horizontal factorisation of ``W`` (F, C, X, Y).

    Parameters
    ----------
    W : ndarray (F, C, X, Y), float32 or float64, finite, not all zero
    rank : int, 1 <= K <= min(C X, F Y)
    data_cov : ndarray (C X, C X) or (C X Y, C X Y), or None
        Second moment of the vertical input columns (``patch_covariance(x, (X, 1), ...)``) or of the full
        input patches (``patch_covariance(x, (X, Y), ...)``); see the module doc. A full patch moment also
        refines the fit in the full metric (correlations between the columns of a patch included).
    data_iter, tol : int, float
        The full-metric refinement: at most ``data_iter`` alternating sweeps, stopped when a sweep lowers the
        relative data error by less than ``tol`` of itself.

    Returns
    -------
    SeparableResult (arrays in W's dtype, computed in float64)
    """
    W = check_tensor(W, "W", ndim=4)
    F, C, X, Y = W.shape
    limit = min(C * X, F * Y)
    K = check_int(rank, "rank", min_value=1, max_value=limit)
    data_iter = check_int(data_iter, "data_iter", min_value=0)
    tol = check_real(tol, "tol", min_value=0.0)
    M = W.astype(np.float64).transpose(1, 2, 0, 3).reshape(C * X, F * Y)
    meta_extra = {}
    if data_cov is None:
        U, s, Vt = np.linalg.svd(M, full_matrices=False)
        U, Vt = svd_flip(U[:, :K], Vt[:K])
        Vf = U                                  # (C X, K)
        Hf = s[:K, None] * Vt                   # (K, F Y)
    else:
        Sv = _vertical_cov(data_cov, C, X, Y)
        L = covariance_sqrt(Sv, C * X, "data_cov")
        S = L @ L.T
        S = S + (1e-10 * max(float(np.trace(S)) / (C * X), 1e-300)) * np.eye(C * X)
        Lc = np.linalg.cholesky(S)                 # S = Lc Lc^T, Lc invertible after regularisation
        U, s, Vt = np.linalg.svd(Lc.T @ M, full_matrices=False)
        U, Vt = svd_flip(U[:, :K], Vt[:K])
        Vf = scipy.linalg.solve_triangular(Lc.T, U, lower=False)   # L^{-T} U_K
        Hf = U.T @ (Lc.T @ M)                                         # U_K^T L^T M
        n_full = C * X * Y
        if data_iter and Y > 1 and np.shape(data_cov) == (n_full, n_full):
            S6 = np.asarray(data_cov, np.float64).reshape(C, X, Y, C, X, Y)
            S6 = 0.5 * (S6 + S6.transpose(3, 4, 5, 0, 1, 2))
            Vf, Hf, data_errors = _full_metric_refit(M, Vf, Hf, S6, data_iter, tol)
            meta_extra = {"data_errors": tuple(float(e) for e in data_errors)}
    approx = Vf @ Hf
    err = float(np.linalg.norm(M - approx) / np.linalg.norm(M))
    vertical = Vf.T.reshape(K, C, X, 1)
    horizontal = Hf.reshape(K, F, Y).transpose(1, 0, 2).reshape(F, K, 1, Y)
    return SeparableResult(np.ascontiguousarray(vertical, dtype=W.dtype),
                           np.ascontiguousarray(horizontal, dtype=W.dtype), errors=(err,),
                           meta={"shape": W.shape, "rank": K, "data_metric": data_cov is not None,
                                 "method": "separable", **meta_extra})
