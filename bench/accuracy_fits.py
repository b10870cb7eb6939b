"""Top-1 of the bundled CIFAR network under approximations fitted in different ways: the accuracy side of the
fits (docs/approximations.md, docs/approximations_bicluster.md). No timing.

    python bench/accuracy_fits.py                 # the tables of the docs (about 3 minutes on 2 cores)
    python bench/accuracy_fits.py --quick         # one plan per table, 500 validation images (a smoke test)

Two tables, each row a plan, each column a way of fitting it, the cells the change of top-1 (points) on the
validation split (the last 5,000 training images, as the main job), the fits computed from the main job's 512
calibration images (training split, seed 0):

* ``metric``: the biclustered layers fitted to the weights against in the data metric (``fit="data"``);
* ``stacking``: every layer in the data metric, fitted on the exact network's inputs (``plain``), in network order on
  the approximated network's inputs (``sequential``), and that plus the dense layers above refitted
  (``refit_above``).

Needs CIFAR-10 (``--data``, ``$NPCONV_DATA_DIR``, the user cache or ``../shared/data``); without it, it says so and
exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def plans(quick):
    from npconv.approximate import SVD, Bicluster, Monochromatic, Separable

    def bic(fit, **kw):
        return Bicluster(fit=fit, **kw)

    cp = dict(G=8, H=2, method="cp")
    svd = dict(G=2, H=2, method="svd")
    metric = [("conv2 Bicluster-CP K=16", lambda f: {"conv2": bic(f, rank=16, **cp)}),
              ("conv2 Bicluster-CP K=24", lambda f: {"conv2": bic(f, rank=24, **cp)}),
              ("conv2 Bicluster-SVD (12, 32)", lambda f: {"conv2": bic(f, ranks=(12, 32), **svd)}),
              ("conv2 Bicluster-SVD (16, 48)", lambda f: {"conv2": bic(f, ranks=(16, 48), **svd)})]
    mono = {"conv1": Monochromatic(colors=24, fit="data")}
    cp12 = {"conv2": Bicluster(G=8, H=2, rank=12, method="cp", fit="data")}
    sep = {n: Separable(rank=64, fit="data") for n in ("conv3", "conv4")}
    stacking = [("conv1 Monochromatic(24)", mono),
                ("conv2 Bicluster-CP K=8", {"conv2": Bicluster(G=8, H=2, rank=8, method="cp", fit="data")}),
                ("conv3 + conv4 Separable(64)", sep),
                ("conv1 Monochromatic(24) + conv2 Bicluster-CP K=12", {**mono, **cp12}),
                ("the above + conv3, conv4 Separable(64) + fc5 SVD(16)",
                 {**mono, **cp12, **sep, "fc5": SVD(rank=16, fit="data")})]
    if quick:
        return metric[:1], stacking[:1]
    return metric, stacking


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="folder holding CIFAR-10")
    ap.add_argument("--quick", action="store_true", help="one plan per table, 500 validation images")
    args = ap.parse_args(argv)
    from npconv import datasets
    from npconv.approximate import approximate
    from npconv.experiment import evaluate
    from npconv.models import load_reference
    try:
        Xtr, ytr = datasets.load_cifar10("train", root=args.data)
    except datasets.DataNotFoundError as exc:
        print(f"accuracy_fits: skipped, no CIFAR-10 data ({str(exc).splitlines()[0]})")
        return 0
    net = load_reference()
    tr_idx, va_idx = datasets.train_val_split(ytr, 5000)
    rng = np.random.default_rng(0)
    calib = Xtr[tr_idx[rng.choice(len(tr_idx), 512, replace=False)]].astype(np.float64)
    if args.quick:
        va_idx = va_idx[np.linspace(0, len(va_idx) - 1, 500).astype(int)]
    Xva, yva = Xtr[va_idx], ytr[va_idx]
    base = evaluate(net, Xva, yva)[0]
    print(f"exact network: top-1 {100 * base:.2f}% on {len(yva)} validation images")
    metric, stacking = plans(args.quick)

    def delta(plan, **kw):
        t0 = time.perf_counter()
        top1 = evaluate(approximate(net, plan, data=calib, **kw), Xva, yva)[0]
        return f"{100 * (top1 - base):+.2f} ({time.perf_counter() - t0:.0f} s)"

    print("\n| plan | weight fit | data fit |\n|---|---|---|")
    for label, make in metric:
        print(f"| {label} | {delta(make('weights'))} | {delta(make('data'))} |", flush=True)
    print("\n| plan | plain | sequential | refit_above |\n|---|---|---|---|")
    for label, plan in stacking:
        print(f"| {label} | {delta(plan)} | {delta(plan, sequential=True)} | {delta(plan, refit_above=True)} |",
              flush=True)
    print("\ncells: change of top-1 in points against the exact network on the validation images (the fit and "
          "evaluation time in parentheses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
