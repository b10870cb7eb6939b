import numpy as np
import pytest

from npconv import Network
from npconv.layers import Conv2d, Linear
from npconv.layers.simple import Flatten, LocalResponseNorm, MaxPool2d, ReLU, Softmax
from tests.reference import conv2d_naive


def small_net(rng, dtype=np.float64):
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(dtype) * 0.3
    b1 = rng.standard_normal(4).astype(dtype)
    w2 = rng.standard_normal((5, 4 * 3 * 3)).astype(dtype) * 0.3
    b2 = rng.standard_normal(5).astype(dtype)
    net = Network([("conv1", Conv2d(w1, b1, padding=1)), ("relu1", ReLU()),
                   ("pool1", MaxPool2d(2, stride=2, ceil_mode=True)), ("norm1", LocalResponseNorm(3)),
                   ("flat", Flatten()), ("fc", Linear(w2, b2)), ("prob", Softmax())],
                  input_shape=(3, 5, 5), meta={"classes": list("abcde")})
    return net, (w1, b1, w2, b2)


def reference_forward(x, w1, b1, w2, b2):
    h = np.maximum(conv2d_naive(x, w1, b1, padding=(1, 1, 1, 1)), 0)
    # max pool 2x2 stride 2 ceil mode on 5x5 -> 3x3 (last window covers one row/column)
    p = np.full((h.shape[0], h.shape[1], 3, 3), -np.inf)
    for i in range(3):
        for j in range(3):
            p[:, :, i, j] = h[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(2, 3))
    sq = np.pad(p ** 2, ((0, 0), (1, 1), (0, 0), (0, 0)))
    s = sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:]
    n = p / (2.0 + 1e-4 / 3 * s) ** 0.75
    z = n.reshape(len(x), -1) @ w2.T + b2
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True), h


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_reference_and_intermediates(rng, dtype):
    net, ws = small_net(rng)
    x = rng.standard_normal((3, 3, 5, 5)).astype(dtype)
    y, acts = net.forward(x, return_intermediates=["relu1", "fc"])
    ref, h = reference_forward(x, *ws)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(acts["relu1"], h, rtol=tol, atol=tol)
    assert set(acts) == {"relu1", "fc"}
    np.testing.assert_allclose(net.forward(x, until="relu1"), h, rtol=tol, atol=tol)


def test_predict_streams_batches_and_accepts_uint8(rng):
    net, ws = small_net(rng)
    X = rng.integers(0, 255, (11, 3, 5, 5)).astype(np.uint8)
    y = net.predict(X, batch_size=4, dtype=np.float64)
    ref, _ = reference_forward(X.astype(np.float64), *ws)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        net.predict(X, batch_size=0)


def test_summary_counts_params_and_macs(rng):
    net, _ = small_net(rng)
    rows = {r["name"]: r for r in net.summary(print_fn=None)}
    assert rows["conv1"]["output_shape"] == (4, 5, 5)
    assert rows["conv1"]["params"] == 4 * 3 * 9 + 4
    assert rows["conv1"]["macs"] == 4 * 5 * 5 * 3 * 9
    assert rows["pool1"]["output_shape"] == (4, 3, 3)
    assert rows["fc"]["macs"] == 5 * 36 and rows["fc"]["params"] == 5 * 36 + 5
    assert net.n_params() == sum(r["params"] for r in rows.values())


def test_profile_reports_each_layer(rng):
    net, _ = small_net(rng)
    rows = net.profile(rng.standard_normal((2, 3, 5, 5)), repeat=2, print_fn=None)
    assert [r["name"] for r in rows] == net.names
    # as forward runs it: the ReLU before the max pooling is done by the pooling (0 s of its own)
    assert net.names[1:3] == ["relu1", "pool1"] and net["pool1"].kind == "max_pool2d"
    assert all((r["seconds"] == 0) == (r["name"] == "relu1") for r in rows)
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9


