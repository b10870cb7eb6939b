"""Network: an ordered sequence of named layers.

``forward`` runs the layers in order, each calling its pure function; intermediate activations are returned by
name on request. On the CPU the layers that can (``Layer.writes_out``) write their outputs into two activation
buffers that the network keeps per thread and reuses from call to call (``reuse_buffers``), so a steady stream of
batches does not fault in fresh memory for every activation. ``predict`` streams a large array in batches;
``summary`` lists output shapes, parameters and multiply-adds per layer; ``profile`` measures the time per layer.
"""
from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Mapping

import numpy as np

from ._backend import FLOAT_DTYPES, is_cupy_array, require_cupy
from ._validate import check_array, check_int, raise_with_context
from .layers.base import Layer

__all__ = ["Network"]


class Network:
    """An ordered network of named layers.

    Parameters
    ----------
    layers : sequence of (name, Layer) pairs, or a dict name -> Layer (in order)
    input_shape : (C, H, W) or (features,), optional
        The shape of one input, without the batch axis; used by ``summary`` and checked by ``forward``.
    meta : dict, optional
        JSON-serialisable metadata stored with the network (class names, preprocessing notes, provenance).
    """

    def __init__(self, layers, *, input_shape=None, meta=None):
        items = list(layers.items()) if isinstance(layers, dict) else list(layers)
        self._layers: dict[str, Layer] = {}
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"layers[{i}] must be a (name, layer) pair, got {type(item).__name__}")
            name, layer = item
            if not isinstance(name, str) or not name:
                raise TypeError(f"layers[{i}]: the name must be a non-empty str, got {name!r}")
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] ({name!r}) must be an npconv Layer, got {type(layer).__name__}")
            if name in self._layers:
                raise ValueError(f"layers: the name {name!r} is used twice")
            self._layers[name] = layer
        if not self._layers:
            raise ValueError("layers must hold at least one layer")
        if input_shape is not None and (isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__")):
            raise TypeError(f"input_shape must be a sequence of ints (one image's shape), got "
                            f"{type(input_shape).__name__} ({input_shape!r})")
        self.input_shape = None if input_shape is None else tuple(check_int(s, "input_shape", min_value=1)
                                                                  for s in input_shape)
        if meta is not None and not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict (JSON-serialisable metadata), got {type(meta).__name__}")
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ container
    @property
    def names(self):
        return list(self._layers)

    def items(self):
        return list(self._layers.items())

    def __getitem__(self, name):
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no layer named {name!r}; layers are {self.names}") from None

    def __contains__(self, name):
        return name in self._layers

    def __len__(self):
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers.items())

    def __repr__(self):
        body = "\n".join(f"  ({n}): {l!r}" for n, l in self._layers.items())
        return f"Network(\n{body}\n)"

    def copy(self):
        """A deep copy: arrays included, so changing one network never changes the other."""
        return copy.deepcopy(self)

    def replace(self, replacements):
        """A NEW network with some layers replaced: ``replacements`` maps a name to a layer (or a list of
        (name, layer) pairs that take its place). The other layers are deep copies; ``self`` is untouched."""
        for name in replacements:
            self[name]  # KeyError naming the layer
        out = []
        for name, layer in self._layers.items():
            if name not in replacements:
                out.append((name, copy.deepcopy(layer)))
                continue
            rep = replacements[name]
            out.extend(rep if isinstance(rep, list) else [(name, rep)])
        return Network(out, input_shape=self.input_shape, meta=copy.deepcopy(self.meta))

    # ------------------------------------------------------------------ devices
    def to_gpu(self):
        """Move every layer's arrays to the GPU once (in place; returns self)."""
        require_cupy()
        for layer in self._layers.values():
            layer.to_gpu()
        return self

    def to_cpu(self):
        for layer in self._layers.values():
            layer.to_cpu()
        return self

    def cuda_graph(self, x, *, until=None):
        """Record ``forward(x, until=until)`` as a CUDA graph; returns a callable that replays it.

        ``x`` is an example CuPy batch: the returned :class:`npconv._cuda_graph.CudaGraphForward` takes inputs of
        exactly its shape and dtype (``fn(x)`` -> the output, a new array; ``fn(x, copy=False)`` -> the graph's
        own output buffer, overwritten by the next call). One replay is one launch, so a small batch is no longer
        bound by the per-layer Python and launch overhead. The graph keeps the parameters' device addresses as
        they are now: after ``to_gpu``/``to_cpu`` or replacing a layer or a parameter array, a replay raises
        RuntimeError; record a new one. A recorded graph is not meant for concurrent calls from several threads
        (its input and output buffers are shared).
        """
        from ._cuda_graph import CudaGraphForward
        return CudaGraphForward(self, x, until=until)

    @property
    def on_gpu(self):
        return any(layer.on_gpu for layer in self._layers.values())

    # ------------------------------------------------------------------ computation
    def _check_input(self, x):
        check_array(x, "x")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x, *, until=None, return_intermediates=None, reuse_buffers=True):
        """Run the network on ``x`` (N, ...).

        until : str, optional
            Stop after the layer of this name and return its output.
        return_intermediates : a layer name, a sequence of names, or "all", optional
            Also return a dict name -> activation (the output of each named layer); one name (a str) asks for that
            layer's output, "all" for every layer's.
        reuse_buffers : bool
            On the CPU, write the intermediate activations into two buffers kept by this network for the calling
            thread and reused by later calls (grown when a call needs more; ``release_buffers`` frees them).
            A fresh activation costs page faults and the kernel's zeroing: about 40 ms for ZF conv1's 567 MiB
            output at batch 128 when transparent huge pages are available, 200 ms when they are not. The returned
            arrays (the output and the requested intermediates) are never these buffers. False: every
            activation is a fresh array. Ignored for CuPy arrays (CuPy's memory pool already reuses memory).

        An error raised by a layer (a ValueError or TypeError, e.g. an input of the wrong shape for it) names the
        layer: ``"layer 'fc1' (linear): ..."``, of the same type, chained to the layer's own.
        """
        self._check_input(x)
        if not isinstance(reuse_buffers, (bool, np.bool_)):
            raise TypeError(f"reuse_buffers must be a bool, got {type(reuse_buffers).__name__}")
        if until is not None:
            self[until]
        want = self._wanted(return_intermediates)
        unknown = want - set(self.names)
        if unknown:
            raise ValueError(f"return_intermediates names unknown layers {sorted(unknown)}; layers are {self.names}")
        arena = self._arena() if reuse_buffers and not is_cupy_array(x) else None
        x, acts = self._run(x, until, want, arena)
        return (x, acts) if return_intermediates is not None else x

    def _wanted(self, return_intermediates):
        """The set of layer names asked for by ``forward``'s ``return_intermediates``."""
        if return_intermediates is None:
            return set()
        if isinstance(return_intermediates, str):
            return set(self.names) if return_intermediates == "all" else {return_intermediates}
        try:
            return set(return_intermediates)
        except TypeError:
            raise TypeError(f"return_intermediates must be a layer name, a sequence of names or 'all', got "
                            f"{type(return_intermediates).__name__}") from None

    def _run(self, x, until, want, arena, times=None, sync=None):
        """The layers of ``forward`` on ``x``: returns (output, {name: activation} for ``want``). ``times``: a dict
        name -> list, appended each layer's seconds (``sync`` called around each; a ReLU deferred into the max
        pooling after it counts 0, its work being in the pooling's time)."""
        acts = {}
        x0 = x
        items = list(self._layers.items())
        last = until if until is not None else items[-1][0]
        deferred = False  # a ReLU moved past the max pooling that follows it
        for i, (name, layer) in enumerate(items):
            if (layer.kind == "relu" and name not in want and name != until and i + 1 < len(items)
                    and items[i + 1][1].kind == "max_pool2d"):
                # max pooling commutes with ReLU (a monotone map), so rectify the pooled output instead: a
                # quarter (or less) of the data, in the pooling kernel's own pass (max_pool2d's relu option)
                deferred = True
                if times is not None:
                    times[name].append(0.0)
                continue
            if times is not None:
                sync()
                t0 = time.perf_counter()
            # the deferred ReLU rides in the max pooling (its relu option: one pass over the pooled output)
            kw = {"relu": True} if deferred else {}
            deferred = False
            try:  # free on the success path (zero-cost exception handling)
                if layer.kind == "relu" and _owned(x, x0, acts):
                    x = _relu_inplace(x)  # the producer's fresh output is rectified where it lies
                elif arena is not None and layer.writes_out and name not in want and name != last:
                    shape = (x.shape[0],) + tuple(layer.output_shape(tuple(x.shape[1:])))
                    x = layer(x, out=arena.take(shape, x.dtype, avoid=x), **kw)
                else:
                    x = layer(x, **kw)
            except (ValueError, TypeError) as exc:
                raise_with_context(exc, f"layer {name!r} ({layer.kind})")
            if name in want:
                if arena is not None and arena.holds(x):
                    x = x.copy()  # e.g. a ReLU rectified a buffer in place: the caller's copy must stay put
                acts[name] = x
            if times is not None:
                sync()
                times[name].append(time.perf_counter() - t0)
            if name == until:
                break
        if arena is not None and arena.holds(x):
            x = x.copy()  # e.g. a Flatten view of a buffer: the caller gets memory of its own
        return x, acts

    __call__ = forward

    def _arena(self):
        """The calling thread's activation buffers for this network (created on first use)."""
        with _ARENA_LOCK:
            entry = _ARENAS.get(self)
            if entry is None:
                entry = _ARENAS[self] = (threading.local(), weakref.WeakSet())
        local, every = entry
        arena = getattr(local, "arena", None)
        if arena is None:  # the thread-local reference keeps it alive; a finished thread's goes with the thread
            arena = local.arena = _Arena()
            with _ARENA_LOCK:
                every.add(arena)
        return arena

    def buffer_bytes(self):
        """Bytes held by the activation buffers that ``forward`` keeps for reuse, over all threads."""
        with _ARENA_LOCK:
            entry = _ARENAS.get(self)
            return 0 if entry is None else sum(a.nbytes() for a in entry[1])

    def release_buffers(self):
        """Free the activation buffers that ``forward`` keeps for reuse (those of every thread); returns the
        number of bytes released. The next ``forward`` allocates them again. A forward running in another
        thread at that moment finishes with the buffers it already holds."""
        with _ARENA_LOCK:
            entry = _ARENAS.pop(self, None)
            arenas = [] if entry is None else list(entry[1])
        n = 0
        for a in arenas:
            n += a.nbytes()
            a.slots = [None, None]
        return n

    def predict(self, X, *, batch_size=128, dtype=np.float32, progress=False, until=None):
        """Run the network over a large array ``X`` (N, ...) in batches; returns the stacked outputs.

        ``X`` may be of any real dtype (e.g. uint8 images, a memory map); each batch is converted to ``dtype``
        and, for a network on the GPU, copied to the device (outputs come back as NumPy arrays).
        """
        check_array(X, "X")
        batch_size = check_int(batch_size, "batch_size", min_value=1)
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        gpu = self.on_gpu
        from ._progress import progress_bar
        outs = []
        starts = range(0, len(X), batch_size)
        for s in progress_bar(starts, desc="predict", enable=progress):
            xb = np.asarray(X[s:s + batch_size]) if not is_cupy_array(X) else X[s:s + batch_size]
            if gpu and not is_cupy_array(xb):
                xb = require_cupy().asarray(xb)
            xb = xb.astype(dtype, copy=False)
            y = self.forward(xb, until=until)
            outs.append(y.get() if is_cupy_array(y) else y)
        if not outs:
            raise ValueError("X must hold at least one sample, got 0")
        return np.concatenate(outs)

    # ------------------------------------------------------------------ description
    def shapes(self, input_shape=None):
        """Output shape (without batch) of every layer, as a list of (name, layer, in_shape, out_shape); a layer that
        refuses its input shape raises a ValueError naming it."""
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise ValueError("input_shape is needed: give it here or when building the Network")
        rows = []
        for name, layer in self._layers.items():
            try:
                out = tuple(layer.output_shape(shape))
            except (ValueError, TypeError) as exc:
                raise_with_context(exc, f"layer {name!r} ({layer.kind})")
            rows.append((name, layer, shape, out))
            shape = out
        return rows

    def summary(self, input_shape=None, *, print_fn=print):
        """Print and return a per-layer table: output shape, parameter count and multiply-adds per image."""
        rows = []
        for name, layer, shp, out in self.shapes(input_shape):
            rows.append(dict(name=name, kind=layer.kind, output_shape=out, params=layer.n_params(),
                             macs=int(layer.macs(shp))))
        if print_fn is not None:
            print_fn(format_table(rows))
        return rows

    def profile(self, x, *, repeat=3, warmup=1, print_fn=print):
        """Measure the time of each layer on ``x`` (median of ``repeat`` runs after ``warmup``); returns rows.

        The layers run as ``forward`` runs them: intermediate activations in the network's reused buffers, a
        ReLU rectifying its producer's output in place, and a ReLU just before a max pooling done by the pooling
        (its row then shows 0 seconds, the work being in the pooling's row). So the rows add up to the time of a
        forward pass, not of the layers called one by one on fresh arrays (page faults and all)."""
        self._check_input(x)
        repeat = check_int(repeat, "repeat", min_value=1)
        warmup = check_int(warmup, "warmup", min_value=0)
        sync = _sync_for(x)
        times = {n: [] for n in self.names}
        arena = None if is_cupy_array(x) else self._arena()
        for it in range(warmup + repeat):
            run = {n: [] for n in self.names}
            self._run(x, None, set(), arena, times=run, sync=sync)
            if it >= warmup:
                for n in self.names:
                    times[n].append(run[n][0])
        total = sum(float(np.median(t)) for t in times.values())
        rows = [dict(name=n, kind=self[n].kind, seconds=float(np.median(t)),
                     share=float(np.median(t)) / total if total > 0 else 0.0) for n, t in times.items()]
        if print_fn is not None:
            print_fn(format_table([dict(r, ms=r["seconds"] * 1e3) for r in rows],
                                  columns=("name", "kind", "ms", "share")))
        return rows

    def n_params(self):
        return sum(layer.n_params() for layer in self._layers.values())


