"""Layers executing biclustered convolutions as their factors (never as a rebuilt dense kernel).

* :class:`BiclusterConv2d` (``kind="bicluster_conv2d"``): the CP form (``form="cp"``: arrays ``reduce``,
  ``vertical``, ``horizontal``, ``expand``) or the SVD form (``form="svd"``: ``reduce``, ``spatial``,
  ``expand``), plus the groups (``in_perm``, ``in_offsets``, ``out_perm``, ``out_offsets``) and an optional
  ``bias``. Forward: :func:`npconv.functional.bicluster.bicluster_cp_conv2d` / ``bicluster_svd_conv2d``.
* :class:`SharedSeparableConv2d` (``kind="shared_separable_conv2d"``): the shared-filter form (``reduce``,
  ``assign``, ``vertical``, ``horizontal``, ``expand`` + groups, bias). Forward:
  :func:`npconv.functional.bicluster.shared_separable_conv2d`.

Build them from a decomposition result with ``result.to_layer(bias=..., stride=..., padding=...)``. Float
arrays are cast to the input's dtype (cached for one dtype); integer arrays (groups, filter assignment) are kept.
``macs`` is the executed multiply-add count (``result.cost(..., form="exact")``); ``n_params`` counts the float
weights and the bias, not the integer index arrays (as :mod:`npconv.decompose.cost` does).
"""
from __future__ import annotations

import numpy as np

from .._backend import is_cupy_array, to_numpy
from .._validate import as_pair, as_padding4, check_float_array, check_option, out_size
from ..decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
from ..decompose.shared import SharedSeparableResult
from ..functional import bicluster as FB
from ..kernels.cpu import plan
from ..kernels.cuda import replay
from .base import Layer, register_layer
from .dense import dense_equivalent

__all__ = ["BiclusterConv2d", "SharedSeparableConv2d"]

_GROUP_KEYS = ("in_perm", "in_offsets", "out_perm", "out_offsets")


def _host(a):
    return to_numpy(a) if is_cupy_array(a) else a


