"""npconv/kernels/cuda/_gemm.py on a real device: matrix products recorded in a CUDA graph (where CuPy refuses
cuBLAS and ``_gemm`` calls it through ctypes) and eager ones (the same direct call by default, ``cupy.matmul`` with
``EAGER_DIRECT`` off or for what the direct call does not take) equal ``cupy.matmul`` for every operand layout the
GPU path uses. The argument mapping itself is checked without a GPU in tests/kernels/test_cuda_gemm.py.

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


def _close(got, ref, dtype):
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def test_eager_matmul_calls_cublas_directly(cp, rng, dtype, monkeypatch):
    """Eager products take the direct call (cupy.matmul made to fail is never reached), with and without ``out``,
    on a stream of the caller's; they equal cupy.matmul's."""
    from npconv.kernels.cuda import _gemm
    pairs = _layouts(cp, rng, dtype)
    refs = [cp.asnumpy(cp.matmul(a, b)) for a, b in pairs]
    monkeypatch.setattr(_gemm, "EAGER_DIRECT", True)

    def refuse(*args, **kwargs):
        raise AssertionError("cupy.matmul called for an eager product the direct call takes")
    monkeypatch.setattr(cp, "matmul", refuse)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = [_gemm.matmul(a, b) for a, b in pairs]
        outs = [cp.full(ref.shape, np.nan, dtype=dtype) for ref in refs]
        into = [_gemm.matmul(a, b, out=o) for (a, b), o in zip(pairs, outs)]
        stream.synchronize()
    for g, i, o, ref in zip(got, into, outs, refs):
        assert i is o and g.dtype == dtype and g.flags.c_contiguous
        _close(cp.asnumpy(g), ref, dtype)
        _close(cp.asnumpy(o), ref, dtype)


def test_eager_matmul_falls_back_to_cupy(cp, rng, dtype, monkeypatch):
    """``EAGER_DIRECT`` off, or an operand pair the direct call does not take (mixed dtypes, an out that is not
    C-contiguous): cupy.matmul's result, bit for bit."""
    from npconv.kernels.cuda import _gemm
    for a, b in _layouts(cp, rng, dtype):
        with monkeypatch.context() as mp:
            mp.setattr(_gemm, "EAGER_DIRECT", False)
            np.testing.assert_array_equal(cp.asnumpy(_gemm.matmul(a, b)), cp.asnumpy(cp.matmul(a, b)))
    a, b = _layouts(cp, rng, dtype)[0]
    other = np.float64 if dtype == np.float32 else np.float32
    np.testing.assert_array_equal(cp.asnumpy(_gemm.matmul(a, b.astype(other))),
                                  cp.asnumpy(cp.matmul(a, b.astype(other))))
    out = cp.empty((2 * a.shape[0], b.shape[1]), dtype=dtype)[::2]     # rows of stride 2: not C-contiguous
    assert _gemm.matmul(a, b, out=out) is out
    np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(cp.matmul(a, b)))
