"""The benchmark harness: bench modules declare rows; the harness times them and writes the results.

Writing a bench module
----------------------
A bench module is a file ``bench/bench_<name>.py`` (``<name>`` is what ``run_all.py --only`` takes) with one
function, ``rows(quick: bool) -> list[Row]``. ``rows`` only describes configurations and must be cheap; arrays
are made inside each row's ``setup``, which returns the zero-argument callable that is timed::

    import numpy as np
    from bench._harness import Row, SkipRow

    def rows(quick):
        out = []
        for n in ([64] if quick else [512, 2048]):
            def setup(n=n):
                a = np.ones((n, n), np.float32)
                return lambda: a @ a                     # timed; setup itself is not
            out.append(Row(f"matmul/n{n}", setup, macs=n ** 3, group="matmul",
                           meta={"impl": "numpy", "dtype": "float32", "n": n}))
        return out

``Row`` fields (all but the first two optional):

- ``name``: unique within the module; ``group/variant`` reads well in the table and plots.
- ``setup``: ``() -> callable``. Raise ``SkipRow("why")`` in it when a need is missing (no GPU, no PyTorch):
  the row is reported as skipped, not failed. Any other exception marks the row as an error; the suite goes on
  and ``run_all.py`` exits with status 1 at the end.
- ``flops`` or ``macs`` (floating-point operations / multiply-adds per call; ``flops = 2 * macs`` when only
  ``macs`` is given): enables the GFLOP/s and fraction-of-peak columns.
- ``group``: rows of a group share a panel in the plots (default: the name up to its last ``/``).
- ``meta``: free-form columns (implementation, dtype, shapes...). ``meta["dtype"]`` ("float32" or "float64",
  default float32) picks the GEMM peak a row is compared with.
- ``device``: "cpu" (default) or "gpu". GPU rows are skipped (not failed) where CuPy sees no CUDA device,
  synchronised after every call (``cupy`` device synchronize) unless ``sync`` is given, and compared with a
  CuPy GEMM peak.
- ``baseline``: the name of another row of the module; adds ``speedup = baseline median / median``.
- ``threads``: run under a scoped thread limit (BLAS/OpenMP via threadpoolctl, numba, PyTorch).
- ``warmup``, ``repeat``, ``min_time``: per-row overrides of the run's settings.

What the harness does
---------------------
Each row: ``setup()``, then ``_timing.measure`` (warm-up calls, then ``repeat`` timed calls, more while the total
is under ``min_time``), giving the median and the spread (p25, p75, min, max). ``gflops = flops / median``;
``frac_peak = gflops / peak``, where the peak is the GFLOP/s of a large GEMM of the row's dtype on its device
(NumPy ``matmul`` on the CPU, CuPy on the GPU) measured in the same run, from its fastest repeat.

Memory: ``process_peak_rss_mb`` is this process's peak resident memory during the row. Where Linux lets the
peak be reset (``/proc/self/clear_refs``; ``rss_reset`` is then true) it is the peak since the row began;
otherwise it is the process's peak so far (``ru_maxrss`` never goes down), an upper bound polluted by earlier
rows. With ``rss="subprocess"`` every row is also run (setup, warm-up, one call) in a fresh Python process,
whose peak is ``peak_rss_mb``; ``rss_base_mb`` is that process's peak before ``setup`` (the interpreter,
imports and ``rows()``), so ``peak_rss_mb - rss_base_mb`` is what the configuration itself needs.

Outputs, in the output folder: ``results.csv`` (one line per row; ``meta`` keys become columns),
``results.json`` (``machine``, ``peaks``, ``settings`` and ``results``), ``<module>.png`` plots when matplotlib
is installed, and a table on the terminal.

Running: ``python bench/run_all.py [--quick] [--only NAME] [--out DIR] [--rss-subprocess]`` (see its ``--help``).
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench._timing import gemm_peak, machine_info, measure, peak_rss_mb, reset_peak_rss, thread_limit

__all__ = ["Row", "SkipRow", "Settings", "discover", "load_module", "module_rows", "run_rows", "run_suite",
           "measure_peaks", "add_derived", "format_table", "write_csv", "write_json", "make_plots",
           "write_outputs", "run_and_report"]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
_CHILD_TAG = "@@npconv-bench-rss@@"


class SkipRow(Exception):
    """Raised by a row's ``setup`` when something it needs is missing; the row is reported as skipped."""


