"""Fixtures shared by the real-GPU tests (marker ``gpu``: skipped without a CUDA device, failures under
``NPCONV_REQUIRE_GPU=1``; see tests/conftest.py). ``to_gpu`` (a non-contiguous device copy on request) is in
``gpu_helpers.py``, next to this file.
"""
from __future__ import annotations


import numpy as np
import pytest


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
