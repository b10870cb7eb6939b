"""bench/bench_gpu_lowrank.py: its rows are well formed. Skipping without a GPU and the quick run on the emulated
``cupy`` are checked with the other factored-layer GPU bench in test_bench_gpu_factored.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_module():
    from bench import bench_gpu_lowrank
    return bench_gpu_lowrank


@pytest.mark.parametrize("quick", [True, False])
def test_rows_are_well_formed(quick):
    from bench._harness import Row
    rows = bench_module().rows(quick)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and all(isinstance(r, Row) and r.device == "gpu" for r in rows)
    batches = (1, 4) if quick else (1, 128)
    methods = {"monochromatic", "conv_svd", "separable"}
    for N in batches:
        dense = f"gpu_conv1/dense/b{N}"
        assert dense in names
        factored = [r for r in rows if r.meta["batch"] == N and r.meta["method"] != "dense"]
        assert {r.meta["method"] for r in factored} == methods
        assert all(r.baseline == dense and r.macs > 0 for r in factored)
    if not quick:        # ZF conv1: every factored layer does fewer multiply-adds than the dense conv
        gains = [r.meta["theoretical_gain"] for r in rows if r.meta["method"] != "dense"]
        assert len(gains) == 2 * 9 and min(gains) > 1
