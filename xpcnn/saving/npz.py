"""Bounded reading and atomic writing of .npz files of plain arrays, without pickle.

Files from outside are untrusted. :class:`NpzArchive` checks the zip directory when it opens a
file (entry names, compression methods, the sizes claimed against the file's own size) and
inflates nothing until an entry is asked for; it then inflates that one entry as a stream cut off
at a cap the caller derives from what the entry must hold, so neither an unexpected entry nor a
lying size can make it allocate more. Each array's header is checked against the bytes really
there before an array is made from them, and only plain numeric arrays (bool, int, uint, float)
are accepted, never Python objects. Every way a file can be wrong is a
:class:`~xpcnn.errors.DataFormatError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import numpy as np

from ..checks import file_path
from ..errors import DataFormatError, MissingFileError
from ..files import atomic_file, remove_leftovers

CONFIG_KEY = "__config__"
#: The most bytes of JSON the configuration entry may hold, which the writers check too (a
#: model's is a few kB; a checkpoint's grows by about 150 bytes an epoch of history).
MAX_CONFIG_BYTES = 1 << 22
#: Room for an .npy preamble and header (numpy writes 128 bytes for the arrays saved here).
NPY_HEADER_BYTES = 4096
#: The widest value a weight or optimiser slot may be stored as (float64).
MAX_ITEMSIZE = 8
MAX_ENTRIES = 100_000
#: Compression methods an entry may use: what numpy writes (stored or deflated). Deflate cannot
#: expand data more than about 1032 times, which bounds what a directory may claim.
_METHODS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError,
                NotImplementedError, RuntimeError, zlib.error, OverflowError, IndexError,
                TypeError, RecursionError, struct.error)


def array_bytes(values: int) -> int:
    """The most bytes an .npy entry holding ``values`` numbers may inflate to."""
    return NPY_HEADER_BYTES + MAX_ITEMSIZE * int(values)


def encode_json(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def decode_json(arr: np.ndarray, path: str) -> Any:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise DataFormatError(f"{path}: the configuration entry is not JSON bytes")
    try:
        return json.loads(arr.tobytes().decode())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise DataFormatError(f"{path}: the configuration entry is not valid JSON "
                              f"({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _format_errors(path: str) -> Iterator[None]:
    """Whatever zipfile, zlib or numpy's header parser raise becomes a DataFormatError."""
    try:
        yield
    except DataFormatError:
        raise
    except _READ_ERRORS as e:
        raise DataFormatError(f"{path}: not a readable xpcnn .npz file ({type(e).__name__}: "
                              f"{e})") from e


