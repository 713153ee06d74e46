"""CIFAR-10, "python version": pickled batches, read with a restricted unpickler.

The official archive ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1`` to
``data_batch_5``, ``test_batch`` and ``batches.meta``: protocol-2 pickles of dicts whose ``data`` is
a uint8 array of shape (N, 3072) (per row: the red plane, then green, then blue, each 32x32
row-major) and whose ``labels`` is a list of ints. A batch saved again by Python 3 (``pickle.dump``
at protocols 2 to 5) loads as the original does.

Unpickling can run arbitrary code, so these untrusted files are loaded by an unpickler that admits
only the few globals that a numpy array (and an empty bytes) needs, each wrapped so that it accepts
only the arguments (and the states) numpy itself writes. Members are read straight out of the tar,
never extracted, and only regular files at the expected names are used.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import pickletools
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFormatError, DownloadError
from .download import base_url_for, data_root, fetch, missing_files_message

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
#: Largest pickle accepted (an official batch is 31 MB); bigger members are refused unread.
MAX_MEMBER_BYTES = 200 * 2**20
_ROW = 3 * 32 * 32
_CHUNK = 1 << 20


# -- restricted unpickling ---------------------------------------------------------------------


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may receive it.

    Handing out the real class would let a pickle call ``numpy.ndarray(shape)`` with any shape,
    an allocation of the attacker's choosing.
    """


_NDARRAY = _NdarrayToken()
# Integer types only: an object dtype would let the array's state be arbitrary Python objects.
_DTYPES = frozenset(f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8))


def _clean_dtype(spec: Any) -> np.dtype:
    """A new dtype equal to ``spec``, a plain integer dtype the pickle made (:func:`_dtype`)
    and then set the state of, which must be as numpy writes it: numpy takes any flags there,
    "holds Python objects" too, and an array of such a dtype takes its bytes for references."""
    text = spec.str if isinstance(spec, np.dtype) else ""
    if text[:1] not in ("<", ">", "|") or text[1:] not in _DTYPES:
        raise DataFormatError(f"pickle makes an array of {spec!r}; only integer types allowed")
    clean = np.dtype(text)
    if spec.flags != clean.flags:
        raise DataFormatError(f"pickle sets the flags of numpy dtype {text!r} to {spec.flags}, "
                              f"which numpy writes as {clean.flags}")
    return clean


