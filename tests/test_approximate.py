import numpy as np
import pytest

import npconv
from npconv import Network
from npconv.approximate import SVD, Bicluster, Monochromatic, Separable, SharedSeparable, approximate
from npconv.layers import Conv2d, Flatten, Linear, ReLU
from tests.reference import conv2d_naive


def make_net(rng):
    w1 = rng.standard_normal((8, 3, 5, 5))
    w2 = rng.standard_normal((6, 8, 3, 3))
    w3 = rng.standard_normal((10, 6 * 4 * 4))
    return Network([("conv1", Conv2d(w1, rng.standard_normal(8), stride=2, padding=2)), ("relu1", ReLU()),
                    ("conv2", Conv2d(w2, rng.standard_normal(6), padding=1)), ("relu2", ReLU()),
                    ("flat", Flatten()), ("fc", Linear(w3, rng.standard_normal(10)))], input_shape=(3, 8, 8))


def forward_with_kernels(x, net, kernels):
    """An independent forward pass of make_net's architecture with given conv1/conv2/fc weights."""
    h = np.maximum(conv2d_naive(x, kernels["conv1"], net["conv1"].bias, (2, 2), (2, 2, 2, 2)), 0)
    h = np.maximum(conv2d_naive(h, kernels["conv2"], net["conv2"].bias, (1, 1), (1, 1, 1, 1)), 0)
    return h.reshape(len(x), -1) @ kernels["fc"].T + net["fc"].bias


def test_approximate_executes_the_decomposition_and_keeps_the_original(rng):
    from npconv.decompose.monochromatic import monochromatic
    from npconv.decompose.separable import separable
    from npconv.decompose.svd import svd_lowrank
    net = make_net(rng)
    w_before = {n: np.array(net[n].weight) for n in ("conv1", "conv2", "fc")}
    plan = {"conv1": Monochromatic(colors=2, random_state=3), "conv2": Separable(rank=4), "fc": SVD(rank=3)}
    new, reports = approximate(net, plan, return_report=True)
    for n, w in w_before.items():   # the original is untouched
        np.testing.assert_array_equal(net[n].weight, w)
    assert type(new["conv1"]).__name__ == "MonochromaticConv2d"
    assert type(new["conv2"]).__name__ == "SeparableConv2d"
    assert type(new["fc"]).__name__ == "LowRankLinear"
    # the decompositions computed independently, rebuilt as dense kernels
    kernels = {"conv1": monochromatic(w_before["conv1"], 2, random_state=3).to_tensor(),
               "conv2": separable(w_before["conv2"], 4).to_tensor().reshape(w_before["conv2"].shape),
               "fc": np.matmul(*svd_lowrank(w_before["fc"], 3))}
    x = rng.standard_normal((3, 3, 8, 8))
    np.testing.assert_allclose(new.forward(x), forward_with_kernels(x, net, kernels), rtol=1e-9, atol=1e-9)
    by = {r.layer: r for r in reports}
    assert by["fc"].params_after == 3 * (10 + 96) + 10
    assert by["fc"].macs_before == 960 and by["fc"].macs_after == 3 * (10 + 96)
    assert 0 < by["conv1"].relative_error < 1 and by["conv1"].gain > 0


def test_approximated_network_saves_and_loads(tmp_path, rng):
    net = make_net(rng)
    new = approximate(net, {"conv1": Monochromatic(colors=2), "fc": SVD(rank=0.5), "conv2": Separable(rank=3)})
    npconv.save(new, tmp_path / "a.npz")
    back = npconv.load(tmp_path / "a.npz")
    x = rng.standard_normal((2, 3, 8, 8))
    np.testing.assert_array_equal(back.forward(x), new.forward(x))
    assert back.meta["approximations"]["fc"].startswith("SVD")


@pytest.mark.parametrize("conv2", [Bicluster(G=2, H=2, ranks=(3, 3), method="svd"),
                                   Bicluster(G=2, H=2, rank=3, method="cp"), Separable(rank=3)],
                         ids=["bicluster-svd", "bicluster-cp", "separable"])
