"""A toy bench module for the harness tests: rows whose cost is known (sleeps, a small matmul, allocations).

It follows the interface of ``bench/_harness.py`` exactly, so ``run_all.py --bench-dir tests/bench --only toy``
runs it like any real bench module.
"""
from __future__ import annotations

import time

import numpy as np

from bench._harness import Row, SkipRow

#: row name -> number of calls of its timed callable (read by the tests)
CALLS: dict = {}
#: row name -> number of setup calls
SETUPS: dict = {}

BIG_MIB = 128
SMALL_MIB = 1


def _counted(name, fn):
    SETUPS[name] = SETUPS.get(name, 0) + 1

    def call():
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn()
    return call


def _sleep_row(name, seconds, **kw):
    return Row(name, lambda: _counted(name, lambda: time.sleep(seconds)), meta={"sleep_s": seconds}, **kw)


def _matmul_setup(name, n):
    def setup():
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        return _counted(name, lambda: a @ a)
    return setup


def _alloc_setup(name, mib):
    def setup():
        # a fresh, fully written buffer on every call: the call's peak memory is about ``mib`` MiB
        return _counted(name, lambda: np.ones(mib * 2 ** 20 // 8).sum())
    return setup


def _skip_setup():
    raise SkipRow("the toy row that always skips")


def rows(quick: bool):
    n = 32 if quick else 128
    return [
        _sleep_row("sleep/1ms", 0.001),
        _sleep_row("sleep/3ms", 0.003, baseline="sleep/1ms"),
        Row(f"matmul/n{n}", _matmul_setup(f"matmul/n{n}", n), macs=n ** 3,
            meta={"impl": "numpy", "dtype": "float32", "n": n}),
        Row(f"matmul/n{n}-1thread", _matmul_setup(f"matmul/n{n}-1thread", n), macs=n ** 3, threads=1,
            baseline=f"matmul/n{n}", meta={"impl": "numpy", "dtype": "float32", "n": n}),
        Row("alloc/big", _alloc_setup("alloc/big", BIG_MIB), repeat=2, meta={"mib": BIG_MIB}),
        Row("alloc/small", _alloc_setup("alloc/small", SMALL_MIB), repeat=2, meta={"mib": SMALL_MIB}),
        Row("skip/always", _skip_setup),
    ]
