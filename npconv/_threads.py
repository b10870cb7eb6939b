"""Thread pools: numba's OpenMP workers and BLAS threads take turns on the same cores.

npconv alternates numba ``prange`` kernels (packing, pooling, LRN, factored-layer loops) with BLAS GEMMs. With
GNU OpenMP's default ACTIVE wait policy, numba's OpenMP workers keep spinning after each parallel region and
take the cores from the BLAS threads that run next: on 2 cores an im2col -> SGEMM -> scatter sequence measured
11.3 ms instead of 0.67 ms (2026-11-25, bench notes in docs/benchmarks.md). So, unless the user chose a policy,
npconv sets ``OMP_WAIT_POLICY=PASSIVE`` before numba first loads its OpenMP runtime. GNU OpenMP reads the
variable once, when it is loaded: a runtime loaded before npconv keeps its policy. Set
``NPCONV_KEEP_OMP_POLICY=1`` to leave the environment untouched.
"""
from __future__ import annotations

import os

__all__ = ["configure_openmp_wait_policy"]


def configure_openmp_wait_policy():
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set it (or NPCONV_KEEP_OMP_POLICY=1). Returns the policy."""
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") == "1":
        return os.environ.get("OMP_WAIT_POLICY")
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
