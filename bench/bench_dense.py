"""Dense convolution on the CPU: npconv against PyTorch in the same run, with the same thread count.

    python bench/bench_dense.py                 # batch 1 and 128, ZF conv1-2 and AlexNet conv3-5
    python bench/bench_dense.py --quick         # tiny shapes, for a smoke test

Prints GFLOP/s of both and the ratio (npconv speed / PyTorch speed: > 1 means npconv is faster), plus the peak
memory of ZF conv1 at batch 128 measured in a fresh process against input + output size. npconv's figure is the
``Conv2d`` layer's forward pass (``algorithm="auto"``), as a ``Network`` runs it: the layer keeps what it derives
from its weights (the GEMM micro-kernel's packed weights), where ``functional.conv2d`` derives it on every call.
npconv and PyTorch are timed in alternating blocks of calls (``bench._timing.interleaved``: 5 calls a block at
batch 1, 2 above; ``--repeat`` calls of each at least, five times that at batch 1), so that both see the same
phases of a noisy machine. Where "auto" runs Winograd, the direct kernel or the lanes kernel, the im2col + GEMM
time of ``functional.conv2d(algorithm="gemm")`` is shown too.
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
import subprocess  # noqa: E402

import numpy as np  # noqa: E402

#: name -> (C, H=W, F, K, stride, padding)
LAYERS = {
    "zf_conv1": (3, 224, 96, 7, 2, 1),
    "zf_conv2": (96, 55, 256, 5, 2, 0),
    "alexnet_conv3": (256, 13, 384, 3, 1, 1),
    "alexnet_conv4": (384, 13, 384, 3, 1, 1),
    "alexnet_conv5": (384, 13, 256, 3, 1, 1),
}
QUICK_LAYERS = {"tiny_conv1": (3, 32, 16, 5, 2, 1), "tiny_conv2": (16, 15, 32, 3, 1, 1)}


def conv_flops(N, C, H, F, K, s, p):
    OH = (H + 2 * p - K) // s + 1
    return 2.0 * N * F * C * K * K * OH * OH


def make_case(C, H, F, K, N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = (rng.standard_normal((F, C, K, K), dtype=np.float32) / np.sqrt(C * K * K)).astype(np.float32)
    b = rng.standard_normal(F, dtype=np.float32)
    return x, w, b


def rows(quick=False):
    """Rows for bench/run_all.py: npconv and PyTorch per layer and batch. The torch row is the npconv row's
    baseline, so the harness's ``speedup`` column of an npconv row is torch time / npconv time: npconv's speed
    relative to PyTorch (> 1: npconv is faster)."""
    from bench._harness import Row
    out = []
    layers = QUICK_LAYERS if quick else LAYERS
    for name, (C, H, F, K, s, p) in layers.items():
        for N in ((1, 4) if quick else (1, 128)):
            flops = conv_flops(N, C, H, F, K, s, p)
            meta = dict(layer=name, batch=N, dtype="float32")
            out.append(Row(f"{name}/b{N}/npconv", _setup(C, H, F, K, s, p, N, "npconv"), flops=flops,
                           group=f"dense/{name}", meta=dict(meta, impl="npconv"), baseline=f"{name}/b{N}/torch"))
            out.append(Row(f"{name}/b{N}/torch", _setup(C, H, F, K, s, p, N, "torch"), flops=flops,
                           group=f"dense/{name}", meta=dict(meta, impl="torch")))
    return out


def _layer(name, quick):
    return (QUICK_LAYERS if quick else LAYERS)[name]


def _auto_algorithm(name, N, quick):
    """What conv2d's algorithm="auto" runs for this layer and batch."""
    from npconv.functional.conv import auto_algorithm
    C, H, F, K, s, p = _layer(name, quick)
    OH = (H + 2 * p - K) // s + 1
    return auto_algorithm((N, C, H, H), (F, C, K, K), (s, s), (1, 1), 1, (OH, OH))


def _setup(C, H, F, K, s, p, N, impl):
    def setup():
        x, w, b = make_case(C, H, F, K, N)
        if impl == "npconv":
            # the Conv2d layer, as a Network runs it: what it derives from its weights (the GEMM micro-kernel's
            # packed weights) is kept by the layer, where the functional conv2d derives it on every call
            from npconv.layers import Conv2d
            layer = Conv2d(w, b, stride=s, padding=p)
            return lambda: layer(x)
        if impl == "npconv-gemm":
            from npconv.functional import conv2d
            return lambda: conv2d(x, w, b, stride=s, padding=p, algorithm="gemm")
        try:
            import torch
        except ImportError:
            from bench._harness import SkipRow
            raise SkipRow("PyTorch is not installed") from None
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        xt, wt, bt = map(torch.from_numpy, (x, w, b))

        def run_torch():
            with torch.no_grad():
                return torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p)
        return run_torch
    return setup


