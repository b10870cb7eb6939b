"""Fetch the official CIFAR-10 python archive, check it, and unpack it atomically (standard library only).

The archive is streamed to a temporary file inside the destination folder while its MD5 is computed. A wrong
checksum (or a short download) is a ValueError and the temporary file is removed; only a verified archive is
extracted, with ``datasets._safe_extract`` (all or nothing, no links, no paths outside the folder).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["download_cifar10", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_ARCHIVE", "CIFAR10_FOLDER"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
_CHUNK = 1 << 20
_MIB = float(1 << 20)


def _md5_of(path):
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_args(url, md5):
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"url must be an http, https or file URL, got {url!r}")
    if not isinstance(md5, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"md5 must be 32 hexadecimal digits, got {md5!r}")
    return md5.lower()


def _fetch(url, fileobj, *, progress, timeout):
    """Stream ``url`` into ``fileobj``; return (md5 hex digest, bytes received, announced length or None)."""
    from ._progress import progress_bar
    h = hashlib.md5(usedforsecurity=False)
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            total = None if length is None else max(1, round(length / _MIB))
            with progress_bar(total=total, desc=f"downloading {url.rsplit('/', 1)[-1]} (MiB)",
                              enable=progress) as bar:
                shown = 0
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    h.update(block)
                    fileobj.write(block)
                    got += len(block)
                    mib = int(got / _MIB)
                    if mib > shown:
                        bar.update(mib - shown)
                        shown = mib
    except urllib.error.URLError as exc:
        raise OSError(f"downloading {url} failed: {exc.reason}. Without internet access, fetch the archive "
                      f"elsewhere and give its folder with --data DIR (or NPCONV_DATA_DIR)") from exc
    return h.hexdigest(), got, length


def download_cifar10(dest_dir, *, url=CIFAR10_URL, md5=CIFAR10_MD5, progress=True, keep_archive=False,
                     timeout=60.0):
    """Download, verify and unpack the official CIFAR-10 python archive; return ``dest_dir/cifar-10-batches-py``.

    Idempotent: when ``dest_dir/cifar-10-batches-py`` already exists nothing is fetched. A
    ``dest_dir/cifar-10-python.tar.gz`` already present is verified and unpacked instead of downloading.
    Otherwise ``url`` is streamed to a temporary file in ``dest_dir``; its MD5 must equal ``md5`` (else
    ValueError, and the temporary file is removed). The verified archive is unpacked atomically and then
    deleted, unless ``keep_archive`` is true (it is then kept as ``dest_dir/cifar-10-python.tar.gz``).
    ``progress`` draws a progress bar on stderr; ``timeout`` is the network timeout in seconds.
    """
    from .datasets import _safe_extract
    md5 = _check_args(url, md5)
    dest = Path(dest_dir)
    final = dest / CIFAR10_FOLDER
    if final.is_dir():
        return final
    dest.mkdir(parents=True, exist_ok=True)

    present = dest / CIFAR10_ARCHIVE
    if present.is_file():
        got = _md5_of(present)
        if got != md5:
            raise ValueError(f"{str(present)!r} has MD5 {got}, expected {md5}: the archive is damaged or not "
                             "the official one; delete it to download again")
        return _safe_extract(present, dest, CIFAR10_FOLDER)

    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{CIFAR10_ARCHIVE}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            got, n, length = _fetch(url, f, progress=progress, timeout=timeout)
        if length is not None and n != length:
            raise ValueError(f"the download of {url} is truncated: got {n} of {length} bytes")
        if got != md5:
            raise ValueError(f"the download of {url} has MD5 {got}, expected {md5}; it was removed "
                             "(a damaged transfer, or the file on the server changed)")
        folder = _safe_extract(Path(tmp), dest, CIFAR10_FOLDER)
        if keep_archive:
            os.replace(tmp, present)
        return folder
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
