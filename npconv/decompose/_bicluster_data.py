"""Refitting a biclustered approximation in the data metric (``bicluster(..., data_cov=S)``).

With ``S = E[p p^T]`` the second moment of the layer's input patches (entry order ``(c, x, y)``), the error of
the layer's output is ``E||(W - W~) p||^2 = tr(D S D^T)``, ``D = W - W~`` as an F x (C X Y) matrix. The rows of
different output groups do not interact, but within output group h the blocks of all input groups do:
``tr(D_h S D_h^T) = sum_{g,g'} tr(D_{g,h} S_{g g'} D_{g',h}^T)``, so channels of different input groups that are
correlated in the data couple their blocks.

Starting from the weight-metric fit, every factor of every block is replaced in turn by the exact minimiser of
the total objective with everything else fixed (block coordinate descent, so the error never increases). As a
function of block (g, h)'s rebuilt kernel ``A`` (F_h x n_g, n_g = C_g X Y) with the other blocks fixed, the
objective is ``tr(A S_gg A^T) - 2 tr(A Q^T) + const`` with ``Q = R S[:, g]``, where R is the residual of
output group h without block g's term. Each factor enters ``A = E M`` linearly:

* the expansion E (F_h x K): ``E = Q M^T (M S_gg M^T)^+``;
* the SVD form's spatial core (K2 x K1 X Y, with ``M = core P``, ``P = reduce^T (x) I``):
  ``core = (E^T E)^+ E^T Q P^T (P S_gg P^T)^+``;
* every other factor (the SVD form's reduction, the CP form's reduction, vertical and horizontal factors) by
  its normal equations, ``G vec(factor) = r``, built from ``S_gg`` contracted with the fixed factors.

Least-squares solves (``^+`` above) keep a singular ``S`` (inputs confined to a subspace) harmless: the normal
equations stay consistent there, because the range of ``S[g, :]`` lies in the range of ``S_gg``.
"""
from __future__ import annotations

import numpy as np

from ._linalg import solve_psd as _solve_psd

__all__ = ["refit_data_metric", "block_term"]


def _expand_step(Q, M, Sgg):
    """E minimising ``tr(E M S M^T E^T) - 2 tr(E M Q^T)``."""
    Gm = M @ Sgg @ M.T
    return _solve_psd(Gm, M @ Q.T).T


def _mode_step(Q, E, Sgg6, others, mode):
    """The factor of ``mode`` (0: channels, 1: vertical taps, 2: horizontal taps) of a CP block, (I_mode, K),
    given the other two as (I, K) matrices in ``others``; block term ``A[f, (c,x,y)] = sum_k E[f,k] F0[c,k]
    F1[x,k] F2[y,k]``."""
    K = E.shape[1]
    A = E.T @ E                                                   # (K, K)
    sizes = Sgg6.shape[:3]
    Bq = (E.T @ Q).reshape((K,) + sizes)                          # (K, C, X, Y)
    # psi[k, i, j] over the other two modes, in their order
    psi = np.einsum("ik,jk->kij", others[0], others[1])
    S = np.moveaxis(Sgg6, (mode, 3 + mode), (0, 3))               # (I, a, b, I, a', b')
    n = sizes[mode]
    psi2 = psi.reshape(K, -1)
    S4 = S.reshape(n, -1, n, psi2.shape[1])
    T = np.einsum("kr,arbs,ms->akbm", psi2, S4, psi2, optimize=True)
    G = (T * A[None, :, None, :]).reshape(n * K, n * K)
    Bm = np.moveaxis(Bq, mode + 1, 1).reshape(K, n, -1)          # (K, I, rest)
    r = np.einsum("kar,kr->ak", Bm, psi2).reshape(n * K)
    return _solve_psd(G, r).reshape(n, K)


