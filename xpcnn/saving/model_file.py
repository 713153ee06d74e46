"""Model files: the architecture as JSON and the weights as arrays in one .npz, read without pickle.

A model is rebuilt from its file through two registries: the layers by class name
(:data:`~xpcnn.layers.base.LAYER_TYPES`; a user's also by the module and qualified name the file
records, :func:`layer_class`) and the model class by name (:data:`MODEL_TYPES`,
filled by :func:`register_model`), so nothing here imports the model module, which imports this.

Files from outside are untrusted. Before any array is inflated, every entry must be one the
architecture has a place for; each layer's weight count is checked against what the entries
claim before the layer is built, and each entry is then inflated under the cap its weight's
size implies (:class:`~xpcnn.saving.npz.NpzArchive`). Weights holding NaN or infinity, unknown
layers and sizes a configuration cannot have are all a :class:`~xpcnn.errors.DataFormatError`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from .. import checks, distributed
from ..backend import PRECISIONS, DeviceLike, precision_dtype
from ..errors import DataFormatError, InputError, NonFiniteError, of_xpcnn, warn
from ..files import written_file
from ..graph import Inbound, check_graph, inbound_of, weight_count
from ..layers import Normalization
from ..layers.arguments import rebuilding
from ..layers.base import LAYER_TYPES, Layer, setting_names
from ..losses import SoftmaxCrossEntropy, loss_from_config
from ..metrics import metric_from_config
from ..ops.windows import resolve_padding
from ..optim import Optimizer, Schedule, optimizer_from_config
from ..structure import check_structure
from ..totals import INITIAL_SCALE, SCALE_RANGE
from .npz import (
    CONFIG_KEY,
    MAX_CONFIG_BYTES,
    NpzArchive,
    array_bytes,
    encode_json,
    write_npz_atomic,
)

FORMAT = "xpcnn-model"
VERSION = 1
CHECKPOINT_FORMAT = "xpcnn-checkpoint"
#: The checkpoint versions this xpcnn reads (:mod:`.checkpoint` writes the last).
CHECKPOINT_VERSIONS = (1, 2)  # 2: optimiser slots in Keras' layout, one per trainable parameter

#: Model classes a file may name, by class name (see :func:`register_model`).
MODEL_TYPES: dict[str, type] = {}

#: The most values per sample (after padding) that a model file may make a layer take or give,
#: 2 Gi (8 GB of float32 a sample: beyond any real model): a bigger claim is refused before any
#: layer is built, and saving refuses a model that has one (its file would not load).
MAX_SAMPLE_VALUES = 2**31


def register_model(cls: type) -> type:
    """Class decorator: files may name ``cls`` (by its class name) as the model to rebuild.

    The class is constructed as ``cls.from_config(config, layers, device)`` (``config`` as its
    ``get_config()`` wrote it, ``layers`` made from it), then built for the file's input shape
    and compiled with its settings. A subclass of ``xpcnn.Model`` (``Sequential``'s included)
    is registered when it is defined (``Model.__init_subclass__``), as layers are: by its class
    name, which may not be one of xpcnn's own models'."""
    checks.register(MODEL_TYPES, cls, "model")
    return cls


# -- writing ----------------------------------------------------------------------------------

#: The endings of Keras' file names (``.keras``; ``.h5`` and ``.weights.h5``; ``.hdf5``).
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: The endings PyTorch's examples give torch.save's files (``mnist_cnn.pt``, ``model.pth``).
TORCH_SUFFIXES = (".pt", ".pth")


def refuse_foreign_suffix(path: str, what: str) -> None:
    """Refuse a file of xpcnn's writers named as Keras or PyTorch names its files (``what``:
    the file, as errors name it): was written as xpcnn's .npz, silently, which Keras (or
    torch.load) then fails to read. Checked before any work. Any other name is taken, as it
    always was."""
    lower = path.lower()
    suffix = next((s for s in (*KERAS_SUFFIXES, *TORCH_SUFFIXES) if lower.endswith(s)), None)
    if suffix is None:
        return
    stem, suffix = path[:-len(suffix)], path[-len(suffix):]
    way = f"give a name ending in .npz ({stem + '.npz'!r}, say) or any other name"
    if suffix.lower() in TORCH_SUFFIXES:
        raise InputError(f"{what} {path!r} ends in {suffix!r}, as torch.save's files are "
                         "named: xpcnn writes its own .npz files, which torch.load does not "
                         "read (xpcnn's load_model, load_weights and load_checkpoint do); "
                         f"{way}. For PyTorch, convert get_weights() (Keras' layouts) and "
                         "torch.save them yourself")
    raise InputError(f"{what} {path!r} ends in {suffix!r}, as Keras' files are named: xpcnn "
                     f"writes its own .npz files, which Keras does not read; {way}")


def check_save_keywords(call: str, path: Any, overwrite: Any, zipped: Any = None,
                        max_shard_size: Any = None) -> None:
    """Before ``save`` or ``save_weights`` (``call``) does any work: ``path`` not named as
    Keras' or PyTorch's files are (:func:`refuse_foreign_suffix`), and Keras 3's keywords
    taken at the values that mean what xpcnn's writers do, other values refused naming what
    they do (was: a bare TypeError at Keras' defaults too)."""
    what = "the weights file" if call == "save_weights" else "the model file"
    refuse_foreign_suffix(checks.file_path(path, what), what)
    if not checks.flag(overwrite, f"{call}'s overwrite") and os.path.lexists(path):
        # (Keras asks on the terminal before replacing a file: no prompt in xpcnn)
        raise InputError(f"{call}(overwrite=False): Keras then asks before replacing a file; "
                         f"xpcnn's {call} always replaces it, atomically (a reader never sees "
                         "half a file): to keep a file, check os.path.exists(path) first, or "
                         "give another path; leave overwrite out")
    if zipped is not None and not checks.flag(zipped, f"{call}'s zipped"):
        raise InputError(f"{call}(zipped=False): Keras' folder form; xpcnn writes one .npz "
                         "file (a zip archive); leave zipped out")
    if max_shard_size is not None:
        raise InputError(f"{call}(max_shard_size={max_shard_size!r}): xpcnn writes the weights "
                         "as one file, never sharded; leave max_shard_size out")


def check_skip_mismatch(skip_mismatch: Any) -> None:
    """Keras' ``load_weights(skip_mismatch=...)``: False (its default) is what xpcnn does."""
    if checks.flag(skip_mismatch, "load_weights' skip_mismatch"):
        raise InputError("load_weights(skip_mismatch=True): xpcnn's load_weights loads every "
                         "layer or none, refusing a file of other layers or shapes; to take "
                         "the layers that match, load the file's model and copy them by name: "
                         "model.get_layer(name).set_weights(xpcnn.load_model(path)"
                         ".get_layer(name).get_weights())")


def _found_by_name(name: Any, cls: Any) -> bool:
    """Whether ``cls`` is a class that xpcnn finds by ``name`` without being given it (a
    subclass of its Layer, Optimizer, Schedule, SoftmaxCrossEntropy or a registered model,
    registered as it is defined): Keras' ``custom_objects`` for it says nothing more."""
    return isinstance(cls, type) and cls.__name__ == name and (
        issubclass(cls, Layer | Optimizer | Schedule | SoftmaxCrossEntropy)
        or MODEL_TYPES.get(name) is cls)


def _check_load_keywords(custom_objects: Any, safe_mode: Any) -> None:
    """Keras 3's keywords of ``load_model``, taken at the values that mean what xpcnn does,
    other values refused naming what it does (was: a bare TypeError at Keras' defaults too)."""
    if custom_objects is not None and not (isinstance(custom_objects, dict) and all(
            _found_by_name(name, cls) for name, cls in custom_objects.items())):
        raise InputError(f"load_model(custom_objects={custom_objects!r}): xpcnn finds the "
                         "classes a file names by their names, each registered where it is "
                         "defined (a subclass of xpcnn's Layer, Model, Optimizer, Schedule or "
                         "SoftmaxCrossEntropy): define or import them before load_model and "
                         "leave custom_objects out (a function, Keras' custom loss or "
                         "activation, has no place in an xpcnn model)")
    if not checks.flag(safe_mode, "load_model's safe_mode"):
        raise InputError("load_model(safe_mode=False): Keras' permission to run code that a "
                         "file holds (a Lambda layer's); xpcnn's files hold none, and load "
                         "without pickle: leave safe_mode out")


def model_config(model: Any, compiled: bool = True, checked: bool = True) -> dict[str, Any]:
    """Everything but the weights: enough to rebuild the same model (without its compile
    settings where ``compiled`` is False). ``checked`` (to write it; not to compare it with a
    file's): InputError where a user's layer, optimiser or schedule takes settings its
    get_config() does not give."""
    if checked:
        check_model_class(type(model), model)
        for layer in model.layers:
            layer.check_config()
        if getattr(model, "built", False):  # (a setting changed since its build: a softmax
            check_structure(model.layers)  # activation moved before the end, say)
        check_sample_sizes(model)
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION, **model.get_config()}
    record_layer_classes(config, model.layers, checked)
    if compiled and model.loss is not None and model.optimizer is not None:
        if checked:
            model.loss.check_config()
            model.optimizer.check_config()
        config["compile"] = {"loss": model.loss.get_config(),
                             "optimizer": model.optimizer.compile_config(),
                             "precision": model.precision,
                             # (names, as before top-k metrics; a dict where one has
                             # another k or name: xpcnn.metrics.Metric.get_config)
                             "metrics": [m.get_config() for m in model._metric_objects]}
    return config


