"""``npconv.tune`` on the bundled CIFAR network's approximation: each factored layer against the dense layer of its
rebuilt kernel, on this machine, at batch 1 and 128 (or the GPU with ``--gpu``).

    python bench/bench_tune.py                 # CPU, batch 1 and 128
    python bench/bench_tune.py --gpu           # the same on the GPU (skips, saying why, without one)
    python bench/bench_tune.py --quick         # batch 1 only, 2 timed calls (a smoke test)

The plan: conv1 Monochromatic(8), conv2 Bicluster-SVD G=H=2 (16, 48), conv3 Separable(64), fc5 SVD(16) and fc6
SVD(10) (fc6 maps 512 features to 10 classes: its rank-10 form does more work than the dense layer). The factors are
fitted to the bundled weights (``npconv.approximate``, a few seconds). For each batch it prints tune's table (median
ms of the factored layer and of its dense equivalent, the two interleaved; the choice) and the largest difference of
the tuned network's output from the factored one's, relative to the output's largest value.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
    from bench._env import clean_blas_env
    clean_blas_env()

import argparse  # noqa: E402

import numpy as np  # noqa: E402


def plan():
    from npconv.approximate import SVD, Bicluster, Monochromatic, Separable
    return {"conv1": Monochromatic(colors=8), "conv2": Bicluster(G=2, H=2, ranks=(16, 48), method="svd"),
            "conv3": Separable(rank=64), "fc5": SVD(rank=16), "fc6": SVD(rank=10)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="tune on the GPU (CuPy arrays)")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 2 timed calls")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls of each form (default 9; 2 with --quick)")
    args = ap.parse_args(argv)
    if args.gpu:
        from bench.bench_gpu import gpu_missing
        why = gpu_missing()
        if why is not None:
            print(f"bench_tune --gpu: skipped, no GPU ({why})")
            return 0
    import npconv
    net = npconv.approximate(npconv.models.load_reference(), plan())
    xp = np
    if args.gpu:
        import cupy as xp
        net.to_gpu()
    rng = np.random.default_rng(0)
    repeat = args.repeat or (2 if args.quick else 9)
    for N in ((1,) if args.quick else (1, 128)):
        x = xp.asarray(rng.uniform(0, 255, (N, 3, 32, 32)).astype(np.float32))
        print(f"batch {N} ({'GPU' if args.gpu else 'CPU'}), tune(net, x, repeat={repeat}):")
        tuned, rows = npconv.tune(net, x, repeat=repeat, print_fn=print)
        y0, y1 = (np.asarray(npconv._backend.to_numpy(a)) for a in (net.forward(x), tuned.forward(x)))
        print(f"tuned vs factored output: max |difference| / max |output| = "
              f"{float(np.abs(y1 - y0).max() / np.abs(y0).max()):.2e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
