"""Plots of the main job (matplotlib, optional: ``pip install 'npconv[plot]'``)."""
from __future__ import annotations

import numpy as np

__all__ = ["accuracy_vs_speedup", "conv1_filters"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    from ._fileio import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def accuracy_vs_speedup(results, path):
    """Top-1 change against MEASURED speedup of the approximated layers, one series per method (validation)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fams = {}
    for d in results.get("val", []):
        fams.setdefault(d["family"], []).append(d)
    for fam, rows in fams.items():
        rows = sorted(rows, key=lambda d: d["layer_speedup"])
        ax.plot([d["layer_speedup"] for d in rows], [100 * d["delta_top1"] for d in rows], "o-", label=fam)
    for d in results.get("test", []):
        ax.plot(d["layer_speedup"], 100 * d["delta_top1"], "k*", ms=10)
    ax.axhline(-1.0, color="grey", ls="--", lw=1, label="1 point budget")
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("measured speedup of the approximated layer(s), CPU")
    ax.set_ylabel("top-1 change (points)")
    ax.set_title("Accuracy against measured speedup (validation; stars: chosen, on test)")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def _tile(w):
    """(F, 3, X, Y) filters -> an RGB mosaic scaled to [0, 1] per filter."""
    F, C, X, Y = w.shape
    cols = int(np.ceil(np.sqrt(F)))
    rows = int(np.ceil(F / cols))
    img = np.ones((rows * (X + 1), cols * (Y + 1), 3))
    for f in range(F):
        a = w[f].transpose(1, 2, 0)
        a = (a - a.min()) / (np.ptp(a) + 1e-12)
        r, c = divmod(f, cols)
        img[r * (X + 1):r * (X + 1) + X, c * (Y + 1):c * (Y + 1) + Y] = a
    return img


def conv1_filters(net, path, results=None, *, layer="conv1", colors=None):
    """The first layer's filters beside their monochromatic approximation (the paper's Fig. 6)."""
    from .decompose.monochromatic import monochromatic
    w = np.asarray(net[layer].weight, np.float64)
    if w.shape[1] != 3:
        raise ValueError(f"layer {layer!r} must have 3 input channels to be shown as colour, got {w.shape[1]}")
    if colors is None:
        colors = 6
        for d in (results or {}).get("test", []):
            s = d.get("settings", {}).get(layer, {})
            if s.get("method") == "Monochromatic":
                colors = s["colors"]
                break
    approx = monochromatic(w, colors, random_state=0).to_tensor()
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, a, t in ((axes[0], w, "original"), (axes[1], approx, f"monochromatic, C'={colors}")):
        ax.imshow(_tile(a), interpolation="nearest")
        ax.set_title(f"{layer}: {t}")
        ax.axis("off")
    _save(fig, path)
    plt.close(fig)
