"""Launch replay (``npconv/kernels/cuda/replay.py``) on the emulated CuPy: a GPU layer called again at a shape it
has seen repeats its recorded device work (launches and ``_gemm.matmul`` products) instead of its host work. Each
replayed output is compared with the same layer's CPU path (tested against independent references in tests/layers)
and, bit for bit, with its ordinary GPU path (the call with ``out=``, which never replays). The tests also check when
a call is *not* replayed (a composed fallback whose nested op completes another array, a chunked batch, too large a
workspace, a changed launch rule, replaced parameters, another dtype or stream, a strided input) and that a replay
packs no kernel arguments at all.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from replay_cases import KINDS, SIMPLE, WIDE, call, channels, make, ordinary, table_of
from test_cuda_lowrank_functional_emulated import cp  # noqa: F401  (cp: a fixture)

from npconv.kernels.cuda import loader, ops, ops_lowrank, replay
from npconv.layers import Conv2d, LocalResponseNorm, MaxPool2d

pytestmark = pytest.mark.cpuemu


def layer_of(kind, rng, C=None):
    C = channels(kind) if C is None else C
    return make(kind, rng, C=C, F=10, k=3, hw=(11, 12))


def keeps_nothing(kind):
    return kind in KINDS or kind in SIMPLE[:-1]


def test_a_softmax_over_another_axis_is_not_replayed(cp, rng):
    """Softmax along axis 1 of a 4-D input copies the input to rows and the rows back (CuPy copies, not recorded):
    the returned array is not the kernel's output, so there is no replay, and every call gives the CPU result."""
    layer = layer_of("softmax_axis1", rng)
    x = rng.standard_normal((2, 3, 4, 5))
    want = layer(x)
    for _ in range(2):
        np.testing.assert_allclose(cp.asnumpy(layer(cp.asarray(x))), want, rtol=1e-12, atol=1e-12)
    assert type(layer._replays[(2, 3, 4, 5)]) is not replay.Replay


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS + WIDE + SIMPLE)
def test_second_call_replays_and_matches(cp, rng, monkeypatch, dtype, kind):
    shape = (2, channels(kind), 11, 12)
    layer = layer_of(kind, rng)
    if kind == "winograd":
        monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 0)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
    want = [call(kind, layer, x) for x in xs]                 # the CPU path
    layer.to_gpu()
    first = call(kind, layer, cp.asarray(xs[0]))
    table = table_of(kind, layer)
    assert type(table[shape]) is replay.Replay, "the first GPU call records its device work"
    assert (table[shape].stream is None) == keeps_nothing(kind), "a replay with intermediates keeps to a stream"
    if kind.startswith("maxpool"):
        assert not (layer._replays_relu if kind == "maxpool" else layer._replays), "one table for each relu"
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(cp.asnumpy(first), want[0], rtol=tol, atol=tol * 10)

    def no_packing(*args, **kwargs):
        raise AssertionError("a replayed call packed kernel arguments")
    with monkeypatch.context() as m:
        m.setattr(ops, "pack_args", no_packing)               # (sets an ops attribute: advances the generation)
        gen = replay.generation()
        rep = table[shape]
        rep.generation = gen                                  # so that this replay is still current under the patch
        for x, w in zip(xs[1:], want[1:]):
            xd = cp.asarray(x)
            got = call(kind, layer, xd)
            assert isinstance(got, cp.ndarray) and got.shape == w.shape and got.dtype == dtype
            np.testing.assert_allclose(cp.asnumpy(got), w, rtol=tol, atol=tol * 10)
    for x in xs[1:]:                                          # bit for bit the ordinary path's result
        xd = cp.asarray(x)
        np.testing.assert_array_equal(cp.asnumpy(call(kind, layer, xd)),
                                      cp.asnumpy(ordinary(cp, kind, layer, xd)))


def test_a_replay_with_intermediates_keeps_to_its_stream(cp, rng):
    layer = layer_of("svd", rng).to_gpu()
    x = cp.asarray(rng.standard_normal((1, 6, 9, 9)))
    want = cp.asnumpy(layer(x))
    rep = layer._replays[(1, 6, 9, 9)]
    assert rep.stream == 0 and replay.lookup(layer._replays, x) is rep
    rep._stream_now = lambda: type("Stream", (), {"ptr": 7})()     # the caller is now on another stream
    assert replay.lookup(layer._replays, x) is None
    np.testing.assert_array_equal(cp.asnumpy(layer(x)), want)
    assert layer._replays[(1, 6, 9, 9)] is not rep, "recorded again, for the current stream"


