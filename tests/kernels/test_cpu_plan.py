"""CPU call plans (``npconv/kernels/cpu/plan.py``): a layer called again at a shape it has seen repeats its recorded
kernel calls instead of its Python work.

Each planned output is compared with a conv of the layer's rebuilt kernel (``tests/reference.py``, an independent
reference) and, bit for bit, with the same layer's ordinary path (a fresh copy's first call, which records). The
tests also check that a planned call runs no Python path at all, that it does not rely on what the workspace held,
and when a call is *not* planned or a plan is dropped: a batch in chunks, a path that does not complete, a changed
rule, a cleared workspace, replaced parameters or attributes, another thread count, another thread, a strided input.
"""
from __future__ import annotations

import copy
import threading

import numba
import numpy as np
import pytest

from npconv._workspace import WS
from npconv.decompose.bicluster import bicluster
from npconv.decompose.monochromatic import monochromatic
from npconv.decompose.shared import shared_separable
from npconv.functional import _direct as DR
from npconv.functional import _lanes as LN
from npconv.functional import _winograd as WG
from npconv.functional import conv as FC
from npconv.functional import bicluster as FB
from npconv.functional import lowrank as FL
from npconv.kernels.cpu import conv_lanes as KL
from npconv.kernels.cpu import cp_fused as KU
from npconv.kernels.cpu import gemm as KG
from npconv.kernels.cpu import plan
from npconv.layers import Conv2d
from tests.reference import conv2d_einsum, count_calls, tolerance

KINDS = ["conv", "direct", "wino", "gemm", "depthwise", "mono", "cp", "svd", "shared"]
DTYPES = [np.float32, np.float64]
C_IN = {"conv": 32, "direct": 3, "wino": 128, "gemm": 8, "depthwise": 16, "mono": 3, "cp": 8, "svd": 8, "shared": 8}
#: the dense layers' kernels: on the lanes kernel (800 taps a filter), the direct kernel (3 input channels), Winograd
#: (3x3 with 128 channels; at stride 2 the lanes kernel), im2col and the GEMM micro-kernel (72 taps), depthwise
DENSE = {"conv": (16, 32, 5, 5), "direct": (48, 3, 5, 5), "wino": (128, 128, 3, 3), "gemm": (16, 8, 3, 3),
         "depthwise": (16, 1, 3, 3)}


def make(kind, rng, dtype=np.float64, stride=1, padding=1):
    """(layer, dense kernel, bias): a ``Conv2d`` (``DENSE``; the depthwise one's kernel returned as its dense
    equivalent, diagonal in the channels), a monochromatic layer (on the direct kernel) or a biclustered layer."""
    if kind in DENSE:
        w = rng.standard_normal(DENSE[kind])
        b = rng.standard_normal(w.shape[0])
        groups = w.shape[0] if kind == "depthwise" else 1
        layer = Conv2d(w.astype(dtype), b.astype(dtype), stride=stride, padding=padding, groups=groups)
        if groups > 1:
            w = np.einsum("fxy,fc->fcxy", w[:, 0], np.eye(groups))
        return layer, w, b
    b = rng.standard_normal(12)
    if kind == "mono":
        r = monochromatic(rng.standard_normal((12, 3, 5, 5)), 4, random_state=0)
        return r.to_layer(bias=b, stride=stride, padding=padding), r.to_tensor(), b
    W = rng.standard_normal((12, 8, 3, 3))
    if kind == "cp":
        r = bicluster(W, 4, 2, method="cp", rank=2, random_state=0)
    elif kind == "svd":
        r = bicluster(W, 4, 2, method="svd", ranks=(2, 3), random_state=0)
    else:
        r = shared_separable(W, 4, 2, rank=2, n_filters=3, refit_iter=3, random_state=0)
    return r.to_layer(bias=b, stride=stride, padding=padding), r.to_tensor(), b


def planned(kind, dtype):
    """Whether this CPU takes the planned path for ``kind`` (the lanes kernel and the fused biclustered layers need
    AVX-512's register tiles, Winograd's and im2col's planned paths the GEMM micro-kernel's)."""
    if kind == "conv":
        return LN.lanes_eligible(np.dtype(dtype), 1)
    if kind in ("direct", "mono", "depthwise"):
        return True
    if kind in ("wino", "gemm"):
        return KG.tile_shape(np.dtype(dtype)) is not None
    return FB._taps_ok(np.dtype(dtype))


def close(y, ref, dtype):
    """y against a float64 reference: float32 layers run factors rounded to float32, so the tolerance scales with the
    output's size."""
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


def entry(layer, x):
    return layer._replays.get(plan.key_of(x))


