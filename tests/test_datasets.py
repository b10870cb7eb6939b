"""Dataset loaders: official CIFAR-10 batches (restricted unpickling), image folders, archives, cache, download.

Every input is built here: official-format batches are written byte by byte the way Python 2's cPickle wrote
them (and with Python 3's pickle), image folders with Pillow, archives with tarfile. Expected pixels come from
the images the test made, never from the loaders.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from npconv import _cifar_batches, _download, datasets
from npconv._cifar_batches import UnsafePickleError, load_cifar10_batches, read_batch
from npconv._download import download_cifar10
from npconv.datasets import (CIFAR10_CLASSES, DataNotFoundError, _safe_extract, find_data_dir, load_cifar10,
                             load_image_folder, train_val_split)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ------------------------------------------------------------------------------------------------ builders
def _py2_str(b):
    """A Python 2 ``str`` as cPickle protocol 2 wrote it (SHORT_BINSTRING / BINSTRING)."""
    b = b.encode("latin1") if isinstance(b, str) else b
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _py2_int(v):
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def py2_batch_bytes(data, labels, batch_label="training batch 1 of 5"):
    """A batch in the byte layout of the official files (Python 2 cPickle, protocol 2, NumPy 1 array state)."""
    n, m = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str("b")
             + b"\x87R" + b"(" + _py2_int(1) + _py2_int(n) + _py2_int(m) + b"\x86"
             + b"cnumpy\ndtype\n" + _py2_str("u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_str("|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
             + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    return b"".join([
        b"\x80\x02}(",
        _py2_str("batch_label") + _py2_str(batch_label),
        _py2_str("labels") + b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e",
        _py2_str("data") + array,
        _py2_str("filenames") + b"](" + b"".join(_py2_str(f"img_{i:04d}.png") for i in range(n)) + b"e",
        b"u.",
    ])


def py3_batch_bytes(data, labels, *, protocol=4, bytes_keys=True):
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    return pickle.dumps({k("batch_label"): k("x"), k("labels"): list(map(int, labels)), k("data"): data,
                         k("filenames"): []}, protocol=protocol)


def make_images(rng, n):
    """n random 32x32 RGB images, HWC uint8, and their labels."""
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def to_rows(imgs):
    """CIFAR row layout: 1024 red values, then green, then blue; each plane row-major."""
    return np.stack([np.concatenate([im[:, :, c].reshape(-1) for c in range(3)]) for im in imgs])


def write_batches_folder(parent, rng, *, n_per_batch=4, n_test=5, fmt="py2"):
    """parent/cifar-10-batches-py with the six official files; return (folder, (Xtr, ytr), (Xte, yte)) in NCHW."""
    folder = Path(parent) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expect = {}
    for split, names, n in (("train", [f"data_batch_{i}" for i in range(1, 6)], n_per_batch),
                            ("test", ["test_batch"], n_test)):
        xs, ys = [], []
        for name in names:
            imgs, labels = make_images(rng, n)
            rows = to_rows(imgs)
            raw = py2_batch_bytes(rows, labels) if fmt == "py2" else py3_batch_bytes(rows, labels)
            (folder / name).write_bytes(raw)
            xs.append(imgs.transpose(0, 3, 1, 2))
            ys.append(labels)
        expect[split] = (np.concatenate(xs), np.concatenate(ys))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}, protocol=2))
    return folder, expect["train"], expect["test"]


def make_tar(path, root, arcname):
    with tarfile.open(path, "w:gz") as tf:
        tf.add(root, arcname=arcname)
    return Path(path)


def md5_of(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def tree(path):
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("fmt", ["py2", "py3"])
def test_batches_decode_to_the_images_written(tmp_path, rng, fmt):
    folder, (xtr, ytr), (xte, yte) = write_batches_folder(tmp_path, rng, fmt=fmt)
    X, y = load_cifar10_batches(folder, "train", cache_dir=tmp_path / "cache")
    assert X.dtype == np.uint8 and X.shape == (20, 3, 32, 32) and X.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(X, xtr)
    np.testing.assert_array_equal(y, ytr)
    X, y = load_cifar10_batches(folder, "test", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(X, xte)
    np.testing.assert_array_equal(y, yte)


def test_one_pixel_lands_where_the_format_says(tmp_path):
    """Row value index c*1024 + h*32 + w is pixel (c, h, w): checked on a single marked value."""
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, 1 * 1024 + 5 * 32 + 7] = 200
    p = tmp_path / "b"
    p.write_bytes(py2_batch_bytes(rows, [3]))
    data, labels = read_batch(p)
    X = data.reshape(-1, 3, 32, 32)
    assert X[0, 1, 5, 7] == 200 and int(X.sum()) == 200
    assert labels.tolist() == [3]


def test_labels_may_be_an_integer_array(tmp_path, rng):
    rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({"data": rows, "labels": np.array([0, 9, 4], np.int32)}, protocol=3))
    data, labels = read_batch(p)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 9, 4]


def _batch_file(tmp_path, payload, name="data_batch_1"):
    p = tmp_path / name
    p.write_bytes(payload)
    return p


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "trailing", "not_a_dict", "cifar100_keys",
                                  "short_rows", "float_data", "bad_label", "negative_label", "count_mismatch",
                                  "str_labels", "no_images"])
def test_corrupt_or_foreign_batch_is_a_value_error_naming_the_file(tmp_path, rng, case):
    rows = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    good = py2_batch_bytes(rows, [0, 1, 2, 3])
    payload = {
        "truncated": good[: len(good) // 2],
        "garbage": bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
        "empty": b"",
        "trailing": good + b"\x00junk",
        "not_a_dict": pickle.dumps([rows, [0, 1, 2, 3]], protocol=3),
        "cifar100_keys": pickle.dumps({"data": rows, "fine_labels": [0, 1, 2, 3]}, protocol=3),
        "short_rows": py2_batch_bytes(rows[:, :3000], [0, 1, 2, 3]),
        "float_data": pickle.dumps({"data": rows.astype(np.float32), "labels": [0, 1, 2, 3]}, protocol=3),
        "bad_label": py2_batch_bytes(rows, [0, 1, 10, 3]),
        "negative_label": pickle.dumps({"data": rows, "labels": [0, -1, 2, 3]}, protocol=3),
        "count_mismatch": py2_batch_bytes(rows, [0, 1, 2]),
        "str_labels": pickle.dumps({"data": rows, "labels": ["a", "b", "c", "d"]}, protocol=3),
        "no_images": pickle.dumps({"data": rows[:0], "labels": []}, protocol=3),
    }[case]
    p = _batch_file(tmp_path, payload)
    with pytest.raises(ValueError, match="data_batch_1"):
        read_batch(p)


def test_a_corrupt_batch_fails_the_whole_load_naming_it(tmp_path, rng):
    folder, _, _ = write_batches_folder(tmp_path, rng)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10_batches(folder, "train", cache=False)


class _OpensAFile:
    """Unpickling this calls open(path, 'w'): creating the file is the side effect."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_forbidden_global_is_refused_and_never_called(tmp_path, rng):
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    marker = tmp_path / "marker"

    def payload_for(path):
        return pickle.dumps({"data": rows, "labels": [1, 2], "batch_label": _OpensAFile(path)}, protocol=3)

    payload = payload_for(marker)
    # the payload is live: a plain pickle.loads runs it
    probe = tmp_path / "probe"
    pickle.loads(payload_for(probe)).get("batch_label").close()
    assert probe.exists()

    p = _batch_file(tmp_path, payload)
    with pytest.raises(UnsafePickleError, match=r"io\.open") as ei:
        read_batch(p)
    assert isinstance(ei.value, ValueError) and "data_batch_1" in str(ei.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload_kind", ["protocol5_frombuffer", "codecs_encode", "numpy_load"])
def test_other_globals_are_refused(tmp_path, rng, payload_kind):
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    if payload_kind == "protocol5_frombuffer":  # NumPy pickles protocol 5 arrays through _frombuffer
        payload = pickle.dumps({"data": rows, "labels": [1, 2]}, protocol=5)
    elif payload_kind == "codecs_encode":  # Python 3 protocol 2 writes bytes through _codecs.encode
        payload = pickle.dumps({"data": rows, "labels": [1, 2]}, protocol=2)
    else:
        payload = b"\x80\x02cnumpy\nload\nU\x03abc\x85R."
    with pytest.raises(UnsafePickleError, match="refusing"):
        read_batch(_batch_file(tmp_path, payload))


def test_missing_batch_files_are_named(tmp_path, rng):
    folder, _, _ = write_batches_folder(tmp_path, rng)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar10_batches(folder, "train")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_cifar10_batches(tmp_path / "nope", "test")
    with pytest.raises(ValueError, match="split"):
        load_cifar10_batches(folder, "validation")


# ------------------------------------------------------------------------------------------------ cache
def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_second_batch_load_reads_the_cache(tmp_path, rng, monkeypatch):
    folder, (xtr, ytr), _ = write_batches_folder(tmp_path, rng)
    calls = _count_calls(monkeypatch, _cifar_batches, "read_batch")
    cache = tmp_path / "cache"
    X1, y1 = load_cifar10_batches(folder, "train", cache_dir=cache)
    assert len(calls) == 5
    assert len(list(cache.glob("cifar10-batches-train-*-X.npy"))) == 1
    X2, y2 = load_cifar10_batches(folder, "train", cache_dir=cache)
    assert len(calls) == 5  # nothing decoded the second time
    np.testing.assert_array_equal(X2, xtr)
    np.testing.assert_array_equal(y2, ytr)
    load_cifar10_batches(folder, "train", cache_dir=cache, cache=False)
    assert len(calls) == 10
    assert not list(cache.glob("*.tmp"))


def test_cache_is_rebuilt_when_damaged_or_stale(tmp_path, rng, monkeypatch):
    folder, _, (xte, yte) = write_batches_folder(tmp_path, rng)
    cache = tmp_path / "cache"
    calls = _count_calls(monkeypatch, _cifar_batches, "read_batch")
    load_cifar10_batches(folder, "test", cache_dir=cache)
    (px,) = cache.glob("cifar10-batches-test-*-X.npy")
    px.write_bytes(b"not an npy file")
    X, y = load_cifar10_batches(folder, "test", cache_dir=cache)
    assert len(calls) == 2
    np.testing.assert_array_equal(X, xte)
    # a changed source gets a new cache entry, not the old arrays
    imgs, labels = make_images(rng, 3)
    f = folder / "test_batch"
    f.write_bytes(py2_batch_bytes(to_rows(imgs), labels))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    X, y = load_cifar10_batches(folder, "test", cache_dir=cache)
    assert len(calls) == 3
    np.testing.assert_array_equal(X, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)


# ------------------------------------------------------------------------------------------------ image folders
def _solid(colour, size):
    return np.broadcast_to(np.asarray(colour, np.uint8), (size[0], size[1], 3)).copy()


def write_image_folder(root, rng, *, classes=("cat", "dog", "emu"), per_class=2, size=(32, 32), ext="png"):
    """root/<class>/<i>.<ext>; returns the HWC images and labels in the loader's order (sorted class, name)."""
    imgs, labels = [], []
    for label, c in enumerate(classes):
        (Path(root) / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(im).save(Path(root) / c / f"{i:04d}.{ext}")
            imgs.append(im)
            labels.append(label)
    return np.stack(imgs), np.asarray(labels)


def test_png_folder_decodes_exactly(tmp_path, rng):
    imgs, labels = write_image_folder(tmp_path / "f", rng, size=(9, 13))
    X, y, classes = load_image_folder(tmp_path / "f", cache=False)
    assert classes == ("cat", "dog", "emu")
    assert X.shape == (6, 3, 9, 13) and X.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(X, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)


def test_jpeg_folder_decodes_close(tmp_path, rng):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    smooth = np.stack([_solid((10 * k, 200 - 10 * k, 77), (16, 16)) for k in range(4)])
    for k, im in enumerate(smooth):
        Image.fromarray(im).save(root / "a" / f"{k}.jpg", quality=95)
    Image.fromarray(smooth[0]).save(root / "a" / "notes.txt.bak", format="PNG")  # not an image extension
    X, y, classes = load_image_folder(root, cache=False)
    assert X.shape == (4, 3, 16, 16) and classes == ("a",)
    assert np.abs(X.astype(int) - smooth.transpose(0, 3, 1, 2)).max() <= 3


def test_resize_and_grayscale(tmp_path):
    root = tmp_path / "f"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir(parents=True)
    colours = [(255, 0, 0), (0, 128, 255), (17, 34, 51)]
    Image.fromarray(_solid(colours[0], (20, 30))).save(root / "x" / "a.png")
    Image.fromarray(_solid(colours[1], (7, 5))).save(root / "x" / "b.png")
    Image.fromarray(_solid(colours[2], (32, 32))).save(root / "y" / "c.bmp")
    Image.fromarray(np.full((12, 12), 99, np.uint8), mode="L").save(root / "y" / "d.png")
    with pytest.raises(ValueError, match="size"):
        load_image_folder(root, cache=False)  # mixed sizes need size=
    X, y, _ = load_image_folder(root, size=(6, 10), cache=False)
    assert X.shape == (4, 3, 6, 10)
    for i, c in enumerate(colours):  # a solid colour stays that colour under any resize
        assert (X[i] == np.asarray(c, np.uint8)[:, None, None]).all()
    assert (X[3] == 99).all()  # grey becomes three equal channels
    assert y.tolist() == [0, 0, 1, 1]


def test_image_folder_classes_and_errors(tmp_path, rng):
    imgs, labels = write_image_folder(tmp_path / "f", rng)
    X, y, classes = load_image_folder(tmp_path / "f", classes=("emu", "cat"), cache=False)
    assert classes == ("emu", "cat") and y.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(X[:2], imgs[4:6].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="missing"):
        load_image_folder(tmp_path / "f", classes=("cat", "owl"), cache=False)
    with pytest.raises(FileNotFoundError, match="root"):
        load_image_folder(tmp_path / "nowhere", cache=False)
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path / "f", size=(0, 4), cache=False)
    (tmp_path / "f" / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="0001.png"):
        load_image_folder(tmp_path / "f", cache=False)
    (tmp_path / "e" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "e", cache=False)


def test_truncated_jpeg_is_a_value_error(tmp_path, rng):
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "a" / "t.jpg").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="t.jpg"):
        load_image_folder(root, cache=False)


