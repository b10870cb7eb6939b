"""Measurement primitives shared by every bench/ script.

- ``measure``: warm-up, repeated runs, median and spread of one callable;
- ``thread_limit``: a scoped BLAS / OpenMP / numba (and PyTorch, when imported) thread limit;
- ``thread_info``, ``machine_info``: what the numbers were measured on (CPU, cores, BLAS and its threading
  layer, numba's threading layer, versions, date);
- ``gemm_peak``: the machine's practical peak, a large GEMM timed in the same run (NumPy on the CPU,
  CuPy on the GPU);
- ``peak_rss_mb``, ``reset_peak_rss``: this process's peak resident memory, and a reset of it where Linux allows.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["measure", "thread_info", "peak_rss_mb", "reset_peak_rss", "thread_limit", "machine_info", "gemm_peak",
           "cpu_model", "cpu_target", "cache_sizes", "cpu_line"]


def measure(fn, *, warmup=1, repeat=5, min_time=0.0, sync=None, max_repeat=1000):
    """Run ``fn()`` ``warmup`` times, then ``repeat`` times (more while the total is under ``min_time`` s,
    up to ``max_repeat`` runs).

    ``sync`` is called after each run before the clock stops (e.g. a CUDA synchronize).
    Returns a dict: median, min, max, p25, p75 (seconds) and n.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    t_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_all < min_time and len(times) < max_repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    # "inclusive" keeps the quartiles inside [min, max] even for two or three samples
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return dict(median=statistics.median(times), min=times[0], max=times[-1], p25=q[0], p75=q[2], n=len(times))


