"""Factored layers: low-rank linear and conv, monochromatic conv, separable conv.

Each layer stores its factors (never the rebuilt kernel) and calls one function of
:mod:`npconv.functional.lowrank`; ``macs`` is the executed count of :mod:`npconv.decompose.cost` (``form="exact"``).
They are usually made by a decomposition result's ``to_layer(...)``, e.g.
``monochromatic(W, 6).to_layer(bias=b, stride=2, padding=1)``.
"""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module, to_numpy
from .._validate import as_pair, as_padding4, check_array, check_float_array, check_out, out_size
from ..decompose import cost as _cost
from ..functional import lowrank as FL
from ..kernels.cpu import plan
from ..kernels.cuda import replay
from .base import register_layer
from .dense import _WeightedLayer, as_weight, dense_equivalent

__all__ = ["LowRankLinear", "LowRankConv2d", "MonochromaticConv2d", "SeparableConv2d"]


def _check_bias(bias, F):
    if bias is None:
        return None
    bias = as_weight(bias, "bias", 1)
    if bias.shape[0] != F:
        raise ValueError(f"bias must have shape ({F},) (one per output channel), got {tuple(bias.shape)}")
    return bias


def _check_dtype_match(ref_name, ref, **others):
    for nm, a in others.items():
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(f"{nm} must have the dtype of {ref_name} ({ref.dtype}), got {a.dtype}")


def _check_channels(kind, in_shape, C):
    if len(in_shape) != 3 or in_shape[0] != C:
        raise ValueError(f"input to {kind} must be (C={C}, H, W), got shape {tuple(in_shape)}")


def _host64(a):
    return np.asarray(to_numpy(a), np.float64)


class _FactoredConv(_WeightedLayer):
    """Shared geometry of the factored conv layers (stride, padding, config, output shape)."""

    def _geometry(self, stride, padding):
        self.stride = as_pair(stride, "stride")
        self.padding = as_padding4(padding)

    def _kernel_size(self):
        raise NotImplementedError

    def _in_channels(self):
        raise NotImplementedError

    def _out_channels(self):
        raise NotImplementedError

    def _checked_call(self, x, out, names):
        """The checks of a call, x and ``out`` only: the factors were checked at construction, and the functional
        API's checks of them are not repeated on every call (at batch 1 on a GPU a call's time is mostly the
        host's). Returns the parameters in x's dtype and array type (``_params_for``; NumPy with CuPy is refused
        there); ``names``, the factors that ``out`` must not overlap, with the bias."""
        check_float_array(x, "x", ndim=4)
        p = self._params_for(x)
        F, Ho, Wo = self.output_shape(tuple(x.shape[1:]))
        check_out(out, (x.shape[0], F, Ho, Wo), x.dtype, like=x,
                  inputs=(("x", x),) + tuple((k, p[k]) for k in names) + (("bias", p.get("bias")),))
        return p

    def output_shape(self, in_shape):
        _check_channels(self.kind, in_shape, self._in_channels())
        X, Y = self._kernel_size()
        pt, pb, pl, pr = self.padding
        return (self._out_channels(),
                out_size(in_shape[1], X, self.stride[0], pt, pb, what="output height"),
                out_size(in_shape[2], Y, self.stride[1], pl, pr, what="output width"))

    def config(self):
        return dict(stride=list(self.stride), padding=list(self.padding))


@register_layer
class LowRankLinear(_WeightedLayer):
    """Rank-t dense layer ``y = (x b^T) a^T + bias``: ``a`` (out, t), ``b`` (t, in), ``bias`` (out,) or None.

    Inputs of more than 2 dimensions are flattened (as ``Linear``).
    """
    kind = "lowrank_linear"

    def __init__(self, a, b, bias=None):
        super().__init__()
        a = as_weight(a, "a", 2)
        b = as_weight(b, "b", 2)
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"a (out, t) and b (t, in) must share t, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        bias = _check_bias(bias, a.shape[0])
        _check_dtype_match("a", a, b=b, bias=bias)
        self.params = {"a": a, "b": b} if bias is None else {"a": a, "b": b, "bias": bias}

    @property
    def rank(self):
        return int(self.params["a"].shape[1])

    def to_dense(self):
        """The :class:`~npconv.layers.Linear` computing the same map, weight ``a @ b`` (rebuilt in float64, stored in
        the factors' dtype), on this layer's device."""
        a = self.params["a"]
        return dense_equivalent(self, _host64(a) @ _host64(self.params["b"]), a.dtype)

    def forward(self, x):
        rep = replay.lookup(self._replays, x)
        if rep is not None:                 # this shape's GPU work, recorded (``_WeightedLayer._recorded``)
            return rep(x)
        p = self._params_for(x)
        x2 = x.reshape(x.shape[0], -1) if x.ndim > 2 else x
        return self._recorded(x, None, p, lambda: FL.lowrank_linear(x2, p["a"], p["b"], p.get("bias")))

    def output_shape(self, in_shape):
        n_in = int(np.prod(in_shape))
        if n_in != self.params["b"].shape[1]:
            raise ValueError(f"input to {self.kind} must have {self.params['b'].shape[1]} features, "
                             f"got shape {tuple(in_shape)} ({n_in} features)")
        return (self.params["a"].shape[0],)

    def macs(self, in_shape):
        self.output_shape(in_shape)
        out_f, t = self.params["a"].shape
        return int(_cost.svd_linear_cost(self.params["b"].shape[1], out_f, t).macs)


