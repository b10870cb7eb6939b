"""The benchmark harness (bench/_harness.py, bench/_timing.py, bench/run_all.py) on a toy bench module.

No timing figure is asserted, except lower bounds that cannot fail (a call that sleeps s seconds takes >= s).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _harness  # noqa: E402
from bench._harness import (Row, Settings, SkipRow, add_derived, discover, format_table, load_module,  # noqa: E402
                            make_plots, module_rows, run_and_report, run_rows)
from bench._timing import interleaved, machine_info, measure, thread_limit  # noqa: E402

TOY = Path(__file__).resolve().parent / "bench_toy.py"
FAST = dict(warmup=1, repeat=3, min_time=0.0, peak_size=64)


@pytest.fixture
def toy():
    mod = load_module(TOY)
    mod.CALLS.clear()
    mod.SETUPS.clear()
    return mod


# ------------------------------------------------------------------------------------------------ timing
def test_measure_calls_and_statistics():
    calls, syncs = [], []
    t = measure(lambda: calls.append(time.sleep(0.002)), warmup=2, repeat=5, sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 7 and t["n"] == 5
    assert t["min"] <= t["p25"] <= t["median"] <= t["p75"] <= t["max"]
    assert t["min"] >= 0.002  # sleep never returns early
    t2 = measure(lambda: None, warmup=0, repeat=2)
    assert t2["min"] <= t2["p25"] <= t2["p75"] <= t2["max"]  # quartiles stay inside the samples
    with pytest.raises(ValueError, match="repeat"):
        measure(lambda: None, repeat=0)


def test_measure_keeps_going_until_min_time():
    n = []
    t = measure(lambda: n.append(time.sleep(0.001)), warmup=0, repeat=1, min_time=0.03)
    assert t["n"] == len(n) and t["n"] > 1


def test_interleaved_alternates_blocks_and_counts_calls():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    t = interleaved(fns, repeat=4, block=2, warm=0)
    # one warm-up call each, then per round a re-warm (one call with warm=0) and `block` timed calls of each, a's
    # block first
    assert order[:2] == ["a", "b"]
    assert order[2:8] == ["a", "a", "a", "b", "b", "b"]
    assert t["a"]["n"] == t["b"]["n"] == 4
    assert order.count("a") == order.count("b") == 1 + 2 * 3
    assert 0 <= t["a"]["min"] <= t["a"]["median"]
    with pytest.raises(ValueError, match="repeat"):
        interleaved(fns, repeat=0)
    for bad in (-0.001, float("nan")):
        with pytest.raises(ValueError, match="warm must be a time >= 0"):
            interleaved(fns, repeat=1, warm=bad)


class _Ramp:
    """Two callables that are slow (``slow`` s) for their first ``n_slow`` calls after a call of the other one, and
    ``fast`` s after that: the warm-up ramp ``interleaved``'s ``warm`` is for."""

    def __init__(self, n_slow=4, slow=0.004, fast=0.0005):
        self.last, self.since, self.n_slow, self.slow, self.fast = None, 0, n_slow, slow, fast
        self.calls = {"a": 0, "b": 0}

    def fn(self, name):
        def call():
            self.since = self.since + 1 if self.last == name else 1
            self.last = name
            self.calls[name] += 1
            time.sleep(self.slow if self.since <= self.n_slow else self.fast)
        return call


def test_interleaved_warms_each_block_for_a_time():
    ramp = _Ramp()
    t = interleaved({"a": ramp.fn("a"), "b": ramp.fn("b")}, repeat=6, block=3, warm=0.03)
    # 30 ms of untimed calls before each block: past the 4 slow calls (16 ms), so every timed call is a fast one
    assert t["a"]["n"] == t["b"]["n"] == 6
    assert t["a"]["median"] < 0.004 and t["b"]["median"] < 0.004
    assert ramp.calls["a"] >= 1 + 2 * (3 + 4)
    # with one untimed call a block, the first two timed calls of each block are still slow ones: a median of them
    ramp = _Ramp()
    t = interleaved({"a": ramp.fn("a"), "b": ramp.fn("b")}, repeat=6, block=3, warm=0)
    assert t["a"]["median"] >= 0.004 and t["b"]["median"] >= 0.004
    assert ramp.calls["a"] == 1 + 2 * 4


def test_interleaved_sees_a_slow_callable():
    t = interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.002)}, repeat=3, block=1)
    assert t["slow"]["min"] >= 0.002 > t["fast"]["median"]


