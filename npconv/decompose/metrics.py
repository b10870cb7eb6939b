"""Approximation-error metrics and the input statistics used by the data-metric fits.

* ``frobenius_error`` / ``relative_error``: distance between a tensor and its approximation (an array or any
  decomposition result, rebuilt with ``to_tensor()``).
* ``data_distance``: the paper's data metric, ``||f(X) - g(X)|| / ||f(X)||`` for the exact and the approximated
  layer evaluated on a sample of real inputs to the layer.
* ``patch_covariance`` (conv) and ``input_covariance`` (dense): the second moment ``E[p p^T]`` of the vectors a
  layer's weights multiply. The error of a layer approximated by ``W~`` is
  ``E||(W - W~) p||^2 = tr((W - W~) S (W - W~)^T)`` with ``S = E[p p^T]`` (the bias cancels), so the
  uncentred second moment is the right weighting; ``center=True`` gives the ordinary covariance instead.
* ``covariance_sqrt``: validation of such a matrix and a factor ``L`` with ``L @ L.T == S``.
"""
from __future__ import annotations

import numpy as np

from .._backend import is_cupy_array, to_numpy
from .._validate import as_padding4, as_pair, check_int, out_size
from ._result import Decomposition, check_random_state

__all__ = ["frobenius_error", "relative_error", "data_distance", "patch_covariance", "input_covariance",
           "covariance_sqrt"]


