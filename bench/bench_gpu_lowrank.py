"""GPU benchmark of the factored layers: each against npconv's own dense ``Conv2d`` layer on the GPU, ZF conv1
shapes.

    python bench/bench_gpu_lowrank.py                  # batch 1 and 128, ZF conv1 (3 -> 96, 7x7, stride 2, 224x224)
    python bench/bench_gpu_lowrank.py --quick          # tiny shapes, batch 1 and 4 (a smoke test)
    python bench/bench_gpu_lowrank.py --dtype float64 --out out/bench/gpu_lowrank_f64.json

Cases: monochromatic (C' = 4 .. 24 colours), low-rank conv (rank 8, 16) and separable (rank 4, 8), the same as
``bench/bench_lowrank.py`` (CPU). Each factored layer is built on the host from a decomposition of one random
weight, moved with ``to_gpu()``, and timed on the same input as the dense conv, in alternation with it
(``bench_gpu.measure_against_dense``). Times are CUDA-event times after a device synchronize, medians of ``--repeat``
runs after warm-up; the speed-up is the median of the rounds' ratios. The table gives the measured speed-up over the
dense conv, the theoretical gain (executed multiply-adds, ``npconv.decompose.cost``)
and their ratio. Without a CUDA device it prints why and exits with status 0. ``rows(quick)`` gives the same cases
to ``bench/run_all.py`` as GPU rows (skipped where there is no device), each with the dense row of its batch as
``baseline``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from bench.bench_gpu import (LayerCall, factored_bench_args, gpu_guarded, gpu_missing,  # noqa: E402
                             measure_against_dense)
from bench.bench_lowrank import (LOWRANK_RANKS, MONO_COLORS, SEPARABLE_RANKS, TINY, ZF_CONV1,  # noqa: E402
                                 _costs, _factored_layer, _weights)

BATCHES = (1, 128)
QUICK_BATCHES = (1, 4)


def _methods(quick):
    if quick:
        return [("monochromatic", 4), ("conv_svd", 4), ("separable", 3)]
    return ([("monochromatic", c) for c in MONO_COLORS] + [("conv_svd", r) for r in LOWRANK_RANKS]
            + [("separable", r) for r in SEPARABLE_RANKS])


def _input(N, geom, dtype):
    import cupy as cp
    C, H = geom[0], geom[1]
    return cp.asarray(np.random.default_rng(1).standard_normal((N, C, H, H)).astype(dtype))


def dense_callable(N, geom, dtype):
    """A zero-argument callable: npconv's dense ``Conv2d`` layer (+ bias) on the GPU, the layer a factored one
    replaces (as in the CPU benches; until the twentieth session's GPU runs it was the function ``conv2d``, about 2
    us less host time a call)."""
    from npconv.layers import Conv2d
    C, H, F, K, s, p = geom
    w, b = _weights(C, F, K)
    layer = Conv2d(w.astype(dtype), b.astype(dtype), stride=s, padding=p).to_gpu()
    x = _input(N, geom, dtype)
    layer(x[:1])                        # compile the kernels and fill the weight cache outside the timing
    return lambda: layer(x)


def factored_callable(method, size, N, geom, dtype):
    """A zero-argument callable (``bench_gpu.LayerCall``): the factored layer (decomposed on the host, moved to the
    GPU) on the GPU."""
    C, H, F, K, s, p = geom
    w, b = _weights(C, F, K)
    layer = _factored_layer(method, size, w, b, s, p).to_gpu()
    x = _input(N, geom, dtype)
    layer(x[:1])                        # compile the kernels and fill the weight cache outside the timing
    return LayerCall(layer, x)


def cases(quick=False, dtype=np.float32):
    """Plain descriptions: dicts with name, batch, method, size, macs, theoretical gains, setup and baseline."""
    geom = TINY if quick else ZF_CONV1
    dense_cost = _costs("monochromatic", 1, geom)["exact"][0]
    out = []
    for N in (QUICK_BATCHES if quick else BATCHES):
        dense_name = f"gpu_conv1/dense/b{N}"
        out.append(dict(name=dense_name, batch=N, method="dense", size=None, macs=N * dense_cost.macs, gain=1.0,
                        gain_paper=1.0, baseline=None,
                        setup=lambda N=N: dense_callable(N, geom, dtype)))
        for method, size in _methods(quick):
            from npconv.decompose.cost import gain
            c = _costs(method, size, geom)
            out.append(dict(name=f"gpu_conv1/{method}{size}/b{N}", batch=N, method=method, size=size,
                            macs=N * c["exact"][1].macs, gain=gain(*c["exact"]), gain_paper=gain(*c["paper"]),
                            baseline=dense_name,
                            setup=lambda N=N, method=method, size=size: factored_callable(method, size, N, geom,
                                                                                          dtype)))
    return out


def rows(quick=False):
    """GPU rows for ``bench/run_all.py`` (``bench._harness.Row``), float32."""
    from bench._harness import Row

    return [Row(c["name"], gpu_guarded(c["setup"]), macs=c["macs"], group=f"gpu_lowrank/b{c['batch']}",
                device="gpu", baseline=c["baseline"],
                meta={"impl": "npconv", "dtype": "float32", "method": c["method"], "size": c["size"],
                      "batch": c["batch"], "theoretical_gain": round(c["gain"], 3),
                      "theoretical_gain_paper": round(c["gain_paper"], 3)})
            for c in cases(quick)]


def measure_all(quick, dtype, warmup, repeat):
    return measure_against_dense(cases(quick, dtype), ("name", "batch", "method", "size", "macs", "gain", "gain_paper"),
                                 warmup=warmup, repeat=repeat)


def format_table(results):
    lines = [f"{'case':<30}{'ms':>10}{'speedup':>9}{'gain':>7}{'(paper)':>9}{'ratio':>7}"]
    for r in results:
        ms = r["time"]["median_ms"]
        if "speedup" not in r:
            lines.append(f"{r['name']:<30}{ms:>10.3f}{'1.00':>9}{'1.00':>7}{'':>9}{'':>7}")
        else:
            lines.append(f"{r['name']:<30}{ms:>10.3f}{r['speedup']:>9.2f}{r['gain']:>7.2f}{r['gain_paper']:>9.2f}"
                         f"{r['speedup'] / r['gain']:>7.2f}")
    lines.append("speedup: dense Conv2d layer time / factored layer time (same GPU, same input); gain: theoretical, "
                 "from executed multiply-adds; ratio = speedup / gain.")
    return "\n".join(lines)


def main(argv=None):
    args = factored_bench_args(__doc__, "gpu_lowrank.json", argv)
    why = gpu_missing()
    if why:
        print(f"bench_gpu_lowrank: skipped, no GPU to measure on: {why}. Nothing was timed.")
        return 0
    from bench.bench_gpu import _device_info
    repeat = args.repeat
    results = measure_all(args.quick, np.dtype(args.dtype), args.warmup, repeat)
    report = {"device": _device_info(), "dtype": args.dtype, "repeat": repeat, "warmup": args.warmup,
              "timing": "CUDA events around each call after a device synchronize; median over repeats",
              "results": results}
    print(f"device: {report['device']['name']}  dtype: {args.dtype}")
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
