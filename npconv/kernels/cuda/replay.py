"""Launch replay: a layer's GPU call at an input shape it has seen, without redoing its host work.

At batch 1 a GPU layer's time is mostly the host's. On the H100 machine's Xeon (twenty-fifth session,
``docs/gpu_results.md``) the dense ``Conv2d`` of ZF conv1 spent 79 us of host time a call before its 34 us kernel:
CuPy's launch with 20 arguments a third of it, the rest the checks and the planning of the call in Python, all of
which depends only on the input's shape, dtype and device.

So a layer records, on its first call at a shape (:func:`record`), the device work of its ordinary GPU path: each
kernel launch (``ops.launch``: kernel, grid, block, shared memory, packed arguments) and each matrix product
(``_gemm.matmul``), in order. Each array they take is classed as the input (or a C-contiguous reshape of it), the
output (likewise), or an array to keep: the layer's parameters, device index arrays, and the call's intermediates
(workspaces, GEMM results). Later calls at the same shape, dtype, array type and device (:func:`lookup`) allocate a
new output and repeat the recorded work with the new input and output in their places (:class:`Replay`), the
intermediates reused.

What makes a recording a replay, all of it checked:

* the path said so: the GPU entry points call :func:`complete` with their output before returning it, on the paths
  whose whole device work is launches and ``_gemm.matmul`` products (the layer may return that array or a reshape of
  it, as the softmax does) (a copy or a slice assignment in CuPy, as in the
  monochromatic layer's composed fallback, leaves the call without a replay). What a caller does on the device
  before or after an entry point that completes the array it returns must be recorded work too (the separable
  layer's two passes; max pooling's ReLU, an ``ops.bias_relu`` launch, not ``cupy.maximum``): this is the one rule
  the recording cannot check, and ``tests/kernels/test_cuda_replay_emulated.py`` compares every replayed layer with
  its ordinary path on new inputs;
* no kept array overlaps the input or the output other than as a whole (a batch in chunks, views at offsets, is not
  replayed);
* the kept intermediates take at most :data:`MAX_HELD_BYTES` (a layer keeps them between calls);
* a replay that keeps intermediates runs on the stream it was recorded on, so that two streams never share them
  (calls on one stream are ordered); on another stream the call is recorded again;
* the launch rules were not changed since: setting any attribute of a watched module (``ops``, ``ops_lowrank``,
  ``ops_bicluster``, ``_gemm``, ``loader``, as tests and benches do to compare rules) or ``loader.clear_cache()``
  advances :func:`generation`, and a replay of an older generation is not used (the next call records again).

The layers that replay: ``Conv2d``, ``Linear``, ``LowRankLinear``, the low-rank and biclustered conv layers, ``MaxPool2d`` (a table
for each ``relu`` flag), ``AvgPool2d``, ``LocalResponseNorm``, ``Normalize``, ``ReLU`` and ``Softmax``. Each keeps
its replays in a small table (:func:`new_table`, made by ``Layer.__init__``) that it empties whenever its parameters
are replaced (``Layer._sync_params``) or any of its public attributes is set (``Layer.__setattr__``: ``layer.stride
= ...``), and that a deep copy does not copy. A call with ``out=`` takes the ordinary path, and nothing is recorded
while a CUDA graph is being captured (``Network.cuda_graph``).
"""
from __future__ import annotations

import sys
import threading
import types

from ..._backend import get_array_module, is_cupy_array

__all__ = ["new_table", "forget", "lookup", "call", "record", "run_recorded", "complete", "generation", "advance",
           "watch", "extent", "Replay", "MAX_SHAPES", "MAX_HELD_BYTES"]

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
    __slots__ = ("ops", "completed")

    def __init__(self):
        self.ops = []
        self.completed = None

    def absorb(self, inner):
        self.ops.extend(inner.ops)


def run_recorded(local, rec, run):
    """``run()`` with ``rec`` as this thread's recording (``local.rec``, restored after). Returns ``(y, nested)``:
    ``nested`` when another recording was on, into which ``rec``'s work then goes (a layer inside a recorded call:
    its work belongs to the outer record). Shared with the CPU plans (``kernels/cpu/plan.py``)."""
    outer = getattr(local, "rec", None)
    local.rec = rec
    try:
        y = run()
    finally:
        local.rec = outer
    if outer is not None:
        outer.absorb(rec)
    return y, outer is not None


