"""Thin layers over the non-convolutional functional ops: pooling, LRN, input normalisation, ReLU, softmax,
flatten and dropout.

Each validates its hyper-parameters when it is built, and ``forward`` calls one function of
:mod:`npconv.functional`. ``output_shape`` and ``macs`` take the per-image input shape (no batch axis).
MAC convention: comparisons, additions, divisions and ``exp`` count as 0 MACs, so every layer here reports 0
except :class:`LocalResponseNorm` (see its ``macs``).
"""
from __future__ import annotations

import numpy as np

from .._backend import is_cupy_array, require_cupy
from .._validate import as_pair, check_float_array, check_int, check_real
from ..functional.activation import dropout, flatten, relu, softmax
from ..functional.normalization import _normalize, local_response_norm
from ..functional.pooling import _check_bool, _pool_args, avg_pool2d, max_pool2d, pool2d_out_hw
from ..kernels.cuda import replay
from .base import Layer, register_layer

__all__ = ["MaxPool2d", "AvgPool2d", "LocalResponseNorm", "Normalize", "ReLU", "Softmax", "Flatten", "Dropout"]


def _chw(in_shape, kind):
    """A per-image (C, H, W) shape as a tuple of ints."""
    shape = tuple(in_shape)
    if len(shape) != 3:
        raise ValueError(f"in_shape of a {kind} layer must be (C, H, W) without the batch axis, got {shape}")
    return tuple(check_int(d, "in_shape", min_value=0) for d in shape)


