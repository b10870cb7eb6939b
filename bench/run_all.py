"""Run the benchmark suite: every ``bench/bench_*.py`` module that exposes ``rows(quick: bool)``.

    python bench/run_all.py                     # the full suite, results in out/bench/
    python bench/run_all.py --quick             # tiny shapes, a few minutes
    python bench/run_all.py --only conv --only pool --out /tmp/b --rss-subprocess
    python bench/run_all.py --list              # the modules and their rows

Writes results.csv, results.json and one PNG per module (when matplotlib is installed) into ``--out``, and
prints a table. Exits with status 1 when a row or a module failed (the others still run and are written).
How to write a bench module: see the docstring of ``bench/_harness.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make ``bench`` and ``npconv`` importable
    sys.path.insert(0, str(_ROOT))
if __name__ == "__main__":  # like every bench script: drop this workplace's OpenBLAS core-type override
    try:                    # before NumPy loads (re-executes once; --keep-blas-env keeps it)
        from bench._env import clean_blas_env
    except ImportError:
        pass
    else:
        clean_blas_env()

from bench._harness import BENCH_DIR, Settings, discover, load_module, module_rows, run_and_report  # noqa: E402


def _parser():
    p = argparse.ArgumentParser(prog="run_all.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a few minutes in all)")
    p.add_argument("--out", type=Path, default=_ROOT / "out" / "bench", help="output folder (default: out/bench)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only this module (NAME or bench_NAME; repeat or comma-separate for several)")
    p.add_argument("--filter", default=None, metavar="TEXT", help="run only rows whose name contains TEXT")
    p.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="where to look for bench_*.py")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per row")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per row (at least)")
    p.add_argument("--min-time", type=float, default=None, help="keep timing a row until this many seconds")
    p.add_argument("--rss-subprocess", action="store_true",
                   help="also measure each row's peak memory in a fresh process (slower)")
    p.add_argument("--no-peak", action="store_true", help="skip the GEMM peak measurement")
    p.add_argument("--peak-size", type=int, default=None, help="n of the n x n x n CPU GEMM peak")
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument("--list", action="store_true", help="list the modules and their rows, run nothing")
    p.add_argument("--keep-blas-env", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (dropped by default, see bench/_env.py)")
    return p


def _select(available, only):
    names = [n.strip() for o in only for n in o.split(",") if n.strip()]
    if not names:
        return dict(available)
    chosen = {}
    for n in names:
        key = n[len("bench_"):] if n.startswith("bench_") else n
        key = key[:-3] if key.endswith(".py") else key
        if key not in available:
            raise SystemExit(f"run_all.py: error: no bench module {n!r}; available: {', '.join(available) or 'none'}")
        chosen[key] = available[key]
    return chosen


def main(argv=None):
    args = _parser().parse_args(argv)
    available = discover(args.bench_dir)
    modules = _select(available, args.only)
    if not modules:
        print(f"no bench_*.py modules in {args.bench_dir}")
        return 1
    if args.list:
        for name, path in modules.items():
            try:
                rows = module_rows(load_module(path), args.quick, where=str(path))
                print(f"{name} ({path}): {len(rows)} row(s)")
                for r in rows:
                    print(f"  {r.name}")
            except Exception as exc:
                print(f"{name} ({path}): cannot list rows: {type(exc).__name__}: {exc}")
        return 0
    try:
        settings = Settings(quick=args.quick, warmup=args.warmup, repeat=args.repeat, min_time=args.min_time,
                            rss="subprocess" if args.rss_subprocess else "inline", peak=not args.no_peak,
                            peak_size=args.peak_size, plots=not args.no_plots, filter=args.filter)
    except ValueError as exc:
        raise SystemExit(f"run_all.py: error: {exc}")
    print(f"running {len(modules)} bench module(s) ({'quick' if args.quick else 'full'}): {', '.join(modules)}")
    results, _ = run_and_report(modules, settings, args.out)
    failed = [r for r in results if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(r['module'] + '/' + r['name'] for r in failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
