"""GPU benchmark: npconv's CuPy path against PyTorch + cuDNN in the same run, for the dense ZF-net layers.

    python bench/bench_gpu.py                    # per-image time vs batch, per-layer table at batch 1 and 128
    python bench/bench_gpu.py --quick            # small batches, a smoke test
    python bench/bench_gpu.py --dtype float64 --out out/bench/gpu_f64.json

Times are CUDA-event times (the device is synchronised, then events are recorded around each call), median of
``--repeat`` runs after warm-up; the cases of a row (npconv on each path, PyTorch) are timed in alternation
(``time_interleaved``), so that a slow phase of the machine does not land on one of them only. The first conv layer
is also timed with its direct kernel switched off (im2col + cuBLAS), and the 3x3 layers on im2col and on Winograd,
so the dispatch rules in ``npconv/kernels/cuda/ops.py`` can be checked against measurement.
Without a CUDA device it prints why and exits with status 0. It also provides ``rows(quick)`` for
``bench/run_all.py`` (GPU rows, skipped where there is no device).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

#: the dense ZF-net feature layers: name -> (C, H=W, F, K, stride, padding)
LAYERS = {
    "conv1": (3, 224, 96, 7, 2, 1),
    "conv2": (96, 55, 256, 5, 2, 0),
    "conv3": (256, 13, 384, 3, 1, 1),
    "conv4": (384, 13, 384, 3, 1, 1),
    "conv5": (384, 13, 256, 3, 1, 1),
}
#: input height/width of the stack (conv1's H)
INPUT_HW = 224
BATCHES = (1, 8, 32, 64, 128)
#: batches of the per-layer table (8 and 32 show where Winograd starts to pay)
LAYER_BATCHES = (1, 8, 32, 128)
QUICK_BATCHES = (1, 4)


def conv_macs(N, C, H, F, K, s, p):
    OH = (H + 2 * p - K) // s + 1
    return N * F * C * K * K * OH * OH


def gpu_missing():
    """Why the GPU path cannot run here (a str), or None."""
    try:
        import cupy
    except Exception as exc:  # not installed, or a broken CUDA install
        return f"CuPy is not importable ({exc!r})"
    try:
        return None if cupy.is_available() else "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy cannot query the device ({exc!r})"


def torch_cuda():
    """The torch module when PyTorch with CUDA is usable (TF32 switched off), else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    # the same arithmetic as npconv (plain float32 multiply-adds): PyTorch lets cuDNN convolutions use TF32
    # tensor cores by default (10-bit mantissa products), which would compare a lower precision
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


# --- the computations --------------------------------------------------------------------------------------------

def _weights(rng, C, F, K, dtype):
    w = (rng.standard_normal((F, C, K, K)) / np.sqrt(C * K * K)).astype(dtype)
    return w, (rng.standard_normal(F) * 0.1).astype(dtype)


#: conv2d paths a layer row can force: the ops.py dispatch thresholds set for the call, then restored
PATHS = {"auto": {}, "im2col": {"DIRECT_CONV_MAX_C": 0, "WINOGRAD_MIN_TILES": 2**62},
         "winograd": {"WINOGRAD_MIN_TILES": 0, "WINOGRAD_MIN_CHANNELS": 0}}


def npconv_layer(name, N, dtype, *, path="auto"):
    """A zero-argument callable running one layer (conv + bias) through npconv.functional on the GPU, with the
    dispatch of ops.py (``path="auto"``) or forced to ``"im2col"`` or ``"winograd"`` (3x3 stride-1 layers)."""
    import cupy as cp

    from npconv.functional import conv2d
    from npconv.kernels.cuda import ops
    C, H, F, K, s, p = LAYERS[name]
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((N, C, H, H)).astype(dtype))
    w, b = (cp.asarray(a) for a in _weights(rng, C, F, K, dtype))
    knobs = PATHS[path]

    def run():
        saved = {k: getattr(ops, k) for k in knobs}
        for k, v in knobs.items():
            setattr(ops, k, v)
        try:
            return conv2d(x, w, b, stride=s, padding=p)
        finally:
            for k, v in saved.items():
                setattr(ops, k, v)
    return run


