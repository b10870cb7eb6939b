"""bench/bench_gpu_bicluster.py: its rows are well formed (with the theoretical gains of docs/approximations_bicluster.md
for ZF conv2), it skips cleanly without a GPU, and (on the CPU-emulated ``cupy`` of tests/cuda_emulator/as_cupy, so the
bench code itself runs here) its quick run times every case and writes its JSON. No timing figure is asserted: the
emulator says nothing about GPU speed.
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
    from npconv.kernels.cuda import loader, ops_bicluster
    spec = importlib.util.spec_from_file_location("cupy", AS_CUPY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: mod)
    # CuPy's device-to-host copy, which the stand-in's ndarray lacks (the layers read their offsets back with it)
    monkeypatch.setattr(mod.ndarray, "get", lambda self: np.array(self).view(np.ndarray), raising=False)
    loader.clear_cache()
    ops_bicluster.clear_cache()
    yield mod
    loader.clear_cache()
    ops_bicluster.clear_cache()


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_quick_run_on_the_emulated_cupy(emulated_cupy, tmp_path, capsys):
    mod = bench_module()
    for c in mod.cases(quick=True):
        y = c["setup"]()()
        assert isinstance(y, emulated_cupy.ndarray) and y.shape == (c["batch"], 32, 8, 8), c["name"]
    out = tmp_path / "gpu_bicluster.json"
    assert mod.main(["--quick", "--repeat", "1", "--warmup", "0", "--out", os.fspath(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == [c["name"] for c in mod.cases(quick=True)]
    assert all(np.isfinite(r["time"]["median_ms"]) for r in report["results"])
    assert "speedup" in capsys.readouterr().out
