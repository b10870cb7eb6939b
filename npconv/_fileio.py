"""Atomic file writing shared by the weight format, the dataset cache and the main job's outputs."""
from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, give it the mode a plain
    ``open()`` would (0666 less the umask), then rename it into place: readers see the old file or the new one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        um = os.umask(0)
        os.umask(um)
        os.chmod(tmp, 0o666 & ~um)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