class _CheckedArray(np.ndarray):
    """What :func:`_reconstruct` makes: its ``__setstate__`` (the pickle's next step) takes raw
    bytes only, and a dtype of its own equal to the pickle's (see :func:`_clean_dtype`)."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise DataFormatError("pickle sets an array's state to something numpy never writes")
        *head, dtype, fortran, raw = state
        dtype = _clean_dtype(dtype)
        if type(raw) not in (bytes, bytearray):  # (a list: the object arrays' form)
            raise DataFormatError(f"pickle gives an array's data as a {type(raw).__name__}, "
                                  "expected bytes")
        super().__setstate__((*head, dtype, fortran, raw))


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """The checked stand-in for ``numpy.core.multiarray._reconstruct``.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by ``__setstate__``
    with the real shape, dtype and bytes (where numpy checks that they agree); so an empty array
    (a :class:`_CheckedArray`, which checks that state) is all this ever needs to make.
    """
    if subtype is not _NDARRAY:
        raise DataFormatError(f"pickle calls _reconstruct with {type(subtype).__name__}")
    if (
        not isinstance(shape, tuple)
        or not all(type(d) is int for d in shape)
        or 0 not in shape
    ):
        raise DataFormatError(f"pickle calls _reconstruct with shape {shape!r}, expected (0,)")
    if typecode not in (b"b", "b"):
        raise DataFormatError(f"pickle calls _reconstruct with type code {typecode!r}")
    return _CheckedArray(shape, dtype=np.int8)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
                ) -> np.ndarray:
    """The checked stand-in for ``numpy._core.numeric._frombuffer``: numpy pickles a contiguous
    array so from protocol 5 on, its bytes in the pickle (a view of them, no allocation)."""
    if type(buf) not in (bytes, bytearray):  # (in the pickle: an out-of-band one is refused)
        raise DataFormatError(f"pickle calls _frombuffer with a {type(buf).__name__}, expected "
                              "bytes")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise DataFormatError(f"pickle calls _frombuffer with shape {shape!r}")
    dtype = _clean_dtype(dtype)
    if len(buf) != math.prod(shape) * dtype.itemsize:
        raise DataFormatError(f"pickle calls _frombuffer with {len(buf)} bytes for shape "
                              f"{shape} of {dtype}")
    flat = np.frombuffer(buf, dtype=dtype)
    if order in ("C", "F") and axis_order is None:
        return flat.reshape(shape, order=order)
    # (newer numpy: an array contiguous with its axes in another order, ``shape`` theirs)
    if order == "K" and isinstance(axis_order, tuple) and all(
            type(a) is int for a in axis_order) and sorted(axis_order) == [*range(len(shape))]:
        return flat.reshape(shape).transpose(axis_order)
    raise DataFormatError(f"pickle calls _frombuffer with order {order!r}, axes {axis_order!r}")


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """The checked stand-in for ``numpy.dtype``: plain integer types only, always a fresh copy."""
    name = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
    if not isinstance(name, str) or name not in _DTYPES:
        raise DataFormatError(f"pickle asks for numpy dtype {spec!r}; only integer types allowed")
    # copy=True: the pickle goes on to call __setstate__ on this dtype, which must not be numpy's
    # shared singleton.
    return np.dtype(name, False, True)


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """The checked stand-in for ``_codecs.encode``: Python 3 writes it for bytes at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise DataFormatError("pickle calls _codecs.encode other than as str -> latin1 bytes")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """The checked stand-in for ``bytes``: Python 3 writes an empty bytes (an empty batch_label,
    an empty array's data) as ``__builtin__.bytes()`` at protocol 2. No argument is taken, so a
    pickle cannot ask for ``bytes(10**12)``, an allocation of its choosing."""
    if args:
        raise DataFormatError("pickle calls bytes with arguments; Python writes only bytes()")
    return b""


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _empty_bytes,  # (protocols 0 to 2)
    ("builtins", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``; every other one is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataFormatError(
                f"pickle refers to {module}.{name}, which a CIFAR batch never contains "
                "(refused: loading it could run arbitrary code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataFormatError("pickle uses persistent IDs, which a CIFAR batch never contains")


#: Most pickle opcodes accepted: an official batch has about 30,000, one written by Python 3
#: about 70,000. Bounds the work and the objects a hostile file can make us build.
MAX_OPCODES = 300_000
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan(data: bytes) -> None:
    """Walk the opcodes without executing them, before the real unpickler sees the data.

    CPython's C unpickler allocates what a (BIN)BYTES opcode or a memo index claims before it
    reads anything, so a 20-byte pickle can cost a gigabyte. Here every length is checked against
    the bytes that really remain (pickletools reads lazily), memo indices must count up as a
    pickler writes them, and the number of opcodes, hence of objects built, is bounded.
    """
    count = 0
    end = -1
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(data), start=1):
            if count > MAX_OPCODES:
                raise DataFormatError(
                    f"pickle has more than {MAX_OPCODES} opcodes; a CIFAR batch has far fewer"
                )
            if op.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg < count):
                raise DataFormatError(f"pickle stores memo entry {arg} at its opcode {count}")
            end = pos
    except DataFormatError:
        raise
    except Exception as e:
        # ValueError for unknown opcodes or lengths past the end of the data.
        raise DataFormatError(f"not a valid pickle ({e})") from e
    if end != len(data) - 1:
        raise DataFormatError("not a valid pickle (it does not end with its STOP opcode)")


def _unpickle(data: bytes, source: str) -> Any:
    try:
        _prescan(data)
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataFormatError as e:
        raise DataFormatError(f"{source}: {e}") from None
    except RecursionError as e:
        raise DataFormatError(f"{source}: pickle nested too deeply") from e
    except Exception as e:
        # UnpicklingError, EOFError on truncation, and whatever numpy raises for bad array state:
        # all mean a corrupt or hostile file.
        raise DataFormatError(f"{source}: not a valid pickle ({type(e).__name__}: {e})") from e


