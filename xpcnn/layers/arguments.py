"""Checks of layers' constructor arguments and input shapes, and their dtypes' names: what
every layer family's constructor and ``_build`` share."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..backend import to_host
from ..checks import (
    defining_class,
    is_one_of,
    looks_channels_first,
    named_parameters,
    takes_keywords,
)
from ..errors import InputError, of_xpcnn

#: A per-sample shape (no batch axis), as layers are built for it.
Shape = tuple[int, ...]


def per_sample(shape: Any) -> Any:
    """``shape`` without a leading None, the batch axis of Keras' ``build((None, 28, 28, 1))``
    (a tuple then; anything else as it is, for the caller's checks)."""
    if isinstance(shape, list | tuple) and len(shape) > 1 and shape[0] is None:
        return tuple(shape[1:])
    return shape


def in_dtype(xp: Any, a: Any, dtype: Any) -> Any:
    """``a`` in ``dtype``: ``a`` itself where it is in it already (the usual case: no call, a
    training step asks a dozen times), else its cast."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def pair(v: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of positive ints."""
    t = (v, v) if isinstance(v, int | np.integer) else tuple(v) if isinstance(
        v, tuple | list) else ()
    if len(t) != 2 or not all(isinstance(a, int | np.integer) and not isinstance(a, bool)
                              and 0 < a < 2**31 for a in t):
        raise InputError(f"{what} must be a positive int or a pair of positive ints, got {v!r}")
    return int(t[0]), int(t[1])


def count(v: int, what: str) -> int:
    """A positive int: a number of units or filters (a pair would be silently cut to one)."""
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 < v < 2**31:
        raise InputError(f"{what} must be a positive int (a count, below 2**31), got {v!r}")
    return int(v)


def on_host(value: Any, what: str) -> Any:
    """``value`` as NumPy reads it: another namespace's array on the host (a PyTorch
    parameter, which requires grad, detached: NumPy's read of it raised torch's own error; a
    CPU tensor's is a view of it, not a copy: the weights that take it copy it), anything
    else as it is; one NumPy cannot read (a bfloat16 tensor) refused by ``what``."""
    try:
        return to_host(value)
    except (TypeError, ValueError, RuntimeError, BufferError) as e:
        bf16 = "bfloat16" in str(getattr(value, "dtype", "")).lower()
        fix = ": pass t.float()" if bf16 and hasattr(value, "float") else ""
        raise InputError(f"{what} must be an array NumPy can read, got a "
                         f"{type(value).__name__} that is none ({e}){fix}") from None


def check_padding(padding: str | int) -> str | int:
    if isinstance(padding, str) and padding.lower() in ("valid", "same"):
        return padding.lower()
    if isinstance(padding, int | np.integer) and not isinstance(padding, bool) and \
            0 <= padding < 2**31:
        return int(padding)  # (a NumPy int too, as kernel_size takes it)
    raise InputError(f"padding must be 'valid', 'same' or a non-negative int, got {padding!r}")


def check_activation(activation: str | None, allowed: tuple[str, ...] = ("relu",)
                     ) -> str | None:
    """A layer's fused activation: None or one of ``allowed`` ("relu": applied while the output
    is in cache; "softmax", a Dense layer's: probabilities, left to the loss at a model's end).
    Keras' "linear" (its name for no activation) is taken as None."""
    if activation is None or (isinstance(activation, str) and activation.lower() == "linear"):
        return None
    if isinstance(activation, str) and activation.lower() in allowed:
        return activation.lower()
    names = " or ".join(repr(a) for a in (None, *allowed))
    raise InputError(f"activation must be {names}, got {activation!r} (use a ReLU layer for a "
                     "ceiling" + ("" if "softmax" in allowed else
                                  ", a Softmax layer or Dense(activation='softmax') for "
                                  "probabilities") + ")")


_CHANNELS_LAST = ("xpcnn's images are always (N, H, W, C), Keras' 'channels_last': transpose "
                  "channels-first arrays beforehand (x.transpose(0, 2, 3, 1))")
# (Keras' l2(l) adds l * sum(w**2) to the loss, whose gradient is 2*l*w; SGD's, Adam's and
# RMSprop's weight_decay adds weight_decay * w to every parameter's gradient)
_NO_REGULARIZER = ("xpcnn's layers take no regularizer: give the optimizer a weight_decay, "
                   "which decays every parameter (biases and normalisation weights too): Keras' "
                   "l2(l) is weight_decay=2*l on optim.SGD or optim.Adam (l2(1e-4): "
                   "optim.SGD(0.01, weight_decay=2e-4)); l1 has no equivalent")
_NO_ACTIVITY_REGULARIZER = ("xpcnn has no equivalent: an activity regularizer penalises the "
                            "layer's outputs, not its weights, so an optimizer's weight_decay "
                            "is no substitute")
_NO_CONSTRAINT = "xpcnn's layers take no weight constraint"
_ZEROS = ("the bias starts at zeros (Keras' default), with no other initializer: set other "
          "values with set_weights()")
_SEED = ("xpcnn's random layers take no seed of their own: the model's seed "
         "(Sequential(seed=...)) draws each one's")
#: Keras 3 keywords of every layer that xpcnn's layers do not take, and what to do instead.
_KERAS_COMMON = {
    "dtype": ("a layer's dtype is its model's: Sequential(dtype='float64') or Model(..., "
              "dtype=...); for mixed precision, compile(precision='mixed_float16')"),
    "autocast": "a layer's computing dtype is the model's compile(precision=...)",
    "input_shape": ("give the model the input shape: Sequential([...], input_shape=(28, 28, 1)) "
                    "or xpcnn.Input((28, 28, 1))"),
    # (Keras 2's, which Keras 3 dropped)
    "input_dim": ("give the model the input shape: Sequential([...], input_shape=(28, 28, 1)) "
                  "or xpcnn.Input((28, 28, 1))"),
    "batch_input_shape": ("give the model the per-sample input shape, batch_input_shape[1:] "
                          "(the batch size is fit's): Sequential([...], input_shape=(28, 28, "
                          "1)) or xpcnn.Input((28, 28, 1))"),
    "activity_regularizer": _NO_ACTIVITY_REGULARIZER,
    **{f"{w}_regularizer": _NO_REGULARIZER for w in ("kernel", "bias", "beta", "gamma")},
    **{f"{w}_constraint": _NO_CONSTRAINT for w in ("kernel", "bias", "beta", "gamma")},
}
_BN_MOMENTUM = ("its momentum is PyTorch's too, the new batch's share (Keras' momentum=0.99 is "
                "BatchNorm2D(momentum=0.01))")
#: Keras 3 keywords of each built-in layer's Keras counterpart that it does not take (by the
#: name of the xpcnn class whose constructor is called), and what to pass instead: a clear
#: error for a port, where Python's "unexpected keyword argument" named no way out. No alias
#: is taken (one way to say each thing).
KERAS_KEYWORDS: dict[str, dict[str, str]] = {
    "Conv2D": {"data_format": _CHANNELS_LAST, "bias_initializer": _ZEROS,
               "dilation_rate": "xpcnn's Conv2D has no dilation (dilation_rate 1 only)",
               "groups": "xpcnn's Conv2D has no groups (groups=1 only)",
               **{k: "xpcnn's Conv2D has no LoRA" for k in ("lora_rank", "lora_alpha")}},
    "Dense": {"bias_initializer": _ZEROS,
              **{k: "xpcnn's Dense has no LoRA or quantization"
                 for k in ("lora_rank", "lora_alpha", "quantization_config")}},
    "_Pool2D": {"data_format": _CHANNELS_LAST},  # (MaxPool2D's and AvgPool2D's constructor)
    "Flatten": {"data_format": _CHANNELS_LAST},
    "GlobalAvgPool2D": {"data_format": _CHANNELS_LAST,
                        "keepdims": "xpcnn's GlobalAvgPool2D gives (N, C) (keepdims=False only)"},
    "Softmax": {"axis": "xpcnn's Softmax is over the last axis (axis=-1 only)"},
    "Dropout": {"seed": _SEED,
                "noise_shape": "xpcnn's Dropout drops each value on its own (no noise_shape)"},
    "BatchNorm2D": {
        "epsilon": "xpcnn's name is eps (PyTorch's): BatchNorm2D(eps={value}); " + _BN_MOMENTUM,
        "axis": "xpcnn's BatchNorm2D normalizes each channel, the last axis of (N, H, W, C)",
        **{k: "xpcnn's BatchNorm2D always learns a scale (gamma) and an offset (beta), as "
           "Keras' default center=True, scale=True" for k in ("center", "scale")},
        **{f"{w}_initializer": "xpcnn starts gamma and the moving variance at ones, beta and "
           "the moving mean at zeros (Keras' defaults): set others with set_weights()"
           for w in ("beta", "gamma", "moving_mean", "moving_variance")},
        **{k: "xpcnn's BatchNorm2D has no batch renormalization"
           for k in ("renorm", "renorm_clipping", "renorm_momentum")},
        "synchronized": "xpcnn's BatchNorm2D takes no synchronized= setting"},
    "FeatureNorm": {"epsilon": "xpcnn's name is eps (PyTorch's): FeatureNorm(eps={value})"},
    "ReLU": {"negative_slope": "xpcnn's ReLU has no negative slope (a leaky ReLU): write a "
             "layer of your own (see the README's layer contract)",
             "threshold": "xpcnn's ReLU has no threshold (0 only)"},
    "RandomFlip": {"seed": _SEED, "data_format": _CHANNELS_LAST},
    "RandomCrop": {**{k: "xpcnn's RandomCrop(padding=4) pads each image by `padding` zeros and "
                      "crops it back to the input size at a random offset; it takes no height "
                      "and width as Keras' RandomCrop(height, width) does, which crops to a "
                      "smaller size. For Keras' behaviour, crop the images beforehand or add a "
                      "layer of your own" for k in ("height", "width")},
                   "seed": _SEED, "data_format": _CHANNELS_LAST},
    "Normalization": {"axis": "xpcnn's Normalization normalizes each channel, the last axis",
                      "invert": "xpcnn's Normalization has no invert=: multiply by the std "
                      "(at least 1e-7, as the layer divides by it) and add the mean yourself"},
}


#: Keras keywords of :data:`KERAS_KEYWORDS` taken where their value is what xpcnn's layer
#: does (Keras' own default spelled out, as a port writes it: the same way, not a second one).
# (Keras' data_format=None is keras.config.image_data_format(), "channels_last" unless set)
_LAST = ("channels_last", None)
# (Keras' None defaults of the regularizers and constraints of weights ``names``: none)
def _no_penalty(*names: str) -> dict[str, tuple[Any, ...]]:
    return {f"{w}_{k}": (None,) for w in names for k in ("regularizer", "constraint")}


KERAS_DEFAULTS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Conv2D": {"data_format": _LAST, "dilation_rate": (1, (1, 1)),
               "groups": (1,), "bias_initializer": ("zeros",), **_no_penalty("kernel", "bias"),
               "lora_rank": (None,), "lora_alpha": (None,)},
    "Dense": {"bias_initializer": ("zeros",), **_no_penalty("kernel", "bias"),
              "lora_rank": (None,), "lora_alpha": (None,), "quantization_config": (None,)},
    "_Pool2D": {"data_format": _LAST},
    "Flatten": {"data_format": _LAST},
    "GlobalAvgPool2D": {"data_format": _LAST, "keepdims": (False,)},
    "Softmax": {"axis": (-1,)},
    "Dropout": {"noise_shape": (None,), "seed": (None,)},
    "BatchNorm2D": {"axis": (-1,), "center": (True,), "scale": (True,),
                    "beta_initializer": ("zeros",), "gamma_initializer": ("ones",),
                    "moving_mean_initializer": ("zeros",),
                    "moving_variance_initializer": ("ones",), "renorm": (False,),
                    "renorm_clipping": (None,), "synchronized": (False,),
                    **_no_penalty("beta", "gamma")},
    "ReLU": {"negative_slope": (0, 0.0), "threshold": (0, 0.0)},
    "RandomFlip": {"data_format": _LAST, "seed": (None,)},
    "RandomCrop": {"data_format": _LAST, "seed": (None,)},
    "Normalization": {"axis": (-1,), "invert": (False,)},
}