class _Pool2d(Layer):
    def __init__(self, kernel, *, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        k, s, p, ceil_mode = _pool_args(kernel, stride, padding, ceil_mode)
        self.kernel, self.stride, self.padding, self.ceil_mode = k, s, p, ceil_mode
        self._replays_relu = replay.new_table()      # MaxPool2d's calls with relu=True (emptied with _replays)

    def config(self):
        return {"kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "ceil_mode": self.ceil_mode}

    def output_shape(self, in_shape):
        C, H, W = _chw(in_shape, self.kind)
        oh, ow = pool2d_out_hw(H, W, self.kernel, stride=self.stride, padding=self.padding,
                               ceil_mode=self.ceil_mode)
        return (C, oh, ow)

    def macs(self, in_shape):
        """0: pooling does comparisons (max) or additions and one division (average), no multiply-adds."""
        self.output_shape(in_shape)
        return 0


@register_layer
class MaxPool2d(_Pool2d):
    """2-D max pooling (:func:`npconv.functional.pooling.max_pool2d`); ``stride`` None means ``kernel``."""
    kind = "max_pool2d"

    writes_out = True

    def forward(self, x, *, out=None, relu=False):
        """``relu=True``: the pooling of ``relu(x)``, in one pass (see :func:`max_pool2d`)."""
        table = self._replays_relu if relu else self._replays
        rep = replay.lookup(table, x) if out is None else None
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        return replay.call(table, x, out, {}, lambda: max_pool2d(
            x, self.kernel, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode, relu=relu, out=out))


@register_layer
class AvgPool2d(_Pool2d):
    """2-D average pooling (:func:`npconv.functional.pooling.avg_pool2d`)."""
    kind = "avg_pool2d"

    def __init__(self, kernel, *, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        super().__init__(kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
        self.count_include_pad = _check_bool(count_include_pad, "count_include_pad")

    def config(self):
        return {**super().config(), "count_include_pad": self.count_include_pad}

    writes_out = True

    def forward(self, x, *, out=None):
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        return replay.call(self._replays, x, out, {}, lambda: avg_pool2d(
            x, self.kernel, stride=self.stride, padding=self.padding, ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad, out=out))


@register_layer
class LocalResponseNorm(Layer):
    """Cross-channel LRN, PyTorch convention (:func:`npconv.functional.normalization.local_response_norm`)."""
    kind = "lrn"

    def __init__(self, size, *, alpha=1e-4, beta=0.75, k=2.0):
        super().__init__()
        self.size = check_int(size, "size", min_value=1)
        self.alpha = check_real(alpha, "alpha", min_value=0.0)
        self.beta = check_real(beta, "beta", min_value=0.0)
        self.k = check_real(k, "k", positive=True)

    def config(self):
        return {"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}

    writes_out = True

    def forward(self, x, *, out=None):
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        return replay.call(self._replays, x, out, {}, lambda: local_response_norm(
            x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k, out=out))

    def output_shape(self, in_shape):
        return _chw(in_shape, self.kind)

    def macs(self, in_shape):
        """``C*H*W*(size + 2)``: per output, ``size`` multiply-adds for the window's sum of squares (as the formula
        reads, whatever the kernel's running sum does), one for ``k + alpha/size * sum`` and one for the final
        ``x * base**-beta``; the power itself is not counted."""
        C, H, W = _chw(in_shape, self.kind)
        return C * H * W * (self.size + 2)


@register_layer
class Normalize(Layer):
    """Per-channel input normalisation ``(x - mean[c]) / std[c]`` (:func:`npconv.functional.normalization.normalize`).

    ``mean`` and ``std`` (C,) are the layer's arrays (kept in their own dtype, float32 or float64); ``forward``
    uses copies cast to the input's dtype, cached per dtype.
    """
    kind = "normalize"

    def __init__(self, mean, std):
        super().__init__()
        if isinstance(mean, (list, tuple)):
            mean = np.asarray(mean, dtype=np.float64)
        if isinstance(std, (list, tuple)):
            std = np.asarray(std, dtype=np.float64)
        check_float_array(mean, "mean", ndim=1)
        check_float_array(std, "std", ndim=1)
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same shape (one entry per channel), got mean "
                             f"{tuple(mean.shape)} and std {tuple(std.shape)}")
        if mean.shape[0] < 1:
            raise ValueError("mean and std must have at least one channel, got 0 entries")
        xp = np if not is_cupy_array(mean) else __import__("cupy")
        if not bool(xp.isfinite(mean).all()):
            raise ValueError("mean must be finite (no NaN or inf)")
        if not bool(xp.isfinite(std).all()) or not bool((std > 0).all()):
            raise ValueError(f"std must be finite and > 0 for every channel, got a minimum of {float(std.min())}")
        self.params = {"mean": mean, "std": std}
        self.mean, self.std = mean, std
        self._cast = {}

    @classmethod
    def from_config(cls, config, params):
        if config:
            raise ValueError(f"layer kind {cls.kind!r} takes no hyper-parameters, got {sorted(config)}")
        if set(params) != {"mean", "std"}:
            raise ValueError(f"layer kind {cls.kind!r} needs the arrays 'mean' and 'std', got {sorted(params)}")
        return cls(params["mean"], params["std"])

    def _sync_params(self):
        super()._sync_params()
        self._cast = {}

    def _params_as(self, x):
        """(mean, std, 1/std) in x's dtype, on the layer's device (checked at construction; cached per dtype)."""
        if is_cupy_array(x) != is_cupy_array(self.mean):
            where = "GPU (CuPy)" if is_cupy_array(self.mean) else "CPU (NumPy)"
            raise TypeError(f"x must be on the layer's device: the layer's arrays are on the {where}, x is a "
                            f"{type(x).__module__}.{type(x).__name__}; use to_gpu()/to_cpu()")
        key = np.dtype(x.dtype)
        if key not in self._cast:
            mean, std = self.mean.astype(key, copy=False), self.std.astype(key, copy=False)
            self._cast[key] = (mean, std, 1 / std)
        return self._cast[key]

    def forward(self, x):
        rep = replay.lookup(self._replays, x)
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        check_float_array(x, "x", ndim=4)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x must have {self.mean.shape[0]} channels (the length of this Normalize layer's "
                             f"mean and std), got shape {tuple(x.shape)}")
        mean, std, scale = self._params_as(x)
        return replay.call(self._replays, x, None, {"mean": mean, "scale": scale}, lambda: _normalize(
            require_cupy() if is_cupy_array(x) else np, x, mean, std, scale))

    def output_shape(self, in_shape):
        shape = _chw(in_shape, self.kind)
        if shape[0] != self.mean.shape[0]:
            raise ValueError(f"in_shape must have {self.mean.shape[0]} channels for this Normalize layer, "
                             f"got {shape}")
        return shape


@register_layer
class ReLU(Layer):
    """``max(x, 0)`` (:func:`npconv.functional.activation.relu`)."""
    kind = "relu"

    writes_out = True

    def forward(self, x, *, out=None):
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        return replay.call(self._replays, x, out, {}, lambda: relu(x, out=out))


@register_layer
class Softmax(Layer):
    """Softmax along ``axis`` of the batched array (default the last one).

    ``axis`` must not be the batch axis: 0 is refused here, and a negative axis that lands on the batch axis of
    the input (``-x.ndim``) is refused by ``forward`` and ``output_shape``.
    """
    kind = "softmax"

    def __init__(self, *, axis=-1):
        super().__init__()
        self.axis = check_int(axis, "axis")
        if self.axis == 0:
            raise ValueError("axis must not be 0, the batch axis (a softmax normalises each sample on its own); "
                             "got 0")

    def config(self):
        return {"axis": self.axis}

    def forward(self, x):
        rep = replay.lookup(self._replays, x)
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        if self.axis < 0 and getattr(x, "ndim", 0) + self.axis == 0:
            raise ValueError(f"axis {self.axis} of this Softmax layer is the batch axis of x (shape "
                             f"{tuple(x.shape)}); it must be a feature axis")
        return replay.call(self._replays, x, None, {}, lambda: softmax(x, axis=self.axis))

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        nd = len(shape) + 1  # with the batch axis
        if not -nd <= self.axis < nd or self.axis % nd == 0:
            raise ValueError(f"axis {self.axis} of this Softmax layer is not a feature axis of a batched input "
                             f"with per-image shape {shape}")
        return shape


@register_layer
class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...) (:func:`npconv.functional.activation.flatten`)."""
    kind = "flatten"

    def forward(self, x):
        return flatten(x)

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        if len(shape) < 1:
            raise ValueError("in_shape of a flatten layer must have at least one axis, got ()")
        return (int(np.prod(shape, dtype=np.int64)),)


@register_layer
class Dropout(Layer):
    """Dropout at inference: the identity (``p`` is kept so the configuration round-trips; it must be in [0, 1))."""
    kind = "dropout"

    def __init__(self, p=0.5):
        super().__init__()
        self.p = check_real(p, "p", min_value=0.0)
        if not self.p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {self.p}")

    def config(self):
        return {"p": self.p}

    def forward(self, x):
        return dropout(x, p=self.p)