def test_profile_runs_the_forward_pass(rng, monkeypatch):
    """The layers profile runs, with their keyword arguments (``out=`` buffers, the pooling's ``relu``), are those
    forward runs; the in-place ReLU of forward (not a layer call) is skipped by both."""
    net, _ = small_net(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    calls = []
    for name in net.names:
        layer = net[name]

        def spy(h, _real=layer.forward, _name=name, **kw):
            calls.append((_name, sorted(kw)))
            return _real(h, **kw)
        monkeypatch.setattr(layer, "forward", spy)      # Layer.__call__ looks up self.forward
    net.forward(x)
    seen_forward = list(calls)
    assert ("pool1", ["out", "relu"]) in seen_forward and all(n != "relu1" for n, _ in seen_forward)
    calls.clear()
    net.profile(x, repeat=1, warmup=0, print_fn=None)
    assert calls == seen_forward


def test_replace_returns_new_network_and_keeps_original(rng):
    net, _ = small_net(rng)
    before = net["conv1"].weight.copy()
    new = net.replace({"relu1": [("relu1a", ReLU())]})
    assert new.names[1] == "relu1a" and "relu1" in net
    new["conv1"].params["weight"][...] = 0
    np.testing.assert_array_equal(net["conv1"].weight, before)


def test_bad_inputs(rng):
    net, _ = small_net(rng)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, 5, 5\), got \(2, 3, 4, 4\)"):
        net.forward(np.zeros((2, 3, 4, 4)))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int32"):
        net.forward(np.zeros((2, 3, 5, 5), np.int32))
    with pytest.raises(ValueError, match="unknown layers"):
        net.forward(np.zeros((1, 3, 5, 5)), return_intermediates=["nope"])
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        net["nope"]
    with pytest.raises(ValueError, match="used twice"):
        Network([("a", ReLU()), ("a", ReLU())])
    with pytest.raises(TypeError, match=r"layers\[0\] \('a'\) must be an npconv Layer"):
        Network([("a", object())])


def test_bad_construction_arguments():
    with pytest.raises(TypeError, match=r"meta must be a dict.*got str"):
        Network([("a", ReLU())], meta="x")
    with pytest.raises(TypeError, match=r"input_shape must be a sequence of ints.*got int"):
        Network([("a", ReLU())], input_shape=3)


