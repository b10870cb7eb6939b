"""npconv/kernels/cuda/_gemm.py on a real device: matrix products recorded in a CUDA graph (where CuPy refuses
cuBLAS and ``_gemm`` calls it through ctypes) equal ``cupy.matmul`` for every operand layout the GPU path uses;
outside a recording ``_gemm.matmul`` is ``cupy.matmul``. The argument mapping itself is checked without a GPU in
tests/kernels/test_cuda_gemm.py.

Skipped without a CUDA device; ``NPCONV_REQUIRE_GPU=1`` makes the skips failures.
"""
from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import need_stream_capture

pytestmark = pytest.mark.gpu


def _layouts(cp, rng, dtype):
    def r(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))
    big = r(9, 12)
    return [(r(5, 7), r(7, 4)), (r(5, 7), r(4, 7).T), (r(7, 5).T, r(7, 4)), (big[1:6, 2:9], big[:7, 3:7]),
            (r(3, 5, 7), r(3, 7, 4)), (r(5, 7), r(3, 7, 4)), (r(3, 5, 7), r(7, 4)), (r(6, 8)[::2, ::2], r(4, 3)),
            (r(384, 2304), r(2304, 169))]


def test_matmul_recorded_in_a_cuda_graph(cp, rng, dtype):
    need_stream_capture(cp)
    from npconv.kernels.cuda import _gemm
    pairs = _layouts(cp, rng, dtype)
    refs = [cp.asnumpy(cp.matmul(a, b)) for a, b in pairs]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        outs = [cp.empty(ref.shape, dtype=dtype) for ref in refs]
        stream.synchronize()
        stream.begin_capture()
        try:
            got = [_gemm.matmul(a, b, out=o) for (a, b), o in zip(pairs, outs)]
            fresh = _gemm.matmul(*pairs[4])                 # no out: allocated while recording
        finally:
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for g, o, ref in zip(got, outs, refs):
        assert g is o
        np.testing.assert_allclose(cp.asnumpy(g), ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))
    np.testing.assert_allclose(cp.asnumpy(fresh), refs[4], rtol=tol, atol=tol)


def test_matmul_outside_a_recording_is_cupy_matmul(cp, rng, dtype):
    from npconv.kernels.cuda import _gemm
    for a, b in _layouts(cp, rng, dtype):
        np.testing.assert_array_equal(cp.asnumpy(_gemm.matmul(a, b)), cp.asnumpy(cp.matmul(a, b)))