@dataclass
class Row:
    """One timed configuration of a bench module (see the module docstring for the fields)."""

    name: str
    setup: Callable[[], Callable[[], Any]]
    flops: float | None = None
    macs: float | None = None
    group: str | None = None
    meta: dict = field(default_factory=dict)
    device: str = "cpu"
    baseline: str | None = None
    threads: int | None = None
    warmup: int | None = None
    repeat: int | None = None
    min_time: float | None = None
    sync: Callable[[], Any] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Row.name must be a non-empty str, got {self.name!r}")
        if not callable(self.setup):
            raise TypeError(f"Row.setup of {self.name!r} must be callable, got {type(self.setup).__name__}")
        for k in ("flops", "macs"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"Row.{k} of {self.name!r} must be a number >= 0, got {v!r}")
        if self.flops is None and self.macs is not None:
            self.flops = 2 * self.macs
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"Row.device of {self.name!r} must be 'cpu' or 'gpu', got {self.device!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"Row.threads of {self.name!r} must be an int >= 1, got {self.threads!r}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"Row.meta of {self.name!r} must be a dict, got {type(self.meta).__name__}")
        if self.group is None:
            self.group = self.name.rsplit("/", 1)[0] if "/" in self.name else ""

    @property
    def dtype(self):
        """``meta["dtype"]`` as a NumPy dtype name (float32 when absent)."""
        d = self.meta.get("dtype", "float32")
        try:
            import numpy as np
            return np.dtype(d).name
        except (TypeError, ValueError, ImportError):
            return str(d)


@dataclass
class Settings:
    """How a run times rows. ``None`` fields take the quick or full defaults."""

    quick: bool = False
    warmup: int | None = None
    repeat: int | None = None
    min_time: float | None = None
    rss: str = "inline"              # "inline" or "subprocess"
    peak: bool = True
    peak_size: int | None = None      # GEMM size for the CPU peak (the GPU uses 4x, at least 4096)
    plots: bool = True
    filter: str | None = None         # keep rows whose name contains this
    child_timeout: float = 600.0

    def __post_init__(self):
        if self.rss not in ("inline", "subprocess"):
            raise ValueError(f"rss must be 'inline' or 'subprocess', got {self.rss!r}")
        q = self.quick
        self.warmup = (1 if q else 2) if self.warmup is None else self.warmup
        self.repeat = (3 if q else 10) if self.repeat is None else self.repeat
        self.min_time = (0.05 if q else 0.5) if self.min_time is None else self.min_time
        self.peak_size = (1024 if q else 2048) if self.peak_size is None else self.peak_size
        if self.warmup < 0 or self.repeat < 1 or self.min_time < 0 or self.peak_size < 1:
            raise ValueError(f"need warmup >= 0, repeat >= 1, min_time >= 0, peak_size >= 1; got {self}")


