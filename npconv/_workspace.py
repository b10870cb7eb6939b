"""Per-thread scratch buffers reused across calls of the CPU kernels.

A fresh multi-megabyte ``np.empty`` is a fresh ``mmap``: every call then pays a page fault per 4 KiB page it
touches (measured 0.17 ms of a 1.2 ms AlexNet conv5 at batch 1). The CPU paths of the convolutions take their
packing and staging buffers from :data:`WS` instead. ``get(slot, n, dtype)`` returns a 1-D array of at least ``n``
items; each (slot, dtype) keeps its largest buffer, so the memory held is the largest workspace any call of that
slot asked for (each caller bounds its own: see ``_WORKSPACE_BYTES`` in ``functional/conv.py`` and
``functional/bicluster.py``). Buffers are per thread, so concurrent calls from several Python threads never share
one. ``clear()`` releases the calling thread's buffers.
"""
from __future__ import annotations

import threading

import numpy as np

__all__ = ["Workspace", "WS"]


class Workspace(threading.local):
    """Thread-local scratch buffers by slot name (see the module docstring)."""

    def __init__(self):
        self.bufs = {}

    def get(self, slot, n, dtype):
        key = (slot, np.dtype(dtype))
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < n:
            buf = None  # drop the old buffer before allocating its successor
            self.bufs.pop(key, None)
            buf = np.empty(max(n, 1), dtype)
            self.bufs[key] = buf
        return buf[:n]

    def get_aligned(self, slot, n, dtype, align=64):
        """As :meth:`get`, the view starting on an ``align``-byte boundary (for kernels whose rows must be
        aligned: unaligned 512-bit loads and stores cross a cache line)."""
        item = np.dtype(dtype).itemsize
        extra = -(-align // item)
        buf = self.get(slot, n + extra, dtype)
        off = (-buf.ctypes.data % align) // item
        return buf[off:off + n]

    def clear(self):
        self.bufs.clear()
        from .kernels.cuda import replay       # the layers' CPU plans keep workspace views: make them stale
        replay.advance()

    def nbytes(self):
        return sum(b.nbytes for b in self.bufs.values())


WS = Workspace()
