"""npconv's own host time per eager GPU call, measured without a GPU.

    python bench/gpu_host_overhead.py [--calls 300] [--profile] [--out FILE.json]

At batch 1 an eager GPU call is bound by the host (docs/gpu_results.md: a 0.2 ms ZF conv2 call runs 45 us of
kernels), and part of that host time is npconv's own Python: argument checks, shapes, launch packing. This script
measures that part on any machine: it runs the GPU code path on the CuPy stand-in of the tests
(``tests/cuda_emulator/as_cupy``) with every kernel launch, matrix product and in-place ReLU made a no-op and
``empty`` left unfilled, so what remains is npconv's Python plus the stand-in's cheap NumPy calls. CuPy's own costs
(its launch, its cuBLAS call, its allocator) are not in it; ``bench/gpu_profile.py host`` measures the whole on a
GPU.

Workloads at batch 1, ZF shapes: the dense conv2 through ``npconv.functional.conv2d`` and as the ``Conv2d`` layer
(which replays its recorded launches from its second call on: ``kernels/cuda/replay.py``), the biclustered CP conv2
layer (G=48, H=2, K=8), the biclustered SVD conv2 layer (G=H=2, (19, 51)) as it runs (``bic_reduce``) and with its gather
and reductions as ``bic_gather`` and a GEMM a group (``svd_layer_gather_gemms``), the shared separable conv2 layer
(G=48, H=2, K=6, S=4), the dense conv1 (function and layer), its monochromatic (C'=6), low-rank (rank 8) and
separable (rank 4) layers,
and the whole dense ZF network's ``forward``; then the dense ZF conv2 at batch 8 and conv3 at batches 8 and 32 as
``Conv2d`` layers, where the workspaces of conv2 at 8 (im2col, 56 MB) and conv3 at 32 (Winograd) exceed what a
replay may keep (``replay.MAX_HELD_BYTES``), so those calls take the whole Python path every time. Prints
the best of five runs of ``--calls`` calls (microseconds per call), and with ``--profile`` cProfile's 12 functions
with the most own time per workload.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (_ROOT, _ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402


@contextlib.contextmanager
def no_op_cupy():
    """The tests' CuPy stand-in as npconv's CuPy (``cuda_emulator.install_as_cupy``), with kernel launches, matrix
    products and in-place ReLUs that do nothing and an ``empty`` that does not fill; everything restored on exit."""
    import pytest

    from cuda_emulator import install_as_cupy
    from npconv.kernels.cuda import _gemm, loader, ops, ops_bicluster, ops_lowrank

    with pytest.MonkeyPatch.context() as mp:
        fake = install_as_cupy(mp)

        def empty(shape, dtype=np.float64):
            return np.empty(shape, dtype).view(fake.ndarray)

        def matmul(a, b, out=None):
            if out is not None:
                return out
            return empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), a.dtype)

        def no_launch(grid, block, args, shared_mem=0):
            return None

        def maximum(a, b, out=None):      # the in-place ReLUs of the CuPy path: device work, not host work
            return out if out is not None else empty(np.shape(a), np.result_type(a))

        mp.setattr(fake, "empty", empty)
        mp.setattr(fake, "maximum", maximum, raising=False)
        mp.setattr(loader, "get_kernel", lambda source, name, dtype: no_launch)
        for mod in (_gemm, ops, ops_bicluster, ops_lowrank):
            mp.setattr(mod, "matmul" if mod is _gemm else "_matmul", matmul)
        try:
            yield fake
        finally:
            loader.clear_cache()


def workloads(fake, quick=False):
    """name -> zero-argument callable, on the stand-in's "device" arrays (``quick``: small shapes), or (callable,
    {``ops_bicluster`` rule: value}) to time with those rules set."""
    from bench.bench_gpu_bicluster import ZF_CONV2, dense_callable, factored_callable
    from bench.bench_gpu_lowrank import ZF_CONV1
    from bench.bench_gpu_lowrank import factored_callable as lowrank_callable
    from bench.zf_net import zf_net
    from npconv.functional import conv2d
    conv2, conv1 = ((8, 11, 16, 5, 2, 0), (3, 15, 16, 3, 2, 1)) if quick else (ZF_CONV2, ZF_CONV1)
    C, H, F, K, s, p = conv2
    rng = np.random.default_rng(0)
    x = fake.asarray(rng.standard_normal((1, C, H, H)).astype(np.float32))
    w = fake.asarray(rng.standard_normal((F, C, K, K)).astype(np.float32))
    b = fake.asarray(rng.standard_normal(F).astype(np.float32))
    if quick:
        from bench.bench_network import QUICK_ZF
        net = zf_net(seed=0, **QUICK_ZF).to_gpu()
    else:
        net = zf_net(seed=0).to_gpu()
    size = net.input_shape[1]
    xn = fake.asarray(rng.standard_normal((1, 3, size, size)).astype(np.float32))
    svd = factored_callable("svd", (2, 2, (2, 3)) if quick else (2, 2, (19, 51)), 1, conv2, np.float32)
    C1, H1, F1, K1, s1, p1 = conv1
    x1 = fake.asarray(rng.standard_normal((1, C1, H1, H1)).astype(np.float32))
    w1 = fake.asarray(rng.standard_normal((F1, C1, K1, K1)).astype(np.float32))
    b1 = fake.asarray(rng.standard_normal(F1).astype(np.float32))

    # the SVD layer's gather and reductions as before bic_reduce: bic_gather and a GEMM an input group (the rule is
    # set once around the whole timing, see measure: set at each call, it would make the layers record again)
    svd_gather_gemms = (factored_callable("svd", (2, 2, (2, 3)) if quick else (2, 2, (19, 51)), 1, conv2, np.float32),
                        {"REDUCE_TILED_MAX_COLUMNS": 0})
    from npconv.layers import Conv2d
    conv2_layer = Conv2d(np.asarray(w), np.asarray(b), stride=s, padding=p).to_gpu()
    conv1_layer = Conv2d(np.asarray(w1), np.asarray(b1), stride=s1, padding=p1).to_gpu()
    conv3 = (8, 7, 16, 3, 1, 1) if quick else (256, 13, 384, 3, 1, 1)
    return {"conv2": lambda: conv2d(x, w, b, stride=s, padding=p),
            "conv2_layer": lambda: conv2_layer(x),
            "cp8_layer": factored_callable("cp", (4, 2, 2) if quick else (48, 2, 8), 1, conv2, np.float32),
            "svd_layer": svd,
            "svd_layer_gather_gemms": svd_gather_gemms,
            "shared_layer": factored_callable("shared", (4, 2, 3, 2) if quick else (48, 2, 6, 4), 1, conv2, np.float32),
            "conv1": lambda: conv2d(x1, w1, b1, stride=s1, padding=p1),
            "conv1_layer": lambda: conv1_layer(x1),
            "monochromatic6_layer": lowrank_callable("monochromatic", 2 if quick else 6, 1, conv1, np.float32),
            "conv_svd8_layer": lowrank_callable("conv_svd", 8, 1, conv1, np.float32),
            "separable4_layer": lowrank_callable("separable", 4, 1, conv1, np.float32),
            "zf_dense_net": lambda: net.forward(xn),
            "conv2_layer_b8": dense_callable(8, conv2, np.float32),
            "conv3_layer_b8": dense_callable(8, conv3, np.float32),
            "conv3_layer_b32": dense_callable(32, conv3, np.float32)}


def measure(calls=300, quick=False, profile=False, log=print):
    """{workload: microseconds per call} (best of five runs of ``calls`` calls, after ``calls // 5`` warm-up calls)."""
    import cProfile
    import io
    import pstats

    from npconv.kernels.cuda import ops_bicluster
    out = {}
    with no_op_cupy() as fake:
        for name, fn in workloads(fake, quick).items():
            fn, rules = fn if isinstance(fn, tuple) else (fn, {})
            saved = {k: getattr(ops_bicluster, k) for k in rules}
            for k, v in rules.items():
                setattr(ops_bicluster, k, v)
            try:
                for _ in range(max(1, calls // 5)):
                    fn()
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best = min(best, (time.perf_counter() - t0) / calls)
                out[name] = 1e6 * best
                log(f"{name:22s} {1e6 * best:8.1f} us per call (npconv's Python, launches and GEMMs as no-ops)")
                if profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(calls):
                        fn()
                    prof.disable()
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
                    log(text.getvalue())
            finally:
                for k, v in saved.items():
                    setattr(ops_bicluster, k, v)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per timed run (best of five runs)")
    ap.add_argument("--quick", action="store_true", help="small shapes and few calls (a smoke run)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions per workload")
    ap.add_argument("--out", help="JSON file for the results (written atomically)")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    res = measure(calls=min(args.calls, 3) if args.quick else args.calls, quick=args.quick, profile=args.profile)
    if args.out:
        from npconv._fileio import atomic_write
        text = json.dumps({"us_per_call": res, "calls": args.calls, "quick": args.quick}, indent=1)
        atomic_write(args.out, lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
