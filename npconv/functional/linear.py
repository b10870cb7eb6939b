"""Fully connected (dense) layer: ``y = x @ w.T + b``."""
from __future__ import annotations

import numpy as np

from .._backend import get_array_module
from .._validate import check_float_array, check_same_dtype

__all__ = ["linear"]


def linear(x, w, b=None):
    """Dense layer on ``x`` (N, in) with ``w`` (out, in) and optional ``b`` (out,); returns (N, out).

    One BLAS GEMM (cuBLAS for CuPy arrays). The dtype of ``x`` is kept; ``w`` and ``b`` must share it.
    """
    xp = get_array_module(x, w, b, names=("x", "w", "b"))
    check_float_array(x, "x", ndim=2)
    check_float_array(w, "w", ndim=2)
    check_same_dtype("x", x, w=w)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x must have {w.shape[1]} features to match w (shape {tuple(w.shape)}), "
                         f"got x.shape {tuple(x.shape)}")
    if b is not None:
        check_float_array(b, "b", ndim=1)
        check_same_dtype("x", x, b=b)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"b must have shape ({w.shape[0]},) to match w, got {tuple(b.shape)}")
    if xp is not np:
        from ..kernels.cuda import ops
        return ops.linear(x, w, b)
    y = np.matmul(x, w.T)
    if b is not None:
        y += b
    return y