#: network -> (threading.local holding each thread's _Arena, WeakSet of them all); weak keys: the buffers go
#: with the network (a deep copy of a network starts without any)
_ARENAS = weakref.WeakKeyDictionary()
_ARENA_LOCK = threading.Lock()


class _Arena:
    """Two reusable activation buffers of one thread: a layer writes into the one that does not hold its input."""

    def __init__(self):
        self.slots = [None, None]

    def take(self, shape, dtype, *, avoid):
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` in the slot that ``avoid`` is not in."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        i = 1 if self.slots[0] is not None and np.may_share_memory(self.slots[0], avoid) else 0
        buf = self.slots[i]
        if buf is None or buf.nbytes < nbytes:
            self.slots[i] = None  # free the smaller buffer before allocating the larger one
            # a whole number of 64-byte lines (at least one); NumPy advises huge pages for a large one
            buf = self.slots[i] = np.empty(max(64, -(-nbytes // 64) * 64), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def holds(self, a):
        return isinstance(a, np.ndarray) and any(b is not None and np.may_share_memory(b, a) for b in self.slots)

    def nbytes(self):
        return sum(b.nbytes for b in self.slots if b is not None)


def _owned(x, x0, acts):
    """True when ``x`` (NumPy or CuPy) is an array no one else holds: not the caller's input nor a returned
    activation (a view of either counts as held), so a ReLU may overwrite it."""
    if is_cupy_array(x):
        share = require_cupy().may_share_memory
    elif isinstance(x, np.ndarray) and x.flags.writeable:
        share = np.may_share_memory
    else:
        return False
    if share(x, x0):  # the input and the activations are of the same kind as x (checked by forward)
        return False
    return not any(share(x, a) for a in acts.values())


def _relu_inplace(x):
    if x.ndim == 4:
        from .functional import bias_relu_
        return bias_relu_(x, None)  # NumPy: one parallel numba pass; CuPy: one in-place elementwise kernel
    if is_cupy_array(x):
        return require_cupy().maximum(x, 0, out=x)
    return np.maximum(x, 0, out=x)


def _sync_for(x):
    if is_cupy_array(x):
        cp = require_cupy()
        return cp.cuda.get_current_stream().synchronize
    return lambda: None


def format_table(rows, columns=None):
    """A plain-text table of dict rows (numbers right-aligned)."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, (int, np.integer)):
            return f"{int(v):,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(v.rjust(w) if v[:1].isdigit() or v[:1] == "-" else v.ljust(w)
                             for v, w in zip(row, widths)))
    return "\n".join(out)
