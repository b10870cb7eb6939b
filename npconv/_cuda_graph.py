"""A network's forward pass recorded once as a CUDA graph and replayed: ``Network.cuda_graph``.

At small batches a GPU forward pass is bound by the host, not the device: each layer validates its arguments in
Python and launches one to a few kernels, and the device waits for the next launch. A CUDA graph records the whole
sequence of launches (kernels and cuBLAS calls) once; replaying it is one launch, whatever the number of layers.

How it works (CuPy's stream capture):

1. One eager forward pass on the example input, with CuPy's usual allocator. It compiles and loads every kernel
   and fills the layers' per-device parameter caches, so nothing of that happens while recording.
2. The input is copied into a buffer of the graph's own, and a second forward pass is *recorded* on a private
   stream, with every allocation served by a private ``cupy.cuda.MemoryPool``. The graph's kernels keep the
   addresses of those allocations, so the pool is held by the recorded graph and never used by anything else:
   CuPy's default pool can be emptied (``free_all_blocks``) without pulling memory out from under the graph.
3. A call copies the caller's input into the graph's input buffer, launches the graph on the caller's current
   stream (so it is ordered after the work that produced the input) and returns the output buffer's contents.

A recorded graph is tied to one input shape and dtype, and to the network's parameters as they were when it was
recorded (their device addresses): replacing parameters or moving the network needs a new recording.
"""
from __future__ import annotations

import numpy as np

from ._backend import is_cupy_array, require_cupy

__all__ = ["CudaGraphForward"]


class CudaGraphForward:
    """``network.forward`` for one input shape and dtype, replayed as a CUDA graph (see the module docstring).

    Build it with :meth:`npconv.Network.cuda_graph`. Calling it runs the recorded forward pass on a CuPy array of
    the recorded shape and dtype and returns the output; with ``copy=False`` the graph's own output buffer is
    returned, which the next call overwrites.
    """

    def __init__(self, network, x, *, until=None):
        if not is_cupy_array(x):
            raise TypeError(f"x must be a cupy.ndarray (a CUDA graph records GPU work), got "
                            f"{type(x).__module__}.{type(x).__name__}")
        cp = require_cupy()
        network._check_input(x)
        if not network.on_gpu:
            raise ValueError("the network's parameters are on the CPU: call network.to_gpu() before cuda_graph()")
        self.network, self.until = network, until
        self.shape, self.dtype = tuple(x.shape), np.dtype(x.dtype)
        network.forward(x, until=until)                 # 1. compile, load, fill the caches (default pool)
        # the graph reads the parameters at their current addresses: hold them, and refuse to replay once the
        # network's parameter arrays are others (to_cpu/to_gpu, a replaced layer or array)
        self._params = _param_arrays(network)
        self._pool = cp.cuda.MemoryPool()
        self._stream = cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(self._pool.malloc), self._stream:
            self._x = cp.empty(self.shape, dtype=self.dtype)
            self._x[...] = x
            self._stream.synchronize()
            self._stream.begin_capture()
            try:
                y = network.forward(self._x, until=until)     # 2. recorded, not run
            except BaseException:
                try:
                    self._stream.end_capture()    # leave the stream usable; the forward pass's error is the news
                except Exception:  # noqa: BLE001
                    pass
                raise
            self._graph = self._stream.end_capture()
        self._y = y
        self._graph.upload(self._stream)
        self._stream.synchronize()

    @property
    def output_shape(self):
        return tuple(self._y.shape)

    def __call__(self, x, *, copy=True):
        if not is_cupy_array(x):
            raise TypeError(f"x must be a cupy.ndarray, got {type(x).__module__}.{type(x).__name__}")
        cp = require_cupy()
        if tuple(x.shape) != self.shape or x.dtype != self.dtype:
            raise ValueError(f"x must have the recorded shape {self.shape} and dtype {self.dtype}, got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}: record another graph for it")
        self._check_params()
        stream = cp.cuda.get_current_stream()
        self._x[...] = x                                # on the current stream, after the work that made x
        self._graph.launch(stream)
        return self._y.copy() if copy else self._y

    def _check_params(self):
        now = _param_arrays(self.network)
        if len(now) != len(self._params) or any(a is not b for a, b in zip(now, self._params)):
            raise RuntimeError("the network's parameter arrays changed since this CUDA graph was recorded "
                               "(to_cpu/to_gpu, or a replaced layer or array): record a new one with "
                               "network.cuda_graph(x)")

    def __repr__(self):
        return (f"CudaGraphForward(input {self.shape} {self.dtype.name} -> output {self.output_shape}, "
                f"{len(self.network)} layers)")


def _param_arrays(network):
    """Every parameter array of every layer of ``network``, in a fixed order."""
    return [layer.params[k] for _, layer in network.items() for k in sorted(getattr(layer, "params", {}) or {})]
