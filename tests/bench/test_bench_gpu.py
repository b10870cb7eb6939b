"""bench/bench_gpu.py's timing helpers, with scripted timers in place of CUDA events (no GPU needed): the cases are
timed in alternation, round by round, and a speed-up is the median of the rounds' ratios."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def scripted_timer(script, calls):
    """A ``once(fn)`` that calls fn and returns the next time scripted for it (script: {fn: iterator})."""
    def once(fn):
        fn()
        calls.append(("timed", fn.__name__))
        return next(script[fn.__name__])
    return once


def case(name, calls):
    def fn():
        calls.append(("call", name))
    fn.__name__ = name
    return fn


def test_cases_alternate_round_by_round():
    from bench.bench_gpu import time_interleaved
    calls = []
    a, b = case("a", calls), case("b", calls)
    script = {"a": iter(range(100)), "b": iter(range(100, 200))}
    timed, rounds = time_interleaved({"a": (a, "cupy"), "b": (b, "torch")}, warmup=1, repeat=4, block=2,
                                     timers={"cupy": scripted_timer(script, calls),
                                             "torch": scripted_timer(script, calls)})
    # warm-up: one call each; then 2 rounds of (one untimed call + 2 timed calls) for a, then for b
    want = [("call", "a"), ("call", "b")]
    for _ in range(2):
        for n in "ab":
            want += [("call", n)] + [("call", n), ("timed", n)] * 2
    assert calls == want
    assert timed["a"] == {"median_ms": 1.5, "min_ms": 0, "n": 4} and timed["b"]["n"] == 4
    assert rounds == {"a": [0.5, 2.5], "b": [100.5, 102.5]}


def test_paired_speedup_cancels_a_slow_phase():
    """The machine runs the base four times slower from the second round on and the case only in the second round:
    the rounds' ratios are 2, 2 and 4 (median 2), while the ratio of the medians is 40 / 10 = 4."""
    from bench.bench_gpu import paired_speedup, time_interleaved
    calls = []
    base, fast = case("base", calls), case("fast", calls)
    script = {"base": iter([10, 40, 40]), "fast": iter([5, 20, 10])}
    timed, rounds = time_interleaved({"base": (base, "cupy"), "fast": (fast, "cupy")}, warmup=0, repeat=3, block=1,
                                     timers={"cupy": scripted_timer(script, calls)})
    assert paired_speedup(rounds, "base", "fast") == 2
    assert timed["base"]["median_ms"] / timed["fast"]["median_ms"] == 4


def test_bad_arguments_are_refused():
    from bench.bench_gpu import event_timer, time_interleaved
    with pytest.raises(ValueError, match="repeat and block must be >= 1"):
        time_interleaved({}, warmup=0, repeat=0)
    with pytest.raises(ValueError, match="cases must name at least one callable"):
        time_interleaved({}, warmup=0, repeat=3)
    with pytest.raises(ValueError, match="kind must be 'cupy' or 'torch'"):
        event_timer("opencl")


def test_format_tables_gives_the_layer_and_its_ratio_to_torch():
    """The per-layer table: the function's and the Conv2d layer's times, each against cuDNN's (hand-made results)."""
    from bench import bench_gpu
    res = {"stack": [], "layers": [
        {"layer": "conv1", "batch": 1, "macs": 10**8, "npconv": {"median_ms": 0.12},
         "npconv_layer": {"median_ms": 0.09}, "torch": {"median_ms": 0.06}},
        {"layer": "conv2", "batch": 1, "macs": 10**8, "npconv": {"median_ms": 0.2}}]}
    lines = bench_gpu.format_tables(res).splitlines()
    row1 = next(ln for ln in lines if ln.split()[:2] == ["conv1", "1"])
    assert row1.split()[-4:] == ["0.060", "2.00", "0.090", "1.50"]
    row2 = next(ln for ln in lines if ln.split()[:2] == ["conv2", "1"])
    assert row2.split()[-4:] == ["-", "-", "-", "-"]
