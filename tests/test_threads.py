"""``npconv._threads``: the OpenBLAS overrides dropped by re-executing a process, seen from that process."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a child that calls drop_blas_overrides on itself, then reports its environment and blas_env_note() as JSON
CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from npconv import _threads
if len(sys.argv) < 3:
    _threads.drop_blas_overrides([sys.executable, __file__, sys.argv[1], "again"])
print(json.dumps({"env": {k: os.environ.get(k) for k in
                          ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPCONV_DROPPED_BLAS_ENV", "KEEP_ME")},
                  "note": _threads.blas_env_note(), "argv": sys.argv[2:]}))
"""


def _child(tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    e = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                           "NPCONV_DROPPED_BLAS_ENV")}
    e.update(env)
    r = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_overrides_are_dropped_by_a_restart_and_reported(tmp_path):
    out = _child(tmp_path, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="512", KEEP_ME="1")
    assert out["argv"] == ["again"]                                   # it ran again, as the command said
    assert out["env"]["OPENBLAS_CORETYPE"] is None and out["env"]["OPENBLAS_L2_SIZE"] is None
    assert out["env"]["KEEP_ME"] == "1"                               # the rest of the environment is kept
    assert out["env"]["NPCONV_DROPPED_BLAS_ENV"] == "OPENBLAS_CORETYPE=Haswell,OPENBLAS_L2_SIZE=512"
    assert out["note"].startswith("dropped OPENBLAS_CORETYPE=Haswell,OPENBLAS_L2_SIZE=512")


def test_nothing_to_drop_returns_without_a_restart(tmp_path):
    out = _child(tmp_path)
    assert out["argv"] == [] and out["env"]["NPCONV_DROPPED_BLAS_ENV"] is None
    assert out["note"] == "no OpenBLAS overrides set"


def test_note_reports_kept_overrides(monkeypatch):
    from npconv import _threads
    monkeypatch.delenv(_threads.DROPPED_BLAS_ENV, raising=False)
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert _threads.blas_env_note() == "kept OPENBLAS_CORETYPE=Haswell"
