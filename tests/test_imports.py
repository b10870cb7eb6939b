import subprocess
import sys


def test_import_is_light_and_framework_free():
    """Importing every runtime module loads neither PyTorch nor CuPy (CuPy only on the GPU path)."""
    code = ("import sys, npconv, npconv.approximate, npconv.cli, npconv.experiment, npconv.datasets, "
            "npconv.decompose, npconv.functional, npconv.layers, npconv.models, npconv.network, npconv.io\n"
            "bad = [m for m in ('torch', 'cupy', 'tensorflow', 'jax') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing npconv pulled in {out}"


def test_gpu_call_without_cupy_gives_install_hint(monkeypatch):
    import npconv._backend as B
    monkeypatch.setattr(B, "_cupy", None)
    monkeypatch.setattr(B, "_cupy_tried", True)
    monkeypatch.setattr(B, "_cupy_error", ImportError("No module named 'cupy'"))
    import pytest
    with pytest.raises(ImportError, match=r"pip install 'npconv\[gpu\]'.*No module named 'cupy'"):
        B.require_cupy()


def test_thread_env_defaults_and_opt_out():
    import os
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OPENBLAS_THREAD_TIMEOUT")
    code = f"import os, npconv; print(*[os.environ.get(v) for v in {names!r}])"
    drop = names + ("NPCONV_KEEP_OMP_POLICY",)
    base = {k: v for k, v in os.environ.items() if k not in drop}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(base, **extra)).stdout.strip()
    assert run() == "None 1000 0 4"
    assert run(OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="20") == "PASSIVE None None 20"
    assert run(GOMP_SPINCOUNT="5") == "None 5 None 4"
    assert run(KMP_BLOCKTIME="7") == "None 1000 7 4"
    assert run(NPCONV_KEEP_OMP_POLICY="1") == "None None None None"