def test_second_image_folder_load_reads_the_cache(tmp_path, rng, monkeypatch):
    imgs, labels = write_image_folder(tmp_path / "f", rng)
    calls = _count_calls(monkeypatch, datasets, "_decode_images")
    cache = tmp_path / "cache"
    load_image_folder(tmp_path / "f", cache_dir=cache)
    X, y, _ = load_image_folder(tmp_path / "f", cache_dir=cache)
    assert len(calls) == 1
    np.testing.assert_array_equal(X, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)
    load_image_folder(tmp_path / "f", cache_dir=cache, size=(8, 8))  # another size is another entry
    assert len(calls) == 2


def test_image_folder_cache_depends_on_the_classes(tmp_path, rng):
    # the same files with another class list (or order) give other labels: never the cached entry of another call
    write_image_folder(tmp_path / "f", rng, classes=("a", "c"), per_class=1, size=(4, 4))
    (tmp_path / "f" / "b").mkdir()          # an empty class folder
    cache = tmp_path / "cache"
    imgs = {}
    for classes in (None, ("a", "c"), ("c", "a"), ("a", "b", "c")):
        X, y, _ = load_image_folder(tmp_path / "f", classes=classes, cache_dir=cache)
        X_fresh, y_fresh, _ = load_image_folder(tmp_path / "f", classes=classes, cache=False)
        np.testing.assert_array_equal(X, X_fresh)
        np.testing.assert_array_equal(y, y_fresh)
        want = {None: [0, 2], ("a", "c"): [0, 1], ("c", "a"): [0, 1], ("a", "b", "c"): [0, 2]}[classes]
        assert y.tolist() == want, (classes, y)
        imgs[classes] = X
    np.testing.assert_array_equal(imgs[("c", "a")], imgs[("a", "c")][::-1])   # c's image first
    # a hit for the same classes again
    X, y, _ = load_image_folder(tmp_path / "f", classes=("c", "a"), cache_dir=cache)
    np.testing.assert_array_equal(X, imgs[("c", "a")])


