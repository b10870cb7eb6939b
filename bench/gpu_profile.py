"""Where the GPU time of the dense conv2 and of the factored layers goes: probes for a lent GPU (issue 3).

    python bench/gpu_profile.py probe [--out FILE.json]   # CUDA-event times of the parts and of variants
    ncu --profile-from-start off ... python bench/gpu_profile.py ncu     # one pass of each workload, profiled
    python bench/gpu_profile.py host [--out FILE.json]    # where the host time of eager batch-1 calls goes
    python bench/gpu_profile.py small [--out FILE.json]   # small batches: dense vs cuDNN, fused expansion or not
    python bench/gpu_profile.py cpblock [--out FILE.json] # the CP front end with 1, 2, 4 images a block
    python bench/gpu_profile.py lowrank [--out FILE.json] # ZF conv1's low-rank and separable forms, rules A/B
    python bench/gpu_profile.py bicrules [--out FILE.json] # biclustered SVD conv2's rules at batch 1, 8
    python bench/gpu_profile.py latency [--out FILE.json]  # dense conv2-conv5 and cuDNN: host, queued, latency

``probe`` times, on ZF conv2 (96 -> 256, 5x5, stride 2, 55x55) at batch 128 and the CIFAR reference net's conv2:
the whole npconv conv (im2col + GEMM + scatter, the chunk size that ``ops.WORKSPACE_BYTES`` gives and larger ones),
its im2col kernel alone, its GEMM alone in both operand orders and chunk sizes, cuDNN's conv and PyTorch's GEMM of the
same shape (TF32 off on both sides). ``ncu`` runs each workload once between ``cudaProfilerStart`` and ``Stop`` after
a warm-up, so that ``ncu --profile-from-start off`` sees only the timed kernels (``NCU_WORKLOADS``; ``--workloads
b128``: npconv and cuDNN conv2, the biclustered CP layer with K = 8 and 12 and the monochromatic conv1 with C' = 24 at
batch 128; ``b1``: conv2 and CP K = 8 at batch 1, where the layers' time hardly depends on their work; ``convs``:
npconv and cuDNN ZF conv3 and conv4 at batch 8, im2col + cuBLAS on npconv's side; ``lr``: ZF conv1 at batches 1
and 128, dense (npconv and cuDNN), monochromatic, low-rank and separable; ``sep``: the separable form as two passes
and as one ``sep_conv`` launch).
``host`` answers the batch-1 question from the host side: for eager calls at batch 1 of ZF conv2 and conv3, ZF
conv1 (``conv2d`` and the ``Conv2d`` layer) and its monochromatic (C' = 4), low-rank (rank 8) and separable (rank 4)
layers, the CP layer (K = 8), the SVD layer ((K1, K2) = (19, 51)), the shared separable layer (K = 6, S = 4) and the
whole dense ZF network it measures the time per call when calls are queued back to back
(one synchronisation at the end) and when each call is synchronised, and profiles the calls with cProfile, splitting
the host time between npconv's Python, CuPy, NumPy and the rest (``host_split``).
``small`` measures small batches, where a call's time is mostly the host's: ZF conv2-conv5 at batches 1-32, npconv
and cuDNN; the biclustered CP conv2 (K = 8, 12) at batches 1-8 with its expansion fused (``bic_expand``) and as
GEMMs + scatters (the rule ``ops_bicluster.EXPAND_TILED_MAX_COLUMNS``); the biclustered SVD conv2 (19, 51) with its
gather and reductions fused (``bic_reduce``) and as ``bic_gather`` + GEMMs (``REDUCE_TILED_MAX_COLUMNS``); the
shared separable conv2 (K = 6, S = 4) with its combination and expansion fused (``bic_expand_shared``) and as
``bic_shared_combine`` + GEMMs + scatters (``EXPAND_TILED_MAX_COLUMNS``); the monochromatic ZF conv1 (C' = 4) at
batches 1-8 with each colour's filters shared over several blocks (``split``) or one block a colour (``whole``; the
rule ``ops_lowrank.MONO_MIN_BLOCKS``). Each as the latency of one call (CUDA events around it, after a synchronize;
the variants of a row in alternation, ``bench_gpu.time_interleaved``) and as the time per call of 50 calls queued
back to back.
``lowrank`` times ZF conv1's low-rank form (rank 8, 16) at batches 1, 8 and 128 on each path of ``ops_lowrank``, in
alternation (latency and queued, as ``small``): one launch of ``lr_conv`` (``LR_CONV_MAX_RANK`` 32) with one or two
output pixels a thread (``LR_CONV_PX2_MIN_PIXELS`` above or at 0), ``factor_conv`` and ``lr_expand``
(``LR_CONV_MAX_RANK`` 0), ``factor_conv``, a cuBLAS GEMM and ``bias_add`` (both rules 0); the separable form (rank 4,
8) as two ``factor_conv`` passes or in one launch of ``sep_conv`` (``SEP_CONV_MAX_PIXELS``), at batches 1 and 8 with
its filters shared among blocks below 0 (never), 256, 512 or 1024 blocks (``SEP_MIN_BLOCKS``, ``SHARE_MIN_BLOCKS``);
at batches 1 and 8 the monochromatic form (C' = 4, 6) with its colours' filters shared in 8- or 4-filter shares up
to 512 or 1024 blocks (``MONO_SHARE_FILTERS``, ``MONO_MIN_BLOCKS``: ``MONO_SHARE_RULES``); and the dense conv1,
npconv and cuDNN, as the reference of each batch.
``bicrules`` times the biclustered SVD conv2 ((K1, K2) = (19, 51)) with its spatial stage's K1 channels in 1, 2 or 4
splits among blocks (``ops_bicluster.SVD_SPLIT_MAX_BLOCKS``, ``SVD_SPLITS``), at batches 1 and 8 (``--batches``),
against the dense ``Conv2d`` layer, the layers replaying their launches (:func:`bic_rules`; the twenty-fifth
session's run compared the shared separable conv2's combination fused into the expansion or not, and blocks of 256,
128 and 64 threads for ``bic_svd_spatial``; the twenty-seventh's, 4 filters a block: rules since removed).
``latency`` splits the benches' measure of the dense ZF conv2-conv5 (the ``Conv2d`` layer, replayed) and of
cuDNN's at batches 1, 8, 32 and 128 (``--batches``): the host time of a call, the time of a call queued among 50,
and the latency of one call between CUDA events (:func:`dense_latency`).
``cpblock`` times the biclustered CP conv2 (K = 6, 8, 12, batch 128) with ``ops_bicluster.CP_IMAGES_PER_BLOCK`` at
1, 2 and 4 in alternation, and checks that the outputs agree (``ncu --workloads cp`` profiles the front end alone).
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

from bench.bench_gpu import (gpu_missing, paired_speedup, time_cupy, time_interleaved, time_torch,  # noqa: E402
                             torch_cuda)

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


#: the ncu workloads: name -> (batch, what); "conv<k>" is npconv's dense ZF conv<k> and cuDNN's, "cp<K>" the biclustered
#: CP layer G=48 H=2 with that K, "bsvd" / "bshared" the biclustered SVD (19, 51) and shared (K 6, S 4) layers,
#: "mono<C'>" the monochromatic ZF conv1 with C' colours, "svd<t>" / "sep<K>" its
#: low-rank (rank t) and separable (rank K) forms, "sepf<K>" the separable form in one sep_conv launch
NCU_WORKLOADS = {"b128": ((128, "conv2"), (128, "cp8"), (128, "cp12"), (128, "mono24")),
                 "b1": ((1, "conv2"), (1, "cp8")),
                 "convs": ((8, "conv3"), (8, "conv4")),
                 "cp": ((128, "cp6"), (128, "cp8"), (128, "cp12"), (1, "cp8"), (1, "cp12")),
                 "bic1": ((1, "conv2"), (1, "bsvd"), (1, "bshared"), (1, "cp8")),
                 "lr": ((1, "conv1"), (1, "mono4"), (1, "svd8"), (1, "sep4"), (128, "svd8"), (128, "sep4")),
                 "sep": ((1, "sep4"), (1, "sepf4"), (128, "sep4"), (128, "sepf4"))}


def ncu_workloads(which="b128"):
    """Run each workload of NCU_WORKLOADS[which] once between cudaProfilerStart/Stop (after two warm-up runs)."""
    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, factored_callable
    from bench.bench_gpu_lowrank import ZF_CONV1
    from bench.bench_gpu_lowrank import factored_callable as lowrank_callable
    from npconv.functional import conv2d
    from npconv.kernels.cuda import ops_lowrank
    torch = torch_cuda()
    for N, what in NCU_WORKLOADS[which]:
        if what.startswith("conv"):
            geom = {"conv1": ZF_CONV1, "conv2": SHAPES["zf_conv2"]}.get(what) or ZF_CONVS[what]
            C, H, F, K, s, p = geom
            x, w, b = _conv_inputs(cp, geom, N)
            _profiled(lambda: conv2d(x, w, b, stride=s, padding=p), f"npconv_{what}_b{N}")
            if torch is not None:
                torch.backends.cudnn.benchmark = True
                tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (x, w, b))
                with torch.no_grad():
                    _profiled(lambda: torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p),
                              f"cudnn_{what}_b{N}")
            del x
        elif what.startswith("cp"):
            _profiled(factored_callable("cp", (48, 2, int(what[2:])), N, ZF_CONV2, np.float32), f"{what}_b{N}")
        elif what in ("bsvd", "bshared"):           # the biclustered SVD (19, 51) and shared (K 6, S 4) conv2
            opts = (2, 2, (19, 51)) if what == "bsvd" else (48, 2, 6, 4)
            _profiled(factored_callable(what[1:], opts, N, ZF_CONV2, np.float32), f"{what}_b{N}")
        else:
            kind = what.rstrip("0123456789")
            method = {"mono": "monochromatic", "svd": "conv_svd", "sep": "separable", "sepf": "separable"}[kind]
            layer = lowrank_callable(method, int(what[len(kind):]), N, ZF_CONV1, np.float32)
            if kind == "sepf":                      # the separable form in one sep_conv launch, whatever the bound
                layer = _with_rules(layer, ops_lowrank, SEP_CONV_MAX_PIXELS=10**12)
            _profiled(layer, f"{what}_b{N}")
        cp.get_default_memory_pool().free_all_blocks()


def host_split(stats):
    """Host seconds of a ``pstats.Stats`` by package: {"npconv", "cupy", "numpy", "other"} (own time of each
    function; built-ins such as CuPy's compiled methods are placed by the name cProfile gives them)."""
    out = {"npconv": 0.0, "cupy": 0.0, "numpy": 0.0, "other": 0.0}
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        where = filename.replace("\\", "/")
        if "/npconv/" in where:
            key = "npconv"
        elif "cupy" in where or "cupy" in name:
            key = "cupy"
        elif "/numpy/" in where or "numpy" in name:
            key = "numpy"
        else:
            key = "other"
        out[key] += tottime
    return out


#: the host probe's small shapes (``--quick``): a conv2-like layer, and the CP layer on it
QUICK_CONV2 = (8, 11, 16, 5, 2, 0)


def host(calls=200, quick=False):
    """Eager batch-1 calls on the GPU: wall time per call (queued and synchronised each) and the cProfile split of
    the host time (``host_split``) plus the 15 functions with the most own time, per workload. ``quick``: small
    shapes and few calls (a check that the probe runs, e.g. on the emulated CuPy of the tests)."""
    import cProfile
    import io
    import pstats
    import time

    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, factored_callable
    from bench.zf_net import zf_net
    from npconv.functional import conv2d
    dev = cp.cuda.Device()
    geom = QUICK_CONV2 if quick else SHAPES["zf_conv2"]
    C, H, F, K, s, p = geom
    x, w, b = _conv_inputs(cp, geom, 1)
    if quick:
        from bench.bench_network import QUICK_ZF
        net = zf_net(seed=0, **QUICK_ZF).to_gpu()
        calls, warm, cp_opts, svd_opts, shared_opts = min(calls, 2), 1, (4, 2, 2), (2, 2, (2, 3)), (4, 2, 3, 2)
    else:
        net = zf_net(seed=0).to_gpu()
        warm, cp_opts, svd_opts, shared_opts = 20, (48, 2, 8), (2, 2, (19, 51)), (48, 2, 6, 4)
    size = net.input_shape[1]
    xn = cp.asarray(np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
    x3, w3, b3 = _conv_inputs(cp, geom if quick else ZF_CONVS["conv3"], 1)
    s3, p3 = (s, p) if quick else ZF_CONVS["conv3"][4:]
    from bench.bench_gpu_lowrank import TINY, ZF_CONV1
    from bench.bench_gpu_lowrank import factored_callable as lowrank_callable
    from npconv.layers import Conv2d
    g1 = TINY if quick else ZF_CONV1
    x1, w1, b1 = _conv_inputs(cp, g1, 1)
    conv1_layer = Conv2d(cp.asnumpy(w1), cp.asnumpy(b1), stride=g1[4], padding=g1[5]).to_gpu()
    work = {"conv2": lambda: conv2d(x, w, b, stride=s, padding=p),
            "conv3": lambda: conv2d(x3, w3, b3, stride=s3, padding=p3),
            "conv1": lambda: conv2d(x1, w1, b1, stride=g1[4], padding=g1[5]),
            "conv1_layer": lambda: conv1_layer(x1),
            "mono4": lowrank_callable("monochromatic", 4, 1, g1, np.float32),
            "svd8": lowrank_callable("conv_svd", 8, 1, g1, np.float32),
            "sep4": lowrank_callable("separable", 4, 1, g1, np.float32),
            f"cp{cp_opts[2]}": factored_callable("cp", cp_opts, 1, geom if quick else ZF_CONV2, np.float32),
            "svd": factored_callable("svd", svd_opts, 1, geom if quick else ZF_CONV2, np.float32),
            "shared": factored_callable("shared", shared_opts, 1, geom if quick else ZF_CONV2, np.float32),
            "zf_dense_net": lambda: net.forward(xn)}
    torch = None if quick else torch_cuda()
    if torch is not None:                               # cuDNN's calls of the same dense convs, host-timed alike
        torch.backends.cudnn.benchmark = True
        for name, (xx, ww, bb, ss, pp) in {"conv1": (x1, w1, b1, g1[4], g1[5]), "conv2": (x, w, b, s, p)}.items():
            tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (xx, ww, bb))
            work[f"torch_{name}"] = (lambda tx=tx, tw=tw, tb=tb, ss=ss, pp=pp:
                                     torch.nn.functional.conv2d(tx, tw, tb, stride=ss, padding=pp))
    res = {"launch": launch_costs(cp, calls=20 if quick else 2000)}
    grad = torch.no_grad() if torch is not None else None
    if grad is not None:
        grad.__enter__()
    for name, fn in work.items():
        for _ in range(warm):
            fn()
        dev.synchronize()
        host_only = []                                  # the call alone: it returns once its kernels are queued
        for _ in range(max(1, calls // 10)):
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                host_only.append(time.perf_counter() - t0)
            dev.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        dev.synchronize()
        queued = (time.perf_counter() - t0) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
            dev.synchronize()
        synced = (time.perf_counter() - t0) / calls
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        dev.synchronize()
        st = pstats.Stats(prof)
        split = {k: v / calls for k, v in host_split(st).items()}
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        host_med = 1e3 * float(np.median(host_only))
        res[name] = dict(ms_per_call_queued=1e3 * queued, ms_per_call_synced=1e3 * synced,
                         host_ms_per_call=host_med, host_ms_per_call_min=1e3 * min(host_only),
                         host_ms_per_call_profiled={k: 1e3 * v for k, v in split.items()})
        print(f"{name}: {1e3 * queued:.3f} ms per call queued, {1e3 * synced:.3f} synchronised, host alone "
              f"{host_med:.4f} (min {1e3 * min(host_only):.4f}); host time per call under cProfile (ms): "
              + ", ".join(f"{k} {1e3 * v:.3f}" for k, v in split.items()), flush=True)
        print(text.getvalue()[:4000], flush=True)
    if grad is not None:
        grad.__exit__(None, None, None)
    return res


_NOOP_SOURCE = r'''
extern "C" __global__ void npconv_probe_noop0() {}
extern "C" __global__ void npconv_probe_noop8(const float* a, float* b, int n0, int n1, int n2, int n3, int n4,
                                              int n5) { if (n0 < 0) b[0] = a[0]; }
extern "C" __global__ void npconv_probe_noop24(const float* a, const float* c, const float* d, float* b, int n0,
    int n1, int n2, int n3, int n4, int n5, int n6, int n7, int n8, int n9, int n10, int n11, int n12, int n13,
    int n14, int n15, int n16, int n17, int n18, int n19) { if (n0 < 0) b[0] = a[0] + c[0] + d[0]; }
struct npconv_probe_ints { int n[20]; };
extern "C" __global__ void npconv_probe_noop_struct(const float* a, const float* c, const float* d, float* b,
    npconv_probe_ints p) { if (p.n[0] < 0) b[0] = a[0] + c[0] + d[0]; }
'''


def launch_costs(cp, calls=2000):
    """Host microseconds per call of the primitives an eager layer call is made of (median of 10 groups of
    ``calls // 10`` calls, queued, one synchronisation a group): empty kernels with 0, 8 and 24 parameters
    (int parameters as ready ``np.int32`` values, and for 24 also made at each call; and 20 ints made into one
    struct parameter at each call, a NumPy structured scalar), ``cupy.empty`` of ZF conv1's batch-1 output, and npconv's
    own ``ops.launch`` of a kernel of the launch table (``bias_add`` on that output)."""
    import time

    from npconv.kernels.cuda import ops
    mod = cp.RawModule(code=_NOOP_SOURCE)
    k0, k8, k24, ks = (mod.get_function(f"npconv_probe_noop{n}") for n in (0, 8, 24, "_struct"))
    ints = np.dtype([("n", np.int32, (20,))])
    a = cp.zeros(16, dtype=np.float32)
    y = cp.empty((1, 96, 110, 110), dtype=np.float32)
    bias = cp.zeros(96, dtype=np.float32)
    i32 = [np.int32(v) for v in range(20)]
    cases = {
        "noop_0_args": lambda: k0((1,), (32,), ()),
        "noop_8_args_int32": lambda: k8((1,), (32,), (a, a) + tuple(i32[:6])),
        "noop_24_args_int32": lambda: k24((1,), (32,), (a, a, a, a) + tuple(i32)),
        "noop_24_args_int32_made": lambda: k24((1,), (32,), (a, a, a, a) + tuple(np.int32(v) for v in range(20))),
        "noop_struct_of_20_int32_made": lambda: ks((1,), (32,), (a, a, a, a, np.array((tuple(range(20)),),
                                                                                          dtype=ints)[()])),
        "cupy_empty_conv1_out": lambda: cp.empty((1, 96, 110, 110), dtype=np.float32),
        "ops_launch_bias_add": lambda: ops.launch(ops.LAUNCH_SIGNATURES, "bias_add", np.float32, (64,), (256,),
                                                  (y, bias, 1, 96, 110 * 110)),
    }
    dev = cp.cuda.Device()
    out = {}
    group = max(1, calls // 10)
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        dev.synchronize()
        per = []
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(group):
                fn()
            per.append((time.perf_counter() - t0) / group)
            dev.synchronize()
        out[name] = 1e6 * float(np.median(per))
        print(f"launch cost {name}: {out[name]:.2f} us a call (host)", flush=True)
    return out


_ON = 1 << 62
#: bicrules: the rule settings compared, layer kind -> {case name -> {``ops_bicluster`` attribute: value}}: the SVD
#: layer's spatial stage with its K1 channels in 1, 2 or 4 splits (``SVD_SPLIT_MAX_BLOCKS``, ``SVD_SPLITS``). (The
#: twenty-fifth session's run settled the shared layer's combination, unfused; the twenty-seventh's dropped the
#: spatial stage with 4 filters a block, no faster than 16.)
BIC_RULES = {"svd": {"svd": {"SVD_SPLIT_MAX_BLOCKS": 0},
                     "svd_s2": {"SVD_SPLIT_MAX_BLOCKS": _ON, "SVD_SPLITS": 2},
                     "svd_s4": {"SVD_SPLIT_MAX_BLOCKS": _ON, "SVD_SPLITS": 4}}}


def bic_rules(batches=(1, 8), repeat=24, quick=False):
    """The biclustered conv2 layers of :data:`BIC_RULES` at small batches under each of their settings
    (:func:`_with_rules`), with the dense ``Conv2d`` layer as the reference, timed in alternation
    (``bench_gpu.time_interleaved``). Returns {"<case>/b<N>": {"latency_ms", "queued_ms", "speedup_vs_dense"}}: the
    median latency, the time a call of 50 queued back to back, and the median of the rounds' dense / case ratios.
    Every setting's output is checked against the first's (to within 1e-4 of the output's scale)."""
    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, dense_callable, factored_callable
    from npconv.kernels.cuda import ops_bicluster
    geom = QUICK_CONV2 if quick else ZF_CONV2
    opts = {"svd": (2, 2, (2, 3)) if quick else (2, 2, (19, 51)), "shared": (4, 2, 3, 2) if quick else (48, 2, 6, 4)}
    if quick:
        batches, repeat = batches[:1], 2
    sync = cp.cuda.Device().synchronize
    out = {}
    for N in batches:
        cases = {"dense": (dense_callable(N, geom, np.float32), "cupy")}
        for kind, settings in BIC_RULES.items():
            layer = factored_callable(kind, opts[kind], N, geom, np.float32)
            ref = None
            for name, rules in settings.items():
                cases[name] = (_with_rules(layer, ops_bicluster, **rules), "cupy")
                y = cp.asnumpy(cases[name][0]())
                ref = y if ref is None else ref
                if not np.allclose(y, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                    raise AssertionError(f"{kind}/b{N}: setting {name} gives another output")
        timed, rounds = time_interleaved(cases, warmup=3, repeat=repeat)
        for name, (fn, _kind) in cases.items():
            key = f"{name}/b{N}"
            out[key] = {"latency_ms": timed[name]["median_ms"], "queued_ms": _queued_ms(fn, sync),
                        "speedup_vs_dense": paired_speedup(rounds, "dense", name)}
            print(f"{key}: latency {out[key]['latency_ms']:.4f} ms, queued {out[key]['queued_ms']:.4f} ms, "
                  f"dense / this {out[key]['speedup_vs_dense']:.2f}", flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    return out


#: ZF conv2-conv5: (C, H=W, F, K, stride, padding)
ZF_CONVS = {"conv2": (96, 55, 256, 5, 2, 0), "conv3": (256, 13, 384, 3, 1, 1), "conv4": (384, 13, 384, 3, 1, 1),
            "conv5": (384, 13, 256, 3, 1, 1)}


def _dense_cases(cp, torch, geom, N):
    """{"npconv": (npconv's conv2d, "cupy"), "cudnn": (PyTorch's, "torch")} on the same input of N images of
    ``geom`` (C, H, F, K, stride, padding); without ``torch``, the npconv case alone."""
    from npconv.functional import conv2d
    C, H, F, K, s, p = geom
    x, w, b = _conv_inputs(cp, geom, N)
    cases = {"npconv": (lambda: conv2d(x, w, b, stride=s, padding=p), "cupy")}
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in (x, w, b))

        def tfn():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p)
        cases["cudnn"] = (tfn, "torch")
    return cases


def _queued_ms(fn, sync, calls=50):
    import time
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - t0) / calls


def dense_latency(batches=(1, 8, 32, 128), repeat=30, quick=False):
    """The dense ZF conv2-conv5 as npconv's ``Conv2d`` layer (replaying its launches where it can) and as cuDNN's
    conv at each batch: {"<conv>/b<N>/<npconv|cudnn>": {"host_us", "queued_ms", "latency_ms"}}: the host time of a
    call (groups of 10 calls issued without a synchronisation, median), the time a call of 50 queued back to back,
    and the latency of one call between CUDA events after a synchronize (the benches' measure; the two in
    alternation). A latency well above both the host time and the queued time is time the call spends waiting,
    neither issuing nor computing. npconv's records also hold ``replayed`` (whether the layer replays its launches at
    that shape) and ``host_split`` with ``top``: cProfile's split of a call's host time (ms, ``host_split``) and the 8
    functions with the most own time, over 50 calls. ``quick``: the small conv2-like shape at batch 1, no cuDNN."""
    import cProfile
    import io
    import pstats
    import time

    import cupy as cp

    from bench.bench_gpu_bicluster import dense_callable
    torch = None if quick else torch_cuda()
    convs = {"conv2": QUICK_CONV2} if quick else ZF_CONVS
    if quick:
        batches, repeat = (1,), 2
    out = {}
    grad = torch.no_grad() if torch is not None else None
    if grad is not None:
        grad.__enter__()
    try:
        for N in batches:
            for name, geom in convs.items():
                cases = {"npconv": (dense_callable(N, geom, np.float32), "cupy")}
                syncs = {"npconv": cp.cuda.Device().synchronize}
                if torch is not None:
                    torch.backends.cudnn.benchmark = True
                    s, p = geom[4:]
                    tx, tw, tb = (torch.as_tensor(a, device="cuda") for a in _conv_inputs(cp, geom, N))
                    cases["cudnn"] = (lambda tx=tx, tw=tw, tb=tb, s=s, p=p:
                                      torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p), "torch")
                    syncs["cudnn"] = torch.cuda.synchronize
                timed, _ = time_interleaved(cases, warmup=3, repeat=repeat)
                for case, (fn, _kind) in cases.items():
                    host = []
                    for _ in range(2 if quick else 20):
                        syncs[case]()
                        t0 = time.perf_counter()
                        for _ in range(10):
                            fn()
                        host.append((time.perf_counter() - t0) / 10)
                    syncs[case]()
                    key = f"{name}/b{N}/{case}"
                    out[key] = {"host_us": 1e6 * float(np.median(host)), "queued_ms": _queued_ms(fn, syncs[case]),
                                "latency_ms": timed[case]["median_ms"]}
                    print(f"{key:22s} host {out[key]['host_us']:7.1f} us   queued {out[key]['queued_ms']:7.4f} ms   "
                          f"latency {out[key]['latency_ms']:7.4f} ms", flush=True)
                    if case == "npconv":
                        table = fn.layer._replays or {}
                        out[key]["replayed"] = any(type(v).__name__ == "Replay" for v in table.values())
                        prof = cProfile.Profile()
                        calls = 3 if quick else 50
                        prof.enable()
                        for _ in range(calls):
                            fn()
                        prof.disable()
                        syncs[case]()
                        out[key]["host_split"] = {k: 1e3 * v / calls for k, v in host_split(pstats.Stats(prof)).items()}
                        text = io.StringIO()
                        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
                        out[key]["top"] = [ln.strip() for ln in text.getvalue().splitlines()
                                           if ln.strip()[:1].isdigit()][:8]
                        print(f"    replayed {out[key]['replayed']}; host ms a call under cProfile: "
                              + ", ".join(f"{k} {v:.4f}" for k, v in out[key]["host_split"].items()), flush=True)
                        for ln in out[key]["top"]:
                            print("      " + ln, flush=True)
                cp.get_default_memory_pool().free_all_blocks()
    finally:
        if grad is not None:
            grad.__exit__(None, None, None)
    return out


def probe_small(batches=(1, 2, 4, 8, 16, 32), cp_batches=(1, 2, 4, 8), repeat=30, quick=False):
    """The small-batch measurements (see the module docstring): {"<layer>/b<N>/<variant>": {"latency_ms",
    "queued_ms"}}; the dense convs as ``npconv`` and ``cudnn``, the CP layer's expansion ``fused`` and ``gemm``.
    ``quick``: one small shape and batch (a smoke run)."""
    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, factored_callable
    from npconv.kernels.cuda import ops_bicluster
    torch = None if quick else torch_cuda()
    sync = cp.cuda.Device().synchronize
    out = {}
    convs = {"conv2": QUICK_CONV2} if quick else ZF_CONVS
    batches, cp_batches = ((1,), (1,)) if quick else (batches, cp_batches)

    def record(key, latency, queued):
        out[key] = {"latency_ms": latency, "queued_ms": queued}
        print(f"{key:34s} latency {latency:8.4f} ms   queued {queued:8.4f} ms/call", flush=True)

    for name, geom in convs.items():
        for N in batches:
            cases = _dense_cases(cp, torch, geom, N)
            timed, _ = time_interleaved(cases, warmup=3, repeat=repeat)
            for variant, (fn, kind) in cases.items():
                record(f"{name}/b{N}/{variant}", timed[variant]["median_ms"],
                       _queued_ms(fn, sync if kind == "cupy" else torch.cuda.synchronize))
            del cases
            cp.get_default_memory_pool().free_all_blocks()
    def with_rule(layer, rule, limit, module=ops_bicluster):
        return _with_rules(layer, module, **{rule: limit})
    # (name, kind, options, the rule its two variants set): the CP expansion, the SVD form's gather + reductions
    # (bic_reduce, or bic_gather and a GEMM a group; its expansion follows EXPAND_TILED_MAX_COLUMNS as it is)
    forms = [(f"cp{k}", "cp", (4, 2, k) if quick else (48, 2, k), "EXPAND_TILED_MAX_COLUMNS")
             for k in ((4,) if quick else (8, 12))]
    forms.append(("svd", "svd", (2, 2, (2, 3)) if quick else (2, 2, (19, 51)), "REDUCE_TILED_MAX_COLUMNS"))
    # the shared form: its combination in the fused expansion (bic_expand_shared), or bic_shared_combine and GEMMs
    forms.append(("shared", "shared", (4, 2, 3, 2) if quick else (48, 2, 6, 4), "EXPAND_TILED_MAX_COLUMNS"))
    for name, kind, opts, rule in forms:
        for N in cp_batches:
            layer = factored_callable(kind, opts, N, QUICK_CONV2 if quick else ZF_CONV2, np.float32)
            cases = {"fused": (with_rule(layer, rule, 10**9), "cupy"), "gemm": (with_rule(layer, rule, 0), "cupy")}
            timed, _ = time_interleaved(cases, warmup=3, repeat=repeat)
            for variant, (fn, _kind) in cases.items():
                record(f"{name}/b{N}/{variant}", timed[variant]["median_ms"], _queued_ms(fn, sync))
            cp.get_default_memory_pool().free_all_blocks()
    # the monochromatic conv1 (C' = 4): each colour's filters shared over several blocks in a small grid, or not
    # (the rule ops_lowrank.MONO_MIN_BLOCKS)
    from bench.bench_gpu_lowrank import TINY, ZF_CONV1
    from bench.bench_gpu_lowrank import factored_callable as lowrank_callable
    from npconv.kernels.cuda import ops_lowrank
    for N in cp_batches:
        layer = lowrank_callable("monochromatic", 4, N, TINY if quick else ZF_CONV1, np.float32)
        cases = {"split": (with_rule(layer, "MONO_MIN_BLOCKS", 10**9, ops_lowrank), "cupy"),
                 "whole": (with_rule(layer, "MONO_MIN_BLOCKS", 1, ops_lowrank), "cupy")}
        timed, _ = time_interleaved(cases, warmup=3, repeat=repeat)
        for variant, (fn, _kind) in cases.items():
            record(f"mono4/b{N}/{variant}", timed[variant]["median_ms"], _queued_ms(fn, sync))
        cp.get_default_memory_pool().free_all_blocks()
    return out


def _with_rules(call, module, **rules):
    """``call`` (a ``bench_gpu.LayerCall``) run with ``module``'s attributes set to ``rules`` for the call (restored
    after it), its layer's recorded GPU calls kept in a table of this variant's own (``kernels/cuda/replay.py``).

    The rules are written into the module's namespace directly, which does not make recorded calls stale (as
    ``setattr`` does): each variant records once, under its own rules, and later calls replay, so that variants
    compared in alternation all run as a layer runs at a shape it has seen, not recording at every call."""
    from npconv.kernels.cuda import replay
    layer, own = call.layer, replay.new_table()
    space = vars(module)

    def run():
        saved, shared = {k: space[k] for k in rules}, layer._replays
        space.update(rules)
        layer._replays = own
        try:
            return call()
        finally:
            layer._replays = shared
            space.update(saved)
    return run


def probe_lowrank(batches=(1, 8, 128), small_batches=(1, 8), repeat=30, quick=False):
    """The ``lowrank`` measurements (see the module docstring): {"<layer>/b<N>/<variant>": {"latency_ms",
    "queued_ms"}}. Every variant's output is checked against the first's (same arithmetic, another schedule: to
    within 1e-4 of the output's scale). ``quick``: the small shape, batch 1, a few rounds."""
    import cupy as cp

    from bench.bench_gpu_lowrank import TINY, ZF_CONV1, factored_callable
    from npconv.kernels.cuda import ops_lowrank
    torch = None if quick else torch_cuda()
    sync = cp.cuda.Device().synchronize
    geom = TINY if quick else ZF_CONV1
    if quick:
        batches, small_batches, repeat = (1,), (1,), 3
    out = {}

    def record(key, latency, queued):
        out[key] = {"latency_ms": latency, "queued_ms": queued}
        print(f"{key:34s} latency {latency:8.4f} ms   queued {queued:8.4f} ms/call", flush=True)

    def run_row(prefix, cases):
        ref = None
        for name, (fn, kind) in cases.items():
            if kind != "cupy":
                continue
            y = cp.asnumpy(fn())
            if ref is None:
                ref = y
            elif not np.allclose(y, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                raise AssertionError(f"{prefix}: variant {name} gives another output")
        timed, _ = time_interleaved(cases, warmup=3, repeat=repeat)
        for name, (fn, kind) in cases.items():
            record(f"{prefix}/{name}", timed[name]["median_ms"],
                   _queued_ms(fn, sync if kind == "cupy" else torch.cuda.synchronize))
        cp.get_default_memory_pool().free_all_blocks()

    for N in sorted(set(batches) | set(small_batches)):
        run_row(f"conv1/b{N}", _dense_cases(cp, torch, geom, N))
        for t in ((4,) if quick else (8, 16)):
            layer = factored_callable("conv_svd", t, N, geom, np.float32)
            if N in batches:
                run_row(f"svd{t}/b{N}", {
                    "lr_conv_px1": (_with_rules(layer, ops_lowrank, LR_CONV_MAX_RANK=32,
                                                LR_CONV_PX2_MIN_PIXELS=10**9), "cupy"),
                    "lr_conv_px2": (_with_rules(layer, ops_lowrank, LR_CONV_MAX_RANK=32, LR_CONV_PX2_MIN_PIXELS=0),
                                    "cupy"),
                    "two_stage": (_with_rules(layer, ops_lowrank, LR_CONV_MAX_RANK=0), "cupy"),
                    "gemm": (_with_rules(layer, ops_lowrank, LR_CONV_MAX_RANK=0, LR_EXPAND_MAX_RANK=0), "cupy")})
        for k in ((3,) if quick else (4, 8)):
            layer = factored_callable("separable", k, N, geom, np.float32)
            cases = {"two_pass": (_with_rules(layer, ops_lowrank, SEP_CONV_MAX_PIXELS=0), "cupy")}
            for m in (SHARE_MIN_BLOCKS if N in small_batches else (0,)):
                cases[f"sep_conv_shares{m}"] = (_with_rules(layer, ops_lowrank, SEP_CONV_MAX_PIXELS=10**12,
                                                            SEP_MIN_BLOCKS=m), "cupy")
            run_row(f"sep{k}/b{N}", cases)
        if N in small_batches:
            for colours in ((2,) if quick else (4, 6)):
                layer = factored_callable("monochromatic", colours, N, geom, np.float32)
                run_row(f"mono{colours}/b{N}", {
                    f"share{f}_min{m}": (_with_rules(layer, ops_lowrank, MONO_SHARE_FILTERS=f, MONO_MIN_BLOCKS=m),
                                         "cupy") for f, m in MONO_SHARE_RULES})
    return out


#: the lowrank probe's small-grid rules: the fewest blocks below which sep_conv shares its filters among blocks (0:
#: never), and mono_conv's (filters a share at least, MONO_MIN_BLOCKS); (8, 512) is the rule before shares of 4
SHARE_MIN_BLOCKS = (0, 256, 512, 1024)
MONO_SHARE_RULES = ((8, 512), (4, 512), (4, 1024))


def cp_images_per_block(per_block=(1, 2, 4), ks=(6, 8, 12), N=128, repeat=15, quick=False):
    """{"cp<K>/b<N>/ipb<n>": {"median_ms", "speedup_over_first"}} for the CP layer with ``per_block`` images a
    bic_cp_front block, timed in alternation; each output must equal the first setting's (float32 sums, same
    order: to within 1e-4 of the output's scale). ``quick``: the small shape, K = 4, batch 5, one round."""
    import cupy as cp

    from bench.bench_gpu_bicluster import ZF_CONV2, factored_callable
    from npconv.kernels.cuda import ops_bicluster
    saved = ops_bicluster.CP_IMAGES_PER_BLOCK
    out = {}
    if quick:
        ks, N, repeat = (4,), 5, 1
    try:
        for k in ks:
            opts, geom = ((4, 2, k), QUICK_CONV2) if quick else ((48, 2, k), ZF_CONV2)
            layer = factored_callable("cp", opts, N, geom, np.float32)
            cases, ref = {}, None
            for n in per_block:
                run = _with_rules(layer, ops_bicluster, CP_IMAGES_PER_BLOCK=n)
                y = cp.asnumpy(run())
                if ref is None:
                    ref = y
                elif not np.allclose(y, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                    raise AssertionError(f"cp{k}: {n} images a block give another output than {per_block[0]}")
                cases[f"ipb{n}"] = (run, "cupy")
            timed, rounds = time_interleaved(cases, warmup=3, repeat=repeat)
            first = f"ipb{per_block[0]}"
            for name in cases:
                key = f"cp{k}/b{N}/{name}"
                out[key] = {"median_ms": timed[name]["median_ms"],
                            "speedup_over_first": paired_speedup(rounds, first, name)}
                print(f"{key:20s} {out[key]['median_ms']:8.3f} ms   x{out[key]['speedup_over_first']:.3f} "
                      f"against {first}", flush=True)
            cp.get_default_memory_pool().free_all_blocks()
    finally:
        ops_bicluster.CP_IMAGES_PER_BLOCK = saved
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("probe", "ncu", "host", "small", "cpblock", "lowrank", "bicrules", "latency"))
    ap.add_argument("--out", help="JSON file for the probe's times (written atomically)")
    ap.add_argument("--workloads", choices=sorted(NCU_WORKLOADS), default="b128",
                    help="ncu: which set of workloads (NCU_WORKLOADS)")
    ap.add_argument("--quick", action="store_true",
                    help="host, small, cpblock, lowrank: small shapes, few calls (a smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="bicrules, latency: the batch sizes (default 1 8; latency 1 8 32 128)")
    args = ap.parse_args(argv)
    if args.batches is not None and min(args.batches) < 1:
        ap.error(f"--batches: expected batch sizes of at least 1, got {args.batches}")
    why = gpu_missing()
    if why is not None:
        print(f"gpu_profile {args.what}: skipped, no GPU ({why})")
        return 0
    if args.what in ("probe", "host", "small", "cpblock", "lowrank", "bicrules", "latency"):
        run = {"probe": probe, "host": lambda: host(quick=args.quick),
               "bicrules": lambda: bic_rules(tuple(args.batches or (1, 8)), quick=args.quick),
               "latency": lambda: dense_latency(tuple(args.batches or (1, 8, 32, 128)), quick=args.quick),
               "small": lambda: probe_small(quick=args.quick),
               "lowrank": lambda: probe_lowrank(quick=args.quick),
               "cpblock": lambda: cp_images_per_block(quick=args.quick)}[args.what]
        res = run()
        if args.out:
            from npconv._fileio import atomic_write
            text = json.dumps(res, indent=1)
            atomic_write(args.out, lambda f: f.write(text.encode()))
    else:
        ncu_workloads(args.workloads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
