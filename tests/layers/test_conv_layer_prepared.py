"""The dense Conv2d layer keeps its weights packed for the CPU GEMM micro-kernel in its per-dtype parameter cache;
replaced parameters (then ``_sync_params``) are seen by the next call."""
from __future__ import annotations

import numpy as np
import pytest

from npconv.functional import conv as conv_module
from npconv.layers import Conv2d
from tests.reference import conv2d_einsum, tolerance


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_layer_packed_weights_follow_replaced_params(rng, monkeypatch, dtype):
    monkeypatch.setattr(conv_module, "USE_MICROKERNEL", True)
    w = rng.standard_normal((14, 6, 5, 5))
    b = rng.standard_normal(14)
    layer = Conv2d(w, b, stride=2, padding=1)
    x = rng.standard_normal((2, 6, 17, 15)).astype(dtype)
    np.testing.assert_allclose(layer(x), conv2d_einsum(x, w, b, (2, 2), (1, 1, 1, 1)), *tolerance(dtype))
    if conv_module._tile(np.dtype(dtype)) is not None:
        assert any(isinstance(k, tuple) for k in layer._params_for(x)), "nothing was kept"
    layer.params["weight"] = -2 * w
    layer._sync_params()
    np.testing.assert_allclose(layer(x), conv2d_einsum(x, -2 * w, b, (2, 2), (1, 1, 1, 1)), *tolerance(dtype))


@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_conv_layer_winograd_gemms_both_ways(rng, monkeypatch, microkernel):
    """A layer on the Winograd path runs its 16 GEMMs on the micro-kernel (packed transformed weights kept per
    dtype) or as one BLAS batched product; both give the convolution, and replaced weights are seen."""
    from npconv.functional import _winograd as WG
    monkeypatch.setattr(WG, "USE_MICROKERNEL", microkernel)
    w = rng.standard_normal((40, 32, 3, 3)) * 0.1
    b = rng.standard_normal(40)
    layer = Conv2d(w, b, padding=1)
    x = rng.standard_normal((4, 32, 15, 16)).astype(np.float32)
    assert conv_module.auto_algorithm(x.shape, w.shape, (1, 1), (1, 1), 1, (15, 16)) == "winograd"
    for weight in (w, -w):
        layer.params["weight"] = weight
        layer._sync_params()
        ref = conv2d_einsum(x, weight, b, (1, 1), (1, 1, 1, 1))
        np.testing.assert_allclose(layer(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
