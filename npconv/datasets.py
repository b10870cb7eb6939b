"""Dataset loaders: CIFAR-10 (image-folder layout or the official python batches) and generic image folders.

Images come back as ``uint8`` arrays in NCHW layout, labels as ``int64``. Decoded arrays are cached as
``.npy`` files (written atomically, readable by every user of a shared cache), so a second load reads
one file instead of decoding thousands of images.

Where the data is looked for, in order: the ``root``/``--data`` argument, ``$NPCONV_DATA_DIR``, the user cache
folder (``$XDG_CACHE_HOME/npconv`` or ``~/.cache/npconv``), and ``../shared/data`` beside the project.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ._fileio import atomic_write
from ._validate import check_int, check_option

__all__ = [
    "CIFAR10_CLASSES", "find_data_dir", "load_image_folder", "load_cifar10", "default_cache_dir",
    "DataNotFoundError", "DATA_HELP", "train_val_split",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp")

DATA_HELP = (
    "CIFAR-10 was not found. Give its folder with --data DIR (or set NPCONV_DATA_DIR), holding one of:\n"
    "  cifar-10-batches-py/  (the official python version), cifar-10-python.tar.gz,\n"
    "  cifar10-jpg/{train,test}/<class>/*.jpg, or cifar10-jpg.tar.gz;\n"
    "or fetch the official archive with `python -m npconv --download` (about 163 MB).")


class DataNotFoundError(FileNotFoundError):
    """No dataset was found in any of the searched places."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npconv"


