"""bench/bench_gpu_lowrank.py: its rows are well formed, it skips cleanly without a GPU, and (on the CPU-emulated
``cupy`` of tests/cuda_emulator/as_cupy, so the bench code itself runs here) its quick run times every case and
writes its JSON. No timing figure is asserted: the emulator says nothing about GPU speed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import HAS_CXX, HAS_GPU  # noqa: E402

AS_CUPY = ROOT / "tests" / "cuda_emulator" / "as_cupy" / "cupy" / "__init__.py"


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


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")
def test_skips_without_a_gpu(capsys):
    from bench._harness import SkipRow
    mod = bench_module()
    with pytest.raises(SkipRow):
        mod.rows(True)[0].setup()
    assert mod.main(["--quick"]) == 0
    assert "skipped, no GPU" in capsys.readouterr().out


@pytest.fixture
def emulated_cupy(monkeypatch):
    import npconv._backend
    from npconv.kernels.cuda import loader, ops_lowrank
    spec = importlib.util.spec_from_file_location("cupy", AS_CUPY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: mod)
    loader.clear_cache()
    ops_lowrank.clear_cache()
    yield mod
    loader.clear_cache()
    ops_lowrank.clear_cache()


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_quick_run_on_the_emulated_cupy(emulated_cupy, tmp_path, capsys):
    mod = bench_module()
    for c in mod.cases(quick=True):
        y = c["setup"]()()
        assert isinstance(y, emulated_cupy.ndarray) and y.shape == (c["batch"], 16, 15, 15), c["name"]
    out = tmp_path / "gpu_lowrank.json"
    assert mod.main(["--quick", "--repeat", "1", "--warmup", "0", "--out", os.fspath(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == [c["name"] for c in mod.cases(quick=True)]
    assert all(np.isfinite(r["time"]["median_ms"]) for r in report["results"])
    assert "speedup" in capsys.readouterr().out
