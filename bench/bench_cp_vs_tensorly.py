"""CP-ALS of npconv against TensorLy's ``parafac`` at the same rank: final relative error and time.

    python bench/bench_cp_vs_tensorly.py            # conv-kernel-shaped tensors and synthetic low-rank ones
    python bench/bench_cp_vs_tensorly.py --quick    # small tensors
    python bench/bench_cp_vs_tensorly.py --threads 1

TensorLy is optional (``pip install tensorly``; never an npconv dependency): without it the script says so and
exits 0. Both run the same number of sweeps at most, the same stopping rule (the relative error improves by less
than ``tol``) and an SVD initialisation, in float64. The goal for npconv: an equal or lower error in no more
time. Each case is run ``--repeat`` times per implementation (interleaved) and the fastest time is reported.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
    from bench._env import clean_blas_env
    clean_blas_env()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def cases(quick):
    """(name, tensor, rank) triples: kernel-shaped random tensors and exact low rank + 1% noise."""
    rng = np.random.default_rng(0)
    out = []

    def lowrank(shape, r, noise=0.01):
        fac = [rng.standard_normal((n, r)) for n in shape]
        T = np.einsum("ir,jr,kr,lr->ijkl", *fac) if len(shape) == 4 else np.einsum("ir,jr,kr->ijk", *fac)
        return T + noise * np.linalg.norm(T) / np.sqrt(T.size) * rng.standard_normal(shape)

    if quick:
        out.append(("random (32,16,3,3) r=8", rng.standard_normal((32, 16, 3, 3)), 8))
        out.append(("lowrank+noise (20,15,10) r=5", lowrank((20, 15, 10), 5), 5))
        return out
    out.append(("ZF conv2-like (256,96,5,5) r=64", rng.standard_normal((256, 96, 5, 5)) / 10, 64))
    out.append(("block (128,2,5,5) r=6", rng.standard_normal((128, 2, 5, 5)), 6))
    out.append(("block (128,48,5,5) r=19", rng.standard_normal((128, 48, 5, 5)), 19))
    out.append(("lowrank+noise (60,50,40) r=10", lowrank((60, 50, 40), 10), 10))
    out.append(("lowrank+noise (64,32,5,5) r=12", lowrank((64, 32, 5, 5), 12), 12))
    return out


def run_npconv(T, rank, n_iter, tol):
    from npconv.decompose.cp import cp_als
    res = cp_als(T, rank, n_iter=n_iter, tol=tol, init="svd", random_state=0)
    return np.linalg.norm(T - res.to_tensor()) / np.linalg.norm(T), len(res.errors)


def run_tensorly(T, rank, n_iter, tol):
    import tensorly as tl
    from tensorly.decomposition import parafac
    cp, errs = parafac(tl.tensor(T), rank, n_iter_max=n_iter, init="svd", tol=tol, random_state=0,
                       return_errors=True)
    return np.linalg.norm(T - tl.cp_to_tensor(cp)) / np.linalg.norm(T), len(errs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads for both (default: as configured; 1 is steadier on a busy machine)")
    ap.add_argument("--keep-blas-env", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    try:
        import tensorly
    except ImportError:
        print("TensorLy is not installed (pip install tensorly): nothing to compare, skipped.")
        return 0
    tensorly.set_backend("numpy")
    print(f"# tensorly {tensorly.__version__}; n_iter <= {args.n_iter}, tol {args.tol}, init svd, float64")
    print(f"{'case':<34}{'npconv err':>12}{'iters':>7}{'s':>8}{'tensorly err':>14}{'iters':>7}{'s':>8}"
          f"{'time ratio':>12}")
    for name, T, rank in cases(args.quick):
        best = {"npconv": np.inf, "tensorly": np.inf}
        out = {}
        for _ in range(args.repeat):
            for impl, fn in (("npconv", run_npconv), ("tensorly", run_tensorly)):
                t = time.perf_counter()
                out[impl] = fn(T, rank, args.n_iter, args.tol)
                best[impl] = min(best[impl], time.perf_counter() - t)
        (e1, i1), (e2, i2) = out["npconv"], out["tensorly"]
        print(f"{name:<34}{e1:>12.6f}{i1:>7d}{best['npconv']:>8.3f}{e2:>14.6f}{i2:>7d}{best['tensorly']:>8.3f}"
              f"{best['npconv'] / best['tensorly']:>12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
