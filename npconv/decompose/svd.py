"""Low-rank (SVD) approximation of dense layers and, as a generic baseline, of conv kernels.

``svd_lowrank(W, rank)`` approximates a 2-D weight ``W`` (out, in) by ``A @ B`` with ``A`` (out, t) and
``B`` (t, in): the layer ``y = W x`` is executed as ``y = A (B x)``, ``t (out + in)`` multiply-adds instead of
``out * in``.

* Plain metric: the truncated SVD ``W ~ U_t S_t V_t^T`` (Eckart-Young), stored as ``A = U_t`` (orthonormal
  columns) and ``B = U_t^T W = S_t V_t^T``.
* Data metric (``data_cov`` = S, the second moment of the layer's inputs, ``in x in``): minimise
  ``E||(W - A B) x||^2 = ||(W - A B) L||_F^2`` with ``L L^T = S``. With ``W L = U S V^T`` the minimiser is the
  projection ``A B = U_t U_t^T W`` (so ``A B L`` is the rank-t truncation of ``W L``), i.e. ``A = U_t``,
  ``B = U_t^T W``. This form needs no inverse of ``L``, so a singular S (inputs confined to a subspace) needs
  no regularisation: the fit is exact on the data and minimum-change off it.

``conv_svd(W, rank)`` treats a conv kernel (F, C, X, Y) as the matrix F x (C X Y): it is executed as a conv to
``t`` channels (``B`` reshaped to (t, C, X, Y)) followed by a 1x1 conv ``A`` (F, t).

``rank`` is an int ``1 <= t <= min(out, in)`` or a float in (0, 1], the fraction of the parameters kept:
``t = max(1, floor(frac * out * in / (out + in)))``.
"""
from __future__ import annotations

import math
import numbers
from typing import ClassVar

import numpy as np

from ._result import Decomposition, check_factor, check_tensor, result_class, svd_flip
from .metrics import covariance_sqrt

__all__ = ["svd_lowrank", "conv_svd", "LowRankResult", "ConvLowRankResult", "resolve_rank"]


def resolve_rank(rank, m, n, name="rank"):
    """The rank ``t`` for an (m, n) matrix from an int, or a float fraction of the parameters kept."""
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Real):
        raise TypeError(f"{name} must be an int or a float in (0, 1], got {type(rank).__name__} ({rank!r})")
    limit = min(m, n)
    if isinstance(rank, numbers.Integral):
        t = int(rank)
        if t < 1 or t > limit:
            raise ValueError(f"{name} must be in [1, {limit}] (min of the matrix shape {m} x {n}), got {t}")
        return t
    frac = float(rank)
    if not (0.0 < frac <= 1.0):
        raise ValueError(f"{name} as a float is the fraction of parameters kept and must be in (0, 1], got {frac}")
    t = int(math.floor(frac * m * n / (m + n)))
    return min(max(t, 1), limit)


@result_class
class LowRankResult(Decomposition):
    """``W ~ a @ b``: ``a`` (out, t), ``b`` (t, in); ``a, b = result``.

    ``errors``: the relative Frobenius error (one value); ``meta``: ``shape``, ``rank``, ``data_metric``.
    """
    FACTORS: ClassVar[tuple] = ("a", "b")
    a: np.ndarray
    b: np.ndarray

    def _validate(self):
        a = check_factor(self.a, "a", ndim=2)
        check_factor(self.b, "b", ndim=2, shape=(a.shape[1], None), dtype=a.dtype)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def to_tensor(self):
        return self.a @ self.b

    def to_layer(self, *, bias=None):
        """A ``LowRankLinear`` layer executing ``x -> (x b^T) a^T + bias``."""
        from ..layers.lowrank import LowRankLinear
        return LowRankLinear(self.a, self.b, bias)