_LAUNCH, _MATMUL = "launch", "matmul"        # the kinds of recorded device work


def recording_launch(kernel, grid, block, args, shared_mem):
    """Called by ``ops.launch`` after each launch: note it if a recording is on in this thread."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.ops.append((_LAUNCH, kernel, grid, block, args, shared_mem))


def recording_matmul(a, b, out):
    """Called by ``_gemm.matmul`` after each product (``out`` the array it wrote): note it if a recording is on."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.ops.append((_MATMUL, a, b, out))


def complete(y) -> None:
    """Say that the device work of this call so far (its launches and ``_gemm.matmul`` products) is all the work
    that produced ``y``, the array the entry point returns (a no-op unless a recording is on)."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.completed = y


_X, _Y = "x", "y"                     # argument slots of the input and of the output

#: bytes of intermediate arrays (workspaces) one replay may keep between calls; a call needing more is not replayed
MAX_HELD_BYTES = 16 * 2**20


class Replay:
    """The device work of one recorded call; ``replay(x)`` repeats it on a new input of the same shape and dtype
    (the output newly allocated, intermediates reused) and returns the new output."""
    __slots__ = ("ops", "out_shape", "dtype", "xtype", "device", "stream", "generation", "_empty", "_stream_now",
                 "_matmul")

    def __init__(self, ops, out_shape, dtype, xtype, device, stream, empty, stream_now, matmul):
        self.ops = ops
        self.out_shape = out_shape
        self.dtype = dtype
        self.xtype = xtype
        self.device = device
        self.stream = stream              # the stream it must run on (it keeps intermediates), or None: any
        self.generation = generation()
        self._empty = empty
        self._stream_now = stream_now
        self._matmul = matmul

    def __call__(self, x):
        y = self._empty(self.out_shape, dtype=self.dtype)
        for op in self.ops:
            slots = op[-1]
            args = op[-2]
            if slots:
                args = list(args)
                for i, which, shape in slots:
                    v = x if which is _X else y
                    args[i] = v if shape is None else v.reshape(shape)
            if op[0] is _LAUNCH:
                op[1](op[2], op[3], tuple(args), shared_mem=op[4])
            else:
                self._matmul(args[0], args[1], out=args[2])
        return y


def _slot(a, x, y):
    """(which, shape) when ``a`` is x or y (shape None) or a C-contiguous reshape of one of them, else None."""
    for which, v in ((_X, x), (_Y, y)):
        if _same_memory(a, v):
            return which, (None if tuple(a.shape) == tuple(v.shape) else tuple(a.shape))
    return None


def extent(a, base):
    """[lo, hi) addresses an array's elements lie in, ``base`` the address of its first element (``a.data.ptr`` for
    a CuPy array, ``a.ctypes.data`` for a NumPy one; the CPU plans use it too)."""
    lo = hi = base
    for n, st in zip(a.shape, a.strides):
        if n > 1:
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
    return lo, hi + a.itemsize


def _overlaps(a, b):
    if a.size == 0 or b.size == 0:
        return False
    (alo, ahi), (blo, bhi) = extent(a, a.data.ptr), extent(b, b.data.ptr)
    return alo < bhi and blo < ahi


def _constants(params):
    """ids of the arrays that stay the same between calls without being kept by a replay: the layer's cached
    parameters and the ``ops.on_device`` arrays (device copies of host index data, never written)."""
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


def _same_memory(a, b):
    """Whether arrays ``a`` and ``b`` are C-contiguous over the same bytes (one a reshape of the other)."""
    return (a is b or a.data.ptr == b.data.ptr and a.nbytes == b.nbytes and a.dtype == b.dtype
            and a.flags.c_contiguous and b.flags.c_contiguous)


def _make(rec, x, y, params, empty, stream_now):
    """The :class:`Replay` of a recording, or None when it is not one (see the module docstring)."""
    if rec.completed is None or not rec.ops or not _same_memory(rec.completed, y):
        return None
    from ._gemm import matmul
    xtype = type(x)
    consts = _constants(params)
    held, held_bytes = set(), 0
    ops = []
    for op in rec.ops:
        args = op[4] if op[0] is _LAUNCH else op[1:4]
        slots = []
        for i, a in enumerate(args):
            if not isinstance(a, xtype):
                continue                                # a packed scalar
            slot = _slot(a, x, y)
            if slot is not None:
                slots.append((i,) + slot)
            elif _overlaps(a, x) or _overlaps(a, y):
                return None                             # a part of the input or output: not replayed
            elif id(a) not in consts and id(a) not in held:
                held.add(id(a))
                held_bytes += a.nbytes
        if op[0] is _LAUNCH:
            ops.append((_LAUNCH, op[1], op[2], op[3], op[5], op[4], tuple(slots)))
        else:
            ops.append((_MATMUL, tuple(args), tuple(slots)))
    if held_bytes > MAX_HELD_BYTES:
        return None
    stream = stream_now().ptr if held else None
    return Replay(tuple(ops), tuple(y.shape), y.dtype, xtype, x.data.device_id, stream, empty, stream_now, matmul)


class _Table(dict):
    """A layer's replays by input shape (and its CPU plans, ``kernels/cpu/plan.py``). A deep copy of the layer
    (``Network.copy``) starts with none: the copy's parameters are other arrays, and CuPy's kernel objects do not
    copy. A pickled layer likewise (a plan's scratch is its process's workspace)."""

    def __deepcopy__(self, memo):
        return _Table()

    def __reduce__(self):
        return (_Table, ())


def new_table() -> dict:
    """A layer's (empty) table of replays, by input shape (:func:`lookup`, :func:`record`)."""
    return _Table()