def parse_batch(
    data: bytes | bytearray | memoryview, *, source: str = "CIFAR batch"
) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one CIFAR-10 batch: returns uint8 images ``(N, 32, 32, 3)`` and int64 labels.

    Keys may be bytes or str. ``data`` must be a uint8 array of shape (N, 3072) or bytes of
    length N*3072, ``labels`` N integers in 0..9, N >= 1; otherwise ``DataFormatError`` naming
    ``source``.
    """
    if len(data) > MAX_MEMBER_BYTES:
        raise DataFormatError(
            f"{source}: {len(data)} bytes, more than the limit of {MAX_MEMBER_BYTES}"
        )
    obj = _unpickle(bytes(data), source)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{source}: pickle holds a {type(obj).__name__}, expected a dict")
    fields = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in ("data", "labels"):
        if key not in fields:
            raise DataFormatError(f"{source}: no {key!r} entry (keys: {sorted(map(str, fields))})")
    labels = _labels(fields["labels"], source)
    images = _images(fields["data"], len(labels), source)
    if not len(labels):  # (a valid pickle, but a split of no image fails far from its cause)
        raise DataFormatError(f"{source}: holds no images")
    # Each row is three 32x32 planes (CHW); the library works channels-last (HWC).
    return np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _labels(raw: Any, source: str) -> np.ndarray:
    if isinstance(raw, (list, tuple)):
        if not all(type(v) is int for v in raw):
            raise DataFormatError(f"{source}: labels must all be integers")
        if raw and not all(0 <= v <= 9 for v in raw):
            bad = next(i for i, v in enumerate(raw) if not 0 <= v <= 9)
            raise DataFormatError(
                f"{source}: label {raw[bad]} at index {bad} is out of range 0..9"
            )
        return np.array(raw, dtype=np.int64)
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise DataFormatError(
                f"{source}: labels are a {raw.dtype} array of shape {raw.shape}, expected 1-D "
                "integers"
            )
        labels = np.array(raw, dtype=np.int64)  # (a plain array: not _CheckedArray)
        bad = np.flatnonzero((labels < 0) | (labels > 9))
        if bad.size:
            i = int(bad[0])
            raise DataFormatError(f"{source}: label {labels[i]} at index {i} is out of range 0..9")
        return labels
    raise DataFormatError(f"{source}: labels are a {type(raw).__name__}, expected a list of ints")


def _images(raw: Any, n: int, source: str) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != _ROW:
            raise DataFormatError(
                f"{source}: data is a {raw.dtype} array of shape {raw.shape}, expected uint8 "
                f"(N, {_ROW})"
            )
        images = raw
    elif isinstance(raw, (bytes, bytearray)):
        if len(raw) % _ROW:
            raise DataFormatError(
                f"{source}: data is {len(raw)} bytes, not a whole number of {_ROW}-byte images"
            )
        images = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _ROW)
    else:
        raise DataFormatError(
            f"{source}: data is a {type(raw).__name__}, expected a uint8 array of shape (N, {_ROW})"
        )
    if len(images) != n:
        raise DataFormatError(f"{source}: {len(images)} images but {n} labels")
    return images


# -- finding and reading the batches -----------------------------------------------------------


def _batch_name(member: str) -> str | None:
    """``data_batch_1`` etc. for a member at exactly ``cifar-10-batches-py/<batch>``, else None."""
    name = member[2:] if member.startswith("./") else member
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == FOLDER_NAME and parts[1] in (*TRAIN_BATCHES, TEST_BATCH):
        return parts[1]
    return None


def _is_cifar_tar(path: Path) -> bool:
    """Whether a ``*.tar.gz`` starts with ``cifar-10-batches-py``, from its first header only."""
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False
    if first is None:
        return False
    name = first.name[2:] if first.name.startswith("./") else first.name
    return name.split("/")[0] == FOLDER_NAME


def _holds_batches(folder: Path, names: tuple[str, ...] = TRAIN_BATCHES) -> bool:
    return folder.is_dir() and any((folder / b).is_file() for b in names)


def _find(root: Path) -> Path | None:
    """The extracted folder, else root itself (that folder, given), holding a training batch;
    else an archive; else one of those folders holding only a test batch (read, so that the
    missing training batches are named). A stray test_batch never hides an archive beside it."""
    folders = (root / FOLDER_NAME, root)
    for folder in folders:
        if _holds_batches(folder):
            return folder
    archive = _archive(root)
    if archive is not None:
        return archive
    for folder in folders:  # (nothing else to read: its error names the missing batches)
        if _holds_batches(folder, (TEST_BATCH,)):
            return folder
    return None


def _archive(root: Path) -> Path | None:
    """The official archive in ``root``, else any tar.gz there whose contents are CIFAR-10's."""
    official = root / ARCHIVE_NAME
    if official.is_file():
        return official
    if root.is_dir():
        others = sorted(p for p in (*root.glob("*.tar.gz"), *root.glob("*.tgz")) if p.is_file())
        for path in others:
            if _is_cifar_tar(path):
                return path
    return None