_INFERRED = "xpcnn infers it from the input: leave {key} out"
_IN_PLACE = "xpcnn's layers do not work in place (inplace=False only)"
_TORCHVISION_SIZE = ("xpcnn's RandomCrop takes no size: it crops each padded image back to the "
                     "input's own size (torchvision's RandomCrop(32, padding=4) of 32x32 images "
                     "is RandomCrop(padding=4))")
_TORCH_DILATION = "no dilation (dilation=1 only)"
_TORCH_POOL: dict[str, tuple[str, ...] | str] = {
    "kernel_size": ("pool_size",), "stride": ("strides",),
    "ceil_mode": ("xpcnn's pools round the output size down (ceil_mode=False only): pad the "
                  "input for a last, partial window")}
#: PyTorch's keywords of every nn layer that xpcnn's layers do not take.
_TORCH_COMMON: dict[str, tuple[str, ...] | str] = {
    "device": ("a layer's device is its model's: Sequential(device='cuda'), or move the model "
               "with model.to('cuda')"),
}
#: PyTorch's keywords of each built-in layer's nn twin that it does not take (by the name of
#: the xpcnn class, the first of its MRO with a table): xpcnn's (Keras') name for the setting, as a
#: 1-tuple, or what to do instead. For a line-by-line port of an nn.Module.
TORCH_KEYWORDS: dict[str, dict[str, tuple[str, ...] | str]] = {
    "Conv2D": {"in_channels": _INFERRED, "out_channels": ("filters",),
               "stride": ("strides",), "bias": ("use_bias",),
               "dilation": f"xpcnn's Conv2D has {_TORCH_DILATION}",
               "padding_mode": "xpcnn's Conv2D pads with zeros (padding_mode='zeros' only)"},
    "Dense": {"in_features": _INFERRED, "out_features": ("units",), "bias": ("use_bias",)},
    "MaxPool2D": {**_TORCH_POOL, "dilation": f"xpcnn's MaxPool2D has {_TORCH_DILATION}",
                  "return_indices": ("xpcnn's MaxPool2D gives no indices (return_indices=False "
                                     "only)")},
    "AvgPool2D": {**_TORCH_POOL,
                  "count_include_pad": ("xpcnn's AvgPool2D leaves the padding out of its means "
                                        "(count_include_pad=False only)"),
                  "divisor_override": "xpcnn's AvgPool2D divides by the window's size"},
    "BatchNorm2D": {"num_features": _INFERRED,
                    "bias": ("xpcnn's BatchNorm2D always learns an offset, beta (bias=True "
                             "only)"),
                    "affine": ("xpcnn's BatchNorm2D always learns a scale and an offset "
                               "(affine=True only)"),
                    "track_running_stats": ("xpcnn's BatchNorm2D always keeps running statistics "
                                            "for inference (track_running_stats=True only)")},
    "Dropout": {"p": ("rate",), "inplace": _IN_PLACE},
    "ReLU": {"inplace": _IN_PLACE},
    "Flatten": {k: ("xpcnn's Flatten flattens every axis but the batch's (start_dim=1, "
                    "end_dim=-1 only)") for k in ("start_dim", "end_dim")},
    "Softmax": {"dim": ("xpcnn's Softmax is over the last axis (dim=-1 only; for (N, classes) "
                        "scores that is PyTorch's dim=1)")},
    # (torchvision's transforms: RandomCrop, and RandomHorizontalFlip's p)
    "RandomCrop": {"size": _TORCHVISION_SIZE,
                   "fill": "xpcnn's RandomCrop pads with zeros (fill=0 only)",
                   "padding_mode": ("xpcnn's RandomCrop pads with zeros "
                                    "(padding_mode='constant' only)"),
                   "pad_if_needed": ("xpcnn's RandomCrop crops to the input's own size, which "
                                     "always fits: leave pad_if_needed out")},
    "RandomFlip": {"p": "xpcnn's RandomFlip flips with probability 1/2 (p=0.5 only)"},
}
#: PyTorch's keywords of :data:`TORCH_KEYWORDS` taken where their value is what xpcnn's layer
#: does (PyTorch's default spelled out, mostly).
TORCH_DEFAULTS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Conv2D": {"dilation": (1, (1, 1)), "padding_mode": ("zeros",)},
    "MaxPool2D": {"dilation": (1, (1, 1)), "ceil_mode": (False,), "return_indices": (False,)},
    "AvgPool2D": {"ceil_mode": (False,), "count_include_pad": (False,),
                  "divisor_override": (None,)},
    "BatchNorm2D": {"affine": (True,), "track_running_stats": (True,), "bias": (True,)},
    "Dropout": {"inplace": (False,)},
    "ReLU": {"inplace": (False,)},
    "Flatten": {"start_dim": (1,), "end_dim": (-1,)},
    "Softmax": {"dim": (-1,)},
    "RandomCrop": {"fill": (0, 0.0), "padding_mode": ("constant",), "pad_if_needed": (False,)},
    "RandomFlip": {"p": (0.5,)},
}
# (PyTorch's defaults; Keras' too for dtype and for every layer's activity_regularizer)
_ANY_LAYER = {"device": (None,), "dtype": (None,), "activity_regularizer": (None,)}