def _cp_block_update(Q, Sgg6, E, R, V, Z, spatial=True):
    """One pass over a CP block's factors: E (F_h, K), R (C_g, K), V (X, K), Z (Y, K); with ``spatial=False``
    the spatial factors V and Z stay as they are (shared filters)."""
    n = Q.shape[1]

    def M_of(R, V, Z):
        return np.einsum("ck,xk,yk->kcxy", R, V, Z).reshape(R.shape[1], n)

    Sgg = Sgg6.reshape(n, n)
    E = _expand_step(Q, M_of(R, V, Z), Sgg)
    R = _mode_step(Q, E, Sgg6, (V, Z), 0)
    if spatial:
        V = _mode_step(Q, E, Sgg6, (R, Z), 1)
        Z = _mode_step(Q, E, Sgg6, (R, V), 2)
    # unit columns for R, V and Z (a zero column stays zero), then the best expansion for them: the scales
    # stay balanced, and the span of M's rows, so the objective, is unchanged by the normalisation
    for F in ((R, V, Z) if spatial else (R,)):
        nrm = np.linalg.norm(F, axis=0)
        nz = nrm > 0
        F[:, nz] /= nrm[nz]
    E = _expand_step(Q, M_of(R, V, Z), Sgg)
    return E, R, V, Z, E @ M_of(R, V, Z)


def _svd_block_update(Q, Sgg6, E, U, S):
    """One pass over an SVD block's factors: E (F_h, K2), U (C_g, K1) the reduction, S (K2, K1, X, Y)."""
    cg, X, Y = Sgg6.shape[:3]
    P = X * Y
    n = cg * P
    K2, K1 = S.shape[:2]
    Sgg = Sgg6.reshape(n, n)
    S4 = Sgg6.reshape(cg, P, cg, P)

    def M_of(U, S):
        return np.einsum("mkp,ck->mcp", S.reshape(K2, K1, P), U).reshape(K2, n)

    E = _expand_step(Q, M_of(U, S), Sgg)
    A = E.T @ E
    # the core: A core B = E^T Q P^T with B = P S_gg P^T
    QP = np.einsum("fcp,ck->fkp", Q.reshape(-1, cg, P), U).reshape(-1, K1 * P)
    B = np.tensordot(np.tensordot(U, S4, axes=(0, 0)), U, axes=(2, 0))         # (k, p, q, m)
    B = B.transpose(0, 1, 3, 2).reshape(K1 * P, K1 * P)
    core = _solve_psd(A, E.T @ QP)                                # (K2, K1 P)
    core = _solve_psd(B, core.T).T
    S = core.reshape(K2, K1, X, Y)
    # the reduction: G vec(U) = r, vec in (c, k1) order
    S3 = S.reshape(K2, K1, P)
    Shat = np.tensordot(S3, np.tensordot(A, S3, axes=(1, 0)), axes=(0, 0))    # (K1, P, K1, P)
    # G[c, k, d, l] = sum_{p,q} S4[c, p, d, q] Shat[k, p, l, q], as one GEMM
    G = (S4.transpose(0, 2, 1, 3).reshape(cg * cg, P * P)
         @ Shat.transpose(0, 2, 1, 3).reshape(K1 * K1, P * P).T)
    G = G.reshape(cg, cg, K1, K1).transpose(0, 2, 1, 3).reshape(cg * K1, cg * K1)
    Bq = (E.T @ Q).reshape(K2, cg, P)
    r = np.einsum("mcp,mkp->ck", Bq, S3).reshape(cg * K1)
    U = _solve_psd(G, r).reshape(cg, K1)
    # orthonormal reduction (its R factor into the core), then the best expansion for the result
    Uq, Ur = np.linalg.qr(U)
    S = np.einsum("mkxy,lk->mlxy", S, Ur)
    U = Uq
    E = _expand_step(Q, M_of(U, S), Sgg)
    return E, U, S, E @ M_of(U, S)


def block_term(method, factors, in_off, out_off, g, h):
    """Block (g, h) of the approximation, (F_h, C_g X Y), from the stacked factors (the module doc of
    ``npconv.decompose.bicluster`` gives their layout): (reduce, vertical, horizontal, expand) for "cp",
    (reduce, spatial, expand) for "svd"."""
    i0, i1 = int(in_off[g]), int(in_off[g + 1])
    o0, o1 = int(out_off[h]), int(out_off[h + 1])
    if method == "cp":
        red, vert, hor, exp = factors
        M = np.einsum("ck,kx,ky->kcxy", red[i0:i1, h], vert[g, h], hor[g, h])
    else:
        red, spat, exp = factors
        M = np.tensordot(spat[g, h], red[i0:i1, h], axes=(1, 1)).transpose(0, 3, 1, 2)    # (K2, C_g, X, Y)
    return exp[o0:o1, g] @ M.reshape(M.shape[0], -1)


