"""bench/bench_gpu_network.py: skips cleanly without a GPU, and its quick run executes on the CPU-emulated ``cupy``
of tests/cuda_emulator/as_cupy (so the bench code itself runs here) and writes a JSON report that parses. No timing
is asserted: the emulator says nothing about GPU speed."""
from __future__ import annotations

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


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")
def test_skips_without_a_gpu(capsys):
    from bench import bench_gpu_network
    assert bench_gpu_network.main(["--quick"]) == 0
    assert "skipped, no GPU" in capsys.readouterr().out


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path, capsys):
    from bench import bench_gpu_network
    from npconv.kernels.cuda import loader
    install_as_cupy(monkeypatch)
    monkeypatch.setattr(bench_gpu_network, "torch_cuda", lambda: None)   # emulated arrays live on the host
    try:
        out = tmp_path / "gpu_network.json"
        assert bench_gpu_network.main(["--quick", "--nets", "zf", "--repeat", "1", "--warmup", "0",
                                       "--out", os.fspath(out)]) == 0
    finally:
        loader.clear_cache()
    report = json.loads(out.read_text())
    rows = report["batch"]
    assert {(r["variant"], r["batch"]) for r in rows} == {(v, n) for v in ("dense", "paper", "all") for n in (1, 4)}
    assert all(np.isfinite(r["npconv"]["median_ms"]) for r in rows)
    # the graph rows either hold a time or say why the recording failed (the emulator has no stream capture)
    assert all("median_ms" in r["npconv_graph"] or "error" in r["npconv_graph"] for r in rows)
    layers = {(r["variant"], r["layer"]) for r in report["layers"]}
    assert ("dense", "conv2") in layers and ("paper", "conv2") in layers and ("all", "conv5") in layers
    assert "Per layer" in capsys.readouterr().out
