"""npconv.tune (npconv/tuning.py): every factored layer's ``to_dense()`` is the dense layer of the same linear map (its output equals
the factored layer's, and its kernel the decomposition's ``to_tensor()`` or the factors contracted by hand), and
``tune`` keeps, per layer, the form its timer says is faster (the timer is replaced here: no test asserts a speed)."""
import numpy as np
import pytest

import npconv
from npconv.decompose.bicluster import bicluster
from npconv.decompose.monochromatic import monochromatic
from npconv.decompose.separable import separable
from npconv.decompose.shared import shared_separable
from npconv.decompose.svd import conv_svd, svd_lowrank
from npconv.layers import Conv2d, ReLU
from npconv.layers.dense import Conv2d as DenseConv2d
from npconv.layers.dense import Linear as DenseLinear
from npconv import tuning as tune_module
from tests.conftest import HAS_CXX
from tests.cuda_emulator import install_as_cupy


def _conv_layers(rng):
    """(name, factored layer) for every factored conv kind, from random weights (F=8, C=6, 3x3)."""
    W = rng.standard_normal((8, 6, 3, 3))
    b = rng.standard_normal(8)
    geo = dict(stride=(2, 1), padding=(1, 0, 2, 1))
    return [
        ("lowrank", conv_svd(W, 3).to_layer(bias=b, **geo)),
        ("monochromatic", monochromatic(W, 3, random_state=0).to_layer(bias=b, **geo)),
        ("separable", separable(W, 4).to_layer(bias=b, **geo)),
        ("bicluster-cp", bicluster(W, 2, 2, method="cp", rank=3, random_state=0).to_layer(bias=b, **geo)),
        ("bicluster-svd", bicluster(W, 2, 2, method="svd", ranks=(2, 3), random_state=0).to_layer(bias=b, **geo)),
        ("shared", shared_separable(W, 2, 2, rank=2, n_filters=3, random_state=0).to_layer(bias=b, **geo)),
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_to_dense_is_the_same_map(rng, dtype):
    x = rng.standard_normal((2, 6, 9, 10)).astype(dtype)
    for name, layer in _conv_layers(rng):
        dense = layer.to_dense()
        assert isinstance(dense, DenseConv2d), name
        assert (dense.stride, dense.padding) == (layer.stride, layer.padding), name
        want = layer(x)
        got = dense(x)
        assert got.dtype == dtype and got.shape == want.shape, name
        tol = 1e-10 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()), err_msg=name)


def test_to_dense_kernels_by_hand(rng):
    """The rebuilt kernels against the factors contracted independently (explicit loops / the result's to_tensor)."""
    W = rng.standard_normal((5, 4, 3, 2))
    mono = monochromatic(W, 2, random_state=0).to_layer()
    colors, assign, spatial = (np.asarray(mono.params[k]) for k in ("colors", "assignment", "spatial"))
    want = np.empty_like(W)
    for f in range(5):
        for c in range(4):
            want[f, c] = colors[assign[f], c] * spatial[f]
    np.testing.assert_allclose(mono.to_dense().weight, want, rtol=1e-12, atol=0)

    sep = separable(W, 2).to_layer()
    v, h = sep.params["vertical"], sep.params["horizontal"]
    want = sum(h[:, k, 0][:, None, None, :] * v[k, :, :, 0][None, :, :, None] for k in range(2))
    np.testing.assert_allclose(sep.to_dense().weight, want, rtol=1e-12, atol=1e-14)

    cp = bicluster(W, 2, 1, method="cp", rank=2, random_state=0)
    np.testing.assert_array_equal(cp.to_layer().to_dense().weight, cp.to_tensor())

    lin = svd_lowrank(rng.standard_normal((7, 9)), 3).to_layer(bias=rng.standard_normal(7))
    dense = lin.to_dense()
    assert isinstance(dense, DenseLinear)
    np.testing.assert_allclose(dense.weight, lin.params["a"] @ lin.params["b"], rtol=1e-12)
    x = rng.standard_normal((3, 9))
    np.testing.assert_allclose(dense(x), lin(x), rtol=1e-10)
    np.testing.assert_allclose(dense(x), x @ (lin.params["a"] @ lin.params["b"]).T + lin.params["bias"], rtol=1e-10)


def _net(rng):
    W1 = rng.standard_normal((8, 3, 3, 3))
    W2 = rng.standard_normal((6, 8, 3, 3))
    layers = [
        ("conv1", monochromatic(W1, 2, random_state=0).to_layer(bias=rng.standard_normal(8), padding=1)),
        ("relu1", ReLU()),
        ("conv2", Conv2d(W2, rng.standard_normal(6), padding=1)),
        ("fc", svd_lowrank(rng.standard_normal((5, 6 * 7 * 7)), 2).to_layer(bias=rng.standard_normal(5))),
    ]
    return npconv.Network(layers, input_shape=(3, 7, 7))


