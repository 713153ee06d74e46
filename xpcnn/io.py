"""Model files: architecture as JSON and weights as arrays in one .npz, loaded without pickle.

Files from outside are untrusted: :func:`read_npz` never unpickles (arrays of Python objects are
refused outright, as ``np.load(..., allow_pickle=False)`` would), checks every size the zip
directory and the array headers claim against the bytes really there before allocating, and
reports every way a file can be wrong (not a zip, truncated, lying sizes, missing or misshapen
arrays, unknown layers, sizes a configuration cannot have) as a
:class:`~xpcnn.errors.DataFormatError`.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np

from . import distributed
from .backend import DeviceLike
from .errors import DataFormatError, InputError
from .layers.base import LAYER_TYPES
from .losses import SoftmaxCrossEntropy
from .model import Sequential
from .optim import optimizer_from_config

FORMAT = "xpcnn-model"
VERSION = 1
CONFIG_KEY = "__config__"


def model_config(model: Sequential) -> dict[str, Any]:
    """Everything but the weights: enough to rebuild the same model."""
    config: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "name": model.name, "seed": model.seed,
        "dtype": model.dtype_name, "input_shape": list(model.input_shape or []),
        "layers": [{"class": type(la).__name__, "config": la.get_config()}
                   for la in model.layers],
    }
    if model.loss is not None and model.optimizer is not None:
        config["compile"] = {"loss": model.loss.get_config(),
                             "optimizer": model.optimizer.get_config(),
                             "precision": model.precision}
    return config


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


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that ``path`` is always either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A leftover of a killed writer is recognisable: ".<name>.<random>.tmp" next to the file.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


#: Compression methods a member may use: what numpy writes (stored or deflated). Deflate cannot
#: expand data more than about 1032 times, which bounds what a small file can inflate to.
_METHODS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}
MAX_MEMBERS = 100_000


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, refusing pickled objects; every failure is a DataFormatError.

    The zip directory and each array's header are checked against the real sizes before anything
    is allocated, so a file that lies about its sizes costs no more memory than it really holds;
    only plain numeric arrays (bool, int, uint, float) are accepted, never Python objects.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such file")
    try:
        size = os.path.getsize(path)
        arrays: dict[str, np.ndarray] = {}
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > MAX_MEMBERS:
                raise DataFormatError(f"{path}: {len(members)} entries; not an xpcnn file")
            for info in members:
                key = _member_key(info, size, path)
                if key in arrays:
                    raise DataFormatError(f"{path}: entry {key!r} appears twice")
                arrays[key] = _parse_npy(zf.read(info), f"{path}: entry {key!r}")
        return arrays
    except DataFormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError,
            NotImplementedError, RuntimeError, zlib.error, OverflowError, IndexError,
            TypeError, RecursionError, struct.error) as e:
        raise DataFormatError(f"{path}: not a readable xpcnn .npz file ({type(e).__name__}: "
                              f"{e})") from e


def _member_key(info: zipfile.ZipInfo, archive_size: int, path: str) -> str:
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


def _parse_npy(data: bytes, where: str) -> np.ndarray:
    """One .npy image held in memory, checked before any array is made from it."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise DataFormatError(f"{where}: .npy format version {version} is not supported")
    try:
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        with warnings.catch_warnings():  # e.g. "created on Python 2": not a file we wrote
            warnings.simplefilter("error")
            shape, fortran, dtype = read_header(f)
    except Exception as e:  # numpy's header parser raises ValueError, TokenError, SyntaxError...
        raise DataFormatError(f"{where}: unreadable .npy header ({type(e).__name__}: {e})") from e
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataFormatError(f"{where}: arrays of dtype {dtype} are not accepted (only numbers)")
    if any(d < 0 for d in shape):
        raise DataFormatError(f"{where}: negative size in shape {shape}")
    count = math.prod(shape)
    offset = f.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise DataFormatError(f"{where}: header says {dtype} {shape} ({count * dtype.itemsize} "
                              f"bytes) but {len(data) - offset} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr.copy()  # owns aligned, writable memory


def save_model(model: Sequential, path: str) -> None:
    model._require_built("save")
    if not distributed.is_root():  # one writer: rank 0 (all ranks hold the same weights)
        return
    arrays = {CONFIG_KEY: encode_json(model_config(model))}
    for i, la in enumerate(model.layers):
        for j, w in enumerate(la.get_weights()):
            arrays[f"layer{i}.{j}"] = w
    write_npz_atomic(str(path), arrays)


#: The most values per sample (after padding) that a model file may make a layer take, 64 Mi
#: (4096 x 4096 x 4): a bigger claim is refused before any layer is built.
MAX_SAMPLE_VALUES = 2**26


def model_from_config(config: Any, path: str, device: DeviceLike = "cpu",
                      arrays: dict[str, np.ndarray] | None = None) -> Sequential:
    """Rebuild an (unweighted) model from :func:`model_config` output, checking every field.

    With the file's ``arrays``, each layer's weight count is checked against what the file holds
    before the layer is built, so a configuration that lies about sizes allocates nothing big.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not an xpcnn model file (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise DataFormatError(f"{path}: model format version {config.get('version')!r} is not "
                              f"supported (this xpcnn reads version {VERSION})")
    try:
        layers = []
        for spec in config["layers"]:
            cls = LAYER_TYPES.get(spec["class"])
            if cls is None or spec["class"].startswith("_"):
                raise DataFormatError(f"{path}: unknown layer type {spec['class']!r}")
            layers.append(cls(**spec["config"]))
        input_shape = config["input_shape"]
        if not isinstance(input_shape, list) or not all(
                type(d) is int and d > 0 for d in input_shape):
            raise DataFormatError(f"{path}: input_shape {input_shape!r} is not a list of sizes")
        check_sizes(layers, tuple(input_shape), arrays, path)
        model = Sequential(layers, device=device, seed=int(config["seed"]),
                           dtype=config["dtype"], name=str(config["name"]))
        model.build(tuple(input_shape))
        if "compile" in config:
            c = config["compile"]
            model.compile(SoftmaxCrossEntropy(**c["loss"]), optimizer_from_config(c["optimizer"]),
                          precision=c["precision"])
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    return model


def check_sizes(layers: list[Any], shape: tuple[int, ...], arrays: dict[str, np.ndarray] | None,
                 path: str) -> None:
    """Refuse, before building it, a layer that would allocate more than the file accounts for.

    Walks the layers on the host with trial builds: each layer's input (with its padding or
    window) must stay under :data:`MAX_SAMPLE_VALUES` values, and the weights a Dense, Conv2D or
    BatchNorm2D layer would create must number exactly the values stored for it.
    """
    for i, layer in enumerate(layers):
        window = max([*getattr(layer, "kernel_size", ()), *getattr(layer, "pool_size", ()), 0])
        pad = getattr(layer, "padding", 0)
        extra = 2 * max(window, pad if isinstance(pad, int) else 0)
        padded = (shape[0] + extra, shape[1] + extra, *shape[2:]) if len(shape) == 3 else shape
        if math.prod(padded) > MAX_SAMPLE_VALUES:
            raise DataFormatError(f"{path}: layer {i} ({type(layer).__name__}) would take inputs "
                                  f"of shape {shape}, more than {MAX_SAMPLE_VALUES} values per "
                                  "sample with its padding: the file is corrupt or not a model")
        need = _weight_count(layer, shape)
        if need is not None and arrays is not None:
            have = sum(int(a.size) for k, a in arrays.items() if k.startswith(f"layer{i}."))
            if need != have:
                raise DataFormatError(f"{path}: layer {i} ({type(layer).__name__}) needs {need} "
                                      f"weight values for inputs of shape {shape}, but the file "
                                      f"holds {have}")
        shape = layer.build(shape, "cpu", "float32", None, np.random.default_rng(0))


def _weight_count(layer: Any, shape: tuple[int, ...]) -> int | None:
    """How many weight values ``layer`` creates for per-sample ``shape`` (None: not known here;
    a wrong rank is left for the layer's own build to report)."""
    from .layers import BatchNorm2D, Conv2D, Dense

    if isinstance(layer, Dense):
        return shape[0] * layer.units + layer.units * layer.use_bias if len(shape) == 1 else None
    if isinstance(layer, Conv2D):
        if len(shape) != 3:
            return None
        kh, kw = layer.kernel_size
        return kh * kw * shape[2] * layer.filters + layer.filters * layer.use_bias
    if isinstance(layer, BatchNorm2D):
        return 4 * shape[-1]
    return 0 if not layer.weight_names else None


def load_model(path: str, device: DeviceLike = "cpu") -> Sequential:
    """Load a model written by :meth:`Sequential.save` onto ``device``.

    A checkpoint (:mod:`xpcnn.checkpoint`) loads too: its model, with the weights it holds.
    """
    path = str(path)
    arrays = read_npz(path)
    if CONFIG_KEY not in arrays:
        raise DataFormatError(f"{path}: not an xpcnn model file (no {CONFIG_KEY} entry)")
    config = decode_json(arrays[CONFIG_KEY], path)
    if isinstance(config, dict) and config.get("format") == "xpcnn-checkpoint":
        config = config.get("model")
    model = model_from_config(config, path, device, arrays)
    set_weights_from_file(model, arrays, path)
    return model


def set_weights_from_file(model: Sequential, arrays: dict[str, np.ndarray], path: str) -> None:
    """Give ``model`` the weights ``layer{i}.{j}`` of a model file or checkpoint."""
    weights = []
    for i, la in enumerate(model.layers):
        for j in range(len(la.get_weights())):
            key = f"layer{i}.{j}"
            if key not in arrays:
                raise DataFormatError(f"{path}: weight {key} of layer {la.name!r} is missing")
            weights.append(arrays[key])
    try:
        model.set_weights(weights)
    except InputError as e:
        raise DataFormatError(f"{path}: weights do not fit the architecture: {e}") from e