# ------------------------------------------------------------------------------------------------ modules
def discover(bench_dir=BENCH_DIR):
    """``{name: path}`` of the ``bench_<name>.py`` files in ``bench_dir``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(Path(bench_dir).glob("bench_*.py"))}


def load_module(path):
    """Import a bench module from its file (the repository root is put on ``sys.path`` for ``bench.*``)."""
    path = Path(path).resolve()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    modname = f"_npconv_bench_{path.parent.name}_{path.stem}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[modname]
        raise
    if not callable(getattr(mod, "rows", None)):
        raise TypeError(f"bench module {str(path)!r} must define rows(quick: bool) -> list[Row]")
    return mod


def module_rows(mod, quick, *, where="bench module"):
    """Call ``mod.rows(quick)`` and check the result: Row objects, unique names, baselines that exist."""
    rows = list(mod.rows(bool(quick)))
    bad = [type(r).__name__ for r in rows if not isinstance(r, Row)]
    if bad:
        raise TypeError(f"{where}: rows() must return Row objects, got {bad[:3]}")
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: row names must be unique, repeated: {dup}")
    missing = sorted({r.baseline for r in rows if r.baseline is not None and r.baseline not in names})
    if missing:
        raise ValueError(f"{where}: baseline row(s) {missing} do not exist")
    return rows


# ------------------------------------------------------------------------------------------------ running
def _gpu_sync():
    import cupy
    return cupy.cuda.Device().synchronize


def _gpu_missing():
    """Why GPU rows cannot run here (a str), or None when CuPy sees a CUDA device."""
    try:
        import cupy
    except Exception as exc:
        return f"no GPU: CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        return None if cupy.is_available() else "no GPU: CuPy sees no CUDA device"
    except Exception as exc:
        return f"no GPU: {type(exc).__name__}: {exc}"


def _release_memory():
    gc.collect()
    cp = sys.modules.get("cupy")
    if cp is not None:
        try:
            cp.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass


def _time_row(row, settings):
    """Run one row in this process; a result dict (status ok / skipped / error)."""
    res = {"status": "ok", "error": ""}
    fn = None
    reset = reset_peak_rss()  # the previous row ended with a gc.collect() (_release_memory)
    try:
        with thread_limit(row.threads):
            why = _gpu_missing() if row.device == "gpu" else None
            if why:
                return {"status": "skipped", "error": why, "rss_reset": reset}
            try:
                fn = row.setup()
            except SkipRow as exc:
                return {"status": "skipped", "error": str(exc), "rss_reset": reset}
            if not callable(fn):
                raise TypeError(f"setup() must return a callable, got {type(fn).__name__}")
            sync = row.sync if row.sync is not None else (_gpu_sync() if row.device == "gpu" else None)
            t = measure(fn, warmup=settings.warmup if row.warmup is None else row.warmup,
                        repeat=settings.repeat if row.repeat is None else row.repeat,
                        min_time=settings.min_time if row.min_time is None else row.min_time, sync=sync)
        res.update({f"{k}_s" if k != "n" else "n": v for k, v in t.items()})
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a failing row must not stop the suite
        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()}
    finally:
        del fn
        _release_memory()
    res["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["rss_reset"] = reset
    return res


def _rss_in_child(path, row_name, settings):
    """Peak RSS of (setup, warm-up, one call) of a row in a fresh interpreter: (peak, base) MiB, or an error."""
    cmd = [sys.executable, "-m", "bench._harness", "--rss-child", str(path), row_name,
           "1" if settings.quick else "0", str(settings.warmup)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=settings.child_timeout)
    except subprocess.TimeoutExpired:
        return None, None, f"the memory run took over {settings.child_timeout:.0f} s"
    for line in p.stdout.splitlines():
        if line.startswith(_CHILD_TAG):
            d = json.loads(line[len(_CHILD_TAG):])
            return d.get("peak_rss_mb"), d.get("rss_base_mb"), d.get("error", "")
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return None, None, f"the memory run failed (exit {p.returncode}): {' | '.join(tail)}"


def _child_main(argv):
    """``python -m bench._harness --rss-child PATH ROW QUICK WARMUP``: print the row's peak RSS as JSON."""
    path, row_name, quick, warmup = argv[0], argv[1], argv[2] == "1", int(argv[3])
    out = {}
    try:
        rows = {r.name: r for r in module_rows(load_module(path), quick, where=path)}
        row = rows[row_name]
        out["rss_base_mb"] = round(peak_rss_mb(), 1)
        with thread_limit(row.threads):
            try:
                fn = row.setup()
            except SkipRow as exc:
                fn, out["error"] = None, f"skipped: {exc}"
            if fn is not None:
                sync = row.sync if row.sync is not None else (_gpu_sync() if row.device == "gpu" else None)
                for _ in range(max(warmup, 0) + 1):
                    fn()
                    if sync:
                        sync()
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(_CHILD_TAG + json.dumps(out), flush=True)


