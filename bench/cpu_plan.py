"""CPU call plans (``npconv/kernels/cpu/plan.py``): each planned layer with its plan and with its ordinary path.

    python bench/cpu_plan.py                    # ZF shapes at batch 1
    python bench/cpu_plan.py --batch 128 --repeat 5
    python bench/cpu_plan.py --quick            # tiny shapes, a smoke test

From its second call at an input shape a planned layer repeats its recorded kernel calls instead of running its
Python path (checks, geometry, workspace and prepared-weight lookups). This script times, in one process, each
layer called with plans (``plan.USE_PLANS`` true: the plan runs) and without (false: the path runs, as before
plans), in alternating blocks of calls (``bench._timing.interleaved``), and prints both medians and their ratio.
Every call writes into an output allocated once (``out=``), as ``Network.forward`` does.

The layers, ZF-net shapes: the dense conv1 (im2col and the GEMM micro-kernel at batch 1, the direct kernel from 8
images), conv2 (the lanes kernel) and conv3 (Winograd), the monochromatic conv1 (C' = 6; the direct kernel), the
biclustered conv2 at the paper's settings (CP K = 6, 8, 12; SVD (19, 51); shared separable K = 6, S = 4), and the
separable conv1 at rank 4 (two convs in a row: not planned, a control whose ratio should be 1), with random
weights (timing does not depend on their values).
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

import numpy as np  # noqa: E402

ZF_CONV1 = (3, 224, 96, 7, 2, 1)
ZF_CONV2 = (96, 55, 256, 5, 2, 0)
ZF_CONV3 = (256, 13, 384, 3, 1, 1)
TINY_CONV1 = (3, 32, 16, 5, 2, 1)
TINY_CONV2 = (16, 15, 32, 3, 2, 1)
TINY_CONV3 = (128, 8, 128, 3, 1, 1)


def _layers(quick):
    """name -> (layer, input shape without the batch axis)."""
    from bench.bench_bicluster import CONFIGS, QUICK_CONFIGS, make_layer
    from bench.bench_lowrank import _factored_layer, _weights
    from npconv.layers import Conv2d
    c1, c2, c3 = (TINY_CONV1, TINY_CONV2, TINY_CONV3) if quick else (ZF_CONV1, ZF_CONV2, ZF_CONV3)
    out = {}
    for name, (C, H, F, K, s, p) in (("dense_conv1", c1), ("dense_conv2", c2), ("dense_conv3", c3)):
        w, b = _weights(C, F, K)
        out[name] = (Conv2d(w, b, stride=s, padding=p), (C, H, H))
    C1, H1, F1, K1, s1, p1 = c1
    w1, b1 = _weights(C1, F1, K1)
    out["mono_conv1_C6"] = (_factored_layer("monochromatic", 4 if quick else 6, w1, b1, s1, p1), (C1, H1, H1))
    C, H, F, K, s, p = c2
    for name, (kind, opts) in (QUICK_CONFIGS if quick else CONFIGS).items():
        out[name] = (make_layer(kind, opts, C, F, K, s, p)[1], (C, H, H))
    out["separable_conv1_r4"] = (_factored_layer("separable", 4, w1, b1, s1, p1), (C1, H1, H1))
    return out


def run(batch=1, repeat=30, min_time=3.0, quick=False):
    """Rows: name, planned (whether a plan was recorded), median ms with plans and without, and their ratio."""
    from bench._timing import interleaved
    from npconv.kernels.cpu import plan as PL
    rows = []
    for name, (layer, in_shape) in _layers(quick).items():
        x = np.random.default_rng(1).standard_normal((batch,) + in_shape).astype(np.float32)
        o = np.empty((batch,) + tuple(layer.output_shape(in_shape)), np.float32)

        def with_plans():
            PL.USE_PLANS = True
            layer(x, out=o)

        def without():
            PL.USE_PLANS = False
            layer(x, out=o)

        try:
            t = interleaved({"plan": with_plans, "path": without}, repeat, min_time=min_time)
        finally:
            PL.USE_PLANS = True
        planned = type(layer._replays.get(PL.key_of(x))) is PL.Plan
        rows.append(dict(layer=name, batch=batch, planned=planned, plan_ms=t["plan"]["median"] * 1e3,
                         path_ms=t["path"]["median"] * 1e3, plan_min_ms=t["plan"]["min"] * 1e3,
                         path_min_ms=t["path"]["min"] * 1e3,
                         speedup=t["path"]["median"] / t["plan"]["median"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="images a call (default 1)")
    ap.add_argument("--repeat", type=int, default=30, help="timed calls of each mode at least (default 30)")
    ap.add_argument("--min-time", type=float, default=3.0, help="keep timing each layer this many seconds")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.repeat < 1:
        raise SystemExit(f"--batch and --repeat must be >= 1, got {a.batch} and {a.repeat}")
    from bench._timing import cpu_line, thread_info
    print(f"# CPU: {cpu_line()}")
    print(f"# threads: {thread_info()}")
    rows = run(a.batch, a.repeat, 0.0 if a.quick else a.min_time, a.quick)
    print(f"{'layer':24s} {'batch':>5s} {'planned':>7s} {'plan ms':>9s} {'path ms':>9s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['layer']:24s} {r['batch']:5d} {str(r['planned']):>7s} {r['plan_ms']:9.4f} {r['path_ms']:9.4f} "
              f"{r['speedup']:8.3f}")
    if a.json:
        from npconv._fileio import atomic_write
        atomic_write(a.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))
    return rows


if __name__ == "__main__":
    main()
