"""Factored layers: forward == conv with the rebuilt kernel, config round trips, shapes, MACs, validation."""
import json

import numpy as np
import pytest

from npconv.decompose import cost
from npconv.decompose.monochromatic import monochromatic
from npconv.decompose.separable import separable
from npconv.decompose.svd import conv_svd, svd_lowrank
from npconv.layers.base import layer_class
from npconv.layers.lowrank import LowRankConv2d, LowRankLinear, MonochromaticConv2d, SeparableConv2d
from tests.reference import tolerance
from tests.reference import conv2d_einsum

DTYPES = [np.float32, np.float64]


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


def _roundtrip(layer):
    cfg = json.loads(json.dumps(layer.config()))
    return layer_class(layer.kind).from_config(cfg, {k: v.copy() for k, v in layer.params.items()})


def _decompositions(W):
    return {"monochromatic": monochromatic(W, 3, random_state=0), "conv_svd": conv_svd(W, 4),
            "separable": separable(W, 5)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["monochromatic", "conv_svd", "separable"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (0, 1, 2, 1))])
def test_conv_layers(rng, dtype, which, stride, padding):
    W = rng.standard_normal((9, 3, 5, 3)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    res = _decompositions(W)[which]
    layer = res.to_layer(bias=b, stride=stride, padding=padding)
    x = rng.standard_normal((2, 3, 13, 11)).astype(dtype)
    ref = conv2d_einsum(x, res.to_tensor().astype(np.float64), b, layer.stride, layer.padding)
    y = layer(x)
    check(y, ref, dtype)
    assert layer.output_shape((3, 13, 11)) == y.shape[1:]
    check(_roundtrip(layer)(x), ref, dtype)
    # float32 input through a float64 layer: cast weights, float32 out
    if dtype == np.float64:
        check(layer(x.astype(np.float32)), ref, np.float32)


def test_macs_and_params(rng):
    W = rng.standard_normal((12, 3, 7, 7))
    shape = (3, 40, 36)
    kw = dict(stride=2, padding=1)
    mono = monochromatic(W, 4, random_state=0).to_layer(**kw)
    assert mono.macs(shape) == cost.monochromatic_cost(shape, 12, 7, 4, **kw).macs
    assert mono.macs(shape) == 3 * 4 * 40 * 36 + 49 * 12 * 18 * 16
    assert mono.n_params() == 4 * 3 + 12 * 49 == cost.monochromatic_cost(shape, 12, 7, 4, **kw).params
    sep = separable(W, 6).to_layer(**kw)
    assert sep.macs(shape) == cost.separable_cost(shape, 12, 7, 6, **kw).macs == 6 * 3 * 7 * 18 * 36 + 12 * 6 * 7 * 18 * 16
    lr = conv_svd(W, 5).to_layer(**kw)
    assert lr.macs(shape) == cost.conv_svd_cost(shape, 12, 7, 5, **kw).macs
    assert lr.n_params() == 5 * 147 + 12 * 5
    lin = svd_lowrank(rng.standard_normal((10, 30)), 4).to_layer(bias=np.zeros(10))
    assert lin.macs((30,)) == 4 * 40 and lin.output_shape((2, 15)) == (10,) and lin.n_params() == 4 * 40 + 10
    with pytest.raises(ValueError):
        mono.output_shape((4, 40, 36))
    with pytest.raises(ValueError):
        lin.output_shape((31,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_linear_layer(rng, dtype):
    a = rng.standard_normal((5, 2)).astype(dtype)
    bf = rng.standard_normal((2, 12)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    layer = LowRankLinear(a, bf, bias)
    x = rng.standard_normal((3, 3, 2, 2)).astype(dtype)        # flattened to 12 features
    ref = x.reshape(3, 12).astype(np.float64) @ (a.astype(np.float64) @ bf).T + bias
    check(layer(x), ref, dtype)
    check(_roundtrip(layer)(x), ref, dtype)


def test_monochromatic_assignment_kept_integer(rng):
    layer = MonochromaticConv2d(rng.standard_normal((2, 3)), np.array([0, 1, 1], np.int32),
                                rng.standard_normal((3, 3, 3)), padding=1)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert layer(x).dtype == np.float32
    assert layer.params["assignment"].dtype == np.int64
    assert layer.n_colors == 2


def test_bad_layers(rng):
    with pytest.raises(ValueError, match="share t"):
        LowRankLinear(rng.standard_normal((4, 2)), rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        LowRankLinear(np.full((4, 2), np.nan), rng.standard_normal((2, 5)))
    with pytest.raises(ValueError, match="second"):
        LowRankConv2d(rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((4, 2)))
    with pytest.raises(TypeError, match="dtype"):
        LowRankConv2d(rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(TypeError, match="integer"):
        MonochromaticConv2d(rng.standard_normal((2, 3)), np.array([0.0, 1.0]), rng.standard_normal((2, 3, 3)))
    with pytest.raises(ValueError, match="assignment must lie"):
        MonochromaticConv2d(rng.standard_normal((2, 3)), np.array([0, 2]), rng.standard_normal((2, 3, 3)))
    with pytest.raises(ValueError, match="bias"):
        MonochromaticConv2d(rng.standard_normal((2, 3)), np.array([0, 1]), rng.standard_normal((2, 3, 3)),
                            np.zeros(3))
    with pytest.raises(ValueError, match="vertical"):
        SeparableConv2d(rng.standard_normal((2, 3, 3, 2)), rng.standard_normal((4, 2, 1, 3)))
    with pytest.raises(ValueError, match="horizontal"):
        SeparableConv2d(rng.standard_normal((2, 3, 3, 1)), rng.standard_normal((4, 2, 2, 3)))
    with pytest.raises(ValueError, match="stride"):
        SeparableConv2d(rng.standard_normal((2, 3, 3, 1)), rng.standard_normal((4, 2, 1, 3)), stride=0)


def test_monochromatic_derived_weights_follow_replaced_params(rng):
    """On the CPU the layer keeps what it derives from its factors (colour order, blocks, taps) in its per-dtype
    cache; a replaced factor (then ``_sync_params``) is seen by the next call of the same dtype, and bad inputs are
    refused by name."""
    colors = rng.standard_normal((3, 4))
    spatial = rng.standard_normal((5, 3, 3))
    layer = MonochromaticConv2d(colors=colors, assignment=np.array([2, 0, 2, 1, 0]), spatial=spatial, padding=1)
    x = rng.standard_normal((2, 4, 7, 6))

    def dense(a, c):
        return conv2d_einsum(x, c[a][:, :, None, None] * spatial[:, None], None, (1, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(layer(x), dense(np.array([2, 0, 2, 1, 0]), colors), *tolerance(np.float64))
    assert any(isinstance(k, tuple) for k in layer._params_for(x)), "nothing was kept"
    layer.params["assignment"] = np.array([1, 1, 0, 0, 0])
    layer.params["colors"] = 3 * colors
    layer._sync_params()
    np.testing.assert_allclose(layer(x), dense(np.array([1, 1, 0, 0, 0]), 3 * colors), *tolerance(np.float64))
    with pytest.raises(TypeError, match="x must be"):
        layer([[1.0]])
    with pytest.raises(ValueError, match="out must have shape"):
        layer(x, out=np.zeros((2, 5, 7, 5)))


@pytest.mark.parametrize("make,x", [
    (lambda r: LowRankConv2d(r.standard_normal((2, 3, 3, 3)), r.standard_normal((4, 2))), np.zeros((1, 3, 5, 5))),
    (lambda r: SeparableConv2d(r.standard_normal((2, 3, 3, 1)), r.standard_normal((4, 2, 1, 3))),
     np.zeros((1, 3, 5, 5))),
    (lambda r: LowRankLinear(r.standard_normal((4, 2)), r.standard_normal((2, 5))), np.zeros((1, 5))),
    (lambda r: MonochromaticConv2d(r.standard_normal((2, 3)), np.array([0, 1]), r.standard_normal((2, 3, 3))),
     np.zeros((1, 3, 5, 5))),
])
def test_non_array_input_is_a_type_error(rng, make, x):
    layer = make(rng)
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray or cupy.ndarray, got list"):
        layer(x.tolist())
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray or cupy.ndarray, got float"):
        layer(1.0)
    assert layer(x).shape[0] == 1                     # an array still runs
