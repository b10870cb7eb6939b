"""bench/bench_tune.py: its quick run tunes the bundled network's approximation on the CPU and prints tune's table
and an output difference at rounding level; ``--gpu`` says why and exits 0 without a device. No timing is
asserted."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import HAS_GPU  # noqa: E402


def test_quick_run(capsys):
    from bench import bench_tune
    assert bench_tune.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in bench_tune.plan():
        assert re.search(rf"^{name}\s+\w+\s+[\d.e-]+\s+[\d.e-]+\s+(factored|dense)\s*$", out, re.M), name
    diff = float(re.search(r"max \|output\| = ([\d.e+-]+)", out)[1])
    assert diff < 1e-5                                  # float32, the dense kernels rebuilt in float64


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")
def test_gpu_skips_without_a_device(capsys):
    from bench import bench_tune
    assert bench_tune.main(["--gpu"]) == 0
    assert "skipped, no GPU" in capsys.readouterr().out
