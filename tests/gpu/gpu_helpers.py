"""Helpers shared by the real-GPU tests (fixtures are in conftest.py)."""
from __future__ import annotations


def need_stream_capture(cp):
    """Skip on the CPU-emulator stand-in for cupy, which has no stream capture (CUDA graphs need a real device)."""
    import pytest
    if not hasattr(cp.cuda, "MemoryPool"):
        pytest.skip("the CPU-emulator stand-in for cupy has no stream capture (CUDA graphs need a real device)")


def to_gpu(cp, a, contiguous=True):
    """A CuPy copy of ``a``; with ``contiguous=False`` the same values as every other element of a larger array."""
    if contiguous or a.size < 2:
        return cp.asarray(a)
    big = cp.zeros(tuple(2 * n for n in a.shape), dtype=a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = cp.asarray(a)
    if view.flags.c_contiguous:
        raise AssertionError("to_gpu(contiguous=False) made a C-contiguous view")
    return view
