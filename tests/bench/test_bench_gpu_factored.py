"""What bench/bench_gpu_lowrank.py and bench/bench_gpu_bicluster.py share: each skips cleanly without a GPU, and on
the CPU-emulated ``cupy`` of tests/cuda_emulator/as_cupy (so the bench code itself runs here) its quick run times
every case and writes its JSON. No timing figure is asserted: the emulator says nothing about GPU speed. Their rows
are checked in test_bench_gpu_lowrank.py and test_bench_gpu_bicluster.py."""
from __future__ import annotations

import importlib
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
from tests.cuda_emulator import install_as_cupy  # noqa: E402

#: bench module -> the output shape (without the batch) of its quick cases
BENCHES = {"bench_gpu_lowrank": (16, 15, 15), "bench_gpu_bicluster": (32, 8, 8)}


def bench_module(name):
    return importlib.import_module(f"bench.{name}")


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_skips_without_a_gpu(name, capsys):
    from bench._harness import SkipRow
    mod = bench_module(name)
    with pytest.raises(SkipRow):
        mod.rows(True)[0].setup()
    assert mod.main(["--quick"]) == 0
    assert "skipped, no GPU" in capsys.readouterr().out


@pytest.fixture
def emulated_cupy(monkeypatch):
    from npconv.kernels.cuda import loader
    mod = install_as_cupy(monkeypatch)
    yield mod
    loader.clear_cache()


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_quick_run_on_the_emulated_cupy(name, emulated_cupy, tmp_path, capsys):
    mod = bench_module(name)
    for c in mod.cases(quick=True):
        y = c["setup"]()()
        assert isinstance(y, emulated_cupy.ndarray) and y.shape == (c["batch"],) + BENCHES[name], c["name"]
    out = tmp_path / f"{name}.json"
    assert mod.main(["--quick", "--repeat", "1", "--warmup", "0", "--out", os.fspath(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == [c["name"] for c in mod.cases(quick=True)]
    assert all(np.isfinite(r["time"]["median_ms"]) for r in report["results"])
    assert "speedup" in capsys.readouterr().out