def _torch_instead(name: str, key: str, value: Any, why: tuple[str, ...] | str) -> str:
    """What xpcnn's ``name`` takes in place of PyTorch's ``key=value``."""
    if isinstance(why, str):
        return why.format(key=key)
    return f"xpcnn's name is Keras', {why[0]}: {name}({why[0]}={value!r})"


def refuse_foreign_keywords(cls: type, init: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Refuse a Keras or PyTorch keyword in ``given`` that ``init``, a built-in layer's
    constructor building a ``cls``, does not take (:data:`KERAS_KEYWORDS`,
    :data:`TORCH_KEYWORDS`), naming what to pass instead, unless its value is what the layer
    does (:data:`KERAS_DEFAULTS`, :data:`TORCH_DEFAULTS`); other keywords are left to
    Python's TypeError. Returns ``given`` less the defaults taken."""
    module, owner = getattr(init, "__module__", ""), getattr(init, "__qualname__", "")
    if not module.startswith("xpcnn.") or takes_keywords(init):  # (a user's constructor)
        return given
    owner = owner.partition(".")[0]
    # (PyTorch's tables by class: MaxPool2D and AvgPool2D share a constructor, not nn twins)
    twin = next((c.__name__ for c in cls.__mro__ if c.__name__ in TORCH_KEYWORDS), owner)
    keras, torch = KERAS_KEYWORDS.get(owner, {}), TORCH_KEYWORDS.get(twin, {})
    defaults = {**_ANY_LAYER, **TORCH_DEFAULTS.get(twin, {}), **KERAS_DEFAULTS.get(owner, {})}
    taken = named_parameters(init)
    name = cls.__name__
    kept = {}
    for key, value in given.items():
        if key in taken or key in defaults and is_one_of(value, defaults[key]):
            if key in taken:
                kept[key] = value
            continue  # (else what xpcnn's layer does, said out loud)
        why = keras.get(key) or _KERAS_COMMON.get(key)
        if why is not None:
            raise InputError(f"{name}({key}={value!r}): Keras' keyword, which xpcnn's {name} "
                             f"does not take: {why.format(value=repr(value))}")
        torch_why = torch.get(key) or _TORCH_COMMON.get(key)
        if torch_why is not None:
            raise InputError(f"{name}({key}={value!r}): PyTorch's keyword, which xpcnn's "
                             f"{name} does not take: "
                             f"{_torch_instead(name, key, value, torch_why)}")
        kept[key] = value
    return kept


#: Keras 3's positional order of each built-in layer whose Keras twin takes more positional
#: arguments than xpcnn's layer (whose name, as Keras' in **kwargs, is a keyword): by the name
#: of the xpcnn class whose constructor is called. See :func:`keras_positional`.
KERAS_ORDER: dict[str, tuple[str, ...]] = {
    "Dense": ("units", "activation", "use_bias", "kernel_initializer", "bias_initializer",
              "kernel_regularizer", "bias_regularizer", "activity_regularizer",
              "kernel_constraint", "bias_constraint", "lora_rank", "lora_alpha",
              "quantization_config"),
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
               "groups", "activation", "use_bias", "kernel_initializer", "bias_initializer",
               "kernel_regularizer", "bias_regularizer", "activity_regularizer",
               "kernel_constraint", "bias_constraint"),
    "_Pool2D": ("pool_size", "strides", "padding", "data_format", "name"),
    "GlobalAvgPool2D": ("data_format", "keepdims"),
    "Flatten": ("data_format",),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Softmax": ("axis",),
    "BatchNorm2D": ("axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
                    "gamma_initializer", "moving_mean_initializer",
                    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
                    "beta_constraint", "gamma_constraint", "renorm", "renorm_clipping",
                    "renorm_momentum", "synchronized"),
    "Dropout": ("rate", "noise_shape", "seed"),
    "RandomFlip": ("mode", "seed", "data_format"),
    "RandomCrop": ("height", "width", "seed", "data_format", "name"),
    "Normalization": ("axis", "mean", "variance", "invert"),
}
#: How PyTorch's positional layer signatures differ from xpcnn's (Keras'), for the errors
#: a line-by-line port meets.
TORCH_CONV_ORDER = ("PyTorch's order, nn.Conv2d(in_channels, out_channels, kernel_size, "
                    "stride)? xpcnn's is Conv2D(filters, kernel_size, strides, padding), as "
                    "Keras', the input's channels inferred")