def test_return_intermediates_takes_one_name(rng):
    # a str is one layer's name (not a set of characters); "all" is every layer
    net, ws = small_net(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    y, acts = net.forward(x, return_intermediates="relu1")
    ref, h = reference_forward(x, *ws)
    assert set(acts) == {"relu1"}
    np.testing.assert_allclose(acts["relu1"], h, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    assert set(net.forward(x, return_intermediates="all")[1]) == set(net.names)
    with pytest.raises(ValueError, match=r"unknown layers \['relu9'\]"):
        net.forward(x, return_intermediates="relu9")
    with pytest.raises(TypeError, match="return_intermediates must be a layer name, a sequence of names or 'all'"):
        net.forward(x, return_intermediates=5)


@pytest.mark.parametrize("warmup, err", [(-5, ValueError), (1.5, TypeError), (None, TypeError), (True, TypeError)])
def test_profile_validates_warmup(rng, warmup, err):
    net, _ = small_net(rng)
    with pytest.raises(err, match="warmup must be"):
        net.profile(rng.standard_normal((1, 3, 5, 5)), repeat=1, warmup=warmup, print_fn=None)


def test_errors_inside_forward_name_the_layer(rng):
    # a network whose layers do not fit together: the error names the failing layer, keeps its type and message
    # and is chained to the layer's own error
    bad = Network([("conv", Conv2d(np.ones((4, 3, 3, 3)))), ("flat", Flatten()), ("fc1", Linear(np.ones((2, 10))))],
                  input_shape=(3, 8, 8))
    x = np.zeros((1, 3, 8, 8), np.float32)
    for reuse in (True, False):
        with pytest.raises(ValueError, match=r"^layer 'fc1' \(linear\): .*10 features") as info:
            bad.forward(x, reuse_buffers=reuse)
        assert isinstance(info.value.__cause__, ValueError) and "10 features" in str(info.value.__cause__)
    with pytest.raises(ValueError, match=r"^layer 'fc1' \(linear\): input to linear must have 10 features"):
        bad.summary(print_fn=None)
    # a channel mismatch (no input_shape, so forward cannot check it up front)
    mis = Network([("c1", Conv2d(np.ones((4, 3, 3, 3)))), ("c2", Conv2d(np.ones((2, 5, 1, 1))))])
    with pytest.raises(ValueError, match=r"^layer 'c2' \(conv2d\): "):
        mis.forward(np.zeros((1, 3, 6, 6)))
    with pytest.raises(ValueError, match=r"^layer 'c1' \(conv2d\): "):
        mis.predict(np.zeros((1, 2, 6, 6)))
    x = np.zeros((1, 3, 6, 6))
    with pytest.raises(TypeError, match=r"^layer 's' \(test_raises\): broken on purpose$"):
        Network([("c1", Conv2d(np.ones((4, 3, 3, 3)))), ("s", _Raises(TypeError))]).forward(x)
    with pytest.raises(_TwoArgError) as info:   # a type that cannot be rebuilt from one message: raised as it is
        Network([("s", _Raises(_TwoArgError))]).forward(x)
    assert str(info.value) == "broken on purpose"


class _TwoArgError(ValueError):
    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


class _Raises(ReLU):
    """A layer that fails with ``exc`` (for the error-context checks)."""
    kind = "test_raises"

    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def forward(self, x, *, out=None):
        raise (self.exc("broken on purpose", 1) if self.exc is _TwoArgError else self.exc("broken on purpose"))


def test_layer_rejects_nan_weights_and_bad_dtype(rng):
    w = rng.standard_normal((2, 3, 3, 3))
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"weight contains 1 non-finite value"):
        Conv2d(w)
    with pytest.raises(TypeError, match="weight must have dtype float32 or float64, got int64"):
        Linear(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions, got 4"):
        Linear(np.zeros((2, 3, 1, 1)))


def test_conv_groups_must_divide_the_output_channels(rng):
    w = rng.standard_normal((4, 3, 3, 3))
    for groups in (3, 8, 10 ** 30):
        with pytest.raises(ValueError, match=rf"groups must divide the output channels of weight \(4.*"
                                             rf"got groups={groups}"):
            Conv2d(w, groups=groups)
    with pytest.raises(ValueError, match="groups"):   # through the file format's constructor as well
        Conv2d.from_config({"stride": [1, 1], "padding": [0, 0, 0, 0], "dilation": [1, 1], "groups": 3},
                           {"weight": w})
    assert Conv2d(w, groups=2).groups == 2 and Conv2d(w, groups=4).groups == 4   # divisors are fine


def test_layers_cast_weights_to_input_dtype(rng):
    conv = Conv2d(rng.standard_normal((2, 3, 3, 3)), rng.standard_normal(2))
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    y = conv(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, conv2d_naive(x, conv.weight, conv.bias), rtol=1e-4, atol=1e-4)


def test_inplace_relu_never_touches_input_or_returned_activations(rng):
    from npconv.layers import Flatten, Linear, ReLU
    # ReLU right on the input, after a view (Flatten) of a returned activation, and after a fresh output
    net = Network([("r0", ReLU()), ("flat", Flatten()), ("r1", ReLU()),
                   ("fc", Linear(rng.standard_normal((3, 12)))), ("r2", ReLU())], input_shape=(3, 2, 2))
    x = rng.standard_normal((4, 3, 2, 2))
    x_copy = x.copy()
    y, acts = net.forward(x, return_intermediates=["r0", "fc"])
    np.testing.assert_array_equal(x, x_copy)                       # the caller's input is intact
    np.testing.assert_array_equal(acts["r0"], np.maximum(x_copy, 0))
    fc = np.maximum(x_copy, 0).reshape(4, -1) @ net["fc"].weight.T
    np.testing.assert_allclose(acts["fc"], fc)                     # a returned activation is not rectified
    np.testing.assert_allclose(y, np.maximum(fc, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_before_max_pool_runs_after_it_with_identical_results(rng, dtype, monkeypatch):
    """forward() rectifies the pooled output instead of the conv output (max pooling commutes with ReLU): the
    result must equal running the layers one by one, bit for bit, including NaN and -inf inputs; a ReLU whose
    output is asked for (intermediates, until) runs where it stands."""
    net, ws = small_net(rng, dtype)
    net = Network([("relu0", ReLU()), ("pool0", MaxPool2d(3, stride=1, padding=1))] + list(net._layers.items()),
                  input_shape=(3, 5, 5))
    x = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
    x[0, 0, 1, 1] = np.nan
    x[1, 2] = -np.inf
    x[2, 1, :3, :3] = -np.abs(x[2, 1, :3, :3])   # windows with no positive value
    x_copy = x.copy()

    def one_by_one(x, until=None):
        for name, layer in net._layers.items():
            x = layer(x)
            if name == until:
                break
        return x

    expect = one_by_one(x)
    import npconv.network as N
    shapes, fused = [], []
    real = N._relu_inplace
    monkeypatch.setattr(N, "_relu_inplace", lambda a: shapes.append(a.shape) or real(a))
    real_pool = MaxPool2d.forward
    monkeypatch.setattr(MaxPool2d, "forward",
                        lambda self, a, **kw: fused.append(kw.get("relu", False)) or real_pool(self, a, **kw))
    np.testing.assert_array_equal(net.forward(x), expect)
    assert shapes == []                                            # no separate ReLU pass ...
    assert fused == [True, True]                                   # ... both ride in the pooling that follows
    np.testing.assert_array_equal(x, x_copy)                       # the input is never written
    y, acts = net.forward(x, return_intermediates=["relu1", "pool1", "pool0"])
    np.testing.assert_array_equal(y, expect)
    np.testing.assert_array_equal(acts["relu1"], one_by_one(x, "relu1"))
    np.testing.assert_array_equal(acts["pool1"], one_by_one(x, "pool1"))
    np.testing.assert_array_equal(acts["pool0"], one_by_one(x, "pool0"))
    assert (acts["pool0"][~np.isnan(acts["pool0"])] >= 0).all()
    np.testing.assert_array_equal(net.forward(x, until="relu1"), one_by_one(x, "relu1"))
    np.testing.assert_array_equal(net.forward(x, until="pool1"), one_by_one(x, "pool1"))


# ------------------------------------------------------------------ reused activation buffers
def _conv_tail_net(rng, dtype=np.float64):
    """Ends in layers that write into buffers (conv, pool) and in a Flatten view: the returned output must still
    be the caller's own memory."""
    net, _ = small_net(rng, dtype)
    w3 = rng.standard_normal((2, 4, 2, 2)).astype(dtype)
    items = [(n, l) for n, l in net.items() if n not in ("flat", "fc", "prob")]
    return Network(items + [("conv3", Conv2d(w3, None)), ("flat", Flatten())], input_shape=(3, 5, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reused_buffers_give_the_fresh_results_and_never_leak(rng, dtype):
    net, ws = small_net(rng, dtype)
    tail = _conv_tail_net(rng, dtype)
    xa = rng.standard_normal((3, 3, 5, 5)).astype(dtype)
    xb = rng.standard_normal((3, 3, 5, 5)).astype(dtype)
    for n in (net, tail):
        fresh_a = n.forward(xa, reuse_buffers=False)
        fresh_b = n.forward(xb, reuse_buffers=False)
        ya, acts = n.forward(xa, return_intermediates="all")
        keep = {k: v.copy() for k, v in acts.items()}
        ya_copy = ya.copy()
        until = {k: n.forward(xa, until=k) for k in n.names}
        until_copy = {k: v.copy() for k, v in until.items()}
        yb = n.forward(xb)   # reuses the buffers; nothing handed out before may change
        np.testing.assert_array_equal(ya, fresh_a)
        np.testing.assert_array_equal(yb, fresh_b)
        np.testing.assert_array_equal(ya, ya_copy)
        for k in keep:
            np.testing.assert_array_equal(acts[k], keep[k])
            np.testing.assert_array_equal(until[k], until_copy[k])
            ref = n.forward(xa, until=k, reuse_buffers=False)
            np.testing.assert_array_equal(until[k], ref)
    ref, h = reference_forward(xa.astype(np.float64), *ws)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(net.forward(xa), ref, rtol=tol, atol=tol)


def test_buffers_are_kept_grown_and_released(rng):
    net = _conv_tail_net(rng)
    assert net.buffer_bytes() == 0
    net.forward(rng.standard_normal((2, 3, 5, 5)))
    small = net.buffer_bytes()
    # conv1's output (2 x 4 x 5 x 5 float64) is the largest activation: one buffer holds at least that
    assert small >= 2 * 4 * 5 * 5 * 8
    x = rng.standard_normal((7, 3, 5, 5))
    y = net.forward(x)
    assert net.buffer_bytes() > small
    np.testing.assert_array_equal(y, net.forward(x, reuse_buffers=False))
    np.testing.assert_array_equal(net.forward(x[:1]), net.forward(x[:1], reuse_buffers=False))
    assert net.release_buffers() > small
    assert net.buffer_bytes() == 0 and net.release_buffers() == 0
    np.testing.assert_array_equal(net.forward(x), y)
    clone = net.copy()   # a copy starts without buffers and works on its own
    assert clone.buffer_bytes() == 0
    np.testing.assert_array_equal(clone.forward(x), y)
    net.forward(x, reuse_buffers=False)
    with pytest.raises(TypeError, match="reuse_buffers must be a bool"):
        net.forward(x, reuse_buffers=1)


def test_threads_get_buffers_of_their_own(rng):
    import threading
    net, _ = small_net(rng, np.float64)
    xs = [rng.standard_normal((4, 3, 5, 5)) for _ in range(4)]
    want = [net.forward(x, reuse_buffers=False) for x in xs]
    got = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(30):
                y = net.forward(xs[i])
                if not np.array_equal(y, want[i]):
                    raise AssertionError(f"thread {i} got a wrong result")
            got[i] = y
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_cuda_graph_needs_a_cupy_input():
    """Recording a CUDA graph of a NumPy batch is a TypeError that names the type (no CuPy needed to say so)."""
    net = Network([("r", ReLU())], input_shape=(1, 2, 2))
    with pytest.raises(TypeError, match="cupy.ndarray.*numpy.ndarray"):
        net.cuda_graph(np.zeros((1, 1, 2, 2), np.float32))


def test_cuda_graph_refuses_to_replay_after_the_parameters_changed():
    """The replay check (no GPU needed): a recorded graph holds the parameter arrays it read; once the network's
    arrays are others (``to_cpu``/``to_gpu``, a replaced array), a replay is a RuntimeError, not stale memory."""
    from npconv._cuda_graph import CudaGraphForward, _param_arrays
    rng = np.random.default_rng(0)
    net = Network([("conv", Conv2d(rng.standard_normal((4, 3, 3, 3)), np.zeros(4))), ("r", ReLU())],
                  input_shape=(3, 5, 5))
    fn = object.__new__(CudaGraphForward)      # the state a recording leaves, without the recording itself
    fn.network, fn._params = net, _param_arrays(net)
    fn._check_params()
    net["conv"].params = dict(net["conv"].params, bias=np.ones(4))
    with pytest.raises(RuntimeError, match="record a new one"):
        fn._check_params()
