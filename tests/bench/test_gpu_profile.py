"""bench/gpu_profile.py: without a CUDA device each of its commands says why and exit with status 0 (it runs on a
lent GPU only, through bench/run_gpu.sh); bad arguments are refused by its parser."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import HAS_CXX, HAS_GPU  # noqa: E402
from tests.cuda_emulator import install_as_cupy  # noqa: E402


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a CUDA device")
@pytest.mark.parametrize("what", ["probe", "ncu", "host", "small", "cpblock", "bicrules", "lowrank", "latency"])
def test_skips_without_a_gpu(capsys, tmp_path, what):
    from bench import gpu_profile
    out = tmp_path / "probe.json"
    assert gpu_profile.main([what, "--out", str(out)]) == 0
    assert f"gpu_profile {what}: skipped, no GPU" in capsys.readouterr().out
    assert not out.exists()


def test_unknown_command_is_refused(capsys):
    from bench import gpu_profile
    with pytest.raises(SystemExit) as exc:
        gpu_profile.main(["profile-everything"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("batches", [["0"], ["1", "-2"], ["two"]])
def test_bad_batches_are_refused(capsys, batches):
    from bench import gpu_profile
    with pytest.raises(SystemExit) as exc:
        gpu_profile.main(["bicrules", "--batches", *batches])
    assert exc.value.code == 2
    assert "--batches" in capsys.readouterr().err


def test_host_split_places_the_time_by_package():
    """host_split on a profile of CPU work: npconv's functions, NumPy's, and a plain Python loop."""
    import cProfile
    import pstats

    import numpy as np

    from bench import gpu_profile
    from npconv._validate import as_padding4

    def work():
        for _ in range(3000):
            as_padding4((1, 2))                    # npconv, pure Python
        np.linalg.svd(np.ones((120, 120)))         # numpy
        sum(i * i for i in range(200000))          # other

    prof = cProfile.Profile()
    prof.enable()
    work()
    prof.disable()
    st = pstats.Stats(prof)
    split = gpu_profile.host_split(st)
    assert set(split) == {"npconv", "cupy", "numpy", "other"}
    assert split["npconv"] > 0 and split["numpy"] > 0 and split["other"] > 0 and split["cupy"] == 0
    assert sum(split.values()) == pytest.approx(st.total_tt, rel=1e-9)


def quick_run_on_the_emulated_cupy(what, monkeypatch, tmp_path):
    """``gpu_profile.py <what> --quick`` on the CPU-emulated cupy; its JSON report."""
    import json

    from bench import gpu_profile
    from npconv.kernels.cuda import loader
    install_as_cupy(monkeypatch)
    monkeypatch.setattr(gpu_profile, "gpu_missing", lambda: None)
    out = tmp_path / f"{what}.json"
    try:
        assert gpu_profile.main([what, "--quick", "--out", str(out)]) == 0
    finally:
        loader.clear_cache()
    return json.loads(out.read_text())


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_host_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path, capsys):
    """The host probe's code path, on the CPU-emulated cupy with small shapes: it writes one record per workload
    with finite times and a host split (no timing is asserted: the emulator says nothing about a GPU)."""
    rep = quick_run_on_the_emulated_cupy("host", monkeypatch, tmp_path)
    launch = rep.pop("launch")
    assert set(launch) == {"noop_0_args", "noop_8_args_int32", "noop_24_args_int32", "noop_24_args_int32_made",
                           "noop_struct_of_20_int32_made", "cupy_empty_conv1_out", "ops_launch_bias_add"}
    assert all(v > 0 for v in launch.values())
    assert set(rep) == {"conv2", "conv3", "conv1", "conv1_layer", "mono4", "svd8", "sep4", "cp2", "svd", "shared",
                        "zf_dense_net"}
    for row in rep.values():
        assert row["ms_per_call_queued"] > 0 and row["ms_per_call_synced"] > 0
        assert 0 < row["host_ms_per_call_min"] <= row["host_ms_per_call"]
        assert set(row["host_ms_per_call_profiled"]) == {"npconv", "cupy", "numpy", "other"}
    assert "ms per call queued" in capsys.readouterr().out


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_small_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path):
    """The small-batch probe's code path on the CPU-emulated cupy: the conv, both variants of the CP and shared
    layers' expansion, of the SVD layer's reduction and of the monochromatic layer's blocks run, one record each, and
    the rules it patches are restored."""
    from npconv.kernels.cuda import ops_bicluster, ops_lowrank
    before = (ops_bicluster.EXPAND_TILED_MAX_COLUMNS, ops_bicluster.REDUCE_TILED_MAX_COLUMNS,
              ops_lowrank.MONO_MIN_BLOCKS)
    rep = quick_run_on_the_emulated_cupy("small", monkeypatch, tmp_path)
    assert set(rep) == {"conv2/b1/npconv", "cp4/b1/fused", "cp4/b1/gemm", "svd/b1/fused",
                        "svd/b1/gemm", "shared/b1/fused", "shared/b1/gemm", "mono4/b1/split", "mono4/b1/whole"}
    assert all(r["latency_ms"] > 0 and r["queued_ms"] > 0 for r in rep.values())
    assert (ops_bicluster.EXPAND_TILED_MAX_COLUMNS, ops_bicluster.REDUCE_TILED_MAX_COLUMNS,
            ops_lowrank.MONO_MIN_BLOCKS) == before


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_cpblock_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path):
    """The images-per-block comparison on the CPU-emulated cupy: a record per setting, the outputs compared, the
    setting restored."""
    from npconv.kernels.cuda import ops_bicluster
    before = ops_bicluster.CP_IMAGES_PER_BLOCK
    rep = quick_run_on_the_emulated_cupy("cpblock", monkeypatch, tmp_path)
    assert set(rep) == {"cp4/b5/ipb1", "cp4/b5/ipb2", "cp4/b5/ipb4"}
    assert all(r["median_ms"] > 0 and r["speedup_over_first"] > 0 for r in rep.values())
    assert rep["cp4/b5/ipb1"]["speedup_over_first"] == 1.0
    assert ops_bicluster.CP_IMAGES_PER_BLOCK == before


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_lowrank_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path):
    """The low-rank rules' comparison on the CPU-emulated cupy: a record per layer and variant (the variants'
    outputs compared inside), and every rule it patches restored."""
    from npconv.kernels.cuda import ops_lowrank
    names = ("LR_EXPAND_MAX_RANK", "LR_CONV_MAX_RANK", "LR_CONV_PX2_MIN_PIXELS",
             "SEP_CONV_MAX_PIXELS", "SEP_MIN_BLOCKS", "MONO_SHARE_FILTERS", "MONO_MIN_BLOCKS")
    before = [getattr(ops_lowrank, n) for n in names]
    rep = quick_run_on_the_emulated_cupy("lowrank", monkeypatch, tmp_path)
    shares = ("0", "256", "512", "1024")
    assert set(rep) == {"conv1/b1/npconv", "svd4/b1/lr_conv_px1", "svd4/b1/lr_conv_px2", "svd4/b1/two_stage",
                        "svd4/b1/gemm", "sep3/b1/two_pass", "mono2/b1/share8_min512", "mono2/b1/share4_min512",
                        "mono2/b1/share4_min1024", *(f"sep3/b1/sep_conv_shares{m}" for m in shares)}
    assert all(r["latency_ms"] > 0 and r["queued_ms"] > 0 for r in rep.values())
    assert [getattr(ops_lowrank, n) for n in names] == before


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_bicrules_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path):
    """The rule comparison of the biclustered SVD and shared layers on the CPU-emulated cupy: a record per case, the
    rules restored after."""
    from npconv.kernels.cuda import ops_bicluster
    names = ("SVD_SPLIT_MAX_BLOCKS", "SVD_SPLITS")
    before = [getattr(ops_bicluster, n) for n in names]
    rep = quick_run_on_the_emulated_cupy("bicrules", monkeypatch, tmp_path)
    assert set(rep) == {f"{c}/b1" for c in ("dense", "svd", "svd_s2", "svd_s4")}
    assert all(r["latency_ms"] > 0 and r["queued_ms"] > 0 and r["speedup_vs_dense"] > 0 for r in rep.values())
    assert rep["dense/b1"]["speedup_vs_dense"] == 1.0
    assert [getattr(ops_bicluster, n) for n in names] == before


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_latency_quick_run_on_the_emulated_cupy(monkeypatch, tmp_path):
    """The dense latency split on the CPU-emulated cupy: one record of the small conv at batch 1 (no cuDNN there),
    with positive host, queued and latency times, the replay seen, and a cProfile split."""
    rep = quick_run_on_the_emulated_cupy("latency", monkeypatch, tmp_path)
    assert set(rep) == {"conv2/b1/npconv"}
    r = rep["conv2/b1/npconv"]
    assert set(r) == {"host_us", "queued_ms", "latency_ms", "replayed", "host_split", "top"}
    assert all(r[k] > 0 for k in ("host_us", "queued_ms", "latency_ms"))
    assert r["replayed"] is True                                 # a small layer at a shape it has seen replays
    assert set(r["host_split"]) == {"npconv", "cupy", "numpy", "other"} and 0 < len(r["top"]) <= 8


@pytest.mark.cpuemu
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the CUDA C emulator")
def test_with_rules_gives_each_variant_its_own_recorded_calls(monkeypatch):
    """``_with_rules``: a variant runs under its rules and records once into a table of its own (one launch of
    sep_conv, or two factor_conv passes), replays after, and leaves the module's rules, the layer's own table and
    the replay generation as they were."""
    import numpy as np

    from bench import gpu_profile
    from bench.bench_gpu import LayerCall
    from npconv.kernels.cuda import loader, ops_lowrank, replay
    from npconv.layers.lowrank import SeparableConv2d
    fake = install_as_cupy(monkeypatch)
    try:
        rng = np.random.default_rng(0)
        layer = SeparableConv2d(rng.standard_normal((3, 2, 5, 1)), rng.standard_normal((6, 3, 1, 5)), None,
                                padding=2).to_gpu()
        call = LayerCall(layer, fake.asarray(rng.standard_normal((1, 2, 9, 9))))
        rule = ops_lowrank.SEP_CONV_MAX_PIXELS
        one = gpu_profile._with_rules(call, ops_lowrank, SEP_CONV_MAX_PIXELS=10**12)
        two = gpu_profile._with_rules(call, ops_lowrank, SEP_CONV_MAX_PIXELS=0)
        gen = replay.generation()
        outs = [one(), two(), one(), two()]
        assert replay.generation() == gen and ops_lowrank.SEP_CONV_MAX_PIXELS == rule
        assert not layer._replays, "the layer's own table is not used by the variants"
        tables = [cell.cell_contents for fn in (one, two) for cell in fn.__closure__
                  if type(cell.cell_contents).__name__ == "_Table"]
        assert [len(t[(1, 2, 9, 9)].ops) for t in tables] == [1, 2]
        for y in outs[1:]:
            np.testing.assert_allclose(np.asarray(y), np.asarray(outs[0]), rtol=1e-12, atol=1e-12)
    finally:
        loader.clear_cache()