def class_record(cls: type) -> tuple[str, str] | None:
    """What tells a user's layer class from another of its name: its module and qualified
    name (as Keras' ``module`` and ``registered_name``); None for xpcnn's own, whose names are
    theirs alone."""
    return None if of_xpcnn(cls.__module__) else (cls.__module__, cls.__qualname__)


def _shown(record: tuple[str, str]) -> str:
    return f"{record[0]}.{record[1]}"


def record_layer_classes(config: dict[str, Any], layers: list[Layer], checked: bool) -> None:
    """Add to each user's layer's spec in ``config`` its class's module and qualified name:
    files name a layer by its class's ``__name__``, which two classes of a user's may share
    (``blocks.Gate`` and ``heads.Gate``); the file then loads each as itself
    (:func:`layer_class`). ``checked`` (to write a file): InputError where two distinct classes
    of the model have the same module and qualified name too (made by one function called twice),
    which no file could tell apart."""
    specs = config.get("layers")
    if not (isinstance(specs, list) and len(specs) == len(layers)):
        return  # (a user's model get_config of its own making: its layers as it gives them)
    seen: dict[tuple[str, str, str], tuple[int, type]] = {}
    for i, (spec, la) in enumerate(zip(specs, layers, strict=True)):
        cls = type(la)
        record = class_record(cls)
        if record is None or not isinstance(spec, dict) or spec.get("class") != cls.__name__:
            continue
        first = seen.setdefault((cls.__name__, *record), (i, cls))
        if checked and first[1] is not cls:
            raise InputError(f"layers {first[0]} and {i} are of two distinct classes, both "
                             f"{_shown(record)} (a class made again, by a function called twice "
                             "or a notebook cell run again): a file names a layer by its class's "
                             "module and name, so it could not tell them apart; give them "
                             "distinct names, or make the model again from one of them")
        spec["module"], spec["qualname"] = record


def _base_model_class(cls: type) -> type | None:
    """The nearest of xpcnn's own model classes (Sequential, Model) that ``cls`` subclasses
    (None for a stand-in of a model that is none)."""
    return next((c for c in cls.__mro__ if c in MODEL_TYPES.values()
                 and c.__module__.startswith("xpcnn.")), None)


def _defines(cls: type, base: type, method: str) -> bool:
    """Whether a class between ``cls`` and ``base`` (a user's) defines ``method``."""
    return any(method in vars(c) for c in cls.__mro__[:cls.__mro__.index(base)])


def check_model_class(cls: type, model: Any = None) -> None:
    """Refuse to save a model whose class (a user's subclass) ``from_config`` cannot rebuild:
    its constructor takes named parameters that its xpcnn base's does not (``get_config`` does
    not give them: the file would load them with their defaults, or not at all), or cannot take
    the call its base's ``from_config`` makes; unless the class defines its own ``get_config``
    and ``from_config``, as Keras asks of a model subclass. ``model`` (of ``cls``): its
    ``get_config()`` is read for the message."""
    base = _base_model_class(cls)
    if base is None or cls is base or (_defines(cls, base, "get_config")
                                       and _defines(cls, base, "from_config")):
        return
    init = cls.__init__
    taken = [p for p in checks.named_parameters(init)
             if p not in checks.named_parameters(base.__init__)]
    if not taken:
        # (the call of the base's from_config: Sequential passes the layers first)
        args = ([],) if issubclass(base, MODEL_TYPES["Sequential"]) else ()
        try:
            inspect.signature(init).bind(None, *args, device="cpu", seed=0, dtype="float32",
                                         name="model")
            return
        except TypeError as e:
            why = (f"its constructor cannot take what {base.__name__}.from_config passes "
                   f"({'the layers, then ' if args else ''}device, seed, dtype and name by "
                   f"keyword: {e})")
    elif _defines(cls, base, "get_config"):  # (Keras' contract half kept: name the other half)
        given = _config_keys(model)
        gives = "gives them" if given is not None and all(p in given for p in taken) else \
            "is its own"
        why = (f"its constructor takes {taken}, which {base.__name__}'s does not; its "
               f"get_config() {gives}, but the from_config it inherits from {base.__name__} "
               "passes only the layers, device, seed, dtype and name on")
    else:
        why = (f"its constructor takes {taken}, which {base.__name__}'s does not and its "
               "get_config() does not give")
    fix = ("" if _defines(cls, base, "get_config") else
           "get_config() (returning them, with super().get_config()) and ")
    raise InputError(f"model class {cls.__name__} cannot be saved: {why}, so a saved model "
                     f"would not load as it is; define {fix}a classmethod from_config(config, "
                     "layers, device) that makes the model from them, as Keras asks of a model "
                     "subclass")


def _config_keys(model: Any) -> list[str] | None:
    """The keys ``model.get_config()`` gives; None where there is no model, or its get_config
    fails or gives no dict (the refusal that asks for this is said whatever it is)."""
    try:
        config = None if model is None else model.get_config()
    except Exception:  # (a user's get_config, its own faults: the refusal stands without it)
        return None
    return list(config) if isinstance(config, dict) else None


