"""Thread pools: numba's OpenMP workers and OpenBLAS's threads take turns on the same cores.

npconv alternates numba ``prange`` kernels (packing, pooling, LRN, factored-layer loops) with BLAS GEMMs. A pool
that keeps its threads spinning after its work is done takes the cores from the pool that runs next:

* GNU OpenMP's default ACTIVE wait policy keeps numba's workers spinning after each parallel region: on 2 cores
  an im2col -> SGEMM -> scatter sequence measured 11.3 ms instead of 0.67 ms with ``OMP_WAIT_POLICY=PASSIVE``.
* OpenBLAS's workers spin for 2^28 cycles (about 0.1 s) after each GEMM before they sleep, against the numba
  kernel that runs next: a batch-64 convolution (im2col and GEMM per chunk) measured 6-15% faster on the
  ZF/AlexNet layers with ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles), the same GEMM speed otherwise
  (docs/benchmarks.md, 2026-11-25).

So, unless the user set them, npconv sets ``OMP_WAIT_POLICY=PASSIVE`` and ``OPENBLAS_THREAD_TIMEOUT=4`` at
import. Both runtimes read their variable once, when they are loaded: GNU OpenMP is loaded by numba on the first
parallel kernel (after npconv's import, so the policy always applies), but OpenBLAS is loaded by NumPy, so the
timeout applies only when npconv is imported before NumPy, or when it is exported in the shell. Set
``NPCONV_KEEP_OMP_POLICY=1`` to leave the environment untouched.
"""
from __future__ import annotations

import os

__all__ = ["configure_thread_env", "configure_openmp_wait_policy"]

#: OpenBLAS worker spin time after a GEMM, as log2 of CPU cycles (OpenBLAS's minimum; its default is 28)
OPENBLAS_TIMEOUT = "4"


def configure_openmp_wait_policy():
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set it (or NPCONV_KEEP_OMP_POLICY=1). Returns the policy."""
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") == "1":
        return os.environ.get("OMP_WAIT_POLICY")
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_thread_env():
    """Set both variables unless the user set them (or NPCONV_KEEP_OMP_POLICY=1).

    Returns ``{variable: value or None}`` as they stand afterwards.
    """
    configure_openmp_wait_policy()
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1":
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_TIMEOUT)
    return {v: os.environ.get(v) for v in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