def run_rows(rows, settings=None, *, module="adhoc", path=None, log=print):
    """Time ``rows`` (a list of Row) and return one result dict per row.

    ``path`` is the bench module's file, needed for ``settings.rss == "subprocess"``. Derived columns
    (GFLOP/s, fraction of peak, speed-up) are added by ``add_derived`` once the peaks are known.
    """
    settings = settings or Settings()
    if settings.rss == "subprocess" and path is None:
        raise ValueError("rss='subprocess' needs the bench module's path (path=...) to rerun rows in a child")
    out = []
    for row in rows:
        if settings.filter and settings.filter not in row.name:
            continue
        base = {"module": module, "name": row.name, "group": row.group, "device": row.device,
                "dtype": row.dtype, "threads": row.threads, "flops": row.flops, "baseline": row.baseline,
                "meta": dict(row.meta)}
        res = _time_row(row, settings)
        if settings.rss == "subprocess" and res["status"] == "ok":
            res["peak_rss_mb"], res["rss_base_mb"], err = _rss_in_child(path, row.name, settings)
            if err:
                res["rss_error"] = err
        base.update(res)
        out.append(base)
        if log:
            log(_progress_line(base))
            if base["status"] == "error" and base.get("traceback"):
                log(base["traceback"].rstrip())
    return out


def _progress_line(r):
    if r["status"] == "ok":
        return f"  [{r['module']}] {r['name']}: {_fmt_time(r['median_s'])} (n={r['n']})"
    return f"  [{r['module']}] {r['name']}: {r['status'].upper()} {r['error']}"


def measure_peaks(rows, settings, *, log=print):
    """The GEMM peaks needed by ``rows`` (those with flops), keyed ``"<device>/<dtype>"``."""
    peaks = {}
    if not settings.peak:
        return peaks
    need = sorted({(r.device, r.dtype) for r in rows if r.flops})
    for device, dtype in need:
        key = f"{device}/{dtype}"
        n = settings.peak_size if device == "cpu" else max(4096, 4 * settings.peak_size)
        try:
            if device == "gpu":
                import cupy
                if not cupy.is_available():
                    raise RuntimeError("no CUDA device")
            peaks[key] = gemm_peak(device=device, dtype=dtype, n=n, repeat=5)
            if log:
                log(f"  peak {key}: {peaks[key]['gflops']:.1f} GFLOP/s ({peaks[key]['what']})")
        except Exception as exc:
            peaks[key] = {"gflops": None, "error": f"{type(exc).__name__}: {exc}"}
            if log:
                log(f"  peak {key}: not measured ({exc})")
    return peaks


def add_derived(results, peaks):
    """Add gflops, peak_gflops, frac_peak and speedup to ``results`` (in place); returns them."""
    by_name = {(r["module"], r["name"]): r for r in results}
    for r in results:
        ok = r["status"] == "ok" and r.get("median_s")
        r["gflops"] = r["flops"] / r["median_s"] / 1e9 if ok and r.get("flops") else None
        peak = (peaks.get(f"{r['device']}/{r['dtype']}") or {}).get("gflops") if r["gflops"] is not None else None
        r["peak_gflops"] = peak
        r["frac_peak"] = r["gflops"] / peak if r["gflops"] is not None and peak else None
        b = by_name.get((r["module"], r["baseline"])) if r.get("baseline") else None
        r["speedup"] = (b["median_s"] / r["median_s"] if ok and b is not None and b["status"] == "ok" else None)
    return results


