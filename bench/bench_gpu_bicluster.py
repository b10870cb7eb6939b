"""GPU benchmark of the biclustered layers: each against npconv's dense ``Conv2d`` layer on the GPU, ZF conv2
shapes, and against PyTorch (cuDNN) running the same layers composed of standard convs, when PyTorch has CUDA.

    python bench/bench_gpu_bicluster.py                 # batch 1 and 128, ZF conv2 (96 -> 256, 5x5, stride 2, 55x55)
    python bench/bench_gpu_bicluster.py --quick         # tiny shapes, batch 1 and 4 (a smoke test)
    python bench/bench_gpu_bicluster.py --dtype float64 --out out/bench/gpu_bicluster_f64.json

Cases: biclustered CP with G = 48, H = 2 and K = 6, 8, 12; biclustered SVD with G = H = 2 and ranks (19, 51); shared
separable filters with G = 48, H = 2, K = 6, S = 4 (npconv only: bench/torch_factored.py has no PyTorch form of it).
Timing depends only on the shapes, so the factors are random (with random groups of equal size). Each layer is built
on the host, moved with ``to_gpu()`` and timed on the same input as the dense conv, in alternation with it (and with
its PyTorch twin: ``bench_gpu.measure_against_dense``). Times are CUDA-event times after a device synchronize, medians
of ``--repeat`` runs after warm-up; the speed-up is the median of the rounds' ratios. The table gives the measured
speed-up over npconv's dense conv, the theoretical gain (``npconv.decompose.cost``, paper and exact
forms) and their ratio, and the PyTorch times: dense ``conv2d`` and the composed factored layer
(``bench/torch_factored.py``), with ``cudnn.benchmark`` on. Without a CUDA device it prints why and exits with status
0. ``rows(quick)`` gives the npconv cases to ``bench/run_all.py`` as GPU rows (skipped where there is no device), each
with the dense row of its batch as ``baseline``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from bench.bench_gpu import (LayerCall, _fmt, factored_bench_args, gpu_guarded, gpu_missing,  # noqa: E402
                             measure_against_dense, torch_cuda)

#: layer geometry: (C, H=W, F, kernel, stride, padding)
ZF_CONV2 = (96, 55, 256, 5, 2, 0)
TINY = (16, 15, 32, 3, 2, 1)
BATCHES = (1, 128)
QUICK_BATCHES = (1, 4)

#: name -> (kind, options): "cp" (G, H, K), "svd" (G, H, (K1, K2)), "shared" (G, H, K, S)
CONFIGS = {
    "cp_G48_H2_K6": ("cp", (48, 2, 6)),
    "cp_G48_H2_K8": ("cp", (48, 2, 8)),
    "cp_G48_H2_K12": ("cp", (48, 2, 12)),
    "svd_G2_H2_K19_51": ("svd", (2, 2, (19, 51))),
    "shared_G48_H2_K6_S4": ("shared", (48, 2, 6, 4)),
}
QUICK_CONFIGS = {
    "cp_G4_H2_K3": ("cp", (4, 2, 3)),
    "svd_G2_H2_K4_8": ("svd", (2, 2, (4, 8))),
    "shared_G4_H2_K3_S2": ("shared", (4, 2, 3, 2)),
}


def _setting(quick):
    return (TINY, QUICK_CONFIGS, QUICK_BATCHES) if quick else (ZF_CONV2, CONFIGS, BATCHES)


def _dense_weights(C, F, K):
    rng = np.random.default_rng(0)
    return rng.standard_normal((F, C, K, K)) / np.sqrt(C * K * K), rng.standard_normal(F) * 0.1


def make_result(kind, opts, C, F, K, seed=0):
    """A decomposition result with random float64 factors of the given structure (random equal-size groups)."""
    from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
    from npconv.decompose.shared import SharedSeparableResult
    rng = np.random.default_rng(seed)
    G, H = opts[0], opts[1]
    in_perm, out_perm = rng.permutation(C), rng.permutation(F)
    in_off, out_off = np.arange(0, C + 1, C // G), np.arange(0, F + 1, F // H)

    def r(*shape):
        return rng.standard_normal(shape) / np.sqrt(shape[-1])

    if kind == "cp":
        k = opts[2]
        return BiclusterCPResult(in_perm, in_off, r(C, H, k), r(G, H, k, K), r(G, H, k, K), r(F, G, k), out_perm,
                                 out_off)
    if kind == "svd":
        k1, k2 = opts[2]
        return BiclusterSVDResult(in_perm, in_off, r(C, H, k1), r(G, H, k2, k1, K, K), r(F, G, k2), out_perm,
                                  out_off)
    k, S = opts[2], opts[3]
    return SharedSeparableResult(in_perm, in_off, r(C, H, k), rng.integers(0, S, size=(G, H, k)), r(S, K), r(S, K),
                                 r(F, G, k), out_perm, out_off)


def gains(kind, opts, res, geom):
    """(paper-form gain, exact-form gain, executed multiply-adds per image) from the cost model."""
    from npconv.decompose import cost
    C, H, F, K, s, p = geom
    out = []
    for form in ("paper", "exact"):
        dense = cost.conv2d_cost((C, H, H), F, K, stride=s, padding=p, form=form)
        if kind == "cp":
            approx = cost.bicluster_cp_cost((C, H, H), F, K, *opts, stride=s, padding=p, form=form)
        elif kind == "svd":
            approx = cost.bicluster_svd_cost((C, H, H), F, K, *opts, stride=s, padding=p, form=form)
        else:
            approx = res.cost((C, H, H), stride=s, padding=p, form=form)
        out.append(cost.gain(dense, approx))
    return out[0], out[1], res.cost((C, H, H), stride=s, padding=p).macs


def _input(N, geom, dtype):
    C, H = geom[0], geom[1]
    return np.random.default_rng(1).standard_normal((N, C, H, H)).astype(dtype)


def dense_callable(N, geom, dtype):
    """A zero-argument callable (``bench_gpu.LayerCall``): npconv's dense ``Conv2d`` layer (+ bias) on the GPU, the
    layer a factored one replaces (as in the CPU benches; until the twentieth session's GPU runs it was the function
    ``conv2d``, about 2 us less host time a call)."""
    import cupy as cp

    from npconv.layers import Conv2d
    C, H, F, K, s, p = geom
    w, b = (a.astype(dtype) for a in _dense_weights(C, F, K))
    layer = Conv2d(w, b, stride=s, padding=p).to_gpu()
    x = cp.asarray(_input(N, geom, dtype))
    layer(x[:1])                        # compile the kernels and fill the weight cache outside the timing
    return LayerCall(layer, x)


def factored_callable(kind, opts, N, geom, dtype):
    """A zero-argument callable (``bench_gpu.LayerCall``): the factored layer (built on the host, moved to the GPU) on
    the GPU."""
    import cupy as cp
    C, H, F, K, s, p = geom
    layer = make_result(kind, opts, C, F, K).to_layer(bias=_dense_weights(C, F, K)[1], stride=s, padding=p)
    layer.to_gpu()
    x = cp.asarray(_input(N, geom, dtype))
    layer(x[:1])                        # compile the kernels and fill the weight cache outside the timing
    return LayerCall(layer, x)


def torch_dense_callable(N, geom, dtype):
    torch = torch_cuda()
    C, H, F, K, s, p = geom
    dev = torch.device("cuda")
    w, b = (torch.from_numpy(a.astype(dtype)).to(dev) for a in _dense_weights(C, F, K))
    x = torch.from_numpy(_input(N, geom, dtype)).to(dev)

    def run():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, b, stride=s, padding=p)
    return run


def torch_factored_callable(kind, opts, N, geom, dtype):
    """PyTorch running the same factored layer as standard convs (bench/torch_factored.py), on the GPU; None for
    the shared form, which has no PyTorch equivalent there."""
    if kind == "shared":
        return None
    torch = torch_cuda()
    from bench.torch_factored import torch_layer
    C, H, F, K, s, p = geom
    layer = make_result(kind, opts, C, F, K).to_layer(bias=_dense_weights(C, F, K)[1], stride=s, padding=p)
    dev = torch.device("cuda")
    module = torch_layer(layer, dtype=dtype).to(dev)
    x = torch.from_numpy(_input(N, geom, dtype)).to(dev)

    def run():
        with torch.no_grad():
            return module(x)
    return run


def cases(quick=False, dtype=np.float32):
    """Plain descriptions: dicts with name, batch, kind, config, macs, theoretical gains, setups and baseline."""
    geom, configs, batches = _setting(quick)
    C, H, F, K, s, p = geom
    from npconv.decompose import cost
    dense_macs = cost.conv2d_cost((C, H, H), F, K, stride=s, padding=p).macs
    layer = "tiny_conv" if quick else "zf_conv2"
    out = []
    for N in batches:
        dense_name = f"gpu_{layer}/dense/b{N}"
        out.append(dict(name=dense_name, batch=N, kind="dense", config="dense", macs=N * dense_macs, gain=1.0,
                        gain_paper=1.0, baseline=None,
                        setup=lambda N=N: dense_callable(N, geom, dtype),
                        torch_setup=lambda N=N: torch_dense_callable(N, geom, dtype)))
        for name, (kind, opts) in configs.items():
            paper, exact, macs = gains(kind, opts, make_result(kind, opts, C, F, K), geom)
            out.append(dict(name=f"gpu_{layer}/{name}/b{N}", batch=N, kind=kind, config=name, macs=N * macs,
                            gain=exact, gain_paper=paper, baseline=dense_name,
                            setup=lambda N=N, kind=kind, opts=opts: factored_callable(kind, opts, N, geom, dtype),
                            torch_setup=lambda N=N, kind=kind, opts=opts: torch_factored_callable(kind, opts, N, geom,
                                                                                                  dtype)))
    return out


def rows(quick=False):
    """GPU rows for ``bench/run_all.py`` (``bench._harness.Row``), npconv only, float32."""
    from bench._harness import Row

    return [Row(c["name"], gpu_guarded(c["setup"]), macs=c["macs"], group=f"gpu_bicluster/b{c['batch']}",
                device="gpu", baseline=c["baseline"],
                meta={"impl": "npconv", "dtype": "float32", "kind": c["kind"], "config": c["config"],
                      "batch": c["batch"], "theoretical_gain": round(c["gain"], 3),
                      "theoretical_gain_paper": round(c["gain_paper"], 3)})
            for c in cases(quick)]


def measure_all(quick, dtype, warmup, repeat):
    torch = torch_cuda()
    if torch is not None:
        torch.backends.cudnn.benchmark = True      # cuDNN picks its fastest algorithm per shape
    return measure_against_dense(cases(quick, dtype), ("name", "batch", "kind", "config", "macs", "gain", "gain_paper"),
                                 warmup=warmup, repeat=repeat, with_torch=True)


def format_table(results):
    lines = [f"{'case':<34}{'ms':>10}{'speedup':>9}{'gain':>7}{'(paper)':>9}{'ratio':>7}{'torch ms':>10}"
             f"{'npconv/torch':>13}"]
    for r in results:
        ms = r["time"]["median_ms"]
        tms = r["torch_time"]["median_ms"] if "torch_time" in r else None
        tail = f"{_fmt(tms, 10, '.3f')}{_fmt(tms and ms / tms, 13, '.2f')}"
        if "speedup" not in r:
            lines.append(f"{r['name']:<34}{ms:>10.3f}{'1.00':>9}{'1.00':>7}{'':>9}{'':>7}{tail}")
        else:
            lines.append(f"{r['name']:<34}{ms:>10.3f}{r['speedup']:>9.2f}{r['gain']:>7.2f}{r['gain_paper']:>9.2f}"
                         f"{r['speedup'] / r['gain']:>7.2f}{tail}")
    lines.append("speedup: npconv dense Conv2d layer time / factored layer time (same GPU, same input); gain: "
                 "theoretical, from executed multiply-adds (paper form in brackets); ratio = speedup / gain. torch: "
                 "the same layer in PyTorch with cuDNN (dense conv2d, or the factored layer composed of standard "
                 "convs); npconv/torch > 1 means npconv is slower.")
    return "\n".join(lines)


def main(argv=None):
    args = factored_bench_args(__doc__, "gpu_bicluster.json", argv)
    why = gpu_missing()
    if why:
        print(f"bench_gpu_bicluster: skipped, no GPU to measure on: {why}. Nothing was timed.")
        return 0
    from bench.bench_gpu import _device_info
    repeat = args.repeat
    results = measure_all(args.quick, np.dtype(args.dtype), args.warmup, repeat)
    torch = torch_cuda()
    report = {"device": _device_info(), "dtype": args.dtype, "repeat": repeat, "warmup": args.warmup,
              "torch": None if torch is None else {"version": torch.__version__,
                                                   "cudnn": torch.backends.cudnn.version(), "tf32": False},
              "timing": "CUDA events around each call after a device synchronize; median over repeats",
              "results": results}
    print(f"device: {report['device']['name']}  dtype: {args.dtype}  torch: "
          f"{'not available (no CUDA build)' if torch is None else torch.__version__}")
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