class _FactoredConv(Layer):
    """Shared machinery: validation through the result type, dtype cast cache, geometry."""

    _INT_KEYS: tuple = _GROUP_KEYS

    def _init_common(self, result, bias, stride, padding):
        self._result = result                     # host copy, for shapes and costs
        self.stride = as_pair(stride, "stride")
        self.padding = as_padding4(padding)
        F = result.shape[0]
        if bias is not None:
            bias = _host(bias)
            if not isinstance(bias, np.ndarray) or bias.ndim != 1 or bias.shape[0] != F:
                raise ValueError(f"bias must be an array of shape ({F},), got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            if bias.dtype not in (np.float32, np.float64):
                raise TypeError(f"bias must have dtype float32 or float64, got {bias.dtype}")
            if not np.isfinite(bias).all():
                raise ValueError("bias contains non-finite values (NaN or inf)")
        self.params = {k: getattr(result, k) for k in result.FACTORS}
        if bias is not None:
            self.params["bias"] = bias
        self._cache = {}

    @property
    def bias(self):
        return self.params.get("bias")

    @property
    def result(self):
        """The decomposition result this layer executes (host arrays). After ``params`` are replaced with other
        factors (and ``_sync_params``), it is rebuilt from them, without the fit's ``errors`` and ``meta``."""
        return self._result

    def to_dense(self):
        """The :class:`~npconv.layers.Conv2d` computing the same map: the kernel rebuilt from the factors
        (``result.to_tensor()``, in the factors' dtype), the same bias, stride and padding, on this layer's device."""
        W = self._result.to_tensor()
        return dense_equivalent(self, W, W.dtype, stride=self.stride, padding=self.padding)

    def _sync_params(self):
        """After ``params`` were replaced: drop the cast cache, and rebuild (so validate) the result from the new
        factors when they differ from its own, so that shapes, costs and ``to_dense`` follow what forward runs."""
        self._cache = {}
        replay.forget(self)
        res = self._result
        missing = [k for k in res.FACTORS if k not in self.params]
        if missing:
            raise ValueError(f"params must hold the factors {list(res.FACTORS)}, missing {missing}")
        host = {k: _host(self.params[k]) for k in res.FACTORS}    # a device move (to_gpu/to_cpu): same values

        def same(k):
            a, b = host[k], getattr(res, k)
            return a is b or (isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                              and np.array_equal(a, b))

        if not all(same(k) for k in res.FACTORS):
            self._result = type(res)(**host)

    def _params_for(self, x):
        """Float arrays cast to x's dtype (cached for one dtype and device), offsets as host int64 arrays, and on the
        GPU the device index arrays as int32 (the kernels' index type: converted once here, not on every call)."""
        check_float_array(x, "x", ndim=4)
        gpu = is_cupy_array(x)
        key = (np.dtype(x.dtype), gpu)
        hit = self._cache.get(key)
        if hit is None:
            on_gpu = any(is_cupy_array(v) for v in self.params.values())
            if gpu != on_gpu:
                where = "GPU (CuPy)" if on_gpu else "CPU (NumPy)"
                raise TypeError(f"x must be on the layer's device: the layer's arrays are on the {where}, x is a "
                                f"{type(x).__module__}.{type(x).__name__}; use to_gpu()/to_cpu()")
            hit = {}
            for k, v in self.params.items():
                if k in ("in_offsets", "out_offsets"):
                    hit[k] = np.ascontiguousarray(_host(v), dtype=np.int64)
                elif k in self._INT_KEYS:
                    hit[k] = v.astype(np.int32) if gpu and is_cupy_array(v) and v.dtype != np.int32 else v
                else:
                    hit[k] = v if v.dtype == x.dtype else v.astype(x.dtype)
            self._cache = {key: hit}
            plan.drop(self._replays)        # one dtype kept: no CPU plan keeps another dtype's arrays
        return hit

    writes_out = True

    def _run(self, form, x, names, out=None):
        pl = plan.lookup(self._replays, x)
        if pl is not None:                  # this shape's CPU kernel calls, recorded (``kernels/cpu/plan.py``)
            return pl(x, out)
        rep = replay.lookup(self._replays, x) if out is None else None
        if rep is not None:                 # this shape's GPU work, recorded (``kernels/cuda/replay.py``)
            return rep(x)
        p = self._params_for(x)
        C = self._result.shape[1]
        if x.shape[1] != C:
            raise ValueError(f"x must have {C} input channels (the layer's), got {x.shape[1]} "
                             f"(x.shape {tuple(x.shape)})")
        _, OH, OW = self.output_shape(tuple(x.shape[1:]))
        # p (reset with the parameters) also keeps what the CPU path derives from the factors
        def run():
            return FB.run_validated(form, x, tuple(p[k] for k in names), p.get("bias"), self.stride, self.padding, OH,
                                    OW, out, prep=p)
        return plan.call(self._replays, x, out, p, lambda: replay.call(self._replays, x, out, p, run))

    def output_shape(self, in_shape):
        C, H, W = in_shape
        X, Y = self._result.kernel_size
        if C != self._result.shape[1]:
            raise ValueError(f"in_shape must have {self._result.shape[1]} channels, got {C}")
        return (self._result.shape[0],
                out_size(H, X, self.stride[0], self.padding[0], self.padding[1], what="output height"),
                out_size(W, Y, self.stride[1], self.padding[2], self.padding[3], what="output width"))

    def macs(self, in_shape) -> int:
        return int(self._result.cost(tuple(in_shape), stride=self.stride, padding=self.padding).macs)

    def n_params(self) -> int:
        b = self.params.get("bias")
        return int(self._result.n_params() + (0 if b is None else b.shape[0]))

    def _config_common(self):
        return {"stride": list(self.stride), "padding": list(self.padding)}


@register_layer
class BiclusterConv2d(_FactoredConv):
    """Biclustered conv layer, CP or SVD form (see the module doc).

    Parameters (keyword-only): ``form`` ("cp" or "svd"); the group arrays ``in_perm``, ``in_offsets``,
    ``out_perm``, ``out_offsets``; ``reduce`` and ``expand``; ``vertical`` and ``horizontal`` (CP) or
    ``spatial`` (SVD); ``bias`` (F,) or None; ``stride``; ``padding``. Shapes as in
    :mod:`npconv.decompose.bicluster`; they are validated by building the result type.
    """
    kind = "bicluster_conv2d"

    def __init__(self, *, form, in_perm, in_offsets, reduce, expand, out_perm, out_offsets, vertical=None,
                 horizontal=None, spatial=None, bias=None, stride=1, padding=0):
        super().__init__()
        check_option(form, "form", {"cp", "svd"})
        arrays = dict(in_perm=in_perm, in_offsets=in_offsets, reduce=reduce, expand=expand, out_perm=out_perm,
                      out_offsets=out_offsets)
        arrays = {k: _host(v) for k, v in arrays.items()}
        if form == "cp":
            if spatial is not None:
                raise ValueError("form='cp' takes vertical and horizontal, not spatial")
            if vertical is None or horizontal is None:
                raise ValueError("form='cp' needs vertical (G, H, K, X) and horizontal (G, H, K, Y)")
            result = BiclusterCPResult(vertical=_host(vertical), horizontal=_host(horizontal), **arrays)
        else:
            if vertical is not None or horizontal is not None:
                raise ValueError("form='svd' takes spatial, not vertical/horizontal")
            if spatial is None:
                raise ValueError("form='svd' needs spatial (G, H, K2, K1, X, Y)")
            result = BiclusterSVDResult(spatial=_host(spatial), **arrays)
        self.form = form
        self._init_common(result, bias, stride, padding)

    @classmethod
    def from_result(cls, result, *, bias=None, stride=1, padding=0):
        """The layer executing a :class:`BiclusterCPResult` or :class:`BiclusterSVDResult`."""
        if isinstance(result, BiclusterCPResult):
            form = "cp"
        elif isinstance(result, BiclusterSVDResult):
            form = "svd"
        else:
            raise TypeError(f"result must be a BiclusterCPResult or BiclusterSVDResult, got {type(result).__name__}")
        arrays = {k: getattr(result, k) for k in result.FACTORS}
        return cls(form=form, bias=bias, stride=stride, padding=padding, **arrays)

    @classmethod
    def from_config(cls, config, params):
        return cls(**params, **config)

    def config(self):
        return {"form": self.form, **self._config_common()}

    def forward(self, x, *, out=None):
        return self._run(self.form, x, self._result.FACTORS, out)


@register_layer
class SharedSeparableConv2d(_FactoredConv):
    """Biclustered CP conv layer with shared separable filters (see :mod:`npconv.decompose.shared`).

    Parameters (keyword-only): the group arrays, ``reduce`` (C, H, K), ``assign`` (G, H, K) int,
    ``vertical`` (S, X), ``horizontal`` (S, Y), ``expand`` (F, G, K), ``bias``, ``stride``, ``padding``.

    ``to_gpu`` keeps ``assign`` in host memory: the GPU path builds its filter lists from it on the host, so keeping
    it there avoids a device-to-host copy (and a synchronisation) on every call.
    """
    kind = "shared_separable_conv2d"
    _INT_KEYS = _GROUP_KEYS + ("assign",)

    def __init__(self, *, in_perm, in_offsets, reduce, assign, vertical, horizontal, expand, out_perm,
                 out_offsets, bias=None, stride=1, padding=0):
        super().__init__()
        arrays = dict(in_perm=in_perm, in_offsets=in_offsets, reduce=reduce, assign=assign, vertical=vertical,
                      horizontal=horizontal, expand=expand, out_perm=out_perm, out_offsets=out_offsets)
        result = SharedSeparableResult(**{k: _host(v) for k, v in arrays.items()})
        self._init_common(result, bias, stride, padding)

    @classmethod
    def from_result(cls, result, *, bias=None, stride=1, padding=0):
        if not isinstance(result, SharedSeparableResult):
            raise TypeError(f"result must be a SharedSeparableResult, got {type(result).__name__}")
        arrays = {k: getattr(result, k) for k in result.FACTORS}
        return cls(bias=bias, stride=stride, padding=padding, **arrays)

    @classmethod
    def from_config(cls, config, params):
        return cls(**params, **config)

    def config(self):
        return self._config_common()

    def to_gpu(self):
        """Move the arrays to the current CUDA device, except ``assign`` (kept in host memory); returns self."""
        assign = _host(self.params["assign"])
        super().to_gpu()
        self.params["assign"] = assign
        self._sync_params()
        return self

    def forward(self, x, *, out=None):
        return self._run("shared", x, self._result.FACTORS, out)