def run_suite(modules, settings, *, log=print):
    """Run bench modules (``{name: path}``) and return ``(results, peaks)``.

    A module that fails to import or to list its rows gives one error result named ``<rows()>``.
    """
    loaded, results = [], []
    for name, path in modules.items():
        try:
            rows = module_rows(load_module(path), settings.quick, where=str(path))
            loaded.append((name, path, rows))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            results.append({"module": name, "name": "<rows()>", "group": "", "device": "cpu", "dtype": "",
                            "threads": None, "flops": None, "baseline": None, "meta": {}, "status": "error",
                            "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            if log:
                log(f"  [{name}] cannot list rows: {exc}")
    all_rows = [r for _, _, rows in loaded for r in rows
                if not settings.filter or settings.filter in r.name]
    peaks = measure_peaks(all_rows, settings, log=log)
    for name, path, rows in loaded:
        if log:
            log(f"{name}: {len(rows)} row(s)")
        results += run_rows(rows, settings, module=name, path=path, log=log)
    add_derived(results, peaks)
    return results, peaks


# ------------------------------------------------------------------------------------------------ reporting
def _fmt_time(s):
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    unit, f = _time_unit(s)
    return f"{s / f:.3g} {unit}"


def _time_unit(s):
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return unit, f
    return "ns", 1e-9


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(results):
    """A plain-text table of the results, one line per row."""
    head = ["module", "row", "median", "spread", "n", "GFLOP/s", "% peak", "speedup", "RSS MiB", "status"]
    lines = []
    for r in results:
        ok = r["status"] == "ok"
        spread = (r["p75_s"] - r["p25_s"]) / r["median_s"] if ok and r.get("median_s") else None
        rss = r.get("peak_rss_mb") if r.get("peak_rss_mb") is not None else r.get("process_peak_rss_mb")
        lines.append([r["module"], r["name"], _fmt_time(r.get("median_s")) if ok else "-",
                      f"±{100 * spread / 2:.1f}%" if spread is not None else "-", str(r.get("n", "-")),
                      _fmt(r.get("gflops"), ".2f"),
                      _fmt(None if r.get("frac_peak") is None else 100 * r["frac_peak"], ".1f"),
                      _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                      _fmt(rss, ".0f"), r["status"] if ok else f"{r['status']}: {r['error']}"[:60]])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(l) for l in lines]
    return "\n".join(out)


_FIXED = ["module", "name", "group", "device", "dtype", "threads", "status", "median_s", "p25_s", "p75_s", "min_s",
          "max_s", "n", "flops", "gflops", "peak_gflops", "frac_peak", "baseline", "speedup",
          "process_peak_rss_mb", "rss_reset", "peak_rss_mb", "rss_base_mb", "error", "rss_error"]


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    try:  # NumPy scalars and dtypes
        import numpy as np
        if isinstance(v, np.generic):
            return _jsonable(v.item())
    except ImportError:
        pass
    return str(v)


def write_csv(path, results):
    """One line per result; fixed columns first, then every ``meta`` key (prefixed ``meta.`` on a clash)."""
    meta_keys = []
    for r in results:
        for k in r.get("meta", {}):
            if k not in meta_keys:
                meta_keys.append(k)
    meta_cols = {k: (f"meta.{k}" if k in _FIXED else k) for k in meta_keys}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_FIXED + list(meta_cols.values()))
        w.writeheader()
        for r in results:
            line = {k: _jsonable(r.get(k)) for k in _FIXED}
            line.update({meta_cols[k]: _jsonable(v) for k, v in r.get("meta", {}).items()})
            w.writerow({k: ("" if v is None else v) for k, v in line.items()})
    return Path(path)