def refit_data_metric(Wd, cov, in_perm, in_off, out_perm, out_off, factors, method, *, n_iter, tol,
                      callback=None, spatial=True):
    """Refine the stacked float64 factors of a biclustered fit of ``Wd`` (F, C, X, Y) in the data metric of
    ``cov`` ((C X Y)^2, validated). ``factors``: (reduce, vertical, horizontal, expand) for ``method="cp"``,
    (reduce, spatial, expand) for ``"svd"``; updated in place. ``spatial=False`` (CP) keeps the vertical and
    horizontal factors (shared filters) and refits the others. Returns the relative data-metric errors
    ``sqrt(tr(D S D^T) / tr(W S W^T))``, one before the first sweep and one after each."""
    F, C, X, Y = Wd.shape
    P = X * Y
    idx = (np.asarray(in_perm)[:, None] * P + np.arange(P)[None, :]).ravel()
    Sp = cov[np.ix_(idx, idx)]
    Sp = 0.5 * (Sp + Sp.T)
    G = len(in_off) - 1
    H = len(out_off) - 1
    Wp = Wd[:, in_perm].reshape(F, C * P)                         # columns in permuted (c, x, y) order

    Wh = [Wp[out_perm[int(out_off[h]):int(out_off[h + 1])]] for h in range(H)]

    def residual(h):
        """Output group h's residual (F_h, C X Y), rebuilt from the factors (no drift from sweep to sweep)."""
        return Wh[h] - np.concatenate([block_term(method, factors, in_off, out_off, g, h) for g in range(G)], axis=1)

    Rh = [residual(h) for h in range(H)]
    ref = sum(float(np.sum((w @ Sp) * w)) for w in Wh)
    if ref <= 0.0:
        raise ValueError("data_cov gives the layer's output zero energy (tr(W S W^T) = 0): the data metric is "
                         "undefined")

    def objective():
        return sum(float(np.sum((r @ Sp) * r)) for r in Rh)

    errs = [float(np.sqrt(max(objective(), 0.0) / ref))]
    snapshot = [f.copy() for f in factors]
    for sweep in range(n_iter):
        for h in range(H):
            o0, o1 = int(out_off[h]), int(out_off[h + 1])
            for g in range(G):
                i0, i1 = int(in_off[g]), int(in_off[g + 1])
                c0, c1 = i0 * P, i1 * P
                old = block_term(method, factors, in_off, out_off, g, h)
                Rm = Rh[h].copy()
                Rm[:, c0:c1] += old
                Q = Rm @ Sp[:, c0:c1]
                Sgg6 = Sp[c0:c1, c0:c1].reshape(i1 - i0, X, Y, i1 - i0, X, Y)
                if method == "cp":
                    red, vert, hor, exp = factors
                    E, R, V, Z, new = _cp_block_update(Q, Sgg6, exp[o0:o1, g].copy(), red[i0:i1, h].copy(),
                                                       vert[g, h].T.copy(), hor[g, h].T.copy(), spatial)
                    exp[o0:o1, g], red[i0:i1, h], vert[g, h], hor[g, h] = E, R, V.T, Z.T
                else:
                    red, spat, exp = factors
                    E, U, S, new = _svd_block_update(Q, Sgg6, exp[o0:o1, g].copy(), red[i0:i1, h].copy(),
                                                     spat[g, h].copy())
                    exp[o0:o1, g], red[i0:i1, h], spat[g, h] = E, U, S
                Rm[:, c0:c1] -= new
                Rh[h] = Rm
        Rh = [residual(h) for h in range(H)]
        e = float(np.sqrt(max(objective(), 0.0) / ref))
        if e > errs[-1] * (1 + 1e-12) + 1e-15:
            # rounding made the sweep worse: keep the previous factors and stop
            for f, s in zip(factors, snapshot):
                f[...] = s
            break
        errs.append(e)
        if callback is not None:
            callback({"stage": "data_fit", "sweep": sweep + 1, "error": e})
        if errs[-2] - e <= tol * errs[-2]:
            break
        snapshot = [f.copy() for f in factors]
    return errs