@result_class
class ConvLowRankResult(Decomposition):
    """``W[f] ~ sum_k a[f, k] b[k]``: ``a`` (F, t) is a 1x1 conv, ``b`` (t, C, X, Y) a conv to t channels.

    ``errors``: the relative Frobenius error (one value); ``meta``: ``shape``, ``rank``, ``data_metric``.
    """
    FACTORS: ClassVar[tuple] = ("a", "b")
    a: np.ndarray
    b: np.ndarray

    def _validate(self):
        a = check_factor(self.a, "a", ndim=2)
        check_factor(self.b, "b", ndim=4, shape=(a.shape[1], None, None, None), dtype=a.dtype)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def to_tensor(self):
        t = self.b.shape[0]
        return (self.a @ self.b.reshape(t, -1)).reshape((self.a.shape[0],) + self.b.shape[1:])

    def to_layer(self, *, bias=None, stride=1, padding=0, dilation=1):
        """A ``LowRankConv2d`` layer: conv to t channels with ``b``, then the 1x1 conv ``a`` (+ bias)."""
        from ..layers.lowrank import LowRankConv2d
        return LowRankConv2d(self.b, self.a, bias, stride=stride, padding=padding, dilation=dilation)


def _lowrank_factors(W64, t, data_cov, cov_name):
    """(A, B, rel_err) in float64 for a 2-D float64 W: the (data-metric) rank-t fit."""
    if data_cov is None:
        U, s, Vt = np.linalg.svd(W64, full_matrices=False)
        U, Vt = svd_flip(U[:, :t], Vt[:t])
        A = U
        B = s[:t, None] * Vt
    else:
        L = covariance_sqrt(data_cov, W64.shape[1], cov_name)
        U, s, Vt = np.linalg.svd(W64 @ L, full_matrices=False)
        U, _ = svd_flip(U[:, :t], Vt[:t])
        A = U
        B = U.T @ W64
    err = float(np.linalg.norm(W64 - A @ B) / np.linalg.norm(W64))
    return A, B, err


def svd_lowrank(W, rank, *, data_cov=None):
    """Rank-t factorisation ``W ~ A @ B`` of a dense weight ``W`` (out, in).

    Parameters
    ----------
    W : ndarray (out, in), float32 or float64, finite, not all zero
    rank : int in [1, min(out, in)], or float in (0, 1] (fraction of parameters kept, see the module doc)
    data_cov : ndarray (in, in) or None
        Second moment of the layer's inputs (``metrics.input_covariance``): fit in the data metric
        ``min E||(W - A B) x||`` instead of the Frobenius norm.

    Returns
    -------
    LowRankResult
        ``a`` (out, t) with orthonormal columns and ``b`` (t, in), in W's dtype (computed in float64).
    """
    W = check_tensor(W, "W", ndim=2)
    out_f, in_f = W.shape
    t = resolve_rank(rank, out_f, in_f)
    A, B, err = _lowrank_factors(W.astype(np.float64), t, data_cov, "data_cov")
    return LowRankResult(A.astype(W.dtype), B.astype(W.dtype), errors=(err,),
                         meta={"shape": W.shape, "rank": t, "data_metric": data_cov is not None,
                               "method": "svd"})


def conv_svd(W, rank, *, data_cov=None):
    """Rank-t factorisation of a conv kernel ``W`` (F, C, X, Y) as the matrix F x (C X Y).

    Executed as a conv to ``t`` channels with ``b`` (t, C, X, Y) then a 1x1 conv with ``a`` (F, t).
    ``rank`` as in ``svd_lowrank`` (the limit is ``min(F, C*X*Y)``); ``data_cov`` is the (CXY, CXY) second moment
    of the layer's input patches (``metrics.patch_covariance``).
    """
    W = check_tensor(W, "W", ndim=4)
    F = W.shape[0]
    D = int(np.prod(W.shape[1:]))
    t = resolve_rank(rank, F, D)
    A, B, err = _lowrank_factors(W.reshape(F, D).astype(np.float64), t, data_cov, "data_cov")
    return ConvLowRankResult(A.astype(W.dtype), B.reshape((t,) + W.shape[1:]).astype(W.dtype), errors=(err,),
                             meta={"shape": W.shape, "rank": t, "data_metric": data_cov is not None,
                                   "method": "conv_svd"})