def write_json(path, results, *, machine, peaks, settings):
    doc = {"schema": 1, "machine": machine, "peaks": peaks, "settings": dataclasses.asdict(settings),
           "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results]}
    Path(path).write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    return Path(path)


def make_plots(out_dir, results, peaks, *, log=print):
    """One PNG per module: median time per row (bars, p25-p75 whiskers) and GFLOP/s where known.

    Returns the written paths; without matplotlib, prints why and returns an empty list.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if log:
            log("matplotlib is not installed: skipping the plots (pip install 'npconv[plot]')")
        return []
    written = []
    for module in dict.fromkeys(r["module"] for r in results):
        rs = [r for r in results if r["module"] == module and r["status"] == "ok"]
        if not rs:
            continue
        groups = list(dict.fromkeys(r["group"] for r in rs))
        has_flops = any(r.get("gflops") for r in rs)
        ncol = 2 if has_flops else 1
        heights = [0.6 + 0.3 * sum(r["group"] == g for r in rs) for g in groups]
        fig, axes = plt.subplots(len(groups), ncol, figsize=(6 * ncol + 2, sum(heights) + 1), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for gi, g in enumerate(groups):
            gr = [r for r in rs if r["group"] == g]
            labels = [r["name"][len(g) + 1:] if g and r["name"].startswith(g + "/") else r["name"] for r in gr]
            y = list(range(len(gr)))
            unit, scale = _time_unit(max(r["median_s"] for r in gr))
            med = [r["median_s"] / scale for r in gr]
            err = [[(r["median_s"] - r["p25_s"]) / scale for r in gr],
                   [(r["p75_s"] - r["median_s"]) / scale for r in gr]]
            ax = axes[gi][0]
            ax.barh(y, med, xerr=err, color="tab:blue", capsize=2)
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"median time ({unit}), whiskers p25-p75")
            ax.set_title(f"{module}: {g}" if g else module, fontsize=9)
            if has_flops and not any(r.get("gflops") for r in gr):
                axes[gi][1].axis("off")
            elif has_flops:
                ax2 = axes[gi][1]
                ax2.barh(y, [r.get("gflops") or 0 for r in gr], color="tab:green")
                ax2.set_yticks(y, [""] * len(gr))
                ax2.invert_yaxis()
                ax2.set_xlabel("GFLOP/s")
                for key in sorted({f"{r['device']}/{r['dtype']}" for r in gr if r.get("gflops")}):
                    p = (peaks.get(key) or {}).get("gflops")
                    if p:
                        ax2.axvline(p, color="k", ls="--", lw=0.8)
                        ax2.annotate(f"{key} GEMM peak", (p, 0), fontsize=7, rotation=90, va="top", ha="right")
        fig.tight_layout()
        path = Path(out_dir) / f"{module}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(out_dir, results, *, machine, peaks, settings, log=print):
    """Write results.csv, results.json and the plots (when ``settings.plots``); return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_csv(out_dir / "results.csv", results),
             write_json(out_dir / "results.json", results, machine=machine, peaks=peaks, settings=settings)]
    if settings.plots:
        paths += make_plots(out_dir, results, peaks, log=log)
    return paths


def run_and_report(modules, settings, out_dir, *, log=print):
    """Run the suite, print the table and write every output. Returns ``(results, paths)``."""
    results, peaks = run_suite(modules, settings, log=log)
    machine = machine_info()
    paths = write_outputs(out_dir, results, machine=machine, peaks=peaks, settings=settings, log=log)
    if log:
        log("")
        log(format_table(results))
        log("")
        log(f"machine: {machine['cpu_model']}, {machine['cores_usable']} usable core(s); "
            f"written: {', '.join(str(p) for p in paths)}")
    return results, paths


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--rss-child":
        # delegate to the importable module, so bench modules share its Row class
        from bench._harness import _child_main as _main
        _main(sys.argv[2:])
    else:
        print(__doc__)
        print("usage: python bench/run_all.py --help   (this module is the library behind it)")