def _fake_timer(times):
    """A stand-in for tune's _time_pair: (factored s, dense s) by the layer's kind, counting the calls."""
    calls = []

    def fake(factored, dense, h, repeat, warmup, sync):
        calls.append((factored.kind, type(dense).__name__, h.shape))
        factored(h), dense(h)
        return times[factored.kind]
    return fake, calls


@pytest.mark.parametrize("margin,expect", [(1.0, {"conv1": "dense", "fc": "factored"}),
                                           (1.5, {"conv1": "factored", "fc": "factored"})])
def test_tune_keeps_the_faster_form(rng, monkeypatch, margin, expect):
    net = _net(rng)
    x = rng.standard_normal((2, 3, 7, 7))
    times = {"monochromatic_conv2d": (2.0, 1.5), "lowrank_linear": (1.0, 3.0)}
    fake, calls = _fake_timer(times)
    monkeypatch.setattr(tune_module, "_time_pair", fake)
    before = {n: type(layer) for n, layer in net.items()}
    printed = []
    tuned, rows = npconv.tune(net, x, margin=margin, print_fn=printed.append)
    assert len(printed) == 1 and "choice" in printed[0] and "conv1" in printed[0]
    assert [c[:2] for c in calls] == [("monochromatic_conv2d", "Conv2d"), ("lowrank_linear", "Linear")]
    assert calls[0][2] == (2, 3, 7, 7) and calls[1][2] == (2, 6, 7, 7)   # each on the output of the layers before
    assert {r["name"]: r["choice"] for r in rows} == expect
    assert rows[0]["factored_ms"] == 2000.0 and rows[0]["dense_ms"] == 1500.0
    assert {n: type(layer) for n, layer in net.items()} == before                # net untouched
    assert isinstance(tuned["conv1"], DenseConv2d if expect["conv1"] == "dense" else type(net["conv1"]))
    assert tuned.names == net.names
    y, want = tuned.forward(x), net.forward(x)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10 * float(np.abs(want).max()))


def test_tune_times_both_forms_interleaved(rng):
    """The real timer: both forms run repeat + warmup times, alternating which goes first."""
    order = []

    class Probe:
        def __init__(self, tag):
            self.tag = tag

        def __call__(self, h):
            order.append(self.tag)
            return h
    tf, td = tune_module._time_pair(Probe("f"), Probe("d"), np.zeros(1), 3, 1, lambda: None)
    assert order == ["f", "d", "d", "f", "f", "d", "d", "f"]
    assert tf >= 0 and td >= 0


def test_tune_on_a_network_without_factored_layers(rng):
    net = npconv.Network([("conv", Conv2d(rng.standard_normal((2, 3, 3, 3))))], input_shape=(3, 5, 5))
    out = []
    tuned, rows = npconv.tune(net, rng.standard_normal((1, 3, 5, 5)), repeat=1, print_fn=out.append)
    assert rows == [] and tuned is not net and tuned.names == net.names
    assert out == ["(empty)"]                                   # no factored layer: nothing to choose


def test_tune_bad_arguments(rng):
    net = _net(rng)
    x = rng.standard_normal((1, 3, 7, 7))
    with pytest.raises(TypeError, match="net must be an npconv.Network"):
        npconv.tune([("a", ReLU())], x)
    with pytest.raises(ValueError, match="x must have shape"):
        npconv.tune(net, rng.standard_normal((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        npconv.tune(net, x, repeat=0)
    with pytest.raises(TypeError, match="warmup must be an int"):
        npconv.tune(net, x, warmup=1.5)
    with pytest.raises(ValueError, match="margin must be > 0"):
        npconv.tune(net, x, margin=0)
    with pytest.raises(TypeError, match="margin must be a real number"):
        npconv.tune(net, x, margin="fast")
    with pytest.raises(TypeError, match="positional"):
        npconv.tune(net, x, 3)


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_to_dense_and_tune_on_the_device(rng, monkeypatch):
    """On (emulated) CuPy arrays: to_dense() puts the dense layer on the device, and tune runs there."""
    from npconv.kernels.cuda import loader
    cp = install_as_cupy(monkeypatch)
    try:
        net = _net(rng)
        x = rng.standard_normal((2, 3, 7, 7))
        want = net.forward(x)
        net.to_gpu()
        for name in ("conv1", "fc"):
            assert net[name].to_dense().on_gpu, name
        tuned, rows = npconv.tune(net, cp.asarray(x), repeat=1, warmup=0)
        assert [r["name"] for r in rows] == ["conv1", "fc"] and tuned.on_gpu
        got = tuned.forward(cp.asarray(x))
        assert isinstance(got, cp.ndarray)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10 * float(np.abs(want).max()))
    finally:
        loader.clear_cache()
