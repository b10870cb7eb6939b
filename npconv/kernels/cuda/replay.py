"""Launch replay: a layer's GPU call at an input shape it has seen, without redoing its host work.

At batch 1 a GPU layer's time is mostly the host's: on the H100 machine's Xeon (twenty-fifth session,
``docs/gpu_results.md``) the dense ``Conv2d`` of ZF conv1 spent 79 us of host time a call before its 34 us kernel,
the CUDA launch itself (CuPy packing 20 arguments) a third of it, the rest the checks and the planning of the call in
Python. All of that depends on the input's shape, dtype and device alone.

So a layer whose GPU path for a shape is nothing but kernel launches over the input, the layer's own (cached)
parameters, arrays built once from host data (``ops.on_device``) and one freshly allocated output records those
launches on its first call at that shape (:func:`record`): the kernel, grid, block, shared memory and packed
arguments, each array argument classed as the input, the output or a constant. Later calls with the same input
shape, dtype, array type and device (:func:`lookup`) allocate the output and launch the same kernels with the new
input and output in their places (:class:`Replay`).

What makes a recording a replay, all of it checked:

* the path said so: the GPU entry points call :func:`complete` with their output just before returning it, on the
  paths whose whole device work is their launches (a cuBLAS product, a copy, a workspace or a nested call's output
  leaves the call without a replay: the ``complete`` of a nested op names another array than the one returned);
* every array argument of every launch is the input (same device pointer, shape and dtype), the output (likewise), or
  a constant: one of the layer's cached parameters or an ``ops.on_device`` array; anything else (a workspace, an
  intermediate) means no replay for that shape;
* the launch rules were not changed since: setting any attribute of a watched module (``ops``, ``ops_lowrank``,
  ``loader``: the modules of the paths that complete, whose constants tests and benches set to compare rules) or
  ``loader.clear_cache()`` advances :func:`generation`, and a replay of an older generation is not used (the next
  call records again).

The layer keeps its replays in a small dict (:func:`new_table`) that it empties whenever its parameters are replaced
(``Layer._sync_params``). A call with ``out=`` takes the ordinary path. Replays run on the current stream, as the
recorded call did.
"""
from __future__ import annotations

import sys
import threading
import types

__all__ = ["new_table", "record", "lookup", "complete", "generation", "advance", "watch", "Replay", "MAX_SHAPES"]

#: input shapes a layer keeps replays for; past it the table starts afresh
MAX_SHAPES = 8

_local = threading.local()
_GENERATION = [0]


def generation() -> int:
    """The launch rules' generation: advanced whenever a watched module's attribute is set."""
    return _GENERATION[0]


def advance() -> None:
    """Make every replay recorded so far stale (a rule or a kernel cache changed)."""
    _GENERATION[0] += 1


class _WatchedModule(types.ModuleType):
    """A module whose attribute assignments (``module.RULE = v``, ``monkeypatch.setattr``) advance the generation."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        advance()

    def __delattr__(self, name):
        super().__delattr__(name)
        advance()


def watch(module_name: str) -> None:
    """Advance the generation whenever an attribute of module ``module_name`` is set from outside."""
    sys.modules[module_name].__class__ = _WatchedModule


class _Recording:
    __slots__ = ("launches", "completed")

    def __init__(self):
        self.launches = []
        self.completed = None


def recording_launch(kernel, grid, block, args, shared_mem):
    """Called by ``ops.launch`` after each launch: note it if a recording is on in this thread."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.launches.append((kernel, grid, block, args, shared_mem))


