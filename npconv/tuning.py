"""Per layer, the faster of a factored layer and the dense layer of its rebuilt kernel, chosen by measurement.

A factored layer computes the same linear map as a dense layer whose kernel is rebuilt from its factors
(``layer.to_dense()``). Which of the two is faster depends on the device, the batch size and the shapes. At batch 1
on a GPU, for instance, the several launches of a biclustered layer cost more than the one GEMM of the dense layer
(docs/gpu_results.md), while at batch 128 the factored layer is faster. :func:`tune` times both on the caller's own
input and device and returns a network that runs the faster of each pair, so an approximated network is never slower,
layer by layer, than the same approximation run as dense convolutions. Like ``cudnn.benchmark``, the choice holds for
the device, dtype and batch size it was measured with.

    tuned, rows = npconv.tune(net, x)     # x: a representative batch, on the device the network runs on
    tuned.forward(x)

The outputs agree with the factored network's up to rounding (the dense kernel is rebuilt in float64, then stored in
the factors' dtype). The returned network is a new one: ``net`` is not changed.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from ._validate import check_int, check_real
from .network import Network, _sync_for, format_table

__all__ = ["tune", "TuneResult"]


class TuneResult(NamedTuple):
    """What :func:`tune` returns (unpacks as ``network, rows``): ``network`` runs the faster form of each factored
    layer; ``rows`` has one dict per factored layer: ``name``, ``kind``, ``factored_ms``, ``dense_ms`` (medians) and
    ``choice`` (``"factored"`` or ``"dense"``)."""
    network: Network
    rows: list


def _time_pair(factored, dense, h, repeat, warmup, sync):
    """Median seconds of ``factored(h)`` and ``dense(h)``, the calls interleaved and their order alternating (so that
    a drift of the machine's speed falls on both), each between two synchronisations of the device."""
    times = ([], [])
    forms = ((0, factored), (1, dense))
    for it in range(warmup + repeat):
        for k, layer in (forms if it % 2 == 0 else forms[::-1]):
            sync()
            t0 = time.perf_counter()
            layer(h)
            sync()
            if it >= warmup:
                times[k].append(time.perf_counter() - t0)
    return float(np.median(times[0])), float(np.median(times[1]))


def tune(net, x, *, repeat=5, warmup=1, margin=1.0, print_fn=None):
    """Time each factored layer of ``net`` against ``layer.to_dense()`` on ``x`` and keep the faster.

    Parameters
    ----------
    net : Network
        On the device it will run on (``x``'s).
    x : array (N, ...)
        A representative batch: its size and device are what the choice is made for.
    repeat, warmup : int, keyword-only
        Timed and untimed calls of each form (interleaved); the medians decide.
    margin : float, keyword-only
        The dense layer replaces the factored one only when ``dense_ms * margin < factored_ms``: 1.0 (the default)
        takes the faster; above 1 it keeps a factored layer unless the dense one is faster by that factor.
    print_fn : callable, optional
        Given the table of the rows (for example ``print``).

    Returns a :class:`TuneResult` ``(network, rows)``. The layers are timed in the order of the network, each on the
    output of the layers before it (computed with the forms already chosen).
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv.Network, got {type(net).__name__}")
    net._check_input(x)
    repeat = check_int(repeat, "repeat", min_value=1)
    warmup = check_int(warmup, "warmup", min_value=0)
    margin = check_real(margin, "margin", positive=True)
    sync = _sync_for(x)
    replacements, rows = {}, []
    h = x
    for name, layer in net.items():
        to_dense = getattr(layer, "to_dense", None)
        if to_dense is None:
            h = layer(h)
            continue
        dense = to_dense()
        tf, td = _time_pair(layer, dense, h, repeat, warmup, sync)
        use_dense = td * margin < tf
        if use_dense:
            replacements[name] = dense
        rows.append(dict(name=name, kind=layer.kind, factored_ms=tf * 1e3, dense_ms=td * 1e3,
                         choice="dense" if use_dense else "factored"))
        h = (dense if use_dense else layer)(h)
    if print_fn is not None:
        print_fn(format_table(rows, columns=("name", "kind", "factored_ms", "dense_ms", "choice")))
    return TuneResult(net.replace(replacements), rows)
