"""Call plans: a CPU layer's call at an input shape it has seen, without redoing its Python work.

The CPU counterpart of the GPU's launch replay (``kernels/cuda/replay.py``). At batch 1 a factored conv layer runs
in a few hundred microseconds, and the Python around its kernel (the layer's and the functional path's checks, the
band and scratch geometry, the prepared-weights lookups) took 21-41 us of it on the development VM (twenty-sixth
session: ZF conv2 biclustered CP 24 us of a 0.40 ms call, SVD 41 of 0.62 ms, shared 21 of 0.45 ms; and while that
Python runs, numba's workers stop spinning and must be woken). All of that depends only on the input's shape and
dtype and on the thread count.

So a layer records, on its first CPU call at a shape (:func:`call`), the numba kernel calls of its ordinary path:
each call that the path makes through :func:`run` (kernel and arguments), in order. An array argument is classed as
the input (``x`` itself, or a C-contiguous view of all of its memory), the output (likewise), or an array to keep:
the layer's prepared weights, offsets, and the call's scratch (views of the thread's workspace, ``_workspace.WS``).
Later calls at the same shape (:func:`lookup`) allocate the output (or take ``out=``, checked as the ordinary path
checks it) and repeat the kernel calls with the new input and output in their places.

What makes a recording a plan, all of it checked but the first:

* the path said so: the CPU paths call :func:`complete` with their output before returning it, on paths whose whole
  work on arrays is the kernel calls made through :func:`run` (the fused biclustered layers; the direct kernel,
  which runs dense convs and the monochromatic layer; the dense conv's lanes kernel, Winograd on the GEMM
  micro-kernel, im2col and the micro-kernel in one chunk and one group, the depthwise kernel; ``gemm.matmul`` makes
  its call through :func:`run`). No NumPy operation on a kept array may run between them: the plan would not repeat
  it (``np.copyto`` through :func:`run` is a call like the others).
  ``tests/kernels/test_cpu_plan.py`` compares every planned layer with its ordinary path on new inputs, after
  other layers have written over the workspace;
* the layer returns the completed array itself, and only one path completed in the call (a layer that composes
  paths, as the separable layer's two convs, is not planned);
* no kept array overlaps the input or the output other than as a whole (a batch in chunks is not planned);
* the kept scratch takes at most :data:`MAX_HELD_BYTES` (a plan keeps it between calls);
* the plan runs only in the thread that recorded it (its scratch is that thread's workspace; another thread records
  its own) and with the same number of numba threads (the kernels size their scratch by it);
* the rules were not changed since: the watched modules (the functional and CPU-kernel modules of the planned
  paths) advance the generation that the GPU's replays use (``replay.generation``) whenever one of their attributes
  is set, and so does ``WS.clear()``; a plan of an older generation is not used (the next call records again).

Plans live in the layer's replay table (``Layer._replays``) under ``(shape, dtype, thread)`` (:func:`key_of`; the
GPU's replays under the shape alone), each Python thread that calls the layer with its own. So they are emptied with
the GPU replays, whenever the layer's parameters are replaced or a public attribute is set, and a deep copy or a
pickled layer starts without them. A layer keeps its cast and derived parameters for one dtype at a time, and drops
its plans (:func:`drop`) when it switches to another, so that no plan keeps a second dtype's arrays alive. The
layers that plan: ``Conv2d``, ``MonochromaticConv2d`` and the biclustered conv layers (CP, SVD, shared separable).
``bench/cpu_plan.py`` times each with its plan and with its path.
"""
from __future__ import annotations

import threading

import numba
import numpy as np

from ..._validate import check_out
from ..._workspace import WS
from ..cuda import replay as _replay

__all__ = ["run", "complete", "call", "lookup", "key_of", "drop", "watch", "Plan", "MAX_HELD_BYTES"]

#: bytes of workspace (scratch) one plan may keep between calls; a call needing more is not planned
MAX_HELD_BYTES = 64 * 2**20
#: whether layers record and run plans. A module constant for same-process comparisons (``bench/cpu_plan.py``), not
#: a user setting
USE_PLANS = True

_local = threading.local()


def watch(module_name: str) -> None:
    """Make every plan (and GPU replay) stale whenever an attribute of module ``module_name`` is set from outside
    (a rule or a kernel replaced: ``module.RULE = v``, ``monkeypatch.setattr``)."""
    _replay.watch(module_name)


class _Recording:
    __slots__ = ("calls", "completed", "n_completed")

    def __init__(self):
        self.calls = []
        self.completed = None
        self.n_completed = 0

    def absorb(self, inner):
        self.calls.extend(inner.calls)


def run(kernel, *args):
    """``kernel(*args)``: a CPU path's kernel call, noted when a recording is on in this thread."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.calls.append((kernel, args))
    return kernel(*args)


def complete(y) -> None:
    """Say that the kernel calls of this path so far (made through :func:`run`) are all the work that produced
    ``y``, the array the path returns (a no-op unless a recording is on)."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.completed = y
        rec.n_completed += 1


