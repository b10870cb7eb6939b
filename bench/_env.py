"""Benchmark environment: drop the OpenBLAS core-type override before NumPy loads, so BLAS runs the kernels
this CPU really supports (this workplace sets OPENBLAS_CORETYPE=Haswell for old OpenBLAS builds, which halves a
current OpenBLAS's SGEMM speed on AVX-512 machines). Tests and CI keep the variables; the bench/ scripts and the
main job (``python -m npconv``) drop them (``npconv._threads.drop_blas_overrides``), and they print what they did.
``--keep-blas-env`` keeps them.
"""
from __future__ import annotations

import functools
import os
import sys


@functools.lru_cache(maxsize=None)
def _threads_module():
    """npconv/_threads.py as a stand-alone module (it imports only ``os`` and ``sys``), loaded once."""
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
    threads = _threads_module()
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1":
        # npconv/_threads.py's settings, loaded from its file: importing the npconv package would load NumPy
        threads.configure_thread_env()
    if "--keep-blas-env" in argv:
        return "kept: " + ", ".join(f"{v}={os.environ[v]}" for v in threads.BLAS_OVERRIDES if v in os.environ)
    present = [v for v in threads.BLAS_OVERRIDES if v in os.environ]
    if not present:
        return "no OpenBLAS overrides set"
    if "numpy" in sys.modules:
        return "numpy already imported; overrides kept: " + ", ".join(present)
    threads.drop_blas_overrides([sys.executable, *argv])


def describe():
    dropped = os.environ.get(_threads_module().DROPPED_BLAS_ENV)
    base = f"dropped {dropped}" if dropped else "no OpenBLAS overrides dropped"
    return (f"{base}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; "
            f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}")
