"""MNIST and Fashion-MNIST: the IDX file format, parsed defensively.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the items. Files from outside are untrusted: the header is
checked against the payload's real size before anything sized by the header is allocated, and every
defect is reported as ``DataFormatError`` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataFormatError, DownloadError, InputError
from .download import base_url_for, data_root, fetch, missing_files_message

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_UBYTE = 0x08
_NDIM = {"images": 3, "labels": 1}
#: The most payload bytes any IDX file may claim; a header asking for more is refused outright.
MAX_IDX_BYTES = 2**31
# MNIST-style sets are 47 MB at most; this tighter cap stops a small gzip file that inflates
# to gigabytes (a "zip bomb") well before it exhausts memory.
_MNIST_MAX_BYTES = 2**28
_CHUNK = 1 << 20

# (key, file stem, kind), in the order they are listed in messages.
_FILES = (
    ("train_images", "train-images-idx3-ubyte", "images"),
    ("train_labels", "train-labels-idx1-ubyte", "labels"),
    ("test_images", "t10k-images-idx3-ubyte", "images"),
    ("test_labels", "t10k-labels-idx1-ubyte", "labels"),
)
# MD5 of the uncompressed official MNIST label files: a folder holding these is MNIST, so it is
# not taken for Fashion-MNIST, which uses the very same file names.
_MNIST_LABEL_MD5 = {"a25bea736e30d166cdddb491f175f624", "27ae3e4e09519cfbb04c329615203637"}


def read_idx_file(
    path: str | os.PathLike[str],
    *,
    kind: str,
    num_classes: int = 10,
    max_bytes: int = MAX_IDX_BYTES,
) -> np.ndarray:
    """Read an IDX file, gzipped or not (told apart by content, not name).

    ``kind="images"`` expects magic 0x00000803 and returns uint8 ``(N, rows, cols)``;
    ``kind="labels"`` expects 0x00000801 and returns int64 ``(N,)`` checked to lie in
    ``0..num_classes-1``. Anything else raises ``DataFormatError`` naming the file.

    The header is read first: a raw file's size is compared with it before the payload is read,
    and a gzipped file is decompressed in chunks up to one byte past the claimed size, so a lying
    header costs neither time nor memory. A gzipped file whose header or payload does not match
    is read on to the end of its gzip stream (in chunks, at most ``max_bytes`` more) before that
    is reported: one damaged inside its deflate stream fails gzip's CRC check there and is
    reported as damaged, to be downloaded again, not as a header that does not fit its data.
    """
    if kind not in _NDIM:
        raise InputError(f"kind must be 'images' or 'labels', got {kind!r}")
    source = str(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    return _read_stream(gz, None, kind, num_classes, max_bytes, source)
            size = os.fstat(raw.fileno()).st_size
            return _read_stream(raw, size, kind, num_classes, max_bytes, source)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        # A damaged gzip stream raises BadGzipFile or zlib.error; one cut short, EOFError.
        raise DataFormatError(f"{source}: the file is damaged: corrupt or truncated gzip data "
                              f"({e}); delete it and download it again") from e


def _read_stream(
    f: BinaryIO, size: int | None, kind: str, num_classes: int, max_bytes: int, source: str
) -> np.ndarray:
    head = f.read(4)
    try:
        _parse_header(head, kind, source)  # magic only: we know the header length after this
        ndim = head[3]
        head += f.read(4 * ndim)
        dims, offset = _parse_header(head, kind, source)
    except DataFormatError:
        _unless_damaged(f, size, max_bytes)
        raise
    expected = _payload_size(dims, kind, max_bytes, source)  # (a claim past it: refused unread)
    if size is not None:
        _check_payload(size - offset, expected, dims, source)
    # Read one byte more than claimed, to notice trailing garbage, and in chunks, so memory
    # follows the bytes that really arrive rather than the header's claim.
    buf = bytearray()
    while len(buf) <= expected:
        chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    if len(buf) > expected:
        _unless_damaged(f, size, max_bytes)
        raise DataFormatError(
            f"{source}: more data than the header's {_dims_text(dims)} declares "
            "(extra bytes after the last item)"
        )
    # Reaching the end here also made gzip verify its CRC and length trailer.
    _check_payload(len(buf), expected, dims, source)
    # The bytearray is ours and writable: the array can use it without a copy.
    arr = np.frombuffer(buf, dtype=np.uint8)
    return _finish(arr, dims, kind, num_classes, source)


def _unless_damaged(f: BinaryIO, size: int | None, max_bytes: int) -> None:
    """Before a header or a size that does not match the data is reported: a gzip stream
    (``size`` None) is read on to its end, at most ``max_bytes`` more, so that gzip checks its
    CRC and a damaged file, whose inflated bytes can pass for a wrong header or a longer
    payload, is reported as damaged (gzip's error) rather than as a lying header."""
    if size is not None:
        return
    left = max_bytes
    while left > 0 and (chunk := f.read(min(_CHUNK, left))):
        left -= len(chunk)


def _parse_header(head: bytes, kind: str, source: str) -> tuple[tuple[int, ...], int]:
    """Check magic and dtype; return the dimensions and the payload offset."""
    want_ndim = _NDIM[kind]
    if len(head) < 4:
        raise DataFormatError(f"{source}: file too short for an IDX header ({len(head)} bytes)")
    magic = struct.unpack(">I", head[:4])[0]
    want = (_UBYTE << 8) | want_ndim
    if head[0] != 0 or head[1] != 0:
        raise DataFormatError(
            f"{source}: not an IDX file: magic number 0x{magic:08x}, expected 0x{want:08x} "
            f"(IDX {kind})"
        )
    if head[2] != _UBYTE:
        raise DataFormatError(
            f"{source}: IDX data type 0x{head[2]:02x} is not supported; expected 0x08 "
            "(unsigned byte)"
        )
    if head[3] != want_ndim:
        raise DataFormatError(
            f"{source}: magic number 0x{magic:08x} is not IDX {kind}: {head[3]} dimensions, "
            f"expected {want_ndim} (magic 0x{want:08x})"
        )
    offset = 4 + 4 * want_ndim
    if len(head) < offset:
        return (), offset  # only the magic was given (streaming reads); dims come next
    return struct.unpack(f">{want_ndim}I", head[4:offset]), offset


def _payload_size(dims: tuple[int, ...], kind: str, max_bytes: int, source: str) -> int:
    if not dims:
        raise DataFormatError(f"{source}: truncated IDX header")
    if kind == "images" and (dims[1] == 0 or dims[2] == 0):
        raise DataFormatError(f"{source}: image size {dims[1]}x{dims[2]} in the header")
    expected = 1
    for d in dims:
        expected *= d  # Python ints: no overflow, however large the claim
    if expected > max_bytes:
        raise DataFormatError(
            f"{source}: header claims {_dims_text(dims)} = {expected} bytes, more than the "
            f"limit of {max_bytes}; the file is corrupt or not what it seems"
        )
    return expected


def _check_payload(actual: int, expected: int, dims: tuple[int, ...], source: str) -> None:
    if actual < expected:
        raise DataFormatError(
            f"{source}: truncated: the header's {_dims_text(dims)} needs {expected} bytes of "
            f"data but only {max(actual, 0)} follow"
        )
    if actual > expected:
        raise DataFormatError(
            f"{source}: {actual - expected} extra bytes after the {expected} bytes of data that "
            f"the header's {_dims_text(dims)} declares"
        )


def _finish(
    arr: np.ndarray, dims: tuple[int, ...], kind: str, num_classes: int, source: str
) -> np.ndarray:
    if kind == "images":
        return arr.reshape(dims)
    labels = arr.astype(np.int64)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{source}: label {labels[i]} at index {i} is out of range 0..{num_classes - 1} "
            f"({bad.size} such labels)"
        )
    return labels