def compile_settings(compiled: Any) -> Any:
    """A file's compile settings; files written before models could be compiled without
    metrics have none, and meant accuracy."""
    return {"metrics": ["accuracy"], **compiled} if isinstance(compiled, dict) else compiled


def weight_arrays(model: Any, refusal: Callable[[Layer, str], str]) -> dict[str, np.ndarray]:
    """Every layer's weights as the entries ``layer{i}.{j}`` of a model file or checkpoint,
    checked on the host copies: ``NonFiniteError(refusal(layer, weight name))`` for the first
    that holds NaN or infinity (so that nothing is written)."""
    arrays = {}
    for i, la in enumerate(model.layers):
        for j, (name, w) in enumerate(zip(la.present_weight_names(), la.get_weights(),
                                          strict=True)):
            if not np.all(np.isfinite(w)):
                raise NonFiniteError(refusal(la, name))
            arrays[f"layer{i}.{j}"] = w
    return arrays


def save_model(model: Any, path: str | os.PathLike[str], weights_only: bool = False) -> None:
    """Write ``model``'s architecture, compile settings and weights to ``path``, atomically;
    ``weights_only`` (``Model.save_weights``): without the compile settings, the file of an
    uncompiled model (the architecture stays: ``load_weights`` checks it). On several ranks,
    rank 0 writes; another rank that calls it too returns once rank 0 has (or raises where
    it failed), and rank 0 alone may call it (see :func:`xpcnn.distributed.write_on_root`)."""
    what = "the weights file" if weights_only else "the model file"
    path = checks.file_path(path, what)
    refuse_foreign_suffix(path, what)
    model._require_built("save_weights" if weights_only else "save")

    def refusal(layer: Layer, weight: str) -> str:
        return (f"the weights of layer {layer.name!r} ({weight}) hold NaN or infinity: {path} "
                "was not written")

    def write() -> None:
        target = written_file(checks.output_file(path, what))
        config = model_config(model, compiled=not weights_only)
        if "compile" in config:
            # (the rate a callback or the user set, and the schedule's place, as Keras' file
            # keeps the learning rate and the step count; the loaded rate is the one saved; a
            # checkpoint keeps them with the rest of the optimiser's state)
            opt = model.optimizer
            if opt.lr_factor != 1.0:
                config["compile"]["lr_factor"] = float(opt.lr_factor)
            if opt.iterations:
                config["compile"]["iterations"] = int(opt.iterations)
            # (mixed_float16's dynamic loss scale, as Keras' file keeps its LossScaleOptimizer's:
            # loaded afresh, the next steps overflowed again until it came back down)
            scale, good = model.loss_scale, model._good_steps
            if (scale, good) != (INITIAL_SCALE, 0) and model.precision == "mixed_float16":
                config["compile"]["loss_scale"] = float(scale)
                config["compile"]["good_steps"] = int(good)
        arrays = {CONFIG_KEY: config_entry(config, f"{path} was not written"),
                  **weight_arrays(model, refusal)}
        write_npz_atomic(target, arrays)

    # one writer, rank 0 (all ranks hold the same weights); the others calling wait for it
    distributed.write_on_root(write, path)


def config_entry(config: dict[str, Any], refused: str) -> np.ndarray:
    """``config`` (a model file's, or a checkpoint's with its model under ``"model"``) as the
    JSON entry of the file; InputError, starting with ``refused``, where it is longer than the
    reader takes (:data:`~xpcnn.saving.npz.MAX_CONFIG_BYTES`): written, the file would not
    load. The error names the largest part (a layer's settings, or a checkpoint's history)."""
    try:
        entry = encode_json(config)
    except (TypeError, ValueError) as e:  # (a user's class holding an array in its settings)
        raise InputError(f"{refused}: {_unwritable_part(config)} cannot be written as JSON "
                         f"({e}): the settings of a user's layer (get_config), optimiser or "
                         "schedule must be Python numbers (float(x) for a NumPy one), strings, "
                         "lists and dicts") from e
    if entry.size <= MAX_CONFIG_BYTES:
        return entry
    model = config.get("model", config)
    parts = {f"layer {i} ({spec['class']})'s settings": len(json.dumps(spec))
             for i, spec in enumerate(model["layers"])}
    if "history" in config:
        parts["the history"] = len(json.dumps(config["history"]))
    part = max(parts, key=parts.__getitem__)
    hint = (" (a Normalization given its mean and std holds them there, a value per feature; "
            "an adapted one, Normalization().adapt(x), holds them as weights, saved as arrays "
            "of any size)" if "(Normalization)" in part else "")
    raise InputError(f"{refused}: its configuration takes {entry.size} bytes as JSON, more than "
                     f"the {MAX_CONFIG_BYTES} that loading a file accepts; the largest part is "
                     f"{part}, {parts[part]} bytes{hint}")


def _unwritable_part(config: dict[str, Any]) -> str:
    """The first part of ``config`` that JSON cannot hold: a layer's settings, or the
    optimiser's (its schedule's included)."""
    model = config.get("model", config)
    parts = [(f"layer {i} ({spec['class']})'s settings", spec)
             for i, spec in enumerate(model.get("layers", []))]
    optimizer = (model.get("compile") or {}).get("optimizer")
    if optimizer is not None:
        parts.append((f"the optimizer's settings ({optimizer.get('class')})", optimizer))
    for what, part in parts:
        try:
            json.dumps(part)
        except (TypeError, ValueError):
            return what
    return "its configuration"


# -- reading ----------------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str], device: DeviceLike = "cpu",
               compile: bool = True, *, custom_objects: dict[str, Any] | None = None,
               safe_mode: bool = True) -> Any:
    """Load a model written by ``Model.save`` onto ``device``.

    A checkpoint (:mod:`xpcnn.saving.checkpoint`) loads too: its model, with the weights it
    holds and the learning rate and step count it was at (as a model file keeps them); so does
    a file of ``Model.save_weights``, which holds the architecture: its model uncompiled.
    ``compile=False`` (as in Keras) leaves the model uncompiled whatever the file holds: its
    compile settings and optimiser state are not read (a user's optimiser or schedule class
    need not be defined), and ``fit`` asks for ``compile`` first. Keras'
    ``custom_objects=None`` (or ``{}``) and ``safe_mode=True`` are taken: a file's classes are
    found by name where they are defined, and no file holds code; other values are refused,
    saying so.
    """
    _check_load_keywords(custom_objects, safe_mode)
    compile = checks.flag(compile, "compile")
    with NpzArchive(path, "the model file") as npz:
        raw = npz.read_config()
        config, checkpoint = model_of_file(raw, npz.path)
        if not compile and isinstance(config, dict):
            config = {k: v for k, v in config.items() if k != "compile"}
        state = raw.get("optimizer") if checkpoint else None
        kept = {k: state[k] for k in ("lr_factor", "iterations") if k in state} \
            if isinstance(state, dict) else {}
        if checkpoint:  # (its loss scale too, kept beside the optimiser's state there)
            kept.update({k: raw[k] for k in ("loss_scale", "good_steps") if k in raw})
        if kept and isinstance(config, dict) and isinstance(
                config.get("compile"), dict):  # (checked there as a model file's)
            config = {**config, "compile": {**config["compile"], **kept}}
        return model_from_file(config, npz, device, with_slots=checkpoint)