@pytest.mark.parametrize("kind", KINDS)
def test_no_replay_for_strided_input_out_or_another_dtype(cp, rng, kind):
    layer = layer_of(kind, rng).to_gpu()
    x = rng.standard_normal((1, 3, 9, 10))
    layer(cp.asarray(x))
    assert type(layer._replays[(1, 3, 9, 10)]) is replay.Replay
    big = cp.zeros((1, 3, 18, 20))
    big[:, :, ::2, ::2] = x
    strided = big[:, :, ::2, ::2]
    assert not strided.flags.c_contiguous and replay.lookup(layer._replays, strided) is None
    want = cp.asnumpy(layer(cp.asarray(x)))
    np.testing.assert_array_equal(cp.asnumpy(layer(strided)), want)
    x32 = cp.asarray(x.astype(np.float32))
    assert replay.lookup(layer._replays, x32) is None         # recorded for float64
    np.testing.assert_allclose(cp.asnumpy(layer(x32)), want, rtol=1e-4, atol=1e-4)
    assert layer._replays[(1, 3, 9, 10)].dtype == np.float32  # recorded again, for float32
    assert replay.lookup(layer._replays, x) is None           # a NumPy array never takes a device replay


def test_parameters_replaced_drop_the_replays(cp, rng):
    layer = layer_of("direct", rng).to_gpu()
    x = cp.asarray(rng.standard_normal((1, 3, 8, 8)))
    before = cp.asnumpy(layer(x))
    assert layer._replays
    layer.to_cpu()
    layer.params = {"weight": 2 * layer.params["weight"], "bias": layer.params["bias"]}
    layer._sync_params()
    assert not layer._replays
    layer.to_gpu()
    b = cp.asnumpy(layer.params["bias"]).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(cp.asnumpy(layer(x)), 2 * (before - b) + b, rtol=1e-12, atol=1e-12)


def test_a_changed_rule_records_again(cp, rng, monkeypatch):
    layer = layer_of("separable", rng).to_gpu()
    x = cp.asarray(rng.standard_normal((1, 3, 12, 12)))
    want = cp.asnumpy(layer(x))
    old = layer._replays[(1, 3, 12, 12)]
    assert replay.lookup(layer._replays, x) is old
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 0)   # the two-pass path now: factor_conv twice
    assert replay.lookup(layer._replays, x) is None, "a rule set after the recording makes it stale"
    np.testing.assert_allclose(cp.asnumpy(layer(x)), want, rtol=1e-12, atol=1e-12)
    # recorded again: two factor_conv launches now, the intermediate between them kept (so, on this stream)
    new = layer._replays[(1, 3, 12, 12)]
    assert type(new) is replay.Replay and new is not old and len(new.ops) == 2 and new.stream is not None
    x2 = cp.asarray(rng.standard_normal((1, 3, 12, 12)))
    np.testing.assert_array_equal(cp.asnumpy(layer(x2)), cp.asnumpy(layer(x2, out=cp.empty(want.shape))))
    loader.clear_cache()
    assert replay.generation() > layer._replays[(1, 3, 12, 12)].generation


def test_paths_beyond_launches_are_not_replayed(cp, rng, monkeypatch):
    """The monochromatic layer's composed fallback (a nested conv completes its own output, and the colours are
    written by slicing), a batch in several chunks (views of the input at offsets) and a workspace above
    ``MAX_HELD_BYTES``: each records a note, not a replay, and keeps giving the CPU path's result."""
    mono = layer_of("monochromatic", rng, C=8)
    chunked = layer_of("im2col", rng, C=8)
    big = layer_of("im2col", rng, C=8)
    cases = [(mono, "mono_tiling", ops_lowrank, lambda *a: None), (chunked, "WORKSPACE_BYTES", ops, 1),
             (big, "MAX_HELD_BYTES", replay, 64)]
    for layer, rule, module, value in cases:
        x = rng.standard_normal((2, 8, 7, 7))
        want = layer(x)
        layer.to_gpu()
        with monkeypatch.context() as m:
            m.setattr(module, rule, value)
            for _ in range(2):
                np.testing.assert_allclose(cp.asnumpy(layer(cp.asarray(x))), want, rtol=1e-12, atol=1e-12)
            assert layer._replays and type(layer._replays[(2, 8, 7, 7)]) is not replay.Replay, rule


def test_shapes_kept_up_to_the_limit_and_deep_copies(cp, rng):
    layer = layer_of("lowrank", rng).to_gpu()
    for h in range(replay.MAX_SHAPES):
        layer(cp.asarray(rng.standard_normal((1, 3, 6 + h, 6))))
    assert len(layer._replays) == replay.MAX_SHAPES
    layer(cp.asarray(rng.standard_normal((1, 3, 30, 6))))
    assert list(layer._replays) == [(1, 3, 30, 6)], "past the limit the table starts afresh"
    twin = copy.deepcopy(layer)
    assert not twin._replays and layer._replays
    x = cp.asarray(rng.standard_normal((1, 3, 30, 6)))
    np.testing.assert_array_equal(cp.asnumpy(twin(x)), cp.asnumpy(layer(x)))


class _Kernel:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


