"""Biclustered approximation of a conv kernel (paper section 4.4).

The input channels of ``W`` (F, C, X, Y) are clustered into ``G`` groups and the output channels into ``H``
groups by k-means on their weight vectors (``W[:, c]`` flattened for an input channel, ``W[f]`` for an output
channel). Each of the ``G H`` blocks ``W_{g,h}`` (F_h, C_g, X, Y) is then approximated on its own:

* ``method="cp"`` (rank K): ``W_{g,h} ~ sum_k out_k o in_k o vert_k o horiz_k``, executed as a C_g -> K 1x1
  reduction, a vertical X x 1 pass, a horizontal 1 x Y pass (separable) and a K -> F_h 1x1 expansion.
* ``method="svd"`` (ranks K1, K2), two successive SVDs as in the paper: ``W_{g,h}`` as the matrix
  C_g x (X Y F_h) gives the C_g -> K1 reduction; the remaining K1 X Y x F_h matrix gives a K1 -> K2 X x Y conv
  and a K2 -> F_h expansion.

Groups
------
With ``equal_size=True`` (default) the clusters are balanced: every group has ``n // k`` or ``n // k + 1``
channels, so a channel count that ``G`` (or ``H``) does not divide still works (the groups then differ by one
channel). ``equal_size=False`` runs plain k-means and groups may have any size >= 1. Groups are stored as a
permutation plus offsets: the channels of input group ``g`` are ``in_perm[in_offsets[g]:in_offsets[g+1]]``
(ascending), and the stacked factors follow that order, so the blocks of every group are contiguous.

Stacked factors (rows in permuted channel order)
------------------------------------------------
CP: ``reduce`` (C, H, K), ``vertical`` (G, H, K, X), ``horizontal`` (G, H, K, Y), ``expand`` (F, G, K); the CP
weights are folded into ``expand``. Block (g, h) is::

    W~[out_perm[i], in_perm[j], x, y] =
        sum_k expand[i, g, k] reduce[j, h, k] vertical[g, h, k, x] horizontal[g, h, k, y]

for ``i`` in output group h and ``j`` in input group g.

SVD: ``reduce`` (C, H, K1), ``spatial`` (G, H, K2, K1, X, Y), ``expand`` (F, G, K2)::

    W~[out_perm[i], in_perm[j], x, y] = sum_{k1,k2} expand[i, g, k2] spatial[g, h, k2, k1, x, y] reduce[j, h, k1]

Cost (multiply-adds per image, input H_in x W_in, output H' x W')
------------------------------------------------------------------------
CP: ``sum_{g,h} K (H_in W_in C_g + X H' W_in + Y H' W' + F_h H' W')``;
SVD: ``sum_{g,h} (H_in W_in C_g K1 + H' W' X Y K1 K2 + H' W' K2 F_h)``. For equal groups these are
``npconv.decompose.cost.bicluster_cp_cost`` / ``bicluster_svd_cost`` (``form="exact"``).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._validate import as_padding4, as_pair, check_int, check_option, check_real, out_size
from ._kmeans import kmeans
from ._result import Decomposition, check_factor, check_random_state, check_tensor, result_class, svd_flip
from .cost import Cost
from .cp import cp_als, cp_greedy, max_cp_rank
from .metrics import as_covariance
from ._bicluster_data import block_term, refit_data_metric

__all__ = ["bicluster", "BiclusterCPResult", "BiclusterSVDResult", "channel_groups", "max_bicluster_ranks"]


# --------------------------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------------------------
def channel_groups(labels, k):
    """Labels (n,) in [0, k) -> (perm, offsets): channels sorted by group (ascending inside a group)."""
    labels = np.asarray(labels, dtype=np.int64)
    perm = np.argsort(labels, kind="stable").astype(np.int64)
    counts = np.bincount(labels, minlength=k)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return perm, offsets


def _check_groups(perm, offsets, n, name):
    check_factor(perm, f"{name}_perm", ndim=1, shape=(n,), integer=True)
    check_factor(offsets, f"{name}_offsets", ndim=1, integer=True)
    if not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError(f"{name}_perm must be a permutation of range({n})")
    if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 1):
        raise ValueError(f"{name}_offsets must rise strictly from 0 to {n} (every group non-empty), got "
                         f"{offsets.tolist()}")
    return offsets.shape[0] - 1


class _GroupsMixin:
    """Group accessors shared by the bicluster-style results."""

    @property
    def n_in_groups(self) -> int:
        return int(self.in_offsets.shape[0] - 1)

    @property
    def n_out_groups(self) -> int:
        return int(self.out_offsets.shape[0] - 1)

    @property
    def in_groups(self) -> list:
        """Input channel indices of every group (a list of G int arrays)."""
        return [self.in_perm[self.in_offsets[g]:self.in_offsets[g + 1]] for g in range(self.n_in_groups)]

    @property
    def out_groups(self) -> list:
        return [self.out_perm[self.out_offsets[h]:self.out_offsets[h + 1]] for h in range(self.n_out_groups)]

    @property
    def in_labels(self) -> np.ndarray:
        lab = np.empty(self.in_perm.shape[0], np.int64)
        lab[self.in_perm] = np.repeat(np.arange(self.n_in_groups), np.diff(self.in_offsets))
        return lab

    @property
    def out_labels(self) -> np.ndarray:
        lab = np.empty(self.out_perm.shape[0], np.int64)
        lab[self.out_perm] = np.repeat(np.arange(self.n_out_groups), np.diff(self.out_offsets))
        return lab

    @property
    def equal_groups(self) -> bool:
        return len(set(np.diff(self.in_offsets).tolist())) == 1 and len(set(np.diff(self.out_offsets).tolist())) == 1

    def _geometry(self, in_shape, stride, padding, form):
        if not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W) without the batch axis, got {in_shape!r}")
        C, Hin, Win = (check_int(v, "in_shape", min_value=1) for v in in_shape)
        if C != self.in_perm.shape[0]:
            raise ValueError(f"in_shape must have {self.in_perm.shape[0]} channels, got {C}")
        X, Y = self.kernel_size
        sh, sw = as_pair(stride, "stride")
        pt, pb, pl, pr = as_padding4(padding)
        form = check_option(form, "form", {"exact", "paper"})
        Ho = out_size(Hin, X, sh, pt, pb, what="output height")
        Wo = out_size(Win, Y, sw, pl, pr, what="output width")
        if form == "exact":
            return dict(n_in=Hin * Win, n_out=Ho * Wo, n_rows=Ho * Win, X=X, Y=Y)
        n_in = float(Hin * Win)
        return dict(n_in=n_in, n_out=n_in / (sh * sw), n_rows=n_in / sh, X=X, Y=Y)


# --------------------------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------------------------
@result_class
class BiclusterCPResult(_GroupsMixin, Decomposition):
    """Biclustered CP approximation (see the module doc for the layout of the stacked factors).

    ``errors``: the relative Frobenius error of the whole kernel (one value). ``meta``: ``shape``, ``method``
    ("cp"), ``rank``, ``in_groups`` G, ``out_groups`` H, ``block_errors`` ((G, H) relative errors of the blocks),
    ``cp_algorithm``.
    """
    FACTORS: ClassVar[tuple] = ("in_perm", "in_offsets", "reduce", "vertical", "horizontal", "expand",
                                "out_perm", "out_offsets")
    in_perm: np.ndarray
    in_offsets: np.ndarray
    reduce: np.ndarray
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
        vert = check_factor(self.vertical, "vertical", ndim=4, shape=(G, H, K, None), dtype=dt)
        check_factor(self.horizontal, "horizontal", ndim=4, shape=(G, H, K, None), dtype=dt)
        exp = check_factor(self.expand, "expand", ndim=3, shape=(None, G, K), dtype=dt)
        Hh = _check_groups(self.out_perm, self.out_offsets, exp.shape[0], "out")
        if Hh != H:
            raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {Hh}")
        del vert

    @property
    def rank(self) -> int:
        return int(self.reduce.shape[2])

    @property
    def kernel_size(self) -> tuple:
        return (int(self.vertical.shape[3]), int(self.horizontal.shape[3]))

    @property
    def shape(self) -> tuple:
        return (self.expand.shape[0], self.reduce.shape[0]) + self.kernel_size

    def n_params(self) -> int:
        return int(self.reduce.size + self.vertical.size + self.horizontal.size + self.expand.size)

    def to_tensor(self):
        F, C, X, Y = self.shape
        out = np.zeros((F, C, X, Y), self.reduce.dtype)
        for g in range(self.n_in_groups):
            i0, i1 = self.in_offsets[g], self.in_offsets[g + 1]
            for h in range(self.n_out_groups):
                o0, o1 = self.out_offsets[h], self.out_offsets[h + 1]
                blk = np.einsum("fk,ck,kx,ky->fcxy", self.expand[o0:o1, g], self.reduce[i0:i1, h],
                                self.vertical[g, h], self.horizontal[g, h])
                out[np.ix_(self.out_perm[o0:o1], self.in_perm[i0:i1])] = blk
        return out

    def cost(self, in_shape, *, stride=1, padding=0, form="exact"):
        """Multiply-adds per image and parameters, as executed (see the module doc)."""
        geo = self._geometry(in_shape, stride, padding, form)
        K = self.rank
        cg = np.diff(self.in_offsets)
        fh = np.diff(self.out_offsets)
        H, G = fh.shape[0], cg.shape[0]
        if form == "exact":
            sp = geo["X"] * geo["n_rows"] + geo["Y"] * geo["n_out"]
        else:
            sp = geo["X"] * geo["Y"] * geo["n_out"]
        macs = K * (H * geo["n_in"] * cg.sum() + G * H * sp + G * geo["n_out"] * fh.sum())
        return Cost(int(macs) if form == "exact" else float(macs), self.n_params())

    def to_layer(self, *, bias=None, stride=1, padding=0):
        """A :class:`npconv.layers.bicluster.BiclusterConv2d` executing the factors (never the rebuilt kernel)."""
        from ..layers.bicluster import BiclusterConv2d
        return BiclusterConv2d.from_result(self, bias=bias, stride=stride, padding=padding)


@result_class
class BiclusterSVDResult(_GroupsMixin, Decomposition):
    """Biclustered two-stage SVD approximation (see the module doc for the layout of the stacked factors).

    ``errors``: the relative Frobenius error of the whole kernel (one value). ``meta``: ``shape``, ``method``
    ("svd"), ``ranks`` (K1, K2), ``in_groups``, ``out_groups``, ``block_errors``.
    """
    FACTORS: ClassVar[tuple] = ("in_perm", "in_offsets", "reduce", "spatial", "expand", "out_perm", "out_offsets")
    in_perm: np.ndarray
    in_offsets: np.ndarray
    reduce: np.ndarray
    spatial: np.ndarray
    expand: np.ndarray
    out_perm: np.ndarray
    out_offsets: np.ndarray

    def _validate(self):
        red = check_factor(self.reduce, "reduce", ndim=3)
        C, H, K1 = red.shape
        dt = red.dtype
        G = _check_groups(self.in_perm, self.in_offsets, C, "in")
        sp = check_factor(self.spatial, "spatial", ndim=6, shape=(G, H, None, K1, None, None), dtype=dt)
        exp = check_factor(self.expand, "expand", ndim=3, shape=(None, G, sp.shape[2]), dtype=dt)
        Hh = _check_groups(self.out_perm, self.out_offsets, exp.shape[0], "out")
        if Hh != H:
            raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {Hh}")

    @property
    def ranks(self) -> tuple:
        return (int(self.reduce.shape[2]), int(self.spatial.shape[2]))

    @property
    def kernel_size(self) -> tuple:
        return (int(self.spatial.shape[4]), int(self.spatial.shape[5]))

    @property
    def shape(self) -> tuple:
        return (self.expand.shape[0], self.reduce.shape[0]) + self.kernel_size

    def n_params(self) -> int:
        return int(self.reduce.size + self.spatial.size + self.expand.size)

    def to_tensor(self):
        F, C, X, Y = self.shape
        out = np.zeros((F, C, X, Y), self.reduce.dtype)
        for g in range(self.n_in_groups):
            i0, i1 = self.in_offsets[g], self.in_offsets[g + 1]
            for h in range(self.n_out_groups):
                o0, o1 = self.out_offsets[h], self.out_offsets[h + 1]
                blk = np.einsum("fm,mkxy,ck->fcxy", self.expand[o0:o1, g], self.spatial[g, h],
                                self.reduce[i0:i1, h])
                out[np.ix_(self.out_perm[o0:o1], self.in_perm[i0:i1])] = blk
        return out

    def cost(self, in_shape, *, stride=1, padding=0, form="exact"):
        """Multiply-adds per image and parameters, as executed (see the module doc)."""
        geo = self._geometry(in_shape, stride, padding, form)
        K1, K2 = self.ranks
        cg = np.diff(self.in_offsets)
        fh = np.diff(self.out_offsets)
        H, G = fh.shape[0], cg.shape[0]
        X, Y = self.kernel_size
        macs = (H * geo["n_in"] * cg.sum() * K1 + G * H * geo["n_out"] * X * Y * K1 * K2
                + G * geo["n_out"] * K2 * fh.sum())
        return Cost(int(macs) if form == "exact" else float(macs), self.n_params())

    def to_layer(self, *, bias=None, stride=1, padding=0):
        """A :class:`npconv.layers.bicluster.BiclusterConv2d` executing the factors (never the rebuilt kernel)."""
        from ..layers.bicluster import BiclusterConv2d
        return BiclusterConv2d.from_result(self, bias=bias, stride=stride, padding=padding)


# --------------------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------------------
def max_bicluster_ranks(block_shape):
    """Largest meaningful ranks for a block (F_h, C_g, X, Y): ``{"cp": K, "svd": (K1, K2 for that K1)}``.

    CP: :func:`npconv.decompose.cp.max_cp_rank`; SVD: ``K1 <= min(C_g, X Y F_h)``,
    ``K2 <= min(K1 X Y, F_h)``.
    """
    fh, cg, X, Y = (int(v) for v in block_shape)
    k1 = min(cg, X * Y * fh)
    return {"cp": max_cp_rank((fh, cg, X, Y)), "svd": (k1, min(k1 * X * Y, fh))}


def _cluster(vectors, k, equal_size, n_init, rng, callback, stage):
    if k == 1:
        return np.zeros(vectors.shape[0], np.int64)
    cb = None if callback is None else (lambda info: callback({"stage": stage, **info}))
    res = kmeans(vectors, k, equal_size=equal_size, n_init=n_init, random_state=rng, callback=cb)
    return res.labels


def _cp_block(B, K, algorithm, n_iter, tol, rng):
    fit = cp_als if algorithm == "als" else cp_greedy
    res = fit(B, K, n_iter=n_iter, tol=tol, init="svd", random_state=rng)
    w, (fo, fi, fv, fhz) = res
    return fo * w[None, :], fi, fv, fhz


def _svd_block(B, K1, K2):
    fh, cg, X, Y = B.shape
    M1 = B.transpose(1, 2, 3, 0).reshape(cg, X * Y * fh)
    U1, s1, V1t = np.linalg.svd(M1, full_matrices=False)
    U1, V1t = svd_flip(U1[:, :K1], V1t[:K1])
    rest = (s1[:K1, None] * V1t).reshape(K1 * X * Y, fh)         # rows (k1, x, y)
    U2, s2, V2t = np.linalg.svd(rest, full_matrices=False)
    U2, V2t = svd_flip(U2[:, :K2], V2t[:K2])
    spatial = (U2 * s2[None, :K2]).T.reshape(K2, K1, X, Y)       # [k2, k1, x, y]
    expand = V2t.T                                               # (fh, K2)
    return U1, spatial, expand


def _relative(B, approx):
    nb = float(np.sum(B * B))
    return float(np.sqrt(np.sum((B - approx) ** 2) / nb)) if nb > 0 else 0.0


def _frobenius(Wd, in_perm, in_off, out_perm, out_off, method, factors):
    """(squared Frobenius error of the whole kernel, relative error of every block (G, H)) of stacked factors."""
    G, H = len(in_off) - 1, len(out_off) - 1
    block_err = np.zeros((G, H))
    sq_err = 0.0
    for g in range(G):
        for h in range(H):
            B = Wd[np.ix_(out_perm[out_off[h]:out_off[h + 1]], in_perm[in_off[g]:in_off[g + 1]])]
            approx = block_term(method, factors, in_off, out_off, g, h).reshape(B.shape)
            sq_err += float(np.sum((B - approx) ** 2))
            block_err[g, h] = _relative(B, approx)
    return sq_err, block_err


def bicluster(W, G, H, *, method="svd", rank=None, ranks=None, equal_size=True, n_iter=200, tol=1e-7,
              cp_algorithm="als", n_init=10, random_state=None, callback=None, data_cov=None, data_iter=10):
    """Biclustered approximation of a conv kernel ``W`` (F, C, X, Y).

    Parameters
    ----------
    W : ndarray (F, C, X, Y), float32 or float64, finite, not all zero
        A block that is all zero (dead channels grouped together) gets zero factors: it is rebuilt exactly.
    G, H : int
        Number of input-channel groups (1 <= G <= C) and output-channel groups (1 <= H <= F).
    method : "svd" or "cp"
    rank : int, for ``method="cp"``
        CP rank K of every block, 1 <= K <= the smallest block's :func:`max_bicluster_ranks` ``["cp"]``.
    ranks : (int, int), for ``method="svd"``
        (K1, K2): K1 <= min(C_g, X Y F_h) and K2 <= min(K1 X Y, F_h) for the smallest blocks.
    equal_size : bool
        Balanced clusters (sizes differ by at most one channel; see the module doc) or plain k-means.
    n_iter, tol : CP fitting controls (``method="cp"``; see :func:`npconv.decompose.cp.cp_als`).
    cp_algorithm : "als" or "greedy"
        Joint CP-ALS (default, lower error) or the paper's greedy rank-1 peeling, for every block.
    n_init : int
        k-means restarts.
    random_state : None, int, SeedSequence or Generator
        Drives k-means and the CP fits; a fixed value gives identical results.
    callback : callable or None
        Called with a dict: ``{"stage": "cluster_inputs"|"cluster_outputs", ...k-means info}`` during the
        clustering, ``{"stage": "block", "g": g, "h": h, "error": e}`` after every block and, with
        ``data_cov``, ``{"stage": "data_fit", "sweep": i, "error": e}`` after every refitting sweep.
    data_cov : ndarray (C X Y, C X Y) or None
        Second moment of the layer's input patches (``metrics.patch_covariance``, entry order ``(c, x, y)``).
        Given, the blocks fitted in the weight metric are refitted in the data metric ``E||(W - W~) p||^2``
        (``npconv.decompose._bicluster_data``): every factor of every block in turn by its exact least-squares
        update, so the data error never increases, and the coupling of blocks through correlated input groups
        is included. The groups stay those clustered on the weights.
    data_iter : int
        Most refitting sweeps over all blocks (``data_cov`` only); a sweep that lowers the relative data error
        by less than ``tol`` of itself ends the refit.

    Returns
    -------
    BiclusterCPResult or BiclusterSVDResult
        Factors in W's dtype (fitted in float64). With ``data_cov``, ``meta["data_errors"]`` holds the relative
        data-metric error ``sqrt(tr(D S D^T) / tr(W S W^T))`` (D = W - W~ as an F x (C X Y) matrix) before the
        refit and after each sweep, non-increasing.
    """
    W = check_tensor(W, "W", ndim=4)
    F, C, X, Y = W.shape
    G = check_int(G, "G", min_value=1, max_value=C)
    H = check_int(H, "H", min_value=1, max_value=F)
    if not isinstance(method, str):
        raise TypeError(f"method must be 'svd' or 'cp', got {type(method).__name__}")
    check_option(method, "method", {"svd", "cp"})
    if not isinstance(equal_size, (bool, np.bool_)):
        raise TypeError(f"equal_size must be a bool, got {type(equal_size).__name__}")
    n_iter = check_int(n_iter, "n_iter", min_value=1)
    tol = check_real(tol, "tol", min_value=0.0)
    n_init = check_int(n_init, "n_init", min_value=1)
    check_option(cp_algorithm, "cp_algorithm", {"als", "greedy"})
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    data_iter = check_int(data_iter, "data_iter", min_value=1)
    if data_cov is not None:
        data_cov = as_covariance(data_cov, C * X * Y, "data_cov")
    if method == "cp":
        if ranks is not None:
            raise ValueError("ranks (K1, K2) is for method='svd'; method='cp' takes rank=K")
        if rank is None:
            raise ValueError("method='cp' needs rank=K (the CP rank of every block)")
        K = check_int(rank, "rank", min_value=1)
    else:
        if rank is not None:
            raise ValueError("rank is for method='cp'; method='svd' takes ranks=(K1, K2)")
        if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
            raise ValueError(f"method='svd' needs ranks=(K1, K2), a pair of ints, got {ranks!r}")
        K1 = check_int(ranks[0], "ranks[0] (K1)", min_value=1)
        K2 = check_int(ranks[1], "ranks[1] (K2)", min_value=1)
    # the smallest blocks bound the ranks; check before any clustering work
    cg_min = C // G
    fh_min = F // H
    lim = max_bicluster_ranks((fh_min, cg_min, X, Y))
    if method == "cp" and K > lim["cp"]:
        raise ValueError(f"rank must be <= {lim['cp']} for blocks of shape ({fh_min}, {cg_min}, {X}, {Y}) "
                         f"(W {W.shape} with G={G}, H={H}), got {K}")
    if method == "svd":
        if K1 > lim["svd"][0]:
            raise ValueError(f"ranks[0] (K1) must be <= min(C/G, X*Y*F/H) = {lim['svd'][0]} for blocks of shape "
                             f"({fh_min}, {cg_min}, {X}, {Y}), got {K1}")
        k2max = min(K1 * X * Y, fh_min)
        if K2 > k2max:
            raise ValueError(f"ranks[1] (K2) must be <= min(K1*X*Y, F/H) = {k2max} for K1={K1} and blocks of "
                             f"shape ({fh_min}, {cg_min}, {X}, {Y}), got {K2}")
    rng = check_random_state(random_state)
    Wd = W.astype(np.float64)

    in_labels = _cluster(Wd.transpose(1, 0, 2, 3).reshape(C, -1), G, bool(equal_size), n_init, rng, callback,
                         "cluster_inputs")
    out_labels = _cluster(Wd.reshape(F, -1), H, bool(equal_size), n_init, rng, callback, "cluster_outputs")
    in_perm, in_off = channel_groups(in_labels, G)
    out_perm, out_off = channel_groups(out_labels, H)
    if np.any(np.diff(in_off) == 0) or np.any(np.diff(out_off) == 0):  # k-means never leaves one empty
        raise RuntimeError("k-means returned an empty group")
    if method == "svd":
        # unequal groups (equal_size=False) may be smaller than C/G and F/H: the smallest ones bound the ranks
        cg_min, fh_min = int(np.diff(in_off).min()), int(np.diff(out_off).min())
        found = (f"the smallest groups k-means found (equal_size=False): input groups of {cg_min} channels, "
                 f"output groups of {fh_min}, kernel {X}x{Y}")
        k1max = min(cg_min, X * Y * fh_min)
        if K1 > k1max:
            raise ValueError(f"ranks[0] (K1) must be <= min(C_g, X*Y*F_h) = {k1max} for {found}; got ranks={K1, K2}")
        k2max = min(K1 * X * Y, fh_min)
        if K2 > k2max:
            raise ValueError(f"ranks[1] (K2) must be <= min(K1*X*Y, F_h) = {k2max} for {found}; got ranks={K1, K2}")

    dt = W.dtype
    if method == "cp":
        reduce = np.zeros((C, H, K))
        vert = np.zeros((G, H, K, X))
        horiz = np.zeros((G, H, K, Y))
        expand = np.zeros((F, G, K))
    else:
        reduce = np.zeros((C, H, K1))
        spatial = np.zeros((G, H, K2, K1, X, Y))
        expand = np.zeros((F, G, K2))
    factors = (reduce, vert, horiz, expand) if method == "cp" else (reduce, spatial, expand)
    for g in range(G):
        i0, i1 = int(in_off[g]), int(in_off[g + 1])
        ci = in_perm[i0:i1]
        for h in range(H):
            o0, o1 = int(out_off[h]), int(out_off[h + 1])
            B = Wd[np.ix_(out_perm[o0:o1], ci)]
            if not np.any(B):
                # an all-zero block (dead channels): its zero factors rebuild it exactly; the fits reject it
                pass
            elif method == "cp":
                kb = min(K, max_cp_rank(B.shape))
                fo, fi, fv, fz = _cp_block(B, kb, cp_algorithm, n_iter, tol, rng)
                expand[o0:o1, g, :kb] = fo
                reduce[i0:i1, h, :kb] = fi
                vert[g, h, :kb] = fv.T
                horiz[g, h, :kb] = fz.T
            else:
                reduce[i0:i1, h], spatial[g, h], expand[o0:o1, g] = _svd_block(B, K1, K2)
            if callback is not None:
                e = _relative(B, block_term(method, factors, in_off, out_off, g, h).reshape(B.shape))
                callback({"stage": "block", "g": g, "h": h, "error": e})
    meta = {"shape": tuple(W.shape), "method": method, "in_groups": G, "out_groups": H,
            "equal_size": bool(equal_size), "data_metric": data_cov is not None}
    if data_cov is not None:
        meta["data_errors"] = tuple(refit_data_metric(Wd, data_cov, in_perm, in_off, out_perm, out_off, factors,
                                                      method, n_iter=data_iter, tol=tol, callback=callback))
    sq_err, block_err = _frobenius(Wd, in_perm, in_off, out_perm, out_off, method, factors)
    meta["block_errors"] = tuple(map(tuple, block_err.tolist()))
    rel = float(np.sqrt(sq_err) / np.linalg.norm(Wd.ravel()))
    if method == "cp":
        meta.update(rank=K, cp_algorithm=cp_algorithm)
        return BiclusterCPResult(in_perm, in_off, reduce.astype(dt), vert.astype(dt), horiz.astype(dt),
                                 expand.astype(dt), out_perm, out_off, errors=(rel,), meta=meta)
    meta.update(ranks=(K1, K2))
    return BiclusterSVDResult(in_perm, in_off, reduce.astype(dt), spatial.astype(dt), expand.astype(dt),
                              out_perm, out_off, errors=(rel,), meta=meta)