def inputs(kind, rng, dtype, n=3, N=2):
    # enough multiply-adds at stride 2 for the lanes and direct kernels (conv2d's algorithm="auto" rules)
    hw = {"conv": (16, 15), "direct": (32, 30)}.get(kind, (12, 11))
    return [rng.standard_normal((N, C_IN[kind]) + hw).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_second_call_runs_the_plan_and_matches(rng, monkeypatch, kind, stride, dtype):
    if not planned(kind, dtype):
        pytest.skip("this CPU has no AVX-512 register tile: the planned paths do not run")
    layer, w, b = make(kind, rng, dtype, stride=stride)
    fresh = copy.deepcopy(layer)
    xs = inputs(kind, rng, dtype)
    runs = count_calls(monkeypatch, FB, "run_validated")     # (before the first call: setting them is a rule change)
    convs = count_calls(monkeypatch, LN, "conv2d_lanes_cpu")
    spies = [runs, convs, count_calls(monkeypatch, DR, "direct_conv_cpu"), count_calls(monkeypatch, FL, "mono_core"),
             count_calls(monkeypatch, WG, "conv2d_winograd_cpu"), count_calls(monkeypatch, FC, "_conv2d_cpu")]
    first = layer(xs[0])
    assert type(entry(layer, xs[0])) is plan.Plan, "the first call records its kernel calls"
    assert sum(map(len, spies)) == 1, "one path ran"
    close(first, conv2d_einsum(xs[0], w, b, (stride, stride), (1, 1, 1, 1)), dtype)
    for x in xs[1:]:
        n = sum(map(len, spies))
        y = layer(x)
        assert sum(map(len, spies)) == n, "a planned call runs no Python path"
        assert y.dtype == dtype and y.flags.c_contiguous
        close(y, conv2d_einsum(x, w, b, (stride, stride), (1, 1, 1, 1)), dtype)
        np.testing.assert_array_equal(y, copy.deepcopy(fresh)(x))    # the ordinary path, bit for bit
    assert y is not layer(xs[1]), "each call without out= gets a new output"


@pytest.mark.parametrize("kind", KINDS)
def test_plan_does_not_rely_on_the_workspace(rng, kind):
    """Between planned calls the workspace is overwritten with NaN (as another layer's call may leave it): the plan
    repeats the kernels, which write every scratch value they read."""
    if not planned(kind, np.float32):
        pytest.skip("this CPU has no AVX-512 register tile: the planned paths do not run")
    layer, w, b = make(kind, rng, np.float32)
    xs = inputs(kind, rng, np.float32)
    layer(xs[0])
    for x in xs[1:]:
        for buf in WS.bufs.values():
            buf[...] = np.nan
        y = layer(x)
        assert type(entry(layer, x)) is plan.Plan
        close(y, conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_writes_into_out_and_checks_it(rng, kind):
    if not planned(kind, np.float64):
        pytest.skip("this CPU has no AVX-512 register tile: the planned paths do not run")
    layer, w, b = make(kind, rng)
    xs = inputs(kind, rng, np.float64)
    shape = (2,) + tuple(layer.output_shape(xs[0].shape[1:]))
    o = np.full(shape, np.nan)
    assert layer(xs[0], out=o) is o
    assert type(entry(layer, xs[0])) is plan.Plan, "a call with out= records too"
    assert layer(xs[1], out=o) is o
    close(o, conv2d_einsum(xs[1], w, b, (1, 1), (1, 1, 1, 1)), np.float64)
    y = layer(xs[2])                                   # planned with out=, called without: a new output
    assert y is not o
    close(y, conv2d_einsum(xs[2], w, b, (1, 1), (1, 1, 1, 1)), np.float64)
    with pytest.raises(ValueError, match="out must have shape"):
        layer(xs[1], out=np.empty(shape[:-1] + (shape[-1] + 1,)))
    with pytest.raises(TypeError, match="out must have dtype float64"):
        layer(xs[1], out=np.empty(shape, np.float32))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        layer(xs[1], out=np.empty(shape[:-1] + (2 * shape[-1],))[..., ::2])
    big = np.zeros(max(o.size, xs[1].size))
    x_in = big[:xs[1].size].reshape(xs[1].shape)
    x_in[...] = xs[1]
    with pytest.raises(ValueError, match="out must not overlap x"):
        layer(x_in, out=big[:o.size].reshape(shape))
    assert type(entry(layer, xs[0])) is plan.Plan, "bad out: an error, the plan kept"


def test_a_batch_in_chunks_is_not_planned(rng, monkeypatch):
    """The lanes path packs a batch a few images at a time: the kernels then take parts of x and out, and there is
    no plan (each call runs the path, with the right result)."""
    if not planned("conv", np.float64):
        pytest.skip("no AVX-512: the lanes kernel does not run")
    monkeypatch.setattr(LN, "CHUNK_BYTES", 1)        # one image a chunk
    layer, w, b = make("conv", rng)
    runs = count_calls(monkeypatch, LN, "conv2d_lanes_cpu")
    for x in inputs("conv", rng, np.float64, N=3):
        close(layer(x), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
        assert type(entry(layer, x)) is plan._NoPlan
    assert len(runs) == 3


def test_a_path_that_does_not_complete_is_not_planned(rng, monkeypatch):
    """The unfused CP path (a front end and products, with NumPy work between them) does not mark its output
    complete: no plan, the path on every call."""
    monkeypatch.setattr(FB, "USE_CP_FUSED", False)
    layer, w, b = make("cp", rng)
    runs = count_calls(monkeypatch, FB, "run_validated")
    for x in inputs("cp", rng, np.float64):
        close(layer(x), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
        assert type(entry(layer, x)) is plan._NoPlan
    assert len(runs) == 3


def _rerecords(layer, x, runs, change):
    layer(x)
    assert type(entry(layer, x)) is plan.Plan
    n = len(runs)
    change()
    layer(x)
    return len(runs) > n


@pytest.mark.parametrize("kind", ["conv", "cp"])
def test_plans_are_dropped_when_what_they_depend_on_changes(rng, monkeypatch, kind):
    if not planned(kind, np.float64):
        pytest.skip("this CPU has no AVX-512 register tile: the planned paths do not run")
    layer, w, b = make(kind, rng)
    x = inputs(kind, rng, np.float64, n=1)[0]
    runs = count_calls(monkeypatch, *((LN, "conv2d_lanes_cpu") if kind == "conv" else (FB, "run_validated")))
    layer(x)
    n = len(runs)
    layer(x)
    assert len(runs) == n, "planned"
    rule = (LN, "LANES_MIN_MACS") if kind == "conv" else (FB, "FUSED_BAND_COST")
    assert _rerecords(layer, x, runs, lambda: monkeypatch.setattr(*rule, getattr(*rule))), "a rule set: stale"
    assert _rerecords(layer, x, runs, WS.clear), "a cleared workspace: stale"
    kernel = (KL, "conv_lanes") if kind == "conv" else (KU, "cp_fused")
    calls = count_calls(monkeypatch, *kernel)
    layer(x)                                           # the kernel replaced: recorded again, with the new one
    layer(x)
    assert len(calls) == 2, "the plan calls the kernel the module holds now"
    assert _rerecords(layer, x, runs, lambda: setattr(layer, "padding", layer.padding)), "an attribute set"
    assert _rerecords(layer, x, runs, layer._sync_params), "parameters replaced"
    threads = numba.get_num_threads()
    if threads > 1:
        try:
            assert _rerecords(layer, x, runs, lambda: numba.set_num_threads(1)), "another thread count"
            close(layer(x), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
        finally:
            numba.set_num_threads(threads)


def test_a_plan_runs_only_in_its_thread(rng, monkeypatch):
    """A plan keeps its thread's workspace views: another Python thread does not find it, records its own, and the
    two threads then each run their own plan."""
    if not planned("cp", np.float64):
        pytest.skip("no AVX-512: the fused CP layer does not run")
    layer, w, b = make("cp", rng)
    xs = inputs("cp", rng, np.float64, n=4)
    runs = count_calls(monkeypatch, FB, "run_validated")
    layer(xs[0])
    mine = entry(layer, xs[0])
    assert type(mine) is plan.Plan and plan.lookup(layer._replays, xs[0]) is mine
    seen = {}

    def other():
        seen["lookup"] = plan.lookup(layer._replays, xs[1])
        seen["y"] = [layer(xs[1]), layer(xs[2])]
        seen["own"] = entry(layer, xs[1])

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["lookup"] is None
    assert type(seen["own"]) is plan.Plan and seen["own"] is not mine
    assert len(runs) == 2, "each thread ran the path once, then its plan"
    for y, x in zip(seen["y"], xs[1:3]):
        close(y, conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
    assert plan.lookup(layer._replays, xs[3]) is mine, "this thread's plan still stands"
    close(layer(xs[3]), conv2d_einsum(xs[3], w, b, (1, 1), (1, 1, 1, 1)), np.float64)
    assert len(runs) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_strided_and_other_dtype_inputs_take_the_path(rng, kind):
    if not planned(kind, np.float64):
        pytest.skip("this CPU has no AVX-512 register tile: the planned paths do not run")
    layer, w, b = make(kind, rng)
    x = inputs(kind, rng, np.float64, n=1)[0]
    layer(x)
    assert plan.lookup(layer._replays, x) is not None
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert plan.lookup(layer._replays, xt) is None
    close(layer(xt), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
    x32 = x.astype(np.float32)
    assert plan.lookup(layer._replays, x32) is None
    close(layer(x32), conv2d_einsum(x32, w, b, (1, 1), (1, 1, 1, 1)), np.float32)
    assert plan.lookup(layer._replays, x32) is not None
    assert plan.lookup(layer._replays, x) is None, "the layer keeps one dtype's arrays: the float64 plan dropped"
    close(layer(x), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)


def test_make_refuses_kept_parts_of_x_and_too_much_scratch(monkeypatch):
    """``_make`` on hand-made recordings: an argument that is part of x (or of the output) refuses the plan, as do
    workspace beyond MAX_HELD_BYTES and a call in which two paths completed; a whole view of x or of y becomes a
    slot with its shape."""
    x = np.zeros((2, 3, 4))
    y = np.zeros((2, 5))
    k = object()

    def rec(*args):
        r = plan._Recording()
        r.calls.append((k, args))
        r.completed, r.n_completed = y, 1
        return r

    pl = plan._make(rec(x.reshape(-1), y.reshape(10), 3, np.ones(2)), x, y, {})
    assert pl.calls[0][2] == ((0, (24,)),) and pl.calls[0][3] == ((1, (10,)),)
    assert plan._make(rec(x[:1]), x, y, {}) is None
    assert plan._make(rec(y[:, 1:]), x, y, {}) is None
    done = rec(x)
    done.completed = np.zeros_like(y)
    assert plan._make(done, x, y, {}) is None, "not the array the path completed"
    twice = rec(x)
    twice.n_completed = 2
    assert plan._make(twice, x, y, {}) is None, "two paths completed: a layer composing paths"
    scratch = WS.get("plan-test", 1000, np.float64)
    assert plan._make(rec(x, scratch[:10]), x, y, {}) is not None
    monkeypatch.setattr(plan, "MAX_HELD_BYTES", 7999)
    assert plan._make(rec(x, scratch[:10]), x, y, {}) is None, "the whole workspace buffer counts"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_network_plans_its_layers_and_matches_the_reference(rng, dtype):
    """``Network.forward`` passes each layer an output buffer of its arena (``out=``): five passes at batch 2 and
    then 1, each against the layers' rebuilt kernels; from the second pass at a batch the monochromatic, CP and last
    (im2col and GEMM) conv layers run plans."""
    from npconv.layers import ReLU
    from npconv.network import Network
    W1, W2 = rng.standard_normal((12, 3, 5, 5)), rng.standard_normal((12, 12, 3, 3))
    mono = monochromatic(W1, 4, random_state=0)
    cpr = bicluster(W2, 4, 2, method="cp", rank=2, random_state=0)
    b1, b2, b3 = rng.standard_normal(12), rng.standard_normal(12), rng.standard_normal(16)
    w3 = rng.standard_normal((16, 12, 5, 5))
    net = Network([("mono", mono.to_layer(bias=b1, padding=2)), ("relu1", ReLU()),
                   ("cp", cpr.to_layer(bias=b2, stride=2, padding=1)), ("relu2", ReLU()),
                   ("conv", Conv2d(w3.astype(dtype), b3.astype(dtype), padding=2))])

    def reference(x):
        h = np.maximum(conv2d_einsum(x, mono.to_tensor(), b1, (1, 1), (2, 2, 2, 2)), 0)
        h = np.maximum(conv2d_einsum(h, cpr.to_tensor(), b2, (2, 2), (1, 1, 1, 1)), 0)
        return conv2d_einsum(h, w3, b3, (1, 1), (2, 2, 2, 2))

    for N in (2, 1):
        for i in range(5):
            x = rng.standard_normal((N, 3, 20, 19)).astype(dtype)
            close(net.forward(x), reference(x), dtype)
        for name, kind in (("mono", "mono"), ("cp", "cp"), ("conv", "gemm")):
            if planned(kind, dtype):
                assert any(type(v) is plan.Plan for v in net[name]._replays.values()), name


def test_copies_and_pickles_start_without_plans(rng):
    """A deep copy or a pickled layer has other arrays (and, unpickled, maybe another process's workspace): its table
    starts empty, and it records its own plans."""
    import pickle
    layer, w, b = make("mono", rng)
    xs = inputs("mono", rng, np.float64)
    layer(xs[0])
    assert type(entry(layer, xs[0])) is plan.Plan
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not other._replays
        for x in xs[1:]:
            close(other(x), conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1)), np.float64)
        assert type(entry(other, xs[1])) is plan.Plan and entry(other, xs[1]) is not entry(layer, xs[1])