def interleaved(fns, repeat, min_time=0.0, clock=time.perf_counter, block=3, max_calls=300, warm=0.01):
    """Median and min time of each callable of ``fns`` (a dict). Calls come in blocks of ``block`` consecutive
    timed calls of one callable, and the blocks of the callables alternate, so all see the same machine state over
    the run (on the development VM a layer timed minutes apart from its baseline drifted by up to 25%). Before each
    block the callable runs untimed for ``warm`` seconds (at least one call), so that a block is timed as the
    callable runs on its own, in a loop. Each callable runs ``repeat`` times at least, more while under
    ``min_time`` seconds (up to ``max_calls`` timed calls).

    Why ``warm`` is a time, not a call: on the 2-core Zen 5 VM a layer called right after another one runs slower for
    its next 2-3 ms, not for one call. ZF conv2's biclustered CP layer (K = 6) at batch 1, 0.36 ms a call in a loop,
    took 0.60 / 0.46 / 0.39 / 0.40 / 0.37 ms in its first five calls after four calls of the dense layer, and 0.62 /
    0.49 / 0.45 / 0.42 / 0.41 ms after 7 ms of scalar arithmetic on both threads, which touches no memory: not (only)
    the caches (twenty-eighth session, docs/benchmarks.md). With one untimed call a block (until that session), the
    faster callable's median took more of that ramp than the slower one's: CP K = 6 against the dense layer 4.2-4.7x
    with one call, 4.8x with 2, 5, 10 and 20 ms (a 1.75 ms dense call is warm after its first).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if not warm >= 0:
        raise ValueError(f"warm must be a time >= 0 in seconds, got {warm!r}")
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    t0 = time.perf_counter()
    while min(len(v) for v in times.values()) < repeat or (time.perf_counter() - t0 < min_time and
                                                           min(len(v) for v in times.values()) < max_calls):
        for k, f in fns.items():
            tw = time.perf_counter()
            f()                                    # re-warm after the other callable's block
            while time.perf_counter() - tw < warm:
                f()
            for _ in range(block):
                t = clock()
                f()
                times[k].append(clock() - t)
    return {k: dict(median=statistics.median(v), min=min(v), n=len(v)) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ threads
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
        info["blas"] = [{k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                                "threading_layer", "architecture")} for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
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


@contextlib.contextmanager
def thread_limit(n):
    """Limit BLAS/OpenMP pools (threadpoolctl), numba and an imported PyTorch to ``n`` threads, then restore.

    ``None`` leaves everything as it is. The limit is scoped: nothing is changed globally afterwards.
    """
    if n is None:
        yield
        return
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError as exc:
            raise ImportError("a thread limit needs threadpoolctl: pip install 'npconv[bench]'") from exc
        stack.enter_context(threadpool_limits(limits=n))
        import numba
        old_nb = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        stack.callback(numba.set_num_threads, old_nb)
        torch = sys.modules.get("torch")
        if torch is not None:
            old_t = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, old_t)
        yield


# ------------------------------------------------------------------------------------------------ machine
def _vm_hwm_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb():
    """Peak resident set size of this process, in MiB.

    On Linux this is ``VmHWM`` (the high-water mark of this process's own memory; ``reset_peak_rss`` can lower
    it). Elsewhere it is ``ru_maxrss``, which never goes down and, on Linux, would even include the parent's
    memory copied at fork time, so it is only the fallback.
    """
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm / 1024.0
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def reset_peak_rss():
    """Reset ``peak_rss_mb`` to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); False if impossible."""
    if _vm_hwm_kib() is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except Exception:
            pass
    return platform.processor() or platform.machine()


def cpu_target():
    """The CPU that numba compiles npconv's kernels for, by LLVM's name (``znver4``, ``skylake-avx512``, ...), or
    None. Two cloud machines with the same model name ("AMD EPYC") can be different cores: the benchmark pages of
    docs/ were measured on a Zen 5 and on a Zen 4 class VM, whose AVX-512 speeds differ by a factor of two."""
    try:
        import numba
        name = numba.config.CPU_NAME
        if name and name != "host":
            return name
        import llvmlite.binding as llb
        return llb.get_host_cpu_name()
    except Exception:
        return None


def cache_sizes(root="/sys/devices/system/cpu/cpu0/cache"):
    """The first CPU's data and unified caches from sysfs (Linux), e.g. ``{"L1d": "32K", "L2": "1024K", "L3":
    "32768K"}``; {} where sysfs does not say."""
    out = {}
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            level, kind, size = (Path(root, entry, name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return out


def cpu_line():
    """One line for a benchmark's header: the model name, numba's target CPU and the caches."""
    parts = [f"LLVM target {cpu_target() or 'unknown'}"]
    caches = cache_sizes()
    if caches:
        parts.append(", ".join(f"{k} {v}" for k, v in caches.items()))
    return f"{cpu_model()} ({'; '.join(parts)})"


def _version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit():
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _gpu_info():
    """GPU name and memory, only when the run already imported CuPy (importing it here would be slow)."""
    cp = sys.modules.get("cupy")
    if cp is None:
        return None
    try:
        if not cp.is_available():
            return None
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return {"name": name, "memory_gb": round(props["totalGlobalMem"] / 1e9, 1),
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "driver": cp.cuda.runtime.driverGetVersion()}
    except Exception as exc:
        return {"error": repr(exc)}


_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
             "NUMBA_THREADING_LAYER", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPCONV_DROPPED_BLAS_ENV",
             "CUDA_VISIBLE_DEVICES", "CUPY_TF32")


def machine_info():
    """A JSON-serialisable description of the machine and software the numbers were measured with."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_target": cpu_target(),
        "caches": cache_sizes(),
        "cores_logical": os.cpu_count(),
        "cores_physical": None,
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("npconv", "numpy", "scipy", "numba", "torch", "cupy-cuda13x",
                                              "cupy-cuda12x", "threadpoolctl", "matplotlib", "psutil")},
        "threads": thread_info(),
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "git_commit": _git_commit(),
        "gpu": _gpu_info(),
    }
    try:
        import psutil
        info["cores_physical"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ peak
def gemm_peak(*, device="cpu", dtype="float32", n=2048, repeat=5):
    """GFLOP/s of an ``n x n`` GEMM, the machine's practical peak for ``dtype`` on ``device``.

    NumPy ``matmul`` into a preallocated output on the CPU, CuPy on the GPU (synchronised). Returns a dict:
    ``gflops`` (from the fastest run: the peak), ``gflops_median`` (from the median run), n, dtype, device,
    what.
    """
    import numpy as np
    if device == "gpu":
        import cupy as xp
        sync = xp.cuda.Device().synchronize
    elif device == "cpu":
        xp, sync = np, None
    else:
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    c = xp.empty((n, n), dtype=dtype)
    t = measure(lambda: xp.matmul(a, b, out=c), warmup=1, repeat=repeat, sync=sync)
    flops = 2.0 * n ** 3
    return {"gflops": flops / t["min"] / 1e9, "gflops_median": flops / t["median"] / 1e9, "n": n,
            "dtype": str(np.dtype(dtype)), "device": device,
            "what": f"{'cupy' if device == 'gpu' else 'numpy'}.matmul {np.dtype(dtype)} {n}x{n}x{n}"}
