"""The layer base class and the registry used by the file format.

A layer is thin: it holds its arrays (``self.params``, a dict name -> array) and its hyper-parameters
(``config()``, JSON-serialisable), and ``forward`` calls one pure function from ``npconv.functional``.
The arrays live on the device of the arrays it holds; ``to_gpu``/``to_cpu`` move them once.
"""
from __future__ import annotations

import numpy as np

from .._backend import is_cupy_array, require_cupy
from ..kernels.cuda import replay

__all__ = ["Layer", "register_layer", "layer_class", "LAYER_REGISTRY"]

LAYER_REGISTRY: dict[str, type] = {}


def register_layer(cls):
    """Class decorator: make ``cls`` loadable by ``npconv.load`` under ``cls.kind``."""
    kind = cls.kind
    if kind in LAYER_REGISTRY and LAYER_REGISTRY[kind] is not cls:
        raise ValueError(f"layer kind {kind!r} is already registered by {LAYER_REGISTRY[kind].__name__}")
    LAYER_REGISTRY[kind] = cls
    return cls


def layer_class(kind):
    try:
        return LAYER_REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown layer kind {kind!r}; known kinds: {sorted(LAYER_REGISTRY)}") from None


class Layer:
    """Base class. Subclasses set ``kind``, fill ``self.params`` and implement ``forward``/``config``.

    Optional hooks used by ``Network.summary`` and the cost model:
    ``output_shape(in_shape)`` (without the batch axis) and ``macs(in_shape)`` (multiply-adds per image).

    A layer whose ``writes_out`` is true takes ``forward(x, *, out=None)``: ``out`` is an array of the output's
    shape and dtype to write the result into (``Network.forward`` passes reused buffers this way).
    """
    kind = "layer"
    #: whether ``forward`` takes ``out=`` (see the class docstring)
    writes_out = False

    def __init__(self):
        #: recorded GPU calls by input shape (``kernels/cuda/replay.py``), emptied with the parameters and whenever
        #: a public attribute is set (``__setattr__``)
        self._replays = replay.new_table()
        self.params: dict = {}

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if not name.startswith("_") and "_replays" in self.__dict__:
            replay.forget(self)     # a changed stride, padding, alpha...: the recorded launches no longer apply

    # --- computation ---------------------------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    # --- description ---------------------------------------------------------------------------------
    def config(self) -> dict:
        """Hyper-parameters as a JSON-serialisable dict (arrays go in ``params``)."""
        return {}

    @classmethod
    def from_config(cls, config: dict, params: dict):
        """Rebuild a layer from ``config()`` and its arrays; subclasses with arrays override this."""
        if params:
            raise ValueError(f"layer kind {cls.kind!r} takes no arrays, got {sorted(params)}")
        return cls(**config)

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def macs(self, in_shape) -> int:
        return 0

    def n_params(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({cfg})"

    # --- devices -------------------------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        return any(is_cupy_array(p) for p in self.params.values())

    def to_gpu(self):
        """Move every array to the current CUDA device (in place; returns self)."""
        cp = require_cupy()
        self.params = {k: cp.asarray(v) for k, v in self.params.items()}
        self._sync_params()
        return self

    def to_cpu(self):
        """Move every array to host memory (in place; returns self)."""
        self.params = {k: (v.get() if is_cupy_array(v) else v) for k, v in self.params.items()}
        self._sync_params()
        return self

    def _sync_params(self):
        """Called after ``params`` were replaced; layers that cache derived arrays refresh them here."""
        replay.forget(self)
        for k, v in self.params.items():
            if hasattr(self, k):
                setattr(self, k, v)
