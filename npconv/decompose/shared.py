"""Shared separable filters for a biclustered CP approximation (the paper's equation-3 variant).

A biclustered CP approximation (:func:`npconv.decompose.bicluster.bicluster`, ``method="cp"``) has ``G H K``
rank-1 components, each with its own separable spatial filter ``vert o horiz`` (X x Y). Here those spatial
filters are replaced by a collection of ``S < G H K`` shared separable filters, so that blocks share factors:

1. every component's spatial filter ``v_k h_k^T`` is normalised (unit Frobenius norm, largest-magnitude entry
   positive; the scale and sign go to the component's input factor) and the unit filters are clustered by
   k-means into ``S`` clusters;
2. each shared filter is the best rank-1 (separable) approximation of its cluster centre (leading singular
   pair), so it stays executable as a vertical then a horizontal pass;
3. with the spatial factors fixed, the remaining factors of every block (input C_g x K and output F_h x K) are
   refitted by alternating least squares (``refit_iter`` sweeps; each sweep cannot raise the error).

Execution gains from the sharing (:func:`npconv.functional.bicluster.shared_separable_conv2d`): the spatial
filtering is linear and per channel, so it commutes with the C_g -> K reduction. Each input channel of group g
is filtered ONCE by each shared filter the group uses (``U_g`` of them), and every component is then a
``C_g``-term combination of those filtered maps at the output resolution, followed by the usual K -> F_h
expansion (one GEMM per output group).

Cost (multiply-adds per image; input H x W, output H' x W', ``U_g`` = distinct shared filters used by group g)::

    sum_g C_g U_g (X H' W + Y H' W')      shared vertical (row stride, input width) + horizontal passes
  + C H K H' W'                           per-component combination of the C_g filtered maps
  + F G K H' W'                           expansion

(paper form: ``H' W -> N M / Delta_h`` and ``H' W' -> N M / Delta^2``). The plain bicluster CP layer costs
``G H K (H W C_g + X H' W + Y H' W' + F_h H' W')``: sharing pays when ``C_g U_g < H K`` (small input groups).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._validate import check_int, check_real
from ._kmeans import kmeans
from ._result import Decomposition, check_factor, check_random_state, check_tensor, result_class
from ._bicluster_data import refit_data_metric
from .bicluster import BiclusterCPResult, _check_groups, _GroupsMixin, bicluster
from .metrics import as_covariance
from .cost import Cost
from .cp import _solve_gram, khatri_rao

__all__ = ["shared_separable", "SharedSeparableResult", "share_filters"]


@result_class
class SharedSeparableResult(_GroupsMixin, Decomposition):
    """Biclustered CP approximation whose separable filters come from a shared collection.

    ``reduce`` (C, H, K) input factors (rows in ``in_perm`` order); ``assign`` (G, H, K) int64, the shared
    filter of each component; ``vertical`` (S, X) and ``horizontal`` (S, Y) the shared filters (unit norm);
    ``expand`` (F, G, K) output factors (rows in ``out_perm`` order). Block (g, h)::

        W~[out_perm[i], in_perm[j]] = sum_k expand[i, g, k] reduce[j, h, k] outer(vertical[s], horizontal[s]),
        s = assign[g, h, k]

    ``errors``: the relative Frobenius error of the whole kernel after the sharing and after every refit sweep
    (non-increasing); with a data-metric fit, after the sharing and of the returned factors (which the data
    metric may leave higher: it gives up accuracy in directions the inputs do not take). ``meta``: ``shape``,
    ``rank``, ``n_filters``, ``in_groups``, ``out_groups``, ``bicluster_error`` (the error of the unshared CP
    approximation it started from), ``data_metric``, and with it ``data_errors``.
    """
    FACTORS: ClassVar[tuple] = ("in_perm", "in_offsets", "reduce", "assign", "vertical", "horizontal", "expand",
                                "out_perm", "out_offsets")
    in_perm: np.ndarray
    in_offsets: np.ndarray
    reduce: np.ndarray
    assign: np.ndarray
    vertical: np.ndarray
    horizontal: np.ndarray
    expand: np.ndarray
    out_perm: np.ndarray
    out_offsets: np.ndarray

    def _validate(self):
        red = check_factor(self.reduce, "reduce", ndim=3)
        C, H, K = red.shape
        dt = red.dtype
        G = _check_groups(self.in_perm, self.in_offsets, C, "in")
        a = check_factor(self.assign, "assign", ndim=3, shape=(G, H, K), integer=True)
        v = check_factor(self.vertical, "vertical", ndim=2, dtype=dt)
        check_factor(self.horizontal, "horizontal", ndim=2, shape=(v.shape[0], None), dtype=dt)
        if a.size and (a.min() < 0 or a.max() >= v.shape[0]):
            raise ValueError(f"assign must index the {v.shape[0]} shared filters, got values in "
                             f"[{a.min()}, {a.max()}]")
        exp = check_factor(self.expand, "expand", ndim=3, shape=(None, G, K), dtype=dt)
        Hh = _check_groups(self.out_perm, self.out_offsets, exp.shape[0], "out")
        if Hh != H:
            raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {Hh}")

    @property
    def rank(self) -> int:
        return int(self.reduce.shape[2])

    @property
    def n_filters(self) -> int:
        return int(self.vertical.shape[0])

    @property
    def kernel_size(self) -> tuple:
        return (int(self.vertical.shape[1]), int(self.horizontal.shape[1]))

    @property
    def shape(self) -> tuple:
        return (self.expand.shape[0], self.reduce.shape[0]) + self.kernel_size

    def used_filters(self) -> list:
        """For every input group, the sorted indices of the shared filters its components use."""
        return [np.unique(self.assign[g]) for g in range(self.n_in_groups)]

    def n_params(self) -> int:
        return int(self.reduce.size + self.vertical.size + self.horizontal.size + self.expand.size)

    def to_tensor(self):
        F, C, X, Y = self.shape
        out = np.zeros((F, C, X, Y), self.reduce.dtype)
        for g in range(self.n_in_groups):
            i0, i1 = self.in_offsets[g], self.in_offsets[g + 1]
            for h in range(self.n_out_groups):
                o0, o1 = self.out_offsets[h], self.out_offsets[h + 1]
                s = self.assign[g, h]
                blk = np.einsum("fk,ck,kx,ky->fcxy", self.expand[o0:o1, g], self.reduce[i0:i1, h],
                                self.vertical[s], self.horizontal[s])
                out[np.ix_(self.out_perm[o0:o1], self.in_perm[i0:i1])] = blk
        return out

    def cost(self, in_shape, *, stride=1, padding=0, form="exact"):
        """Multiply-adds per image and parameters of the shared execution (``cost.shared_separable_cost``)."""
        from .cost import Cost, shared_separable_cost
        cg = np.diff(self.in_offsets)
        fh = np.diff(self.out_offsets)
        used = [u.shape[0] for u in self.used_filters()]
        c = shared_separable_cost(tuple(in_shape), int(fh.sum()), self.kernel_size, cg.shape[0], fh.shape[0],
                                  self.rank, self.n_filters, filters_used=used, in_group_sizes=[int(c) for c in cg], stride=stride, padding=padding,
                                  form=form)
        return Cost(c.macs, self.n_params())

    def to_layer(self, *, bias=None, stride=1, padding=0):
        """A :class:`npconv.layers.bicluster.SharedSeparableConv2d` executing the shared factors."""
        from ..layers.bicluster import SharedSeparableConv2d
        return SharedSeparableConv2d.from_result(self, bias=bias, stride=stride, padding=padding)


def _unit_filters(vert, horiz):
    """(n, X*Y) unit spatial filters of the components, their scales and signs; zero components scale 0."""
    n = vert.shape[0]
    filt = np.einsum("nx,ny->nxy", vert, horiz).reshape(n, -1)
    scale = np.linalg.norm(filt, axis=1)
    ok = scale > 0
    unit = np.zeros_like(filt)
    unit[ok] = filt[ok] / scale[ok, None]
    idx = np.argmax(np.abs(unit), axis=1)
    sign = np.sign(unit[np.arange(n), idx])
    sign[sign == 0] = 1.0
    unit *= sign[:, None]
    return unit, scale * sign, ok


def _rank1(M):
    """Best separable approximation direction of an X x Y matrix: unit (u, v) with u's largest entry > 0."""
    U, s, Vt = np.linalg.svd(M)
    u, v = U[:, 0], Vt[0]
    k = int(np.argmax(np.abs(u)))
    if u[k] < 0:
        u, v = -u, -v
    return u, v, s[0]


