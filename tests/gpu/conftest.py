"""Fixtures shared by the real-GPU tests (marker ``gpu``: skipped without a CUDA device, failures under
``NPCONV_REQUIRE_GPU=1``; see tests/conftest.py). ``to_gpu`` (a non-contiguous device copy on request) is in
``gpu_helpers.py``, next to this file.

``NPCONV_TEST_EAGER_CUBLAS=1`` runs every GPU test with ``npconv.kernels.cuda._gemm.EAGER_CUBLAS`` on (eager
products through CuPy's Cython binding of cuBLAS, off by default until timed on a GPU).
"""
from __future__ import annotations

import os

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _eager_cublas(monkeypatch):
    """``_gemm.EAGER_CUBLAS`` on for the test when ``NPCONV_TEST_EAGER_CUBLAS=1``."""
    if os.environ.get("NPCONV_TEST_EAGER_CUBLAS") == "1":
        from npconv.kernels.cuda import _gemm
        monkeypatch.setattr(_gemm, "EAGER_CUBLAS", True)


@pytest.fixture(scope="session")
def cp():
    """The ``cupy`` module (the real one on a GPU machine; the CPU-emulator stand-in when
    ``PYTHONPATH=tests/cuda_emulator/as_cupy``)."""
    import cupy
    return cupy


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=[True, False], ids=["contiguous", "strided"])
def contiguous(request):
    return request.param
