"""Spatially separable filters in the style of Jaderberg et al. 2014 (their scheme 2).

A conv kernel ``W`` (F, C, X, Y) is replaced by ``K`` vertical filters ``V`` (K, C, X, 1) followed by ``F``
horizontal filters ``H`` (F, K, 1, Y)::

    W~[f, c, x, y] = sum_k H[f, k, 0, y] * V[k, c, x, 0]

i.e. ``W`` reshaped to the (C X) x (F Y) matrix ``M[(c, x), (f, y)] = W[f, c, x, y]`` is approximated with rank K.
Plain fit: the truncated SVD of M (closed form). With ``data_cov`` (the second moment of the layer's input),
the fit minimises ``sum_{f,y} (m - m~)^T S_v (m - m~)`` with ``S_v`` the (C X, C X) second moment of the vertical
input columns: the rank-K truncation of ``L^T M`` (``L L^T = S_v``, regularised), mapped back with ``L^{-T}``.
A full (C X Y, C X Y) patch second moment is accepted too and reduced to ``S_v`` by averaging its diagonal
horizontal-offset blocks (the best S_v that ignores correlations between columns of a patch).

Executed as a conv with V (stride along rows only, vertical padding) then a conv with H (stride along columns,
horizontal padding): ``K C X H_out W_in + F K Y H_out W_out`` multiply-adds.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.linalg

from .._validate import check_int
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


def separable(W, rank, *, data_cov=None):
    """Rank-K vertical/horizontal factorisation of ``W`` (F, C, X, Y).

    Parameters
    ----------
    W : ndarray (F, C, X, Y), float32 or float64, finite, not all zero
    rank : int, 1 <= K <= min(C X, F Y)
    data_cov : ndarray (C X, C X) or (C X Y, C X Y), or None
        Second moment of the vertical input columns (``patch_covariance(x, (X, 1), ...)``) or of the full
        input patches (``patch_covariance(x, (X, Y), ...)``); see the module doc.

    Returns
    -------
    SeparableResult (arrays in W's dtype, computed in float64)
    """
    W = check_tensor(W, "W", ndim=4)
    F, C, X, Y = W.shape
    limit = min(C * X, F * Y)
    K = check_int(rank, "rank", min_value=1, max_value=limit)
    M = W.astype(np.float64).transpose(1, 2, 0, 3).reshape(C * X, F * Y)
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
    approx = Vf @ Hf
    err = float(np.linalg.norm(M - approx) / np.linalg.norm(M))
    vertical = Vf.T.reshape(K, C, X, 1)
    horizontal = Hf.reshape(K, F, Y).transpose(1, 0, 2).reshape(F, K, 1, Y)
    return SeparableResult(np.ascontiguousarray(vertical, dtype=W.dtype),
                           np.ascontiguousarray(horizontal, dtype=W.dtype), errors=(err,),
                           meta={"shape": W.shape, "rank": K, "data_metric": data_cov is not None,
                                 "method": "separable"})