def npconv_conv_layer(name, N, dtype):
    """A zero-argument callable running the layer as an ``npconv.layers.Conv2d`` on the GPU (the same weights and
    input as :func:`npconv_layer`): what a network runs, with the layer's launch replay at a shape it has seen
    (``kernels/cuda/replay.py``)."""
    import cupy as cp

    from npconv.layers import Conv2d
    C, H, F, K, s, p = LAYERS[name]
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((N, C, H, H)).astype(dtype))
    w, b = _weights(rng, C, F, K, dtype)
    layer = Conv2d(w, b, stride=s, padding=p).to_gpu()
    return lambda: layer(x)


def winograd_shape(name):
    """Whether the layer is 3x3 with stride 1 (the shapes Winograd F(2x2, 3x3) can take)."""
    C, H, F, K, s, p = LAYERS[name]
    return K == 3 and s == 1


def torch_layer(name, N, dtype):
    torch = torch_cuda()
    C, H, F, K, s, p = LAYERS[name]
    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    x = torch.from_numpy(rng.standard_normal((N, C, H, H)).astype(dtype)).to(dev)
    w, b = (torch.from_numpy(a).to(dev) for a in _weights(rng, C, F, K, dtype))

    def run():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, b, stride=s, padding=p)
    return run


def npconv_stack(N, dtype):
    """conv1 .. conv5 with ReLU and the two 3x3/2 max pools (ceil mode, 110 -> 55 and 26 -> 13) of ZF-net."""
    import cupy as cp

    import npconv.functional as F
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((N, 3, INPUT_HW, INPUT_HW)).astype(dtype))
    params = {n: tuple(cp.asarray(a) for a in _weights(rng, C, Fo, K, dtype))
              for n, (C, H, Fo, K, s, p) in LAYERS.items()}

    def run():
        h = x
        for n, (C, H, Fo, K, s, p) in LAYERS.items():
            h = F.relu(F.conv2d(h, *params[n], stride=s, padding=p))
            if n in ("conv1", "conv2"):
                h = F.max_pool2d(h, 3, stride=2, ceil_mode=True)
        return h
    return run


def torch_stack(N, dtype):
    torch = torch_cuda()
    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    x = torch.from_numpy(rng.standard_normal((N, 3, INPUT_HW, INPUT_HW)).astype(dtype)).to(dev)
    params = {n: tuple(torch.from_numpy(a).to(dev) for a in _weights(rng, C, Fo, K, dtype))
              for n, (C, H, Fo, K, s, p) in LAYERS.items()}
    fn = torch.nn.functional

    def run():
        with torch.no_grad():
            h = x
            for n, (C, H, Fo, K, s, p) in LAYERS.items():
                h = fn.relu(fn.conv2d(h, *params[n], stride=s, padding=p))
                if n in ("conv1", "conv2"):
                    h = fn.max_pool2d(h, 3, stride=2, ceil_mode=True)
            return h
    return run


# --- timing with CUDA events ---------------------------------------------------------------------------------------

def event_timer(kind="cupy"):
    """``once(fn)``: the milliseconds of one call of ``fn`` between two CUDA events, recorded after a device
    synchronize (``kind``: ``"cupy"`` events, or ``"torch"`` for PyTorch's)."""
    if kind == "torch":
        torch = torch_cuda()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def once(fn):
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return once
    if kind != "cupy":
        raise ValueError(f"kind must be 'cupy' or 'torch', got {kind!r}")
    import cupy as cp
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def once(fn):
        cp.cuda.Device().synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end)
    return once


def _summary(times):
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def time_cupy(fn, *, warmup, repeat):
    """Median and min milliseconds of ``fn()`` between two CUDA events, after a device synchronize."""
    once = event_timer("cupy")
    for _ in range(warmup):
        fn()
    return _summary([once(fn) for _ in range(repeat)])


