"""Monochromatic approximation of a conv layer (Denton et al. 2014, section 4.1).

Each filter ``W[f]`` (C, X, Y) is approximated by one colour vector times one spatial map, and the F colour
vectors are shared through ``C'`` clusters:

1. per filter, the rank-1 SVD of its C x (X Y) matrix gives a unit colour vector ``u_f`` (sign fixed with
   ``svd_flip``: its largest-magnitude entry positive) and a spatial map;
2. k-means groups the F colour vectors into ``C' = colors`` clusters (equal-size clusters by default, which makes
   the executed layer a regular grouped conv); each cluster's colour is its centre, normalised to unit length;
3. each filter's spatial map is refit by least squares given its cluster's colour ``c``:
   ``s_f = W_f^T c / ||c||^2`` (Frobenius), or, with ``data_cov`` (the (CXY, CXY) second moment of the input
   patches), the weighted fit ``s_f = (K^T S K)^{-1} K^T S vec(W_f)`` with ``K = c (x) I_{XY}``.

The result holds the colour transform (C', C), the assignment (F,) and the spatial filters (F, X, Y);
``W~[f, c] = colors[assignment[f], c] * spatial[f]``. The layer runs as a C' x C colour transform of the input
followed by one single-channel X x Y filter per output channel, reading its cluster's colour channel:
``C C' N M + X Y F N' M'`` multiply-adds instead of ``C X Y F N' M'``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._validate import check_int
from ._kmeans import kmeans
from ._result import Decomposition, check_factor, check_tensor, result_class, svd_flip
from .metrics import covariance_sqrt

__all__ = ["monochromatic", "MonochromaticResult"]


@result_class
class MonochromaticResult(Decomposition):
    """``colors, assignment, spatial = result``.

    ``colors`` (C', C): the colour transform; ``assignment`` (F,) int64 in [0, C'): each filter's colour;
    ``spatial`` (F, X, Y): each filter's single-channel spatial filter. ``errors``: relative Frobenius error
    after the rank-1 step, after clustering and after the refit; ``meta``: ``shape``, ``colors``,
    ``equal_size``, ``inertia`` (k-means), ``data_metric``.
    """
    FACTORS: ClassVar[tuple] = ("colors", "assignment", "spatial")
    colors: np.ndarray
    assignment: np.ndarray
    spatial: np.ndarray

    def _validate(self):
        c = check_factor(self.colors, "colors", ndim=2)
        a = check_factor(self.assignment, "assignment", ndim=1, integer=True)
        check_factor(self.spatial, "spatial", ndim=3, shape=(a.shape[0], None, None), dtype=c.dtype)
        if a.size and (a.min() < 0 or a.max() >= c.shape[0]):
            raise ValueError(f"assignment must lie in [0, {c.shape[0]}) (the number of colours), "
                             f"got values in [{a.min()}, {a.max()}]")

    @property
    def n_colors(self) -> int:
        return int(self.colors.shape[0])

    def to_tensor(self):
        return self.colors[self.assignment][:, :, None, None] * self.spatial[:, None, :, :]

    def to_layer(self, *, bias=None, stride=1, padding=0):
        """A ``MonochromaticConv2d`` layer executing this factorisation."""
        from ..layers.lowrank import MonochromaticConv2d
        return MonochromaticConv2d(self.colors, self.assignment, self.spatial, bias,
                                   stride=stride, padding=padding)


def _rel(W, Wt):
    return float(np.linalg.norm(W - Wt) / np.linalg.norm(W))


def monochromatic(W, colors, *, equal_size=True, n_init=10, random_state=None, callback=None, data_cov=None):
    """Monochromatic approximation of a conv kernel ``W`` (F, C, X, Y) with ``colors`` = C' shared colours.

    Parameters
    ----------
    W : ndarray (F, C, X, Y), float32 or float64, finite, not all zero
    colors : int, 1 <= colors <= F (it may exceed C)
    equal_size : bool
        Equal-size clusters (sizes F // C' or F // C' + 1), the paper's choice and the fast execution path.
    n_init : int
        k-means restarts.
    random_state : None, int, SeedSequence or numpy.random.Generator
        Seeds k-means; the same value gives the same result.
    callback : callable or None
        Forwarded to k-means: ``callback({"restart", "iteration", "inertia"})`` after every assignment step.
    data_cov : ndarray (C*X*Y, C*X*Y) or None
        Second moment of the layer's input patches (``metrics.patch_covariance``): refit the spatial maps in
        the data metric.

    Returns
    -------
    MonochromaticResult (arrays in W's dtype, computed in float64)
    """
    W = check_tensor(W, "W", ndim=4)
    F, C, X, Y = W.shape
    colors = check_int(colors, "colors", min_value=1)
    if colors > F:
        raise ValueError(f"colors must be <= the number of filters F={F}, got {colors}")
    W64 = W.astype(np.float64)
    M = W64.reshape(F, C, X * Y)

    # 1. rank-1 colour vector of each filter (batched SVD), signs made deterministic
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    u = np.empty((F, C))
    v = np.empty((F, X * Y))
    for f in range(F):  # F tiny sign fixes (not a hot path)
        uf, vf = svd_flip(U[f, :, :1], Vt[f, :1])
        u[f], v[f] = uf[:, 0], vf[0]
    err_rank1 = _rel(M, s[:, 0, None, None] * u[:, :, None] * v[:, None, :])

    # 2. cluster the colour vectors
    km = kmeans(u, colors, equal_size=equal_size, n_init=n_init, random_state=random_state, callback=callback)
    centers, assign = km.centers.astype(np.float64), km.labels
    nrm = np.linalg.norm(centers, axis=1)
    centers = np.where(nrm[:, None] > 1e-12, centers / np.where(nrm > 1e-12, nrm, 1.0)[:, None], centers)
    cf = centers[assign]                                   # (F, C) colour of each filter
    cn2 = (cf * cf).sum(1)
    spat_plain = np.einsum("fc,fcp->fp", cf, M) / np.where(cn2 > 0, cn2, 1.0)[:, None]
    err_cluster = _rel(M, cf[:, :, None] * spat_plain[:, None, :])

    # 3. refit the spatial maps
    if data_cov is None:
        spatial = spat_plain
    else:
        L = covariance_sqrt(data_cov, C * X * Y, "data_cov")
        S = L @ L.T
        S4 = S.reshape(C, X * Y, C, X * Y)
        wvec = M.reshape(F, -1)
        spatial = np.empty((F, X * Y))
        eye_reg = np.eye(X * Y)
        for f in range(F):  # one small (XY x XY) solve per filter
            c = cf[f]
            G = np.einsum("c,cpdq,d->pq", c, S4, c)          # K^T S K
            rhs = c @ (S @ wvec[f]).reshape(C, X * Y)             # K^T S vec(W_f)
            reg = 1e-12 * max(float(np.trace(G)) / (X * Y), 1e-300)
            spatial[f] = np.linalg.solve(G + reg * eye_reg, rhs)
    approx = cf[:, :, None] * spatial[:, None, :]
    err = _rel(M, approx)
    return MonochromaticResult(centers.astype(W.dtype), assign.astype(np.int64),
                               spatial.reshape(F, X, Y).astype(W.dtype),
                               errors=(err_rank1, err_cluster, err),
                               meta={"shape": W.shape, "colors": colors, "equal_size": bool(equal_size),
                                     "inertia": km.inertia, "data_metric": data_cov is not None,
                                     "method": "monochromatic"})
