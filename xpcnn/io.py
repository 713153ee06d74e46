"""Model files: architecture as JSON and weights as arrays in one .npz, loaded without pickle.

Files from outside are untrusted: ``np.load(..., allow_pickle=False)`` never runs code, and every
way a file can be wrong (not a zip, truncated, missing or misshapen arrays, unknown layers) is
reported as a :class:`~xpcnn.errors.DataFormatError`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(f"{path}: the configuration entry is not valid JSON ({e})") from e


def write_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that ``path`` is always either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
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


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, refusing pickled objects; every failure is a DataFormatError."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError,
            zipfile.LargeZipFile, NotImplementedError) as e:
        raise DataFormatError(f"{path}: not a readable xpcnn .npz file ({type(e).__name__}: "
                              f"{e})") from e


def save_model(model: Sequential, path: str) -> None:
    model._require_built("save")
    arrays = {CONFIG_KEY: encode_json(model_config(model))}
    for i, la in enumerate(model.layers):
        for j, w in enumerate(la.get_weights()):
            arrays[f"layer{i}.{j}"] = w
    write_npz_atomic(str(path), arrays)


def model_from_config(config: Any, path: str, device: DeviceLike = "cpu") -> Sequential:
    """Rebuild an (unweighted) model from :func:`model_config` output, checking every field."""
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
        model = Sequential(layers, device=device, seed=int(config["seed"]),
                           dtype=config["dtype"], name=str(config["name"]))
        model.build(tuple(config["input_shape"]))
        if "compile" in config:
            c = config["compile"]
            model.compile(SoftmaxCrossEntropy(**c["loss"]), optimizer_from_config(c["optimizer"]),
                          precision=c["precision"])
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    return model


def load_model(path: str, device: DeviceLike = "cpu") -> Sequential:
    """Load a model written by :meth:`Sequential.save` onto ``device``."""
    path = str(path)
    arrays = read_npz(path)
    if CONFIG_KEY not in arrays:
        raise DataFormatError(f"{path}: not an xpcnn model file (no {CONFIG_KEY} entry)")
    model = model_from_config(decode_json(arrays[CONFIG_KEY], path), path, device)
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
    return model