#: PyTorch's (torchvision's) positional order where :func:`keras_positional` meets it, likewise:
#: said where a refused call's positionals are all numbers, as PyTorch's are.
TORCH_ORDER: dict[str, str] = {
    "Conv2D": TORCH_CONV_ORDER,
    "RandomCrop": f"torchvision's order, RandomCrop(size, padding)? {_TORCHVISION_SIZE}"}


def keras_positional(init: Callable[..., None]) -> Callable[..., None]:
    """``init``, a constructor of :data:`KERAS_ORDER`, reading the positional arguments beyond
    its own as Keras reads them: one xpcnn's layer takes by keyword is passed so (Conv2D's
    activation, a pool's name), one at Keras' default taken (as :func:`refuse_foreign_keywords`
    takes it), any other refused, named as Keras reads it (Python's TypeError, or the layer's
    name it was once taken for, named none). Where xpcnn's order is not Keras' that far
    (BatchNorm2D(momentum, eps), Keras' (axis, momentum, epsilon)), such a call is in Keras'
    order: refused whole. So is one giving an argument by position and by keyword
    (torchvision's RandomCrop(32, padding=4))."""
    owner = init.__qualname__.partition(".")[0]
    keywords = named_parameters(init)
    ours = [p.name for p in inspect.signature(init).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    keras = KERAS_ORDER[owner]
    same_order = keras[:len(ours)] == tuple(ours)
    defaults = {**_ANY_LAYER, **KERAS_DEFAULTS.get(owner, {})}

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        passed: dict[str, Any] = {}
        foreign = []
        # (more positionals than xpcnn's where its order is not Keras': the call is in Keras'
        # order, every argument of it read otherwise)
        first = len(ours) if same_order or len(args) <= len(ours) else 0
        for i in range(first, len(args)):
            key = keras[i] if same_order and i < len(keras) else None
            if key in keywords:
                passed[key] = args[i]
            elif key is None or not is_one_of(args[i], defaults.get(key, ())):
                foreign.append(i)
        twice = [k for k in (*ours[:len(args)], *passed) if k in kwargs]
        if twice or foreign:
            raise InputError(_positional_error(_called(type(self), owner), owner, ours, keywords,
                                               args, kwargs, twice, foreign))
        init(self, *args[:len(ours)], **kwargs, **passed)

    return checked


def _called(cls: type, owner: str) -> tuple[str, str]:
    """The xpcnn class whose constructor ``cls(...)`` ran, named as the caller wrote it (the
    nearest public one of ``cls``'s MRO: MaxPool2D for ``_Pool2D``'s, ``owner``'s where ``cls``
    subclasses it alone), and where a user's class's own ``__init__`` called it, what to say
    first ("MyDense's super().__init__ called "): the call is not that class's own."""
    name = owner
    for c in cls.__mro__:
        if of_xpcnn(c.__module__) and not c.__name__.startswith("_"):
            name = c.__name__
            break
        if c.__name__ == owner:  # (a user's class of _Pool2D's own: none public before it)
            break
    user = defining_class(cls, "__init__")
    if user is None or of_xpcnn(user.__module__):
        return name, ""
    return name, f"{user.__name__}'s super().__init__ called "


def _positional_error(called: tuple[str, str], owner: str, ours: list[str], keywords: list[str],
                      args: tuple[Any, ...], kwargs: dict[str, Any], twice: list[str],
                      foreign: list[int]) -> str:
    """The message of :func:`keras_positional`'s refusal of ``name(*args, **kwargs)``,
    ``called`` (name, how the call came) as :func:`_called` gives it."""
    name, caller = called
    shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    order = ", ".join([*ours, "*", *(k for k in keywords if k not in ours)])
    ours_said = f"xpcnn's order is {name}({order})"
    torch = TORCH_ORDER.get(owner)
    numbers_only = all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                       for v in args)
    torch_said = f". {torch}" if torch and (twice or numbers_only) else ""
    if twice:
        return f"{caller}{name}({shown}): {twice[0]} given by position and by keyword: " \
               f"{ours_said}{torch_said}"
    keras = KERAS_ORDER[owner]
    keras_said = ", ".join(keras[:len(args)]) + (", ..." if len(args) < len(keras) else "")
    reading = ", ".join(f"{k}={v!r}" for k, v in zip(keras, args, strict=False))
    if len(args) > len(keras):
        reading += ", and no more"
    whys: dict[str, None] = {}  # (each said once: the regularizers share theirs)
    for i in foreign:
        key = keras[i] if i < len(keras) else None
        why = KERAS_KEYWORDS.get(owner, {}).get(key) or _KERAS_COMMON.get(key)
        if why:
            whys[why.format(value=repr(args[i]))] = None
    return (f"{caller}{name}({shown}): Keras' order, {name}({keras_said}), reads {reading}; "
            f"{ours_said}{''.join(f'. {why}' for why in whys)}{torch_said}")


