"""Atomic file writing shared by the weight format, the dataset cache and the main job's outputs."""
from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]

#: bytes of the target's name kept in the temporary file's name: with the dots, mkstemp's 8 random characters and
#: ".tmp", at most ``_TMP_STEM_BYTES + 14`` bytes
_TMP_STEM_BYTES = 64
_TMP_NAME_BYTES = _TMP_STEM_BYTES + 14


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, give it the mode a plain
    ``open()`` would (0666 less the umask), then rename it into place: readers see the old file or the new one.

    The temporary file is ``.<start of the name>.<random>.tmp`` in the same folder, at most ``_TMP_NAME_BYTES``
    bytes long whatever the length of the target's name (a file system's limit on a name, often 255 bytes, holds
    for the target and so never fails for the temporary file first)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    # the start of the name, for a reader of the folder; cut in bytes (surrogateescape keeps a cut UTF-8 sequence)
    stem = os.fsdecode(os.fsencode(os.path.basename(path))[:_TMP_STEM_BYTES])
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + stem + ".", suffix=".tmp")
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
