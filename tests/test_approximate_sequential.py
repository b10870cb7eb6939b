"""``approximate(..., sequential=True, refit_above=...)``: layers fitted on the approximated network's inputs to
reproduce the exact network's outputs, and the dense layers above refitted by least squares.

Independent references: ``numpy.linalg.lstsq`` with an intercept column on the activations themselves (the
refit with ``ridge=0`` is exactly that regression), naive patch extraction for the paired moments, and the
network outputs on the data.
"""
import numpy as np
import pytest

from npconv import Network
from npconv.approximate import SVD, Bicluster, Monochromatic, Separable, approximate
from npconv.decompose.metrics import paired_moments
from npconv.layers import Conv2d, Flatten, Linear, ReLU


def _mlp(rng, dims=(12, 10, 8, 6)):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append((f"fc{i}", Linear(rng.standard_normal((b, a)) / np.sqrt(a), rng.standard_normal(b))))
        if i < len(dims) - 2:
            layers.append((f"relu{i}", ReLU()))
    return Network(layers, input_shape=(dims[0],))


def _convnet(rng):
    return Network([("conv1", Conv2d(rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8), padding=1)),
                    ("relu1", ReLU()),
                    ("conv2", Conv2d(rng.standard_normal((6, 8, 3, 3)) / 5, rng.standard_normal(6), stride=2,
                                     padding=1)),
                    ("relu2", ReLU()), ("flat", Flatten()),
                    ("fc", Linear(rng.standard_normal((5, 6 * 4 * 4)) / 10, rng.standard_normal(5)))],
                   input_shape=(3, 8, 8))