def model_of_file(config: Any, path: str) -> tuple[Any, bool]:
    """The model configuration of a model file's or checkpoint's JSON ``config``, and whether
    the file is a checkpoint (its version checked: the model is read from it too)."""
    if not (isinstance(config, dict) and config.get("format") == CHECKPOINT_FORMAT):
        return config, False
    check_checkpoint_version(config, path)
    return config.get("model"), True


def check_checkpoint_version(config: dict[str, Any], path: str) -> None:
    version = config.get("version")
    if type(version) is not int or version not in CHECKPOINT_VERSIONS:
        known = " and ".join(map(str, CHECKPOINT_VERSIONS))
        raise DataFormatError(f"{path}: checkpoint version {version!r} is not supported (this "
                              f"xpcnn reads versions {known})")


def model_from_file(config: Any, npz: NpzArchive, device: DeviceLike = "cpu",
                    with_slots: bool = False) -> Any:
    """Rebuild, compile and fill the model that ``config`` describes from the file ``npz``.

    ``with_slots``: the file is a checkpoint, whose optimiser slots are allowed (not read here).
    Every field is checked; the file's entries are checked against the architecture before any
    is inflated, and each layer's weight count before the layer is built.
    """
    path = npz.path
    layers, input_shape = layers_from_config(config, path)
    try:
        cls = MODEL_TYPES.get(config.get("class", "Sequential"))
        if cls is None:
            raise DataFormatError(_undefined(path, "model", config.get("class"), None))
        compiled = compile_settings(config.get("compile"))
        loss = optimizer = None
        if compiled is not None:
            if not isinstance(compiled["metrics"], list):  # (compile takes a name too)
                raise DataFormatError(f"{path}: invalid model configuration: compile metrics is "
                                      f"{compiled['metrics']!r}, expected a list of names such "
                                      "as ['accuracy']")
            metrics = [metric_from_config(m) for m in compiled["metrics"]]
            loss = loss_from_config(compiled["loss"])
            optimizer = optimizer_from_config(compiled["optimizer"])
        # (a checkpoint loaded uncompiled: its optimiser is not read, nor are its slots)
        slots = None if optimizer is None else optimizer.slot_names
        check_entries(npz, layers, slots if with_slots else ())
        check_sizes(layers, input_shape, npz, graph_of(config, layers, path))
        with checks.warned_shape():  # (a channels-first shape was warned of when declared)
            model = _rebuilt(cls, config, layers, device)
            model.build((None, *input_shape))
        if compiled is not None:
            if PRECISIONS.get(compiled["precision"]) is not None:  # (the way out named)
                precision_dtype(model.backend, compiled["precision"], f"{path} is compiled "
                                "in it; load_model(path, device=..., compile=False) loads it "
                                "uncompiled (then compile it in 'float32' there)")
            model.compile(loss=loss, optimizer=optimizer, metrics=metrics,
                          precision=compiled["precision"])
            # (each written where it is not 1 or 0; files before iterations was: step 0)
            factor, iterations = compiled.get("lr_factor", 1.0), compiled.get("iterations", 0)
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not (
                    0 <= factor < math.inf):
                raise DataFormatError(f"{path}: invalid model configuration: compile lr_factor "
                                      f"is {factor!r}, expected a finite number >= 0")
            if type(iterations) is not int or iterations < 0:
                raise DataFormatError(f"{path}: invalid model configuration: compile iterations "
                                      f"is {iterations!r}, expected a whole number >= 0")
            model.optimizer.iterations, model.optimizer.lr_factor = iterations, float(factor)
            model.loss_scale, model._good_steps = _loss_scale(compiled, model.precision, path)
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        if getattr(e, "model_class_refused", False):  # (the user's class, not the file)
            raise
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    set_weights_from_file(model, npz)
    return model


def loss_scale_problem(scale: Any) -> str:
    """Why ``scale`` is no float16 loss scale a file (a model file's, a checkpoint's) may
    hold; "" where it is one."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]):
        return (f"expected a number from {SCALE_RANGE[0]:.4g} to {SCALE_RANGE[1]:.4g} (it is "
                "held in float32: beyond, it would become infinity or 0)")
    return ""


def _loss_scale(compiled: dict[str, Any], precision: str, path: str) -> tuple[float, int]:
    """The float16 loss scale of a file's compile settings and its count of good steps,
    checked; a fresh scale's where the file has none (written where it is not, and before
    files kept it)."""
    fresh = INITIAL_SCALE if precision == "mixed_float16" else 1.0
    scale, good = compiled.get("loss_scale", fresh), compiled.get("good_steps", 0)
    problem = loss_scale_problem(scale)
    if problem:
        raise DataFormatError(f"{path}: invalid model configuration: compile loss_scale is "
                              f"{scale!r}, {problem}")
    if type(good) is not int or good < 0:
        raise DataFormatError(f"{path}: invalid model configuration: compile good_steps is "
                              f"{good!r}, expected a whole number >= 0")
    if precision != "mixed_float16" and (scale, good) != (1, 0):
        raise DataFormatError(f"{path}: invalid model configuration: compile loss_scale "
                              f"{scale!r} (good_steps {good!r}) in a model without float16 "
                              f"loss scaling (its precision is {precision!r}, not "
                              "mixed_float16): expected 1 (and 0)")
    return float(scale), good


def _rebuilt(cls: type, config: dict[str, Any], layers: list[Layer], device: DeviceLike
             ) -> Any:
    """``cls.from_config(config, layers, device)``; where a user's class refuses what it passes
    (a constructor of other parameters), an error naming the class and saying so."""
    if cls.__module__.startswith("xpcnn."):
        return cls.from_config(config, layers, device)
    try:
        return cls.from_config(config, layers, device)
    except (TypeError, InputError) as e:
        error = InputError(f"model class {cls.__name__} cannot be rebuilt from the file: its "
                           f"constructor does not take what {cls.__name__}.from_config passes "
                           f"({type(e).__name__}: {e}); define get_config() and a classmethod "
                           "from_config(config, layers, device) for it, as Keras asks of a "
                           "model subclass")
        error.model_class_refused = True  # type: ignore[attr-defined]
        raise error from e


def layers_from_config(config: Any, path: str) -> tuple[list[Layer], tuple[int, ...]]:
    """The (unbuilt) layers and the input shape of a model configuration, every field checked."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not an xpcnn model file (format is not {FORMAT!r})")
    version = config.get("version")
    if type(version) is not int or version != VERSION:  # (not 1.0, nor true)
        raise DataFormatError(f"{path}: model format version {version!r} is not supported "
                              f"(this xpcnn reads version {VERSION})")
    check_model_fields(config, path)
    specs = config.get("layers")
    if not isinstance(specs, list):
        raise DataFormatError(f"{path}: invalid model configuration: layers is a "
                              f"{type(specs).__name__}, expected a list of layers")
    try:
        layers = []
        for i, spec in enumerate(specs):
            if not (isinstance(spec, dict) and isinstance(spec.get("class"), str)
                    and isinstance(spec.get("config"), dict)):
                raise DataFormatError(f"{path}: invalid model configuration: layer {i} is not "
                                      "a dict of its 'class' (a name) and 'config' (a dict)")
            cls = layer_class(spec, i, specs, path)
            trainable = spec.get("trainable", True)  # (written only where False)
            if not isinstance(trainable, bool):
                raise DataFormatError(f"{path}: invalid model configuration: layer {i}'s "
                                      f"trainable is {trainable!r}, expected true or false")
            with rebuilding():  # (by its from_config, which a user's class may override)
                layers.append(cls.from_config(spec["config"]))
            layers[-1].trainable = trainable
            # (the file's names are kept as they are where they can be, but give way as
            # automatic ones do: two trained models, each with its 'dense', can be joined)
            layers[-1].name_given = False
    except DataFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    return layers, input_shape_of(config, path)