# ------------------------------------------------------------------------------------------------ CIFAR-10 entry
def write_cifar_jpg_folder(parent, rng, *, per_class=(2, 1)):
    """parent/cifar10-jpg/{train,test}/<class>/NNNN.png for the ten classes (PNG: exact pixels)."""
    out = {}
    for split, n in zip(("train", "test"), per_class):
        imgs, labels = write_image_folder(Path(parent) / "cifar10-jpg" / split, rng, classes=CIFAR10_CLASSES,
                                          per_class=n)
        out[split] = (imgs.transpose(0, 3, 1, 2), labels)
    return out


def test_load_cifar10_from_the_batches_folder_and_archive(tmp_path, rng):
    src = tmp_path / "src"
    folder, train, test = write_batches_folder(src, rng)
    X, y = load_cifar10("test", root=src, cache_dir=tmp_path / "c1")
    np.testing.assert_array_equal(X, test[0])
    np.testing.assert_array_equal(y, test[1])
    only_tar = tmp_path / "tar"
    only_tar.mkdir()
    make_tar(only_tar / "cifar-10-python.tar.gz", folder, "cifar-10-batches-py")
    X, y = load_cifar10("train", root=only_tar, cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(X, train[0])
    np.testing.assert_array_equal(y, train[1])
    assert (tmp_path / "c2" / "cifar-10-batches-py" / "data_batch_5").is_file()  # unpacked into the cache


def test_load_cifar10_from_the_image_folder_and_archive(tmp_path, rng):
    src = tmp_path / "src"
    expect = write_cifar_jpg_folder(src, rng)
    X, y = load_cifar10("train", root=src, cache_dir=tmp_path / "c1")
    np.testing.assert_array_equal(X, expect["train"][0])
    np.testing.assert_array_equal(y, expect["train"][1])
    only_tar = tmp_path / "tar"
    only_tar.mkdir()
    make_tar(only_tar / "cifar10-jpg.tar.gz", src / "cifar10-jpg", "cifar10-jpg")
    X, y = load_cifar10("test", root=only_tar, cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(X, expect["test"][0])
    assert y.tolist() == list(range(10))
    with pytest.raises(ValueError, match="split"):
        load_cifar10("val", root=src)


def test_official_batches_win_over_the_image_folder(tmp_path, rng):
    _, _, test = write_batches_folder(tmp_path, rng)
    write_cifar_jpg_folder(tmp_path, rng)
    X, y = load_cifar10("test", root=tmp_path, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(X, test[0])


# ------------------------------------------------------------------------------------------------ search order
@pytest.fixture
def clean_search(tmp_path, monkeypatch):
    """No data in the env/cache places, and the shared copy hidden."""
    monkeypatch.delenv("NPCONV_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(datasets, "_project_shared_data", lambda: [])


def _holder(path, source="cifar10-jpg"):
    (Path(path) / source).mkdir(parents=True)
    return Path(path)


def test_find_data_dir_search_order(tmp_path, monkeypatch, clean_search):
    with pytest.raises(DataNotFoundError, match="NPCONV_DATA_DIR"):
        find_data_dir()
    shared = _holder(tmp_path / "shared")
    monkeypatch.setattr(datasets, "_project_shared_data", lambda: [shared])
    assert find_data_dir() == shared
    cache = _holder(tmp_path / "xdg" / "npconv", "cifar-10-batches-py")
    assert find_data_dir() == cache  # the user cache comes before the shared copy
    env = _holder(tmp_path / "env", "cifar-10-python.tar.gz")
    monkeypatch.setenv("NPCONV_DATA_DIR", str(env))
    assert find_data_dir() == env  # the environment comes before both
    root = _holder(tmp_path / "root", "cifar10-jpg.tar.gz")
    assert find_data_dir(root) == root  # the argument comes first
    with pytest.raises(DataNotFoundError, match="empty"):
        find_data_dir(tmp_path / "empty")  # a given root is the only place searched


def test_env_dir_without_data_falls_through(tmp_path, monkeypatch, clean_search):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("NPCONV_DATA_DIR", str(tmp_path / "env"))
    cache = _holder(tmp_path / "xdg" / "npconv")
    assert find_data_dir() == cache


# ------------------------------------------------------------------------------------------------ archives
def _tar_with(path, entries):
    """entries: list of (TarInfo-configuring dict, bytes or None)."""
    with tarfile.open(path, "w:gz") as tf:
        for spec, data in entries:
            ti = tarfile.TarInfo(spec["name"])
            ti.type = spec.get("type", tarfile.REGTYPE)
            ti.linkname = spec.get("linkname", "")
            ti.mode = 0o644 if ti.type != tarfile.DIRTYPE else 0o755
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return Path(path)


@pytest.mark.parametrize("bad", ["dotdot", "absolute", "symlink", "hardlink", "other_top", "fifo"])
def test_unsafe_archives_are_refused_and_leave_nothing(tmp_path, bad):
    entry = {
        "dotdot": ({"name": "top/../../escaped.txt"}, b"x"),
        "absolute": ({"name": "/tmp/npconv-absolute-test.txt"}, b"x"),
        "symlink": ({"name": "top/link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None),
        "hardlink": ({"name": "top/hard", "type": tarfile.LNKTYPE, "linkname": "top/a.txt"}, None),
        "other_top": ({"name": "elsewhere/a.txt"}, b"x"),
        "fifo": ({"name": "top/pipe", "type": tarfile.FIFOTYPE}, None),
    }[bad]
    arc = _tar_with(tmp_path / "a.tar.gz", [({"name": "top", "type": tarfile.DIRTYPE}, None),
                                            ({"name": "top/a.txt"}, b"hello"), entry])
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="refused|unexpected path"):
        _safe_extract(arc, dest, "top")
    assert tree(dest) == []
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_damaged_archives_are_refused_and_leave_nothing(tmp_path, rng, damage):
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "a.bin").write_bytes(bytes(rng.integers(0, 256, 200_000, dtype=np.uint8)))
    (tmp_path / "top" / "b.txt").write_text("some text\n" * 20000)
    good = make_tar(tmp_path / "good.tar.gz", tmp_path / "top", "top").read_bytes()
    if damage == "truncated":
        raw = good[: len(good) * 2 // 3]
    elif damage == "flipped":  # the stream stays decodable; only the CRC can tell
        b = bytearray(good)
        for i in range(64):
            b[len(b) // 3 + i] ^= 0x55
        raw = bytes(b)
    else:
        raw = bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
    arc = tmp_path / "bad.tar.gz"
    arc.write_bytes(raw)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="corrupt or truncated"):
        _safe_extract(arc, dest, "top")
    assert tree(dest) == []


def test_archive_without_the_folder_is_refused(tmp_path):
    arc = _tar_with(tmp_path / "a.tar.gz", [({"name": "top"}, b"a file, not a folder")])
    with pytest.raises(ValueError, match="does not hold the folder"):
        _safe_extract(arc, tmp_path / "dest", "top")
    assert tree(tmp_path / "dest") == []


def test_safe_extract_is_idempotent(tmp_path):
    arc = _tar_with(tmp_path / "a.tar.gz", [({"name": "top", "type": tarfile.DIRTYPE}, None),
                                            ({"name": "top/a.txt"}, b"hello")])
    out = _safe_extract(arc, tmp_path / "dest", "top")
    assert (out / "a.txt").read_bytes() == b"hello"
    arc.unlink()  # present already: the archive is not read again
    assert _safe_extract(arc, tmp_path / "dest", "top") == out
    assert tree(tmp_path / "dest") == ["top", "top/a.txt"]


# ------------------------------------------------------------------------------------------------ download
@pytest.fixture
def official_archive(tmp_path, rng):
    """A small archive in the official layout; returns (path, md5, expected test split)."""
    src = tmp_path / "src"
    folder, _, test = write_batches_folder(src, rng)
    (tmp_path / "served").mkdir()
    arc = make_tar(tmp_path / "served" / "cifar-10-python.tar.gz", folder, "cifar-10-batches-py")
    return arc, md5_of(arc), test


def test_download_verifies_and_unpacks(tmp_path, official_archive):
    arc, md5, test = official_archive
    dest = tmp_path / "dest"
    out = download_cifar10(dest, url=arc.as_uri(), md5=md5, progress=False)
    assert out == dest / "cifar-10-batches-py"
    assert tree(dest) == ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{n}" for n in sorted(
        ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch"])]
    X, y = load_cifar10_batches(out, "test", cache=False)
    np.testing.assert_array_equal(X, test[0])
    # idempotent: present already, so the (now unreachable) URL is not touched
    assert download_cifar10(dest, url=(tmp_path / "gone.tar.gz").as_uri(), md5=md5, progress=False) == out


def test_download_keeps_the_archive_when_asked(tmp_path, official_archive, capsys):
    arc, md5, _ = official_archive
    dest = tmp_path / "dest"
    download_cifar10(dest, url=arc.as_uri(), md5=md5.upper(), progress=True, keep_archive=True)
    assert (dest / "cifar-10-python.tar.gz").read_bytes() == arc.read_bytes()
    assert "downloading" in capsys.readouterr().err
    # an archive already in place is verified and unpacked without fetching
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    (dest2 / "cifar-10-python.tar.gz").write_bytes(arc.read_bytes())
    out = download_cifar10(dest2, url=(tmp_path / "gone").as_uri(), md5=md5, progress=False)
    assert (out / "test_batch").is_file()


def test_download_checksum_mismatch_leaves_nothing(tmp_path, official_archive):
    arc, md5, _ = official_archive
    dest = tmp_path / "dest"
    wrong = ("0" if md5[0] != "0" else "1") + md5[1:]
    with pytest.raises(ValueError, match="MD5"):
        download_cifar10(dest, url=arc.as_uri(), md5=wrong, progress=False)
    assert tree(dest) == []
    # a wrong archive already in place is refused and kept for the user to inspect
    dest.joinpath("cifar-10-python.tar.gz").write_bytes(b"not it")
    with pytest.raises(ValueError, match="MD5"):
        download_cifar10(dest, url=arc.as_uri(), md5=md5, progress=False)
    assert tree(dest) == ["cifar-10-python.tar.gz"]


def test_download_of_a_verified_but_unsafe_archive_leaves_nothing(tmp_path):
    arc = _tar_with(tmp_path / "evil.tar.gz", [
        ({"name": "cifar-10-batches-py", "type": tarfile.DIRTYPE}, None),
        ({"name": "cifar-10-batches-py/test_batch", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, None)])
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="refused"):
        download_cifar10(dest, url=arc.as_uri(), md5=md5_of(arc), progress=False)
    assert tree(dest) == []


def test_download_argument_and_network_errors(tmp_path):
    md5 = "c58f30108f718f92721af3b95e74349a"
    with pytest.raises(ValueError, match="md5"):
        download_cifar10(tmp_path / "d", url="file:///x", md5="xyz")
    with pytest.raises(ValueError, match="url"):
        download_cifar10(tmp_path / "d", url="ftp://example.org/a.tar.gz", md5=md5)
    with pytest.raises(TypeError, match="url"):
        download_cifar10(tmp_path / "d", url=None, md5=md5)
    with pytest.raises(OSError, match="downloading"):
        download_cifar10(tmp_path / "d", url=(tmp_path / "missing.tar.gz").as_uri(), md5=md5, progress=False)
    assert tree(tmp_path / "d") == []


def test_load_cifar10_download_uses_the_downloaded_copy(tmp_path, official_archive, monkeypatch, rng):
    arc, md5, test = official_archive
    other = tmp_path / "other"
    write_cifar_jpg_folder(other, rng, per_class=(1, 1))
    monkeypatch.setenv("NPCONV_DATA_DIR", str(other))  # found first by the search, but not what was asked for
    monkeypatch.setitem(_download.download_cifar10.__kwdefaults__, "url", arc.as_uri())
    monkeypatch.setitem(_download.download_cifar10.__kwdefaults__, "md5", md5)
    cache = tmp_path / "cache"
    X, y = load_cifar10("test", download=True, cache_dir=cache)
    np.testing.assert_array_equal(X, test[0])
    np.testing.assert_array_equal(y, test[1])
    assert (cache / "cifar-10-batches-py" / "test_batch").is_file()


# ------------------------------------------------------------------------------------------------ split
def test_train_val_split_is_balanced_deterministic_and_order_free(rng):
    y = rng.permutation(np.repeat(np.arange(10), 7))
    train, val = train_val_split(y, n_val=20)
    expect_val = sorted(i for c in range(10) for i in [j for j in range(len(y)) if y[j] == c][-2:])
    assert val.tolist() == expect_val
    assert np.bincount(y[val], minlength=10).tolist() == [2] * 10
    assert sorted(train.tolist() + val.tolist()) == list(range(len(y)))
    t2, v2 = train_val_split(y, n_val=20)
    np.testing.assert_array_equal(t2, train)
    np.testing.assert_array_equal(v2, val)
    relabelled = (y * 3 + 1) % 10  # another class naming: the same images are held out
    np.testing.assert_array_equal(train_val_split(relabelled, n_val=20)[1], val)
    t0, v0 = train_val_split(y, n_val=0)
    assert v0.size == 0 and t0.tolist() == list(range(len(y)))


def test_train_val_split_errors():
    y = np.repeat(np.arange(10), 3)
    with pytest.raises(ValueError, match="multiple"):
        train_val_split(y, n_val=15)
    with pytest.raises(ValueError, match="too few"):
        train_val_split(y, n_val=30)
    with pytest.raises(ValueError, match="n_val"):
        train_val_split(y, n_val=-10)
    with pytest.raises(TypeError, match="n_val"):
        train_val_split(y, n_val=2.5)
    with pytest.raises(TypeError, match="y must"):
        train_val_split(y.astype(float), n_val=10)
    with pytest.raises(ValueError, match="y must"):
        train_val_split(y.reshape(3, 10), n_val=10)
    with pytest.raises(ValueError, match="y must"):
        train_val_split(np.zeros(0, np.int64), n_val=10)


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.data
def test_real_cifar10_test_split(tmp_path):
    X, y = load_cifar10("test", cache_dir=tmp_path / "cache")
    assert X.shape == (10000, 3, 32, 32) and X.dtype == np.uint8
    assert y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    assert 50 < X.mean() < 200 and X.std() > 20  # real photographs, not blank decodes
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 60,000 unpacked files: do not keep them around
