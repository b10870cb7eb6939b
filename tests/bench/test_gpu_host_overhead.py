"""bench/gpu_host_overhead.py: its quick run on the CuPy stand-in times every workload, and everything it patched
(npconv's CuPy, the kernel getter, the GEMM entry points, ``sys.modules["cupy"]``) is restored afterwards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import HAS_CXX  # noqa: E402


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="the CuPy stand-in imports the CUDA C emulator")
def test_quick_run_times_every_workload_and_restores_everything(tmp_path):
    import npconv._backend as backend
    from bench import gpu_host_overhead
    from npconv.kernels.cuda import _gemm, loader, ops, ops_bicluster, ops_lowrank
    before = (sys.modules.get("cupy"), backend.require_cupy, loader.get_kernel, _gemm.matmul, ops._matmul,
              ops_bicluster._matmul, ops_lowrank._matmul, backend._cupy, ops_bicluster.REDUCE_TILED_MAX_COLUMNS)
    out = tmp_path / "host.json"
    assert gpu_host_overhead.main(["--quick", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["us_per_call"]) == {"conv2", "conv2_layer", "cp8_layer", "svd_layer", "svd_layer_gather_gemms",
                                       "shared_layer", "conv1", "conv1_layer", "monochromatic6_layer",
                                       "conv_svd8_layer", "separable4_layer", "zf_dense_net", "conv2_layer_b8",
                                       "conv3_layer_b8", "conv3_layer_b32"}
    assert all(v > 0 for v in rep["us_per_call"].values())
    after = (sys.modules.get("cupy"), backend.require_cupy, loader.get_kernel, _gemm.matmul, ops._matmul,
             ops_bicluster._matmul, ops_lowrank._matmul, backend._cupy, ops_bicluster.REDUCE_TILED_MAX_COLUMNS)
    assert all(a is b for a, b in zip(before, after))


def test_bad_calls_are_refused(capsys):
    from bench import gpu_host_overhead
    with pytest.raises(SystemExit) as exc:
        gpu_host_overhead.main(["--calls", "0"])
    assert exc.value.code == 2 and "--calls must be >= 1" in capsys.readouterr().err