def test_make_classes_each_array_argument(cp):
    """``replay._make`` on hand-made recordings: the input and output go in their slots, constants stay, anything
    else (a workspace) or a recording not completed with the returned array gives no replay."""
    x, y = cp.zeros((1, 2, 3, 3)), cp.empty((1, 4, 3, 3))
    w, ws = cp.ones(5), cp.zeros(7)
    k = _Kernel()
    rec = replay._Recording()
    rec.ops.append(("launch", k, (1,), (32,), (x[0:1], w, ws, y[0:1], np.int32(3)), 0))
    rec.ops.append(("launch", k, (2,), (64,), (ws, x.reshape(2, 9), y.reshape(4, 9)), 16))
    rec.completed = y
    stream = cp.cuda.get_current_stream
    rep = replay._make(rec, x, y, {"w": w}, cp.empty, stream)
    assert rep is not None and rep.stream == stream().ptr
    x2 = cp.ones((1, 2, 3, 3))
    y2 = rep(x2)
    (_, _, a1, _), (grid, block, a2, smem) = k.calls[-2:]
    assert a1[0] is x2 and a1[1] is w and a1[2] is ws and a1[3] is y2 and a1[4] == 3 and y2.shape == (1, 4, 3, 3)
    assert a1[3] is not y
    assert grid == (2,) and block == (64,) and smem == 16 and a2[0] is ws
    assert a2[1].shape == (2, 9) and a2[1].data.ptr == x2.data.ptr, "a reshape of the input, of the new input"
    assert a2[2].shape == (4, 9) and a2[2].data.ptr == y2.data.ptr
    rec.ops.append(("launch", k, (1,), (32,), (x[:, 1:],), 0))
    assert replay._make(rec, x, y, {"w": w}, cp.empty, stream) is None, "a part of the input"
    rec.ops[-1] = ("launch", k, (1,), (32,), (y[:, :2],), 0)
    assert replay._make(rec, x, y, {"w": w}, cp.empty, stream) is None, "a part of the output"
    rec.ops.pop()
    rec.completed = cp.empty((1, 4, 3, 3))
    assert replay._make(rec, x, y, {"w": w}, cp.empty, stream) is None, "completed with another array than the output"
    rec.completed = y.reshape(4, 9)
    assert replay._make(rec, x, y, {"w": w}, cp.empty, stream) is not None, "the output returned as a reshape"
    rec.completed = y
    rec.ops[1:] = []
    rep = replay._make(rec, x, y, {"w": w, "ws": ws}, cp.empty, stream)
    assert rep.stream is None, "nothing kept but the layer's constants: any stream"


def test_setting_an_attribute_forgets_the_replays(cp, rng):
    """A layer's public attribute set after a recording (``alpha`` of an LRN, ``stride`` of a max pooling) empties
    its tables, both of MaxPool2d's among them, and the next call follows the new setting."""
    x = rng.standard_normal((1, 4, 9, 9))
    lrn = LocalResponseNorm(3, alpha=1e-2).to_gpu()
    lrn(cp.asarray(x))
    assert lrn._replays
    lrn.alpha = 0.5
    assert not lrn._replays
    want = LocalResponseNorm(3, alpha=0.5)(x)
    np.testing.assert_allclose(cp.asnumpy(lrn(cp.asarray(x))), want, rtol=1e-12, atol=1e-12)
    pool = MaxPool2d(3, stride=2).to_gpu()
    pool(cp.asarray(x))
    pool(cp.asarray(x), relu=True)
    assert pool._replays and pool._replays_relu
    pool.stride = (1, 1)
    assert not pool._replays and not pool._replays_relu
    np.testing.assert_array_equal(cp.asnumpy(pool(cp.asarray(x))), MaxPool2d(3, stride=1)(x))
    pool._scratch = 1                                  # a private attribute keeps them
    assert pool._replays


@pytest.mark.parametrize("plan", ["dense", "cp"])
def test_a_network_forward_replays_its_layers_and_matches_the_cpu(cp, plan):
    """A small ZF network (dense, or with the biclustered CP conv layers) on the emulated GPU: from the second
    forward pass on its conv, pooling, LRN and linear layers replay, and every pass, at two batch sizes, gives the
    CPU network's output for its own input."""
    import npconv.layers.bicluster  # noqa: F401  (register the factored layer kinds)
    from bench.zf_net import random_approximation, zf_net, zf_plan
    kw = dict(input_size=64, width=1 / 8, fc_width=128, classes=100)
    net = zf_net(seed=0, dtype=np.float32, **kw)
    if plan == "cp":
        net = random_approximation(net, zf_plan("cp", upper=True, width=1 / 8, fc_width=128), seed=1)
    gnet = net.copy().to_gpu()
    rng = np.random.default_rng(3)
    for n in (2, 2, 1, 2, 1):
        x = rng.standard_normal((n,) + net.input_shape).astype(np.float32)
        np.testing.assert_allclose(cp.asnumpy(gnet.forward(cp.asarray(x))), net.forward(x), rtol=5e-4, atol=5e-4)
    replayed = {name: layer.kind for name, layer in gnet._layers.items()
                if any(type(v) is replay.Replay for v in layer._replays.values())
                or any(type(v) is replay.Replay for v in getattr(layer, "_replays_relu", {}).values())}
    kinds = set(replayed.values())
    # every kind but the ReLUs (run in place on the output before them) and the Flatten (a view)
    assert {layer.kind for layer in gnet._layers.values()} - {"relu", "flatten"} == kinds, kinds
    assert {"max_pool2d", "lrn", "linear", "conv2d" if plan == "dense" else "bicluster_conv2d"} <= kinds, kinds
