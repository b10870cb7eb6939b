"""Factored layers (monochromatic, low-rank conv, separable) against npconv's own dense conv2d, ZF conv1 shapes.

    python bench/bench_lowrank.py               # batch 1 and 128, ZF conv1 (3 -> 96, 7x7, stride 2, 224x224)
    python bench/bench_lowrank.py --quick       # tiny shapes, a smoke test
    python bench/bench_lowrank.py --batch 1     # one batch size only
    python bench/bench_lowrank.py --threads 1   # BLAS and numba limited to one thread

For every factored layer it prints the measured speed-up over the dense ``Conv2d`` layer (which, like the factored
layers, keeps what it derives from its weights; same input, same output
array, same threads; the two timed in alternating blocks of calls, medians), the theoretical gain (exact executed
multiply-adds, ``npconv.decompose.cost``; the paper's closed form in brackets) and their ratio, which the project
asks to be >= 0.8. ``rows(quick)`` gives the same cases to ``bench/run_all.py`` (each factored row has the dense
row of its batch as ``baseline``).

Both sides write into an output array allocated once per case (``out=``), as ``Network.forward`` does: the
timings are the steady state of repeated calls, without the page faults of a fresh 567 MiB output (36-200 ms
on this VM depending on whether transparent huge pages are available, which made the ratios drift by 25%).
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

#: (C, H=W, F, K, stride, padding)
ZF_CONV1 = (3, 224, 96, 7, 2, 1)
TINY = (3, 32, 16, 5, 2, 1)
MONO_COLORS = (4, 6, 8, 12, 24)
LOWRANK_RANKS = (8, 16)
SEPARABLE_RANKS = (4, 8)


def _cases(quick):
    """(layer geometry, batch sizes, [(method, size)])."""
    if quick:
        return TINY, (1, 4), [("monochromatic", 4), ("conv_svd", 4), ("separable", 3)]
    return ZF_CONV1, (1, 128), ([("monochromatic", c) for c in MONO_COLORS]
                                + [("conv_svd", r) for r in LOWRANK_RANKS]
                                + [("separable", r) for r in SEPARABLE_RANKS])


def _weights(C, F, K, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((F, C, K, K)) / np.sqrt(C * K * K)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    return w, b


def _factored_layer(method, size, w, b, stride, padding):
    from npconv.decompose.monochromatic import monochromatic
    from npconv.decompose.separable import separable
    from npconv.decompose.svd import conv_svd
    if method == "monochromatic":
        res = monochromatic(w, size, random_state=0, n_init=3)
    elif method == "conv_svd":
        res = conv_svd(w, size)
    elif method == "separable":
        res = separable(w, size)
    else:
        raise ValueError(f"unknown method {method!r}")
    return res.to_layer(bias=b, stride=stride, padding=padding)


def _costs(method, size, geom):
    from npconv.decompose import cost
    C, H, F, K, s, p = geom
    kw = dict(stride=s, padding=p)
    fn = {"monochromatic": cost.monochromatic_cost, "conv_svd": cost.conv_svd_cost,
          "separable": cost.separable_cost}[method]
    out = {}
    for form in ("exact", "paper"):
        dense = cost.conv2d_cost((C, H, H), F, K, form=form, **kw)
        out[form] = (dense, fn((C, H, H), F, K, size, form=form, **kw))
    return out


def cases(quick=False):
    """Plain descriptions of every case: dicts with name, batch, method, size, macs, gains and two setups."""
    geom, batches, methods = _cases(quick)
    C, H, F, K, s, p = geom
    out = []
    for N in batches:
        def dense_setup(N=N):
            from npconv.functional.conv import conv2d_output_shape
            from npconv.layers import Conv2d
            w, b = _weights(C, F, K)
            dense = Conv2d(w, b, stride=s, padding=p)
            x = np.random.default_rng(1).standard_normal((N, C, H, H), dtype=np.float32)
            o = np.empty((N,) + conv2d_output_shape((C, H, H), w.shape, stride=s, padding=p), np.float32)
            return lambda: dense(x, out=o)
        costs0 = _costs("monochromatic", 1, geom)["exact"][0]
        dense_name = f"conv1/dense/b{N}"
        out.append(dict(name=dense_name, batch=N, method="dense", size=None, macs=N * costs0.macs,
                        gain=1.0, gain_paper=1.0, setup=dense_setup, baseline=None))
        for method, size in methods:
            def setup(N=N, method=method, size=size):
                w, b = _weights(C, F, K)
                layer = _factored_layer(method, size, w, b, s, p)
                x = np.random.default_rng(1).standard_normal((N, C, H, H), dtype=np.float32)
                layer(x[:1])                      # compile / fill the weight cache outside the timing
                o = np.empty((N,) + tuple(layer.output_shape((C, H, H))), np.float32)
                return lambda: layer(x, out=o)
            c = _costs(method, size, geom)
            from npconv.decompose.cost import gain
            out.append(dict(name=f"conv1/{method}{size}/b{N}", batch=N, method=method, size=size,
                            macs=N * c["exact"][1].macs, gain=gain(*c["exact"]), gain_paper=gain(*c["paper"]),
                            setup=setup, baseline=dense_name))
    return out


def rows(quick=False):
    """Rows for ``bench/run_all.py`` (``bench._harness.Row``)."""
    from bench._harness import Row
    res = []
    for c in cases(quick):
        res.append(Row(c["name"], c["setup"], macs=c["macs"], group=f"lowrank/b{c['batch']}",
                       baseline=c["baseline"],
                       meta={"impl": "npconv", "dtype": "float32", "method": c["method"], "size": c["size"],
                             "batch": c["batch"], "theoretical_gain": round(c["gain"], 3),
                             "theoretical_gain_paper": round(c["gain_paper"], 3)}))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes")
    ap.add_argument("--batch", type=int, default=None, help="only this batch size")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs of each side per case, interleaved (default 10, 3 at batch >= 64)")
    ap.add_argument("--min-time", type=float, default=1.0, help="keep timing each case until this many seconds")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--threads", type=int, default=None, help="limit BLAS and numba to this many threads")
    ap.add_argument("--keep-blas-env", action="store_true", help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE")
    args = ap.parse_args(argv)
    from bench._timing import thread_limit
    with thread_limit(args.threads):
        _run(args)


def _run(args):
    from bench._env import describe
    from bench._timing import cpu_line, interleaved, thread_info
    from npconv.decompose.cost import gain
    from npconv.layers import Conv2d
    info = thread_info()
    print(f"# CPU: {cpu_line()}")
    print(f"# numba threads {info.get('numba_threads')} ({info.get('numba_threading_layer')}); "
          f"BLAS {info.get('blas')}; env: {describe()}")
    print(f"{'case':<28}{'dense ms':>10}{'ms':>10}{'speedup':>9}{'gain':>7}{'(paper)':>9}{'ratio':>7}")
    geom, batches, methods = _cases(args.quick)
    C, H, F, K, s, p = geom
    w, b = _weights(C, F, K)
    # the dense baseline is the Conv2d layer: it keeps what it derives from its weights, as the factored layers do
    dense = Conv2d(w, b, stride=s, padding=p)
    results = []
    for N in batches:
        if args.batch is not None and N != args.batch:
            continue
        x = np.random.default_rng(1).standard_normal((N, C, H, H), dtype=np.float32)
        o = None
        rep = args.repeat or (3 if N >= 64 else 10)
        for method, size in methods:
            layer = _factored_layer(method, size, w, b, s, p)
            if o is None:
                o = np.empty((N,) + tuple(layer.output_shape((C, H, H))), np.float32)
            # the dense layer is timed with each factored one, blocks alternating, on the same input and output
            t = interleaved({"dense": lambda: dense(x, out=o),
                             "approx": lambda: layer(x, out=o)}, rep, args.min_time)
            td, ta = t["dense"]["median"], t["approx"]["median"]
            c = _costs(method, size, geom)
            g, gp = gain(*c["exact"]), gain(*c["paper"])
            sp = td / ta
            name = f"conv1/{method}{size}/b{N}"
            print(f"{name:<28}{td * 1e3:>10.2f}{ta * 1e3:>10.2f}{sp:>9.2f}{g:>7.2f}{gp:>9.2f}{sp / g:>7.2f}",
                  flush=True)
            results.append(dict(case=name, method=method, size=size, batch=N, dense=t["dense"],
                                approx=t["approx"], speedup=sp, gain_exact=g, gain_paper=gp, ratio=sp / g))
    if args.json:
        from npconv._fileio import atomic_write
        text = json.dumps(dict(info=info, cpu=cpu_line(), env=describe(), results=results), indent=1)
        atomic_write(args.json, lambda f: f.write(text.encode()))
    return results


if __name__ == "__main__":
    main()