def test_thread_limit_is_scoped():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numba
    before_nb = numba.get_num_threads()
    before_blas = [d["num_threads"] for d in threadpoolctl.threadpool_info()]
    with thread_limit(1):
        assert numba.get_num_threads() == 1
        assert all(d["num_threads"] == 1 for d in threadpoolctl.threadpool_info())
    assert numba.get_num_threads() == before_nb
    assert [d["num_threads"] for d in threadpoolctl.threadpool_info()] == before_blas
    with pytest.raises(ValueError, match="threads"):
        with thread_limit(0):
            pass


def test_peak_rss_rises_and_resets():
    from bench._timing import peak_rss_mb, reset_peak_rss
    before = peak_rss_mb()
    buf = np.ones(96 * 2 ** 20 // 8)
    high = peak_rss_mb()
    del buf
    assert high >= before and high > 64
    if reset_peak_rss():
        assert peak_rss_mb() < high - 64


def test_machine_info_fields():
    m = machine_info()
    json.dumps(m)
    assert m["cpu_model"] and m["cores_logical"] >= 1 and m["cores_usable"] >= 1
    assert m["versions"]["numpy"] == np.__version__
    assert m["threads"]["numba_threading_layer"] in ("tbb", "omp", "workqueue")
    assert m["date"][:4].isdigit()
    if not isinstance(m["threads"]["blas"], str):
        assert any(d["user_api"] == "blas" for d in m["threads"]["blas"])
    # numba's target CPU by LLVM's name (the model name alone does not tell a Zen 4 from a Zen 5 VM)
    import llvmlite.binding as llb
    import numba
    named = numba.config.CPU_NAME not in (None, "", "host")
    assert m["cpu_target"] == (numba.config.CPU_NAME if named else llb.get_host_cpu_name())
    assert isinstance(m["caches"], dict)


def test_cache_sizes_from_sysfs(tmp_path):
    from bench._timing import cache_sizes
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                             (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    (tmp_path / "uevent").write_text("")
    assert cache_sizes(str(tmp_path)) == {"L1d": "32K", "L2": "1024K", "L3": "32768K"}
    assert cache_sizes(str(tmp_path / "missing")) == {}


# ------------------------------------------------------------------------------------------------ rows
def test_row_checks_and_defaults():
    f = lambda: (lambda: None)  # noqa: E731
    r = Row("conv/3x3/f32", f, macs=10, meta={"dtype": np.float64})
    assert r.flops == 20 and r.group == "conv/3x3" and r.dtype == "float64"
    assert Row("plain", f).group == "" and Row("plain", f).dtype == "float32"
    with pytest.raises(ValueError, match="name"):
        Row("", f)
    with pytest.raises(TypeError, match="setup"):
        Row("a", 3)
    with pytest.raises(ValueError, match="flops"):
        Row("a", f, flops=-1)
    with pytest.raises(ValueError, match="device"):
        Row("a", f, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        Row("a", f, threads=0)
    with pytest.raises(ValueError, match="rss"):
        Settings(rss="sometimes")


def test_module_rows_checks(tmp_path):
    class M:
        pass
    m = M()
    f = lambda: (lambda: None)  # noqa: E731
    m.rows = lambda quick: [Row("a", f), Row("a", f)]
    with pytest.raises(ValueError, match="unique"):
        module_rows(m, True)
    m.rows = lambda quick: [Row("a", f, baseline="zzz")]
    with pytest.raises(ValueError, match="zzz"):
        module_rows(m, True)
    m.rows = lambda quick: ["not a row"]
    with pytest.raises(TypeError, match="Row"):
        module_rows(m, True)
    (tmp_path / "bench_norows.py").write_text("x = 1\n")
    with pytest.raises(TypeError, match="rows"):
        load_module(tmp_path / "bench_norows.py")


def test_run_rows_counts_calls_and_keeps_going():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1

        def fn():
            calls["fn"] += 1
            time.sleep(0.001)
        return fn

    def boom():
        raise RuntimeError("kaboom")

    def skip():
        raise SkipRow("no GPU here")

    rows = [Row("fails", lambda: boom), Row("bad-setup", lambda: 42), Row("skipped", skip),
            Row("good", setup, flops=1e6)]
    res = run_rows(rows, Settings(warmup=2, repeat=4, min_time=0.0), log=None)
    by = {r["name"]: r for r in res}
    assert by["fails"]["status"] == "error" and "kaboom" in by["fails"]["error"]
    assert by["bad-setup"]["status"] == "error" and "callable" in by["bad-setup"]["error"]
    assert by["skipped"]["status"] == "skipped" and by["skipped"]["error"] == "no GPU here"
    g = by["good"]
    assert g["status"] == "ok" and calls == {"setup": 1, "fn": 6} and g["n"] == 4
    assert g["min_s"] <= g["p25_s"] <= g["median_s"] <= g["p75_s"] <= g["max_s"]
    assert g["min_s"] >= 0.001
    assert g["process_peak_rss_mb"] > 0
    with pytest.raises(ValueError, match="path"):
        run_rows(rows, Settings(rss="subprocess"), log=None)


def test_gpu_rows_are_skipped_without_a_gpu():
    if _harness._gpu_missing() is None:
        pytest.skip("a CUDA device is present: GPU rows run here")
    ran = []
    res = run_rows([Row("g", lambda: ran.append(1) or (lambda: None), device="gpu")],
                   Settings(warmup=0, repeat=1, min_time=0.0), log=None)
    assert res[0]["status"] == "skipped" and "no GPU" in res[0]["error"] and ran == []


@pytest.mark.gpu
def test_gpu_row_is_synchronised_and_has_a_peak():
    import cupy as cp
    n = 256
    a = cp.ones((n, n), cp.float32)
    rows = [Row("mm", lambda: (lambda: a @ a), device="gpu", macs=n ** 3, meta={"dtype": "float32"})]
    s = Settings(quick=True, warmup=1, repeat=3, min_time=0.0, peak_size=256)
    res = add_derived(run_rows(rows, s, log=None), _harness.measure_peaks(rows, s, log=None))
    assert res[0]["status"] == "ok", res[0]
    assert res[0]["peak_gflops"] > 0 and res[0]["frac_peak"] > 0


def test_derived_columns_follow_their_definitions():
    f = lambda: (lambda: None)  # noqa: E731
    res = run_rows([Row("base", f, flops=3e9), Row("fast", f, flops=3e9, baseline="base"),
                    Row("nof", f), Row("f64", f, flops=1e9, meta={"dtype": "float64"})],
                   Settings(warmup=0, repeat=2, min_time=0.0), log=None)
    peaks = {"cpu/float32": {"gflops": 50.0}, "cpu/float64": {"gflops": 25.0}}
    add_derived(res, peaks)
    by = {r["name"]: r for r in res}
    assert by["base"]["gflops"] == pytest.approx(3.0 / by["base"]["median_s"])
    assert by["base"]["frac_peak"] == pytest.approx(by["base"]["gflops"] / 50.0)
    assert by["f64"]["frac_peak"] == pytest.approx(by["f64"]["gflops"] / 25.0)
    assert by["fast"]["speedup"] == pytest.approx(by["base"]["median_s"] / by["fast"]["median_s"])
    assert by["base"]["speedup"] is None and by["nof"]["gflops"] is None and by["nof"]["frac_peak"] is None
    table = format_table(res)
    assert table.splitlines()[0].split()[:3] == ["module", "row", "median"]
    assert all(n in table for n in ("base", "fast", "nof", "f64"))


# ------------------------------------------------------------------------------------------------ toy module
def test_discover_finds_the_toy_module():
    found = discover(TOY.parent)
    assert found == {"toy": TOY}


def test_toy_suite_outputs_parse(tmp_path, toy):
    settings = Settings(quick=True, **FAST)
    results, paths = run_and_report({"toy": TOY}, settings, tmp_path, log=None)
    names = [r.name for r in module_rows(toy, True)]
    assert [r["name"] for r in results] == names
    # every row ran once through setup, and its callable warmup + n times
    for r in results:
        if r["status"] == "ok":
            assert toy.SETUPS[r["name"]] == 1 and toy.CALLS[r["name"]] == 1 + r["n"]

    with open(tmp_path / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [x["name"] for x in lines] == names
    by = {x["name"]: x for x in lines}
    assert by["skip/always"]["status"] == "skipped" and "always skips" in by["skip/always"]["error"]
    assert by["sleep/1ms"]["status"] == "ok" and float(by["sleep/1ms"]["median_s"]) >= 0.001
    assert float(by["sleep/3ms"]["median_s"]) >= 0.003
    assert by["sleep/1ms"]["sleep_s"] == "0.001" and by["alloc/big"]["mib"] == "128"  # meta keys as columns
    assert by["matmul/n32"]["dtype"] == "float32" and float(by["matmul/n32"]["flops"]) == 2 * 32 ** 3
    assert float(by["matmul/n32"]["gflops"]) == pytest.approx(2 * 32 ** 3 / float(by["matmul/n32"]["median_s"]) / 1e9,
                                                              rel=1e-6)
    assert float(by["sleep/3ms"]["speedup"]) == pytest.approx(
        float(by["sleep/1ms"]["median_s"]) / float(by["sleep/3ms"]["median_s"]), rel=1e-6)
    assert by["matmul/n32-1thread"]["threads"] == "1"

    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "peaks", "settings", "results"} <= set(doc)
    m = doc["machine"]
    for key in ("cpu_model", "cores_logical", "cores_usable", "threads", "versions", "date", "python"):
        assert key in m
    assert "numba_threading_layer" in m["threads"] and "blas" in m["threads"]
    peak = doc["peaks"]["cpu/float32"]
    assert peak["gflops"] > 0 and peak["n"] == 64
    jr = {r["name"]: r for r in doc["results"]}
    assert jr["matmul/n32"]["frac_peak"] == pytest.approx(jr["matmul/n32"]["gflops"] / peak["gflops"])
    assert jr["sleep/1ms"]["meta"] == {"sleep_s": 0.001}
    assert doc["settings"]["quick"] is True and len(doc["results"]) == len(lines)

    png = tmp_path / "toy.png"
    if _has_matplotlib():
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.csv") in paths


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch):
    f = lambda: (lambda: None)  # noqa: E731
    res = add_derived(run_rows([Row("a", f)], Settings(warmup=0, repeat=1, min_time=0.0), log=None), {})
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    msgs = []
    assert make_plots(tmp_path, res, {}, log=msgs.append) == []
    assert any("matplotlib" in m and "skipping" in m for m in msgs)
    assert list(tmp_path.iterdir()) == []


def test_peak_rss_per_row_in_a_fresh_process(toy):
    """ru_maxrss never goes down, so in-process numbers would hide that alloc/small needs little memory."""
    rows = [r for r in module_rows(toy, True) if r.name.startswith("alloc/")]
    assert [r.name for r in rows] == ["alloc/big", "alloc/small"]  # big first: inline, small would inherit it
    res = run_rows(rows, Settings(quick=True, rss="subprocess", **{k: v for k, v in FAST.items()
                                                                    if k != "peak_size"}),
                   module="toy", path=TOY, log=None)
    big, small = res
    assert "rss_error" not in big and "rss_error" not in small, (big, small)
    assert big["rss_base_mb"] <= big["peak_rss_mb"] and small["rss_base_mb"] <= small["peak_rss_mb"]
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 0.75 * (toy.BIG_MIB - toy.SMALL_MIB)
    if big["rss_reset"]:  # the in-process peak was reset before each row: per-row figures there too
        assert big["process_peak_rss_mb"] - small["process_peak_rss_mb"] > 0.75 * (toy.BIG_MIB - toy.SMALL_MIB)
    else:  # without a reset the in-process figure only grows
        assert small["process_peak_rss_mb"] >= big["process_peak_rss_mb"]


# ------------------------------------------------------------------------------------------------ run_all.py
def _run_all(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_run_all_quick_only_toy(tmp_path):
    p = _run_all("--quick", "--only", "toy", "--bench-dir", str(TOY.parent), "--out", str(tmp_path),
                 "--peak-size", "64", "--repeat", "2", "--min-time", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "GFLOP/s" in p.stdout and "sleep/3ms" in p.stdout
    with open(tmp_path / "results.csv", newline="") as f:
        assert {x["name"] for x in csv.DictReader(f)} >= {"sleep/1ms", "matmul/n32", "skip/always"}
    json.loads((tmp_path / "results.json").read_text())


def test_run_all_cli_errors_and_listing(tmp_path):
    p = _run_all("--only", "nonexistent", "--bench-dir", str(TOY.parent), "--out", str(tmp_path))
    assert p.returncode != 0 and "nonexistent" in p.stderr and "toy" in p.stderr
    p = _run_all("--list", "--quick", "--only", "bench_toy", "--bench-dir", str(TOY.parent))
    assert p.returncode == 0 and "sleep/1ms" in p.stdout and "matmul/n32" in p.stdout
    assert not list(tmp_path.iterdir())


def test_run_all_exit_status_reports_failures(tmp_path):
    (tmp_path / "bench_broken.py").write_text(
        "from bench._harness import Row\n"
        "def _setup():\n    raise RuntimeError('broken on purpose')\n"
        "def rows(quick):\n    return [Row('fine', lambda: (lambda: None)), Row('bad', _setup)]\n")
    (tmp_path / "bench_noimport.py").write_text("import a_module_that_does_not_exist\n")
    out = tmp_path / "out"
    p = _run_all("--quick", "--bench-dir", str(tmp_path), "--out", str(out), "--no-peak", "--no-plots")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "broken on purpose" in p.stdout and "a_module_that_does_not_exist" in p.stdout
    with open(out / "results.csv", newline="") as f:
        status = {(x["module"], x["name"]): x["status"] for x in csv.DictReader(f)}
    assert status == {("broken", "fine"): "ok", ("broken", "bad"): "error", ("noimport", "<rows()>"): "error"}
    assert not list(out.glob("*.png"))
