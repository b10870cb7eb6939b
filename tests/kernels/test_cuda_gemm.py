"""npconv/kernels/cuda/_gemm.py without a GPU: the column-major GEMM arguments that ``gemm_plan`` derives for a
row-major ``A @ B`` are executed by a NumPy model of ``cublas<S|D>gemmStridedBatched`` (written from the cuBLAS
documentation: column-major operands of leading dimension ld, op N or T, batch strides) on the operands' raw
memory, and must give ``numpy.matmul``. This is the argument mapping used while a CUDA graph is recorded; the
call itself is checked on a device by tests/gpu/test_gpu_network.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from npconv.kernels.cuda import _gemm


def cublas_gemm_strided_batched(transa, transb, m, n, k, A, lda, stride_a, B, ldb, stride_b, C, ldc, stride_c, batch):
    """C_i = op(A_i) @ op(B_i) for i < batch, every matrix column-major in a flat buffer (element offsets)."""
    def colmajor(buf, off, rows, cols, ld):
        assert ld >= max(1, rows), "leading dimension below the rows of the stored matrix"
        return np.lib.stride_tricks.as_strided(buf[off:], shape=(rows, cols),
                                               strides=(buf.itemsize, ld * buf.itemsize))
    for i in range(batch):
        a = colmajor(A, i * stride_a, *((m, k) if transa == _gemm.OP_N else (k, m)), lda)
        b = colmajor(B, i * stride_b, *((k, n) if transb == _gemm.OP_N else (n, k)), ldb)
        a = a if transa == _gemm.OP_N else a.T
        b = b if transb == _gemm.OP_N else b.T
        c = colmajor(C, i * stride_c, m, n, ldc)
        c[...] = a.astype(np.float64) @ b.astype(np.float64)


def flat_view(view):
    """(the flat base buffer, the element offset of the view in it)."""
    base = view
    while base.base is not None:
        base = base.base
    off = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // view.itemsize
    return base.reshape(-1), off


def run_plan(a, b):
    plan = _gemm.gemm_plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    if plan is None:
        return None
    A, a_off = flat_view(b)    # cuBLAS's first operand is B (see the module docstring of _gemm)
    B, b_off = flat_view(a)
    shape = ((plan["batch"],) if max(a.ndim, b.ndim) == 3 else ()) + (a.shape[-2], b.shape[-1])
    out = np.full(shape, np.nan, dtype=a.dtype)
    p = plan
    cublas_gemm_strided_batched(p["transa"], p["transb"], p["m"], p["n"], p["k"], A[a_off:], p["lda"],
                                p["stride_a"], B[b_off:], p["ldb"], p["stride_b"], out.reshape(-1), p["ldc"],
                                p["stride_c"], p["batch"])
    return out


def _cases(rng, dtype):
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)
    big = r(9, 12)
    return {
        "contiguous": (r(5, 7), r(7, 4)),
        "b-transposed": (r(5, 7), r(4, 7).T),                       # x @ w.T (ops.linear)
        "a-transposed": (r(7, 5).T, r(7, 4)),
        "both-transposed": (r(7, 5).T, r(4, 7).T),
        "row-slices": (big[1:6, 2:9], big[:7, 3:7]),                # leading dimension 12 > columns
        "batched": (r(3, 5, 7), r(3, 7, 4)),                        # Winograd's 16 products
        "broadcast-a": (r(5, 7), r(3, 7, 4)),                       # w (F, C) @ x (N, C, HW)
        "broadcast-b": (r(3, 5, 7), r(7, 4)),
        "single-row": (r(1, 7), r(7, 4)),
        "single-column": (r(5, 7), r(7, 1)),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ["contiguous", "b-transposed", "a-transposed", "both-transposed", "row-slices",
                                  "batched", "broadcast-a", "broadcast-b", "single-row", "single-column"])
def test_plan_computes_the_row_major_product(rng, dtype, case):
    a, b = _cases(rng, dtype)[case]
    got = run_plan(a, b)
    assert got is not None, f"{case}: the plan asked for a copy of an operand that needs none"
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, np.matmul(a.astype(np.float64), b.astype(np.float64)), rtol=tol, atol=tol)


def test_operands_in_neither_order_need_a_copy(rng):
    a = rng.standard_normal((6, 8))[::2, ::2]                      # no unit stride on either axis
    assert _gemm.operand(a.shape, a.strides, a.itemsize) is None
    assert _gemm.gemm_plan(a.shape, a.strides, (4, 3), (24, 8), 8) is None


def test_shape_errors_name_the_operands():
    with pytest.raises(ValueError, match="inner dimensions"):
        _gemm.gemm_plan((5, 7), (56, 8), (6, 4), (32, 8), 8)
    with pytest.raises(ValueError, match="batch sizes"):
        _gemm.gemm_plan((3, 5, 7), (280, 56, 8), (2, 7, 4), (224, 32, 8), 8)


def test_outside_a_capture_it_is_cupy_matmul(monkeypatch, rng):
    """No capture on the current stream: the product is the array module's own matmul."""
    from cuda_emulator import fake_cupy

    import npconv._backend
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: fake_cupy)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    y = _gemm.matmul(fake_cupy.asarray(a), fake_cupy.asarray(b))
    assert isinstance(y, fake_cupy.ndarray)
    np.testing.assert_allclose(np.asarray(y), a @ b)
