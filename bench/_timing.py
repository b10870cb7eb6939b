"""Timing helpers shared by every bench/ script: warm-up, repeated runs, median and spread."""
from __future__ import annotations

import os
import statistics
import time

__all__ = ["measure", "thread_info", "peak_rss_mb"]


def measure(fn, *, warmup=1, repeat=5, min_time=0.0, sync=None):
    """Run ``fn()`` ``warmup`` times, then ``repeat`` times (more while the total is under ``min_time`` s).

    ``sync`` is called after each run before the clock stops (e.g. a CUDA synchronize).
    Returns a dict: median, min, max, p25, p75 (seconds) and n.
    """
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    t_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_all < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return dict(median=statistics.median(times), min=times[0], max=times[-1], p25=q[0], p75=q[2], n=len(times))


def thread_info():
    """Thread counts and the BLAS / threading layers in use (threadpoolctl when installed)."""
    info = {"cpu_count": os.cpu_count()}
    try:
        import numba
        info["numba_threads"] = numba.get_num_threads()
        info["numba_threading_layer"] = _numba_layer()
    except Exception as exc:  # numba is a hard dependency, but keep the bench alive
        info["numba_error"] = repr(exc)
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer",
                                                "architecture")} for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    return info


def _numba_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        @numba.njit(parallel=True)
        def _touch(n):
            s = 0
            for i in numba.prange(n):
                s += i
            return s
        _touch(4)
        return numba.threading_layer()


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