def _block_error2(B, fo, fi, V, Hz):
    approx = np.einsum("fk,ck,xk,yk->fcxy", fo, fi, V, Hz)
    return float(np.sum((B - approx) ** 2))


def _refit_block(B, fo, fi, V, Hz):
    """One ALS sweep over the output then the input factor of a block with fixed spatial factors V, Hz."""
    fh, cg = B.shape[:2]
    gv = (V.T @ V) * (Hz.T @ Hz)
    # output factor: B_(0) (fh, cg*X*Y) = fo @ khatri_rao(fi, V, Hz).T
    kr = khatri_rao([fi, V, Hz])
    fo = _solve_gram((fi.T @ fi) * gv, B.reshape(fh, -1) @ kr)
    kr = khatri_rao([fo, V, Hz])
    B1 = np.moveaxis(B, 1, 0).reshape(cg, -1)
    fi = _solve_gram((fo.T @ fo) * gv, B1 @ kr)
    return fo, fi


def share_filters(W, base, n_filters, *, refit_iter=20, tol=1e-7, n_init=10, random_state=None, callback=None,
                  data_cov=None, data_iter=10):
    """Replace the spatial filters of a biclustered CP result ``base`` by ``n_filters`` shared ones (see the
    module doc) and refit the other factors of every block to ``W``.

    Parameters
    ----------
    W : ndarray (F, C, X, Y), the kernel ``base`` approximates (the refit target)
    base : BiclusterCPResult
    n_filters : int, 1 <= n_filters < the number of components G H K (at most the non-zero ones)
    refit_iter : int >= 0, ALS sweeps of the refit (0: keep the projected factors)
    tol : float >= 0, stop the refit when a sweep lowers the relative error by less than ``tol``
    n_init, random_state : k-means restarts and randomness
    callback : called with ``{"stage": "cluster_filters", ...}`` during k-means,
        ``{"stage": "refit", "iteration": i, "error": e}`` after every refit sweep and, with ``data_cov``,
        ``{"stage": "data_fit", "sweep": i, "error": e}`` after every data-metric sweep.
    data_cov, data_iter : the (C X Y)^2 second moment of the layer's input patches and the most sweeps: the input
        and output factors are then refitted in the data metric (the shared filters fixed), as
        :func:`npconv.decompose.bicluster.bicluster` refits its blocks; ``meta["data_errors"]`` holds the errors.
    """
    W = check_tensor(W, "W", ndim=4)
    if not isinstance(base, BiclusterCPResult):
        raise TypeError(f"base must be a BiclusterCPResult (bicluster(..., method='cp')), got {type(base).__name__}")
    if tuple(base.shape) != tuple(W.shape):
        raise ValueError(f"base approximates a kernel of shape {base.shape}, but W has shape {W.shape}")
    G, H, K, X = base.vertical.shape
    Y = base.horizontal.shape[3]
    n = G * H * K
    S = check_int(n_filters, "n_filters", min_value=1)
    if S >= n:
        raise ValueError(f"n_filters must be smaller than the number of components G*H*K = {n} (sharing needs "
                         f"fewer filters than components), got {S}")
    refit_iter = check_int(refit_iter, "refit_iter", min_value=0)
    tol = check_real(tol, "tol", min_value=0.0)
    n_init = check_int(n_init, "n_init", min_value=1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    rng = check_random_state(random_state)
    data_iter = check_int(data_iter, "data_iter", min_value=1)
    F, C, X0, Y0 = W.shape
    if data_cov is not None:
        data_cov = as_covariance(data_cov, C * X0 * Y0, "data_cov")

    Wd = W.astype(np.float64)
    vert = base.vertical.astype(np.float64).reshape(n, X)
    horiz = base.horizontal.astype(np.float64).reshape(n, Y)
    unit, scale, ok = _unit_filters(vert, horiz)
    n_ok = int(ok.sum())
    if S > n_ok:
        raise ValueError(f"n_filters must be <= the number of non-zero components ({n_ok}), got {S}")
    cb = None if callback is None else (lambda info: callback({"stage": "cluster_filters", **info}))
    km = kmeans(unit[ok], S, n_init=n_init, random_state=rng, callback=cb)
    labels = np.zeros(n, np.int64)
    labels[ok] = km.labels
    sv = np.zeros((S, X))
    sh = np.zeros((S, Y))
    for s in range(S):
        u, v, _ = _rank1(km.centers[s].astype(np.float64).reshape(X, Y))
        sv[s], sh[s] = u, v
    # projection: the component keeps its direction's best scalar on its shared filter
    proj = np.einsum("nxy,nxy->n", unit.reshape(n, X, Y), np.einsum("nx,ny->nxy", sv[labels], sh[labels]))
    coef = (scale * proj).reshape(G, H, K)
    assign = labels.reshape(G, H, K)

    reduce = np.empty(base.reduce.shape)
    expand = base.expand.astype(np.float64).copy()
    in_off, out_off = base.in_offsets, base.out_offsets
    for g in range(G):
        i0, i1 = int(in_off[g]), int(in_off[g + 1])
        reduce[i0:i1] = base.reduce[i0:i1].astype(np.float64) * coef[g][None]
    norm2 = float(np.sum(Wd * Wd))

    blocks = []
    for g in range(G):
        i0, i1 = int(in_off[g]), int(in_off[g + 1])
        ci = base.in_perm[i0:i1]
        for h in range(H):
            o0, o1 = int(out_off[h]), int(out_off[h + 1])
            blocks.append((g, h, i0, i1, o0, o1, Wd[np.ix_(base.out_perm[o0:o1], ci)]))

    def total_error2():
        e = 0.0
        for g, h, i0, i1, o0, o1, B in blocks:
            s = assign[g, h]
            e += _block_error2(B, expand[o0:o1, g], reduce[i0:i1, h], sv[s].T, sh[s].T)
        return e

    errors = [float(np.sqrt(total_error2() / norm2))]
    # with data_cov the weight-metric refit is skipped: the data-metric refit below replaces it
    for it in range(1, (refit_iter if data_cov is None else 0) + 1):
        new_red = reduce.copy()
        new_exp = expand.copy()
        for g, h, i0, i1, o0, o1, B in blocks:
            s = assign[g, h]
            fo, fi = _refit_block(B, new_exp[o0:o1, g], new_red[i0:i1, h], sv[s].T, sh[s].T)
            new_exp[o0:o1, g] = fo
            new_red[i0:i1, h] = fi
        # the expand rows of output group h are shared by no other block, nor reduce rows of (g, h): the
        # blocks are independent, so each block's sweep lowers the total
        old_red, old_exp = reduce, expand
        reduce, expand = new_red, new_exp
        err = float(np.sqrt(total_error2() / norm2))
        if err > errors[-1]:
            reduce, expand = old_red, old_exp  # rounding-level increase: keep the previous iterate
            break
        errors.append(err)
        if callback is not None:
            callback({"stage": "refit", "iteration": it, "error": err})
        if errors[-2] - errors[-1] < tol:
            break
    dt = W.dtype
    meta = {"shape": tuple(W.shape), "rank": K, "n_filters": S, "in_groups": G, "out_groups": H,
            "bicluster_error": base.errors[-1] if base.errors else None, "data_metric": data_cov is not None}
    if data_cov is not None:
        # the shared filters of every component, stacked per block, fixed; reduce and expand refitted in place
        factors = (reduce, sv[assign], sh[assign], expand)
        meta["data_errors"] = tuple(refit_data_metric(Wd, data_cov, base.in_perm, in_off, base.out_perm, out_off,
                                                      factors, "cp", n_iter=data_iter, tol=tol, callback=callback,
                                                      spatial=False))
        errors.append(float(np.sqrt(total_error2() / norm2)))
    return SharedSeparableResult(base.in_perm.copy(), base.in_offsets.copy(), reduce.astype(dt),
                                 assign.astype(np.int64), sv.astype(dt), sh.astype(dt), expand.astype(dt),
                                 base.out_perm.copy(), base.out_offsets.copy(), errors=errors, meta=meta)


def shared_separable(W, G, H, *, rank, n_filters, equal_size=True, n_iter=200, tol=1e-7, cp_algorithm="als",
                     refit_iter=20, n_init=10, random_state=None, callback=None, init=None, data_cov=None,
                     data_iter=10):
    """Biclustered CP approximation with ``n_filters`` shared separable filters.

    Parameters
    ----------
    W : ndarray (F, C, X, Y), float32 or float64, finite, not all zero
    G, H, rank, equal_size, n_iter, tol, cp_algorithm, n_init : as :func:`npconv.decompose.bicluster.bicluster`
        with ``method="cp"`` (``tol`` also stops the refit).
    n_filters : int, 1 <= n_filters < G * H * rank
    refit_iter : int >= 0, ALS sweeps refitting the input/output factors after the sharing
    random_state : None, int, SeedSequence or Generator (a fixed value gives identical results)
    callback : callable or None, forwarded to both stages (dicts with a ``"stage"`` key)
    init : BiclusterCPResult or None
        Start from this biclustered CP result instead of computing one (``G``, ``H`` and ``rank`` must match).
    data_cov, data_iter : fit in the data metric of the layer's input patches: the biclustered CP blocks (see
        ``bicluster``), then, after the sharing, the input and output factors (see ``share_filters``).

    Returns
    -------
    SharedSeparableResult
    """
    W = check_tensor(W, "W", ndim=4)
    rng = check_random_state(random_state)
    if data_cov is not None:     # checked once here; bicluster and share_filters take the checked matrix as it is
        F, C, X, Y = W.shape
        data_cov = as_covariance(data_cov, C * X * Y, "data_cov")
    if init is None:
        base = bicluster(W, G, H, method="cp", rank=rank, equal_size=equal_size, n_iter=n_iter, tol=tol,
                         cp_algorithm=cp_algorithm, n_init=n_init, random_state=rng, callback=callback,
                         data_cov=data_cov, data_iter=data_iter)
    else:
        if not isinstance(init, BiclusterCPResult):
            raise TypeError(f"init must be a BiclusterCPResult or None, got {type(init).__name__}")
        G = check_int(G, "G", min_value=1)
        H = check_int(H, "H", min_value=1)
        rank = check_int(rank, "rank", min_value=1)
        if (init.n_in_groups, init.n_out_groups, init.rank) != (G, H, rank):
            raise ValueError(f"init has G={init.n_in_groups}, H={init.n_out_groups}, rank={init.rank}; "
                             f"expected G={G}, H={H}, rank={rank}")
        base = init
    return share_filters(W, base, n_filters, refit_iter=refit_iter, tol=tol, n_init=n_init, random_state=rng,
                         callback=callback, data_cov=data_cov, data_iter=data_iter)