def time_torch(fn, *, warmup, repeat):
    once = event_timer("torch")
    for _ in range(warmup):
        fn()
    return _summary([once(fn) for _ in range(repeat)])


def time_interleaved(cases, *, warmup, repeat, block=2, timers=None):
    """Time several callables in alternation, so that a slow phase of the machine falls on all of them alike.

    ``cases``: {name: (fn, kind)} with kind ``"cupy"`` or ``"torch"`` (which events time it). After ``warmup`` calls
    of each, rounds follow until every case has ``repeat`` times: in a round each case in turn makes one untimed call
    (its caches warm again after the others') and ``block`` timed ones. Returns ({name: {"median_ms", "min_ms",
    "n"}}, {name: [the median of each round]}); :func:`paired_speedup` makes a ratio of two cases from the rounds.
    ``timers`` ({kind: once}) replaces :func:`event_timer` (for tests)."""
    if repeat < 1 or block < 1:
        raise ValueError(f"repeat and block must be >= 1, got {repeat} and {block}")
    if not cases:
        raise ValueError("cases must name at least one callable to time, got none")
    timers = dict(timers or {})
    for _fn, kind in cases.values():
        if kind not in timers:
            timers[kind] = event_timer(kind)
    for fn, _kind in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    rounds = {name: [] for name in cases}
    while min(len(t) for t in times.values()) < repeat:
        for name, (fn, kind) in cases.items():
            fn()
            got = [timers[kind](fn) for _ in range(block)]
            times[name] += got
            rounds[name].append(statistics.median(got))
    return {name: _summary(t) for name, t in times.items()}, rounds


class LayerCall:
    """A zero-argument callable running ``layer(x)``; ``layer`` stays reachable, so that a probe can give each rule
    variant its own table of recorded calls (``gpu_profile._with_rules``)."""
    __slots__ = ("layer", "x")

    def __init__(self, layer, x):
        self.layer, self.x = layer, x

    def __call__(self):
        return self.layer(self.x)


def paired_speedup(rounds, base, case):
    """The median over the rounds of ``base``'s time / ``case``'s time in the same round (:func:`time_interleaved`):
    a change of the machine's speed between rounds cancels, where the ratio of the two medians would keep it."""
    return statistics.median(b / c for b, c in zip(rounds[base], rounds[case]))


# --- the standalone run --------------------------------------------------------------------------------------------

def measure_all(batches, layer_batches, dtype, warmup, repeat):
    torch = torch_cuda()
    if torch is not None:
        torch.backends.cudnn.benchmark = True      # cuDNN picks its fastest algorithm per shape
    results = {"stack": [], "layers": []}
    for N in batches:
        cases = {"npconv": (npconv_stack(N, dtype), "cupy")}
        if torch is not None:
            cases["torch"] = (torch_stack(N, dtype), "torch")
        timed, _ = time_interleaved(cases, warmup=warmup, repeat=repeat)
        results["stack"].append({"batch": N, **timed})
        del cases
        free_gpu_memory()
    for N in layer_batches:
        for name in LAYERS:
            # conv1 and the 3x3 layers also forced onto im2col (against the direct kernel, Winograd); all of a row's
            # cases timed in alternation
            cases = {"npconv": (npconv_layer(name, N, dtype), "cupy"),
                     "npconv_layer": (npconv_conv_layer(name, N, dtype), "cupy")}
            if LAYERS[name][0] <= 4 or winograd_shape(name):
                cases["npconv_im2col"] = (npconv_layer(name, N, dtype, path="im2col"), "cupy")
            if winograd_shape(name):
                cases["npconv_winograd"] = (npconv_layer(name, N, dtype, path="winograd"), "cupy")
            if torch is not None:
                cases["torch"] = (torch_layer(name, N, dtype), "torch")
            timed, _ = time_interleaved(cases, warmup=warmup, repeat=repeat)
            results["layers"].append({"layer": name, "batch": N, "macs": conv_macs(N, *LAYERS[name]), **timed})
            del cases
            free_gpu_memory()
    return results