def _dims_text(dims: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in dims) + (" items" if len(dims) == 1 else "")


# -- loaders ---------------------------------------------------------------------------------


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    base_url: str | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST digits: ``(x_train, y_train), (x_test, y_test)``.

    Images are uint8 ``(N, 28, 28, 1)``, labels int64 ``(N,)``; 60,000 and 10,000 for the
    official files. The four IDX files (``train-images-idx3-ubyte.gz`` and so on, gzipped or not)
    are looked for in ``<data folder>/mnist/``, then in the data folder itself. Missing files are
    downloaded into ``<data folder>/mnist/`` when ``download`` is true; otherwise, or if that
    fails, ``DownloadError`` says what to put where. ``base_url``: a mirror's folder URL to
    fetch from instead (see :data:`xpcnn.datasets.download.BASE_URLS`).
    """
    return _load("mnist", "MNIST", data_dir, download, base_url)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    base_url: str | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST, same layout and file names as MNIST (see ``load_mnist``).

    Looked for in ``<data folder>/fashion-mnist/``, then in the data folder itself unless the
    files there are the official MNIST ones; downloaded into ``<data folder>/fashion-mnist/``.
    """
    return _load("fashion-mnist", "Fashion-MNIST", data_dir, download, base_url)


def _spellings(stem: str) -> tuple[str, ...]:
    """Accepted names of one file: gzipped or not, and the common ``name.idx3-ubyte`` variant."""
    dotted = stem.replace("-idx", ".idx", 1)
    return (stem + ".gz", stem, dotted + ".gz", dotted)


