"""The thin layers of npconv.layers.simple: forward vs naive references, config round trips through JSON and the
registry, output_shape against the real output, macs, casting and bad hyper-parameters."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.reference import tolerance
from npconv.layers.base import Layer, layer_class
from npconv.layers.simple import (AvgPool2d, Dropout, Flatten, LocalResponseNorm, MaxPool2d, Normalize, ReLU,
                                  Softmax)

DTYPES = [np.float32, np.float64]


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --- small naive references (independent of npconv) ----------------------------------------------------------

def naive_max_pool(x, k, s, p):
    """Square kernel, floor mode; -inf padding."""
    N, C, H, W = x.shape
    oh, ow = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    out = np.full((N, C, oh, ow), -np.inf)
    for n in range(N):
        for c in range(C):
            for i in range(oh):
                for j in range(ow):
                    for a in range(k):
                        for b in range(k):
                            h, w = i * s - p + a, j * s - p + b
                            if 0 <= h < H and 0 <= w < W:
                                out[n, c, i, j] = max(out[n, c, i, j], x[n, c, h, w])
    return out


def naive_avg_pool_excl(x, k, s):
    """Square kernel, no padding, ceil mode, divisor = real elements."""
    N, C, H, W = x.shape
    oh, ow = math.ceil((H - k) / s) + 1, math.ceil((W - k) / s) + 1
    out = np.zeros((N, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s:i * s + k, j * s:j * s + k].astype(np.float64)
            out[:, :, i, j] = win.sum(axis=(2, 3)) / (win.shape[2] * win.shape[3])
    return out


def roundtrip(layer):
    """config + params through JSON (as the file format stores them) and the registry."""
    cfg = json.loads(json.dumps(layer.config()))
    cls = layer_class(layer.kind)
    assert cls is type(layer)
    return cls.from_config(cfg, {k: np.array(v) for k, v in layer.params.items()})


def tie_free(shape, rng, dtype):
    size = int(np.prod(shape))
    return ((rng.permutation(size) - size / 2) * 0.31).reshape(shape).astype(dtype)


# --- forward -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_layer(dtype, rng):
    layer = MaxPool2d(3, stride=2, padding=1)
    x = tie_free((2, 3, 9, 8), rng, dtype)
    y = layer(x)
    check(y, naive_max_pool(x, 3, 2, 1), dtype)
    assert layer.output_shape(x.shape[1:]) == y.shape[1:]
    assert layer.macs(x.shape[1:]) == 0
    np.testing.assert_array_equal(roundtrip(layer)(x), y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_layer(dtype, rng):
    layer = AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False)
    x = rng.standard_normal((2, 3, 8, 10)).astype(dtype)
    y = layer(x)
    check(y, naive_avg_pool_excl(x, 3, 2), dtype)
    assert y.shape[2:] == (4, 5)
    assert layer.output_shape(x.shape[1:]) == y.shape[1:]
    again = roundtrip(layer)
    assert again.config() == layer.config() and again.count_include_pad is False
    np.testing.assert_array_equal(again(x), y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_layer(dtype, rng):
    layer = LocalResponseNorm(3, alpha=0.3, beta=0.75, k=1.0)
    x = rng.standard_normal((2, 5, 3, 4)).astype(dtype)
    ref = np.empty(x.shape)
    for c in range(5):
        ssq = sum(x[:, j].astype(np.float64) ** 2 for j in range(max(0, c - 1), min(4, c + 1) + 1))
        ref[:, c] = x[:, c] / (1.0 + 0.3 / 3 * ssq) ** 0.75
    check(layer(x), ref, dtype)
    assert layer.output_shape((5, 3, 4)) == (5, 3, 4)
    assert layer.macs((5, 3, 4)) == 5 * 3 * 4 * (3 + 2)
    assert roundtrip(layer).config() == {"size": 3, "alpha": 0.3, "beta": 0.75, "k": 1.0}


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_layer_casts_params(dtype, param_dtype, rng):
    mean = np.array([0.1, 0.2, 0.3], param_dtype)
    std = np.array([0.5, 2.0, 4.0], param_dtype)
    layer = Normalize(mean, std)
    x = rng.random((2, 3, 4, 4)).astype(dtype)
    ref = (x.astype(np.float64) - mean.astype(dtype).astype(np.float64)[None, :, None, None]) \
        / std.astype(np.float64)[None, :, None, None]
    y = layer(x)
    check(y, ref, dtype)
    assert layer.params["mean"].dtype == np.dtype(param_dtype)  # stored as given
    assert layer.n_params() == 6
    assert layer.output_shape((3, 4, 4)) == (3, 4, 4) and layer.macs((3, 4, 4)) == 0
    again = roundtrip(layer)
    np.testing.assert_array_equal(again(x), y)
    assert again.config() == {}


def test_normalize_layer_refreshes_cache_after_params_change(rng):
    layer = Normalize([0.0, 0.0], [1.0, 1.0])
    x = rng.random((1, 2, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x)
    layer.params = {"mean": np.array([1.0, 1.0]), "std": np.array([2.0, 2.0])}
    layer._sync_params()  # what to_gpu / to_cpu call after replacing params
    np.testing.assert_allclose(layer(x), (x - 1) / 2, rtol=1e-6)
    assert layer.to_cpu() is layer
    np.testing.assert_allclose(layer(x), (x - 1) / 2, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_softmax_flatten_dropout_layers(dtype, rng):
    x = rng.standard_normal((2, 3, 2, 2)).astype(dtype)
    check(ReLU()(x), np.where(x > 0, x, 0).astype(np.float64), dtype)
    flat = Flatten()(x)
    np.testing.assert_array_equal(flat, x.reshape(2, 12))
    assert Flatten().output_shape((3, 2, 2)) == (12,) == flat.shape[1:]
    sm = Softmax(axis=1)(flat)
    e = np.exp(flat.astype(np.float64) - flat.max(axis=1, keepdims=True))
    check(sm, e / e.sum(axis=1, keepdims=True), dtype)
    assert Softmax().output_shape((12,)) == (12,)
    assert Dropout(0.3)(x) is x
    for layer in (ReLU(), Flatten(), Softmax(axis=-1), Dropout(0.3)):
        assert layer.macs((3, 2, 2)) == 0
        assert roundtrip(layer).config() == layer.config()
        assert layer.n_params() == 0


def test_layers_are_registered_and_subclass_layer():
    kinds = {"max_pool2d": MaxPool2d, "avg_pool2d": AvgPool2d, "lrn": LocalResponseNorm,
             "normalize": Normalize, "relu": ReLU, "softmax": Softmax, "flatten": Flatten, "dropout": Dropout}
    for kind, cls in kinds.items():
        assert layer_class(kind) is cls and issubclass(cls, Layer) and cls.kind == kind


@pytest.mark.parametrize("layer,in_shape", [
    (MaxPool2d(2), (3, 7, 7)), (MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True), (2, 6, 5)),
    (AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 8, 9)), (AvgPool2d(5), (2, 5, 5)),
    (LocalResponseNorm(5), (6, 3, 3)), (Normalize([0.0, 1.0], [1.0, 2.0]), (2, 3, 3)),
    (ReLU(), (4, 2, 2)), (Flatten(), (2, 3, 4)), (Dropout(), (5,)), (Softmax(axis=1), (3, 2)),
])
def test_output_shape_matches_forward(layer, in_shape, rng):
    x = rng.standard_normal((2, *in_shape))
    assert layer(x).shape == (2, *layer.output_shape(in_shape))


def test_config_is_normalised():
    assert MaxPool2d(3).config() == {"kernel": [3, 3], "stride": [3, 3], "padding": [0, 0], "ceil_mode": False}
    assert AvgPool2d((2, 3), stride=1, padding=(1, 0)).config() == {
        "kernel": [2, 3], "stride": [1, 1], "padding": [1, 0], "ceil_mode": False, "count_include_pad": True}
    assert Dropout().config() == {"p": 0.5} and Softmax().config() == {"axis": -1}


# --- bad hyper-parameters and inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,err,words", [
    (lambda: MaxPool2d(0), ValueError, ["kernel"]),
    (lambda: MaxPool2d(3, stride=0), ValueError, ["stride"]),
    (lambda: MaxPool2d(3, padding=2), ValueError, ["padding"]),
    (lambda: MaxPool2d(3, ceil_mode="no"), TypeError, ["ceil_mode"]),
    (lambda: AvgPool2d(2, count_include_pad=0), TypeError, ["count_include_pad"]),
    (lambda: LocalResponseNorm(0), ValueError, ["size"]),
    (lambda: LocalResponseNorm(3, alpha=-1.0), ValueError, ["alpha"]),
    (lambda: LocalResponseNorm(3, beta=-1.0), ValueError, ["beta"]),
    (lambda: LocalResponseNorm(3, k=0), ValueError, ["k"]),
    (lambda: Normalize([0.0, 0.0], [1.0]), ValueError, ["mean", "std", "shape"]),
    (lambda: Normalize([0.0], [0.0]), ValueError, ["std", "> 0"]),
    (lambda: Normalize([np.nan], [1.0]), ValueError, ["mean", "finite"]),
    (lambda: Normalize([], []), ValueError, ["channel"]),
    (lambda: Normalize(np.zeros(2, np.int64), np.ones(2)), TypeError, ["mean", "int64"]),
    (lambda: Softmax(axis=0.5), TypeError, ["axis"]),
    (lambda: Dropout(1.0), ValueError, ["p"]),
    (lambda: Dropout("x"), TypeError, ["p"]),
])
def test_bad_hyper_parameters(make, err, words):
    with pytest.raises(err) as info:
        make()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_shapes_and_configs():
    with pytest.raises(ValueError, match="in_shape"):
        MaxPool2d(2).output_shape((7, 7))
    with pytest.raises(ValueError, match="kernel"):
        MaxPool2d(5).output_shape((1, 3, 3))
    with pytest.raises(ValueError, match="in_shape must have 2 channels"):
        Normalize([0.0, 0.0], [1.0, 1.0]).output_shape((3, 4, 4))
    with pytest.raises(ValueError, match="axis"):
        Softmax(axis=-2).output_shape((10,))
    with pytest.raises(ValueError, match="mean"):
        Normalize([0.0, 0.0], [1.0, 1.0])(np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match="takes no arrays"):
        ReLU.from_config({}, {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        Normalize.from_config({}, {"mean": np.zeros(2)})
    with pytest.raises(TypeError):
        MaxPool2d.from_config({"kernel": 2, "bogus": 1}, {})


def test_softmax_layer_refuses_the_batch_axis(rng):
    # docs/layers.md: the axis must not be the batch axis; a softmax over the batch mixes the samples
    with pytest.raises(ValueError, match="axis must not be 0, the batch axis"):
        Softmax(axis=0)
    with pytest.raises(ValueError, match="axis"):
        Softmax.from_config({"axis": 0}, {})
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"axis -2 of this Softmax layer is the batch axis of x \(shape \(2, 3\)\)"):
        Softmax(axis=-2)(x)
    # the same negative axis is a feature axis of a 3-D input
    y = Softmax(axis=-2)(x[:, :, None])
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y[:, :, 0], e / e.sum(axis=1, keepdims=True), rtol=1e-12)
