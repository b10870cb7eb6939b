"""Shared test configuration: markers that skip with a stated reason when their need is missing.

Markers: ``gpu`` (a CUDA device and CuPy), ``nvrtc`` (libnvrtc, no device), ``cpuemu`` (a C++ compiler for the
CPU emulation of CUDA C), ``torch`` (PyTorch as an oracle), ``data`` (the CIFAR-10 development copy).
``NPCONV_REQUIRE_GPU=1`` turns the ``gpu`` skips into failures, for a machine that has a GPU.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest


def _has_gpu():
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:
        return False


def _nvrtc_status():
    """(usable, why not): libnvrtc loads and accepts the checks' ``-Werror=all-warnings`` (older NVRTC releases,
    such as the one on a GPU machine's CUDA 13.0 image, reject it as an unrecognized option)."""
    try:
        from cupy.cuda import nvrtc
        version = nvrtc.getVersion()
    except Exception:
        return False, "libnvrtc not loadable: pip install 'npconv[check]'"
    try:
        import io

        from cupy.cuda import compiler
        prog = compiler._NVRTCProgram('extern "C" __global__ void probe() {}', "probe.cu", method="ptx")
        prog.compile(("-Werror=all-warnings", "-arch=compute_75"), io.StringIO())
    except Exception as exc:
        return False, (f"libnvrtc {version[0]}.{version[1]} cannot run the compile checks ({exc!r:.120}): "
                       "pip install 'npconv[check]' for the pinned NVRTC")
    return True, ""


def _has_torch():
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


HAS_GPU = _has_gpu()
HAS_NVRTC, NVRTC_WHY = _nvrtc_status()
HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
HAS_TORCH = _has_torch()
REQUIRE_GPU = os.environ.get("NPCONV_REQUIRE_GPU") == "1"


def _has_data():
    try:
        from npconv.datasets import find_data_dir
        find_data_dir()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    need = {
        "gpu": (HAS_GPU, "no CUDA device (cupy missing or cupy.is_available() is False)"),
        "nvrtc": (HAS_NVRTC, NVRTC_WHY),
        "cpuemu": (HAS_CXX, "no C++ compiler for the CUDA C emulator"),
        "torch": (HAS_TORCH, "PyTorch not installed: pip install 'npconv[torch]'"),
    }
    data_ok = None
    for item in items:
        for mark, (ok, why) in need.items():
            if mark in item.keywords and not ok:
                if mark == "gpu" and REQUIRE_GPU:
                    continue  # run it and let it fail loudly
                item.add_marker(pytest.mark.skip(reason=why))
        if "data" in item.keywords:
            if data_ok is None:
                data_ok = _has_data()
            if not data_ok:
                item.add_marker(pytest.mark.skip(
                    reason="CIFAR-10 not found: set NPCONV_DATA_DIR or place ../shared/data beside the checkout"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


from tests.reference import tolerance  # noqa: E402,F401  (kept importable from here)