def complete(y) -> None:
    """Say that the launches of this call so far are all the device work that produced ``y``, the array the entry
    point returns (a no-op unless a recording is on)."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.completed = y


_X, _Y = object(), object()           # argument slots of the input and of the output


class Replay:
    """The launches of one recorded call; ``replay(x)`` repeats them on a new input of the same shape and dtype and
    returns the new output."""
    __slots__ = ("launches", "out_shape", "dtype", "xtype", "device", "generation", "_empty")

    def __init__(self, launches, out_shape, dtype, xtype, device, empty):
        self.launches = launches
        self.out_shape = out_shape
        self.dtype = dtype
        self.xtype = xtype
        self.device = device
        self.generation = generation()
        self._empty = empty

    def __call__(self, x):
        y = self._empty(self.out_shape, dtype=self.dtype)
        for kernel, grid, block, args, smem, slots in self.launches:
            if slots:
                args = list(args)
                for i, which in slots:
                    args[i] = x if which is _X else y
                args = tuple(args)
            kernel(grid, block, args, shared_mem=smem)
        return y


def _same_array(a, b):
    return (a.data.ptr == b.data.ptr and a.shape == b.shape and a.dtype == b.dtype
            and a.flags.c_contiguous and b.flags.c_contiguous)


def _constants(params):
    """ids of the arrays a recorded launch may keep: the layer's cached parameters and the ``ops.on_device`` arrays
    (device copies of host index data, never written)."""
    from . import ops
    ids = set()

    def add(v):
        if isinstance(v, (tuple, list)):
            for u in v:
                add(u)
        elif hasattr(v, "data") and hasattr(v, "shape"):
            ids.add(id(v))
    for v in params.values():
        add(v)
    for v in ops._ON_DEVICE.values():
        add(v)
    return ids


def _make(rec, x, y, params, empty):
    """The :class:`Replay` of a recording, or None when it is not one (see the module docstring)."""
    if rec.completed is not y or not rec.launches:
        return None
    xtype = type(x)
    consts = _constants(params)
    launches = []
    for kernel, grid, block, args, smem in rec.launches:
        slots = []
        for i, a in enumerate(args):
            if not isinstance(a, xtype):
                continue                                # a packed scalar
            if _same_array(a, x):
                slots.append((i, _X))
            elif _same_array(a, y):
                slots.append((i, _Y))
            elif id(a) not in consts:
                return None                             # a workspace or an intermediate: no replay
        launches.append((kernel, grid, block, args, smem, tuple(slots)))
    return Replay(tuple(launches), tuple(y.shape), y.dtype, xtype, x.data.device_id, empty)


class _Table(dict):
    """A layer's replays by input shape. A deep copy of the layer (``Network.copy``) starts with none: the copy's
    parameters are other arrays, and CuPy's kernel objects do not copy."""

    def __deepcopy__(self, memo):
        return _Table()


def new_table() -> dict:
    """A layer's (empty) table of replays, by input shape (:func:`lookup`, :func:`record`)."""
    return _Table()


def lookup(table, x):
    """The replay in ``table`` for input ``x``, or None: same shape, array type, dtype and device, C-contiguous, and
    recorded in the current generation."""
    if not table:
        return None
    rep = table.get(getattr(x, "shape", None))
    if (type(rep) is not Replay or rep.generation != _GENERATION[0] or type(x) is not rep.xtype or x.dtype != rep.dtype
            or not x.flags.c_contiguous or x.data.device_id != rep.device):
        return None
    return rep


class _NoReplay:
    """A table entry: this shape's call is not a replay (in this generation); run it without recording again."""
    __slots__ = ("generation",)

    def __init__(self):
        self.generation = generation()


def record(table, x, params, run, empty):
    """``run()`` (the layer's ordinary GPU path for ``x``), recorded; the replay of it, if it is one, goes into
    ``table`` under x's shape, else a note not to record this shape again in this generation. ``params``: the
    layer's cached parameters (the arrays a launch may keep); ``empty``: the array module's ``empty``. Returns run()'s
    result."""
    seen = table.get(x.shape)
    if type(seen) is _NoReplay and seen.generation == _GENERATION[0]:
        return run()
    rec = _Recording()
    outer = getattr(_local, "rec", None)
    _local.rec = rec
    try:
        y = run()
    finally:
        _local.rec = outer
    if outer is not None:                 # a layer inside a recorded call: its launches belong to the outer record
        outer.launches.extend(rec.launches)
        return y
    if not x.flags.c_contiguous:
        return y
    rep = _make(rec, x, y, params, empty)
    if len(table) >= MAX_SHAPES:
        table.clear()
    table[tuple(x.shape)] = _NoReplay() if rep is None else rep
    return y