def test_approximated_network_copies_and_is_approximated_again(rng, conv2):
    """``Network.copy`` (a deep copy) of an approximated network after a forward pass, and ``approximate`` of it
    (which deep-copies the layers it keeps): the results carry a read-only ``meta`` mapping, which a plain
    ``copy.deepcopy`` could not copy."""
    net = approximate(make_net(rng), {"conv1": Monochromatic(colors=2), "conv2": conv2})
    x = rng.standard_normal((2, 3, 8, 8))
    y = net.forward(x)
    twin = net.copy()
    res, res2 = getattr(net["conv2"], "result", None), getattr(twin["conv2"], "result", None)
    if res is not None:
        assert res2 is not res and type(res2) is type(res) and dict(res2.meta) == dict(res.meta)
        for a, b in zip(res, res2):
            assert a is not b and np.array_equal(a, b)
    np.testing.assert_array_equal(twin.forward(x), y)
    again = approximate(net, {"fc": SVD(rank=3)})
    h = net["relu1"](net["conv1"](x))
    np.testing.assert_array_equal(again["conv2"](h), net["conv2"](h))


def test_data_fit_reduces_output_error_on_that_data(rng):
    # inputs concentrated in a few directions: the data-weighted SVD must do better on them than plain SVD
    net = Network([("fc", Linear(rng.standard_normal((20, 30))))], input_shape=(30,))
    basis = rng.standard_normal((4, 30))
    data = rng.standard_normal((200, 4)) @ basis + 0.01 * rng.standard_normal((200, 30))
    _, rep_w = approximate(net, {"fc": SVD(rank=4)}, data=data, return_report=True)
    _, rep_d = approximate(net, {"fc": SVD(rank=4, fit="data")}, data=data, return_report=True)
    assert rep_d[0].data_error < 0.1 * rep_w[0].data_error
    assert rep_d[0].relative_error >= rep_w[0].relative_error  # worse in weights, better where the data is


@pytest.mark.parametrize("make", [lambda **f: Bicluster(G=2, H=2, ranks=(2, 3), method="svd", **f),
                                  lambda **f: Bicluster(G=2, H=2, rank=2, method="cp", **f),
                                  lambda **f: SharedSeparable(G=2, H=2, rank=2, n_filters=3, **f)],
                         ids=["svd", "cp", "shared"])
def test_bicluster_data_fit_reduces_output_error_on_that_data(rng, make):
    # conv2's inputs (relu1's outputs) made strongly correlated across channels: a few input patterns only
    net = make_net(rng)
    data = np.repeat(rng.standard_normal((60, 1, 8, 8)), 3, axis=1) * rng.uniform(0.5, 1.5, (1, 3, 1, 1))
    _, rep_w = approximate(net, {"conv2": make()}, data=data, return_report=True)
    new, rep_d = approximate(net, {"conv2": make(fit="data")}, data=data, return_report=True)
    assert rep_d[0].data_error < 0.9 * rep_w[0].data_error
    assert type(new["conv2"]).__name__ in ("BiclusterConv2d", "SharedSeparableConv2d")


def test_plan_errors(rng):
    net = make_net(rng)
    with pytest.raises(ValueError, match=r"plan names a layer the network does not have: 'conv9'; layers are "
                                         r"\['conv1', 'relu1', 'conv2', 'relu2', 'flat', 'fc'\]"):
        approximate(net, {"conv9": SVD(rank=2)})
    with pytest.raises(TypeError, match=r"plan\['relu1'\]: SVD applies to Linear or Conv2d layers, got ReLU"):
        approximate(net, {"relu1": SVD(rank=2)})
    with pytest.raises(TypeError, match=r"plan\['fc'\]: Monochromatic applies to Conv2d layers, got Linear"):
        approximate(net, {"fc": Monochromatic(colors=2)})
    with pytest.raises(TypeError, match=r"plan\['fc'\] must be an npconv.approximate spec"):
        approximate(net, {"fc": "svd"})
    with pytest.raises(TypeError, match="plan must be a non-empty dict"):
        approximate(net, {})
    with pytest.raises(ValueError, match="data must be given"):
        approximate(net, {"fc": SVD(rank=2, fit="data")})
    with pytest.raises(TypeError, match="net must be an npconv Network"):
        approximate({}, {"fc": SVD(rank=2)})


