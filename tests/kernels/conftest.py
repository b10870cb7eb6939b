"""Fixtures for the kernel checks: emulated modules of the package sources, the CuPy stand-in, thread orders."""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest

DTYPES = (np.float32, np.float64)
ORDERS = ("forward", "reverse")


class EmulatedSources:
    """``module(source, dtype)``: the CPU-emulated module of a package source, built once per session (and
    cached on disk by the emulator across sessions)."""

    def __init__(self):
        self._mods = {}

    def prebuild(self):
        from npconv.kernels.cuda import loader
        jobs = [(s, np.dtype(d)) for s in loader.source_names() for d in DTYPES]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for key, mod in zip(jobs, pool.map(lambda j: self._build(*j), jobs)):
                self._mods[key] = mod

    @staticmethod
    def _build(source, dtype):
        from cuda_emulator import CpuRawModule
        from npconv.kernels.cuda import loader
        return CpuRawModule(loader.source_text(source, dtype), name=f"{source}.cu")

    def module(self, source, dtype):
        key = (source, np.dtype(dtype))
        if key not in self._mods:
            self._mods[key] = self._build(*key)
        return self._mods[key]

    def kernel(self, source, name, dtype):
        from npconv.kernels.cuda import loader
        return self.module(source, dtype).get_function(loader.kernel_name(name, dtype))


@pytest.fixture(scope="session")
def emulated():
    srcs = EmulatedSources()
    srcs.prebuild()   # g++ runs in parallel; later sessions find the builds in the emulator's cache
    return srcs


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=ORDERS)
def order(request):
    """The thread order within a block; kernels launched through the CuPy stand-in use it too."""
    from cuda_emulator import thread_order
    with thread_order(request.param):
        yield request.param


@pytest.fixture
def fake_cupy(monkeypatch, emulated):
    """Make npconv's GPU path (ops.py + loader.py) run on the CPU emulator; yields the CuPy stand-in."""
    import npconv._backend
    from cuda_emulator import fake_cupy as fc
    from npconv.kernels.cuda import loader
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: fc)
    monkeypatch.setattr(npconv._backend, "_cupy", fc)      # also where require_cupy was imported by name
    monkeypatch.setattr(npconv._backend, "_cupy_tried", True)
    loader.clear_cache()
    yield fc
    loader.clear_cache()
