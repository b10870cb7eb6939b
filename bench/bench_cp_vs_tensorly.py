"""CP-ALS of npconv against TensorLy's ``parafac`` at the same rank: final relative error and time.

    python bench/bench_cp_vs_tensorly.py            # conv-kernel-shaped tensors and synthetic low-rank ones
    python bench/bench_cp_vs_tensorly.py --quick    # small tensors
    python bench/bench_cp_vs_tensorly.py --threads 1

TensorLy is optional (``pip install tensorly``; never an npconv dependency): without it the script says so and
exits 0. Both run the same number of sweeps at most, the same stopping rule (the relative error improves by less
than ``tol``) and an SVD initialisation, in float64. The goal for npconv: an equal or lower error in no more
time. The start's columns beyond a mode's size are random in both, so the final error of a fit that does not
converge in ``n_iter`` sweeps depends on the seed: each case runs ``--seeds`` seeds and reports the median errors
and on how many seeds npconv's is not higher. Times are the fastest of ``--repeat`` interleaved runs of seed 0. The
last column gives npconv TensorLy's time: as many sweeps as fit in it.
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


def run_npconv(T, rank, n_iter, tol, seed=0):
    from npconv.decompose.cp import cp_als
    res = cp_als(T, rank, n_iter=n_iter, tol=tol, init="svd", random_state=seed)
    return np.linalg.norm(T - res.to_tensor()) / np.linalg.norm(T), len(res.errors)


def run_tensorly(T, rank, n_iter, tol, seed=0):
    import tensorly as tl
    from tensorly.decomposition import parafac
    cp, errs = parafac(tl.tensor(T), rank, n_iter_max=n_iter, init="svd", tol=tol, random_state=seed,
                       return_errors=True)
    return np.linalg.norm(T - tl.cp_to_tensor(cp)) / np.linalg.norm(T), len(errs)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5, help="random states per case (errors: median over them)")
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
    import warnings
    warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")   # TensorLy, rank > I_n
    print(f"# tensorly {tensorly.__version__}; n_iter <= {args.n_iter}, tol {args.tol}, init svd, float64; "
          f"{args.seeds} seeds (they draw the start's columns beyond a mode's size)")
    print(f"{'case':<34}{'npconv err':>12}{'tensorly err':>14}{'np <= tl':>9}{'np s':>8}{'tl s':>8}"
          f"{'time ratio':>11}{'np err, tl time':>17}")
    for name, T, rank in cases(args.quick):
        best = {"npconv": np.inf, "tensorly": np.inf}
        errs = {"npconv": [], "tensorly": []}
        for seed in range(args.seeds):
            for rep in range(args.repeat if seed == 0 else 1):   # the times: best of --repeat, seed 0
                for impl, fn in (("npconv", run_npconv), ("tensorly", run_tensorly)):
                    (err, _), dt = _timed(fn, T, rank, args.n_iter, args.tol, seed)
                    if seed == 0:
                        best[impl] = min(best[impl], dt)
                    if rep == 0:
                        errs[impl].append(err)
        e_np, e_tl = (np.array(errs[k]) for k in ("npconv", "tensorly"))
        wins = int(np.sum(e_np <= e_tl * (1 + 1e-6)))      # equal to 6 digits counts as not higher
        # npconv given TensorLy's time: as many sweeps as fit in it (same tol), seed 0
        sweeps = max(args.n_iter, int(args.n_iter * best["tensorly"] / best["npconv"]))
        e_same_time = run_npconv(T, rank, sweeps, args.tol, 0)[0]
        print(f"{name:<34}{np.median(e_np):>12.6f}{np.median(e_tl):>14.6f}{f'{wins}/{args.seeds}':>9}"
              f"{best['npconv']:>8.3f}{best['tensorly']:>8.3f}{best['npconv'] / best['tensorly']:>11.2f}"
              f"{e_same_time:>17.6f}", flush=True)
    print("err: median over the seeds of the final relative error; np <= tl: seeds where npconv's error is not "
          "higher (to 6 digits); times: seed 0, best of --repeat; last column: npconv with as many sweeps as fit "
          "in TensorLy's time (same tol).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
