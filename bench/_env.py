"""Benchmark environment: drop the OpenBLAS core-type override before NumPy loads, so BLAS runs the kernels
this CPU really supports (this workplace sets OPENBLAS_CORETYPE=Haswell for old OpenBLAS builds, which halves a
current OpenBLAS's SGEMM speed on AVX-512 machines). Tests and CI keep the variables; only bench/ scripts drop
them, and they print what they did. ``--keep-blas-env`` keeps them.
"""
from __future__ import annotations

import os
import sys

_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def clean_blas_env(argv=None):
    """Re-exec the current script without the OpenBLAS overrides (once). Call before importing NumPy.

    Also applies npconv's thread settings (``OMP_WAIT_POLICY=PASSIVE`` and ``OPENBLAS_THREAD_TIMEOUT=4`` unless
    set, see npconv/_threads.py) from the start of the process: the harness queries numba's threading layer and
    imports NumPy before npconv is imported, and both runtimes read their variable only when they are loaded.
    PyTorch's own OpenMP runtime then runs with the same policy.
    """
    argv = sys.argv if argv is None else argv
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1":
        # the values of npconv/_threads.py (importing npconv here would load NumPy first)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if "--keep-blas-env" in argv:
        return "kept: " + ", ".join(f"{v}={os.environ[v]}" for v in _VARS if v in os.environ)
    present = [v for v in _VARS if v in os.environ]
    if not present:
        return "no OpenBLAS overrides set"
    if "numpy" in sys.modules:
        return "numpy already imported; overrides kept: " + ", ".join(present)
    env = {k: v for k, v in os.environ.items() if k not in _VARS}
    env["NPCONV_BENCH_DROPPED_BLAS_ENV"] = ",".join(f"{v}={os.environ[v]}" for v in present)
    os.execve(sys.executable, [sys.executable, *argv], env)


def describe():
    dropped = os.environ.get("NPCONV_BENCH_DROPPED_BLAS_ENV")
    base = f"dropped {dropped}" if dropped else "no OpenBLAS overrides dropped"
    return (f"{base}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
            f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}")
