"""BiclusterConv2d (CP, SVD) and SharedSeparableConv2d: forward, config round trip, shapes, costs, validation."""
import numpy as np
import pytest

from npconv.decompose import cost
from npconv.decompose.bicluster import bicluster
from npconv.decompose.shared import shared_separable
from npconv.layers.base import layer_class
from npconv.layers.bicluster import BiclusterConv2d, SharedSeparableConv2d
from tests.reference import tolerance
from tests.reference import conv2d_einsum

DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((8, 6, 3, 3))
    return W, {
        "cp": bicluster(W, 3, 2, method="cp", rank=2, random_state=0),
        "svd": bicluster(W, 3, 2, method="svd", ranks=(2, 3), random_state=0),
        "shared": shared_separable(W, 3, 2, rank=2, n_filters=3, refit_iter=3, random_state=0),
    }


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_equals_conv_with_rebuilt_kernel(rng, results, kind, dtype):
    _, res = results
    r = res[kind]
    b = rng.standard_normal(8)
    layer = r.to_layer(bias=b, stride=2, padding=(1, 0))
    x = rng.standard_normal((3, 6, 10, 9)).astype(dtype)
    y = layer(x)
    ref = conv2d_einsum(x, r.to_tensor(), b, (2, 2), (1, 1, 0, 0))
    assert y.dtype == dtype and y.shape == (3,) + layer.output_shape((6, 10, 9))
    np.testing.assert_allclose(y, ref, *tolerance(dtype))
    # non-contiguous input
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(layer(xt), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
def test_derived_weights_follow_replaced_params(rng, results, kind):
    """The CPU path keeps what it derives from the factors in the layer's parameter cache; each dtype gets its own,
    and replacing a factor (then ``_sync_params``, as every parameter update does) is seen by the next call."""
    _, res = results
    r = res[kind]
    layer = r.to_layer(stride=1, padding=1)
    x = rng.standard_normal((2, 6, 7, 8))
    for dtype in (np.float32, np.float64, np.float32):
        y = layer(x.astype(dtype))
        np.testing.assert_allclose(y, conv2d_einsum(x.astype(dtype), r.to_tensor(), None, (1, 1), (1, 1, 1, 1)),
                                   *tolerance(dtype))
        assert any(isinstance(k, tuple) for k in layer._cache[(np.dtype(dtype), False)]), "nothing was kept"
    factors = dict(zip(r.FACTORS, (getattr(r, k) for k in r.FACTORS)))
    factors["expand"] = 2 * factors["expand"]
    factors["reduce"] = -factors["reduce"]
    layer.params["expand"], layer.params["reduce"] = factors["expand"], factors["reduce"]
    layer._sync_params()
    changed = type(r)(*(factors[k] for k in r.FACTORS)).to_tensor()
    x32 = x.astype(np.float32)                    # the dtype of the last call: its cache entry was the one kept
    np.testing.assert_allclose(layer(x32), conv2d_einsum(x32, changed, None, (1, 1), (1, 1, 1, 1)),
                               *tolerance(np.float32))


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
def test_config_round_trip_keeps_integer_arrays(rng, results, kind):
    _, res = results
    layer = res[kind].to_layer(bias=np.ones(8), stride=(2, 1), padding=(1, 2, 0, 1))
    cls = layer_class(layer.kind)
    assert cls in (BiclusterConv2d, SharedSeparableConv2d)
    clone = cls.from_config(layer.config(), dict(layer.params))
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(clone(x), layer(x))
    assert layer.params["in_perm"].dtype.kind == "i"
    layer(x)   # float32 input with float64 weights: cast once, index arrays untouched
    assert all(layer._params_for(x)[k].dtype.kind == "i" for k in ("in_perm", "in_offsets", "out_perm"))


def test_costs_and_params(results):
    _, res = results
    in_shape = (6, 13, 13)
    cp_l = res["cp"].to_layer(stride=2, padding=1)
    svd_l = res["svd"].to_layer(stride=2, padding=1, bias=np.zeros(8))
    assert cp_l.macs(in_shape) == cost.bicluster_cp_cost(in_shape, 8, 3, 3, 2, 2, stride=2, padding=1).macs
    assert svd_l.macs(in_shape) == cost.bicluster_svd_cost(in_shape, 8, 3, 3, 2, (2, 3), stride=2,
                                                           padding=1).macs
    assert cp_l.n_params() == 6 * 2 * 2 + 2 * 3 * 2 * 2 * 3 + 8 * 3 * 2          # index arrays not counted
    assert svd_l.n_params() == 6 * 2 * 2 + 3 * 2 * 3 * 2 * 9 + 8 * 3 * 3 + 8     # + bias
    sh = res["shared"].to_layer()
    assert sh.macs(in_shape) == res["shared"].cost(in_shape).macs
    assert cp_l.output_shape(in_shape) == (8, 7, 7)
    with pytest.raises(ValueError, match="6 channels"):
        cp_l.output_shape((5, 13, 13))


def test_constructor_validation(results):
    _, res = results
    parts = dict(zip(res["cp"].FACTORS, res["cp"]))
    with pytest.raises(ValueError, match="form"):
        BiclusterConv2d(form="tucker", **parts)
    with pytest.raises(ValueError, match="needs spatial"):
        BiclusterConv2d(form="svd", **{k: v for k, v in parts.items() if k not in ("vertical", "horizontal")})
    with pytest.raises(ValueError, match="takes vertical and horizontal, not spatial"):
        BiclusterConv2d(form="cp", spatial=np.ones((3, 2, 1, 1, 3, 3)), **parts)
    with pytest.raises(ValueError, match="non-finite"):
        BiclusterConv2d(form="cp", **dict(parts, reduce=parts["reduce"] * np.nan))
    with pytest.raises(ValueError, match="bias must be an array of shape"):
        BiclusterConv2d(form="cp", bias=np.ones(3), **parts)
    with pytest.raises(ValueError, match="non-finite"):
        BiclusterConv2d(form="cp", bias=np.full(8, np.inf), **parts)
    with pytest.raises(TypeError, match="BiclusterCPResult or BiclusterSVDResult"):
        BiclusterConv2d.from_result(res["shared"])
    with pytest.raises(TypeError, match="SharedSeparableResult"):
        SharedSeparableConv2d.from_result(res["cp"])
    with pytest.raises(ValueError, match="stride"):
        res["cp"].to_layer(stride=0)


def test_layer_rejects_wrong_input(results, rng):
    _, res = results
    layer = res["cp"].to_layer()
    with pytest.raises(ValueError, match="input channels"):
        layer(rng.standard_normal((1, 5, 8, 8)))
    with pytest.raises(TypeError, match="dtype"):
        layer(np.ones((1, 6, 8, 8), np.int64))


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
def test_save_load_round_trip(tmp_path, rng, results, kind):
    from npconv.io import load, save
    from npconv.network import Network
    _, res = results
    layer = res[kind].to_layer(bias=np.arange(8.0), stride=2, padding=1)
    net = Network([("conv", layer)], input_shape=(6, 9, 9))
    path = tmp_path / f"{kind}.npz"
    save(net, path)
    back = load(path)
    x = rng.standard_normal((2, 6, 9, 9))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert type(back["conv"]) is type(layer) and back["conv"].config() == layer.config()


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
def test_dense_form_shapes_and_costs_follow_replaced_params(rng, results, kind):
    """``to_dense``, ``output_shape``, ``macs`` and ``n_params`` describe the factors forward runs, also after the
    params were replaced (``tune`` swaps in ``to_dense()`` when it is faster)."""
    W, res = results
    r = res[kind]
    layer = r.to_layer(stride=1, padding=1)
    x = rng.standard_normal((2, 6, 7, 8))
    p = dict(layer.params)
    p["expand"] = 3 * p["expand"]
    layer.params = p
    layer._sync_params()
    factors = {k: (3 * getattr(r, k) if k == "expand" else getattr(r, k)) for k in r.FACTORS}
    ref = conv2d_einsum(x, type(r)(**factors).to_tensor(), None, (1, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(layer(x), ref, *tolerance(np.float64))
    np.testing.assert_allclose(layer.to_dense()(x), ref, *tolerance(np.float64))
    # factors of another shape (rank, or ranks, and kernel size): shapes and costs follow them too
    other = {"cp": lambda: bicluster(W[:, :, :2], 3, 2, method="cp", rank=3, random_state=0),
             "svd": lambda: bicluster(W[:, :, :2], 3, 2, method="svd", ranks=(1, 2), random_state=0),
             "shared": lambda: shared_separable(W[:, :, :2], 3, 2, rank=3, n_filters=4, refit_iter=1,
                                                random_state=0)}[kind]()
    layer.params = {k: getattr(other, k) for k in other.FACTORS}
    layer._sync_params()
    in_shape = (6, 7, 8)
    assert layer.output_shape(in_shape) == (8, 7 + 2 - 2 + 1, 8 + 2 - 3 + 1)     # a 2x3 kernel now
    assert layer.macs(in_shape) == other.cost(in_shape, padding=1).macs
    assert layer.n_params() == other.n_params()
    ref = conv2d_einsum(x, other.to_tensor(), None, (1, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(layer(x), ref, *tolerance(np.float64))
    np.testing.assert_allclose(layer.to_dense()(x), ref, *tolerance(np.float64))


@pytest.mark.parametrize("kind", ["cp", "svd", "shared"])
def test_layer_and_result_pickle(rng, results, kind):
    import pickle
    r = results[1][kind]
    layer = r.to_layer(bias=rng.standard_normal(8), padding=1)
    x = rng.standard_normal((2, 6, 7, 7))
    back = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(back(x), layer(x))
    res = pickle.loads(pickle.dumps(r))
    assert dict(res.meta) == dict(r.meta) and res.errors == r.errors
    with pytest.raises(TypeError):
        res.meta["method"] = "x"                      # meta stays read-only
    np.testing.assert_array_equal(res.to_tensor(), r.to_tensor())
