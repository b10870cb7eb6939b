"""The CPU factored-layer benchmarks' ``--quick`` mode (tiny shapes): they run, print one row per case and write
JSON that parses, with the speed-up equal to the two medians' ratio. Their numbers are not asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench import bench_bicluster, bench_lowrank  # noqa: E402


def test_bench_lowrank_quick(tmp_path, capsys):
    out = tmp_path / "lowrank.json"
    bench_lowrank.main(["--quick", "--repeat", "2", "--min-time", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {r["batch"] for r in rows} == {1, 4}
    assert len(rows) == 2 * 3                       # 3 methods at each quick batch
    for r in rows:
        assert r["case"] in printed
        assert r["dense"]["n"] >= 2 and r["approx"]["n"] >= 2
        assert abs(r["speedup"] - r["dense"]["median"] / r["approx"]["median"]) < 1e-12
        assert abs(r["ratio"] - r["speedup"] / r["gain_exact"]) < 1e-12
        assert r["gain_exact"] > 1


def test_bench_bicluster_quick(tmp_path, capsys):
    out = tmp_path / "bicluster.json"
    bench_bicluster.main(["--quick", "--repeat", "2", "--min-time", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 * 3
    for r in rows:
        assert r["config"] in printed
        assert abs(r["speedup"] - r["dense"]["median"] / r["approx"]["median"]) < 1e-12


def test_bench_bicluster_cifar_layer(tmp_path, capsys):
    """``--layer cifar_conv2``: the CIFAR network's conv2 shape and the main job's settings (one batch-1 row)."""
    out = tmp_path / "bicluster.json"
    bench_bicluster.main(["--layer", "cifar_conv2", "--batches", "1", "--only", "cp_G8_H2_K8", "--repeat", "2",
                          "--min-time", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "C=64 H=W=16 F=128 k=5 stride=1 pad=2" in printed
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["cp_G8_H2_K8"] and rows[0]["speedup"] > 0


def test_cpu_plan_quick(tmp_path, capsys):
    """``bench/cpu_plan.py --quick``: one row per layer, the factored layers planned (where this CPU runs their
    planned paths), the speed-up the ratio of the two medians, the plan switch restored."""
    from bench import cpu_plan
    from npconv.functional import bicluster as FB
    from npconv.kernels.cpu import plan
    out = tmp_path / "plan.json"
    cpu_plan.main(["--quick", "--repeat", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    names = [r["layer"] for r in rows]
    assert names[:4] == ["dense_conv1", "dense_conv2", "dense_conv3", "mono_conv1_C6"] and len(rows) == 8
    assert names[-1] == "separable_conv1_r4"
    for r in rows:
        assert r["layer"] in printed and r["batch"] == 1
        assert abs(r["speedup"] - r["path_ms"] / r["plan_ms"]) < 1e-9
    assert rows[3]["planned"], "the monochromatic layer runs on the direct kernel: planned on every CPU"
    assert all(r["planned"] == FB._taps_ok(np.dtype(np.float32)) for r in rows[4:7])
    assert not rows[-1]["planned"], "the separable layer (two convs) is not planned"
    assert plan.USE_PLANS is True
    with pytest.raises(SystemExit, match="--batch and --repeat must be >= 1, got 0"):
        cpu_plan.main(["--batch", "0"])
