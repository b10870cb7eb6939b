"""Train the bundled CIFAR-10 reference network with PyTorch (an offline tool; npconv never imports this).

    python -m npconv.models.train_reference --epochs 18 --out runs/reference

Reproducible: fixed seeds, single data order per seed, deterministic torch algorithms on the CPU. Each epoch
is logged. Batch norm is used while training and folded into the convolutions on export, so the exported
network is the paper's kind: conv, ReLU, max-pool, LRN, dense layers. The result is written in npconv's
format by ``npconv.io`` (``--out``/reference.npz) together with the float64 logits of the training tool on
the test split, for the agreement check (``--export-only`` redoes only that step).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .._fileio import atomic_write

# architecture: (name, kind, params). The PyTorch model and the exported npconv network are built from it.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
ARCH = [
    ("conv1", 3, 64, 5, 2), ("pool1", 3, 2), ("norm1",),
    ("conv2", 64, 128, 5, 2), ("pool2", 3, 2), ("norm2",),
    ("conv3", 128, 192, 3, 1),
    ("conv4", 192, 128, 3, 1), ("pool4", 2, 2),
    ("fc5", 128 * 4 * 4, 512), ("fc6", 512, 10),
]


def build_torch_model(torch):
    nn = torch.nn
    layers = []
    for spec in ARCH:
        name = spec[0]
        if name.startswith("conv"):
            _, cin, cout, k, p = spec
            layers += [(name, nn.Conv2d(cin, cout, k, padding=p)), (name + "_bn", nn.BatchNorm2d(cout)),
                       (name + "_relu", nn.ReLU(inplace=True))]
        elif name.startswith("pool"):
            _, k, s = spec
            layers += [(name, nn.MaxPool2d(k, s, ceil_mode=True))]
        elif name.startswith("norm"):
            layers += [(name, nn.LocalResponseNorm(LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"]))]
        elif name.startswith("fc"):
            _, fin, fout = spec
            if name == "fc5":
                layers += [("flatten", nn.Flatten())]
            layers += [(name, nn.Linear(fin, fout))]
            if name != "fc6":
                layers += [(name + "_relu", nn.ReLU(inplace=True)), (name + "_drop", nn.Dropout(0.5))]
    from collections import OrderedDict
    return nn.Sequential(OrderedDict(layers))


def augment(xb, rng):
    """Random 4-pixel-padded crop and horizontal flip on a uint8 NCHW batch."""
    n = len(xb)
    pad = np.pad(xb, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    out = np.empty_like(xb)
    oy, ox = rng.integers(0, 9, n), rng.integers(0, 9, n)
    flip = rng.random(n) < 0.5
    for i in range(n):
        im = pad[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        out[i] = im[:, :, ::-1] if flip[i] else im
    return out


def to_float(xb, torch):
    x = torch.from_numpy(xb).float().div_(255.0)
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - m) / s


def to_double(xb, torch):
    """The same preprocessing in float64 throughout (for the oracle logits npconv is compared with)."""
    x = torch.from_numpy(np.asarray(xb, np.float64)) / 255.0
    m = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (x - m) / s


def evaluate(model, X, y, torch, bs=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(X), bs):
            correct += (model(to_float(X[i:i + bs], torch)).argmax(1).numpy() == y[i:i + bs]).sum()
    return correct / len(X)


def folded_weights(model):
    """BN folded into the preceding conv: w' = w*g/sqrt(v+eps), b' = (b-m)*g/sqrt(v+eps) + beta."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    out = {}
    for spec in ARCH:
        name = spec[0]
        if name.startswith("conv"):
            scale = sd[f"{name}_bn.weight"] / np.sqrt(sd[f"{name}_bn.running_var"] + 1e-5)
            out[name + ".weight"] = sd[name + ".weight"] * scale[:, None, None, None]
            out[name + ".bias"] = (sd[name + ".bias"] - sd[f"{name}_bn.running_mean"]) * scale + sd[f"{name}_bn.bias"]
        elif name.startswith("fc"):
            out[name + ".weight"] = sd[name + ".weight"]
            out[name + ".bias"] = sd[name + ".bias"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="folder holding CIFAR-10 (see npconv.datasets)")
    ap.add_argument("--out", default="runs/reference")
    ap.add_argument("--limit-batches", type=int, default=0, help="for a smoke test: batches per epoch")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: export an earlier run in --out to npconv's format (--bundle)")
    ap.add_argument("--bundle", default=None,
                    help="where to write the npconv network and its test fixtures (default: next to this script)")
    args = ap.parse_args(argv)
    if args.export_only:
        return export(args.out, args.bundle)

    import torch
    from npconv.datasets import load_cifar10, train_val_split
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)

    Xtr_all, ytr_all = load_cifar10("train", root=args.data, progress=True)
    Xte, yte = load_cifar10("test", root=args.data, progress=True)
    tr, va = train_val_split(ytr_all, 5000)
    Xtr, ytr, Xva, yva = Xtr_all[tr], ytr_all[tr], Xtr_all[va], ytr_all[va]

    model = build_torch_model(torch).to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps = len(Xtr) // args.batch_size
    if args.limit_batches:
        steps = min(steps, args.limit_batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps,
                                                pct_start=0.25)
    lossf = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    t_start = time.time()
    for ep in range(args.epochs):
        model.train()
        perm = rng.permutation(len(Xtr))
        t0, tot, nb = time.time(), 0.0, 0
        for b in range(steps):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb = to_float(augment(Xtr[idx], rng), torch).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss = lossf(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            nb += 1
        va_acc = evaluate(model, Xva, yva, torch)
        rec = dict(epoch=ep + 1, train_loss=tot / max(nb, 1), val_top1=float(va_acc), lr=sched.get_last_lr()[0],
                   epoch_s=round(time.time() - t0, 1), elapsed_s=round(time.time() - t_start, 1))
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    log.close()     # a progress log, appended epoch by epoch; the artifacts below are written atomically
    te_acc = evaluate(model, Xte, yte, torch)
    state, folded = model.state_dict(), folded_weights(model)
    atomic_write(os.path.join(args.out, "model_state.pt"), lambda f: torch.save(state, f))
    atomic_write(os.path.join(args.out, "folded.npz"), lambda f: np.savez(f, **folded))
    summary = dict(test_top1=float(te_acc), val_top1=float(va_acc), epochs=args.epochs, seed=args.seed,
                   threads=args.threads, train_s=round(time.time() - t_start, 1), torch=torch.__version__,
                   argv=sys.argv[1:])
    text = json.dumps(summary, indent=1)
    atomic_write(os.path.join(args.out, "summary.json"), lambda f: f.write(text.encode()))
    print(json.dumps(summary))
    export(args.out, args.bundle)


def export(run_dir, bundle=None):
    """Write the trained model in npconv's format, plus the oracle outputs the tests compare against.

    - ``reference.npz``: the network (float64 weights, batch norm folded), input = raw RGB floats in [0, 255];
    - ``tests/data/reference_guard.npz``: 8 seeded synthetic images and the training tool's float64 logits on them
      (a regression guard that needs no dataset);
    - ``tests/data/reference_torch_test_logits.npy``: the training tool's float64 logits on the whole test split.
    """
    import torch
    import npconv
    from npconv.datasets import CIFAR10_CLASSES, load_cifar10
    from npconv.layers import Normalize
    here = os.path.dirname(os.path.abspath(__file__))
    bundle = bundle or here
    tests_data = os.path.join(os.path.dirname(os.path.dirname(here)), "tests", "data")
    os.makedirs(tests_data, exist_ok=True)
    model = build_torch_model(torch)
    model.load_state_dict(torch.load(os.path.join(run_dir, "model_state.pt"), weights_only=True))
    model = model.double().eval()
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    body = npconv.from_torch(model)
    mean = np.array(MEAN, np.float64) * 255
    std = np.array(STD, np.float64) * 255
    meta = dict(name="npconv-cifar10-reference", classes=list(CIFAR10_CLASSES),
                input="RGB, NCHW, float values in [0, 255] (uint8 images cast to float)",
                trained_with=f"torch {summary['torch']}",
                command="python -m npconv.models.train_reference " + " ".join(summary.get("argv", [])))
    net = npconv.Network([("normalize", Normalize(mean, std))] + body.items(), input_shape=(3, 32, 32), meta=meta)
    rng = np.random.default_rng(2014)
    guard_x = rng.integers(0, 256, (8, 3, 32, 32)).astype(np.float64)
    with torch.no_grad():
        guard_logits = model(to_double(guard_x, torch)).numpy()
        Xte, yte = load_cifar10("test")
        test_logits = np.concatenate([model(to_double(Xte[i:i + 500], torch)).numpy()
                                      for i in range(0, len(Xte), 500)])
    # the training tool's top-1 on test, in float64 (the float32 figure is in reference_summary.json)
    net.meta["test_top1_training_tool"] = float((test_logits.argmax(1) == yte).mean())
    npconv.save(net, os.path.join(bundle, "reference.npz"), compress=True)
    atomic_write(os.path.join(tests_data, "reference_guard.npz"),
                 lambda f: np.savez(f, x=guard_x, logits=guard_logits))
    atomic_write(os.path.join(tests_data, "reference_torch_test_logits.npy"), lambda f: np.save(f, test_logits))
    for src, dst in (("train_log.jsonl", "reference_train_log.jsonl"), ("summary.json", "reference_summary.json")):
        with open(os.path.join(run_dir, src), "rb") as f:
            data = f.read()
        atomic_write(os.path.join(bundle, dst), lambda f, data=data: f.write(data))
    print("exported to", os.path.join(bundle, "reference.npz"))


if __name__ == "__main__":
    main()
