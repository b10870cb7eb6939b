"""Launch replay on a real GPU (``npconv/kernels/cuda/replay.py``): each layer whose GPU path is launches and cuBLAS
products only, called at one shape with several inputs, records on the first call and replays on the others. The
outputs match the CPU path and the ordinary GPU path (``out=``, never replayed; to float rounding, though the same
kernels and products should agree bit for bit); the emulated twin of this test, with the cases where no replay is
made, is ``tests/kernels/test_cuda_replay_emulated.py``."""
from __future__ import annotations

import numpy as np
import pytest
from replay_cases import KINDS, SIMPLE, WIDE, call, make, ordinary, table_of

from npconv.kernels.cuda import ops, replay

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", KINDS + WIDE + SIMPLE)
def test_layers_replay_their_launches(cp, rng, dtype, kind, monkeypatch):
    C = 16 if kind in WIDE else 3
    shape = (1, C, 37, 41)
    layer = make(kind, rng, C=C, F=24, k=5, hw=shape[2:])
    if kind == "winograd":
        monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 0)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    want = [call(kind, layer, x) for x in xs]
    layer.to_gpu()
    tol = (5e-5 if dtype == np.float32 else 1e-11) * (4 if kind in WIDE else 1)
    for i, (x, w) in enumerate(zip(xs, want)):
        xd = cp.asarray(x)
        got = call(kind, layer, xd)
        assert type(table_of(kind, layer)[shape]) is replay.Replay
        assert isinstance(got, cp.ndarray) and got.dtype == dtype and got.shape == w.shape
        np.testing.assert_allclose(cp.asnumpy(got), w, rtol=tol, atol=tol * 10, err_msg=f"call {i}")
        ref = ordinary(cp, kind, layer, xd)
        r = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(cp.asnumpy(got), cp.asnumpy(ref), rtol=r, atol=r * float(np.abs(w).max()))
