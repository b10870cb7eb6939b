"""The layers whose GPU calls replay (``npconv/kernels/cuda/replay.py``), one of each path, shared by the emulated
test (tests/kernels/test_cuda_replay_emulated.py) and the real-GPU one (tests/gpu/test_gpu_replay.py); and the ways
to call them and to run their ordinary path (which never replays) for comparison.
"""
from __future__ import annotations

import numpy as np
from bicluster_reference import make_factors

from npconv import functional as F
from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
from npconv.decompose.shared import SharedSeparableResult
from npconv.layers import AvgPool2d, Conv2d, Linear, LocalResponseNorm, MaxPool2d, Normalize, ReLU, Softmax
from npconv.layers.bicluster import BiclusterConv2d, SharedSeparableConv2d
from npconv.layers.lowrank import LowRankConv2d, LowRankLinear, MonochromaticConv2d, SeparableConv2d

#: one launch, nothing kept between calls (few input channels: the direct conv path)
KINDS = ["direct", "depthwise", "monochromatic", "lowrank", "separable"]
#: intermediates kept between calls (workspaces, GEMM results); more than ops.DIRECT_CONV_MAX_C input channels
WIDE = ["im2col", "winograd", "pointwise", "cp", "svd", "shared", "lowrank_linear"]
#: without parameters or with per-channel vectors (nothing kept), and the dense Linear (it keeps its weight's
#: transpose, a view: the last of the list)
SIMPLE = ["maxpool", "maxpool_relu", "avgpool", "lrn", "normalize", "relu", "softmax", "linear"]

RANKS = {"cp": 3, "svd": (2, 3), "shared": (3, 4)}


def make(kind, rng, *, C, F, k, hw):
    """A layer of ``kind`` for inputs (N, C, *hw), with k x k kernels (k x 1 and 1 x k for the separable form)."""
    if kind in ("cp", "svd", "shared"):
        f = make_factors(kind, rng, np.float64, C, F, k, k, (C - C // 2, C // 2), (F - F // 3, F // 3), RANKS[kind])
        geom = dict(stride=(2, 1), padding=(1, 0, 2, 1))
        if kind == "shared":
            return SharedSeparableConv2d(**dict(zip(SharedSeparableResult.FACTORS, f)), bias=rng.standard_normal(F),
                                         **geom)
        names = (BiclusterCPResult if kind == "cp" else BiclusterSVDResult).FACTORS
        return BiclusterConv2d(form=kind, **dict(zip(names, f)), bias=rng.standard_normal(F), **geom)
    if kind in ("im2col", "winograd"):          # winograd: with ops.WINOGRAD_MIN_TILES lowered by the test
        return Conv2d(rng.standard_normal((F, C, 3, 3)), rng.standard_normal(F), padding=1)
    if kind == "pointwise":                     # 1x1: one GEMM on the input as it is, then the bias
        return Conv2d(rng.standard_normal((F, C, 1, 1)), rng.standard_normal(F))
    if kind in ("maxpool", "maxpool_relu"):
        return MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    if kind == "avgpool":
        return AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False)
    if kind == "lrn":
        return LocalResponseNorm(3, alpha=1e-2, beta=0.75, k=2.0)
    if kind == "normalize":
        return Normalize(rng.standard_normal(C), 0.5 + rng.random(C))
    if kind == "relu":
        return ReLU()
    if kind in ("softmax", "softmax_axis1"):    # rows along the last axis: the kernel's output, reshaped
        return Softmax(axis=1 if kind == "softmax_axis1" else -1)
    if kind == "lowrank_linear":                # two GEMMs (the first's result kept) and the bias
        return LowRankLinear(rng.standard_normal((F, 4)), rng.standard_normal((4, C * hw[0] * hw[1])),
                             rng.standard_normal(F))
    if kind == "linear":                        # on a 4-D input, flattened: a reshape of it goes to the GEMM
        return Linear(rng.standard_normal((F, C * hw[0] * hw[1])), rng.standard_normal(F))
    if kind == "direct":                        # conv_direct: C <= ops.DIRECT_CONV_MAX_C
        return Conv2d(rng.standard_normal((F, C, k, k)), rng.standard_normal(F), stride=2, padding=1)
    if kind == "depthwise":
        return Conv2d(rng.standard_normal((2 * C, 1, 3, 3)), None, padding=(1, 0, 2, 1), groups=C)
    if kind == "monochromatic":
        return MonochromaticConv2d(rng.standard_normal((2, C)), rng.integers(0, 2, F), rng.standard_normal((F, k, k)),
                                   rng.standard_normal(F), stride=2, padding=1)
    if kind == "lowrank":
        return LowRankConv2d(rng.standard_normal((3, C, k, k)), rng.standard_normal((F, 3)), rng.standard_normal(F),
                             stride=1, padding=(1, 0, 2, 1))
    if kind == "separable":
        return SeparableConv2d(rng.standard_normal((4, C, k, 1)), rng.standard_normal((F, 4, 1, k)), None,
                               stride=(2, 1), padding=2)
    raise ValueError(f"kind must be one of {KINDS + WIDE + SIMPLE}, got {kind!r}")


def channels(kind):
    return 6 if kind in WIDE else 3


def table_of(kind, layer):
    """The replay table the calls of ``call`` use (MaxPool2d keeps one for relu=True)."""
    return layer._replays_relu if kind == "maxpool_relu" else layer._replays


def call(kind, layer, x, **kw):
    return layer(x, relu=True, **kw) if kind == "maxpool_relu" else layer(x, **kw)


def ordinary(cp, kind, layer, xd):
    """The layer's ordinary GPU path: ``out=`` (never replayed), or for Linear the functional API (which never
    replays)."""
    if kind == "linear":
        p = layer._params_for(xd)
        return F.linear(xd.reshape(xd.shape[0], -1), p["weight"], p["bias"])
    if kind == "lowrank_linear":
        p = layer._params_for(xd)
        return F.lowrank_linear(xd.reshape(xd.shape[0], -1), p["a"], p["b"], p["bias"])
    if kind == "normalize":
        mean, std, _ = layer._params_as(xd)
        return F.normalize(xd, mean=mean, std=std)
    if kind == "softmax":
        return F.softmax(xd, axis=layer.axis)
    out = cp.empty((xd.shape[0],) + tuple(layer.output_shape(tuple(xd.shape[1:]))), dtype=xd.dtype)
    return call(kind, layer, xd, out=out)
