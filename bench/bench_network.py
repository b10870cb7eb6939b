"""Whole networks on the CPU (Denton et al. 2014, Figs. 1-5): dense and approximated, npconv and PyTorch.

    python bench/bench_network.py                 # ZF (224x224) and the CIFAR reference, the full set
    python bench/bench_network.py --quick         # a tiny ZF-shaped network (64x64, 1/8 of the channels)
    python bench/bench_network.py --from-json out/bench/results.json   # the summary of an earlier run
    python bench/run_all.py --only network        # the same rows through the suite runner

Networks and variants
---------------------
* ``zf``: :func:`bench.zf_net.zf_net` (random weights). Variants: ``dense``; ``paper`` (the paper's plan:
  conv1 Monochromatic(6), conv2 Bicluster-CP G=48 H=2 K=8, fc6/fc7 SVD rank 512); ``paper-svd`` (conv2 as
  Bicluster-SVD G=2 H=2 (19, 51)); ``all`` (``paper`` + conv3-conv5 Bicluster-SVD, see ``zf_plan(upper=True)``).
  The factors are random with exactly the shapes ``approximate`` produces (:func:`bench.zf_net.random_approximation`):
  timing depends on shapes only, and fitting random weights would take minutes for nothing.
* ``cifar``: the bundled reference network (``npconv.models.load_reference()``; its rows are skipped with the reason
  when the file is missing) and ``approx``: conv1 Monochromatic(8), conv2 Bicluster-SVD G=2 H=2 (16, 48), fitted
  for real by ``npconv.approximate.approximate``.

Rows (one timed callable each; all at the same thread count for npconv -- numba and BLAS -- and PyTorch)
-------------------------------------------------------------------------------------------------------------
* ``<net>/batch/<variant>/<impl>/b<N>``: the whole network at batch N (1, 2, 4, ..., 256; quick: 1 and 4), for the
  dense network and the approximated ones (zf: ``paper``, ``all``; cifar: ``approx``), impl ``npconv`` or ``torch``
  (``bench.torch_factored.torch_net``: the dense layers as ``nn`` modules, the factored ones as the equivalent
  sequence of ordinary torch convolutions);
* ``<net>/layers-b<N>/<variant>/<impl>/<layer>``: one layer on its real input (the dense network's activation) at
  batch 1 and 128 (quick: 2): every layer of the dense network, and each approximated variant's replaced
  layers (its other layers are the dense ones).

Memory: npconv's whole-network rows run ``forward`` as users do, with its default ``reuse_buffers=True`` (the
activations go to buffers reused from call to call); its per-layer rows write into an output allocated once per
row (``out=``), the same thing for one layer. PyTorch's rows allocate as PyTorch does (fresh tensors).

``macs`` of a row is the executed multiply-adds (``layer.macs``) times N, so the harness reports GFLOP/s and the
fraction of the measured SGEMM peak. Baselines (the harness's ``speedup`` = baseline time / row time): an npconv
dense row's baseline is the matching torch row (> 1: npconv is faster than PyTorch); an approximated row's
baseline is the dense row of the same impl (the measured gain of the approximation). ``main`` (and
``--from-json``) also prints the per-image time against batch size, the per-layer breakdown and the ratios:
npconv approx vs npconv dense (whole ZF network at batch 128: the goal is >= 2.5x), npconv factored vs torch
factored, npconv dense vs torch dense.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
    from bench._env import clean_blas_env
    clean_blas_env()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench._harness import Row, SkipRow  # noqa: E402

#: whole-network batch sizes
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCHES = (1, 4)
#: batch sizes of the per-layer breakdown
LAYER_BATCHES = (1, 128)
QUICK_LAYER_BATCHES = (2,)
#: the tiny ZF-shaped network of --quick
QUICK_ZF = dict(input_size=64, width=1 / 8, fc_width=128, classes=100)
#: rows whose call does more than this many FLOPs are repeated fewer times (full runs only)
HEAVY_FLOPS = 2e10
#: the ratio goal of the whole ZF network (npconv approx vs npconv dense, batch 128)
GOAL = 2.5
DTYPE = "float32"


def threads():
    """The thread count every row runs with: ``$NPCONV_BENCH_THREADS`` when set, else the cores this process may
    use."""
    env = os.environ.get("NPCONV_BENCH_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"NPCONV_BENCH_THREADS must be an int >= 1, got {env!r}") from None
        if n < 1:
            raise ValueError(f"NPCONV_BENCH_THREADS must be an int >= 1, got {n}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ networks
def cifar_plan():
    """The approximation plan of the CIFAR reference network."""
    from npconv.approximate import Bicluster, Monochromatic
    return {"conv1": Monochromatic(colors=8), "conv2": Bicluster(G=2, H=2, ranks=(16, 48), method="svd")}


def _zf_settings(quick):
    return dict(QUICK_ZF) if quick else {}


def zf_variants(quick):
    """Variant name -> plan (None for the dense network) of the ZF network."""
    from bench.zf_net import zf_plan
    kw = {} if not quick else dict(width=QUICK_ZF["width"], fc_width=QUICK_ZF["fc_width"])
    return {"dense": None, "paper": zf_plan("cp", **kw), "paper-svd": zf_plan("svd", **kw),
            "all": zf_plan("cp", upper=True, **kw)}


#: variants timed as whole networks
BATCH_VARIANTS = {"zf": ("dense", "paper", "all"), "cifar": ("dense", "approx")}

_NETS: dict = {}


def network(net, variant, quick):
    """The npconv Network of ``net`` ("zf" or "cifar") and ``variant`` (cached in this process)."""
    key = (net, variant, bool(quick))
    if key in _NETS:
        return _NETS[key]
    if net == "zf":
        if variant == "dense":
            from bench.zf_net import zf_net
            out = zf_net(seed=0, dtype=np.float32, **_zf_settings(quick))
        else:
            from bench.zf_net import random_approximation
            import npconv.layers.bicluster  # noqa: F401  (register the factored layer kinds)
            import npconv.layers.lowrank  # noqa: F401
            out = random_approximation(network("zf", "dense", quick), zf_variants(quick)[variant], seed=1)
    elif net == "cifar":
        if variant == "dense":
            from npconv.models import load_reference
            out = load_reference()
        elif variant == "approx":
            from npconv.approximate import approximate
            out = approximate(network("cifar", "dense", quick), cifar_plan())
        else:
            raise ValueError(f"unknown cifar variant {variant!r}")
    else:
        raise ValueError(f"unknown network {net!r}")
    _NETS[key] = out
    return out


def plan_of(net, variant, quick):
    if variant == "dense":
        return None
    return zf_variants(quick)[variant] if net == "zf" else cifar_plan()


def cifar_missing():
    """Why the CIFAR reference network cannot be timed here (a str), or None."""
    from npconv.models import reference_path
    p = reference_path()
    return None if os.path.exists(p) else f"the bundled reference network {p} is missing"


def make_input(net, N, quick, seed=0):
    """A float32 batch for ``net``: N(0, 1) for zf, uniform [0, 255] (raw RGB) for cifar."""
    shape = network(net, "dense", quick).input_shape
    rng = np.random.default_rng(seed)
    if net == "cifar":
        return rng.uniform(0, 255, size=(N,) + shape).astype(np.float32)
    return rng.standard_normal((N,) + shape, dtype=np.float32)


_ACTS: dict = {}


def layer_inputs(net, N, quick):
    """name -> the input of that layer (the dense network's activations on ``make_input``); one (net, N) is kept."""
    key = (net, N, bool(quick))
    if key not in _ACTS:
        _ACTS.clear()
        dense = network(net, "dense", quick)
        x = make_input(net, N, quick)
        _, acts = dense.forward(x, return_intermediates="all")
        names = dense.names
        _ACTS[key] = {n: (x if i == 0 else acts[names[i - 1]]) for i, n in enumerate(names)}
    return _ACTS[key]


# ----------------------------------------------------------------------------------------------------- torch
def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


_TORCH: dict = {}


def torch_model(net, variant, quick):
    key = (net, variant, bool(quick))
    if key not in _TORCH:
        from bench.torch_factored import torch_net
        _TORCH[key] = torch_net(network(net, variant, quick), dtype=np.float32)
    return _TORCH[key]


def _torch_call(module, x):
    torch = _torch()
    xt = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return module(xt)
    return run


def _need_torch():
    if _torch() is None:
        raise SkipRow("PyTorch is not installed (pip install torch)")


# ------------------------------------------------------------------------------------------------------ rows
def _whole_setup(net, variant, impl, N, quick):
    def setup():
        if net == "cifar" and cifar_missing():
            raise SkipRow(cifar_missing())
        x = make_input(net, N, quick)
        if impl == "npconv":
            model = network(net, variant, quick)
            return lambda: model.forward(x)
        _need_torch()
        return _torch_call(torch_model(net, variant, quick), x)
    return setup


def _layer_setup(net, variant, impl, N, name, quick):
    def setup():
        if net == "cifar" and cifar_missing():
            raise SkipRow(cifar_missing())
        x = layer_inputs(net, N, quick)[name]
        if impl == "npconv":
            layer = network(net, variant, quick)[name]
            if layer.writes_out:  # a reused output, as Network.forward gives it (no fresh-page faults)
                o = np.empty((x.shape[0],) + tuple(layer.output_shape(tuple(x.shape[1:]))), x.dtype)
                return lambda: layer(x, out=o)
            return lambda: layer(x)
        _need_torch()
        return _torch_call(dict(torch_model(net, variant, quick).named_children())[name], x)
    return setup


def _macs(netobj):
    """name -> (multiply-adds per image, kind) of every layer."""
    return {r["name"]: (int(r["macs"]), r["kind"]) for r in netobj.summary(print_fn=None)}


def _variants_for_layers(net, quick):
    """variant -> the layers it times in the per-layer breakdown: every layer of the dense network, and for each
    approximated variant the layers whose approximation no earlier variant timed already."""
    dense = network(net, "dense", quick)
    out = {"dense": dense.names}
    plans = zf_variants(quick) if net == "zf" else {"dense": None, "approx": cifar_plan()}
    seen = set()
    for v, plan in plans.items():
        if plan is None:
            continue
        new = [n for n in dense.names if n in plan and (n, plan[n]) not in seen]
        seen.update((n, plan[n]) for n in new)
        if new:
            out[v] = new
    return out


def _row(name, setup, *, macs, group, meta, baseline, quick):
    flops = 2.0 * macs
    kw = {}
    if not quick and flops > HEAVY_FLOPS:
        kw = dict(warmup=1, repeat=3)
    return Row(name, setup, macs=macs, group=group, meta=meta, baseline=baseline, threads=threads(), **kw)


def net_rows(net, quick):
    """The rows of one network (see the module docstring)."""
    batches = QUICK_BATCHES if quick else BATCHES
    layer_batches = QUICK_LAYER_BATCHES if quick else LAYER_BATCHES
    factors = "random" if net == "zf" else "fitted"
    out = []
    macs = {v: _macs(network(net, v, quick)) for v in BATCH_VARIANTS[net]}
    for N in batches:
        for v in BATCH_VARIANTS[net]:
            total = sum(m for m, _ in macs[v].values())
            for impl in ("torch", "npconv"):
                name = f"{net}/batch/{v}/{impl}/b{N}"
                if v == "dense":
                    base = f"{net}/batch/dense/torch/b{N}" if impl == "npconv" else None
                else:
                    base = f"{net}/batch/dense/{impl}/b{N}"
                meta = dict(net=net, variant=v, impl=impl, batch=N, layer="(network)", kind="network",
                            dtype=DTYPE, factors=factors if v != "dense" else "", threads=threads())
                out.append(_row(name, _whole_setup(net, v, impl, N, quick), macs=total * N, group=f"{net}/batch",
                                meta=meta, baseline=base, quick=quick))
    per_variant = _variants_for_layers(net, quick)
    for N in layer_batches:
        for v, names in per_variant.items():
            lm = _macs(network(net, v, quick))
            for layer in names:
                for impl in ("torch", "npconv"):
                    name = f"{net}/layers-b{N}/{v}/{impl}/{layer}"
                    if v == "dense":
                        base = f"{net}/layers-b{N}/dense/torch/{layer}" if impl == "npconv" else None
                    else:
                        base = f"{net}/layers-b{N}/dense/{impl}/{layer}"
                    m, kind = lm[layer]
                    meta = dict(net=net, variant=v, impl=impl, batch=N, layer=layer, kind=kind, dtype=DTYPE,
                                factors=factors if v != "dense" else "", threads=threads())
                    out.append(_row(name, _layer_setup(net, v, impl, N, layer, quick), macs=m * N,
                                    group=f"{net}/layers-b{N}", meta=meta, baseline=base, quick=quick))
    return out


def rows(quick=False):
    """Rows for ``bench/run_all.py`` (see the module docstring). Builds the networks (cached in this process).

    PyTorch is imported here, so the harness's per-row thread limit also applies to it. Afterwards the objects
    alive so far (imported modules, the networks) are moved out of the garbage collector's reach with
    ``gc.collect(); gc.freeze()``: the harness collects garbage after every row, and with PyTorch imported each
    full collection would otherwise take about 0.1-0.2 s (more than most rows of ``--quick``).
    """
    _torch()
    out = net_rows("zf", quick)
    why = cifar_missing()
    if why:
        def skip():
            raise SkipRow(why)
        out.append(Row("cifar/reference-network", skip, group="cifar", meta=dict(net="cifar")))
    else:
        out += net_rows("cifar", quick)
    gc.collect()
    gc.freeze()
    return out


# --------------------------------------------------------------------------------------------------- summary
def _ok(results):
    return [r for r in results if r.get("status") == "ok" and r.get("median_s") and r.get("meta", {}).get("net")]


def _index(results):
    """(net, kind of row, variant, impl, batch, layer) -> result."""
    idx = {}
    for r in _ok(results):
        m = r["meta"]
        idx[(m["net"], m["layer"] == "(network)", m["variant"], m["impl"], int(m["batch"]), m["layer"])] = r
    return idx


def _ms(r):
    return "-" if r is None else f"{r['median_s'] * 1e3:.3g}"


def _ratio(a, b):
    """time(a) / time(b): how many times faster b is than a."""
    if a is None or b is None:
        return None
    return a["median_s"] / b["median_s"]


def _gflops(r):
    return "-" if r is None or not r.get("gflops") else f"{r['gflops']:.1f}"


def _peak(r):
    return "-" if r is None or r.get("frac_peak") is None else f"{100 * r['frac_peak']:.1f}"


def _fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def _table(head, lines):
    w = [max(len(str(h)), *(len(str(l[i])) for l in lines)) if lines else len(str(h)) for i, h in enumerate(head)]
    out = ["  ".join(str(h).rjust(w[i]) if i else str(h).ljust(w[i]) for i, h in enumerate(head)),
           "  ".join("-" * x for x in w)]
    out += ["  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(l)) for l in lines]
    return "\n".join(out)


def summarize(results):
    """The text summary of a run's results (harness result dicts): per-image times, breakdowns, ratios."""
    idx = _index(results)
    if not idx:
        return "no network rows ran (all skipped or failed)"
    nets = list(dict.fromkeys(k[0] for k in idx))
    text = []
    for net in nets:
        batches = sorted({k[4] for k in idx if k[0] == net and k[1]})
        variants = [v for v in dict.fromkeys(k[2] for k in idx if k[0] == net and k[1])]
        cols = [(v, i) for v in variants for i in ("npconv", "torch")]
        lines = []
        for N in batches:
            cells = [f"b{N}"]
            for v, i in cols:
                r = idx.get((net, True, v, i, N, "(network)"))
                cells.append("-" if r is None else f"{r['median_s'] / N * 1e3:.3g}")
            lines.append(cells)
        text.append(f"[{net}] per-image time (ms) against batch size")
        text.append(_table(["batch"] + [f"{v}/{i}" for v, i in cols], lines))
        text.append("")
        for N in sorted({k[4] for k in idx if k[0] == net and not k[1]}):
            layers = [k[5] for k in idx if k[0] == net and not k[1] and k[4] == N and k[2] == "dense"
                      and k[3] == "npconv"]
            total = sum(idx[(net, False, "dense", "npconv", N, l)]["median_s"] for l in layers) or 1.0
            lines = []
            for l in layers:
                d = idx[(net, False, "dense", "npconv", N, l)]
                t = idx.get((net, False, "dense", "torch", N, l))
                lines.append([l, d["meta"].get("kind", ""), _ms(d), f"{100 * d['median_s'] / total:.1f}",
                              _gflops(d), _peak(d), _ms(t), _fmt_ratio(_ratio(t, d))])
            text.append(f"[{net}] per-layer breakdown of the dense network at batch {N} "
                        f"('vs torch' = torch time / npconv time: > 1 means npconv is faster)")
            text.append(_table(["layer", "kind", "npconv ms", "share %", "GFLOP/s", "% peak", "torch ms",
                                "vs torch"], lines))
            text.append("")
            lines = []
            for k, a in idx.items():
                if not (k[0] == net and not k[1] and k[4] == N and k[2] != "dense" and k[3] == "npconv"):
                    continue
                v, l = k[2], k[5]
                d = idx.get((net, False, "dense", "npconv", N, l))
                at = idx.get((net, False, v, "torch", N, l))
                dt = idx.get((net, False, "dense", "torch", N, l))
                lines.append([l, v, a["meta"].get("kind", ""), _ms(a), _fmt_ratio(_ratio(d, a)), _gflops(a), _peak(a),
                              _ms(at), _fmt_ratio(_ratio(at, a)), _fmt_ratio(_ratio(dt, at))])
            if lines:
                text.append(f"[{net}] approximated layers at batch {N} ('gain' = dense time / approximated time, "
                            f"same implementation; 'vs torch' = torch factored time / npconv factored time)")
                text.append(_table(["layer", "variant", "kind", "npconv ms", "npconv gain", "GFLOP/s", "% peak",
                                    "torch ms", "vs torch", "torch gain"], lines))
                text.append("")
    text.append("ratios (time of the second / time of the first: > 1 means the first is faster)")
    lines = []
    for net in nets:
        batches = sorted({k[4] for k in idx if k[0] == net and k[1]})
        variants = [v for v in dict.fromkeys(k[2] for k in idx if k[0] == net and k[1]) if v != "dense"]
        for N in batches:
            dn = idx.get((net, True, "dense", "npconv", N, "(network)"))
            dt = idx.get((net, True, "dense", "torch", N, "(network)"))
            lines.append([f"{net} b{N}", "npconv dense vs torch dense", _fmt_ratio(_ratio(dt, dn))])
            for v in variants:
                an = idx.get((net, True, v, "npconv", N, "(network)"))
                at = idx.get((net, True, v, "torch", N, "(network)"))
                lines.append([f"{net} b{N}", f"npconv {v} vs npconv dense", _fmt_ratio(_ratio(dn, an))])
                lines.append([f"{net} b{N}", f"npconv {v} vs torch {v} (factored)", _fmt_ratio(_ratio(at, an))])
                lines.append([f"{net} b{N}", f"npconv {v} vs torch dense", _fmt_ratio(_ratio(dt, an))])
    text.append(_table(["network", "comparison", "ratio"], lines))
    goal = _goal(idx)
    if goal:
        text.append("")
        text.append(goal)
    return "\n".join(text)


def _goal(idx):
    """The goal line: whole ZF network, npconv approximated vs npconv dense at batch 128 (or the largest batch)."""
    batches = sorted({k[4] for k in idx if k[0] == "zf" and k[1]})
    if not batches:
        return ""
    N = 128 if 128 in batches else batches[-1]
    dn = idx.get(("zf", True, "dense", "npconv", N, "(network)"))
    parts = []
    for v in ("paper", "all"):
        an = idx.get(("zf", True, v, "npconv", N, "(network)"))
        r = _ratio(dn, an)
        if r is not None:
            parts.append(f"{v}: {r:.2f}x ({'meets' if r >= GOAL else 'below'} the {GOAL}x goal)")
    return f"goal, whole ZF network at batch {N}, npconv approx vs npconv dense: " + "; ".join(parts)


def plot(results, out_dir):
    """``network_batch.png`` (per-image time against batch size) and ``network_layers.png`` (per-layer time,
    dense against approximated, npconv and torch). Returns the written paths (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    idx = _index(results)
    nets = list(dict.fromkeys(k[0] for k in idx))
    if not nets:
        return []
    out_dir = Path(out_dir)
    paths = []
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for v in dict.fromkeys(k[2] for k in idx if k[0] == net and k[1]):
            for impl, ls in (("npconv", "-"), ("torch", "--")):
                pts = sorted((k[4], r["median_s"] / k[4] * 1e3) for k, r in idx.items()
                             if k[0] == net and k[1] and k[2] == v and k[3] == impl)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", label=f"{v} / {impl}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("time per image (ms)")
        ax.set_title(f"{net}: per-image time")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "network_batch.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    panels = [(net, N) for net in nets for N in sorted({k[4] for k in idx if k[0] == net and not k[1]})]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
        for ax, (net, N) in zip(axes[:, 0], panels):
            layers = [k[5] for k in idx if k[0] == net and not k[1] and k[4] == N and k[2] == "dense"
                      and k[3] == "npconv"]
            best = {}
            for k, r in idx.items():  # the approximated time of a layer: its fastest approximated variant
                if k[0] == net and not k[1] and k[4] == N and k[2] != "dense":
                    cur = best.get((k[3], k[5]))
                    if cur is None or r["median_s"] < cur:
                        best[(k[3], k[5])] = r["median_s"]
            x = np.arange(len(layers))
            series = [("npconv dense", [idx[(net, False, "dense", "npconv", N, l)]["median_s"] for l in layers]),
                      ("torch dense", [(idx.get((net, False, "dense", "torch", N, l)) or {}).get("median_s", 0)
                                       for l in layers]),
                      ("npconv approx", [best.get(("npconv", l), 0) for l in layers]),
                      ("torch approx", [best.get(("torch", l), 0) for l in layers])]
            wdt = 0.2
            for j, (lab, ys) in enumerate(series):
                ax.bar(x + (j - 1.5) * wdt, [y * 1e3 for y in ys], wdt, label=lab)
            ax.set_xticks(x, layers, rotation=60, fontsize=7)
            ax.set_ylabel("ms")
            ax.set_title(f"{net}: time per layer at batch {N} (approx: fastest approximated variant)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "network_layers.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny ZF-shaped network and small batches")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "out" / "bench" / "network",
                    help="output folder (default: out/bench/network)")
    ap.add_argument("--filter", default=None, metavar="TEXT", help="run only rows whose name contains TEXT")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                    help="print the summary of an earlier results.json (from this script or run_all.py) and exit")
    ap.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_CORETYPE and friends")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
        results = [r for r in doc.get("results", []) if r.get("module", "network") == "network"]
        print(summarize(results))
        return 0
    from bench._env import describe
    from bench._harness import (Settings, add_derived, format_table, measure_peaks, run_rows, write_outputs)
    from bench._timing import machine_info
    settings = Settings(quick=args.quick, warmup=args.warmup, repeat=args.repeat, min_time=args.min_time,
                        plots=not args.no_plots, filter=args.filter)
    print(f"# bench_network ({'quick' if args.quick else 'full'}), {threads()} thread(s); BLAS env: {describe()}")
    table = rows(args.quick)
    chosen = [r for r in table if not settings.filter or settings.filter in r.name]
    peaks = measure_peaks(chosen, settings)
    results = run_rows(table, settings, module="network", path=Path(__file__).resolve())
    add_derived(results, peaks)
    paths = write_outputs(args.out, results, machine=machine_info(), peaks=peaks, settings=settings)
    if settings.plots:
        paths += plot(results, args.out)
    print()
    print(format_table(results))
    print()
    print(summarize(results))
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
