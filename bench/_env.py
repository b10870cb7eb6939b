"""Benchmark environment: drop the OpenBLAS core-type override before NumPy loads, so BLAS runs the kernels
this CPU really supports (this workplace sets OPENBLAS_CORETYPE=Haswell for old OpenBLAS builds, which halves a
current OpenBLAS's SGEMM speed on AVX-512 machines). Tests and CI keep the variables; only bench/ scripts drop
them, and they print what they did. ``--keep-blas-env`` keeps them.
"""
from __future__ import annotations

import os
import sys

_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _threads_module():
    """npconv/_threads.py as a stand-alone module (it imports only ``os``)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npconv", "_threads.py")
    spec = importlib.util.spec_from_file_location("_npconv_threads_for_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def clean_blas_env(argv=None):
    """Re-exec the current script without the OpenBLAS overrides (once). Call before importing NumPy.

    Also applies npconv's thread settings (``GOMP_SPINCOUNT=1000``, ``KMP_BLOCKTIME=0`` and
    ``OPENBLAS_THREAD_TIMEOUT=4`` unless set, see npconv/_threads.py) from the start of the process: the harness
    queries numba's threading layer and imports NumPy before npconv is imported, and the runtimes read their
    variables only when they are loaded. PyTorch's own OpenMP runtime then runs with the same settings.
    """
    argv = sys.argv if argv is None else argv
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1":
        # npconv/_threads.py's settings, loaded from its file: importing the npconv package would load NumPy
        _threads_module().configure_thread_env()
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
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; "
            f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}")
