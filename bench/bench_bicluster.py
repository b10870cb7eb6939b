"""Biclustered conv layers (CP, SVD, shared separable) against npconv's dense conv2d, on ZF conv2 shapes.

    python bench/bench_bicluster.py              # ZF conv2 (96->256, 5x5, stride 2, 55x55), batch 1 and 128
    python bench/bench_bicluster.py --layer cifar_conv2   # the bundled CIFAR network's conv2 at the main job's settings
    python bench/bench_bicluster.py --quick      # tiny shapes, a smoke test
    python bench/bench_bicluster.py --threads 1 --clock thread   # CPU time of one thread: for a busy machine

For every configuration it prints the measured speedup over the dense ``Conv2d`` layer (same run, same threads; blocks of
consecutive calls of each, the blocks alternating), the theoretical gain from the cost model
(``npconv.decompose.cost``, paper form and exact form) and their ratio (measured / paper-form gain; the project's
goal is >= 0.8). Timing depends only on the shapes, so the factors are random (fitting them would only slow the
set-up). On a machine shared with other busy processes, ``--threads 1 --clock thread`` measures one thread's CPU
time, which leaves out the time the process was descheduled.

``rows(quick)`` gives the same configurations to the harness (``bench/run_all.py``): the dense row of each batch
is the baseline of its factored rows, so the harness's ``speedup`` column is the measured speedup.

Dense and factored layers both write into an output array allocated once (``out=``), as ``Network.forward``
does, so the page faults of a fresh output (whose cost depends on the availability of transparent huge pages)
stay out of the ratios.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
    from bench._env import clean_blas_env
    clean_blas_env()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

#: layer geometry: (C, H=W, F, kernel, stride, padding)
ZF_CONV2 = (96, 55, 256, 5, 2, 0)
#: the bundled CIFAR-10 reference network's conv2 (64 -> 128, 5x5, 16x16, padding 2)
CIFAR_CONV2 = (64, 16, 128, 5, 1, 2)
QUICK = (16, 15, 32, 3, 2, 1)

#: name -> (kind, options): kind "cp" (G, H, K), "svd" (G, H, (K1, K2)), "shared" (G, H, K, S)
CONFIGS = {
    "cp_G48_H2_K6": ("cp", (48, 2, 6)),
    "cp_G48_H2_K8": ("cp", (48, 2, 8)),
    "cp_G48_H2_K12": ("cp", (48, 2, 12)),
    "svd_G2_H2_K19_51": ("svd", (2, 2, (19, 51))),
    "shared_G48_H2_K6_S4": ("shared", (48, 2, 6, 4)),
}
#: the main job's grid for the CIFAR network's conv2 (groups of 8 input channels: the reduce-first CP front end)
CIFAR_CONFIGS = {
    "cp_G8_H2_K8": ("cp", (8, 2, 8)),
    "cp_G8_H2_K12": ("cp", (8, 2, 12)),
    "cp_G8_H2_K16": ("cp", (8, 2, 16)),
    "svd_G2_H2_K8_24": ("svd", (2, 2, (8, 24))),
}
QUICK_CONFIGS = {
    "cp_G4_H2_K3": ("cp", (4, 2, 3)),
    "svd_G2_H2_K4_8": ("svd", (2, 2, (4, 8))),
    "shared_G4_H2_K3_S2": ("shared", (4, 2, 3, 2)),
}


def make_layer(kind, opts, C, F, K, stride, padding, seed=0, dtype=np.float32):
    """A factored layer with random factors of the given structure (random groups as well)."""
    from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
    from npconv.decompose.shared import SharedSeparableResult
    rng = np.random.default_rng(seed)
    G, H = opts[0], opts[1]
    in_perm, out_perm = rng.permutation(C), rng.permutation(F)
    in_off, out_off = np.arange(0, C + 1, C // G), np.arange(0, F + 1, F // H)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    if kind == "cp":
        k = opts[2]
        res = BiclusterCPResult(in_perm, in_off, r(C, H, k), r(G, H, k, K), r(G, H, k, K), r(F, G, k), out_perm,
                                out_off)
    elif kind == "svd":
        k1, k2 = opts[2]
        res = BiclusterSVDResult(in_perm, in_off, r(C, H, k1), r(G, H, k2, k1, K, K), r(F, G, k2), out_perm,
                                 out_off)
    else:
        k, S = opts[2], opts[3]
        assign = rng.integers(0, S, size=(G, H, k))
        res = SharedSeparableResult(in_perm, in_off, r(C, H, k), assign, r(S, K), r(S, K), r(F, G, k), out_perm,
                                    out_off)
    return res, res.to_layer(bias=r(F), stride=stride, padding=padding)


def theoretical(kind, opts, res, C, H, F, K, stride, padding):
    """(paper-form gain, exact-form gain) from the cost model."""
    from npconv.decompose import cost
    out = []
    for form in ("paper", "exact"):
        dense = cost.conv2d_cost((C, H, H), F, K, stride=stride, padding=padding, form=form)
        if kind == "cp":
            approx = cost.bicluster_cp_cost((C, H, H), F, K, opts[0], opts[1], opts[2], stride=stride,
                                            padding=padding, form=form)
        elif kind == "svd":
            approx = cost.bicluster_svd_cost((C, H, H), F, K, opts[0], opts[1], opts[2], stride=stride,
                                             padding=padding, form=form)
        else:
            approx = res.cost((C, H, H), stride=stride, padding=padding, form=form)
        out.append(cost.gain(dense, approx))
    return tuple(out)


def _case(quick, layer="zf_conv2"):
    if quick:
        return QUICK, QUICK_CONFIGS, (1, 4)
    if layer == "cifar_conv2":
        return CIFAR_CONV2, CIFAR_CONFIGS, (1, 128)
    return ZF_CONV2, CONFIGS, (1, 128)


def rows(quick=False):
    """Harness rows: per batch a dense baseline row and one row per factored configuration."""
    from bench._harness import Row
    (C, H, F, K, s, p), configs, batches = _case(quick)
    out = []
    layer_name = "tiny_conv" if quick else "zf_conv2"
    for N in batches:
        base = f"{layer_name}/b{N}/dense"

        def dense_setup(N=N):
            from npconv.functional.conv import conv2d_output_shape
            from npconv.layers import Conv2d
            rng = np.random.default_rng(0)
            x = rng.standard_normal((N, C, H, H)).astype(np.float32)
            w = rng.standard_normal((F, C, K, K)).astype(np.float32)
            b = rng.standard_normal(F).astype(np.float32)
            dense = Conv2d(w, b, stride=s, padding=p)
            o = np.empty((N,) + conv2d_output_shape((C, H, H), w.shape, stride=s, padding=p), np.float32)
            return lambda: dense(x, out=o)

        from npconv.decompose import cost
        dense_macs = N * cost.conv2d_cost((C, H, H), F, K, stride=s, padding=p).macs
        out.append(Row(base, dense_setup, macs=dense_macs, group=f"bicluster/b{N}",
                       meta=dict(impl="dense", batch=N, dtype="float32")))
        for name, (kind, opts) in configs.items():
            def setup(kind=kind, opts=opts, N=N):
                _, layer = make_layer(kind, opts, C, F, K, s, p)
                x = np.random.default_rng(1).standard_normal((N, C, H, H)).astype(np.float32)
                o = np.empty((N,) + tuple(layer.output_shape((C, H, H))), np.float32)
                return lambda: layer(x, out=o)
            res, _ = make_layer(kind, opts, C, F, K, s, p)
            paper, exact = theoretical(kind, opts, res, C, H, F, K, s, p)
            out.append(Row(f"{layer_name}/b{N}/{name}", setup, macs=N * res.cost((C, H, H), stride=s, padding=p).macs,
                           group=f"bicluster/b{N}", baseline=base,
                           meta=dict(impl=name, batch=N, dtype="float32", gain_paper=round(paper, 3),
                                     gain_exact=round(exact, 3))))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument("--layer", choices=("zf_conv2", "cifar_conv2"), default="zf_conv2",
                    help="the layer shape and its configurations (default: ZF conv2 at the paper's settings)")
    ap.add_argument("--repeat", type=int, default=7, help="timed calls of each implementation (interleaved)")
    ap.add_argument("--min-time", type=float, default=1.0, help="keep timing until this many seconds")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,128; quick 1,4)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="numba and BLAS threads (default: as configured)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="'thread' times this thread's CPU time (time.thread_time; needs --threads 1): on a machine "
                         "shared with other busy processes it leaves out the time the process was descheduled")
    ap.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE")
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    if args.threads is not None:
        import numba
        from threadpoolctl import threadpool_limits
        numba.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    from bench._env import describe
    from bench._timing import cpu_line, interleaved, thread_info
    from npconv.layers import Conv2d
    (C, H, F, K, s, p), configs, batches = _case(args.quick, args.layer)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - set(configs)
        if unknown:
            ap.error(f"unknown configuration(s) {sorted(unknown)}; known: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in keep}
    info = thread_info()
    print(f"# CPU: {cpu_line()}")
    print(f"# layer C={C} H=W={H} F={F} k={K} stride={s} pad={p}; numba threads {info.get('numba_threads')} "
          f"({info.get('numba_threading_layer')}); BLAS {info.get('blas')}; env: {describe()}; clock {args.clock}")
    print(f"{'config':<24}{'batch':>6}{'dense ms':>10}{'approx ms':>11}{'speedup':>9}{'gain(paper)':>13}"
          f"{'gain(exact)':>13}{'ratio':>7}")
    results = []
    rng = np.random.default_rng(0)
    w = rng.standard_normal((F, C, K, K)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    # the dense baseline is the Conv2d layer: it keeps what it derives from its weights, as the factored layers do
    dense = Conv2d(w, b, stride=s, padding=p)
    for N in batches:
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        for name, (kind, opts) in configs.items():
            res, layer = make_layer(kind, opts, C, F, K, s, p)
            paper, exact = theoretical(kind, opts, res, C, H, F, K, s, p)
            o = np.empty((N,) + tuple(layer.output_shape((C, H, H))), np.float32)
            t = interleaved({"dense": lambda: dense(x, out=o),
                              "approx": lambda: layer(x, out=o)}, args.repeat, args.min_time, clock)
            td, ta = t["dense"]["median"], t["approx"]["median"]
            speed = td / ta
            print(f"{name:<24}{N:>6}{td * 1e3:>10.2f}{ta * 1e3:>11.2f}{speed:>9.2f}{paper:>13.2f}{exact:>13.2f}"
                  f"{speed / paper:>7.2f}", flush=True)
            results.append(dict(config=name, batch=N, dense=t["dense"], approx=t["approx"], speedup=speed,
                                speedup_min=t["dense"]["min"] / t["approx"]["min"], gain_paper=paper,
                                gain_exact=exact, ratio=speed / paper))
    if args.json:
        from npconv._fileio import atomic_write
        text = json.dumps(dict(info=info, cpu=cpu_line(), env=describe(), results=results), indent=1)
        atomic_write(args.json, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