def _patches(x, k, stride, pad):
    """Every patch of x (N, C, H, W), rows in (image, row, column) order, entries in (c, kh, kw) order."""
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (H + 2 * pad - k) // stride + 1
    ow = (W + 2 * pad - k) // stride + 1
    rows = [xp[n, :, i * stride:i * stride + k, j * stride:j * stride + k].ravel()
            for n in range(N) for i in range(oh) for j in range(ow)]
    return np.array(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_paired_moments_match_naive_patches(rng, dtype):
    x = rng.standard_normal((3, 2, 5, 5)).astype(dtype)
    xh = (x + 0.3 * rng.standard_normal(x.shape)).astype(dtype)
    S, C, mh, mx = paired_moments(xh, x, (3, 3), stride=2, padding=1)
    P, Ph = _patches(x.astype(np.float64), 3, 2, 1), _patches(xh.astype(np.float64), 3, 2, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S, Ph.T @ Ph / len(P), **tol)
    np.testing.assert_allclose(C, Ph.T @ P / len(P), **tol)
    np.testing.assert_allclose(mh, Ph.mean(0), **tol)
    np.testing.assert_allclose(mx, P.mean(0), **tol)
    # sampled positions: the same positions in both inputs
    S2, C2, _, _ = paired_moments(x, x, (3, 3), stride=2, padding=1, max_patches=7, random_state=0)
    np.testing.assert_allclose(S2, C2)
    # dense inputs
    a, b = rng.standard_normal((20, 6)), rng.standard_normal((20, 6))
    S, C, ma, mb = paired_moments(a, b)
    np.testing.assert_allclose(S, a.T @ a / 20)
    np.testing.assert_allclose(C, a.T @ b / 20)
    with pytest.raises(ValueError, match="x_hat and x must have the same shape"):
        paired_moments(a, b[:5])


def test_refit_with_no_ridge_is_least_squares_with_an_intercept(rng):
    net = _mlp(rng)
    x = rng.standard_normal((400, 12))
    new, reports = approximate(net, {"fc0": SVD(rank=2)}, data=x, refit_above=["fc1"], ridge=0.0,
                               return_report=True)
    # independent: the activations of both networks, and lstsq of the exact fc1 output on [approximated input, 1]
    h_exact = net.forward(x, until="relu0")
    h_appr = new.forward(x, until="relu0")
    target = net["fc1"](h_exact)
    A = np.hstack([h_appr, np.ones((len(x), 1))])
    sol = np.linalg.lstsq(A, target, rcond=None)[0]
    # the statistics come from float32 passes: compare the fitted map's outputs (well conditioned), not the
    # weights along near-collinear inputs
    np.testing.assert_allclose(new["fc1"](h_appr), A @ sol, rtol=1e-4, atol=1e-4 * np.abs(target).max())
    assert np.abs(new["fc1"].bias - sol[-1]).max() < 1e-2 * np.abs(sol[-1]).max()
    assert [r.layer for r in reports] == ["fc0", "fc1"] and reports[1].method == "Refit"
    assert new.meta["refitted"] == ["fc1"] and list(new.meta["approximations"]) == ["fc0"]
    assert type(new["fc2"]) is Linear
    np.testing.assert_array_equal(new["fc2"].weight, net["fc2"].weight)     # not asked for: untouched


def test_sequential_full_rank_fit_reproduces_the_least_squares_target(rng):
    """A full-rank SVD in sequential mode is exact, so fc1 becomes the regression of the exact output on the
    approximated input (the data-metric fit's target), with its bias."""
    net = _mlp(rng)
    x = rng.standard_normal((400, 12))
    new = approximate(net, {"fc0": SVD(rank=2), "fc1": SVD(rank=8, fit="data")}, data=x, sequential=True,
                      ridge=0.0)
    h_exact = net.forward(x, until="relu0")
    h_appr = new.forward(x, until="relu0")
    target = net["fc1"](h_exact)
    A = np.hstack([h_appr, np.ones((len(x), 1))])
    pred = A @ np.linalg.lstsq(A, target, rcond=None)[0]
    np.testing.assert_allclose(new["fc1"](h_appr), pred, rtol=1e-3, atol=1e-4)
    # without sequential, fc1 is fitted to the exact inputs: its output on the approximated ones is worse
    plain = approximate(net, {"fc0": SVD(rank=2), "fc1": SVD(rank=8, fit="data")}, data=x)
    err = lambda y: np.linalg.norm(y - target)   # noqa: E731
    assert err(new["fc1"](h_appr)) < err(plain["fc1"](h_appr))   # the regression is the best affine map


@pytest.mark.parametrize("plan", [
    {"conv1": Monochromatic(colors=2, fit="data")},
    {"conv1": Separable(rank=2, fit="data"), "conv2": Bicluster(G=2, H=2, rank=2, method="cp", fit="data")},
    {"conv2": Bicluster(G=2, H=2, ranks=(2, 3), method="svd", fit="data")},
], ids=["mono", "separable+cp", "svd"])
def test_refit_above_brings_the_network_output_closer(rng, plan):
    net = _convnet(rng)
    x = rng.standard_normal((64, 3, 8, 8))
    ref = net.forward(x)
    plain = approximate(net, plan, data=x)
    refit, reports = approximate(net, plan, data=x, refit_above=True, return_report=True)
    e_plain = np.linalg.norm(plain.forward(x) - ref)
    e_refit = np.linalg.norm(refit.forward(x) - ref)
    assert e_refit < 0.8 * e_plain
    lowest = min(net.names.index(n) for n in plan)
    expect = [n for n in ("conv2", "fc") if n not in plan and net.names.index(n) > lowest]
    assert refit.meta["refitted"] == expect
    assert [r.layer for r in reports] == list(plan) + expect
    # the last report's data error is the network output's error against the exact network
    last = reports[-1]
    assert last.layer == "fc"
    assert last.data_error == pytest.approx(np.linalg.norm(refit.forward(x) - ref) / np.linalg.norm(ref), rel=1e-4)
    # float32 runs the refitted network too
    assert refit.forward(x.astype(np.float32)).dtype == np.float32


def test_weight_metric_specs_are_unchanged_by_sequential(rng):
    net = _convnet(rng)
    x = rng.standard_normal((16, 3, 8, 8))
    a = approximate(net, {"conv2": Separable(rank=2)}, data=x, sequential=True)
    b = approximate(net, {"conv2": Separable(rank=2)})
    for fa, fb in zip(a["conv2"].params.values(), b["conv2"].params.values()):
        np.testing.assert_array_equal(fa, fb)


def test_validation(rng):
    net = _convnet(rng)
    x = rng.standard_normal((4, 3, 8, 8))
    plan = {"conv2": SVD(rank=2)}
    with pytest.raises(ValueError, match="data must be given .* for sequential=True or refit_above"):
        approximate(net, plan, sequential=True)
    with pytest.raises(ValueError, match="data must be given .* for sequential=True or refit_above"):
        approximate(net, plan, refit_above=True)
    with pytest.raises(TypeError, match="sequential must be a bool, got str"):
        approximate(net, plan, data=x, sequential="yes")
    with pytest.raises(TypeError, match="refit_above must be a bool or a sequence of layer names, got 'fc'"):
        approximate(net, plan, data=x, refit_above="fc")
    with pytest.raises(ValueError, match="refit_above names a layer the network does not have: 'fc9'; layers are"):
        approximate(net, plan, data=x, refit_above=["fc9"])
    with pytest.raises(ValueError, match="refit_above: 'conv2' is in the plan"):
        approximate(net, plan, data=x, refit_above=["conv2"])
    with pytest.raises(ValueError, match="refit_above: 'conv1' lies below every approximated layer"):
        approximate(net, plan, data=x, refit_above=["conv1"])
    with pytest.raises(TypeError, match="refit_above: 'relu2' must be a Conv2d or Linear layer, got ReLU"):
        approximate(net, plan, data=x, refit_above=["relu2"])
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        approximate(net, plan, data=x, sequential=True, ridge=-1.0)
    with pytest.raises(ValueError, match="plan names a layer the network does not have: 'conv9'"):
        approximate(net, {"conv9": SVD(rank=2)}, data=x, sequential=True)


@pytest.mark.parametrize("value", [0.0, 0.7])
@pytest.mark.parametrize("plan,refit", [({"conv1": Monochromatic(colors=2, fit="data")}, False),
                                        ({"conv1": SVD(rank=2)}, True)])
def test_data_that_does_not_vary_is_reported_as_such(rng, value, plan, refit):
    """All-zero or constant data leave nothing to fit: the error names the data and the layer, not the weights."""
    net = Network([("conv1", Conv2d(rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8))), ("relu1", ReLU()),
                   ("conv2", Conv2d(rng.standard_normal((4, 8, 3, 3)), rng.standard_normal(4)))],
                  input_shape=(3, 9, 9))
    data = np.full((4, 3, 9, 9), value)
    where = "conv2" if refit else "conv1"       # the refitted layer's inputs are those of a constant network too
    with pytest.raises(ValueError, match=rf"data: the inputs of layer '{where}' do not vary on data"):
        approximate(net, plan, data=data, sequential=True, refit_above=refit)
