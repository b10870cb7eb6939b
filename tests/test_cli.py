"""The main job end to end, on a small subset (flags for CI)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args, env=None, timeout=900):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "npconv", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.mark.data
@pytest.mark.slow
def test_main_job_on_a_subset(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--quick", "--limit", "200", "--batch", "16", "--repeat", "1", "--out", str(out),
                env={"OPENBLAS_CORETYPE": "Haswell"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exact network top-1" in r.stdout and "chosen settings on the test split" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["blas_env"].startswith("dropped OPENBLAS_CORETYPE=Haswell")       # restarted without it
    assert res["baseline"]["n_test"] == 200 and 0.5 < res["baseline"]["test_top1"] <= 1
    assert res["val"] and res["test"]
    for d in res["val"] + res["test"]:
        assert d["theoretical_gain"] > 1 and d["layer_speedup"] > 0 and 0 <= d["agreement"] <= 1
        n = d["n_images"]
        assert n == 200 and d["delta_top1"] == pytest.approx((d["gained"] - d["lost"]) / n, abs=1e-12)
        assert d["gained"] + d["lost"] <= n * (1 - d["agreement"]) + 1e-9     # a changed answer can stay wrong
        assert 0 <= d["delta_top1_se"] <= np.sqrt((d["gained"] + d["lost"]) / (n - 1) / n) + 1e-12
    assert all(d["fit_reused"] for d in res["test"])     # the chosen plans keep their fits from the validation sweep
    assert not any(d["fit_reused"] for d in res["val"][:5])                      # one plan per method, each new
    it = res["baseline"]["interleaved_ms_per_image"]
    assert it["n"] == len(res["val"]) + len(res["test"]) and it["min"] <= it["median"] <= it["max"]
    md = (out / "results.md").read_text()
    assert md.startswith("# Results of the main job") and "| d top1 | se |" in md and "timed again beside" in md
    assert "- BLAS environment: dropped OPENBLAS_CORETYPE=Haswell" in md
    assert (out / "accuracy_vs_speedup.png").stat().st_size > 1000
    assert (out / "conv1_filters.png").stat().st_size > 1000


@pytest.mark.slow
def test_main_job_without_data_runs_speed_part(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    out = tmp_path / "run"
    r = run_cli("--quick", "--data", str(empty), "--batch", "8", "--repeat", "1", "--out", str(out), "--no-plots")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CIFAR-10 was not found" in r.stdout and "--data DIR" in r.stdout
    assert "Running the speed part only" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["speed_only"] and all(d["layer_speedup"] > 0 for d in res["speed_only"])


def test_bad_arguments_are_refused():
    r = run_cli("--limit", "-3")
    assert r.returncode == 2 and "--limit must be >= 0, got -3" in r.stderr
    r = run_cli("--margin", "-1")
    assert r.returncode == 2 and "--margin must be >= 0 (standard errors), got -1.0" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--repeat", "0"], "--repeat must be >= 1 (timing repeats), got 0"),
    (["--repeat", "-3"], "--repeat must be >= 1 (timing repeats), got -3"),
    (["--full", "--quick"], "--full and --quick exclude each other"),
    (["--budget", "nan"], "--budget must be a finite number of points >= 0, got nan"),
    (["--budget", "inf"], "--budget must be a finite number of points >= 0, got inf"),
    (["--budget", "-1"], "--budget must be a finite number of points >= 0, got -1.0"),
    (["--margin", "inf"], "--margin must be finite (standard errors), got inf"),
    (["--margin", "nan"], "--margin must be >= 0 (standard errors), got nan"),
])
def test_options_are_checked_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    # in-process: ap.error exits with status 2 before the network or the data are loaded
    from npconv import cli, models
    monkeypatch.setattr(models, "load_reference", lambda: pytest.fail("work started before the options were checked"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--out", str(out), "--no-progress"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()    # nothing created for a refused run


def test_bad_out_folder_is_refused_up_front(tmp_path, monkeypatch, capsys):
    from npconv import cli, models
    monkeypatch.setattr(models, "load_reference", lambda: pytest.fail("work started before the options were checked"))
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit) as info:
            cli.main(["--out", str(out)])
        assert info.value.code == 2
        assert f"--out: cannot create the output folder {str(out)!r}" in capsys.readouterr().err


def test_write_docs_needs_a_source_checkout(tmp_path, monkeypatch, capsys):
    from npconv import cli, models
    monkeypatch.setattr(models, "load_reference", lambda: pytest.fail("work started before the options were checked"))
    here = cli._checkout_root()
    if os.path.isfile(os.path.join(here, "setup.cfg")):   # the tests run from a checkout: it is found
        assert cli._docs_results_path() == os.path.join(here, "docs", "results.md")
    monkeypatch.setattr(cli, "_checkout_root", lambda: str(tmp_path))   # a package folder without docs/ above it
    assert cli._docs_results_path() is None
    with pytest.raises(SystemExit) as info:
        cli.main(["--write-docs", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "--write-docs writes docs/results.md of a source checkout" in capsys.readouterr().err


def test_write_docs_from_an_installed_copy_is_refused(tmp_path):
    # the package alone (as pip installs it), run as its own process: refused before any work
    import npconv
    site = tmp_path / "site"
    site.mkdir()
    (site / "npconv").symlink_to(os.path.dirname(npconv.__file__))
    r = subprocess.run([sys.executable, "-m", "npconv", "--write-docs", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(site)))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--write-docs writes docs/results.md of a source checkout" in r.stderr
    assert "Traceback" not in r.stderr and "# npconv main job" not in r.stdout
