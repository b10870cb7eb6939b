"""Thread pools: numba's OpenMP workers and OpenBLAS's threads take turns on the same cores.

npconv alternates numba ``prange`` kernels (packing, pooling, LRN, factored-layer loops) with BLAS GEMMs. A pool
that keeps its threads spinning after its work is done takes the cores from the pool that runs next, and a pool
whose threads sleep at once pays a wake-up at every parallel region:

* GNU OpenMP's default keeps numba's workers spinning (300,000 spins) after each parallel region: on 2 cores an
  im2col -> SGEMM -> scatter sequence measured 11.3 ms instead of 0.67 ms with ``OMP_WAIT_POLICY=PASSIVE``.
* PASSIVE puts them to sleep at once, and waking them costs 32-51 us per parallel region (1.2 us while they still
  spin): at batch 1, where a layer is a few hundred microseconds, that was 10-15% of a factored layer. A short
  spin, ``GOMP_SPINCOUNT=1000``, keeps both benefits: the workers are still awake for the next region of the same
  layer, and asleep before a GEMM needs the cores. Measured against PASSIVE (2026-11-26, 2 cores, interleaved
  processes): biclustered CP conv2 at batch 1 0.61-0.75 -> 0.54-0.56 ms, the approximated ZF network at batch 1
  5.5-5.9 -> 4.7-5.1 ms, dense ZF at batch 1 12.6-13.8 -> 12.1-12.4 ms; at batch 128 unchanged. Longer spins
  (10,000 and 100,000) were slower, up to 1.4x on the dense ZF network, as the spinning took the GEMMs' cores.
* OpenBLAS's workers spin for 2^28 cycles (about 0.1 s) after each GEMM before they sleep, against the numba
  kernel that runs next: a batch-64 convolution (im2col and GEMM per chunk) measured 6-15% faster on the
  ZF/AlexNet layers with ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles), the same GEMM speed otherwise
  (docs/benchmarks.md, 2026-11-25).

So, unless the user set them, npconv sets at import: ``GOMP_SPINCOUNT=1000`` (GNU OpenMP, numba's usual layer),
``KMP_BLOCKTIME=0`` (LLVM/Intel OpenMP, if numba uses that one instead: sleep at once, as PASSIVE did) and
``OPENBLAS_THREAD_TIMEOUT=4``. A user who set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps the OpenMP
settings as they are. The runtimes read their variables once, when they are loaded: GNU OpenMP is loaded by numba
on the first parallel kernel (after npconv's import, so the setting always applies), but OpenBLAS is loaded by
NumPy, so the timeout applies only when npconv is imported before NumPy, or when it is exported in the shell. Set
``NPCONV_KEEP_OMP_POLICY=1`` to leave the environment untouched.
"""
from __future__ import annotations

import os
import sys

__all__ = ["configure_thread_env", "configure_openmp_wait_policy", "BLAS_OVERRIDES", "DROPPED_BLAS_ENV",
           "drop_blas_overrides", "blas_env_note"]

#: variables that pin OpenBLAS to another core's kernels or cache size. Some workplaces set
#: ``OPENBLAS_CORETYPE=Haswell`` for old OpenBLAS builds; on an AVX-512 CPU it halves a current OpenBLAS's SGEMM
#: speed (433 against about 200 GFLOP/s on the 2-core development machine), which makes every GEMM-bound dense
#: layer, and so every speedup measured against it, unrepresentative.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: set in the re-executed process: ``NAME=value`` pairs of the overrides that were dropped
DROPPED_BLAS_ENV = "NPCONV_DROPPED_BLAS_ENV"

#: OpenBLAS worker spin time after a GEMM, as log2 of CPU cycles (OpenBLAS's minimum; its default is 28)
OPENBLAS_TIMEOUT = "4"
#: GNU OpenMP spins before a worker sleeps (its default is 300,000; PASSIVE means 0)
GOMP_SPINS = "1000"


def configure_openmp_wait_policy():
    """Set ``GOMP_SPINCOUNT=1000`` and ``KMP_BLOCKTIME=0`` unless the user set ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` (or ``NPCONV_KEEP_OMP_POLICY=1``). Returns ``{variable: value or None}`` afterwards."""
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1" and not (
            "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ):
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINS
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    return {v: os.environ.get(v) for v in names}


def configure_thread_env():
    """Apply the OpenMP settings above and ``OPENBLAS_THREAD_TIMEOUT=4`` unless the user set them (or
    ``NPCONV_KEEP_OMP_POLICY=1``).

    Returns ``{variable: value or None}`` as they stand afterwards.
    """
    out = configure_openmp_wait_policy()
    if os.environ.get("NPCONV_KEEP_OMP_POLICY") != "1":
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_TIMEOUT)
    out["OPENBLAS_THREAD_TIMEOUT"] = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    return out


def drop_blas_overrides(command):
    """Replace this process by ``command`` (a list: the executable, then its arguments) run without the
    variables of :data:`BLAS_OVERRIDES`, when any of them is set; the new process finds what was dropped in
    ``$NPCONV_DROPPED_BLAS_ENV`` (:func:`blas_env_note`). OpenBLAS reads them once, when it is loaded, so only a
    new process can drop them. Returns None when none is set (nothing to do); otherwise does not return."""
    present = [v for v in BLAS_OVERRIDES if v in os.environ]
    if not present:
        return None
    env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
    env[DROPPED_BLAS_ENV] = ",".join(f"{v}={os.environ[v]}" for v in present)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], list(command), env)


def blas_env_note():
    """One line on the OpenBLAS overrides: dropped (by :func:`drop_blas_overrides`), kept, or none set."""
    dropped = os.environ.get(DROPPED_BLAS_ENV)
    if dropped:
        return f"dropped {dropped} (BLAS on this CPU's own kernels)"
    kept = [f"{v}={os.environ[v]}" for v in BLAS_OVERRIDES if v in os.environ]
    if kept:
        return "kept " + ", ".join(kept)
    return "no OpenBLAS overrides set"