def forget(obj) -> None:
    """Empty every replay table that ``obj`` (a layer) holds as an attribute."""
    for v in vars(obj).values():
        if type(v) is _Table:
            v.clear()


def lookup(table, x):
    """The replay in ``table`` for input ``x``, or None: same shape, array type, dtype and device, C-contiguous,
    recorded in the current generation, and (for one that keeps intermediates) on the same stream."""
    if not table:
        return None
    rep = table.get(getattr(x, "shape", None))
    if (type(rep) is not Replay or rep.generation != _GENERATION[0] or type(x) is not rep.xtype or x.dtype != rep.dtype
            or not x.flags.c_contiguous or x.data.device_id != rep.device
            or (rep.stream is not None and rep._stream_now().ptr != rep.stream)):
        return None
    return rep


class _NoReplay:
    """A table entry: this shape's call is not a replay (in this generation); run it without recording again."""
    __slots__ = ("generation",)

    def __init__(self):
        self.generation = generation()


def record(table, x, params, run, xp):
    """``run()`` (the layer's ordinary GPU path for ``x``), recorded; the replay of it, if it is one, goes into
    ``table`` under x's shape, else a note not to record this shape again in this generation. ``params``: the
    layer's cached parameters (arrays that stay); ``xp``: x's array module. Returns run()'s result. Nothing is
    recorded while a CUDA graph is being captured on the current stream (``Network.cuda_graph``)."""
    seen = table.get(x.shape)
    if type(seen) is _NoReplay and seen.generation == _GENERATION[0]:
        return run()
    stream_now = xp.cuda.get_current_stream
    if stream_now().is_capturing():
        return run()
    rec = _Recording()
    y, nested = run_recorded(_local, rec, run)
    if nested or not x.flags.c_contiguous:
        return y
    rep = _make(rec, x, y, params, xp.empty, stream_now)
    if len(table) >= MAX_SHAPES:
        table.clear()
    table[tuple(x.shape)] = _NoReplay() if rep is None else rep
    return y


def call(table, x, out, params, run):
    """A layer's call: ``run()`` (its ordinary path), recorded when x is a CuPy array and there is no ``out``
    (:func:`record`). The layer looks its replays up first (:func:`lookup`), before its own checks."""
    if out is not None or not is_cupy_array(x):
        return run()
    return record(table, x, params, run, get_array_module(x))