# (the per-sample shape of the model's input while a model's layers build; () for a layer
# called on a feature map of a graph; None for a layer built alone, its input the model's)
_MODEL_INPUT: contextvars.ContextVar[Any] = contextvars.ContextVar("xpcnn_model_input",
                                                                    default=None)


@contextlib.contextmanager
def building_for(model_input: Any) -> Iterator[None]:
    """While layers build for a model whose input has per-sample shape ``model_input`` (``()``:
    a feature map, not the input): :func:`does_not_fit` hints at a channels-first input only
    for the model's input."""
    token = _MODEL_INPUT.set(model_input)
    try:
        yield
    finally:
        _MODEL_INPUT.reset(token)


# (set while layers are made again from settings given before: a file's, a configuration's,
# a copy's; see rebuilding)
_REBUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("xpcnn_rebuilding",
                                                                   default=False)


@contextlib.contextmanager
def rebuilding() -> Iterator[None]:
    """While layers are made from settings a user gave before (``load_model``, ``from_config``,
    a copy, the check at save): advice on a setting (BatchNorm2D's momentum) was given when
    the user wrote it, not again at every load (:func:`advises`)."""
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


def advises() -> bool:
    """False while :func:`rebuilding`: a setting's advice is for the user's own code."""
    return not _REBUILDING.get()


