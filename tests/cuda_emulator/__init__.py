"""CPU emulation of CUDA C kernels for the tests (g++ + ucontext fibers), and a small CuPy stand-in.

``CpuRawModule`` mirrors ``cupy.RawModule`` (see ``emulator.py`` for what a launch checks); ``fake_cupy`` is a
module-like object with the few CuPy functions ``npconv.kernels.cuda.ops`` uses, so ops.py itself can run here.
"""
from .emulator import CpuRawKernel, CpuRawModule, EmulatorError, cache_dir, compiler, thread_order

__all__ = ["CpuRawModule", "CpuRawKernel", "EmulatorError", "thread_order", "cache_dir", "compiler"]
