"""Cost model (Denton et al. 2014, section 4.3): multiply-adds and parameter counts, dense and factored.

Every function takes the layer geometry -- ``in_shape`` (C, H, W) without the batch axis, ``out_channels`` F,
``kernel_size`` (X, Y) (an int or a pair), ``stride`` and ``padding`` -- plus the approximation's sizes, and
returns a ``Cost(macs, params)``. ``form`` chooses the count:

* ``"exact"`` (default): the multiply-adds npconv executes for this input size, with the true output size
  ``H' x W'`` (padding included); an int.
* ``"paper"``: the paper's closed form, with ``N M = H W`` the input positions and ``N M / Delta^2`` the output
  positions (``Delta^2 = stride_h * stride_w``; padding ignored); a float.

Parameter counts are weights only; pass ``bias=True`` to add the F biases (identical for a dense layer and its
approximations, so they never change a gain). Integer index arrays (the monochromatic assignment, cluster
permutations) are not counted. ``gain(dense, approx)`` is the ratio of multiply-adds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .._validate import as_padding4, as_pair, check_int, check_option, out_size

__all__ = ["Cost", "gain", "param_gain", "conv2d_cost", "linear_cost", "svd_linear_cost", "conv_svd_cost",
           "monochromatic_cost", "bicluster_cp_cost", "bicluster_svd_cost", "separable_cost",
           "shared_separable_cost"]


@dataclass(frozen=True)
class Cost:
    """Multiply-adds per image (``macs``) and stored weights (``params``)."""
    macs: float
    params: int

    def __add__(self, other):
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.macs + other.macs, self.params + other.params)


def gain(dense, approx):
    """Theoretical speed-up: ``dense.macs / approx.macs``."""
    for nm, c in (("dense", dense), ("approx", approx)):
        if not isinstance(c, Cost):
            raise TypeError(f"{nm} must be a Cost, got {type(c).__name__}")
    if approx.macs <= 0:
        raise ValueError(f"approx.macs must be > 0, got {approx.macs}")
    return dense.macs / approx.macs


def param_gain(dense, approx):
    """Compression ratio: ``dense.params / approx.params``."""
    if approx.params <= 0:
        raise ValueError(f"approx.params must be > 0, got {approx.params}")
    return dense.params / approx.params


class _Geom:
    """Normalised conv geometry and the position counts of both forms."""

    def __init__(self, in_shape, out_channels, kernel_size, stride, padding, form):
        if not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W) without the batch axis, got {in_shape!r}")
        self.C, self.H, self.W = (check_int(v, "in_shape", min_value=1) for v in in_shape)
        self.F = check_int(out_channels, "out_channels", min_value=1)
        self.X, self.Y = as_pair(kernel_size, "kernel_size")
        self.sh, self.sw = as_pair(stride, "stride")
        pt, pb, pl, pr = as_padding4(padding)
        self.form = check_option(form, "form", {"exact", "paper"})
        self.Ho = out_size(self.H, self.X, self.sh, pt, pb)
        self.Wo = out_size(self.W, self.Y, self.sw, pl, pr)
        if self.form == "exact":
            self.n_in = self.H * self.W                          # input positions
            self.n_out = self.Ho * self.Wo                       # output positions
            self.n_rows = self.Ho * self.W                       # after a row-strided vertical pass
        else:
            self.n_in = float(self.H * self.W)
            self.n_out = self.H * self.W / (self.sh * self.sw)
            self.n_rows = self.H * self.W / self.sh

    def bias(self, bias):
        return self.F if bias else 0


def _divides(total, parts, what, name):
    parts = check_int(parts, name, min_value=1)
    if total % parts:
        raise ValueError(f"{name} must divide the number of {what} ({total}), got {parts}")
    return parts


def conv2d_cost(in_shape, out_channels, kernel_size, *, stride=1, padding=0, form="exact", bias=False):
    """Dense convolution: ``C X Y F`` per output position."""
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    w = g.C * g.X * g.Y * g.F
    return Cost(w * g.n_out, w + g.bias(bias))


def linear_cost(in_features, out_features, *, bias=False):
    """Dense linear layer: ``in * out``."""
    i = check_int(in_features, "in_features", min_value=1)
    o = check_int(out_features, "out_features", min_value=1)
    return Cost(i * o, i * o + (o if bias else 0))


def svd_linear_cost(in_features, out_features, rank, *, bias=False):
    """Rank-t linear layer ``A (B x)``: ``t (in + out)``."""
    i = check_int(in_features, "in_features", min_value=1)
    o = check_int(out_features, "out_features", min_value=1)
    t = check_int(rank, "rank", min_value=1)
    return Cost(t * (i + o), t * (i + o) + (o if bias else 0))


def conv_svd_cost(in_shape, out_channels, kernel_size, rank, *, stride=1, padding=0, form="exact", bias=False):
    """Conv to t channels then a 1x1 conv: ``(t C X Y + F t)`` per output position."""
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    t = check_int(rank, "rank", min_value=1)
    p = t * g.C * g.X * g.Y + g.F * t
    return Cost(p * g.n_out, p + g.bias(bias))


def monochromatic_cost(in_shape, out_channels, kernel_size, colors, *, stride=1, padding=0, form="exact",
                       bias=False):
    """Monochromatic: ``C C' N M`` (colour transform at the input positions) + ``X Y F N' M'`` (one
    single-channel filter per output channel)."""
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    cp = check_int(colors, "colors", min_value=1)
    macs = g.C * cp * g.n_in + g.X * g.Y * g.F * g.n_out
    return Cost(macs, g.C * cp + g.F * g.X * g.Y + g.bias(bias))


def bicluster_cp_cost(in_shape, out_channels, kernel_size, in_groups, out_groups, rank, *, stride=1, padding=0,
                      form="exact", separable=True, bias=False):
    """Biclustered CP (G input clusters, H output clusters, rank K per bicluster).

    Paper form: ``G H K (N M C/G + X Y N M / Delta^2 + (F/H) N M / Delta^2)``.
    Exact form, for execution as: C/G -> K projection at the input positions, a vertical X-tap pass with the
    row stride over the input width, a horizontal Y-tap pass with the column stride, K -> F/H at the output
    positions: ``G H K (H W C/G + X H' W + Y H' W' + (F/H) H' W')``; with ``separable=False`` the two spatial
    passes are one X x Y pass, ``X Y H' W'``.
    """
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    G = _divides(g.C, in_groups, "input channels", "in_groups")
    H = _divides(g.F, out_groups, "output channels", "out_groups")
    K = check_int(rank, "rank", min_value=1)
    cg, fh = g.C // G, g.F // H
    if form == "paper":
        per = g.n_in * cg + g.X * g.Y * g.n_out + fh * g.n_out
    elif separable:
        per = g.n_in * cg + g.X * g.n_rows + g.Y * g.n_out + fh * g.n_out
    else:
        per = g.n_in * cg + g.X * g.Y * g.n_out + fh * g.n_out
    params = G * H * K * (cg + g.X + g.Y + fh) if separable or form == "paper" else G * H * K * (cg + g.X * g.Y + fh)
    return Cost(G * H * K * per, params + g.bias(bias))


def bicluster_svd_cost(in_shape, out_channels, kernel_size, in_groups, out_groups, ranks, *, stride=1, padding=0,
                       form="exact", bias=False):
    """Biclustered SVD with ranks (K1, K2): ``G H (N M (C/G) K1 + N M Delta^-2 X Y K1 K2 + N M Delta^-2 K2 F/H)``.

    Executed as C/G -> K1 at the input positions, an X x Y conv K1 -> K2, then K2 -> F/H at the output
    positions; the exact form uses ``H W`` input and ``H' W'`` output positions.
    """
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    G = _divides(g.C, in_groups, "input channels", "in_groups")
    H = _divides(g.F, out_groups, "output channels", "out_groups")
    if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
        raise ValueError(f"ranks must be a pair (K1, K2), got {ranks!r}")
    K1 = check_int(ranks[0], "ranks[0]", min_value=1)
    K2 = check_int(ranks[1], "ranks[1]", min_value=1)
    cg, fh = g.C // G, g.F // H
    per = g.n_in * cg * K1 + g.n_out * g.X * g.Y * K1 * K2 + g.n_out * K2 * fh
    return Cost(G * H * per, G * H * (cg * K1 + g.X * g.Y * K1 * K2 + K2 * fh) + g.bias(bias))


def separable_cost(in_shape, out_channels, kernel_size, rank, *, stride=1, padding=0, form="exact", bias=False):
    """Jaderberg-style separable filters (rank K): ``K C X H' W + F K Y H' W'``.

    The vertical pass (K filters (C, X, 1), row stride) runs over the input width ``W``, the horizontal pass
    (F filters (K, 1, Y), column stride) at the output positions. Paper form: ``H' W -> N M / Delta_h`` and
    ``H' W' -> N M / Delta^2``.
    """
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    K = check_int(rank, "rank", min_value=1)
    macs = K * g.C * g.X * g.n_rows + g.F * K * g.Y * g.n_out
    return Cost(macs, K * g.C * g.X + g.F * K * g.Y + g.bias(bias))


def shared_separable_cost(in_shape, out_channels, kernel_size, in_groups, out_groups, rank, n_filters, *,
                          filters_used=None, in_group_sizes=None, stride=1, padding=0, form="exact", bias=False):
    """Biclustered CP blocks whose rank-1 spatial filters come from a shared collection of ``n_filters`` = S
    (the execution of ``npconv.decompose.shared``): every input channel of group g is filtered ONCE by each of
    the U_g shared filters its components use (vertical pass with row stride over the input width, then the
    horizontal pass), a 1x1 combination makes the H K components of the group, and each output group sums
    its G K components::

        sum_g C_g U_g (X H' W + Y H' W')  +  C H K H' W'  +  F G K H' W'

    ``filters_used``: U_g per input group (a sequence of G ints, each <= S); by default every group uses all S.
    ``in_group_sizes``: C_g per group (default: C // G or C // G + 1, the larger ones first).
    Parameters: ``C H K + S (X + Y) + F G K`` (the combination weights, the shared filters, the expansion).
    """
    g = _Geom(in_shape, out_channels, kernel_size, stride, padding, form)
    G = check_int(in_groups, "in_groups", min_value=1)
    H = check_int(out_groups, "out_groups", min_value=1)
    K = check_int(rank, "rank", min_value=1)
    S = check_int(n_filters, "n_filters", min_value=1)
    if G > g.C:
        raise ValueError(f"in_groups must be <= the input channels ({g.C}), got {G}")
    if H > g.F:
        raise ValueError(f"out_groups must be <= the output channels ({g.F}), got {H}")
    if filters_used is None:
        spatial_channels = g.C * S
    else:
        used = [check_int(u, "filters_used", min_value=0, max_value=S) for u in filters_used]
        if len(used) != G:
            raise ValueError(f"filters_used must have one entry per input group ({G}), got {len(used)}")
        if in_group_sizes is None:
            base, extra = divmod(g.C, G)
            sizes = [base + (1 if i < extra else 0) for i in range(G)]
        else:
            sizes = [check_int(c, "in_group_sizes", min_value=0) for c in in_group_sizes]
            if len(sizes) != G or sum(sizes) != g.C:
                raise ValueError(f"in_group_sizes must be {G} sizes summing to C={g.C}, got {sizes}")
        spatial_channels = sum(c * u for c, u in zip(sizes, used))
    macs = spatial_channels * (g.X * g.n_rows + g.Y * g.n_out) + g.C * H * K * g.n_out + g.F * G * K * g.n_out
    return Cost(macs, g.C * H * K + S * (g.X + g.Y) + g.F * G * K + g.bias(bias))