def does_not_fit(layer: Any, what: str, input_shape: Shape) -> InputError:
    """The error of a window (``what``: "a 3x3 kernel ...") larger than the input, with the
    likely cause: the model's input declared channels-first (1x28 of 28 channels), or for a
    Conv2D of no more filters than its kernel is wide, PyTorch's positional order
    (Conv2D(1, 32, 3): a 32x32 kernel; Conv2D(64, 5) on a 4x4 map is Keras' order)."""
    h, w, c = input_shape
    model_input = _MODEL_INPUT.get()
    first = model_input is None or tuple(model_input) == tuple(input_shape)
    cause = tuple(input_shape) if first else tuple(model_input or ())
    hint = ""
    if looks_channels_first(cause):  # (the input; or the map shrank from such an input)
        ci, hi, wi = cause
        said = "the input" if first else f"the model's input {cause}"
        hint = (f": is {said} channels-first, (C, H, W) as PyTorch keeps images? xpcnn reads "
                f"(H, W, C): declare {(hi, wi, ci)} and pass images as x.transpose(0, 2, 3, 1)")
    elif type(layer).__name__ == "Conv2D" and layer.filters <= max(layer.kernel_size):
        hint = f": {TORCH_CONV_ORDER}"
    return InputError(f"layer {layer.name!r}: {what} does not fit an input of {h}x{w}{hint}")


def require_rank(layer: Any, input_shape: Shape, rank: int) -> None:
    """Per-sample ``input_shape`` must have ``rank`` axes (3 means (H, W, C))."""
    if len(input_shape) != rank:
        layout = {3: "(H, W, C)", 1: "(features,)"}.get(rank, f"{rank} axes")
        raise InputError(
            f"layer {layer.name!r} ({type(layer).__name__}) expects per-sample inputs of shape "
            f"{layout}, got {input_shape}"
        )
