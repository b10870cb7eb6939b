"""Launch replay on a real GPU (``npconv/kernels/cuda/replay.py``): each layer whose GPU path is its own launches,
called at one shape with several inputs, records on the first call and replays on the others. The outputs match the
CPU path and, bit for bit, the ordinary GPU path (``out=``, never replayed); the emulated twin of this test, with
the cases where no replay is made, is ``tests/kernels/test_cuda_replay_emulated.py``."""
from __future__ import annotations

import numpy as np
import pytest

from npconv.kernels.cuda import replay
from npconv.layers import Conv2d
from npconv.layers.lowrank import LowRankConv2d, MonochromaticConv2d, SeparableConv2d

pytestmark = pytest.mark.gpu


def make(kind, rng, C=3, F=24):
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


@pytest.mark.parametrize("kind", ["direct", "depthwise", "monochromatic", "lowrank", "separable"])
def test_layers_replay_their_launches(cp, rng, dtype, kind):
    layer = make(kind, rng)
    shape = (1, 3, 37, 41)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    want = [layer(x) for x in xs]
    layer.to_gpu()
    tol = 5e-5 if dtype == np.float32 else 1e-11
    for i, (x, w) in enumerate(zip(xs, want)):
        xd = cp.asarray(x)
        got = layer(xd)
        assert type(layer._replays[shape]) is replay.Replay
        assert isinstance(got, cp.ndarray) and got.dtype == dtype and got.shape == w.shape
        np.testing.assert_allclose(cp.asnumpy(got), w, rtol=tol, atol=tol * 10, err_msg=f"call {i}")
        plain = cp.empty(got.shape, dtype=dtype)
        np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(layer(xd, out=plain)))
