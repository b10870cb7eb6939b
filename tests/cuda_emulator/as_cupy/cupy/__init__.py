"""An importable ``cupy`` that runs on the CPU emulator, to execute GPU-only code paths where there is no GPU.

    PYTHONPATH=tests/cuda_emulator/as_cupy python -m pytest tests/gpu -q      # the GPU tests, emulated (minutes)

It is a check of the test and benchmark code itself (do they run, do they compare the right things), not of
the GPU: arrays are NumPy arrays (``ndarray`` is the stand-in's subclass), ``RawModule`` is the CPU emulator,
``matmul`` is NumPy's, and every other attribute falls back to the NumPy function of that name (results are
turned into "device" arrays). ``cuda.Event`` measures host time. Never put this directory on the path of a
machine that has a GPU.
"""
from __future__ import annotations

import os
import sys
import time
import types

import numpy as np

_TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from cuda_emulator import fake_cupy as _stand_in  # noqa: E402

__version__ = "0+cpu-emulator"
ndarray = _stand_in.ndarray
RawModule = _stand_in.RawModule
empty = _stand_in.empty
asnumpy = _stand_in.asnumpy


def is_available():
    return True


def asarray(a, dtype=None):
    return np.array(a, dtype=dtype, copy=True).view(ndarray)     # a device copy, as cupy.asarray of host data


def _device_result(fn):
    def wrapped(*args, **kwargs):
        r = fn(*args, **kwargs)
        return r.view(ndarray) if isinstance(r, np.ndarray) and not isinstance(r, ndarray) else r
    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    return wrapped


def __getattr__(name):
    v = getattr(np, name)
    return _device_result(v) if callable(v) and not isinstance(v, type) else v


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Device:
    id = 0
    compute_capability = "0"

    def __init__(self, device=0):
        pass

    def synchronize(self):
        pass


class _MemoryPool:
    def free_all_blocks(self):
        pass


def get_default_memory_pool():
    return _MemoryPool()


cuda = types.SimpleNamespace(
    Event=_Event, Device=_Device, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
    get_current_stream=_stand_in.cuda.get_current_stream,
    runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"CPU emulator (not a GPU)"},
                                  runtimeGetVersion=lambda: 0))