class Plan:
    """The kernel calls of one recorded call; ``plan(x, out)`` repeats them for a new input of the same shape and
    dtype, into ``out`` (checked) or a new output, and returns the output."""
    __slots__ = ("calls", "out_shape", "dtype", "nthreads", "generation", "inputs")

    def __init__(self, calls, out_shape, dtype, inputs):
        self.calls = calls                 # (kernel, args, x slots, y slots); a slot is (index, shape or None)
        self.out_shape = out_shape
        self.dtype = dtype
        self.inputs = inputs               # (name, array) pairs that out must not overlap, besides x
        self.nthreads = numba.get_num_threads()
        self.generation = _replay.generation()

    def __call__(self, x, out=None):
        if out is None:
            y = np.empty(self.out_shape, self.dtype)
        else:
            y = check_out(out, self.out_shape, self.dtype, like=x, inputs=(("x", x),) + self.inputs)
        for kernel, args, xs, ys in self.calls:
            a = list(args)
            for i, shape in xs:
                a[i] = x if shape is None else x.reshape(shape)
            for i, shape in ys:
                a[i] = y if shape is None else y.reshape(shape)
            kernel(*a)
        return y


def key_of(x):
    """A plan's key in a layer's table: x's shape and dtype and the calling thread (a plan keeps its thread's
    workspace views, so each Python thread that calls the layer records its own)."""
    return (x.shape, x.dtype, threading.get_ident())


def lookup(table, x):
    """The plan in ``table`` for input ``x``, or None: a C-contiguous NumPy array of the same shape and dtype, in the
    recording thread, with the same numba thread count, recorded in the current generation."""
    if not table or type(x) is not np.ndarray or not USE_PLANS:
        return None
    pl = table.get(key_of(x))
    if (type(pl) is not Plan or pl.generation != _replay.generation() or not x.flags.c_contiguous
            or pl.nthreads != numba.get_num_threads()):
        return None
    return pl


def drop(table) -> None:
    """Remove the CPU plans (and notes) from a layer's table, keeping its GPU replays: a layer whose parameter cache
    switches to another dtype (it keeps one) drops them, so that no plan keeps the other dtype's arrays alive."""
    for k in [k for k, v in table.items() if type(v) in (Plan, _NoPlan)]:
        del table[k]


class _NoPlan:
    """A table entry: this shape's call is not planned (in this generation); run it without recording again."""
    __slots__ = ("generation",)

    def __init__(self):
        self.generation = _replay.generation()


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _slot(a, whole):
    """None when ``a`` does not touch ``whole``'s memory; (shape or None) when it is ``whole`` or a C-contiguous
    view of all of it; False when it overlaps it otherwise."""
    if a is whole:
        return (None,)
    if a.size == 0:
        return None
    lo, hi = _replay.extent(a, a.ctypes.data)
    wlo, whi = _replay.extent(whole, whole.ctypes.data)
    if hi <= wlo or whi <= lo:
        return None
    if (lo, hi) == (wlo, whi) and a.flags.c_contiguous and a.dtype == whole.dtype and a.size == whole.size:
        return (a.shape,)
    return False


def _make(rec, x, y, params):
    """The plan of a recording, or None when it is not one (see the module docstring)."""
    if rec.completed is not y or rec.n_completed != 1 or not rec.calls:
        return None                        # (two paths completed in one call: a layer composing paths)
    ws_roots = {id(b) for b in WS.bufs.values()}
    held, seen = 0, set()
    calls = []
    for kernel, args in rec.calls:
        xs, ys = [], []
        for i, a in enumerate(args):
            if not isinstance(a, np.ndarray):
                continue
            sx, sy = _slot(a, x), _slot(a, y)
            if sx is False or sy is False:
                return None                # a part of the input or output: chunks, views at offsets
            if sx is not None and sy is not None:
                return None                # out aliases x: not a case to plan
            if sx is not None:
                xs.append((i, sx[0]))
            elif sy is not None:
                ys.append((i, sy[0]))
            else:
                r = _root(a)
                if id(r) in ws_roots and id(r) not in seen:
                    seen.add(id(r))
                    held += r.nbytes
        calls.append((kernel, args, tuple(xs), tuple(ys)))
    if held > MAX_HELD_BYTES:
        return None
    inputs = tuple((k, v) for k, v in params.items() if isinstance(k, str) and isinstance(v, np.ndarray))
    return Plan(tuple(calls), tuple(y.shape), y.dtype, inputs)


def call(table, x, out, params, run_path):
    """A layer's CPU call: ``run_path()`` (its ordinary path), recorded when x is a C-contiguous NumPy array; the
    plan of it, if it is one, goes into ``table`` under :func:`key_of`, else a note not to record this shape
    again in this generation. ``params``: the layer's cached parameters (``out`` must not overlap them). The layer
    looks its plans up first (:func:`lookup`), before its own checks."""
    if type(x) is not np.ndarray or not x.flags.c_contiguous or not USE_PLANS:
        return run_path()
    key = key_of(x)
    seen = table.get(key)
    if type(seen) is _NoPlan and seen.generation == _replay.generation():
        return run_path()
    rec = _Recording()
    y, nested = _replay.run_recorded(_local, rec, run_path)
    if nested:
        return y
    pl = _make(rec, x, y, params)
    if len(table) >= _replay.MAX_SHAPES:
        table.clear()
    table[key] = _NoPlan() if pl is None else pl
    return y
