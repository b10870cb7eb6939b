"""PyTorch equivalents of npconv's layers, written as ordinary torch modules (what a PyTorch user would run).

The factored layers become the sequence of standard convolutions that a TensorLy-Torch style factorisation runs,
so a timing comparison is of the same maths on the same shapes:

* low-rank linear (``LowRankLinear``): two ``nn.Linear`` (in -> t without bias, t -> out with the bias);
* low-rank conv (``LowRankConv2d``): a conv to t channels, then a 1x1 conv t -> F;
* monochromatic (``MonochromaticConv2d``): a 1x1 conv C -> C' (the colours), then one grouped conv with one
  single-channel filter per output (filters sorted by colour, so every colour is one group), then the output
  channels put back in order (a channel gather). With unequal colour clusters the colour maps are gathered per
  output channel and filtered by a depthwise conv instead;
* separable (``SeparableConv2d``): a vertical X x 1 conv (row stride) then a horizontal 1 x Y conv (column stride);
* biclustered CP (``BiclusterConv2d``, form "cp"): a channel gather into group order, a grouped 1x1 reduction
  (G groups, C_g -> H K), a depthwise vertical and a depthwise horizontal conv over the G H K components, a
  channel gather into output-group order, a grouped 1x1 expansion (H groups, G K -> F_h, with the bias) and the
  scatter back to the original output order (a gather with the inverse permutation);
* biclustered SVD (form "svd"): as CP with the two depthwise passes replaced by one grouped X x Y conv
  (G H groups, K1 -> K2).

Unequal group sizes (possible after balanced clustering when G does not divide C) are run as one conv per group
on channel slices, concatenated. Padding that differs between the two sides of an axis becomes an
``nn.ZeroPad2d`` in front of the conv.

:func:`torch_layer` converts one npconv layer (dense or factored), :func:`torch_net` a whole Network into an
``nn.Sequential`` with the same layer names. Everything is in eval mode without gradients. This module needs
PyTorch and is only used by the benchmarks and their tests; npconv never imports it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

__all__ = ["torch_layer", "torch_net", "conv_module", "linear_module", "ChannelGather", "GroupedConv",
           "FlattenLinear", "TorchNormalize",
           "TorchLowRankLinear", "TorchLowRankConv2d", "TorchMonochromaticConv2d", "TorchSeparableConv2d",
           "TorchBiclusterCP", "TorchBiclusterSVD"]


# ---------------------------------------------------------------------------------------------------- helpers
def _np(a):
    """A NumPy copy of an npconv array (CuPy arrays are copied to the host)."""
    get = getattr(a, "get", None)
    if get is not None and not isinstance(a, np.ndarray):
        a = get()
    return np.asarray(a)


def _tensor(a, dtype):
    """A torch tensor owning a contiguous copy of ``a`` in ``dtype``."""
    return torch.from_numpy(np.array(_np(a), dtype=dtype, order="C", copy=True))


def _index(a):
    return torch.from_numpy(np.array(_np(a), dtype=np.int64, copy=True))


def _inverse(perm):
    perm = _np(perm).astype(np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0])
    return inv


def _pair(v):
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _pad4(p):
    if isinstance(p, (tuple, list)):
        if len(p) == 4:
            return tuple(int(e) for e in p)
        if len(p) == 2:
            return (int(p[0]), int(p[0]), int(p[1]), int(p[1]))
        raise ValueError(f"padding must have 1, 2 or 4 entries, got {p!r}")
    return (int(p),) * 4


def _frozen(module):
    for prm in module.parameters():
        prm.requires_grad_(False)
    return module.eval()


def conv_module(weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, dtype=np.float32):
    """An ``nn.Conv2d`` holding ``weight`` (F, C/groups, KH, KW) and ``bias``; padding (top, bottom, left, right)
    that differs between the sides of an axis becomes an ``nn.ZeroPad2d`` in front (an ``nn.Sequential``)."""
    w = _tensor(weight, dtype)
    F, cg, kh, kw = w.shape
    t, b, l, r = _pad4(padding)
    sym = t == b and l == r
    conv = nn.Conv2d(cg * groups, F, (kh, kw), stride=_pair(stride), padding=(t, l) if sym else 0,
                     dilation=_pair(dilation), groups=groups, bias=bias is not None, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias is not None:
            conv.bias.copy_(_tensor(bias, dtype))
    if sym:
        return _frozen(conv)
    return _frozen(nn.Sequential(nn.ZeroPad2d((l, r, t, b)), conv))


class ChannelGather(nn.Module):
    """``x[:, index]``: reorders (or selects / repeats) channels."""

    def __init__(self, index):
        super().__init__()
        self.register_buffer("index", _index(index))

    def forward(self, x):
        return x.index_select(1, self.index)


class GroupedConv(nn.Module):
    """A grouped conv whose groups may differ in size.

    ``weights[i]`` (F_i, C_i, KH, KW) reads input channels ``[sum C_<i, sum C_<=i)`` and writes output channels
    ``[sum F_<i, sum F_<=i)``. Equal groups are one ``nn.Conv2d(groups=n)``; unequal ones one conv per group on
    channel slices, concatenated.
    """

    def __init__(self, weights, biases=None, *, stride=1, padding=0, dtype=np.float32):
        super().__init__()
        weights = [_np(w) for w in weights]
        n = len(weights)
        if biases is None:
            biases = [None] * n
        self.in_sizes = [int(w.shape[1]) for w in weights]
        self.equal = len({w.shape for w in weights}) == 1
        if self.equal:
            b = None if biases[0] is None else np.concatenate([_np(v) for v in biases])
            self.conv = conv_module(np.concatenate(weights), b, stride=stride, padding=padding, groups=n, dtype=dtype)
            self.convs = None
        else:
            self.conv = None
            self.convs = nn.ModuleList([conv_module(w, b, stride=stride, padding=padding, dtype=dtype)
                                        for w, b in zip(weights, biases)])

    def forward(self, x):
        if self.equal:
            return self.conv(x)
        parts = torch.split(x, self.in_sizes, dim=1)
        return torch.cat([c(p) for c, p in zip(self.convs, parts)], dim=1)


class FlattenLinear(nn.Linear):
    """``nn.Linear`` that flattens an input of more than two dimensions first (as npconv's Linear does)."""

    def forward(self, x):
        return super().forward(x.flatten(1) if x.dim() > 2 else x)


def linear_module(weight, bias=None, *, dtype=np.float32):
    """A :class:`FlattenLinear` holding ``weight`` (out, in) and ``bias`` (out,) or None."""
    w = _tensor(weight, dtype)
    lin = FlattenLinear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(_tensor(bias, dtype))
    return _frozen(lin)


class TorchNormalize(nn.Module):
    """``(x - mean[c]) / std[c]`` (npconv's Normalize layer)."""

    def __init__(self, mean, std, *, dtype=np.float32):
        super().__init__()
        self.register_buffer("mean", _tensor(mean, dtype).reshape(1, -1, 1, 1))
        self.register_buffer("std", _tensor(std, dtype).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------- factored modules
class TorchLowRankLinear(nn.Sequential):
    """Rank-t dense layer ``y = (x b^T) a^T + bias`` as two ``nn.Linear``: ``a`` (out, t), ``b`` (t, in)."""

    def __init__(self, a, b, bias=None, *, dtype=np.float32):
        super().__init__(OrderedDict([("first", linear_module(b, None, dtype=dtype)),
                                      ("second", linear_module(a, bias, dtype=dtype))]))
        _frozen(self)


class TorchLowRankConv2d(nn.Sequential):
    """Rank-t conv: ``first`` (t, C, X, Y) with the original stride/padding/dilation, then the 1x1 ``second``
    (F, t) or (F, t, 1, 1) with the bias."""

    def __init__(self, first, second, bias=None, *, stride=1, padding=0, dilation=1, dtype=np.float32):
        second = _np(second)
        second = second.reshape(second.shape[0], second.shape[1], 1, 1)
        super().__init__(OrderedDict([
            ("first", conv_module(first, None, stride=stride, padding=padding, dilation=dilation, dtype=dtype)),
            ("second", conv_module(second, bias, dtype=dtype))]))
        _frozen(self)


class TorchMonochromaticConv2d(nn.Sequential):
    """Monochromatic conv: 1x1 colour transform ``colors`` (C', C), then per output channel f the single-channel
    filter ``spatial[f]`` (X, Y) on colour ``assignment[f]``, plus ``bias``.

    Equal colour clusters: one grouped conv (C' groups) over the filters sorted by colour, then the inverse
    permutation as a channel gather. Unequal clusters: gather colour ``assignment[f]`` for every f, then one
    depthwise conv (F groups).
    """

    def __init__(self, colors, assignment, spatial, bias=None, *, stride=1, padding=0, dtype=np.float32):
        colors, spatial = _np(colors), _np(spatial)
        a = _np(assignment).astype(np.int64)
        Cp = colors.shape[0]
        F = spatial.shape[0]
        counts = np.bincount(a, minlength=Cp)
        layers = [("colors", conv_module(colors[:, :, None, None], None, dtype=dtype))]
        if counts.min() == counts.max():
            perm = np.argsort(a, kind="stable")
            b = None if bias is None else _np(bias)[perm]
            layers += [("spatial", conv_module(spatial[perm][:, None], b, stride=stride, padding=padding,
                                               groups=Cp, dtype=dtype)),
                       ("unpermute", ChannelGather(_inverse(perm)))]
        else:
            layers += [("gather", ChannelGather(a)),
                       ("spatial", conv_module(spatial[:, None], bias, stride=stride, padding=padding, groups=F,
                                               dtype=dtype))]
        super().__init__(OrderedDict(layers))
        _frozen(self)


class TorchSeparableConv2d(nn.Sequential):
    """``vertical`` (K, C, X, 1) with the row stride and top/bottom padding, then ``horizontal`` (F, K, 1, Y) with
    the column stride, left/right padding and the bias."""

    def __init__(self, vertical, horizontal, bias=None, *, stride=1, padding=0, dtype=np.float32):
        sh, sw = _pair(stride)
        t, b, l, r = _pad4(padding)
        super().__init__(OrderedDict([
            ("vertical", conv_module(vertical, None, stride=(sh, 1), padding=(t, b, 0, 0), dtype=dtype)),
            ("horizontal", conv_module(horizontal, bias, stride=(1, sw), padding=(0, 0, l, r), dtype=dtype))]))
        _frozen(self)


def _block_reorder(G, H, K):
    """Channel index taking components in (g, h, k) order to (h, g, k) order."""
    g, h, k = np.meshgrid(np.arange(G), np.arange(H), np.arange(K), indexing="ij")
    src = (g * H + h) * K + k                       # position of (g, h, k) in g-major order
    return np.ascontiguousarray(src.transpose(1, 0, 2).ravel())


def _reduce_weights(reduce, in_off):
    """Per input group g: the 1x1 weight (H*K, C_g, 1, 1) from ``reduce`` rows of the group (C_g, H, K)."""
    reduce = _np(reduce)
    HK = reduce.shape[1] * reduce.shape[2]
    return [reduce[in_off[g]:in_off[g + 1]].reshape(-1, HK).T[:, :, None, None]
            for g in range(len(in_off) - 1)]


def _expand_weights(expand, bias, out_perm, out_off):
    """Per output group h: the 1x1 weight (F_h, G*K, 1, 1) and the bias in permuted order."""
    expand = _np(expand)
    ws = [expand[out_off[h]:out_off[h + 1]].reshape(out_off[h + 1] - out_off[h], -1)[:, :, None, None]
          for h in range(len(out_off) - 1)]
    if bias is None:
        return ws, None
    bp = _np(bias)[_np(out_perm).astype(np.int64)]
    return ws, [bp[out_off[h]:out_off[h + 1]] for h in range(len(out_off) - 1)]


class TorchBiclusterCP(nn.Sequential):
    """Biclustered CP conv (factor layout of :mod:`npconv.decompose.bicluster`): gather, grouped 1x1 reduction,
    depthwise vertical and horizontal passes, reorder, grouped 1x1 expansion (+ bias), scatter."""

    def __init__(self, in_perm, in_offsets, reduce, vertical, horizontal, expand, out_perm, out_offsets, bias=None,
                 *, stride=1, padding=0, dtype=np.float32):
        vertical, horizontal = _np(vertical), _np(horizontal)
        in_off = _np(in_offsets).astype(np.int64)
        out_off = _np(out_offsets).astype(np.int64)
        G, H, K, X = vertical.shape
        Y = horizontal.shape[3]
        n = G * H * K
        sh, sw = _pair(stride)
        t, b, l, r = _pad4(padding)
        exp_w, exp_b = _expand_weights(expand, bias, out_perm, out_off)
        super().__init__(OrderedDict([
            ("gather", ChannelGather(in_perm)),
            ("reduce", GroupedConv(_reduce_weights(reduce, in_off), dtype=dtype)),
            ("vertical", conv_module(vertical.reshape(n, 1, X, 1), None, stride=(sh, 1), padding=(t, b, 0, 0),
                                     groups=n, dtype=dtype)),
            ("horizontal", conv_module(horizontal.reshape(n, 1, 1, Y), None, stride=(1, sw), padding=(0, 0, l, r),
                                       groups=n, dtype=dtype)),
            ("reorder", ChannelGather(_block_reorder(G, H, K))),
            ("expand", GroupedConv(exp_w, exp_b, dtype=dtype)),
            ("scatter", ChannelGather(_inverse(out_perm)))]))
        _frozen(self)


class TorchBiclusterSVD(nn.Sequential):
    """Biclustered two-stage SVD conv: gather, grouped 1x1 reduction (C_g -> H K1), grouped X x Y conv (G H groups,
    K1 -> K2), reorder, grouped 1x1 expansion (+ bias), scatter."""

    def __init__(self, in_perm, in_offsets, reduce, spatial, expand, out_perm, out_offsets, bias=None, *,
                 stride=1, padding=0, dtype=np.float32):
        spatial = _np(spatial)
        in_off = _np(in_offsets).astype(np.int64)
        out_off = _np(out_offsets).astype(np.int64)
        G, H, K2, K1, X, Y = spatial.shape
        exp_w, exp_b = _expand_weights(expand, bias, out_perm, out_off)
        super().__init__(OrderedDict([
            ("gather", ChannelGather(in_perm)),
            ("reduce", GroupedConv(_reduce_weights(reduce, in_off), dtype=dtype)),
            ("spatial", conv_module(spatial.reshape(G * H * K2, K1, X, Y), None, stride=stride, padding=padding,
                                    groups=G * H, dtype=dtype)),
            ("reorder", ChannelGather(_block_reorder(G, H, K2))),
            ("expand", GroupedConv(exp_w, exp_b, dtype=dtype)),
            ("scatter", ChannelGather(_inverse(out_perm)))]))
        _frozen(self)


# ------------------------------------------------------------------------------------------- npconv -> torch
def _arr(layer, *names, required=True):
    """The first of ``names`` found in ``layer.params`` (or as an attribute); None when absent and optional."""
    params = getattr(layer, "params", {}) or {}
    for n in names:
        if n in params:
            return params[n]
    for n in names:
        v = getattr(layer, n, None)
        if v is not None and not callable(v):
            return v
    if required:
        raise TypeError(f"cannot convert {type(layer).__name__} to PyTorch: none of the arrays {names} found "
                        f"(it holds {sorted(params)})")
    return None


def _geometry(layer):
    return dict(stride=_pair(getattr(layer, "stride", 1)), padding=_pad4(getattr(layer, "padding", 0)))


def torch_layer(layer, *, dtype=np.float32):
    """The PyTorch module computing what the npconv ``layer`` computes (weights copied, eval mode).

    Dense layers map to their ``nn`` counterparts (``Linear`` flattens like npconv's); factored layers to the
    sequences described in the module docstring. An unknown layer class is a TypeError.
    """
    kind = type(layer).__name__
    bias = (getattr(layer, "params", {}) or {}).get("bias")
    if kind == "Conv2d":
        return conv_module(layer.weight, bias, stride=layer.stride, padding=layer.padding,
                           dilation=layer.dilation, groups=layer.groups, dtype=dtype)
    if kind == "Linear":
        return linear_module(layer.weight, bias, dtype=dtype)
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "MaxPool2d":
        return nn.MaxPool2d(layer.kernel, stride=layer.stride, padding=layer.padding, ceil_mode=layer.ceil_mode)
    if kind == "AvgPool2d":
        return nn.AvgPool2d(layer.kernel, stride=layer.stride, padding=layer.padding, ceil_mode=layer.ceil_mode,
                            count_include_pad=layer.count_include_pad)
    if kind == "LocalResponseNorm":
        return nn.LocalResponseNorm(layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k)
    if kind == "Normalize":
        return TorchNormalize(layer.mean, layer.std, dtype=dtype)
    if kind == "Flatten":
        return nn.Flatten()
    if kind == "Dropout":
        return nn.Dropout(layer.p).eval()
    if kind == "Softmax":
        return nn.Softmax(dim=layer.axis)
    if kind == "LowRankLinear":
        return TorchLowRankLinear(_arr(layer, "a"), _arr(layer, "b", "b_fac"), bias, dtype=dtype)
    if kind == "LowRankConv2d":
        return TorchLowRankConv2d(_arr(layer, "first", "b"), _arr(layer, "second", "a"), bias,
                                  dilation=_pair(getattr(layer, "dilation", 1)), dtype=dtype, **_geometry(layer))
    if kind == "MonochromaticConv2d":
        return TorchMonochromaticConv2d(_arr(layer, "colors", "color_transform"), _arr(layer, "assignment"),
                                        _arr(layer, "spatial"), bias, dtype=dtype, **_geometry(layer))
    if kind == "SeparableConv2d":
        return TorchSeparableConv2d(_arr(layer, "vertical"), _arr(layer, "horizontal"), bias, dtype=dtype,
                                    **_geometry(layer))
    if kind == "BiclusterConv2d":
        groups = [_arr(layer, k) for k in ("in_perm", "in_offsets")]
        outs = [_arr(layer, k) for k in ("out_perm", "out_offsets")]
        if _arr(layer, "spatial", required=False) is not None:
            return TorchBiclusterSVD(*groups, _arr(layer, "reduce"), _arr(layer, "spatial"), _arr(layer, "expand"),
                                     *outs, bias, dtype=dtype, **_geometry(layer))
        return TorchBiclusterCP(*groups, _arr(layer, "reduce"), _arr(layer, "vertical"), _arr(layer, "horizontal"),
                                _arr(layer, "expand"), *outs, bias, dtype=dtype, **_geometry(layer))
    raise TypeError(f"no PyTorch equivalent for the npconv layer {kind} (kind {getattr(layer, 'kind', '?')!r})")


def torch_net(net, *, dtype=np.float32):
    """An ``nn.Sequential`` (eval mode, no gradients) with the layers of the npconv ``net``, under the same names.

    ``dtype`` (float32 or float64) is the dtype of the copied weights; feed inputs of that dtype.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    model = nn.Sequential(OrderedDict((name, torch_layer(layer, dtype=dtype)) for name, layer in net.items()))
    return _frozen(model)
