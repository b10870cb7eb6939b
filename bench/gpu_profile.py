"""Where the GPU time of the dense conv2 and of the factored layers goes: probes for a lent GPU (issue 3).

    python bench/gpu_profile.py probe [--out FILE.json]   # CUDA-event times of the parts and of variants
    ncu --profile-from-start off ... python bench/gpu_profile.py ncu     # one pass of each workload, profiled

``probe`` times, on ZF conv2 (96 -> 256, 5x5, stride 2, 55x55) at batch 128 and the CIFAR reference net's conv2:
the whole npconv conv (im2col + GEMM + scatter, the chunk size that ``ops.WORKSPACE_BYTES`` gives and larger ones),
its im2col kernel alone, its GEMM alone in both operand orders and chunk sizes, cuDNN's conv and PyTorch's GEMM of the
same shape (TF32 off on both sides). ``ncu`` runs each workload once between ``cudaProfilerStart`` and ``Stop`` after
a warm-up, so that ``ncu --profile-from-start off`` sees only the timed kernels (``NCU_WORKLOADS``; ``--workloads
b128``: npconv and cuDNN conv2, the biclustered CP layer with K = 8 and 12 and the monochromatic conv1 with C' = 24 at
batch 128; ``b1``: conv2 and CP K = 8 at batch 1, where the layers' time hardly depends on their work).
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

from bench.bench_gpu import gpu_missing, time_cupy, time_torch, torch_cuda  # noqa: E402

#: (C, H=W, F, K, stride, padding)
SHAPES = {"zf_conv2": (96, 55, 256, 5, 2, 0), "cifar_conv2": (64, 16, 128, 5, 1, 2)}


def _conv_inputs(cp, geom, N, seed=0):
    C, H, F, K, s, p = geom
    rng = np.random.default_rng(seed)
    x = cp.asarray(rng.standard_normal((N, C, H, H), dtype=np.float32))
    w = cp.asarray((rng.standard_normal((F, C, K, K)) / np.sqrt(C * K * K)).astype(np.float32))
    b = cp.asarray(rng.standard_normal(F).astype(np.float32))
    return x, w, b


def probe(N=128, repeat=20):
    import cupy as cp

    from npconv.functional import conv2d
    from npconv.kernels.cuda import ops
    torch = torch_cuda()
    out = {}

    def t(name, fn, torch_fn=False):
        r = (time_torch if torch_fn else time_cupy)(fn, warmup=3, repeat=repeat)
        out[name] = r["median_ms"]
        print(f"{name:60s} {r['median_ms']:8.3f} ms (min {r['min_ms']:.3f})", flush=True)

    for key, geom in SHAPES.items():
        C, H, F, K, s, p = geom
        x, w, b = _conv_inputs(cp, geom, N)
        OH = (H + 2 * p - K) // s + 1
        P, KK = OH * OH, C * K * K
        saved = ops.WORKSPACE_BYTES
        for ws in (saved, 4 * saved, 16 * saved):
            ops.WORKSPACE_BYTES = ws
            per_image = (KK + F) * P * 4
            nb = max(1, min(N, ws // per_image))
            t(f"{key}/b{N}/npconv conv (chunk {nb} images)", lambda: conv2d(x, w, b, stride=s, padding=p))
        ops.WORKSPACE_BYTES = saved
        for nb in (8, 33, N):
            col = cp.empty((KK, nb * P), dtype=np.float32)
            t(f"{key}/b{N}/im2col alone x{-(-N // nb)} (chunk {nb})",
              lambda col=col, nb=nb: [ops._launch("im2col", np.dtype(np.float32), ops.im2col_grid(nb * P, C),
                                                  (ops._BLOCK,),
                                                  (x[i:i + nb], col, min(nb, N - i), C, H, H, K, K, s, s, p, p, 1,
                                                   1, OH, OH))
                                      for i in range(0, N, nb)])
            col = cp.asarray(np.random.default_rng(2).standard_normal((KK, nb * P), dtype=np.float32))
            w2 = w.reshape(F, KK)
            reps = -(-N // nb)
            t(f"{key}/b{N}/gemm (F,K)@(K,{nb}P) x{reps}", lambda col=col, reps=reps: [w2 @ col for _ in range(reps)])
            colT = cp.ascontiguousarray(col.T)
            t(f"{key}/b{N}/gemm ({nb}P,K)@(K,F) x{reps}",
              lambda colT=colT, reps=reps: [colT @ w2.T for _ in range(reps)])
            per = col.reshape(KK, nb, P).transpose(1, 0, 2).copy()      # (nb, K, P): each image's own columns
            t(f"{key}/b{N}/gemm batched (F,K)@({nb}x K,P) x{reps}",
              lambda per=per, reps=reps: [cp.matmul(w2, per) for _ in range(reps)])
            if torch is not None:
                tw, tc = torch.as_tensor(w2, device="cuda"), torch.as_tensor(col, device="cuda")
                t(f"{key}/b{N}/torch gemm (F,K)@(K,{nb}P) x{reps}", lambda tw=tw, tc=tc, reps=reps:
                  [tw @ tc for _ in range(reps)], torch_fn=True)
            del col, colT, per
        if torch is not None:
            tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (x, w, b))
            torch.backends.cudnn.benchmark = True
            with torch.no_grad():
                t(f"{key}/b{N}/cudnn conv", lambda: torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p),
                  torch_fn=True)
        flops = 2.0 * N * F * KK * P
        out[f"{key}/gflop"] = flops / 1e9
        cp.get_default_memory_pool().free_all_blocks()
    return out


def _profiled(run, name):
    import cupy as cp
    run()
    run()
    cp.cuda.Device().synchronize()
    cp.cuda.runtime.profilerStart()
    run()
    cp.cuda.Device().synchronize()
    cp.cuda.runtime.profilerStop()
    print(f"profiled {name}", flush=True)


#: the ncu workloads: name -> (batch, what); "conv2" is npconv's dense ZF conv2 and cuDNN's, "cp<K>" the biclustered
#: CP layer G=48 H=2 with that K, "mono<C'>" the monochromatic ZF conv1 with C' colours
NCU_WORKLOADS = {"b128": ((128, "conv2"), (128, "cp8"), (128, "cp12"), (128, "mono24")),
                 "b1": ((1, "conv2"), (1, "cp8"))}


def ncu_workloads(which="b128"):
    """Run each workload of NCU_WORKLOADS[which] once between cudaProfilerStart/Stop (after two warm-up runs)."""
    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, factored_callable
    from bench.bench_gpu_lowrank import ZF_CONV1
    from bench.bench_gpu_lowrank import factored_callable as lowrank_callable
    from npconv.functional import conv2d
    torch = torch_cuda()
    for N, what in NCU_WORKLOADS[which]:
        if what == "conv2":
            geom = SHAPES["zf_conv2"]
            C, H, F, K, s, p = geom
            x, w, b = _conv_inputs(cp, geom, N)
            _profiled(lambda: conv2d(x, w, b, stride=s, padding=p), f"npconv_conv2_b{N}")
            if torch is not None:
                torch.backends.cudnn.benchmark = True
                tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (x, w, b))
                with torch.no_grad():
                    _profiled(lambda: torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p),
                              f"cudnn_conv2_b{N}")
            del x
        elif what.startswith("cp"):
            _profiled(factored_callable("cp", (48, 2, int(what[2:])), N, ZF_CONV2, np.float32), f"{what}_b{N}")
        else:
            _profiled(lowrank_callable("monochromatic", int(what[4:]), N, ZF_CONV1, np.float32), f"{what}_b{N}")
        cp.get_default_memory_pool().free_all_blocks()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("probe", "ncu"))
    ap.add_argument("--out", help="JSON file for the probe's times (written atomically)")
    ap.add_argument("--workloads", choices=sorted(NCU_WORKLOADS), default="b128",
                    help="ncu: which set of workloads (NCU_WORKLOADS)")
    args = ap.parse_args(argv)
    why = gpu_missing()
    if why is not None:
        print(f"gpu_profile {args.what}: skipped, no GPU ({why})")
        return 0
    if args.what == "probe":
        res = probe()
        if args.out:
            from npconv._fileio import atomic_write
            text = json.dumps(res, indent=1)
            atomic_write(args.out, lambda f: f.write(text.encode()))
    else:
        ncu_workloads(args.workloads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