def peak_memory_child(C, H, F, K, s, p, N):
    """In a fresh process: peak RSS growth of one conv2d call at batch N, against input + output bytes."""
    code = f"""
import numpy as np, json
def hwm():  # peak resident set (VmHWM, KiB): ru_maxrss would include the parent's RSS inherited at fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from npconv.functional import conv2d
import npconv.kernels.cpu.im2col  # compile/load kernels before the baseline
rng = np.random.default_rng(0)
w = rng.standard_normal(({F},{C},{K},{K}), dtype=np.float32); b = np.zeros({F}, np.float32)
conv2d(rng.standard_normal((1,{C},{H},{H}), dtype=np.float32), w, b, stride={s}, padding={p})
x = rng.standard_normal(({N},{C},{H},{H}), dtype=np.float32)
base = hwm()
y = conv2d(x, w, b, stride={s}, padding={p})
peak = hwm()
from npconv._workspace import WS
print(json.dumps(dict(growth_mib=(peak-base)/1024, out_mib=y.nbytes/2**20, in_mib=x.nbytes/2**20,
                      ws_mib=WS.nbytes()/2**20)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory_only():
    C, H, F, K, s, p = LAYERS["zf_conv1"]
    return peak_memory_child(C, H, F, K, s, p, 128)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep-blas-env", action="store_true")
    args = ap.parse_args(argv)
    from bench._env import describe
    from bench._timing import cpu_line, interleaved, measure, thread_info
    threads = args.threads or len(os.sched_getaffinity(0))
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    info = thread_info()
    print(f"# CPU: {cpu_line()}")
    print(f"# threads: torch={threads if torch else 'n/a'} numba={info.get('numba_threads')} "
          f"({info.get('numba_threading_layer')}); BLAS: {info.get('blas')}; env: {describe()}")
    results = []
    print(f"{'layer':<22}{'npconv ms':>11}{'GF/s':>8}{'torch ms':>11}{'GF/s':>8}{'ratio':>8}  algorithm "
          "(winograd, direct, lanes: also im2col+GEMM ms)")
    table = rows(args.quick)
    for r_np, r_t in zip(table[::2], table[1::2]):
        fns = {"npconv": r_np.setup()}
        try:
            fns["torch"] = r_t.setup()
        except Exception as exc:  # SkipRow: no torch
            print(f"# torch skipped: {exc}")
        # npconv and PyTorch in alternating blocks of calls: both see the same phases of the machine
        one = r_np.meta["batch"] == 1
        res = interleaved(fns, args.repeat * (5 if one else 1), block=5 if one else 2)
        t_np = res["npconv"]["median"]
        name = r_np.name.rsplit("/", 1)[0]
        line = f"{name:<22}{t_np * 1e3:>11.2f}{r_np.flops / t_np / 1e9:>8.1f}"
        rec = dict(name=name, batch=r_np.meta["batch"], flops=r_np.flops, npconv=res["npconv"])
        if "torch" in res:
            t_t = res["torch"]["median"]
            line += f"{t_t * 1e3:>11.2f}{r_np.flops / t_t / 1e9:>8.1f}{t_t / t_np:>8.2f}"
            rec.update(torch=res["torch"], ratio=t_t / t_np)
        algo = _auto_algorithm(r_np.meta["layer"], r_np.meta["batch"], args.quick)
        line += f"  {algo}"
        rec["algorithm"] = algo
        if algo in ("winograd", "direct", "lanes"):  # the im2col + GEMM path on the same layer, for the record
            setup = _setup(*_layer(r_np.meta["layer"], args.quick), r_np.meta["batch"], "npconv-gemm")
            rec["npconv_gemm"] = measure(setup(), warmup=1, repeat=args.repeat)
            line += f" ({rec['npconv_gemm']['median'] * 1e3:.2f})"
        print(line, flush=True)
        results.append(rec)
    C, H, F, K, s, p = (QUICK_LAYERS["tiny_conv1"] if args.quick else LAYERS["zf_conv1"])
    N = 4 if args.quick else 128
    mem = peak_memory_child(C, H, F, K, s, p, N)
    print(f"# peak memory, conv1 at batch {N}: grew {mem['growth_mib']:.1f} MiB for an output of "
          f"{mem['out_mib']:.1f} MiB (input {mem['in_mib']:.1f} MiB, allocated before): workspace "
          f"{mem['growth_mib'] - mem['out_mib']:.1f} MiB beyond the persistent per-thread workspace of "
          f"{mem['ws_mib']:.1f} MiB (npconv._workspace.WS, allocated by the batch-1 warm-up call and kept)")
    if args.json:
        from npconv._fileio import atomic_write
        text = json.dumps(dict(info=info, cpu=cpu_line(), env=describe(), results=results, memory=mem), indent=1)
        atomic_write(args.json, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
