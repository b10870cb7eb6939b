"""Approximation-error metrics and the input statistics used by the data-metric fits.

* ``frobenius_error`` / ``relative_error``: distance between a tensor and its approximation (an array or any
  decomposition result, rebuilt with ``to_tensor()``).
* ``data_distance``: the paper's data metric, ``||f(X) - g(X)|| / ||f(X)||`` for the exact and the approximated
  layer evaluated on a sample of real inputs to the layer.
* ``patch_covariance`` (conv) and ``input_covariance`` (dense): the second moment ``E[p p^T]`` of the vectors a
  layer's weights multiply. The error of a layer approximated by ``W~`` is
  ``E||(W - W~) p||^2 = tr((W - W~) S (W - W~)^T)`` with ``S = E[p p^T]`` (the bias cancels), so the
  uncentred second moment is the right weighting; ``center=True`` gives the ordinary covariance instead.
* ``paired_moments``: the second and cross moments of a layer's inputs in an approximated and in the exact
  network (the sequential fit of ``npconv.approximate``).
* ``covariance_sqrt``: validation of such a matrix and a factor ``L`` with ``L @ L.T == S``; ``as_covariance``: the
  validation alone.
"""
from __future__ import annotations

import weakref

import numpy as np

from .._backend import is_cupy_array, to_numpy
from .._validate import as_padding4, as_pair, check_int, out_size
from ._result import Decomposition, check_random_state

__all__ = ["frobenius_error", "relative_error", "data_distance", "patch_covariance", "input_covariance",
           "paired_moments", "covariance_sqrt", "as_covariance"]


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


def _patch_batches(xs, kernel, stride, padding, dilation, max_patches, random_state, chunk, dtype=np.float64):
    """Yield, chunk by chunk of images, the patch matrices (n, C*KH*KW) of every array in ``xs`` (all of one
    shape, (N, C, H, W)) at the same patch positions (all of them, or ``max_patches`` drawn at random), in
    ``dtype``."""
    kh, kw = as_pair(kernel, "kernel")
    sh, sw = as_pair(stride, "stride")
    dh, dw = as_pair(dilation, "dilation")
    pt, pb, pl, pr = as_padding4(padding)
    chunk = check_int(chunk, "chunk", min_value=1)
    N, C, H, W = xs[0].shape
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
    for n0 in range(0, N, chunk):
        mats = []
        m = min(chunk, N - n0)
        if keep is not None:   # the chunk's sampled positions, as (image, row, column)
            sel = keep[(keep >= n0 * ho * wo) & (keep < (n0 + m) * ho * wo)] - n0 * ho * wo
            img, rest = np.divmod(sel, ho * wo)
            row, col = np.divmod(rest, wo)
        for x in xs:
            xb = np.pad(x[n0:n0 + m].astype(dtype, copy=False), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
            win = np.lib.stride_tricks.sliding_window_view(xb, ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
                                                           axis=(2, 3))
            win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]      # (n, C, ho, wo, kh, kw)
            if keep is None:
                P = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, D)
            else:                # gather the sampled patches only (not every patch of the chunk, then a few)
                P = win[img, :, row, col].reshape(-1, D)
            mats.append(P)
        yield mats


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
    S, _, m, _ = _moments([x], kernel, stride, padding, dilation, max_patches, random_state, chunk)
    if center:
        S -= np.outer(m, m)
    return S


def _moments(xs, kernel, stride, padding, dilation, max_patches, random_state, chunk, dtype=np.float64):
    """(E[p0 p0^T], E[p0 p1^T] or None, E[p0], E[p1] or None) over the patches of xs = [x0] or [x0, x1];
    each chunk's products in ``dtype``, summed in float64."""
    S = S01 = s0 = s1 = None
    count = 0
    for mats in _patch_batches(xs, kernel, stride, padding, dilation, max_patches, random_state, chunk, dtype):
        P0 = mats[0]
        if S is None:
            D = P0.shape[1]
            S, s0 = np.zeros((D, D)), np.zeros(D)
            if len(mats) > 1:
                S01, s1 = np.zeros((D, D)), np.zeros(D)
        S += P0.T @ P0
        s0 += P0.sum(0, dtype=np.float64)
        if len(mats) > 1:
            S01 += P0.T @ mats[1]
            s1 += mats[1].sum(0, dtype=np.float64)
        count += P0.shape[0]
    S /= count
    s0 /= count
    if S01 is not None:
        S01 /= count
        s1 /= count
    return S, S01, s0, s1