@register_layer
class LowRankConv2d(_FactoredConv):
    """Rank-t conv: ``first`` (t, C, X, Y) conv to t channels, then the 1x1 conv ``second`` (F, t), + bias."""
    kind = "lowrank_conv2d"

    def __init__(self, first, second, bias=None, *, stride=1, padding=0, dilation=1):
        super().__init__()
        first = as_weight(first, "first", 4)
        second = as_weight(second, "second", 2)
        if second.shape[1] != first.shape[0]:
            raise ValueError(f"second must have shape (F, {first.shape[0]}) to match first's {first.shape[0]} "
                             f"filters, got {tuple(second.shape)}")
        bias = _check_bias(bias, second.shape[0])
        _check_dtype_match("first", first, second=second, bias=bias)
        self._geometry(stride, padding)
        self.dilation = as_pair(dilation, "dilation")
        self.params = {"first": first, "second": second}
        if bias is not None:
            self.params["bias"] = bias

    @property
    def rank(self):
        return int(self.params["first"].shape[0])

    def to_dense(self):
        """The :class:`~npconv.layers.Conv2d` computing the same map: kernel ``second @ first`` over the rank axis
        (rebuilt in float64, stored in the factors' dtype), same geometry, on this layer's device."""
        first = self.params["first"]
        W = np.einsum("ft,tcxy->fcxy", _host64(self.params["second"]), _host64(first))
        return dense_equivalent(self, W, first.dtype, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def _kernel_size(self):
        X, Y = self.params["first"].shape[2:]
        return (self.dilation[0] * (X - 1) + 1, self.dilation[1] * (Y - 1) + 1)

    def _in_channels(self):
        return int(self.params["first"].shape[1])

    def _out_channels(self):
        return int(self.params["second"].shape[0])

    writes_out = True

    def forward(self, x, *, out=None):
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU launches, recorded (``_WeightedLayer._recorded``)
            return rep(x)
        p = self._checked_call(x, out, ("first", "second"))
        return self._recorded(x, out, p, lambda: FL.lowrank_core(
            x, p["first"], p["second"], p.get("bias"), self.stride, self.padding, self.dilation, out))

    def config(self):
        return dict(super().config(), dilation=list(self.dilation))

    def macs(self, in_shape):
        F, Ho, Wo = self.output_shape(in_shape)
        t, C, X, Y = self.params["first"].shape
        return int((t * C * X * Y + F * t) * Ho * Wo)


@register_layer
class MonochromaticConv2d(_FactoredConv):
    """Monochromatic conv: colours ``colors`` (C', C), ``assignment`` (F,) ints, ``spatial`` (F, X, Y), + bias.

    ``assignment`` is kept as an integer NumPy array (never cast to the input's dtype) and is not counted by
    ``n_params`` (which counts stored weights, as ``cost.monochromatic_cost``). It stays in host memory after
    ``to_gpu``: the GPU path builds its per-colour filter lists from it on the host, so keeping it there avoids a
    device-to-host copy (and a synchronisation) on every call.
    """
    kind = "monochromatic_conv2d"

    def __init__(self, colors, assignment, spatial, bias=None, *, stride=1, padding=0):
        super().__init__()
        colors = as_weight(colors, "colors", 2)
        spatial = as_weight(spatial, "spatial", 3)
        check_array(assignment, "assignment", ndim=1)
        if assignment.dtype.kind not in "iu":
            raise TypeError(f"assignment must be an integer array, got dtype {assignment.dtype}")
        if assignment.shape[0] != spatial.shape[0]:
            raise ValueError(f"assignment must have {spatial.shape[0]} entries (one per spatial filter), "
                             f"got {assignment.shape[0]}")
        a = to_numpy(assignment)
        if a.size and (a.min() < 0 or a.max() >= colors.shape[0]):
            raise ValueError(f"assignment must lie in [0, {colors.shape[0]}), got values in [{a.min()}, {a.max()}]")
        bias = _check_bias(bias, spatial.shape[0])
        _check_dtype_match("colors", colors, spatial=spatial, bias=bias)
        self._geometry(stride, padding)
        self.params = {"colors": colors, "assignment": to_numpy(assignment).astype(np.int64, copy=False),
                       "spatial": spatial}
        if bias is not None:
            self.params["bias"] = bias

    @property
    def n_colors(self):
        return int(self.params["colors"].shape[0])

    def to_dense(self):
        """The :class:`~npconv.layers.Conv2d` computing the same map: filter f is the colour of its assignment
        (over the input channels) times its spatial kernel (rebuilt in float64, stored in the factors' dtype)."""
        colors = self.params["colors"]
        a = np.asarray(to_numpy(self.params["assignment"]), np.int64)
        W = _host64(colors)[a][:, :, None, None] * _host64(self.params["spatial"])[:, None]
        return dense_equivalent(self, W, colors.dtype, stride=self.stride, padding=self.padding)

    def _params_for(self, x):
        floats = {k: v for k, v in self.params.items() if k != "assignment"}
        xp = get_array_module(x, *floats.values())
        key = (np.dtype(x.dtype), xp.__name__)
        hit = self._cast._cache.get(key)
        if hit is None:
            hit = {k: (v if v.dtype == x.dtype else v.astype(x.dtype)) for k, v in floats.items()}
            hit["assignment"] = self.params["assignment"]
            self._cast._cache = {key: hit}
            plan.drop(self._replays)        # one dtype kept: no CPU plan keeps another dtype's arrays
        return hit

    def to_gpu(self):
        """Move the float arrays to the current CUDA device (``assignment`` stays a NumPy array); returns self."""
        assignment = to_numpy(self.params["assignment"])
        super().to_gpu()
        self.params["assignment"] = assignment
        self._sync_params()
        return self

    def _kernel_size(self):
        return tuple(int(v) for v in self.params["spatial"].shape[1:])

    def _in_channels(self):
        return int(self.params["colors"].shape[1])

    def _out_channels(self):
        return int(self.params["spatial"].shape[0])

    writes_out = True

    def forward(self, x, *, out=None):
        pl = plan.lookup(self._replays, x)
        if pl is not None:                  # this shape's CPU kernel call, recorded (``kernels/cpu/plan.py``)
            return pl(x, out)
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU launches, recorded (``_WeightedLayer._recorded``)
            return rep(x)
        p = self._checked_call(x, out, ("colors", "spatial"))
        # on the CPU, what the path derives from the factors is kept in p (emptied with the parameters)
        return plan.call(self._replays, x, out, p, lambda: self._recorded(x, out, p, lambda: FL.mono_core(
            x, p["colors"], p["assignment"], p["spatial"], p.get("bias"), self.stride, self.padding, out, prep=p)))

    def n_params(self):
        return int(sum(int(np.prod(v.shape)) for k, v in self.params.items() if k != "assignment"))

    def macs(self, in_shape):
        self.output_shape(in_shape)
        return int(_cost.monochromatic_cost(tuple(in_shape), self._out_channels(), self._kernel_size(),
                                            self.n_colors, stride=self.stride, padding=self.padding).macs)


@register_layer
class SeparableConv2d(_FactoredConv):
    """Separable conv: ``vertical`` (K, C, X, 1) (row stride) then ``horizontal`` (F, K, 1, Y), + bias."""
    kind = "separable_conv2d"

    def __init__(self, vertical, horizontal, bias=None, *, stride=1, padding=0):
        super().__init__()
        vertical = as_weight(vertical, "vertical", 4)
        horizontal = as_weight(horizontal, "horizontal", 4)
        if vertical.shape[3] != 1:
            raise ValueError(f"vertical must have shape (K, C, X, 1), got {tuple(vertical.shape)}")
        if horizontal.shape[1] != vertical.shape[0] or horizontal.shape[2] != 1:
            raise ValueError(f"horizontal must have shape (F, {vertical.shape[0]}, 1, Y), got "
                             f"{tuple(horizontal.shape)}")
        bias = _check_bias(bias, horizontal.shape[0])
        _check_dtype_match("vertical", vertical, horizontal=horizontal, bias=bias)
        self._geometry(stride, padding)
        self.params = {"vertical": vertical, "horizontal": horizontal}
        if bias is not None:
            self.params["bias"] = bias

    @property
    def rank(self):
        return int(self.params["vertical"].shape[0])

    def to_dense(self):
        """The :class:`~npconv.layers.Conv2d` computing the same map: kernel ``sum_k horizontal[f, k, 0, y] *
        vertical[k, c, x, 0]`` (rebuilt in float64, stored in the factors' dtype), same stride and padding."""
        v = self.params["vertical"]
        W = np.einsum("fky,kcx->fcxy", _host64(self.params["horizontal"])[:, :, 0], _host64(v)[..., 0])
        return dense_equivalent(self, W, v.dtype, stride=self.stride, padding=self.padding)

    def _kernel_size(self):
        return (int(self.params["vertical"].shape[2]), int(self.params["horizontal"].shape[3]))

    def _in_channels(self):
        return int(self.params["vertical"].shape[1])

    def _out_channels(self):
        return int(self.params["horizontal"].shape[0])

    writes_out = True

    def forward(self, x, *, out=None):
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU launches, recorded (``_WeightedLayer._recorded``)
            return rep(x)
        p = self._checked_call(x, out, ("vertical", "horizontal"))
        return self._recorded(x, out, p, lambda: FL.separable_core(
            x, p["vertical"], p["horizontal"], p.get("bias"), self.stride, self.padding, out))

    def macs(self, in_shape):
        self.output_shape(in_shape)
        return int(_cost.separable_cost(tuple(in_shape), self._out_channels(), self._kernel_size(), self.rank,
                                        stride=self.stride, padding=self.padding).macs)