def _find_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem, _ in _FILES:
        path = next((folder / n for n in _spellings(stem) if (folder / n).is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _missing(folder: Path) -> list[str]:
    """The official names of the files missing from ``folder``."""
    return [stem + ".gz" for _, stem, _ in _FILES
            if not any((folder / n).is_file() for n in _spellings(stem))]


def _is_mnist(labels_path: Path) -> bool:
    try:
        with open(labels_path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            # Label files are 60 kB; reading at most 1 MiB keeps a hostile file harmless.
            if gzipped:
                with gzip.GzipFile(fileobj=raw) as gz:
                    data = gz.read(1 << 20)
            else:
                data = raw.read(1 << 20)
    except (OSError, EOFError, zlib.error):
        return False  # unreadable: let the real read report it
    return hashlib.md5(data, usedforsecurity=False).hexdigest() in _MNIST_LABEL_MD5


def _load(
    dataset: str,
    title: str,
    data_dir: str | os.PathLike[str] | None,
    download: bool,
    base_url: str | None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    root = data_root(data_dir)
    home = root / dataset
    also = ""
    paths = _find_in(home)
    if paths is None:
        paths = _find_in(root)
        if paths is not None and dataset == "fashion-mnist" and _is_mnist(paths["train_labels"]):
            also = f" ({root} holds MNIST, which has the same file names)"
            paths = None
    if paths is None:
        missing = _missing(home)
        url = base_url_for(dataset, base_url)
        # Name the files missing where they come closest to complete: at the top level (where
        # they work as well) unless the subfolder holds more of them.
        top = _missing(root)
        folder, names = (root, top) if top and not also and len(top) <= len(missing) \
            else (home, missing)
        if not download:
            raise DownloadError(missing_files_message(title, names, folder, url=url, also=also))
        # (where some are there, only those the message names, into its folder; none
        # anywhere: all of them into the subfolder)
        into, fetched = (folder, names) if len(names) < len(_FILES) else (home, missing)
        try:
            fetch(dataset, fetched, into, base_url)
        except DownloadError as e:
            raise DownloadError(
                missing_files_message(title, names, folder, url=url, cause=str(e))
            ) from e
        paths = _find_in(into)
        if paths is None:  # pragma: no cover - fetch raises rather than leave a gap
            raise DownloadError(f"{title} files are still missing from {into} after "
                                "downloading")

    arrays = {
        key: read_idx_file(paths[key], kind=kind, max_bytes=_MNIST_MAX_BYTES)
        for key, _, kind in _FILES
    }
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        xp, yp = paths[f"{split}_images"], paths[f"{split}_labels"]
        if x.shape[1:] != (28, 28):
            raise DataFormatError(
                f"{xp}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28 for {title}"
            )
        if len(x) != len(y):
            raise DataFormatError(
                f"{title} {split} split: {xp} holds {len(x)} images but {yp} holds "
                f"{len(y)} labels"
            )
        if not len(x):  # (a valid IDX file, but a split of no image fails far from its cause)
            raise DataFormatError(f"{title} {split} split: {xp} holds no images")
        out.append((x[..., None], y))
    return out[0], out[1]
