"""Whole networks on the GPU (the paper's Figs. 1-5 on a device): npconv's CuPy path against PyTorch + cuDNN running
the same networks, dense and approximated, in the same run.

    python bench/bench_gpu_network.py                     # ZF (224x224) and the CIFAR reference, batches 1..256
    python bench/bench_gpu_network.py --quick             # the tiny ZF-shaped network of bench_network --quick
    python bench/bench_gpu_network.py --nets zf --batches 1 128 --out out/bench/gpu_network.json
    python bench/bench_gpu_network.py --from-json docs/gpu_runs/2026-11-26-h200/gpu_network.json --plot g.png

The networks and variants are those of ``bench/bench_network.py`` (ZF: ``dense``, ``paper``, ``all`` with random
factors of the shapes ``approximate`` produces; CIFAR: the bundled reference network and its fitted ``approx``).
Each npconv network is built on the host and moved once with ``Network.to_gpu()``; PyTorch runs
``bench.torch_factored.torch_net`` of the same network (the factored layers as sequences of ordinary convolutions)
moved with ``.cuda()``, with ``cudnn.benchmark`` on.

* Per-image time against batch size: ``forward`` of the whole network on a device-resident batch, eager and
  replayed as a CUDA graph (npconv: ``Network.cuda_graph``; PyTorch: ``torch.cuda.graph``). A graph that cannot be
  recorded is reported in its row, with the error, and the run goes on.
* Per-layer breakdown at batch 1 and 128 (``--layer-batches``): each layer of the dense network, and each
  approximated variant's replaced layers, on its real input (the dense network's activation, computed on the
  device and handed to PyTorch through DLPack, so both read the same memory).

Times are CUDA-event times after a device synchronize (``bench_gpu.time_cupy`` / ``time_torch``), medians of
``--repeat`` runs after ``--warmup`` calls. Without a CUDA device it prints why and exits with status 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from bench import bench_network as BN  # noqa: E402
from bench.bench_gpu import (_device_info, _fmt, free_gpu_memory, gpu_missing, time_cupy, time_torch,  # noqa: E402
                             torch_cuda)

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCHES = (1, 4)
LAYER_BATCHES = (1, 128)
QUICK_LAYER_BATCHES = (2,)


class _Models:
    """The npconv networks (on the device) and their PyTorch twins (on the device), built once per (net, variant)."""

    def __init__(self, quick, with_torch):
        self.quick, self.with_torch = quick, with_torch
        self._np, self._torch = {}, {}

    def npconv(self, net, variant):
        key = (net, variant)
        if key not in self._np:
            host = BN.network(net, variant, self.quick)
            if self.with_torch:     # PyTorch copies the host weights, before the move
                self._torch[key] = BN.torch_model(net, variant, self.quick).cuda()
            self._np[key] = host.copy().to_gpu()
        return self._np[key]

    def torch(self, net, variant):
        self.npconv(net, variant)
        return self._torch.get((net, variant))


def _torch_fn(module, xt):
    torch = torch_cuda()

    def run():
        with torch.inference_mode():
            return module(xt)
    return run


def _torch_graph_fn(module, xt):
    """PyTorch's own CUDA graph of ``module`` (``torch.cuda.graph``): the same replay as npconv's ``cuda_graph``."""
    torch = torch_cuda()
    static_x = xt.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):              # cudnn.benchmark picks its algorithms here, before the recording
            module(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_y = module(static_x)

    def run():
        static_x.copy_(xt)
        graph.replay()
        return static_y
    return run


def _graph_time(make, warmup, repeat, timer):
    """Time a CUDA-graph callable; a failure to record is reported in the row instead of stopping the run."""
    try:
        fn = make()
    except Exception as exc:  # noqa: BLE001 (the bench records why, and goes on)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return timer(fn, warmup=warmup, repeat=repeat)


def _to_torch(x):
    torch = torch_cuda()
    return torch.from_dlpack(x)


def measure(nets, batches, layer_batches, *, quick, warmup, repeat, graphs=True, log=print):
    import cupy as cp
    torch = torch_cuda()
    if torch is not None:
        torch.backends.cudnn.benchmark = True
    models = _Models(quick, torch is not None)
    out = {"batch": [], "layers": []}
    for net in nets:
        if net == "cifar" and BN.cifar_missing():
            log(f"cifar: skipped: {BN.cifar_missing()}")
            continue
        variants = BN.BATCH_VARIANTS[net]
        for N in batches:
            x = cp.asarray(BN.make_input(net, N, quick))
            for v in variants:
                model = models.npconv(net, v)
                row = {"net": net, "variant": v, "batch": N,
                       "npconv": time_cupy(lambda: model.forward(x), warmup=warmup, repeat=repeat)}
                if graphs:
                    row["npconv_graph"] = _graph_time(lambda: (lambda g: lambda: g(x, copy=False))(
                        model.cuda_graph(x)), warmup, repeat, time_cupy)
                tm = models.torch(net, v)
                if tm is not None:
                    row["torch"] = time_torch(_torch_fn(tm, _to_torch(x)), warmup=warmup, repeat=repeat)
                    if graphs:
                        row["torch_graph"] = _graph_time(lambda: _torch_graph_fn(tm, _to_torch(x)), warmup, repeat,
                                                         time_torch)
                out["batch"].append(row)
                log(_batch_line(row))
            del x
            free_gpu_memory()
        for N in layer_batches:
            dense = models.npconv(net, "dense")
            x = cp.asarray(BN.make_input(net, N, quick))
            _, acts = dense.forward(x, return_intermediates="all")
            names = dense.names
            inputs = {n: (x if i == 0 else acts[names[i - 1]]) for i, n in enumerate(names)}
            for v, layers in BN._variants_for_layers(net, quick).items():
                model, tm = models.npconv(net, v), models.torch(net, v)
                macs = BN._macs(BN.network(net, v, quick))
                children = dict(tm.named_children()) if tm is not None else {}
                for name in layers:
                    layer, xin = model[name], inputs[name]
                    row = {"net": net, "variant": v, "batch": N, "layer": name, "kind": macs[name][1],
                           "macs": macs[name][0] * N,
                           "npconv": time_cupy(lambda: layer(xin), warmup=warmup, repeat=repeat)}
                    if name in children:
                        row["torch"] = time_torch(_torch_fn(children[name], _to_torch(xin)), warmup=warmup,
                                                  repeat=repeat)
                    out["layers"].append(row)
            del x, acts, inputs
            free_gpu_memory()
    return out


def _ms(r, impl):
    return r[impl].get("median_ms") if impl in r else None


def _per_image(r, impl):
    v = _ms(r, impl)
    return v / r["batch"] if v else None


BATCH_HEAD = (f"{'net':>5} {'variant':>6} {'batch':>5} {'npconv':>9} {'torch':>9} {'torch/np':>9} "
              f"{'np graph':>9} {'tch graph':>9} {'tg/ng':>7}")


def _batch_line(r):
    ours, theirs = _per_image(r, "npconv"), _per_image(r, "torch")
    g_ours, g_theirs = _per_image(r, "npconv_graph"), _per_image(r, "torch_graph")
    return (f"{r['net']:>5} {r['variant']:>6} {r['batch']:>5} {ours:>9.4f} {_fmt(theirs, 9, '.4f')} "
            f"{_fmt(theirs and theirs / ours, 9, '.2f')} {_fmt(g_ours, 9, '.4f')} {_fmt(g_theirs, 9, '.4f')} "
            f"{_fmt(g_ours and g_theirs and g_theirs / g_ours, 7, '.2f')}")


def format_tables(res):
    lines = ["Whole network, per-image time (ms/img): eager forward, and replayed as a CUDA graph "
             "(npconv: Network.cuda_graph; torch: torch.cuda.graph). torch/np, tg/ng > 1: npconv is faster.",
             BATCH_HEAD]
    lines += [_batch_line(r) for r in res["batch"]]
    errors = [(r["net"], r["variant"], r["batch"], k, r[k]["error"]) for r in res["batch"]
              for k in ("npconv_graph", "torch_graph") if k in r and "error" in r[k]]
    lines += [f"  {n}/{v}/b{b} {k}: not recorded: {e}" for n, v, b, k, e in errors]
    dense = {(r["net"], r["batch"]): r for r in res["batch"] if r["variant"] == "dense"}
    impls = ("npconv", "torch", "npconv_graph", "torch_graph")
    lines += ["", "Approximated against dense, same implementation (speed-up = dense time / approximated time)",
              f"{'net':>5} {'variant':>6} {'batch':>5} {'npconv':>8} {'torch':>8} {'np graph':>9} {'tch graph':>9}"]
    for r in res["batch"]:
        d = dense.get((r["net"], r["batch"]))
        if r["variant"] == "dense" or d is None:
            continue
        sp = {i: (_ms(d, i) / _ms(r, i) if _ms(r, i) and _ms(d, i) else None) for i in impls}
        lines.append(f"{r['net']:>5} {r['variant']:>6} {r['batch']:>5} {_fmt(sp['npconv'], 8, '.2f')} "
                     f"{_fmt(sp['torch'], 8, '.2f')} {_fmt(sp['npconv_graph'], 9, '.2f')} "
                     f"{_fmt(sp['torch_graph'], 9, '.2f')}")
    dl = {(r["net"], r["batch"], r["layer"]): r for r in res["layers"] if r["variant"] == "dense"}
    lines += ["", "Per layer (ms). vs dense: npconv dense layer / npconv approximated layer.",
              f"{'net':>5} {'batch':>5} {'variant':>6} {'layer':>8} {'kind':>20} {'npconv':>9} {'GFLOP/s':>8} "
              f"{'torch':>9} {'torch/np':>9} {'vs dense':>9}"]
    for r in res["layers"]:
        ours, theirs = _ms(r, "npconv"), _ms(r, "torch")
        gf = 2 * r["macs"] / (ours * 1e-3) / 1e9 if r.get("macs") else None
        d = dl.get((r["net"], r["batch"], r["layer"]))
        vs = _ms(d, "npconv") / ours if (d is not None and r["variant"] != "dense") else None
        lines.append(f"{r['net']:>5} {r['batch']:>5} {r['variant']:>6} {r['layer']:>8} {r['kind']:>20} "
                     f"{ours:>9.3f} {_fmt(gf, 8, '.0f')} {_fmt(theirs, 9, '.3f')} "
                     f"{_fmt(theirs and theirs / ours, 9, '.2f')} {_fmt(vs, 9, '.2f')}")
    return "\n".join(lines)


def plot(res, path):
    """Per-image time against batch size, one panel per network: npconv and PyTorch, eager (solid) and replayed
    as a CUDA graph (dotted). Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    nets = list(dict.fromkeys(r["net"] for r in res["batch"]))
    if not nets:
        return None
    fig, axes = plt.subplots(1, len(nets), figsize=(6.5 * len(nets), 4.8), squeeze=False)
    styles = {"npconv": ("-", "o"), "torch": ("--", "s"), "npconv_graph": (":", "o"), "torch_graph": ("-.", "s")}
    for ax, net in zip(axes[0], nets):
        rows = [r for r in res["batch"] if r["net"] == net]
        for j, v in enumerate(dict.fromkeys(r["variant"] for r in rows)):     # colour: variant; line: impl
            for impl, (ls, mk) in styles.items():
                pts = sorted((r["batch"], _per_image(r, impl)) for r in rows if r["variant"] == v and _ms(r, impl))
                if pts:
                    ax.plot(*zip(*pts), ls, color=f"C{j}", marker=mk, markersize=3,
                            label=f"{v} / {impl.replace('_', ' ')}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("time per image (ms)")
        ax.set_title(f"{net} on the GPU: per-image time")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny ZF-shaped network, batches 1 and 4")
    ap.add_argument("--nets", nargs="+", choices=("zf", "cifar"), default=["zf", "cifar"])
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--layer-batches", nargs="*", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 10, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-graphs", action="store_true", help="time the eager forward passes only")
    ap.add_argument("--out", type=Path, default=_ROOT / "out" / "bench" / "gpu_network.json", help="JSON output")
    ap.add_argument("--plot", type=Path, default=None, help="also write the per-image-time plot (PNG) here")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables (and --plot) of an earlier run's JSON report; runs nothing")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        print(f"device: {report['device']['name']}  torch: {report.get('torch')}")
        print(format_tables(report))
        if args.plot is not None:
            print(f"wrote {plot(report, args.plot)}")
        return 0
    why = gpu_missing()
    if why:
        print(f"bench_gpu_network: skipped, no GPU to measure on: {why}. Nothing was timed.")
        return 0
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    layer_batches = args.layer_batches if args.layer_batches is not None else (
        QUICK_LAYER_BATCHES if args.quick else LAYER_BATCHES)
    for name, vals in (("--batches", batches), ("--layer-batches", layer_batches)):
        if any(b < 1 for b in vals):
            raise SystemExit(f"{name} must be positive integers, got {list(vals)}")
    repeat = args.repeat or (3 if args.quick else 10)
    torch = torch_cuda()
    print(f"device: {_device_info()['name']}  torch: "
          f"{'not available (no CUDA build)' if torch is None else torch.__version__}", flush=True)
    print(BATCH_HEAD, flush=True)
    res = measure(args.nets, batches, layer_batches, quick=args.quick, warmup=args.warmup, repeat=repeat,
                  graphs=not args.no_graphs, log=lambda s: print(s, flush=True))
    print(format_tables(res))
    report = {"device": _device_info(), "repeat": repeat, "warmup": args.warmup, "quick": args.quick,
              "torch": None if torch is None else {"version": torch.__version__,
                                                   "cudnn": torch.backends.cudnn.version(), "tf32": False},
              "timing": "CUDA events around each call after a device synchronize; median over repeats", **res}
    if args.plot is not None:
        print(f"wrote {plot(res, args.plot)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