def free_gpu_memory():
    """Return the memory pools' blocks (CuPy's, and PyTorch's when it runs on CUDA) between configurations."""
    import cupy as cp
    cp.get_default_memory_pool().free_all_blocks()
    torch = torch_cuda()
    if torch is not None:
        torch.cuda.empty_cache()



def factored_bench_args(doc, out_name, argv=None):
    """The command line shared by the factored-layer GPU benches (``bench_gpu_lowrank``, ``bench_gpu_bicluster``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, batch 1 and 4")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 20, 5 with --quick)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=_ROOT / "out" / "bench" / out_name, help="JSON output")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 20)
    return args


def measure_against_dense(cases, keys, *, warmup, repeat, with_torch=False):
    """The rows of a factored-layer bench (``bench_gpu_lowrank``, ``bench_gpu_bicluster``). ``cases``: dicts with
    ``name``, ``baseline`` (None for a dense case, else the name of the dense case of its batch, which comes first),
    ``setup`` and optionally ``torch_setup`` (a callable or None: the same layer in PyTorch). A dense case is timed
    alone (with its PyTorch twin); a factored case in alternation with its dense case (and its PyTorch twin), and its
    ``speedup`` is :func:`paired_speedup` of the rounds. Each row has ``keys`` copied from its case, ``time``, and
    ``dense_time``/``speedup``/``torch_time`` where they apply."""
    torch = torch_cuda() if with_torch else None
    results, dense = [], {}
    for c in cases:
        row = {k: c[k] for k in keys}
        timed_cases = {"case": (c["setup"](), "cupy")}
        if c["baseline"] is not None:
            timed_cases["dense"] = (dense[c["baseline"]], "cupy")
        tfn = c["torch_setup"]() if torch is not None and c.get("torch_setup") is not None else None
        if tfn is not None:
            timed_cases["torch"] = (tfn, "torch")
        timed, rounds = time_interleaved(timed_cases, warmup=warmup, repeat=repeat)
        row["time"] = timed["case"]
        if c["baseline"] is None:
            dense.clear()                            # the last batch's dense layer is done with
            dense[c["name"]] = timed_cases["case"][0]
        else:
            row["dense_time"] = timed["dense"]
            row["speedup"] = paired_speedup(rounds, "dense", "case")
        if "torch" in timed:
            row["torch_time"] = timed["torch"]
        results.append(row)
        del timed_cases, tfn
        free_gpu_memory()
    return results


def gpu_guarded(setup):
    """A harness row setup that raises ``SkipRow`` with the reason when there is no usable GPU, else runs ``setup``."""
    def run_setup():
        from bench._harness import SkipRow
        why = gpu_missing()
        if why:
            raise SkipRow(why)
        return setup()
    return run_setup


def format_tables(results):
    lines = ["Conv stack conv1..conv5 (+ReLU, 2 max pools): time per image",
             f"{'batch':>6} {'npconv ms/img':>14} {'torch ms/img':>13} {'npconv/torch':>13}"]
    for r in results["stack"]:
        n = r["batch"]
        ours = r["npconv"]["median_ms"] / n
        theirs = r["torch"]["median_ms"] / n if "torch" in r else None
        lines.append(f"{n:>6} {ours:>14.4f} {_fmt(theirs, 13, '.4f')} {_fmt(theirs and ours / theirs, 13, '.2f')}")
    lines += ["", "Per layer (conv + bias), median CUDA-event time",
              f"{'layer':>6} {'batch':>6} {'npconv ms':>10} {'GFLOP/s':>9} {'im2col ms':>10} {'winograd ms':>12} "
              f"{'torch ms':>9} {'npconv/torch':>13} {'Conv2d ms':>10} {'Conv2d/torch':>13}"]
    for r in results["layers"]:
        ours = r["npconv"]["median_ms"]
        theirs = r["torch"]["median_ms"] if "torch" in r else None
        alt = r["npconv_im2col"]["median_ms"] if "npconv_im2col" in r else None
        wino = r["npconv_winograd"]["median_ms"] if "npconv_winograd" in r else None
        lay = r["npconv_layer"]["median_ms"] if "npconv_layer" in r else None
        gflops = 2 * r["macs"] / (ours * 1e-3) / 1e9
        lines.append(f"{r['layer']:>6} {r['batch']:>6} {ours:>10.3f} {gflops:>9.0f} {_fmt(alt, 10, '.3f')} "
                     f"{_fmt(wino, 12, '.3f')} {_fmt(theirs, 9, '.3f')} {_fmt(theirs and ours / theirs, 13, '.2f')} "
                     f"{_fmt(lay, 10, '.3f')} {_fmt(theirs and lay and lay / theirs, 13, '.2f')}")
    lines.append("npconv/torch > 1 means npconv is slower. GFLOP/s: direct-convolution multiply-adds x 2 / time. "
                 "im2col / winograd: the layer forced onto that path (conv1: the direct kernel switched off). "
                 "npconv: the function conv2d; Conv2d: the layer (which replays its launches at a shape it has seen).")
    return "\n".join(lines)


def _fmt(v, width, spec):
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def _device_info():
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": cp.cuda.Device().compute_capability,
            "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 4 only, few repeats")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=_ROOT / "out" / "bench" / "gpu.json", help="JSON output file")
    args = ap.parse_args(argv)
    why = gpu_missing()
    if why:
        print(f"bench_gpu: skipped, no GPU to measure on: {why}. Nothing was timed.")
        return 0
    batches = QUICK_BATCHES if args.quick else BATCHES
    layer_batches = QUICK_BATCHES if args.quick else LAYER_BATCHES
    repeat = args.repeat or (5 if args.quick else 20)
    results = measure_all(batches, layer_batches, np.dtype(args.dtype), args.warmup, repeat)
    torch = torch_cuda()
    report = {"device": _device_info(), "dtype": args.dtype, "repeat": repeat, "warmup": args.warmup,
              "torch": None if torch is None else {"version": torch.__version__,
                                                   "cudnn": torch.backends.cudnn.version(), "tf32": False},
              "timing": "CUDA events around each call after a device synchronize; median over repeats",
              **results}
    print(f"device: {report['device']['name']}  dtype: {args.dtype}  torch: "
          f"{'not available (no CUDA build)' if torch is None else torch.__version__}")
    print(format_tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


# --- rows for bench/run_all.py ----------------------------------------------------------------------------------------

def rows(quick=False):
    """GPU rows for the harness: each layer at batch 1 and 128 (1 and 4 with ``quick``), npconv and PyTorch."""
    from bench._harness import Row, SkipRow

    def setup_factory(kind, name, N):
        def setup():
            why = gpu_missing()
            if why:
                raise SkipRow(why)
            if kind == "torch":
                if torch_cuda() is None:
                    raise SkipRow("PyTorch with CUDA is not installed")
                fn = torch_layer(name, N, np.float32)
                torch = torch_cuda()
                torch.backends.cudnn.benchmark = True
                return fn
            return npconv_layer(name, N, np.float32)
        return setup

    out = []
    for name in LAYERS:
        for N in (QUICK_BATCHES if quick else (1, 128)):
            if quick and name != "conv3":
                continue
            macs = conv_macs(N, *LAYERS[name])
            meta = {"dtype": "float32", "layer": name, "batch": N}
            torch_name = f"gpu_{name}/b{N}/torch"
            out.append(Row(f"gpu_{name}/b{N}/npconv", setup_factory("npconv", name, N), macs=macs, device="gpu",
                           meta={**meta, "impl": "npconv"}, baseline=torch_name))
            out.append(Row(torch_name, setup_factory("torch", name, N), macs=macs, device="gpu",
                           meta={**meta, "impl": "torch"}))
    return out


if __name__ == "__main__":
    sys.exit(main())