def paired_moments(x_hat, x, kernel=None, *, stride=1, padding=0, dilation=1, max_patches=None, random_state=None,
                   chunk=16):
    """Moments of a layer's inputs in two versions of a network, at the same patch positions.

    ``x_hat`` and ``x`` (same shape) are the inputs a layer receives from an approximated network and from the
    exact one. For a conv layer pass ``kernel`` (and the conv's ``stride``, ``padding``, ``dilation``) and
    (N, C, H, W) inputs: the moments are over its input patches (entry order ``(c, kh, kw)``); for a dense layer
    leave ``kernel`` None: they are over the flattened inputs (N, ...). The products are taken in the inputs'
    dtype (float32 inputs: float32 products of each chunk, summed in float64; about 4x faster than float64 for
    the statistics of a sample). Returns ``(S_hh, S_hx, m_h, m_x)``:
    ``E[p_hat p_hat^T]``, ``E[p_hat p^T]``, ``E[p_hat]`` and ``E[p]``, float64. With them, the layer weights W'
    minimising ``E||W p - W' p_hat||^2`` solve ``W' S_hh = W S_hx^T`` (``npconv.approximate``'s sequential fit).
    """
    x_hat = _check_input(x_hat, "x_hat", (2, 3, 4))
    x = _check_input(x, "x", (2, 3, 4))
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x must have the same shape, got {x_hat.shape} and {x.shape}")
    if x_hat.dtype != x.dtype:
        raise TypeError(f"x_hat and x must have the same dtype, got {x_hat.dtype} and {x.dtype}")
    if kernel is None:
        Ph = x_hat.reshape(len(x_hat), -1)
        Px = x.reshape(len(x), -1)
        n = Ph.shape[0]
        return ((Ph.T @ Ph).astype(np.float64) / n, (Ph.T @ Px).astype(np.float64) / n,
                Ph.mean(0, dtype=np.float64), Px.mean(0, dtype=np.float64))
    if x.ndim != 4:
        raise ValueError(f"x must have 4 dimensions (N, C, H, W) for a conv kernel, got shape {x.shape}")
    return _moments([x_hat, x], kernel, stride, padding, dilation, max_patches, random_state, chunk, x.dtype)


#: the arrays as_covariance returned (read-only), by id: handed back to it, they are not checked again
_CHECKED_COVARIANCES = weakref.WeakValueDictionary()


def as_covariance(cov, n, name="data_cov"):
    """Validate an (n, n) symmetric positive semi-definite matrix (NumPy or CuPy) and return it as a symmetrised
    float64 NumPy array (the checks of :func:`covariance_sqrt`, without the factor), read-only.

    An array this function returned is returned as it is, without the checks again (an eigenvalue decomposition of
    the matrix): a decomposition that validates once and hands the matrix to another one (``shared_separable`` to
    ``bicluster`` and ``share_filters``) pays for one check. Being read-only, it cannot have changed since."""
    if _CHECKED_COVARIANCES.get(id(cov)) is cov and cov.shape == (n, n):
        return cov
    c, _ = _checked_eigh(cov, n, name, vectors=False)
    c.flags.writeable = False
    _CHECKED_COVARIANCES[id(c)] = c
    return c


def _checked_eigh(cov, n, name, vectors):
    """(symmetrised float64 matrix, (eigenvalues, eigenvectors or None)) after the covariance checks."""
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
    if vectors:
        ev, Q = np.linalg.eigh(c)
    else:
        ev, Q = np.linalg.eigvalsh(c), None
    if ev[0] < -1e-6 * max(ev[-1], 0.0) - 1e-300:
        raise ValueError(f"{name} must be positive semi-definite, its smallest eigenvalue is {ev[0]:.3g} "
                         f"(largest {ev[-1]:.3g})")
    return c, (ev, Q)


def covariance_sqrt(cov, n, name="data_cov"):
    """Validate an (n, n) symmetric positive semi-definite matrix and return ``L`` (n, n) with ``L L^T = cov``.

    Small negative eigenvalues from round-off (down to ``-1e-6 * max``) are clipped to zero; a clearly
    indefinite, asymmetric, non-finite or all-zero matrix is a ValueError.
    """
    _, (ev, Q) = _checked_eigh(cov, n, name, vectors=True)
    return Q * np.sqrt(np.clip(ev, 0.0, None))
