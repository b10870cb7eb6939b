"""The official CIFAR-10 python batches (``cifar-10-batches-py``), read without running code from the files.

The batches are Python pickles (written by Python 2). ``pickle.load`` would call any global a file names, so a
file from an untrusted source could run arbitrary code. Here a restricted unpickler resolves only the few NumPy
globals that rebuild an ``ndarray`` (``numpy.core.multiarray._reconstruct`` (or its NumPy 2 name
``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``) and refuses every other
global with :class:`UnsafePickleError` before anything is called.

Every file is then checked: a dict holding ``data`` (uint8, shape (N, 3072): 1024 red, 1024 green, 1024 blue
values, each plane row-major) and ``labels`` (N integers in 0..9). A corrupt, truncated or foreign file is a
ValueError that names it. Decoded arrays are cached like the other loaders (``datasets._cached``).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ._validate import check_option

__all__ = ["load_cifar10_batches", "read_batch", "UnsafePickleError", "TRAIN_FILES", "TEST_FILES"]

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
N_CLASSES = 10
_ROW = 3 * 32 * 32


class UnsafePickleError(ValueError, pickle.UnpicklingError):
    """A pickle named a global outside the allowed NumPy reconstruction functions; nothing was called."""


def _numpy_reconstruct():
    try:  # NumPy >= 2 (numpy.core is a deprecated alias there; importing it warns)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are limited to rebuilding NumPy arrays (see the module docstring)."""

    def __init__(self, file, *, source):
        # latin1 is NumPy's documented choice for Python 2 pickles holding arrays: py2 ``str`` objects
        # (dict keys, the raw array bytes, the dtype's byte-order character) come back byte for byte.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module, name):
        make = _ALLOWED.get((module, name))
        if make is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED)
            raise UnsafePickleError(
                f"{self._source}: refusing to load the global {module}.{name} from the pickle (only {allowed} "
                "are allowed); the file is not an official CIFAR-10 batch and may try to run code")
        return make()

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in a CIFAR-10 batch")


def _key(k):
    return k.decode("latin1") if isinstance(k, bytes) else k


def read_batch(path):
    """Read one batch file into ``(data, labels)``: uint8 (N, 3072) and int64 (N,), checked.

    Raises UnsafePickleError (a ValueError) for a forbidden global and ValueError for a corrupt, truncated
    or foreign file; both name the file.
    """
    path = Path(path)
    src = repr(str(path))
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, source=src).load()
            trailing = f.read(1)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise ValueError(f"{src} is not a readable CIFAR-10 batch (corrupt or truncated pickle): "
                         f"{type(exc).__name__}: {exc}") from exc
    if trailing:
        raise ValueError(f"{src} has data after the end of its pickle (corrupt file)")
    if not isinstance(obj, dict):
        raise ValueError(f"{src} is not a CIFAR-10 batch: expected a dict, got {type(obj).__name__}")
    d = {_key(k): v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise ValueError(f"{src} is not a CIFAR-10 batch: it lacks {missing} (keys found: {sorted(map(str, d))})")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        got = (f"{type(data).__name__}" if not isinstance(data, np.ndarray)
               else f"dtype {data.dtype}, shape {data.shape}")
        raise ValueError(f"{src}: 'data' must be a uint8 array of shape (N, {_ROW}), got {got}")
    if data.shape[0] == 0:
        raise ValueError(f"{src}: 'data' holds no images")
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"{src}: 'labels' must hold integers")
        labels = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    elif isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    else:
        raise ValueError(f"{src}: 'labels' must be a list of ints or a 1-D integer array, "
                         f"got {type(labels).__name__}")
    if len(labels) != data.shape[0]:
        raise ValueError(f"{src}: {data.shape[0]} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"{src}: labels must be in 0..{N_CLASSES - 1}, got the range "
                         f"{labels.min()}..{labels.max()}")
    return data, labels


def load_cifar10_batches(folder, split, *, cache_dir=None, cache=True):
    """Load a split of ``cifar-10-batches-py`` as ``(X, y)``: X uint8 (N, 3, 32, 32), y int64.

    ``split`` is "train" (``data_batch_1`` .. ``data_batch_5``, in that order) or "test" (``test_batch``).
    The decoded arrays are cached in ``cache_dir`` (default: the user cache folder) when ``cache`` is true,
    keyed by the files' paths, sizes and modification times.
    """
    check_option(split, "split", ("train", "test"))
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder: {str(folder)!r} is not a folder (expected cifar-10-batches-py)")
    files = [folder / n for n in (TRAIN_FILES if split == "train" else TEST_FILES)]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"folder: {str(folder)!r} lacks {absent}; the official cifar-10-batches-py "
                                f"holds {', '.join(TRAIN_FILES + TEST_FILES)}")

    def build():
        parts = [read_batch(f) for f in files]
        X = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        return np.ascontiguousarray(X), y

    if not cache:
        return build()
    from .datasets import _cached, _fingerprint
    return _cached(f"cifar10-batches-{split}-{_fingerprint(files)}", cache_dir, build)