def _record_of(spec: dict[str, Any], i: int, path: str) -> tuple[str, str] | None:
    """The module and qualified name a layer ``spec`` records for its class (None in a file
    written before they were, or of one of xpcnn's layers)."""
    module, qualname = spec.get("module"), spec.get("qualname")
    if module is None and qualname is None:
        return None
    if not (isinstance(module, str) and isinstance(qualname, str)):
        raise DataFormatError(f"{path}: invalid model configuration: layer {i}'s class is "
                              f"recorded as module {module!r}, qualname {qualname!r}, expected "
                              "two strings")
    return module, qualname


def _user_layer_classes(name: str) -> list[type[Layer]]:
    """The user's layer classes named ``name`` defined in this process (the registry keeps
    only the last of a name)."""
    found, todo = [], [Layer]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__name__ == name and class_record(sub) is not None:
                found.append(sub)
    return found


def _same_place(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether records ``a`` and ``b`` name one class: the same module and qualified name, or
    the same qualified name where one is a script's (``__main__``), which another script
    imports by its module's name."""
    return a == b or (a[1] == b[1] and "__main__" in (a[0], b[0]))


def layer_class(spec: dict[str, Any], i: int, specs: list[Any], path: str) -> type[Layer]:
    """The class that the file's layer ``i`` (``spec``, of all the layers' ``specs``) is of:
    by its class name, among a user's classes of that name the one of the module and qualified
    name the file records (:func:`record_layer_classes`), so that two of one name each load as
    themselves. The file's class not defined here under that name (it moved to another module,
    say): the one of its name that is, with a warning, unless the file holds another class of
    that name, which it might be (a DataFormatError then)."""
    name = spec["class"]
    # (any name a class registers under: xpcnn's base classes, without a forward of their
    # own, are not registered; a user's "_Scale" is, and loads)
    registered = LAYER_TYPES.get(name)
    record = _record_of(spec, i, path)
    if record is None or (registered is not None and class_record(registered) in (None, record)):
        if registered is None:
            raise DataFormatError(_undefined(path, "layer", name, record))
        return registered
    same = [c for c in _user_layer_classes(name) if class_record(c) == record]
    if same:
        return same[-1]  # (the last defined: a notebook cell run again)
    theirs = None if registered is None else class_record(registered)
    if registered is None or theirs is None:  # (xpcnn's own were taken above)
        raise DataFormatError(_undefined(path, "layer", name, record))
    others = {r for k, s in enumerate(specs) if isinstance(s, dict) and s.get("class") == name
              for r in [_record_of(s, k, path)] if r is not None and r != record}
    if others:
        raise DataFormatError(
            f"{path}: layer {i} is of class {_shown(record)}, which is not defined here, and the "
            f"file holds other classes named {name!r} too ({', '.join(map(_shown, others))}), "
            f"so {_shown(theirs)}, the class of that name here, cannot stand in for it: define "
            f"(or import) {_shown(record)} before loading the file")
    if not _same_place(record, theirs):
        warn(f"{path}: layer {i} was saved as a {_shown(record)}, which is not defined here; it "
             f"loads as a {_shown(theirs)}, the layer class named {name!r} here (define or "
             f"import {_shown(record)} first where that is another class)", UserWarning)
    return registered


def _undefined(path: str, kind: str, name: Any, record: tuple[str, str] | None) -> str:
    """The message for a file's ``kind`` (layer, model) class ``name`` that is not defined,
    as for a user's loss or optimiser (:func:`xpcnn.checks.registered`)."""
    known = sorted(LAYER_TYPES if kind == "layer" else MODEL_TYPES)
    where = f" ({_shown(record)} where it was saved)" if record is not None else ""
    # (a layer "type", as its message has said)
    return (f"{path}: unknown {kind} {'type' if kind == 'layer' else 'class'} {name!r}{where}: "
            f"define (or import) a user's {kind} class before loading a file that names it; "
            f"known: {known}")


def check_model_fields(config: dict[str, Any], path: str) -> None:
    """The model's own fields that its class's ``from_config`` reads, where the file has them
    (a user's model class may not write them), as its constructor would take them (they were
    converted on their way there: a seed of 1.5 built as 1, a name of 5 as '5')."""
    if "seed" in config and (type(config["seed"]) is not int or config["seed"] < 0):
        raise DataFormatError(f"{path}: invalid model configuration: seed is "
                              f"{config['seed']!r}, expected an int >= 0")
    if "name" in config and not isinstance(config["name"], str):
        raise DataFormatError(f"{path}: invalid model configuration: name is "
                              f"{config['name']!r}, expected a string")
    if not isinstance(config.get("trainable", True), bool):  # (the model's own flag)
        raise DataFormatError(f"{path}: invalid model configuration: trainable is "
                              f"{config['trainable']!r}, expected true or false")


def input_shape_of(config: dict[str, Any], path: str) -> tuple[int, ...]:
    shape = config.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(
            type(d) is int and d > 0 for d in shape):
        raise DataFormatError(f"{path}: input_shape {shape!r} is not a list of sizes")
    return tuple(shape)


def graph_of(config: dict[str, Any], layers: list[Layer], path: str) -> list[Inbound]:
    """What each layer reads (``inbound``, a chain where the file gives none), checked."""
    try:
        inbound = inbound_of(config["layers"])
        check_graph(layers, inbound)
    except InputError as e:
        raise DataFormatError(f"{path}: invalid layer graph: {e}") from e
    return inbound


# (``callback.{i}.{name}.{k}``: a checkpoint's callback states, which only a resumed fit reads)
_ENTRY = re.compile(r"layer(\d+)\.(\d+)|slot\.(\w+)\.(\d+)|callback\.\d+\.\w+\.\d+")


def check_entries(npz: NpzArchive, layers: list[Layer], slot_names: Collection[str] | None
                  ) -> None:
    """Refuse, before inflating anything, an entry that the architecture has no place for:
    weight ``j`` of layer ``i`` exists only where that layer has a ``j``-th weight, and optimiser
    slots (``slot.{name}.{k}``) only in a checkpoint, under its optimiser's slot names (any,
    where ``slot_names`` is None: an optimiser not read, whose slots are not either)."""
    params = sum(len(la.weight_names) for la in layers)
    for key in npz.entries:
        if key == CONFIG_KEY:
            continue
        m = _ENTRY.fullmatch(key)
        ok = m is not None and (
            (int(m[1]) < len(layers) and int(m[2]) < len(layers[int(m[1])].weight_names))
            if m[1] is not None else ((slot_names is None or m[3] in slot_names)
                                      and int(m[4]) < params) if m[3] is not None else True)
        if not ok:
            raise DataFormatError(f"{npz.path}: unexpected entry {key!r}: this model has no "
                                  "place for it (the file is corrupt or not an xpcnn file); "
                                  "nothing was read from it")


def check_sizes(layers: list[Layer], shape: tuple[int, ...], npz: NpzArchive,
                inbound: list[Inbound] | None = None, in_config: Collection[int] = ()) -> None:
    """Refuse, before building it, a layer that would allocate more than the file accounts for.

    Walks the layers on the host with trial builds, along the graph ``inbound`` (a chain by
    default): each layer's input (with its padding) and output must stay under
    :data:`MAX_SAMPLE_VALUES` values (a merge layer's output too: a chain of Concatenates at the
    end of a graph doubles it at each), and the weights a Dense, Conv2D or BatchNorm2D layer would
    create must number exactly the values its entries claim (read from their headers alone);
    ``in_config``: layers whose weights the file holds in its configuration instead (see
    :func:`statistics_in_config`), no entries.
    """
    path = npz.path
    shapes: list[Any] = [shape]
    for i, layer in enumerate(layers):
        ins = inbound[i] if inbound is not None else (i,)
        if layer.multi_input:  # (a merge layer: no window, no weights)
            out = layer.unbuilt_copy().build([shapes[j] for j in ins], "cpu", "float32")
        else:
            out = _checked_single_input(layer, i, shapes[ins[0]], npz, i in in_config)
        too_big = _output_too_big(out)
        if too_big:
            raise DataFormatError(f"{path}: layer {i} ({type(layer).__name__}) would {too_big}: "
                                  "the file is corrupt or not a model")
        shapes.append(out)


def check_sample_sizes(model: Any) -> None:
    """Refuse to save a built ``model`` that :func:`check_sizes` would refuse to load: a layer
    taking (with its padding) or giving more than :data:`MAX_SAMPLE_VALUES` values per sample.
    InputError names the layer; nothing is written."""
    if not getattr(model, "built", False):  # (unbuilt: nothing to check yet)
        return
    model._rebuild_if_shared()  # (each layer's shapes as built for this model)
    shapes: list[Any] = [tuple(model._input_shape)]
    for i, (layer, ins) in enumerate(zip(model.layers, model._inbound(), strict=True)):
        out = tuple(layer.output_shape)
        too_big = None if layer.multi_input else _input_too_big(layer, shapes[ins[0]])
        too_big = too_big or _output_too_big(out)
        if too_big:
            raise InputError(f"model {model.name!r} cannot be saved: its layer {i} "
                             f"({layer.name!r}, {type(layer).__name__}) would {too_big}, the "
                             "most a model file may hold, so the file would not load; nothing "
                             "was written")
        shapes.append(out)


def _padded(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample ``shape`` (H, W, C) as ``layer`` pads it: its own padding (an int on every
    side, or "same"/"valid" for its window and strides), none for a layer without."""
    if len(shape) != 3:
        return shape
    pad = getattr(layer, "padding", 0)
    window = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    strides = getattr(layer, "strides", None)
    if isinstance(pad, int) and not isinstance(pad, bool) and pad > 0:
        pads = (pad,) * 4
    elif (pad == "same" and isinstance(window, tuple) and isinstance(strides, tuple)
          and len(window) == len(strides) == 2):
        pads = resolve_padding(pad, (shape[0], shape[1]), window, strides)
    else:  # ("valid", or a user's layer's own kind)
        return shape
    return (shape[0] + pads[0] + pads[1], shape[1] + pads[2] + pads[3], shape[2])


def _input_too_big(layer: Layer, shape: tuple[int, ...]) -> str | None:
    """What is too big about ``layer``'s input of ``shape``, padded; None where nothing is."""
    if math.prod(_padded(layer, shape)) <= MAX_SAMPLE_VALUES:
        return None
    return (f"take inputs of shape {tuple(shape)}, more than {MAX_SAMPLE_VALUES} values per "
            "sample with its padding")


def _output_too_big(out: Any) -> str | None:
    if math.prod(out) <= MAX_SAMPLE_VALUES:
        return None
    return f"give outputs of shape {tuple(out)}, more than {MAX_SAMPLE_VALUES} values per sample"


def _checked_single_input(layer: Layer, i: int, shape: tuple[int, ...], npz: NpzArchive,
                          in_config: bool = False) -> tuple[int, ...]:
    """:func:`check_sizes` for layer ``i``, which reads one input of ``shape``: its output
    shape, from a trial build once its input and weight count are checked (none in the
    file where its weights are ``in_config``)."""
    path = npz.path
    too_big = _input_too_big(layer, shape)
    if too_big:
        raise DataFormatError(f"{path}: layer {i} ({type(layer).__name__}) would {too_big}: "
                              "the file is corrupt or not a model")
    need = 0 if in_config else weight_count(layer, shape)
    if need is not None:
        have = sum(math.prod(npz.header(k)[0]) for k in npz.entries
                   if k.startswith(f"layer{i}."))
        if need != have:
            raise DataFormatError(f"{path}: layer {i} ({type(layer).__name__}) needs {need} "
                                  f"weight values for inputs of shape {shape}, but the file "
                                  f"holds {have}")
    # (on a copy: the model's own build then gives a random layer its own stream, [seed, k])
    return layer.unbuilt_copy().build(shape, "cpu", "float32", None, np.random.default_rng(0))


def set_weights_from_file(model: Any, npz: NpzArchive) -> None:
    """Give the built ``model`` the weights ``layer{i}.{j}`` of a model file or checkpoint, each
    inflated under the cap its size implies and refused if it holds NaN or infinity."""
    path = npz.path
    config, _ = model_of_file(npz.read_config(), path)
    in_config = statistics_in_config(model, config)
    weights = []
    for i, la in enumerate(model.layers):
        if i in in_config:
            weights += _statistics_of(la, in_config[i], path)
            continue
        arrays = la._arrays()
        for j, name in enumerate(la.present_weight_names()):
            key = f"layer{i}.{j}"
            if key not in npz.entries:
                raise DataFormatError(f"{path}: weight {key} of layer {la.name!r} is missing")
            w = npz.read(key, array_bytes(math.prod(arrays[name].shape)))
            wrong = bad_values(w, model.dtype_name)
            if wrong:
                raise DataFormatError(f"{path}: array {key!r} ({name} of layer {la.name!r}) "
                                      f"{wrong}: the file is corrupt or was written from a model "
                                      "that diverged")
            weights.append(w)
    try:
        model.set_weights(weights)
    except InputError as e:
        raise DataFormatError(f"{path}: weights do not fit the architecture: {e}") from e


def statistics_in_config(model: Any, config: Any) -> dict[int, dict[str, Any]]:
    """The layers ``i`` of ``model`` that are adapted Normalizations where the file's model
    (``config``), written before adapted statistics were weights, has a Normalization that
    holds its mean and std in its configuration, and no arrays: their settings there, whose
    numbers become the layer's weights (a checkpoint of a script that adapts its layer again
    before it resumes). Compared with the model's layer as alike by :func:`check_layers`."""
    specs = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(specs, list):
        return {}
    found = {}
    for i, (la, spec) in enumerate(zip(model.layers, specs, strict=False)):
        settings = spec.get("config") if isinstance(spec, dict) else None
        if (isinstance(settings, dict) and isinstance(la, Normalization) and la.adapted
                and spec.get("class") == "Normalization" and "mean" in settings
                and not settings.get("adapted")):
            found[i] = settings
    return found


def _statistics_of(layer: Any, settings: dict[str, Any], path: str) -> list[np.ndarray]:
    """The weights (mean, variance) of the built adapted Normalization ``layer`` from an older
    file's ``settings`` for it, a mean and std (a number, or one per channel), checked as the
    constructor checks them."""
    c = layer.input_shape[-1]
    try:
        given = Normalization(settings.get("mean"), settings.get("std"))
        if len(given.mean) not in (1, c):
            raise InputError(f"{len(given.mean)} channel statistics for inputs of {c} channels")
    except InputError as e:
        raise DataFormatError(f"{path}: the statistics of layer {layer.name!r} (Normalization) "
                              f"in its configuration are invalid: {e}") from e
    std = np.broadcast_to(np.asarray(given.std, np.float64), (c,))
    return [np.broadcast_to(np.asarray(given.mean, np.float64), (c,)).copy(), std * std]


def bad_values(a: np.ndarray, dtype: str) -> str | None:
    """What is wrong with the values of array ``a`` from a file, to be held as ``dtype`` (the
    model's): NaN or infinity, or finite values beyond ``dtype``'s range, which the cast would
    turn into infinity (a float64 1e300 for a float32 model); None where nothing is."""
    if a.dtype.kind != "f":
        return None
    if not np.all(np.isfinite(a)):
        return "holds NaN or infinite values"
    with np.errstate(over="ignore"):
        if np.all(np.isfinite(a.astype(dtype, copy=False))):
            return None
    return (f"holds values beyond the range of {dtype} (up to {np.max(np.abs(a)):.3g}), the "
            "model's dtype, which would load as infinity")


def load_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Load the weights of a model file or checkpoint into ``model``, checking that the file
    holds the same layers (classes, settings, graph) with weights of the same shapes;
    otherwise ``DataFormatError`` names the first difference. As Keras' ``load_weights`` and
    PyTorch's ``load_state_dict``: the values are cast to the model's dtype, and a built model
    keeps its input shape (an unbuilt one is built for the file's), and the optimiser in a
    checkpoint is not read (its class need not be defined). Settings that may change while a
    model trains (Dropout's rate, BatchNorm2D's momentum, ReLU's max_value: see
    :func:`~xpcnn.layers.base.setting_names`) are not weights: where the file's differ, the
    model keeps its own."""
    with NpzArchive(path, "the model file") as npz:
        config, checkpoint = model_of_file(npz.read_config(), npz.path)
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise DataFormatError(f"{npz.path}: not an xpcnn model file or checkpoint")
        check_file_entries(npz, config, checkpoint, optimizer=False)
        adapt_to_file(model, config)
        # (before building: an unbuilt model too; how to declare a setting only for a
        # checkpoint, a run's file, where a callback may have changed it, not for a model
        # file, whose other value is likely set in code: another model)
        try:
            check_layers(model, config, npz.path, setting_hint=checkpoint)
        except DataFormatError as e:  # (still refused: the way that loads them, where one does)
            e.args = (f"{e}{_weights_alone(model, config, npz)}",)
            raise
        build_for_file(model, config, npz)
        check_weight_shapes(model, config, npz)
        set_weights_from_file(model, npz)


def _weights_alone(model: Any, config: dict[str, Any], npz: NpzArchive) -> str:
    """Where the file's model differs from built ``model`` only in layers without weights added
    or left out (a Dropout), its layers with weights alike (classes, settings) and their
    weights of the same shapes, in order: how to load them, which ``set_weights`` takes, as
    Keras' guide moves weights between such models. Read from the configurations and the
    entries' headers; "" where anything else differs (a layer's setting changed in code, as
    in another model) or cannot be read."""
    specs = config.get("layers")
    if not model.built or not isinstance(specs, list) or len(specs) == len(model.layers):
        return ""
    entries = sorted((int(m[1]), int(m[2]), key) for key in npz.entries
                     if (m := re.fullmatch(r"layer(\d+)\.(\d+)", key)))
    weighted = sorted({i for i, _, _ in entries})  # (the file's layers with weights)
    layers = [la for la in model.layers if la.present_weight_names()]
    try:
        theirs = [_architecture(config)[i] for i in weighted]
        ours = [a for a, la in zip(_architecture(normal(model_config(
            model, compiled=False, checked=False))), model.layers, strict=True)
            if la.present_weight_names()]
        shapes = [tuple(npz.header(key)[0]) for _, _, key in entries]
    except (DataFormatError, KeyError, TypeError, AttributeError, IndexError, ValueError):
        return ""  # (a file the refusal says enough about)

    def alike(layer: tuple[str, dict[str, Any]], la: Layer) -> tuple[str, dict[str, Any]]:
        # (as check_layers compares them; the layers between differ, and so do the reads)
        skipped = {"inbound", *setting_names(type(la))}
        return layer[0], {k: v for k, v in layer[1].items() if k not in skipped}

    if not layers or len(theirs) != len(layers) or any(
            alike(a, la) != alike(b, la) for a, b, la in zip(theirs, ours, layers, strict=True)
    ) or shapes != [tuple(la.keras_shape(name)) for la in layers
                    for name in la.present_weight_names()]:
        return ""
    return ("; its layers with weights are this model's, with weights of the same shapes (it "
            "has layers without weights more or fewer): model.set_weights(xpcnn.load_model("
            f"{npz.path!r}).get_weights()) loads them")


def check_weight_shapes(model: Any, config: dict[str, Any], npz: NpzArchive) -> None:
    """Refuse, from the entries' headers alone, a file whose weights differ in shape from the
    built ``model``'s (of the same layers: built for inputs of another size, say), naming the
    first layer that differs."""
    path = npz.path
    theirs_in, ours_in = input_shape_of(config, path), tuple(model._input_shape)
    in_config = statistics_in_config(model, config)
    for i, la in enumerate(model.layers):
        for j, name in enumerate([] if i in in_config else la.present_weight_names()):
            key = f"layer{i}.{j}"
            if key not in npz.entries:
                raise DataFormatError(f"{path}: weight {key} of layer {la.name!r} is missing")
            theirs, ours = tuple(npz.header(key)[0]), tuple(la.keras_shape(name))
            if theirs == ours:
                continue
            what = (f"its layer {la.name!r} ({type(la).__name__}) has {name} of shape {ours}, "
                    f"the file's is {theirs}")
            if theirs_in != ours_in:
                raise DataFormatError(f"{path} holds a model for inputs of shape {theirs_in}; "
                                      f"this model takes {ours_in}, for which {what}")
            raise DataFormatError(f"{path} holds weights of other shapes than this model: "
                                  f"{what}")


def check_file_entries(npz: NpzArchive, config: dict[str, Any], checkpoint: bool,
                       optimizer: bool = True) -> None:
    """:func:`check_entries` against the model that the file's own ``config`` describes (and,
    in a checkpoint, its optimiser's slots; under any names where ``optimizer`` is False:
    the optimiser is not read, so its class need not be defined)."""
    layers, _ = layers_from_config(config, npz.path)
    slots: tuple[str, ...] | None = ()
    if checkpoint and not optimizer:
        slots = None
    elif checkpoint:
        try:
            slots = tuple(optimizer_from_config(config["compile"]["optimizer"]).slot_names)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                RecursionError) as e:
            raise DataFormatError(f"{npz.path}: invalid checkpoint: its optimizer "
                                  f"configuration ({type(e).__name__}: {e})") from e
    check_entries(npz, layers, slots)


def adapt_to_file(model: Any, config: Any) -> None:
    """Make adapted each Normalization of ``model`` that has no statistics (none given, not
    adapted: it cannot have been built) where the file's model (``config``) has the layer with
    statistics (adapted, or an older file's mean and std): as in Keras 3, where a plain
    ``Normalization()`` makes its weights at build and ``load_weights`` fills them (the usual
    way to restore one, a checkpoint's resume too). A refused load puts the layer back as it
    was (the model's ``_unbuilt_if_refused``: the layer is unbuilt)."""
    specs = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(specs, list):
        return
    for la, spec in zip(model.layers, specs, strict=False):
        settings = spec.get("config") if isinstance(spec, dict) else None
        if (isinstance(la, Normalization) and not la.adapted and la.mean is None
                and not la.built and isinstance(settings, dict)
                and spec.get("class") == type(la).__name__
                and (settings.get("adapted") is True or settings.get("mean") is not None)):
            la.adapted = True


def build_for_file(model: Any, config: dict[str, Any], npz: NpzArchive) -> None:
    """Build an unbuilt ``model`` for the file's input shape, once that is known to be sane
    (its Normalizations without statistics made adapted first where the file's are:
    :func:`adapt_to_file`, a checkpoint's included)."""
    adapt_to_file(model, config)
    if model.built:
        return
    shape = input_shape_of(config, npz.path)
    try:
        check_sizes(model.layers, shape, npz, model._inbound(),  # (along its graph)
                    statistics_in_config(model, config))
    except InputError as e:  # the model's layers do not take that shape
        raise DataFormatError(f"{npz.path} holds a model for inputs of shape {shape}, which "
                              f"this model cannot take: {e}") from e
    model.build((None, *shape))  # (a file's shape: no warning that it may hold a batch size)


def normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def _architecture(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Layer classes and settings, leaving out names and weight initialisers."""
    out = []
    for spec in config["layers"]:
        settings = {k: v for k, v in spec["config"].items()
                    if k != "name" and not k.endswith("_initializer")}
        if "inbound" in spec:
            settings["inbound"] = spec["inbound"]
        out.append((spec["class"], settings))
    return out


def _setting_hint(model: Any, i: int, a: tuple[str, dict[str, Any]],
                  b: tuple[str, dict[str, Any]]) -> str:
    """Where layer ``i`` of ``model``, a user's, differs from the file's (``a``, ``b``: class and
    settings) only in the values of settings of its own: how to make them settings a callback
    may change (:class:`~xpcnn.layers.base.Setting`), which a resume takes from the file."""
    if (a[0] != b[0] or i >= len(model.layers) or of_xpcnn(type(model.layers[i]).__module__)
            or a[1].keys() != b[1].keys()):
        return ""
    changed = [k for k in a[1] if a[1][k] != b[1][k]]
    if "inbound" in changed:  # (another graph: no setting)
        return ""
    example = changed[0]
    return (f". If a callback changes {changed} while the model trains, declare "
            f"{'each' if len(changed) > 1 else 'it'} in {a[0]}'s class body as a setting, "
            f"`{example} = Setting()` (from xpcnn.layers import Setting), as Dropout's rate "
            "is one: a resume then takes the file's value, load_weights keeps the model's, and "
            "this file loads as it is")


def _check_same_classes(theirs: list[Any], ours: list[Any], path: str) -> None:
    """Refuse a file whose layer is of another class of the same name as the model's, where
    the file or the model holds several classes of that name (``blocks.Gate`` and
    ``heads.Gate``): their names alone would not tell a swap. (One class of a name, recorded
    elsewhere, is taken as the model's: a class moved to another module, or a script's.)"""
    records: dict[str, set[tuple[str, str]]] = {}
    pairs = []
    for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        ra, rb = (_record_of(a, i, path) if isinstance(a, dict) else None,
                  _record_of(b, i, path))
        for spec, r in ((a, ra), (b, rb)):
            if r is not None:
                records.setdefault(spec["class"], set()).add(r)
        if ra is not None and rb is not None and a["class"] == b["class"]:
            pairs.append((i, a["class"], ra, rb))
    for i, name, ra, rb in pairs:
        if not _same_place(ra, rb) and len(records[name]) > 1:
            raise DataFormatError(f"{path} holds a model of another architecture: its layer {i} "
                                  f"is a {_shown(ra)}, this model's is a {_shown(rb)}")


def check_layers(model: Any, config: dict[str, Any], path: str, setting_hint: bool = True
                 ) -> None:
    """Refuse a file whose model has other layers (classes, settings, graph) than ``model``,
    built or not, naming the first difference. The settings that may change while a model
    trains (:func:`~xpcnn.layers.base.setting_names`: Dropout's rate, BatchNorm2D's momentum,
    ReLU's max_value...) are not compared: a callback may have changed them before the file was
    written (a checkpoint's resume takes the file's, ``load_weights`` keeps the model's).
    ``setting_hint`` (a checkpoint's, resumed or loaded): a user's layer differing in its own
    settings' values alone is refused with how to declare them settings
    (:func:`_setting_hint`); not for ``load_weights`` of a model file, where a value set
    otherwise in code makes another model."""
    try:
        mine = normal(model_config(model, compiled=False, checked=False))
        theirs = _architecture(config)
        ours = _architecture(mine)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataFormatError(f"{path}: invalid model configuration ({type(e).__name__}: {e})"
                              ) from e
    _check_same_classes(config["layers"], mine["layers"], path)

    def show(layer: tuple[str, dict[str, Any]]) -> str:
        return f"{layer[0]}({', '.join(f'{k}={v!r}' for k, v in layer[1].items())})"

    in_config = statistics_in_config(model, config)
    for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        if i in in_config:  # (the same layer: its statistics are set from the file's)
            a = (a[0], {k: v for k, v in a[1].items() if k not in ("mean", "std")})
            b = (b[0], {k: v for k, v in b[1].items() if k != "adapted"})
        if a[0] == b[0] and i < len(model.layers):  # (see the docstring)
            changeable = setting_names(type(model.layers[i]))
            a = (a[0], {k: v for k, v in a[1].items() if k not in changeable})
            b = (b[0], {k: v for k, v in b[1].items() if k not in changeable})
        if a != b:
            raise DataFormatError(f"{path} holds a model of another architecture: its layer {i} "
                                  f"is {show(a)}, this model's is {show(b)}"
                                  f"{_setting_hint(model, i, a, b) if setting_hint else ''}")
    if len(theirs) != len(ours):
        raise DataFormatError(f"{path} holds a model of another architecture: {len(theirs)} "
                              f"layers, this model has {len(ours)}")
