"""CPU emulation of CUDA C kernels for the tests (g++ + ucontext fibers), and a small CuPy stand-in.

``CpuRawModule`` mirrors ``cupy.RawModule`` (see ``emulator.py`` for what a launch checks); ``fake_cupy`` is a
module-like object with the few CuPy functions ``npconv.kernels.cuda.ops`` uses, so ops.py itself can run here.
"""
import os

from .emulator import CpuRawKernel, CpuRawModule, EmulatorError, cache_dir, compiler, thread_order

__all__ = ["CpuRawModule", "CpuRawKernel", "EmulatorError", "thread_order", "cache_dir", "compiler",
           "install_as_cupy"]

AS_CUPY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "as_cupy", "cupy", "__init__.py")


def install_as_cupy(monkeypatch):
    """Make the emulated ``cupy`` of ``as_cupy/`` the CuPy of the calling test; returns the module.

    It goes into ``sys.modules["cupy"]`` and npconv's ``require_cupy``; its ndarray gets CuPy's device-to-host copy
    ``get`` (npconv reads offsets back, ``to_numpy`` and ``Layer.to_cpu`` call it); the kernel caches start empty.
    ``monkeypatch`` undoes all of it after the test (the caller clears the kernel caches again).
    """
    import importlib.util
    import sys

    import numpy as np

    import npconv._backend
    from npconv.kernels.cuda import loader

    spec = importlib.util.spec_from_file_location("cupy", AS_CUPY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: mod)
    # modules that imported require_cupy by name reach the cached module: on a machine with a GPU the real CuPy
    # may be cached there already, and it must not serve this test
    monkeypatch.setattr(npconv._backend, "_cupy", mod)
    monkeypatch.setattr(npconv._backend, "_cupy_tried", True)
    monkeypatch.setattr(npconv._backend, "_cupy_error", None)
    monkeypatch.setattr(mod.ndarray, "get", lambda self: np.array(self).view(np.ndarray), raising=False)
    loader.clear_cache()     # the private sources' modules are memoized there too (ops_lowrank, ops_bicluster)
    return mod