def _as_tensor(a, name):
    if isinstance(a, Decomposition):
        return a.to_tensor()
    if is_cupy_array(a):
        return to_numpy(a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or a decomposition result, got {type(a).__name__}")
    return a


def frobenius_error(W, approx):
    """``||W - approx||_F``; ``approx`` is an array of W's shape or a decomposition result."""
    W = _as_tensor(W, "W")
    A = _as_tensor(approx, "approx")
    if W.shape != A.shape:
        raise ValueError(f"approx must have the shape of W {W.shape}, got {A.shape}")
    return float(np.linalg.norm((W.astype(np.float64) - A.astype(np.float64)).ravel()))


def relative_error(W, approx):
    """``||W - approx||_F / ||W||_F`` (a ValueError when W is all zero)."""
    W = _as_tensor(W, "W")
    nrm = float(np.linalg.norm(W.astype(np.float64).ravel()))
    if nrm == 0.0:
        raise ValueError("W is all zeros: the relative error is undefined")
    return frobenius_error(W, approx) / nrm


def data_distance(layer_exact, layer_approx, X):
    """``||f(X) - g(X)||_F / ||f(X)||_F`` for two callables (layers or functions) on the same inputs ``X``.

    ``X`` is a batch of real inputs to the layer (NumPy or CuPy). Outputs are compared on the host in float64.
    """
    for nm, f in (("layer_exact", layer_exact), ("layer_approx", layer_approx)):
        if not callable(f):
            raise TypeError(f"{nm} must be callable (a layer or a function), got {type(f).__name__}")
    y0 = np.asarray(to_numpy(layer_exact(X)), dtype=np.float64)
    y1 = np.asarray(to_numpy(layer_approx(X)), dtype=np.float64)
    if y0.shape != y1.shape:
        raise ValueError(f"the two layers give different output shapes: {y0.shape} and {y1.shape}")
    nrm = float(np.linalg.norm(y0.ravel()))
    if nrm == 0.0:
        raise ValueError("the exact layer's output is all zeros on X: the relative distance is undefined")
    return float(np.linalg.norm((y0 - y1).ravel())) / nrm


def _check_input(x, name, ndim):
    if is_cupy_array(x):
        x = to_numpy(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def input_covariance(x, *, center=False):
    """Second moment ``x^T x / N`` (float64, (D, D)) of a dense layer's inputs ``x`` (N, D) (or (N, ...) flattened).

    ``center=True`` removes the mean first (the ordinary covariance).
    """
    x = _check_input(x, "x", (2, 3, 4))
    X = x.reshape(x.shape[0], -1).astype(np.float64)
    if center:
        X = X - X.mean(0)
    return (X.T @ X) / X.shape[0]


def patch_covariance(x, kernel, *, stride=1, padding=0, dilation=1, max_patches=None, random_state=None,
                     center=False, chunk=16):
    """Second moment ``E[p p^T]`` of a conv layer's input patches, (C*KH*KW, C*KH*KW) float64.

    ``x`` is (N, C, H, W); patches are taken as the conv with this ``kernel`` (int or pair), ``stride``,
    ``padding`` (int, pair or (top, bottom, left, right)) and ``dilation`` sees them (zero padding included);
    the entry order ``(c, kh, kw)`` matches ``W.reshape(F, -1)`` for a weight W (F, C, KH, KW).
    ``max_patches`` (int) draws that many patch positions at random (``random_state``) instead of using all;
    images are processed ``chunk`` at a time to bound memory.
    """
    x = _check_input(x, "x", (4,))
    kh, kw = as_pair(kernel, "kernel")
    sh, sw = as_pair(stride, "stride")
    dh, dw = as_pair(dilation, "dilation")
    pt, pb, pl, pr = as_padding4(padding)
    chunk = check_int(chunk, "chunk", min_value=1)
    N, C, H, W = x.shape
    ho = out_size(H, kh, sh, pt, pb, dh)
    wo = out_size(W, kw, sw, pl, pr, dw)
    D = C * kh * kw
    total = N * ho * wo
    keep = None
    if max_patches is not None:
        max_patches = check_int(max_patches, "max_patches", min_value=1)
        if max_patches < total:
            rng = check_random_state(random_state)
            keep = np.sort(rng.choice(total, size=max_patches, replace=False))
    S = np.zeros((D, D))
    s1 = np.zeros(D)
    count = 0
    for n0 in range(0, N, chunk):
        xb = np.pad(x[n0:n0 + chunk].astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        win = np.lib.stride_tricks.sliding_window_view(xb, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]          # (n, C, ho, wo, kh, kw)
        P = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, D)
        if keep is not None:
            lo, hi = n0 * ho * wo, (n0 + xb.shape[0]) * ho * wo
            sel = keep[(keep >= lo) & (keep < hi)] - lo
            P = P[sel]
        S += P.T @ P
        s1 += P.sum(0)
        count += P.shape[0]
    S /= count
    if center:
        m = s1 / count
        S -= np.outer(m, m)
    return S


def covariance_sqrt(cov, n, name="data_cov"):
    """Validate an (n, n) symmetric positive semi-definite matrix and return ``L`` (n, n) with ``L L^T = cov``.

    Small negative eigenvalues from round-off (down to ``-1e-6 * max``) are clipped to zero; a clearly
    indefinite, asymmetric, non-finite or all-zero matrix is a ValueError.
    """
    if is_cupy_array(cov):
        cov = to_numpy(cov)
    if not isinstance(cov, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(cov).__name__}")
    if cov.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {cov.shape}")
    if cov.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {cov.dtype}")
    if not np.isfinite(cov).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    c = cov.astype(np.float64)
    scale = float(np.abs(c).max())
    if scale == 0.0:
        raise ValueError(f"{name} is all zeros")
    if float(np.abs(c - c.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name} must be symmetric (max |cov - cov.T| = {np.abs(c - c.T).max():.3g})")
    c = 0.5 * (c + c.T)
    ev, Q = np.linalg.eigh(c)
    if ev[0] < -1e-6 * max(ev[-1], 0.0) - 1e-300:
        raise ValueError(f"{name} must be positive semi-definite, its smallest eigenvalue is {ev[0]:.3g} "
                         f"(largest {ev[-1]:.3g})")
    ev = np.clip(ev, 0.0, None)
    return Q * np.sqrt(ev)
