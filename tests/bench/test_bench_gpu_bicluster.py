"""bench/bench_gpu_bicluster.py: its rows are well formed. Skipping without a GPU and the quick run on the emulated
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
    from bench import bench_gpu_bicluster
    return bench_gpu_bicluster


@pytest.mark.parametrize("quick", [True, False])
def test_rows_are_well_formed(quick):
    from bench._harness import Row
    rows = bench_module().rows(quick)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)) and all(isinstance(r, Row) and r.device == "gpu" for r in rows)
    layer = "tiny_conv" if quick else "zf_conv2"
    for N in ((1, 4) if quick else (1, 128)):
        dense = f"gpu_{layer}/dense/b{N}"
        assert dense in names
        factored = [r for r in rows if r.meta["batch"] == N and r.meta["kind"] != "dense"]
        assert {r.meta["kind"] for r in factored} == {"cp", "svd", "shared"}
        assert all(r.baseline == dense and r.macs > 0 for r in factored)


def test_zf_conv2_gains_are_those_of_the_docs():
    """Paper-form gains for ZF conv2 given in docs/approximations_bicluster.md: CP G=48 H=2 K=6/8/12 and SVD."""
    rows = {r.meta["config"]: r.meta for r in bench_module().rows(False) if r.meta["batch"] == 1}
    want = {"cp_G48_H2_K6": 6.63, "cp_G48_H2_K8": 4.97, "cp_G48_H2_K12": 3.31, "svd_G2_H2_K19_51": 4.46}
    for name, gain in want.items():
        assert abs(rows[name]["theoretical_gain_paper"] - gain) < 0.01, (name, rows[name])
    assert rows["shared_G48_H2_K6_S4"]["theoretical_gain"] > 1
