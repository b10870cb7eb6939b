"""Dense (unfactored) layers with weights: Conv2d and Linear."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from .._backend import FLOAT_DTYPES, get_array_module
from .._validate import as_pair, as_padding4, check_array, check_finite, check_int
from ..functional.conv import _conv2d, conv2d_output_shape
from ..kernels.cpu import plan
from ..kernels.cuda import replay
from .base import Layer, register_layer

__all__ = ["Conv2d", "Linear", "as_weight", "dense_equivalent"]


def as_weight(a, name, ndim):
    """Validate a weight array: an array of ``ndim`` dimensions, float32/float64, all finite."""
    check_array(a, name, ndim=ndim)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    check_finite(a, name)
    return a


class _WeightCast:
    """Per-dtype cache of a layer's arrays, so a float32 input does not re-cast float64 weights every call."""

    def __init__(self):
        self._cache = {}

    def get(self, layer, dtype, xp):
        key = (np.dtype(dtype), xp.__name__)
        hit = self._cache.get(key)
        if hit is None:
            hit = {k: (v if v.dtype == dtype else v.astype(dtype)) for k, v in layer.params.items()}
            self._cache = {key: hit}  # keep one dtype: the cache never grows
            plan.drop(layer._replays)  # nor do the CPU plans keep another dtype's arrays
        return hit

    def clear(self):
        self._cache = {}


class _WeightedLayer(Layer):
    def __init__(self):
        super().__init__()
        self._cast = _WeightCast()

    def _params_for(self, x):
        check_array(x, "x")     # a list or scalar: the TypeError every layer gives, before x.dtype below
        xp = get_array_module(x, *self.params.values())
        return self._cast.get(self, x.dtype, xp)

    def _sync_params(self):
        self._cast.clear()
        replay.forget(self)

    def _recorded(self, x, out, p, run):
        """``run()``, the layer's ordinary path for ``x``; on the GPU without ``out``, recorded so that later calls at
        x's shape replay its device work (``kernels/cuda/replay.py``; ``replay.lookup(self._replays, x)`` finds it)."""
        return replay.call(self._replays, x, out, p, run)

    @classmethod
    def from_config(cls, config, params):
        return cls(**params, **config)


@register_layer
class Conv2d(_WeightedLayer):
    """Convolution layer: ``functional.conv2d`` with stored weight (F, C/groups, KH, KW) and bias (F,)."""
    kind = "conv2d"

    def __init__(self, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        weight = as_weight(weight, "weight", 4)
        if bias is not None:
            bias = as_weight(bias, "bias", 1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.stride = as_pair(stride, "stride")
        self.padding = as_padding4(padding)
        self.dilation = as_pair(dilation, "dilation")
        self.groups = check_int(groups, "groups", min_value=1)
        if weight.shape[0] % self.groups:
            raise ValueError(f"groups must divide the output channels of weight ({weight.shape[0]}, weight shape "
                             f"{tuple(weight.shape)}), got groups={self.groups}")
        self.params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    @property
    def weight(self):
        return self.params["weight"]

    @property
    def bias(self):
        return self.params.get("bias")

    writes_out = True

    def forward(self, x, *, out=None):
        pl = plan.lookup(self._replays, x)
        if pl is not None:                  # this shape's CPU kernel calls, recorded (``kernels/cpu/plan.py``)
            return pl(x, out)
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU launches, recorded: the call without its host work
            return rep(x)
        p = self._params_for(x)
        return plan.call(self._replays, x, out, p, lambda: self._recorded(x, out, p, lambda: _conv2d(
            x, p["weight"], p.get("bias"), stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, out=out, prep=p)))

    def config(self):
        return dict(stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups)

    def output_shape(self, in_shape):
        C = in_shape[0]
        if C != self.weight.shape[1] * self.groups:
            raise ValueError(f"input to {self.kind} must have {self.weight.shape[1] * self.groups} channels, "
                             f"got shape {tuple(in_shape)}")
        return conv2d_output_shape(in_shape, self.weight.shape, stride=self.stride, padding=self.padding,
                                   dilation=self.dilation)

    def macs(self, in_shape):
        Fo, OH, OW = self.output_shape(in_shape)
        _, Cg, KH, KW = self.weight.shape
        return int(Fo * OH * OW * Cg * KH * KW)


@register_layer
class Linear(_WeightedLayer):
    """Fully connected layer with weight (out, in) and bias (out,). Inputs of more than 2 dims are flattened."""
    kind = "linear"

    def __init__(self, weight, bias=None):
        super().__init__()
        weight = as_weight(weight, "weight", 2)
        if bias is not None:
            bias = as_weight(bias, "bias", 1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    @property
    def weight(self):
        return self.params["weight"]

    @property
    def bias(self):
        return self.params.get("bias")

    def forward(self, x):
        rep = replay.lookup(self._replays, x)
        if rep is not None:                 # this shape's GPU work, recorded (``_WeightedLayer._recorded``)
            return rep(x)
        p = self._params_for(x)
        x2 = x.reshape(x.shape[0], -1) if x.ndim > 2 else x
        return self._recorded(x, None, p, lambda: F.linear(x2, p["weight"], p.get("bias")))

    def output_shape(self, in_shape):
        n_in = int(np.prod(in_shape))
        if n_in != self.weight.shape[1]:
            raise ValueError(f"input to {self.kind} must have {self.weight.shape[1]} features, "
                             f"got shape {tuple(in_shape)} ({n_in} features)")
        return (self.weight.shape[0],)

    def macs(self, in_shape):
        self.output_shape(in_shape)
        return int(self.weight.shape[0] * self.weight.shape[1])


def dense_equivalent(layer, weight, dtype, **geometry):
    """The dense layer a factored ``layer`` stands for: ``Conv2d`` (4-D ``weight``, with ``geometry``) or ``Linear``
    (2-D), its kernel ``weight`` (rebuilt from the factors on the host) stored in ``dtype``, with ``layer``'s bias,
    on ``layer``'s device. The factored layers' ``to_dense()`` build their result with it."""
    from .._backend import to_numpy
    b = layer.params.get("bias")
    b = None if b is None else to_numpy(b)
    w = np.asarray(weight).astype(dtype, copy=False)
    dense = Conv2d(w, b, **geometry) if w.ndim == 4 else Linear(w, b)
    return dense.to_gpu() if layer.on_gpu else dense
