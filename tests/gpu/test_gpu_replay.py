"""Launch replay on a real GPU (``npconv/kernels/cuda/replay.py``): each layer whose GPU path is launches and cuBLAS
products only, called at one shape with several inputs, records on the first call and replays on the others. The
outputs match the CPU path and the ordinary GPU path (``out=``, never replayed; to float rounding, though the same
kernels and products should agree bit for bit); the emulated twin of this test, with the cases where no replay is
made, is ``tests/kernels/test_cuda_replay_emulated.py``."""
from __future__ import annotations

import numpy as np
import pytest

from bicluster_reference import make_factors

from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
from npconv.decompose.shared import SharedSeparableResult
from npconv.kernels.cuda import ops, replay
from npconv import functional as F
from npconv.layers import AvgPool2d, Conv2d, Linear, LocalResponseNorm, MaxPool2d
from npconv.layers.bicluster import BiclusterConv2d, SharedSeparableConv2d
from npconv.layers.lowrank import LowRankConv2d, MonochromaticConv2d, SeparableConv2d

pytestmark = pytest.mark.gpu


RANKS = {"cp": 3, "svd": (2, 3), "shared": (3, 4)}


def make(kind, rng, C=3, F=24):
    if kind in ("cp", "svd", "shared"):
        f = make_factors(kind, rng, np.float64, C, F, 5, 5, (C - C // 2, C // 2), (F - F // 3, F // 3), RANKS[kind])
        if kind == "shared":
            return SharedSeparableConv2d(**dict(zip(SharedSeparableResult.FACTORS, f)), bias=rng.standard_normal(F),
                                         stride=2, padding=0)
        names = (BiclusterCPResult if kind == "cp" else BiclusterSVDResult).FACTORS
        return BiclusterConv2d(form=kind, **dict(zip(names, f)), bias=rng.standard_normal(F), stride=2, padding=0)
    if kind in ("im2col", "winograd"):
        return Conv2d(rng.standard_normal((F, C, 3, 3)), rng.standard_normal(F), padding=1)
    if kind == "pointwise":
        return Conv2d(rng.standard_normal((F, C, 1, 1)), rng.standard_normal(F))
    if kind in ("maxpool", "maxpool_relu"):
        return MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    if kind == "avgpool":
        return AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False)
    if kind == "lrn":
        return LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)
    if kind == "linear":
        return Linear(rng.standard_normal((F, C * 37 * 41)), rng.standard_normal(F))
    if kind == "direct":
        return Conv2d(rng.standard_normal((F, C, 7, 7)), rng.standard_normal(F), stride=2, padding=1)
    if kind == "depthwise":
        return Conv2d(rng.standard_normal((2 * C, 1, 3, 3)), None, padding=(1, 0, 2, 1), groups=C)
    if kind == "monochromatic":
        return MonochromaticConv2d(rng.standard_normal((4, C)), rng.integers(0, 4, F), rng.standard_normal((F, 7, 7)),
                                   rng.standard_normal(F), stride=2, padding=1)
    if kind == "lowrank":
        return LowRankConv2d(rng.standard_normal((8, C, 7, 7)), rng.standard_normal((F, 8)), rng.standard_normal(F),
                             stride=2, padding=1)
    return SeparableConv2d(rng.standard_normal((4, C, 7, 1)), rng.standard_normal((F, 4, 1, 7)), None,
                           stride=2, padding=1)


WIDE = ("im2col", "winograd", "pointwise", "cp", "svd", "shared")
SIMPLE = ("maxpool", "maxpool_relu", "avgpool", "lrn", "linear")


def call(kind, layer, x, **kw):
    return layer(x, relu=True, **kw) if kind == "maxpool_relu" else layer(x, **kw)


def plain(cp, kind, layer, xd, shape):
    """The ordinary GPU path: ``out=`` (never replayed), or for Linear the functional API (which never replays)."""
    if kind == "linear":
        p = layer._params_for(xd)
        return F.linear(xd.reshape(xd.shape[0], -1), p["weight"], p["bias"])
    return call(kind, layer, xd, out=cp.empty(shape, dtype=xd.dtype))


@pytest.mark.parametrize("kind", ["direct", "depthwise", "monochromatic", "lowrank", "separable"] + list(WIDE)
                         + list(SIMPLE))
def test_layers_replay_their_launches(cp, rng, dtype, kind, monkeypatch):
    C = 16 if kind in WIDE else 3
    layer = make(kind, rng, C=C)
    if kind == "winograd":
        monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 0)
    shape = (1, C, 37, 41)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    want = [call(kind, layer, x) for x in xs]
    layer.to_gpu()
    table = layer._replays_relu if kind == "maxpool_relu" else layer._replays
    tol = (5e-5 if dtype == np.float32 else 1e-11) * (4 if kind in WIDE else 1)
    for i, (x, w) in enumerate(zip(xs, want)):
        xd = cp.asarray(x)
        got = call(kind, layer, xd)
        assert type(table[shape]) is replay.Replay
        assert isinstance(got, cp.ndarray) and got.dtype == dtype and got.shape == w.shape
        np.testing.assert_allclose(cp.asnumpy(got), w, rtol=tol, atol=tol * 10, err_msg=f"call {i}")
        ref = plain(cp, kind, layer, xd, got.shape)
        r = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(cp.asnumpy(got), cp.asnumpy(ref), rtol=r, atol=r * float(np.abs(w).max()))