@pytest.mark.parametrize("make,exc,match", [
    (lambda: SVD(rank=0), ValueError, "rank must be >= 1, got 0"),
    (lambda: SVD(rank=1.5), ValueError, r"rank as a fraction .* must be in \(0, 1\], got 1.5"),
    (lambda: SVD(rank=2, fit="mahalanobis"), ValueError, r"fit must be one of \['data', 'weights'\]"),
    (lambda: Monochromatic(colors=0), ValueError, "colors must be >= 1"),
    (lambda: Bicluster(G=2, H=2, method="tucker", rank=2), ValueError, "method must be one of"),
    (lambda: Bicluster(G=2, H=2, method="cp"), ValueError, "rank must be given for method='cp'"),
    (lambda: Bicluster(G=2, H=2, method="svd", ranks=(3,)), ValueError, r"ranks must be a pair"),
    (lambda: Bicluster(G=2, H=2, method="svd", ranks=5), ValueError, r"ranks must be a pair \(K1, K2\) .*got 5"),
    (lambda: Bicluster(G=2, H=2, method="svd", ranks=(2, 1.5)), TypeError, r"ranks\[1\] \(K2\) must be an int"),
    (lambda: Bicluster(G=2, H=2, method="svd", ranks=(0, 1)), ValueError, r"ranks\[0\] \(K1\) must be >= 1"),
    (lambda: Bicluster(G=2, H=2, rank=1, ranks=(1, 1)), ValueError, r"ranks \(K1, K2\) is for method='svd'"),
    (lambda: Bicluster(G=2, H=2, method="svd", rank=1, ranks=(1, 1)), ValueError, "rank is for method='cp'"),
    (lambda: SVD(rank=True), TypeError, r"rank must be an int or a float in \(0, 1\], got bool"),
    (lambda: SVD(rank="3"), TypeError, r"rank must be an int or a float in \(0, 1\], got str"),
    (lambda: SVD(rank=np.float32(1.5)), ValueError, r"rank as a fraction .* must be in \(0, 1\]"),
    (lambda: Separable(rank=-1), ValueError, "rank must be >= 1"),
])
def test_spec_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_numpy_scalar_ranks_are_accepted_like_the_decomposition_accepts_them(rng):
    net = make_net(rng)
    x = rng.standard_normal((2, 3, 8, 8))
    for frac in (np.float32(0.25), np.float64(0.25)):
        new = approximate(net, {"fc": SVD(rank=frac)})
        ref = approximate(net, {"fc": SVD(rank=0.25)})
        assert new["fc"].rank == ref["fc"].rank
        np.testing.assert_allclose(new.forward(x), ref.forward(x), rtol=1e-6, atol=1e-6)
    assert approximate(net, {"fc": SVD(rank=np.int64(3))})["fc"].rank == 3


def test_rank_too_large_is_reported_by_the_decomposition(rng):
    net = make_net(rng)
    with pytest.raises(ValueError, match="rank"):
        approximate(net, {"fc": SVD(rank=50)})
    with pytest.raises(ValueError, match="colors must be <= the number of filters"):
        approximate(net, {"conv1": Monochromatic(colors=9)})


@pytest.mark.parametrize("make", [lambda: Bicluster(G=3, H=2, rank=1), lambda: Bicluster(G=3, H=2, rank=1, fit="data"),
                                  lambda: Bicluster(G=3, H=2, ranks=(1, 2), method="svd"),
                                  lambda: SharedSeparable(G=3, H=2, rank=2, n_filters=3)])
def test_dead_input_channels(rng, make):
    """A kernel with dead (all-zero) input channels has all-zero blocks: they get zero factors."""
    W = rng.standard_normal((8, 6, 3, 3))
    W[:, 4:] = 0.0
    net = Network([("conv", Conv2d(W, rng.standard_normal(8), padding=1))], input_shape=(6, 7, 7))
    x = rng.standard_normal((3, 6, 7, 7))
    new, rep = approximate(net, {"conv": make()}, data=x, return_report=True)
    kernel = new["conv"].result.to_tensor()
    assert not np.any(kernel[:, 4:])
    np.testing.assert_allclose(new.forward(x), conv2d_naive(x, kernel, net["conv"].bias, (1, 1), (1, 1, 1, 1)),
                               rtol=1e-9, atol=1e-9)
    assert rep[0].relative_error < 1.0