def _project_shared_data():
    here = Path(__file__).resolve().parent.parent  # the checkout root for an editable install
    cands = [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return [c for c in cands if c.is_dir()]


def _candidate_dirs(root=None):
    if root is not None:
        return [Path(root)]
    out = []
    env = os.environ.get("NPCONV_DATA_DIR")
    if env:
        out.append(Path(env))
    out.append(default_cache_dir())
    out.extend(_project_shared_data())
    return out


_CIFAR_SOURCES = ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10-jpg", "cifar10-jpg.tar.gz")


def find_data_dir(root=None):
    """The first searched folder that holds a CIFAR-10 copy, or raise DataNotFoundError naming the places."""
    tried = []
    for d in _candidate_dirs(root):
        tried.append(str(d))
        if any((d / s).exists() for s in _CIFAR_SOURCES):
            return d
    raise DataNotFoundError(DATA_HELP + "\nSearched: " + ", ".join(tried))


# ------------------------------------------------------------------------------------------------ cache
def _atomic_save_npy(path: Path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _cached(key, cache_dir, build):
    """Return (X, y) from the cache under ``key``, building and storing it on a miss."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    px, py = cache_dir / f"{key}-X.npy", cache_dir / f"{key}-y.npy"
    if px.exists() and py.exists():
        try:
            return np.load(px, allow_pickle=False), np.load(py, allow_pickle=False)
        except (ValueError, OSError):
            pass  # a damaged cache entry is rebuilt
    X, y = build()
    try:
        _atomic_save_npy(px, X)
        _atomic_save_npy(py, y)
    except OSError:
        pass  # a read-only cache is not an error; the data are still returned
    return X, y


def _fingerprint(paths, *extra):
    """A cache key part for data built from ``paths`` (names, sizes, modification times) and ``extra`` (the
    other inputs that shape the result, by their ``repr``)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for e in extra:
        h.update(f"\1{e!r}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ image folders
def _list_image_folder(root: Path, classes=None):
    if not root.is_dir():
        raise FileNotFoundError(f"root: image folder {str(root)!r} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = tuple(found)
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"classes: folder(s) {missing} are missing under {str(root)!r} (found {found})")
    if not classes:
        raise ValueError(f"root: {str(root)!r} holds no class folders")
    files, labels = [], []
    for label, c in enumerate(classes):
        fs = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += fs
        labels += [label] * len(fs)
    if not files:
        raise ValueError(f"root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    return tuple(classes), files, np.asarray(labels, np.int64)


def _decode_images(files, size, progress):
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("decoding images needs Pillow: pip install 'npconv[data]'") from exc
    from ._progress import progress_bar
    first = None
    out = None
    for i, f in enumerate(progress_bar(files, desc="decoding images", enable=progress)):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # PIL raises several types for corrupt or truncated files
            raise ValueError(f"cannot decode image {str(f)!r}: {exc}") from exc
        if out is None:
            first = a.shape
            out = np.empty((len(files), 3, a.shape[0], a.shape[1]), np.uint8)
        elif a.shape != first:
            raise ValueError(f"image {str(f)!r} is {a.shape[1]}x{a.shape[0]}, but earlier images are "
                             f"{first[1]}x{first[0]}; pass size=(H, W) to resize")
        out[i] = a.transpose(2, 0, 1)
    return out


def load_image_folder(root, *, classes=None, size=None, cache_dir=None, cache=True, progress=False):
    """Load ``root/<class>/*.<image>`` into ``(X, y, classes)``.

    X is uint8 of shape (N, 3, H, W); y is int64. Classes are the sorted sub-folder names unless given.
    ``size=(H, W)`` resizes every image. Decoded arrays are cached in ``cache_dir`` when ``cache`` is true.
    """
    root = Path(root)
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be a pair (H, W) of positive ints, got {size!r}")
    classes, files, y = _list_image_folder(root, classes)

    def build():
        return _decode_images(files, size, progress), y

    if not cache:
        X, y = build()
    else:
        # everything the result depends on: the files, the classes (their order gives the labels), the size
        key = "imgfolder-" + _fingerprint(files, classes) + ("" if size is None else f"-{size[0]}x{size[1]}")
        X, y = _cached(key, cache_dir, build)
    return X, y, classes


# ------------------------------------------------------------------------------------------------ archives
def _safe_extract(archive: Path, dest_parent: Path, top: str):
    """Extract ``archive`` so that ``dest_parent/top`` appears atomically (all or nothing)."""
    final = dest_parent / top
    if final.exists():
        return final
    dest_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_parent, prefix=f".{top}.partial-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    if not (m.isfile() or m.isdir()):
                        raise ValueError(f"archive {str(archive)!r} holds a link or device {m.name!r}; refused")
                    parts = Path(m.name).parts
                    if m.name.startswith("/") or ".." in parts or not parts or parts[0] != top:
                        raise ValueError(f"archive {str(archive)!r} holds the unexpected path {m.name!r}")
                tf.extractall(tmp, members=members, filter="data")
                # tarfile stops at the end-of-archive blocks and never reaches the compressed stream's
                # trailer, so its CRC would go unchecked and a damaged archive would extract silently:
                # read to the end of the stream to have gzip/bz2/xz verify it.
                while tf.fileobj.read(1 << 20):
                    pass
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise ValueError(f"archive {str(archive)!r} is corrupt or truncated: {exc}") from exc
        if not (tmp / top).is_dir():
            raise ValueError(f"archive {str(archive)!r} does not hold the folder {top!r}")
        try:
            os.replace(tmp / top, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _writable_cache(cache_dir):
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def load_cifar10(split="train", *, root=None, download=False, cache_dir=None, progress=False):
    """CIFAR-10 as ``(X, y)``: X uint8 (N, 3, 32, 32), y int64 in CIFAR-10's label order.

    ``split`` is "train" or "test". The first source found in the searched folder wins:
    the official python batches (folder or archive), then the image-folder copy (folder or archive).
    """
    check_option(split, "split", ("train", "test"))
    if download:
        # the downloaded copy is the one used (another copy found earlier in the search must not win)
        from ._cifar_batches import load_cifar10_batches
        from ._download import download_cifar10
        folder = download_cifar10(_writable_cache(cache_dir if root is None else root), progress=progress)
        return load_cifar10_batches(folder, split, cache_dir=cache_dir)
    d = find_data_dir(root)
    if (d / "cifar-10-batches-py").is_dir() or (d / "cifar-10-python.tar.gz").exists():
        from ._cifar_batches import load_cifar10_batches
        folder = d / "cifar-10-batches-py"
        if not folder.is_dir():
            folder = _safe_extract(d / "cifar-10-python.tar.gz", _writable_cache(cache_dir), "cifar-10-batches-py")
        return load_cifar10_batches(folder, split, cache_dir=cache_dir)
    folder = d / "cifar10-jpg"
    if not folder.is_dir():
        folder = _safe_extract(d / "cifar10-jpg.tar.gz", _writable_cache(cache_dir), "cifar10-jpg")
    X, y, _ = load_image_folder(folder / split, classes=CIFAR10_CLASSES, cache_dir=cache_dir, progress=progress)
    return X, y


def train_val_split(y, n_val=5000):
    """Indices ``(train_idx, val_idx)`` holding out the last ``n_val / n_classes`` images of every class.

    Deterministic (no shuffling), balanced over classes, and independent of the order of classes in ``y``,
    so the validation split is the same for training, for choosing approximation settings and for tests.
    """
    n_val = check_int(n_val, "n_val", min_value=0)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"y must hold integer labels, got dtype {y.dtype}")
    if len(y) == 0:
        raise ValueError("y must hold at least one label, got an empty array")
    classes = np.unique(y)
    if n_val % len(classes):
        raise ValueError(f"n_val must be a multiple of the number of classes ({len(classes)}), got {n_val}")
    per = n_val // len(classes)
    if per == 0:  # idx[-0:] would be the whole class
        return np.arange(len(y)), np.zeros(0, np.int64)
    val = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if len(idx) <= per:
            raise ValueError(f"n_val: class {c} has {len(idx)} images, too few to hold out {per}")
        val.append(idx[-per:])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(y)), val)
    return train, val
