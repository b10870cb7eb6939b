"""The main job: the paper's experiment on the bundled CIFAR-10 reference network.

    python -m npconv                  # default sweep, about 5 minutes on 2 cores (278 s measured, 2026-11-27)
    python -m npconv --full           # a larger sweep
    python -m npconv --quick --limit 300   # a smoke run: one setting per method, 300 images per split

Steps: load the network and the data; report the exact network's top-1; apply each approximation over a grid of
settings (every fit in the data metric of 512 training images; by default the layers are fitted in network order
on the approximated network's inputs and the dense layers above them refitted by least squares, ``--no-refit``
for the paper's protocol without fine-tuning), scored on a validation split held out of the training images;
pick, per method, the fastest setting within 1 point of top-1; report those (and their combination) on the test
split, once; measure the CPU time per image of the approximated layers and of the whole network, each
configuration interleaved with the exact network; write a table, results.json, results.md and plots.
Without the data it still runs the speed part and says how to get the data.

The timings need the CPU's own BLAS kernels: when ``OPENBLAS_CORETYPE`` or ``OPENBLAS_L2_SIZE`` is set (some
workplaces pin OpenBLAS to Haswell kernels, which halves SGEMM on an AVX-512 CPU and with it the dense layers the
speedups are measured against), the job restarts itself once without them and says so in its header and results
(``--keep-blas-env`` keeps them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

__all__ = ["main"]


def build_grid(full=False, quick=False):
    """The approximation settings swept by the main job (family, plan) for the reference network.

    Every fit uses the data metric (the second moment of the layer's input patches over 512 training images);
    the biclustered layers cluster their channels on the weights and refit their blocks in that metric.
    """
    from .approximate import SVD, Bicluster, Monochromatic, Separable
    from .experiment import Config
    if quick:  # one setting per method (smoke runs, CI)
        return [Config("monochromatic conv1", {"conv1": Monochromatic(colors=24, fit="data")}),
                Config("bicluster-CP conv2", {"conv2": Bicluster(G=8, H=2, rank=12, method="cp", fit="data")}),
                Config("bicluster-SVD conv2", {"conv2": Bicluster(G=2, H=2, ranks=(8, 24), method="svd",
                                                                  fit="data")}),
                Config("separable conv3+conv4", {"conv3": Separable(rank=64, fit="data"),
                                                 "conv4": Separable(rank=64, fit="data")}),
                Config("SVD fc5", {"fc5": SVD(rank=16, fit="data")})]
    grid = []
    for c in ((4, 8, 12, 16, 24, 32) if full else (16, 24, 32)):
        grid.append(Config("monochromatic conv1", {"conv1": Monochromatic(colors=c, fit="data")}))
    for G, H, K in (((4, 2, 16), (8, 2, 8), (8, 2, 12), (8, 2, 16), (8, 2, 24), (8, 4, 32), (16, 2, 16)) if full
                    else ((8, 2, 8), (8, 2, 12), (8, 2, 16))):
        grid.append(Config("bicluster-CP conv2", {"conv2": Bicluster(G=G, H=H, rank=K, method="cp", fit="data")}))
    for K1, K2 in (((8, 16), (8, 24), (12, 32), (16, 48), (24, 64)) if full else ((8, 24), (12, 32), (16, 48))):
        grid.append(Config("bicluster-SVD conv2", {"conv2": Bicluster(G=2, H=2, ranks=(K1, K2), method="svd",
                                                                      fit="data")}))
    for r in ((32, 48, 64, 96) if full else (48, 64)):
        grid.append(Config("separable conv3+conv4", {"conv3": Separable(rank=r, fit="data"),
                                                     "conv4": Separable(rank=r, fit="data")}))
    for r in ((8, 16, 32, 64) if full else (16, 32)):
        grid.append(Config("SVD fc5", {"fc5": SVD(rank=r, fit="data")}))
    return grid


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def _fmt_row(r, base_top1=None):
    d = r if isinstance(r, dict) else r.as_dict(base_top1)
    acc = "" if d.get("top1") is None else f"{100 * d['top1']:6.2f}"
    dl = "" if d.get("delta_top1") is None else f"{100 * d['delta_top1']:+6.2f}"
    se = "" if d.get("delta_top1_se") is None else f"{100 * d['delta_top1_se']:.2f}"
    ag = "" if d.get("agreement") is None else f"{100 * d['agreement']:6.2f}"
    return (f"{d['family']:<24}{d['config']:<52}{d['params_after']:>10,}{d['theoretical_gain']:>7.2f}"
            f"{d['ms_per_image_layers_after']:>9.3f}{d['layer_speedup']:>7.2f}{d['ms_per_image_net_after']:>9.3f}"
            f"{d['net_speedup']:>7.2f}{acc:>8}{dl:>8}{se:>6}{ag:>8}")


HEADER = (f"{'method':<24}{'settings':<52}{'params':>10}{'gain':>7}{'ms/img':>9}{'x':>7}{'net ms':>9}{'net x':>7}"
          f"{'top1%':>8}{'d top1':>8}{'se':>6}{'agree%':>8}")
LEGEND = ("gain: theoretical (multiply-adds) of the approximated layers; ms/img, x: their measured CPU time per "
          "image and speedup; net ms, net x: the whole network's; d top1: change against the exact network; "
          "se: its standard error, from the images on which the two networks disagree (paired); agree%: "
          "predictions equal to the exact network's")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m npconv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder holding CIFAR-10 (default: $NPCONV_DATA_DIR, the user "
                    "cache, then ../shared/data)")
    ap.add_argument("--download", action="store_true", help="download the official CIFAR-10 archive first")
    ap.add_argument("--full", action="store_true", help="the larger sweep")
    ap.add_argument("--quick", action="store_true", help="one setting per method (a smoke run)")
    ap.add_argument("--limit", type=int, default=0, help="use only this many validation and test images")
    ap.add_argument("--batch", type=int, default=128, help="batch size for the timing (default 128)")
    ap.add_argument("--repeat", type=int, default=5, help="timing repeats (median reported)")
    ap.add_argument("--no-refit", action="store_true", help="fit every approximated layer on the exact network's "
                    "inputs and leave the layers above untouched (the paper's protocol without fine-tuning); by "
                    "default the layers are fitted in order on the approximated network's inputs and the dense "
                    "layers above are refitted by least squares (npconv.approximate's sequential, refit_above)")
    ap.add_argument("--budget", type=float, default=1.0, help="top-1 budget in points for the selection (1.0)")
    ap.add_argument("--margin", type=float, default=0.0, help="selection margin in standard errors: a setting is "
                    "within the budget when its drop plus this many standard errors of the drop is (default 0: the "
                    "drop alone, the paper's protocol)")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default="runs/main", help="output folder (results.json, results.md, plots)")
    ap.add_argument("--write-docs", action="store_true", help="also write docs/results.md of the source checkout "
                    "npconv runs from (refused up front when npconv runs from an installed copy, which has no docs/)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: by "
                    "default the job restarts itself without them, so that the dense layers it times against run "
                    "on this CPU's own BLAS kernels")
    args = ap.parse_args(argv)
    _check_args(ap, args)  # every option, before any work
    from ._threads import blas_env_note, drop_blas_overrides
    if argv is None and not args.keep_blas_env:
        # a process of its own (not a call from Python code): restart once without the OpenBLAS overrides
        drop_blas_overrides([sys.executable, "-m", "npconv", *sys.argv[1:]])

    from . import datasets
    from .experiment import evaluate, select, time_layers
    from .models import load_reference
    progress = not args.no_progress and sys.stderr.isatty()
    t_start = time.perf_counter()

    net = load_reference()
    blas_env = blas_env_note()
    print(f"# npconv main job: {net.meta.get('name', 'network')} on {_machine()}, backend {args.backend}; "
          f"BLAS: {blas_env}")
    net.summary()
    if args.backend == "cuda":
        from ._backend import cupy_available, require_cupy
        require_cupy()
        if not cupy_available():
            raise SystemExit("--backend cuda: CuPy is installed but no CUDA device is visible")

    # ---------------------------------------------------------------- data
    try:
        Xtr, ytr = datasets.load_cifar10("train", root=args.data, download=args.download, progress=progress)
        Xte, yte = datasets.load_cifar10("test", root=args.data, download=args.download, progress=progress)
        have_data = True
    except datasets.DataNotFoundError as exc:
        print("\n" + str(exc) + "\nRunning the speed part only (no accuracy).\n")
        have_data = False

    rng = np.random.default_rng(0)
    if have_data:
        tr_idx, va_idx = datasets.train_val_split(ytr, 5000)
        Xva, yva = Xtr[va_idx], ytr[va_idx]
        calib = Xtr[tr_idx[rng.choice(len(tr_idx), 512, replace=False)]].astype(np.float64)
        if args.limit:
            sv = np.linspace(0, len(Xva) - 1, min(args.limit, len(Xva))).astype(int)
            st = np.linspace(0, len(Xte) - 1, min(args.limit, len(Xte))).astype(int)
            Xva, yva, Xte, yte = Xva[sv], yva[sv], Xte[st], yte[st]
        timing_batch = Xva[:args.batch].astype(np.float32)
        if len(timing_batch) < args.batch:
            timing_batch = np.resize(timing_batch, (args.batch,) + timing_batch.shape[1:])
    else:
        calib = None
        timing_batch = rng.uniform(0, 255, (args.batch, 3, 32, 32)).astype(np.float32)

    def device(n):
        return n.to_gpu() if args.backend == "cuda" else n

    def dev_x(x):
        return __import__("cupy").asarray(x) if args.backend == "cuda" else x

    base = device(net.copy())
    base_times = time_layers(base, dev_x(timing_batch), repeat=args.repeat)
    print(f"\nexact network: {1e3 * base_times[1] / args.batch:.3f} ms per image at batch {args.batch} "
          f"(CPU threads: {_threads()})")

    results = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"), "command": "python -m npconv " +
               " ".join(argv if argv is not None else sys.argv[1:]), "batch": args.batch, "backend": args.backend,
               "refit": _refits(calib, args), "blas_env": blas_env,
               "budget_points": args.budget, "margin_se": args.margin,
               "baseline": {"ms_per_image": 1e3 * base_times[1] / args.batch,
                            "per_layer_ms_per_image": {k: 1e3 * v / args.batch for k, v in base_times[0].items()}}}
    grid = build_grid(args.full, args.quick)

    if not have_data:
        rows = []
        for cfg in grid:
            res = _speed_only(net, cfg, base_times, dev_x(timing_batch), device, args.repeat)
            rows.append(res)
            print(_fmt_row(res))
        results["speed_only"] = rows
        _write(args, results, None)
        return 0

    base_va_top1, base_va_pred = evaluate(base, Xva, yva, progress=progress)
    base_te_top1, base_te_pred = evaluate(base, Xte, yte, progress=progress)
    print(f"exact network top-1: validation {100 * base_va_top1:.2f}% ({len(yva)} images), "
          f"test {100 * base_te_top1:.2f}% ({len(yte)} images)")
    results["baseline"].update(val_top1=base_va_top1, test_top1=base_te_top1, n_val=len(yva), n_test=len(yte))

    # ---------------------------------------------------------------- sweep on validation
    print(f"\n## sweep on the validation split ({len(yva)} images held out of train)\n{HEADER}")
    val_results = []
    fits = {}   # the fitted networks, by plan: the chosen ones are scored on the test split without a new fit
    for cfg in grid:
        r = _run(net, cfg, Xva, yva, base_va_pred, base_times, timing_batch, calib, device, dev_x, args, base, fits)
        r.split = "val"
        val_results.append(r)
        print(_fmt_row(r, base_va_top1), flush=True)
    chosen = select(val_results, base_va_top1, budget=args.budget / 100, margin=args.margin)

    # combinations (one setting per family), searched greedily on validation: the conv layers, then everything
    from .experiment import greedy_combine

    def evaluate_on_val(cfg):
        r = _run(net, cfg, Xva, yva, base_va_pred, base_times, timing_batch, calib, device, dev_x, args, base, fits)
        r.split = "val"
        print(_fmt_row(r, base_va_top1), flush=True)
        return r

    finals = list(chosen.values())
    singles = list(val_results)
    conv_results = [r for r in singles if all(k.startswith("conv") for k in r.config.plan)]
    for label, pool in (("combined conv layers", conv_results), ("combined all", singles)):
        tried = greedy_combine(pool, base_va_top1, evaluate_on_val, family=label, budget=args.budget / 100,
                               margin=args.margin)
        val_results.extend(tried)
        if tried:
            finals.append(tried[-1])

    # ---------------------------------------------------------------- the chosen ones on test, once
    from .experiment import fit_key
    keep = [fit_key(net, r.config.plan, calib, _refits(calib, args)) for r in finals]
    fits = {k: v for k, v in fits.items() if k in keep}     # the other fitted networks are not needed again
    print(f"\n## chosen settings on the test split ({len(yte)} images), reported once\n{HEADER}")
    test_results = []
    for rv in finals:
        r = _run(net, rv.config, Xte, yte, base_te_pred, base_times, timing_batch, calib, device, dev_x, args, base,
                 fits)
        r.split = "test"
        test_results.append(r)
        print(_fmt_row(r, base_te_top1), flush=True)
    print("\n" + LEGEND)
    results["val"] = [r.as_dict(base_va_top1) for r in val_results]
    results["test"] = [r.as_dict(base_te_top1) for r in test_results]
    exact_ms = [1e3 * r.seconds_net_before / r.batch for r in val_results + test_results]
    results["baseline"]["interleaved_ms_per_image"] = dict(median=float(np.median(exact_ms)), min=min(exact_ms),
                                                           max=max(exact_ms), n=len(exact_ms))
    results["elapsed_s"] = time.perf_counter() - t_start
    _write(args, results, net)
    print(f"\ndone in {results['elapsed_s']:.0f} s; results in {args.out}/")
    return 0


def _check_args(ap, args):
    """Refuse bad options up front (``ap.error``: usage, the message, exit status 2), so that no run fails after
    its work; creates the ``--out`` folder."""
    if args.full and args.quick:
        ap.error("--full and --quick exclude each other")
    if args.limit < 0:
        ap.error(f"--limit must be >= 0, got {args.limit}")
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1 (timing repeats), got {args.repeat}")
    if not args.budget >= 0 or not math.isfinite(args.budget):
        ap.error(f"--budget must be a finite number of points >= 0, got {args.budget}")
    if not args.margin >= 0:
        ap.error(f"--margin must be >= 0 (standard errors), got {args.margin}")
    if not math.isfinite(args.margin):
        ap.error(f"--margin must be finite (standard errors), got {args.margin}")
    if args.write_docs and _docs_results_path() is None:
        ap.error(f"--write-docs writes docs/results.md of a source checkout, but npconv runs from an installed copy "
                 f"({_checkout_root()} has no setup.cfg and docs/); leave --write-docs out: results.md is written "
                 f"to --out")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out: cannot create the output folder {args.out!r}: {exc.strerror or exc}")
    if not os.access(args.out, os.W_OK | os.X_OK):
        ap.error(f"--out: the output folder {args.out!r} is not writable")


def _checkout_root():
    """The folder above the package: the source checkout when npconv runs from one (an editable install)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs_results_path():
    """docs/results.md of the source checkout npconv runs from, or None for an installed copy (no docs/)."""
    root = _checkout_root()
    if os.path.isfile(os.path.join(root, "setup.cfg")) and os.path.isdir(os.path.join(root, "docs")):
        return os.path.join(root, "docs", "results.md")
    return None


def _threads():
    try:
        import numba
        return f"numba {numba.get_num_threads()}"
    except Exception:
        return "?"


def _refits(calib, args):
    """Whether the job fits sequentially and refits the dense layers above (needs the calibration images)."""
    return calib is not None and not args.no_refit


def _run(net, cfg, X, y, base_pred, base_times, timing_batch, calib, device, dev_x, args, base, fits):
    """One configuration, approximated and measured; ``base`` (the exact network on the device) is timed again,
    interleaved with the approximated one, so that both are measured in the same conditions. ``fits``: the run's
    cache of fits (``run_config``): a plan scored on the validation split is not fitted again for the test split."""
    from .experiment import run_config
    return run_config(net, cfg, X, y, base_pred=base_pred, base_times=base_times, timing_batch=dev_x(timing_batch),
                      data=calib, repeat=args.repeat, device=device, refit=_refits(calib, args),
                      base_net=base, fits=fits)


def _speed_only(net, cfg, base_times, timing_batch, device, repeat):
    import dataclasses
    from .approximate import approximate
    from .experiment import time_layers
    # no data: fit in the weight metric (the time of a factored layer does not depend on its values)
    plan = {k: (dataclasses.replace(v, fit="weights") if getattr(v, "fit", "weights") == "data" else v)
            for k, v in cfg.plan.items()}
    approx, reports = approximate(net, plan, return_report=True)
    per_after, net_after = time_layers(device(approx), timing_batch, repeat=repeat)
    names = list(cfg.plan)
    b = len(timing_batch)
    before = sum(base_times[0][n] for n in names)
    after = sum(per_after[n] for n in names)
    macs_b = sum(r.macs_before for r in reports)
    macs_a = sum(r.macs_after for r in reports)
    return dict(family=cfg.family, config=cfg.label, params_after=sum(r.params_after for r in reports),
                theoretical_gain=macs_b / macs_a, ms_per_image_layers_after=1e3 * after / b,
                layer_speedup=before / after, ms_per_image_net_after=1e3 * net_after / b,
                net_speedup=base_times[1] / net_after, top1=None, delta_top1=None, agreement=None)


def _write(args, results, net):
    from ._fileio import atomic_write as _atomic_write
    path = os.path.join(args.out, "results.json")
    _atomic_write(path, lambda f: f.write(json.dumps(results, indent=1, default=float).encode()))
    md = _markdown(results)
    _atomic_write(os.path.join(args.out, "results.md"), lambda f: f.write(md.encode()))
    if args.write_docs:  # checked up front (_check_args): npconv runs from a source checkout
        _atomic_write(_docs_results_path(), lambda f: f.write(md.encode()))
    if not args.no_plots and net is not None:
        try:
            from . import plots
            plots.accuracy_vs_speedup(results, os.path.join(args.out, "accuracy_vs_speedup.png"))
            plots.conv1_filters(net, os.path.join(args.out, "conv1_filters.png"), results)
        except ImportError as exc:
            print(f"(plots skipped: {exc}; pip install 'npconv[plot]')")


def _fitting(res):
    if "test_top1" not in res["baseline"]:
        return "in the weight metric (no data found: speed only)"
    if res.get("refit"):
        return ("in network order on the approximated network's inputs, the dense layers above refitted by least "
                "squares (`sequential`, `refit_above`)")
    return "each layer on the exact network's inputs, no refit (`--no-refit`)"


def _interleaved_line(b):
    """The exact network's time as measured beside every configuration (``time_interleaved``), if recorded."""
    it = b.get("interleaved_ms_per_image")
    if not it:
        return ""
    return (f"; timed again beside each of the {it['n']} configurations: median {it['median']:.3f} ms "
            f"({it['min']:.3f}-{it['max']:.3f})")


def _markdown(res):
    lines = [f"# Results of the main job", "",
             f"- command: `{res['command']}`", f"- machine: {res['machine']}", f"- date: {res['date']}",
             f"- backend: {res['backend']}, timing batch {res['batch']}", f"- fitting: {_fitting(res)}"]
    if "budget_points" in res:
        m = res.get("margin_se") or 0
        rule = f"drop of top-1 plus {m:g} standard error(s)" if m else "drop of top-1"
        lines.append(f"- selection: per method, the fastest setting whose {rule} on validation is at most "
                     f"{res['budget_points']:g} point(s)")
    if res.get("blas_env"):
        lines.append(f"- BLAS environment: {res['blas_env']}")
    lines.append("")
    b = res["baseline"]
    if "test_top1" in b:
        lines += [f"Exact network: top-1 {100 * b['test_top1']:.2f}% on test ({b['n_test']} images), "
                  f"{100 * b['val_top1']:.2f}% on validation ({b['n_val']} images held out of train); "
                  f"{b['ms_per_image']:.3f} ms per image at the start" + _interleaved_line(b) + ".", ""]
    cols = ("method", "settings", "params", "gain", "ms/img", "x", "net ms", "net x", "top1 %", "d top1", "se",
            "agree %")
    for split, title in (("test", "Chosen settings on test (reported once)"),
                         ("val", "Sweep on validation (settings chosen here)"),
                         ("speed_only", "Speed only (no data found)")):
        if split not in res:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for d in res[split]:
            acc = "" if d.get("top1") is None else f"{100 * d['top1']:.2f}"
            dl = "" if d.get("delta_top1") is None else f"{100 * d['delta_top1']:+.2f}"
            se = "" if d.get("delta_top1_se") is None else f"{100 * d['delta_top1_se']:.2f}"
            ag = "" if d.get("agreement") is None else f"{100 * d['agreement']:.2f}"
            lines.append(f"| {d['family']} | {d['config']} | {d['params_after']:,} | {d['theoretical_gain']:.2f} | "
                         f"{d['ms_per_image_layers_after']:.3f} | {d['layer_speedup']:.2f} | "
                         f"{d['ms_per_image_net_after']:.3f} | {d['net_speedup']:.2f} | {acc} | {dl} | {se} | {ag} |")
        lines.append("")
    lines += [LEGEND, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
