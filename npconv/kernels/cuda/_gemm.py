"""Matrix products of the GPU path: ``cupy.matmul``, except while a CUDA graph is being recorded.

CuPy refuses every cuBLAS call during stream capture (its ``cublas.setStream`` raises ``NotImplementedError``,
CuPy 13 and 14), although cuBLAS itself supports capture. While the current stream is capturing
(``Network.cuda_graph``), :func:`matmul` therefore calls cuBLAS's strided-batched GEMM itself, through ctypes, on
CuPy's own cuBLAS handle and the capturing stream. Outside a capture it is ``cupy.matmul``: the same direct call
made eagerly through ctypes was measured on an H100 (twelfth session, docs/gpu_results.md) and was not faster, its
host time per call about that of ``cupy.matmul`` (ctypes converts every argument of every call).

Eager products through CuPy's Cython binding of cuBLAS (``cupy_backends.cuda.libs.cublas``) were tried as well
(thirteenth session) and timed on an H100 (fifteenth session): no faster than ``cupy.matmul`` either (ZF conv2-conv5
at batches 1-32, 0.96-1.0x queued, 0.71x for conv3 at batch 1), and were removed.

The captured product is row-major ``C = A @ B`` done the usual way on a column-major library: a row-major matrix
with leading dimension ``ld`` is the column-major transpose, so cuBLAS computes ``C^T = B^T A^T``. Each operand is
described by :func:`operand` (which of the two memory orders it has, its leading dimension and its batch stride);
an operand in neither order is copied to a contiguous array first.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ... import _backend
from . import replay

OP_N, OP_T = 0, 1          # cublasOperation_t
POINTER_MODE_HOST = 0      # cublasPointerMode_t

def matmul(a, b, out=None):
    """``cupy.matmul(a, b, out=out)`` for a (..., M, K) and b (..., K, N), 2-D or 3-D, also while a CUDA graph is
    being recorded on the current stream."""
    cp = _backend.require_cupy()
    stream = cp.cuda.get_current_stream()
    if stream.is_capturing():
        r = _captured_matmul(cp, a, b, out, stream)
    else:
        r = cp.matmul(a, b, out=out)
    replay.recording_matmul(a, b, r)
    return r


def operand(shape, strides, itemsize):
    """(op, ld, batch stride) in elements of a 2-D or 3-D operand as cuBLAS sees the row-major matrix, or None
    when its layout is neither row-major nor transposed (then it must be copied). ``op`` is OP_N for row-major
    rows (unit stride along the last axis), OP_T for a transposed view (unit stride along the rows)."""
    r, c = shape[-2], shape[-1]
    s_r, s_c = strides[-2] // itemsize, strides[-1] // itemsize
    batch = strides[0] // itemsize if len(shape) == 3 and shape[0] > 1 else 0
    if s_c == 1 or c == 1:
        ld = s_r if r > 1 else max(c, 1)
        return (OP_N, ld, batch) if ld >= max(c, 1) else None
    if s_r == 1 or r == 1:
        ld = s_c if c > 1 else max(r, 1)
        return (OP_T, ld, batch) if ld >= max(r, 1) else None
    return None


def gemm_plan(a_shape, a_strides, b_shape, b_strides, itemsize):
    """The arguments of one column-major strided-batched GEMM for row-major ``A @ B`` into a C-contiguous output:
    a dict with ``transa, transb, m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c, batch`` where cuBLAS's
    first operand is B (row-major B is column-major B^T) and its second is A; None if an operand needs a copy."""
    M, K = a_shape[-2], a_shape[-1]
    K2, N = b_shape[-2], b_shape[-1]
    if K != K2:
        raise ValueError(f"matmul: inner dimensions differ: a {tuple(a_shape)} @ b {tuple(b_shape)}")
    batch = max(a_shape[0] if len(a_shape) == 3 else 1, b_shape[0] if len(b_shape) == 3 else 1)
    for name, shape in (("a", a_shape), ("b", b_shape)):
        if len(shape) == 3 and shape[0] not in (1, batch):
            raise ValueError(f"matmul: batch sizes differ: a {tuple(a_shape)} @ b {tuple(b_shape)}")
    pa, pb = operand(a_shape, a_strides, itemsize), operand(b_shape, b_strides, itemsize)
    if pa is None or pb is None:
        return None
    return dict(transa=pb[0], transb=pa[0], m=N, n=M, k=K, lda=pb[1], ldb=pa[1], ldc=max(N, 1),
                stride_a=pb[2], stride_b=pa[2], stride_c=M * N, batch=batch)


def _operands(cp, a, b, out):
    """(a, b, out, plan) of one strided-batched GEMM for ``a @ b``: the operands (copied when in neither memory
    order), the output (checked, or allocated) and :func:`gemm_plan`'s arguments; plan None when nothing is left to
    compute (an empty output, or a zero inner dimension: then out is zero-filled)."""
    dt = np.dtype(a.dtype)
    if b.dtype != dt or dt not in (np.float32, np.float64):
        raise TypeError(f"matmul: a and b must both be float32 or float64, got {a.dtype} and {b.dtype}")
    if not (a.ndim in (2, 3) and b.ndim in (2, 3)):
        raise ValueError(f"matmul: 2-D or 3-D operands only, got a {a.shape} and b {b.shape}")
    plan = gemm_plan(a.shape, a.strides, b.shape, b.strides, dt.itemsize)
    if plan is None:
        a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
        plan = gemm_plan(a.shape, a.strides, b.shape, b.strides, dt.itemsize)
    shape = ((plan["batch"],) if max(a.ndim, b.ndim) == 3 else ()) + (a.shape[-2], b.shape[-1])
    if out is None:
        out = cp.empty(shape, dtype=dt)
    elif tuple(out.shape) != shape or out.dtype != dt or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be a C-contiguous {dt} array of shape {shape}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if out.size == 0:
        return a, b, out, None
    if a.shape[-1] == 0:
        out.fill(0)
        return a, b, out, None
    return a, b, out, plan


def _captured_matmul(cp, a, b, out, stream):
    a, b, out, plan = _operands(cp, a, b, out)
    if plan is None:
        return out
    dt = np.dtype(out.dtype)
    handle = ctypes.c_void_p(cp.cuda.device.get_cublas_handle())   # first: creating it loads libcublas
    lib = _cublas()
    scalar = ctypes.c_float if dt == np.float32 else ctypes.c_double
    one, zero = scalar(1), scalar(0)
    fn = lib.cublasSgemmStridedBatched if dt == np.float32 else lib.cublasDgemmStridedBatched
    mode = ctypes.c_int()
    _check(lib.cublasGetPointerMode_v2(handle, ctypes.byref(mode)), "cublasGetPointerMode")
    _check(lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
    _check(lib.cublasSetPointerMode_v2(handle, POINTER_MODE_HOST), "cublasSetPointerMode")
    try:
        p = plan
        _check(fn(handle, p["transa"], p["transb"], p["m"], p["n"], p["k"], ctypes.byref(one),
                  ctypes.c_void_p(b.data.ptr), p["lda"], ctypes.c_longlong(p["stride_a"]),
                  ctypes.c_void_p(a.data.ptr), p["ldb"], ctypes.c_longlong(p["stride_b"]), ctypes.byref(zero),
                  ctypes.c_void_p(out.data.ptr), p["ldc"], ctypes.c_longlong(p["stride_c"]), p["batch"]),
               "cublas gemm (strided batched)")
    finally:
        lib.cublasSetPointerMode_v2(handle, mode.value)
    return out


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


@functools.lru_cache(maxsize=1)
def _cublas():
    """The libcublas CuPy has loaded (found in this process's memory map), with the signatures used here."""
    path = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rsplit(None, 1)[-1]
            base = name.rsplit("/", 1)[-1]
            if base.startswith("libcublas.so"):
                path = name
                break
    if path is None:
        raise RuntimeError("recording cuBLAS calls in a CUDA graph needs the libcublas that CuPy loaded, and it "
                           "is not mapped in this process (no cuBLAS call ran before the recording?)")
    lib = ctypes.CDLL(path)
    vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    for name in ("cublasSgemmStridedBatched", "cublasDgemmStridedBatched"):
        f = getattr(lib, name)
        f.argtypes = [vp, i, i, i, i, i, vp, vp, i, ll, vp, i, ll, vp, vp, i, ll, i]
        f.restype = i
    lib.cublasSetStream_v2.argtypes, lib.cublasSetStream_v2.restype = [vp, vp], i
    lib.cublasGetPointerMode_v2.argtypes, lib.cublasGetPointerMode_v2.restype = [vp, ctypes.POINTER(i)], i
    lib.cublasSetPointerMode_v2.argtypes, lib.cublasSetPointerMode_v2.restype = [vp, i], i
    return lib


replay.watch(__name__)