class NpzArchive:
    """An .npz file opened for checked reading; use it as a context manager.

    ``entries`` maps each array name (the entry name without ``.npy``) to its zip directory
    record; nothing is inflated until :meth:`header` or :meth:`read` asks for one entry.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "the file") -> None:
        self.path = file_path(path, what)
        if not os.path.isfile(self.path):
            if not os.path.exists(self.path):
                raise MissingFileError(f"{self.path}: no such file", self.path)
            raise DataFormatError(f"{self.path}: " + _not_a_file(self.path))
        with _format_errors(self.path):
            with open(self.path, "rb") as f:
                head = f.read(max(map(len, _FOREIGN_HEADS)))
            for start, kind in _FOREIGN_HEADS.items():
                if head.startswith(start):
                    raise _foreign(self.path, kind)
            size = os.path.getsize(self.path)
            self._zip = zipfile.ZipFile(self.path)
        try:
            with _format_errors(self.path):
                members = self._zip.infolist()
            kind = _foreign_zip([info.filename for info in members])
            if kind is not None:
                raise _foreign(self.path, kind)
            if len(members) > MAX_ENTRIES:
                raise DataFormatError(f"{self.path}: {len(members)} entries; not an xpcnn file")
            self.entries: dict[str, zipfile.ZipInfo] = {}
            for info in members:
                key = _entry_key(info, size, self.path)
                if key in self.entries:
                    raise DataFormatError(f"{self.path}: entry {key!r} appears twice")
                self.entries[key] = info
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._zip.close()

    def _inflate(self, key: str, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` inflated bytes of entry ``key``; more is an error."""
        info = self.entries[key]
        if info.file_size > max_bytes:
            raise DataFormatError(f"{self.path}: entry {key!r} claims {info.file_size} bytes, "
                                  f"more than the {max_bytes} its place in the file allows")
        with _format_errors(self.path), self._zip.open(info) as f:
            data = f.read(max_bytes + 1)  # a stream: never more than this is inflated
        if len(data) > max_bytes:
            raise DataFormatError(f"{self.path}: entry {key!r} inflates to more than its "
                                  f"{max_bytes}-byte limit")
        return data

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype entry ``key`` claims, from its first bytes alone."""
        with _format_errors(self.path), self._zip.open(self.entries[key]) as f:
            head = f.read(NPY_HEADER_BYTES)
        shape, _, dtype = _read_header(io.BytesIO(head), f"{self.path}: entry {key!r}")
        return shape, dtype

    def read(self, key: str, max_bytes: int) -> np.ndarray:
        """The array in entry ``key``, which may inflate to at most ``max_bytes`` bytes."""
        return _parse_npy(self._inflate(key, max_bytes), f"{self.path}: entry {key!r}")

    def read_config(self) -> Any:
        """The decoded JSON configuration entry."""
        if CONFIG_KEY not in self.entries:
            raise DataFormatError(f"{self.path}: not an xpcnn model file or checkpoint (no "
                                  f"{CONFIG_KEY} entry)")
        shape, dtype = self.header(CONFIG_KEY)
        if dtype != np.uint8 or len(shape) != 1:  # refused before it is inflated
            raise DataFormatError(f"{self.path}: the configuration entry is not JSON bytes")
        return decode_json(self.read(CONFIG_KEY, NPY_HEADER_BYTES + MAX_CONFIG_BYTES),
                           self.path)


def _not_a_file(path: str) -> str:
    """Why ``path``, something there that is not a regular file, cannot be read."""
    if os.path.isdir(path):
        return "is a folder, not a file; give the path of an .npz file (in it, say)"
    return "is not a regular file (a device or a pipe); give the path of an .npz file"


#: Other libraries' files by their first bytes: HDF5's signature (Keras' .h5 and .weights.h5
#: files), and the pickled magic number that begins a torch.save file of PyTorch before 1.6
#: (a later one is a zip: :func:`_foreign_zip`).
_FOREIGN_HEADS = {b"\x89HDF\r\n\x1a\n": "hdf5",
                  b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19": "torch"}
_TORCH_ENTRY = re.compile(r"[^/]+/data\.pkl")


def _foreign_zip(names: list[str]) -> str | None:
    """The kind of a zip whose entries are ``names``: "keras" for a Keras .keras file,
    "torch" for a PyTorch torch.save file (``<name>/data.pkl``, ``<name>/data/0``, ...), None
    for any other."""
    if "config.json" in names and ("metadata.json" in names or "model.weights.h5" in names):
        return "keras"
    return "torch" if any(_TORCH_ENTRY.fullmatch(name) for name in names) else None


def _foreign(path: str, kind: str) -> DataFormatError:
    """The refusal of another library's file, ``kind`` as :data:`_FOREIGN_HEADS` and
    :func:`_foreign_zip` name them, saying what it is and how to bring its weights over."""
    what, port = {
        "keras": ("a Keras .keras file", "load it in Keras and pass its get_weights()"),
        "hdf5": ("an HDF5 file (Keras' .h5 / .weights.h5)",
                 "load it in Keras and pass its get_weights()"),
        "torch": ("a PyTorch torch.save file", "pass its tensors, in Keras' layouts (a "
                                               "Linear's weight.T),"),
    }[kind]
    return DataFormatError(f"{path}: {what}; xpcnn reads only its own .npz files (those "
                           f"save, save_weights and checkpoints write): to port the weights, "
                           f"{port} to set_weights of an xpcnn model of the same layers")


def _entry_key(info: zipfile.ZipInfo, archive_size: int, path: str) -> str:
    """The array name of a zip entry, after checking its sizes against what the file can hold."""
    name = info.filename
    if not name.endswith(".npy") or info.is_dir():
        raise DataFormatError(f"{path}: entry {name!r} is not an array (.npy)")
    if info.flag_bits & 0x1:
        raise DataFormatError(f"{path}: entry {name!r} is encrypted")
    ratio = _METHODS.get(info.compress_type)
    if ratio is None:
        raise DataFormatError(f"{path}: entry {name!r} uses compression method "
                              f"{info.compress_type}; only stored or deflated entries are read")
    if info.compress_size > archive_size or info.file_size > ratio * info.compress_size + 64:
        raise DataFormatError(f"{path}: entry {name!r} claims {info.file_size} bytes from "
                              f"{info.compress_size} stored bytes in a {archive_size}-byte file")
    return name[:-4]


def _read_header(f: io.BytesIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise DataFormatError(f"{where}: .npy format version {version} is not supported")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        with warnings.catch_warnings():  # e.g. "created on Python 2": not a file we wrote
            warnings.simplefilter("error")
            shape, fortran, dtype = read_header(f)
    except DataFormatError:
        raise
    except Exception as e:  # numpy's header parser raises ValueError, TokenError, SyntaxError...
        raise DataFormatError(f"{where}: unreadable .npy header ({type(e).__name__}: {e})") from e
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataFormatError(f"{where}: arrays of dtype {dtype} are not accepted (only numbers)")
    if any(d < 0 for d in shape):
        raise DataFormatError(f"{where}: negative size in shape {shape}")
    return shape, fortran, dtype


def _parse_npy(data: bytes, where: str) -> np.ndarray:
    """One .npy image held in memory, checked before any array is made from it."""
    f = io.BytesIO(data)
    shape, fortran, dtype = _read_header(f, where)
    count = math.prod(shape)
    offset = f.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise DataFormatError(f"{where}: header says {dtype} {shape} ({count * dtype.itemsize} "
                              f"bytes) but {len(data) - offset} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr.copy()  # owns aligned, writable memory


def write_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that ``path`` is always either the old file or the complete new one
    (a symbolic link's target, the link kept: see :func:`~xpcnn.files.atomic_file`); the
    temporary files that killed writers of ``path`` left are removed after (each a full copy)."""
    with atomic_file(path) as f:
        np.savez(f, **arrays)
    remove_leftovers(path)