Batch = tuple[np.ndarray, np.ndarray]


def _read_folder(folder: Path) -> dict[str, Batch]:
    found = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = folder / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise DataFormatError(f"{path}: {size} bytes, over the limit of {MAX_MEMBER_BYTES}")
        found[name] = parse_batch(path.read_bytes(), source=str(path))
    return found


def _read_tar(path: Path) -> dict[str, Batch]:
    """The parsed batch members of a ``.tar.gz``, read in one streaming pass, never extracted.

    Each member is parsed as soon as it is read, so only one raw pickle is held at a time.
    """
    found: dict[str, Batch] = {}
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                for member in tar:
                    name = _batch_name(member.name)
                    if name is None:
                        continue  # anything else (meta, odd or absolute paths) is never opened
                    where = f"{path}: member {member.name}"
                    if not member.isreg():
                        raise DataFormatError(f"{where} is not a regular file (a link?); refused")
                    if member.size > MAX_MEMBER_BYTES:
                        raise DataFormatError(
                            f"{where} is {member.size} bytes, more than the limit of "
                            f"{MAX_MEMBER_BYTES}"
                        )
                    if name in found:
                        raise DataFormatError(f"{where} appears twice in the archive")
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise DataFormatError(f"{where} is truncated")
                    found[name] = parse_batch(data, source=where)
            # The tar ends before the gzip stream does; reading to the end makes gzip check its
            # CRC, so a corrupted archive cannot pass unnoticed.
            while gz.read(_CHUNK):
                pass
    except DataFormatError:
        raise
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated archive ({e})") from e
    return found


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    base_url: str | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """CIFAR-10: ``(x_train, y_train), (x_test, y_test)``, uint8 ``(N, 32, 32, 3)``, int64 labels.

    Reads, from the data folder, the extracted ``cifar-10-batches-py/`` folder, else the batches
    at the top of the data folder (that folder itself, given), each where it holds a training
    batch, else ``cifar-10-python.tar.gz``, else any ``*.tar.gz`` whose contents start with
    ``cifar-10-batches-py/`` (a folder holding only ``test_batch`` is an error naming the
    missing training batches, where there is no archive). Whichever of
    ``data_batch_1`` to ``data_batch_5`` are present form the training set. **Where
    ``test_batch`` is absent the second pair is ``None``** (the caller holds out part of the
    training set instead). With nothing found, the official archive is
    downloaded when ``download`` is true; otherwise ``DownloadError`` says what to put where.
    ``base_url``: a mirror's folder URL to fetch from instead (see
    :data:`xpcnn.datasets.download.BASE_URLS`).
    """
    root = data_root(data_dir)
    source = _find(root)
    if source is None:
        url = base_url_for("cifar10", base_url)
        names = [ARCHIVE_NAME]
        also = f" (nor its extracted folder {FOLDER_NAME}/)"
        if not download:
            raise DownloadError(missing_files_message("CIFAR-10", names, root, url=url, also=also))
        try:
            fetch("cifar10", names, root, base_url)
        except DownloadError as e:
            raise DownloadError(
                missing_files_message("CIFAR-10", names, root, url=url, cause=str(e))
            ) from e
        source = root / ARCHIVE_NAME

    members = _read_folder(source) if source.is_dir() else _read_tar(source)
    train = [n for n in TRAIN_BATCHES if n in members]
    if not train:
        raise DataFormatError(
            f"{source} holds no training batch: expected "
            f"{'' if source.is_dir() else FOLDER_NAME + '/'}data_batch_1 "
            f"(to data_batch_5), found {sorted(members) or 'no batches'}"
        )
    if len(train) == 1:
        x_train, y_train = members[train[0]]
    else:
        x_train = np.concatenate([members[n][0] for n in train])
        y_train = np.concatenate([members[n][1] for n in train])
    return (x_train, y_train), members.get(TEST_BATCH)
