"""A CuPy stand-in over NumPy and the CPU emulator, for running ``npconv.kernels.cuda.ops`` without a GPU.

Only what ops.py uses: ``ndarray`` (a NumPy subclass marking "device" arrays), ``asarray``, ``ascontiguousarray``,
``empty`` (filled with NaN, so an output element no kernel wrote shows up), ``zeros``, ``matmul`` (``out=`` too),
``asnumpy`` and ``RawModule`` (:class:`CpuRawModule`). Install it with
``monkeypatch.setattr(npconv._backend, "require_cupy", lambda: fake_cupy)`` and clear ``npconv.kernels.cuda.loader``'s
cache.
"""
from __future__ import annotations

import types

import numpy as np

from .emulator import CpuRawModule

float32, float64, int32 = np.float32, np.float64, np.int32


class _MemoryPointer(types.SimpleNamespace):
    """What ``cupy.ndarray.data`` is: where the array starts (``ptr``) and on which device."""


class ndarray(np.ndarray):
    """Host memory standing in for a device array."""

    @property
    def data(self):
        """The array's start as ``cupy.ndarray.data`` gives it (a MemoryPointer: ``ptr``, ``device_id``)."""
        return _MemoryPointer(ptr=self.__array_interface__["data"][0], device_id=0)

    def get(self):
        """A host copy, as ``cupy.ndarray.get`` returns."""
        return np.array(self).view(np.ndarray)


def _dev(a):
    return np.asarray(a).view(ndarray)


def asarray(a, dtype=None):
    return _dev(np.asarray(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    return _dev(np.ascontiguousarray(a, dtype=dtype))


def empty(shape, dtype=np.float64):
    dt = np.dtype(dtype)
    return _dev(np.full(shape, np.nan, dtype=dt) if dt.kind == "f" else np.empty(shape, dtype=dt))


def zeros(shape, dtype=np.float64):
    return _dev(np.zeros(shape, dtype=dtype))


def matmul(a, b, out=None):
    if out is None:
        return _dev(np.matmul(np.asarray(a), np.asarray(b)))
    if not isinstance(out, ndarray):
        raise TypeError(f"out must be a device array, got {type(out).__name__}")
    np.matmul(np.asarray(a), np.asarray(b), out=out.view(np.ndarray))
    return out


def asnumpy(a):
    return np.array(a).view(np.ndarray)


class _Stream:
    """The current stream: never recording a CUDA graph here (the emulator has no stream capture)."""
    ptr = 0

    def is_capturing(self):
        return False

    def synchronize(self):
        """Nothing to wait for: every emulated launch has finished when it returns."""


class _Device:
    id = 0

    def __init__(self, device=0):
        pass


cuda = types.SimpleNamespace(get_current_stream=_Stream, Device=_Device)


def RawModule(code, options=(), name_expressions=None):  # noqa: N802 (mirrors cupy.RawModule)
    return CpuRawModule(code, options, name_expressions)
