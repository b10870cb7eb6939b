"""bench/accuracy_fits.py: its quick run prints both tables with one plan each (the CIFAR-10 data of
../shared/data, as in CI), or says why it skipped. The accuracies themselves are not asserted."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_quick_run_prints_both_tables(capsys):
    from bench import accuracy_fits
    assert accuracy_fits.main(["--quick"]) == 0
    out = capsys.readouterr().out
    if "skipped, no CIFAR-10 data" in out:
        return
    assert "on 500 validation images" in out
    rows = [line for line in out.splitlines() if line.startswith("| conv")]
    assert len(rows) == 2
    cells = [re.findall(r"[+-]\d+\.\d\d \(\d+ s\)", r) for r in rows]
    assert [len(c) for c in cells] == [2, 3]


def test_no_data_is_a_clean_skip(tmp_path, capsys, monkeypatch):
    from bench import accuracy_fits
    monkeypatch.setenv("NPCONV_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("npconv.datasets._project_shared_data", lambda: tmp_path / "none")
    monkeypatch.setattr("npconv.datasets.default_cache_dir", lambda: tmp_path / "cache")
    assert accuracy_fits.main(["--quick", "--data", str(tmp_path)]) == 0
    assert "accuracy_fits: skipped, no CIFAR-10 data" in capsys.readouterr().out
