"""Optimisers (SGD, Adam, AdamW, RMSprop) and learning-rate schedules.

Optimisers update parameters in place (``p[...] = ...``), so a layer's arrays stay the same
objects. Semantics follow PyTorch's, so that runs can be compared step for step. Schedules map the
optimiser's step count to a learning rate.

One step, :meth:`Optimizer.step`, for every optimiser: it takes the numbers that change from step
to step by name (:meth:`Optimizer.step_scalars`: Python floats in an eager step, 0-d device
arrays in a step captured in a CUDA graph) and hands them to the optimiser's one update,
``_update`` per parameter or ``_fused_update`` where the kernels offer one.
"""

from __future__ import annotations

import copy as copy_module
import functools
import json
import math
import numbers
from collections.abc import Callable, Collection, Iterator
from typing import Any

from .checks import (
    check_config_class,
    defining_class,
    flag,
    is_one_of,
    named_parameters,
    register,
    registered,
    same_author,
    takes_keywords,
    unbindable_override,
    unsaved_settings,
    untaken_settings,
)
from .errors import InputError, NonFiniteError
from .ops.kernels import StandardKernels


def _real(v: Any) -> bool:
    """A finite int or float (not a bool, not a string), or a 0-d array of one, as NumPy code
    gives a number (``np.array(0.1)``, ``x.mean()``): each setting is read with float()."""
    if getattr(v, "shape", None) == () and getattr(getattr(v, "dtype", None), "kind", None) in (
            "i", "u", "f"):
        v = v.item()
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _steps(v: Any, what: str, least: int = 1) -> int:
    """A count of steps, at least ``least``: an int, or a float holding a whole number (as
    Keras takes ``decay_steps=1e4``)."""
    if not _real(v) or float(v) != int(float(v)):
        raise InputError(f"{what} must be a whole number of steps, got {v!r}")
    if float(v) < least:
        raise InputError(f"{what} must be >= {least}, got {v!r}")
    return int(float(v))


@functools.cache
def _parameters(cls: type) -> tuple[str, ...]:
    """The parameters ``cls``'s constructor takes by name."""
    return tuple(named_parameters(cls.__init__))


@functools.cache
def _settings(cls: type) -> frozenset[str]:
    """The settings ``cls``'s constructor takes by name, but the learning rate (a property:
    ``lr``, ``learning_rate``); where it also takes ``**kwargs`` (a Keras-style
    ``__init__(self, learning_rate=0.01, **kwargs)``), those of the base constructor it
    passes them on to too (the next class up that defines one: in the end an xpcnn class's,
    whose settings the update reads)."""
    own = {name for name in _parameters(cls)
           if not isinstance(getattr(cls, name, None), property)}
    if takes_keywords(cls.__init__):
        base = next(c for c in cls.__mro__[1:] if issubclass(c, Optimizer)
                    and "__init__" in vars(c))  # (a mixin's is passed over)
        own |= _settings(base)
    return frozenset(own)


@functools.cache
def _fixed(cls: type) -> frozenset[str]:
    """The settings fixed once an optimiser of ``cls`` has trained, and checked when set as
    attributes: its constructor's, and those of the xpcnn class it derives from (a user's
    ``MySGD(SGD)`` whose constructor takes ``lr`` alone still has SGD's momentum, whose
    slots the update reads)."""
    return _settings(cls) | _settings(_xpcnn_class(cls))


#: The user's classes whose ``_update`` was seen to keep a skipped step's arrays
#: (:meth:`Optimizer._check_skips`).
_SKIPS_CHECKED: set[type] = set()


def _update_unchecked(cls: type) -> bool:
    """Whether the class defining ``cls``'s ``_update`` is a user's, not yet checked."""
    owner = defining_class(cls, "_update")
    return owner.__module__ != __name__ and owner not in _SKIPS_CHECKED


def _own(cls: type, method: str) -> bool:
    """Whether ``cls``'s ``method`` is xpcnn's own (not a user's override)."""
    return defining_class(cls, method).__module__ == __name__


def _never(*args: Any) -> bool:
    return False


def _xpcnn_class(cls: type) -> type:
    """The nearest of xpcnn's own optimiser classes that ``cls`` derives from (``cls`` itself
    where it is one): the constructor whose checks a setting set as an attribute goes
    through."""
    return next(c for c in cls.__mro__ if c.__module__ == __name__)


def _probe(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """Build an optimiser of xpcnn's class ``cls`` with ``settings``, to see whether its
    constructor takes them (marked as a probe before the constructor runs, so that its own
    attributes are not checked in turn); returns its attributes, as it keeps them."""
    probe = cls.__new__(cls)
    probe.__dict__["_probe"] = True
    cls.__init__(probe, **settings)
    return probe.__dict__


_BINDS = ("compile binds the model's parameters to the optimiser: pass the rate and "
          "settings only, {name}(lr=0.001, ...), then model.compile(optimizer=...)")
#: PyTorch's optimiser keywords that xpcnn's do not take: Keras' names of the setting (named
#: where the class takes them), or what instead.
TORCH_KEYWORDS: dict[str, tuple[str, ...] | str] = {
    "params": _BINDS,
    "betas": ("beta_1", "beta_2"),
    "eps": ("epsilon",),
    "alpha": ("rho",),
    "dampening": "xpcnn's {name} has no dampening (PyTorch's default, 0, only)",
    "maximize": "not offered: xpcnn's optimisers minimise the loss (PyTorch's default)",
    "foreach": "not offered: xpcnn runs each backend's update its own way",
    "fused": "not offered: xpcnn runs each backend's update its own way",
    "capturable": "not offered: xpcnn runs each backend's update its own way",
    "differentiable": "not offered: xpcnn does not differentiate through an update",
}


#: PyTorch's keywords given PyTorch's default, which is xpcnn's behaviour: taken (as Keras'
#: defaults spelled out are by the layers: checks.is_one_of)
TORCH_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "dampening": (0, 0.0), "maximize": (False,), "foreach": (None,), "fused": (None,),
    "capturable": (False,), "differentiable": (False,)}


_NO_EMA = "not offered: xpcnn keeps no moving average of the weights (use_ema=False only)"
#: Keras 3's optimiser keywords (and Keras 2's decay and jit_compile) that xpcnn's do not
#: take: (their Keras defaults, xpcnn's behaviour, taken; what instead of another value).
#: ``name``'s Keras default, the class's own name in any case, is taken as well (see
#: _refuse_foreign_arguments). (Keras 3 ignores decay=None; Keras 2's default was 0;
#: jit_compile=True was Keras 2's default, a speed hint that changes no number)
KERAS_KEYWORDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "name": ((None,), "xpcnn's optimisers have no name (files name them by class)"),
    "use_ema": ((False,), _NO_EMA), "ema_momentum": ((0.99,), _NO_EMA),
    "ema_overwrite_frequency": ((None,), _NO_EMA),
    "loss_scale_factor": ((None,), "compile(precision='mixed_float16') scales the loss itself, "
                                   "dynamically (model.loss_scale)"),
    "gradient_accumulation_steps": ((None,), "not offered: xpcnn updates after each batch; fit "
                                             "with a batch_size that many times larger for the "
                                             "gradient of as many samples"),
    "decay": ((None, 0, 0.0), "Keras 2's decay (lr / (1 + decay * step)) is not offered: give "
                              "lr a Schedule, a subclass of xpcnn.optim.Schedule whose "
                              "__call__(step) returns that"),
    "jit_compile": ((True, False), "xpcnn compiles no XLA (jit_compile=True or False only)"),
}


def _instead(name: str, key: str, value: Any, taken: Collection[str]) -> str:
    """What xpcnn's ``name`` takes in place of PyTorch's ``key=value`` (:data:`TORCH_KEYWORDS`)."""
    keras = TORCH_KEYWORDS[key]
    if isinstance(keras, str):
        return keras.format(name=name)
    if not keras or not all(k in taken for k in keras):
        return f"xpcnn's {name} has no such setting"
    if len(keras) == 1:
        return f"xpcnn's name is Keras', {keras[0]}: {name}({keras[0]}={value!r})"
    names = " and ".join(keras)
    if isinstance(value, list | tuple) and len(value) == len(keras):
        given = ", ".join(f"{k}={v!r}" for k, v in zip(keras, value, strict=True))
        return f"xpcnn's names are Keras', {names}: {name}({given})"
    return f"xpcnn's names are Keras', {names}, a number each: {name}(beta_1=..., beta_2=...)"


def _refuse_foreign_arguments(name: str, init: Callable[..., None], args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> None:
    """Refuse PyTorch's way of making an optimiser, SGD(model.parameters(), lr=...) (Python's
    "multiple values for argument 'lr'" named no way out), and PyTorch's and Keras' keywords
    that ``init`` does not take (:data:`TORCH_KEYWORDS`, :data:`KERAS_KEYWORDS`), naming
    xpcnn's way; those given their library's default (:data:`TORCH_DEFAULTS`, the Keras
    table's own), xpcnn's behaviour, are dropped from ``kwargs``."""
    if args and isinstance(args[0], list | tuple | set | dict | Iterator):
        raise InputError(f"{name}(...) was given {type(args[0]).__name__} as its first argument, "
                         "the learning rate: PyTorch's order, "
                         f"torch.optim.{name}(params, lr)? " + _BINDS.format(name=name))
    taken = named_parameters(init)
    for key, value in list(kwargs.items()):
        if key in taken:
            continue
        if key in TORCH_KEYWORDS:
            if is_one_of(value, TORCH_DEFAULTS.get(key, ())):
                del kwargs[key]  # (PyTorch's default: xpcnn's behaviour, said out loud)
                continue
            raise InputError(f"{name}({key}={value!r}): PyTorch's keyword, which xpcnn's {name} "
                             f"does not take: {_instead(name, key, value, taken)}")
        if key in KERAS_KEYWORDS:
            defaults, instead = KERAS_KEYWORDS[key]
            # (Keras' default name is the class's: "adam", "SGD", "rmsprop")
            if is_one_of(value, defaults) or key == "name" and \
                    isinstance(value, str) and value.lower() == name.lower():
                del kwargs[key]
                continue
            raise InputError(f"{name}({key}={value!r}): Keras' keyword, which xpcnn's {name} "
                             f"does not take: {instead}")


def _takes_learning_rate(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (whose first parameter is ``lr``) also taking Keras' name of it,
    ``learning_rate=``, by keyword. Outside the signature (which ``inspect`` reads through the
    wrapper: the settings a file keeps, and the checks at save, are ``lr``'s)."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        _refuse_foreign_arguments(type(self).__name__, init, args, kwargs)
        if "learning_rate" in kwargs:
            if args or "lr" in kwargs:
                given = args[0] if args else kwargs["lr"]
                raise InputError(f"{type(self).__name__} was given both lr={given!r} and "
                                 f"learning_rate={kwargs['learning_rate']!r}: learning_rate is "
                                 "Keras' name of lr, give one of them")
            kwargs["lr"] = kwargs.pop("learning_rate")
        init(self, *args, **kwargs)

    return wrapper


def _rate(v: Any, what: str, zero: bool = True) -> float:
    """A learning rate, finite and >= 0 (0 trains nothing, as PyTorch accepts it); with
    ``zero`` False, > 0 (a divisor such as OneCycle's div_factor)."""
    if not _real(v) or not (v >= 0 if zero else v > 0):
        raise InputError(f"{what} must be a finite number {'>=' if zero else '>'} 0, got {v!r}")
    return float(v)


# -- learning-rate schedules ------------------------------------------------------------------


_NO_MOMENTUM_CYCLE = ("xpcnn's OneCycle schedules the learning rate only (PyTorch's "
                      "cycle_momentum=False): the optimiser's momentum stays as set")
_KERAS_WARMUP = ("xpcnn's warm-up wraps the schedule: LinearWarmup(CosineDecay(warmup_target, "
                 "decay_steps), warmup_steps), which rises from warmup_target / warmup_steps")
_NO_SCHEDULE_NAME = "xpcnn's schedules have no name (files name them by class)"
#: The arguments of Keras' CosineDecay and of PyTorch's StepLR, CosineAnnealingLR and
#: OneCycleLR that xpcnn's schedules take under another name (xpcnn's name), or do not take:
#: (their default, xpcnn's behaviour, taken; what instead of another value). ``positional``:
#: Keras' names of the positional arguments after xpcnn's (CosineDecay's third is Keras'
#: alpha, no rate). (Steps, as PyTorch's where it steps every batch: one stepped once an
#: epoch, T_max epochs, is T_max * steps_per_epoch steps here; fit warns of the other.)
PORTED_SCHEDULE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "StepDecay": {"last_epoch": ((-1,), "a checkpoint resumes a schedule at its step")},
    "CosineDecay": {
        "initial_learning_rate": "lr", "T_max": "decay_steps", "eta_min": "min_lr",
        "last_epoch": ((-1,), "a checkpoint resumes a schedule at its step"),
        "alpha": ((0, 0.0), "Keras' alpha is a fraction of lr, xpcnn's min_lr a rate: "
                            "CosineDecay(lr, decay_steps, min_lr=alpha * lr)"),
        "name": ((None, "CosineDecay"), _NO_SCHEDULE_NAME),
        "warmup_target": ((None,), _KERAS_WARMUP), "warmup_steps": ((0,), _KERAS_WARMUP),
        "positional": ("alpha", "name", "warmup_target", "warmup_steps"),
    },
    "OneCycle": {
        "max_lr": "lr",
        "anneal_strategy": (("cos",), "xpcnn's OneCycle anneals along a cosine only"),
        "cycle_momentum": ((False,), _NO_MOMENTUM_CYCLE),
        "base_momentum": ((0.85,), _NO_MOMENTUM_CYCLE),
        "max_momentum": ((0.95,), _NO_MOMENTUM_CYCLE),
        "three_phase": ((False,), "xpcnn's OneCycle has PyTorch's two phases only"),
        "epochs": ((None,), "give total_steps=epochs * steps_per_epoch"),
        "steps_per_epoch": ((None,), "give total_steps=epochs * steps_per_epoch"),
        "last_epoch": ((-1,), "a checkpoint resumes a schedule at its step"),
    },
}


def _takes_ported_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """``init``, a schedule's constructor, taking Keras' or PyTorch's arguments where they are
    its own under another name or its behaviour, and refusing the others by name, saying what
    instead (:data:`PORTED_SCHEDULE_ARGUMENTS`; was Python's "unexpected keyword argument")."""
    owner = init.__qualname__.partition(".")[0]
    table = PORTED_SCHEDULE_ARGUMENTS[owner]
    params = named_parameters(init)
    positional = [p for p in params if p != "self"][:init.__code__.co_argcount - 1]

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        ported = dict(zip(table.get("positional", ()), args[len(positional):], strict=False))
        if len(args) > len(positional) + len(ported):
            raise InputError(f"{owner} takes at most {len(positional)} positional arguments "
                             f"({', '.join(positional)}), got {len(args)}")
        twice = [key for key in ported if key in kwargs]
        if twice:  # (Python's "multiple values for argument", as Keras' own call would get)
            raise InputError(f"{owner} was given {twice[0]} twice: as argument "
                             f"{len(positional) + list(ported).index(twice[0]) + 1} (Keras' "
                             f"order) and as {twice[0]}=")
        for key, value in (*ported.items(), *list(kwargs.items())):
            if key in params or key not in table or key == "positional":
                continue  # (xpcnn's own, or Python's error: a name no library gives)
            kwargs.pop(key, None)
            if isinstance(table[key], str):  # (xpcnn's name of the same setting)
                if table[key] in kwargs or params.index(table[key]) < len(args):
                    raise InputError(f"{owner} was given both {table[key]} and {key}: {key} "
                                     f"is {table[key]}, give one of them")
                kwargs[table[key]] = value
                continue
            taken, instead = table[key]
            if not is_one_of(value, taken):
                where = f" (argument {len(positional) + list(ported).index(key) + 1}, as " \
                        "Keras reads it)" if key in ported else ""
                raise InputError(f"{owner}({key}={value!r}){where}: an argument of Keras' or "
                                 f"PyTorch's schedule that xpcnn's {owner} does not take: "
                                 f"{instead}")
        init(self, *args[:len(positional)], **kwargs)

    return checked


def _cosine(start: float, end: float, t: float) -> float:
    """From ``start`` at t = 0 to ``end`` at t = 1 along half a cosine (PyTorch's
    ``_annealing_cos``: the same rounding, halving being exact)."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


#: Schedules and optimisers by class name, as files name them: xpcnn's and a user's subclasses
#: (defined, or imported, before a file that names them is loaded).
SCHEDULES: dict[str, type[Schedule]] = {}
OPTIMIZER_CLASSES: dict[str, type[Optimizer]] = {}


class Schedule:
    """A learning rate as a function of the step count (0 for the first step)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(SCHEDULES, cls, "schedule")

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, by name, with the class (by default: the attributes,
        which are the settings where each is kept under its own name)."""
        return {"class": type(self).__name__, **vars(self)}

    def check_config(self) -> None:
        """Refuse to save a schedule whose constructor takes settings that its ``get_config()``
        does not give (run at save: get_config itself is also called elsewhere), and the
        schedules it wraps (LinearWarmup's ``after``); one whose configuration does not name
        its class, or from which :func:`schedule_from_config` makes another schedule (its
        files would not load, or load another)."""
        config = self.get_config()
        check_config_class(self, config, "schedule", "the constructor's arguments, as the default "
                     "get_config() does (the class, then the attributes)")
        missing, untaken = unsaved_settings(self, config), untaken_settings(self, config)
        if missing:
            raise InputError(f"schedule class {type(self).__name__} takes {missing} but its "
                             "get_config() does not return them (the default returns the "
                             "attributes, so keep each setting under its own name, or define "
                             "get_config()), so that a saved model rebuilds it")
        if untaken:
            raise InputError(f"schedule class {type(self).__name__}'s get_config() gives "
                             f"{untaken}, which its constructor does not take, so that a saved "
                             "model could not rebuild it (the default returns the attributes: "
                             "define get_config() returning the constructor's arguments)")
        for value in getattr(self, "__dict__", {}).values():
            if isinstance(value, Schedule):
                value.check_config()
        try:  # (as a file holds it)
            config = json.loads(json.dumps(config))
        except (TypeError, ValueError):  # (refused, with the part named, as the file is written)
            return
        fix = ("return the constructor's arguments, a wrapped schedule's as its get_config(), "
               "which loading makes a schedule again")
        try:
            again = json.loads(json.dumps(schedule_from_config(config).get_config()))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise InputError(f"schedule class {type(self).__name__} cannot be rebuilt from its "
                             f"get_config() {config} ({type(e).__name__}: {e}): {fix}") from e
        if again != config:
            raise InputError(f"schedule class {type(self).__name__}'s get_config() {config} "
                             f"rebuilds a schedule whose get_config() is {again}, so that a "
                             f"saved model would load another schedule: {fix}")


class StepDecay(Schedule):
    """lr * gamma ** (step // step_size)."""

    @_takes_ported_arguments
    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        self.lr = _rate(lr, "StepDecay lr")
        self.step_size = _steps(step_size, "StepDecay step_size")
        self.gamma = _rate(gamma, "StepDecay gamma")

    def __call__(self, step: int) -> float:
        try:
            return self.lr * self.gamma ** (step // self.step_size)
        except OverflowError:  # gamma > 1 for many steps: the optimiser reports it
            return math.inf


class CosineDecay(Schedule):
    """Cosine from lr down to min_lr over decay_steps, then constant at min_lr. ``min_lr`` is a
    rate, keyword-only: Keras' third argument, ``alpha``, is a fraction of the first rate
    (Keras' ``CosineDecay(lr, steps, alpha)`` is ``CosineDecay(lr, steps, min_lr=alpha * lr)``)."""

    @_takes_ported_arguments
    def __init__(self, lr: float, decay_steps: int, *, min_lr: float = 0.0) -> None:
        self.lr = _rate(lr, "CosineDecay lr")
        self.decay_steps = _steps(decay_steps, "CosineDecay decay_steps")
        self.min_lr = _rate(min_lr, "CosineDecay min_lr")
        if self.min_lr > self.lr:  # (a cosine rising to it: a Keras alpha taken as a rate?)
            raise InputError(f"CosineDecay min_lr ({self.min_lr}) must be at most lr "
                             f"({self.lr}): it is the rate the cosine decays to (Keras' "
                             "alpha, a fraction of lr, is min_lr=alpha * lr)")

    def __call__(self, step: int) -> float:
        return _cosine(self.lr, self.min_lr, min(step, self.decay_steps) / self.decay_steps)


class LinearWarmup(Schedule):
    """Rise linearly from lr/warmup_steps to the wrapped schedule's value over warmup_steps,
    then follow that schedule (counted from the end of the warm-up)."""

    def __init__(self, after: Schedule | float, warmup_steps: int) -> None:
        self.warmup_steps = _steps(warmup_steps, "LinearWarmup warmup_steps")
        self.after = after if isinstance(after, Schedule) else Constant(after)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.after(0) * (step + 1) / self.warmup_steps
        return self.after(step - self.warmup_steps)

    def get_config(self) -> dict[str, Any]:
        return {"class": "LinearWarmup", "after": self.after.get_config(),
                "warmup_steps": self.warmup_steps}


class OneCycle(Schedule):
    """Smith's one-cycle policy, as PyTorch's ``OneCycleLR`` computes it (cosine annealing,
    two phases): from lr / div_factor up to lr over the first pct_start of total_steps (the
    peak at step pct_start * total_steps - 1), then down to lr / (div_factor *
    final_div_factor) at the last step; constant after it (where PyTorch refuses to step).

    The learning rate only: PyTorch's ``OneCycleLR(..., cycle_momentum=False)``. Its default
    also cycles SGD's momentum (Adam's beta_1) between 0.95 and 0.85, against the rate; here
    the optimiser's momentum stays as set, so a ported recipe keeps it fixed.

    As in PyTorch, a warm-up shorter than a step (pct_start * total_steps < 1: its peak before
    step 0) starts part of the way down from lr. Where pct_start * total_steps is exactly 1,
    PyTorch divides 0 by 0 at the first step (a ZeroDivisionError); here that step takes
    lr / div_factor, the limit of PyTorch's formula there as pct_start * total_steps falls
    to 1 (the warm-up's start), and the steps after it are PyTorch's."""

    @_takes_ported_arguments
    def __init__(self, lr: float, total_steps: int, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4) -> None:
        self.total_steps = _steps(total_steps, "OneCycle total_steps", least=2)
        if not _real(pct_start) or not 0 < pct_start < 1:
            raise InputError(f"OneCycle pct_start must be in (0, 1), got {pct_start!r}")
        self.lr = _rate(lr, "OneCycle lr")
        self.pct_start = float(pct_start)
        self.div_factor = _rate(div_factor, "OneCycle div_factor", zero=False)
        self.final_div_factor = _rate(final_div_factor, "OneCycle final_div_factor", zero=False)

    def __call__(self, step: int) -> float:
        # PyTorch's OneCycleLR.get_lr, term for term (so the same rounding): the peak may be
        # below 0 (a warm-up shorter than a step), where step 0 is already past it.
        start_lr = self.lr / self.div_factor
        peak, last = self.pct_start * self.total_steps - 1, self.total_steps - 1
        step = min(step, last)
        if step <= peak:
            # (peak == 0 == step: PyTorch's 0 / 0, its limit from above the warm-up's start)
            a, b, t = start_lr, self.lr, step / peak if peak > 0 else 0.0
        else:  # (last - peak >= 1 - pct_start > 0: never a division by zero)
            a, b, t = self.lr, start_lr / self.final_div_factor, (step - peak) / (last - peak)
        return _cosine(a, b, t)


class Constant(Schedule):
    def __init__(self, lr: float) -> None:
        self.lr = _rate(lr, "learning rate")

    def __call__(self, step: int) -> float:
        return self.lr



def _class_config(config: Any, what: str, example: str) -> tuple[str, dict[str, Any]]:
    """A configuration's class name and its other entries, refused (naming the form
    expected) where it is no such dict: a file edited by hand, or Keras' form."""
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        raise InputError(f"{what} configuration must be a dict naming its class, such as "
                         f"{example}, got {config!r}")
    config = dict(config)
    return config.pop("class"), config


def _nested(value: Any) -> Any:
    """A schedule's setting as its constructor takes it: a schedule's configuration (a dict
    whose "class" names a schedule: LinearWarmup's ``after``, a user's schedule wrapping
    another) made a schedule again, in a list too."""
    if isinstance(value, dict) and isinstance(value.get("class"), str) and \
            value["class"] in SCHEDULES:
        return schedule_from_config(value)
    if isinstance(value, list):
        return [_nested(v) for v in value]
    return value


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    name, config = _class_config(config, "a schedule's", "{'class': 'Constant', 'lr': 0.01}")
    cls = registered(SCHEDULES, name, "schedule")
    return cls(**{k: _nested(v) for k, v in config.items()})


def as_schedule(lr: float | Schedule) -> Schedule:
    """A learning rate as a :class:`Schedule` (a number is a constant one; a plain function of
    the step is refused: a schedule is a class, saved and resumed by its configuration)."""
    if isinstance(lr, Schedule):
        return lr
    if _real(lr) and lr >= 0:
        return Constant(lr)
    raise InputError(f"learning rate must be a positive number, 0 or a Schedule, got {lr!r}")


# -- optimisers -------------------------------------------------------------------------------


def _factor(value: float, base: float) -> float:
    """The factor that scales ``base`` to ``value``, so that ``base * factor`` (the rate read
    back, trained with and logged) is ``value`` where a factor gives it: value / base, moved a
    unit in the last place or two where that product rounds otherwise (around a power of two,
    where value's spacing below is half that above it). Where none gives it (consecutive
    factors' products step over value), the closest product, a unit in the last place away:
    exact everywhere would take more state than the factor, which files keep."""
    factor = value / base
    if not math.isfinite(factor):
        raise InputError(f"cannot set the learning rate to {value!r}: the schedule gives {base} "
                         "at this step, which no finite factor scales to it")
    best = factor
    for _ in range(8):  # (one or two steps suffice where a factor exists)
        product = base * factor
        if product == value:
            return factor
        factor = math.nextafter(factor, math.inf if product < value else -math.inf)
        if abs(base * factor - value) < abs(base * best - value):
            best = factor
    return best


class LearningRate(float):
    """What ``optimizer.learning_rate`` reads: the next step's rate, a float, with the two
    methods Keras code calls on its rate variable: ``assign(rate)`` sets it (as setting
    ``optimizer.learning_rate`` does; a Keras callback's
    ``self.model.optimizer.learning_rate.assign(...)`` works as it is) and ``numpy()`` reads
    it. Pickled and copied as a plain float: a rate kept in logs keeps no optimiser."""

    __slots__ = ("_optimizer",)

    def __new__(cls, value: float, optimizer: Optimizer) -> LearningRate:
        rate = super().__new__(cls, value)
        rate._optimizer = optimizer
        return rate

    def assign(self, value: float | Schedule) -> None:
        """Set the optimiser's learning rate to ``value`` (see :attr:`Optimizer.lr`)."""
        self._optimizer.lr = value

    def numpy(self) -> float:
        """The rate as a number (Keras' variable gives a NumPy scalar)."""
        return float(self)

    def __reduce__(self) -> tuple[type, tuple[float]]:
        return float, (float(self),)


_HOOK = ("_update(self, xp, i, p, g, scalars, apply), which updates parameter p (the i-th) "
         "from its gradient g and the step's numbers (scalars['lr'], the learning rate), "
         "writing each array it changes with self._assign(xp, array, new, apply) (a "
         "parameter's state in self.slots[name][i], the names in slot_names)")


def _refuse_torch_step(cls: type) -> None:
    """Refuse an optimiser class overriding ``step`` with a signature that cannot take what
    the training loop passes (``step(xp, params, grads, kernels, apply=..., scalars=...)``):
    PyTorch's ``step(self, closure=None)``, which ended in a bare TypeError at the first
    step."""
    # (self, xp, params, grads, kernels, apply=, scalars=)
    signature = unbindable_override(cls, "step", *[None] * 5, apply=None, scalars=None)
    if signature is not None:
        raise InputError(f"optimizer class {cls.__name__} overrides step{signature}, "
                         "PyTorch's hook: xpcnn's step(xp, params, grads, kernels, apply, "
                         "scalars) is the training loop's, which calls the optimiser's "
                         f"{_HOOK} for each parameter: define that instead")


def _no_update(cls: type) -> str:
    """The error of optimiser class ``cls`` defining no ``_update``, naming the hook it
    may have written instead (Keras' ``update_step``)."""
    keras = ("; Keras' update_step(gradient, variable, learning_rate), which it defines, is "
             "never called: write its update in _update"
             if callable(getattr(cls, "update_step", None)) else "")
    return f"optimizer class {cls.__name__} defines no _update: it must define {_HOOK}{keras}"


class Optimizer:
    """Base: subclasses define ``_update(xp, i, p, g, scalars, apply)`` for parameter ``i``,
    with the step's numbers in ``scalars`` (as :meth:`step_scalars` names them), writing every
    array they update through :meth:`_assign` (so that a step the device skips changes
    nothing); and, optionally, ``_fused_update`` for kernels that update every parameter at once
    (run only where the class defining it also defines the ``_update`` in use: a subclass
    overriding ``_update`` alone, ``SignSGD(SGD)`` say, trains by its own on every backend;
    one overriding ``_fused_update`` alone trains by the ``_update`` it inherits, so a fused
    update of one's own comes with the ``_update`` it agrees with).

    ``slots`` holds per-parameter state arrays (momentum, moments), created lazily on the
    parameters' device (afresh where the model empties them: a layer frozen or unfrozen);
    ``applied``, made with them where ``counts_updates`` (Adam's t), counts on the device the
    updates applied to them (a step whose update the device skipped, see :mod:`xpcnn.totals`,
    does not count there, as in PyTorch's per-parameter step). ``iterations`` counts steps and
    drives the schedule (a skipped step counts there, as PyTorch's scheduler counts it).
    ``lr_factor`` multiplies the schedule (callbacks such as ``ReduceLROnPlateau`` change it;
    checkpoints keep it).

    Every optimiser takes Keras' gradient clipping, at most one of: ``clipnorm`` (each
    gradient to that norm), ``global_clipnorm`` (all of them to that joint norm) or
    ``clipvalue`` (each element to [-clipvalue, clipvalue]); see :meth:`_clipped`. The built-in
    constructors also take Keras' ``learning_rate=`` for ``lr`` (outside their signatures: a
    config still names it ``lr``).

    A constructor's setting assigned as an attribute (``opt.momentum = 0.9``) is checked as the
    constructor checks it, and refused once the optimiser has trained (see ``__setattr__``). In
    a user's subclass, the settings are its constructor's, and where it takes ``**kwargs``
    those of the base constructor it passes them on to; a value is checked by the nearest xpcnn
    class's constructor, never by the user's (see :meth:`_check_setting`): a setting only the
    user's class takes is not checked.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_torch_step(cls)  # (before it is registered: the class statement fails whole)
        register(OPTIMIZER_CLASSES, cls, "optimizer")

    #: True where the state holds squared gradients (Adam's second moment): the training loop
    #: then also stops at a gradient whose square overflows, before it turns that state into
    #: infinity (see :meth:`xpcnn.totals.RunningTotals.add`).
    keeps_squares: bool = False
    #: True where the update needs ``applied``, the count of updates its slots have had.
    counts_updates: bool = False
    #: The numbers of :meth:`step_scalars` that a captured step reads in float64, not in the
    #: parameters' dtype (those that the device computes others from, as eager steps do).
    exact_scalars: tuple[str, ...] = ()

    @_takes_learning_rate
    def __init__(self, lr: float | Schedule, weight_decay: float | None = 0.0,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None) -> None:
        self.schedule = as_schedule(lr)
        if weight_decay is None:  # (Keras' default spelled out where it is 0: no decay)
            weight_decay = 0.0
        if not _real(weight_decay) or weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0 and finite, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        for name, value in clips.items():
            if value is not None and (not _real(value) or value <= 0):
                raise InputError(f"{name} must be a finite number > 0 (or None), got {value!r}")
        if sum(v is not None for v in clips.values()) > 1:
            raise InputError("only one of clipnorm, clipvalue and global_clipnorm can be set "
                             "(as in Keras), got " + ", ".join(
                                 f"{k}={v!r}" for k, v in clips.items() if v is not None))
        self.clipnorm, self.clipvalue, self.global_clipnorm = (
            None if v is None else float(v) for v in clips.values())
        self.iterations = 0
        self.lr_factor = 1.0
        self.slots: dict[str, list[Any]] = {}
        self.applied: Any = None  # (0-d float64, on the device: see the class's doc)

    def __setattr__(self, name: str, value: Any) -> None:
        # A setting of the constructor is fixed once the optimiser has stepped: its slots were
        # made for it, and a captured CUDA graph bakes it in (the rate alone goes through
        # device memory). Refused rather than applied in one place and not the other; not
        # where only the step count was put back (a loaded model's: no slots, no step run).
        # The schedule is refused at any step but 0: a checkpoint resumes under the compile
        # settings, the schedule included, and a new one would start at that step.
        # (Cheap for what a step sets, iterations, slots, applied: a few dictionary look-ups.)
        if name == "schedule" and self.__dict__.get("iterations", 0):
            self._refuse_schedule(value)
        elif name == "slots" and not value:  # (its state emptied: a step is made afresh)
            self.__dict__.pop("_stepped", None)
        if name in _fixed(type(self)):
            if self._trained():
                raise InputError(f"{type(self).__name__}'s {name} cannot change once it has "
                                 "trained (its state and a captured step are made for it): "
                                 f"create another {type(self).__name__}(...) and compile with "
                                 "it; the learning rate can change (optimizer.lr, or "
                                 "optimizer.learning_rate)")
            if name in self.__dict__ and not self.__dict__.get("_probe"):
                value = self._check_setting(name, value)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.copy, copy.deepcopy, pickle) is an optimiser of its own, bound to no
        # model (compile binds one to one model, see Trainer._own; the weak reference to it
        # would not pickle), with this one's state: compiled into a model whose trained
        # parameters its slots fit, it goes on as this one would.
        return {k: v for k, v in vars(self).items() if k != "_model"}

    def __copy__(self) -> Optimizer:
        # (the slots too: they are updated in place, and a shallow copy's steps would move
        # this optimiser's momentum)
        copied = type(self).__new__(type(self))
        vars(copied).update(self.__getstate__())
        vars(copied)["slots"] = {k: [copy_module.deepcopy(a) for a in v]
                                 for k, v in self.slots.items()}
        vars(copied)["applied"] = copy_module.deepcopy(self.applied)
        return copied

    def _check_setting(self, name: str, value: Any) -> Any:
        """Refuse ``value`` for the constructor's setting ``name`` where the constructor of the
        nearest xpcnn class this one derives from (itself, for xpcnn's own) refuses it with
        the other settings that class takes as they are on this optimiser (set as an
        attribute, it was taken unchecked, trained with, and saved into a file that then did
        not load): a probe of that class is built with them. A user's constructor is never
        run for it (its side effects, registering or logging an optimiser, would happen for
        one that does not exist), so a setting only a user's class takes is not checked, nor
        are a user's constructor's own checks of the others. Unchecked too where the
        settings cannot be read back under their own names (a subclass that keeps them
        otherwise), or where they do not rebuild the optimiser as they are either (nothing
        then tells what the value breaks). Returns the value as that constructor keeps it."""
        cls = _xpcnn_class(type(self))
        if name not in _settings(cls):
            return value  # (a user's class's own setting)
        current = {}
        for param in _parameters(cls):
            if param in _settings(cls) and param in self.__dict__:
                current[param] = self.__dict__[param]
            elif param in ("lr", "learning_rate") and "schedule" in self.__dict__:
                current[param] = self.__dict__["schedule"]
            else:
                return value
        try:  # (kept as the constructor keeps it: a NumPy float32 as a float, which a file
            # holds; kept as given, it trained, and the model could not be saved)
            return _probe(cls, {**current, name: value}).get(name, value)
        except Exception as error:  # (its InputError; any other kind alike)
            try:
                _probe(cls, current)
            except Exception:
                return value
            whose = "its" if cls is type(self) else f"{cls.__name__}'s"
            raise InputError(f"{type(self).__name__}'s {name} cannot be set to {value!r} "
                             f"({whose} constructor refuses it): {error}") from error

    def _trained(self) -> bool:
        """Whether state binds the settings: slots, an update count, or a step run (eager or
        captured in a CUDA graph) since the slots were last emptied."""
        state = self.__dict__
        return bool(state.get("slots")) or state.get("applied") is not None or \
            state.get("_stepped", False)

    def _refuse_schedule(self, value: Any) -> None:
        what = type(value).__name__ if isinstance(value, Schedule) else repr(value)
        name, step = type(self).__name__, self.iterations
        if not self._trained():  # (a loaded model's: its file kept the step count alone)
            raise InputError(
                f"cannot set the learning rate to a schedule ({what}) on this {name}, which "
                f"is at step {step} (a loaded model's optimiser goes on from the step its file "
                f"kept): the new schedule would start at its step {step}, not 0. Compile with "
                f"a new optimiser made with it to start it from step 0, "
                f"model.compile(optimizer={name}(schedule, ...)), or set a number "
                "(optimizer.lr = rate: the schedule goes on scaled to it)")
        raise InputError(
            f"cannot set the learning rate to a schedule ({what}) once {name} "
            f"has trained ({step} steps): a checkpoint resumes under the schedule it "
            "was compiled with, and the new schedule would start at its step "
            f"{step}, not 0. Set a number instead (optimizer.lr = rate: the "
            "schedule goes on scaled to it, which checkpoints keep), use a "
            "LearningRateScheduler callback for a rate per epoch, or compile with a new "
            "optimiser made with the schedule (a Schedule can be set before training)")

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The names of the per-parameter state arrays (:attr:`slots`), as the settings ask
        (SGD's momentum buffer only with momentum), or as a subclass set them."""
        names = self.__dict__.get("_slot_names")
        return self._slot_names_for_settings() if names is None else names

    @slot_names.setter
    def slot_names(self, names: tuple[str, ...]) -> None:
        self.__dict__["_slot_names"] = tuple(names)

    def _slot_names_for_settings(self) -> tuple[str, ...]:
        return ()

    def _scheduled(self) -> float:
        """The schedule's rate for the next step, as a float. A value that is not a number (a
        0-d array of a real dtype is one), or one below 0, is a bug in the schedule
        (InputError naming it: not a NonFiniteError, which TerminateOnNaN would take for a
        numerical event and end the run quietly); NaN and infinity (a schedule that
        overflowed) are left to :meth:`step_scalars`."""
        value = self.schedule(self.iterations)
        if type(value) is float and not value < 0:  # (every step: the common case first)
            return value
        if getattr(value, "shape", None) == () and \
                getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u", "f"):
            value = float(value)  # (a 0-d array, np.where's: a number to NumPy and Python)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
            name = type(self.schedule).__name__
            raise InputError(f"schedule {name} gave the learning rate {value!r} for step "
                             f"{self.iterations + 1} (its __call__({self.iterations}): steps "
                             "count from 0); expected a number >= 0")
        return float(value)

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self._scheduled() * self.lr_factor

    @property
    def learning_rate(self) -> LearningRate:
        """Keras' name of :attr:`lr`: the learning rate the next step will use, to read and
        to set, also by Keras' ``optimizer.learning_rate.assign(rate)``
        (:class:`LearningRate`)."""
        return LearningRate(self.lr, self)

    @learning_rate.setter
    def learning_rate(self, value: float | Schedule) -> None:
        self.lr = value

    @lr.setter
    def lr(self, value: float | Schedule) -> None:
        """Make the next step's rate ``value``: the schedule goes on, scaled to it (the factor
        is optimiser state, which checkpoints keep), the factor chosen so that the rate reads
        back (and trains) as ``value`` itself, where a float can. Refused where the schedule
        gives 0 at this step (a constant rate of 0 included), which no factor scales.

        A :class:`Schedule` replaces the schedule at step 0 only (refused after training: a
        checkpoint resumes under the compile settings, the schedule included; and on a loaded
        model's optimiser past step 0, where it would start at that step)."""
        # (a schedule, or a rate set before the base class's __init__ ran, as a Keras-style
        # subclass may: the schedule itself)
        if isinstance(value, Schedule) or "schedule" not in self.__dict__:
            if self.__dict__.get("iterations", 0):
                self._refuse_schedule(value)
            self.schedule, self.lr_factor = as_schedule(value), 1.0
            return
        if not _real(value) or value < 0:
            raise InputError(f"cannot set the learning rate to {value!r}: expected a finite "
                             "number >= 0")
        base = self._scheduled()
        if not 0 < base < math.inf:
            instead = ("make the optimiser with the rate to start from (a LearningRateScheduler "
                       "then sets each epoch's), or set a schedule before training "
                       "(optimizer.learning_rate = xpcnn.optim.Constant(rate))"
                       if not self.iterations else
                       "compile with a new optimiser made with the rate to start from (a "
                       "LearningRateScheduler then sets each epoch's)")
            raise InputError(f"cannot set the learning rate to {value!r}: the schedule gives "
                             f"{base} at step {self.iterations + 1}, which no factor scales to "
                             f"it; {instead}")
        self.lr_factor = _factor(float(value), base)

    def step_scalars(self) -> dict[str, float]:
        """The numbers of the next step that change from one step to the next, by name (here
        the learning rate). NonFiniteError where the learning rate is not finite (a schedule
        that overflowed, or one built with inf); InputError where the schedule gives a rate
        below 0 or no number (:meth:`_scheduled`)."""
        lr = self.lr
        if not 0 <= lr < math.inf:
            raise NonFiniteError(f"the learning rate for step {self.iterations + 1} is {lr}; "
                                 "nothing was updated")
        return {"lr": lr}

    def step(self, xp: Any, params: list[Any], grads: list[Any], kernels: Any = None,
             apply: Any = None, scalars: dict[str, Any] | None = None) -> None:
        """Apply one update to every parameter, in place.

        ``scalars``: the step's numbers. None: those of :meth:`step_scalars`, as Python floats,
        and the step is counted in ``iterations``. Given, the caller took them and counts the
        step: Python floats (the training loop's eager step, which takes them before the step
        moves anything), or 0-d device arrays in the parameters' dtype (a step captured in a
        CUDA graph, :mod:`xpcnn.cuda_graphs`, refilled before each replay: baked into the
        graph, numbers would stay those of the captured step; those of ``exact_scalars`` in
        float64). Either way the same values come out.

        ``kernels`` with :attr:`StandardKernels.fused_updates` (CuPy's: one launch per
        parameter dtype; NumPy's: in place, without temporaries) run instead of the standard
        formulas. ``apply``: a 0-d boolean device array; where False, parameters and slots
        keep their values (decided on the device, without the host waiting for it)."""
        if not self.slots:
            self.slots = {name: [xp.zeros_like(p) for p in params] for name in self.slot_names}
            if self.counts_updates:  # (float64 where the namespace has it: an exact count)
                self.applied = xp.zeros((), dtype=getattr(xp, "float64", xp.float32),
                                        device=params[0].device if params else None)
        self.__dict__["_stepped"] = True  # (its settings are now bound: see _trained)
        if scalars is None:
            scalars = self.step_scalars()
            self.iterations += 1
        if self.counts_updates and params:  # (in the widest of the parameters' dtypes)
            scalars = self._counted(kernels or StandardKernels(xp), scalars, apply,
                                    xp.result_type(*(p.dtype for p in params)))
        # (not where a subclass overrides _update alone: the fused kernels would skip it)
        fused = kernels is not None and kernels.fused_updates and params and same_author(
            self, "_fused_update", "_update")
        # Clipping inside xpcnn's fused updates where the kernels take it (no clipped copy of
        # every gradient, no launches per array), else the standard way first (the reference)
        # (only where the clipping is xpcnn's own too: a user's _clipped or _clip runs)
        # (no call where nothing clips: a step's host work, see scripts/bench_host_step.py)
        unclipped = self.clipvalue is None and self.clipnorm is None and \
            self.global_clipnorm is None
        clip = None if unclipped else self._clip()
        inside = bool(fused and clip is not None and all(
            _own(type(self), m) for m in ("_fused_update", "_clipped", "_clip"))
            and getattr(kernels, "takes_clip", _never)(params, grads, clip))
        if not inside:
            grads = self._clipped(xp, grads)
        if fused and self._fused_update(kernels, params, grads, scalars, apply,
                                        **({"clip": clip} if inside else {})):
            return
        if inside:  # (the kernels declined the step: _update clips nothing itself)
            grads = self._clipped(xp, grads)
        if params and _update_unchecked(type(self)):
            self._check_skips(xp, params[0], scalars)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            self._update(xp, i, p, g, scalars, apply)

    def _check_skips(self, xp: Any, p: Any, scalars: dict[str, Any]) -> None:
        """Once per user's class defining ``_update``: refuse it where an update with
        ``apply`` False changes parameter 0 or its slots (written ``p[...] = new``, not through
        :meth:`_assign`): steps the device skips (a non-finite float16 step, a bad label) would
        train. Run on scratch copies, with a gradient of ones, by a shallow copy of this
        optimiser (an attribute its ``_update`` sets, a count of its own, is left as it was)."""
        def copy(a: Any) -> Any:
            return xp.asarray(a, copy=True)

        slots = self.slots
        scratch = {name: [copy(v[0]), *v[1:]] for name, v in slots.items() if v}
        before = [p, *(slots[name][0] for name in scratch)]  # (the originals, left as they are)
        after = [copy(p), *(v[0] for v in scratch.values())]
        probe = type(self).__new__(type(self))  # (sharing all but the scratch slots)
        vars(probe).update(vars(self))
        vars(probe)["slots"] = {**slots, **scratch}
        probe._update(xp, 0, after[0], xp.ones_like(p), scalars,
                      xp.asarray(False, device=p.device))
        owner = defining_class(type(self), "_update")
        if not all(bool(xp.all((a == b) | ((a != a) & (b != b))))
                   for a, b in zip(after, before, strict=True)):
            raise InputError(
                f"{owner.__name__}._update changed a parameter (or its slots) with apply False, "
                "on a step the device skips (a non-finite float16 step, a bad label): write "
                "each array it updates with self._assign(xp, array, new, apply), not "
                "array[...] = new, so that a skipped step changes nothing")
        _SKIPS_CHECKED.add(owner)

    def _counted(self, kernels: Any, scalars: dict[str, Any], apply: Any, dtype: Any
                 ) -> dict[str, Any]:
        """Count this update in ``applied`` (where ``apply``) and give the step's numbers that
        depend on that count, on the device (where ``counts_updates``)."""
        raise NotImplementedError

    def _clipped(self, xp: Any, grads: list[Any]) -> list[Any]:
        """The gradients clipped as Keras 3 clips them (before weight decay, as PyTorch's
        ``clip_grad_*_`` before ``step``): each to the norm ``clipnorm`` (g * c / max(|g|, c)),
        all together to ``global_clipnorm`` (the same over their joint norm), or each element
        to [-clipvalue, clipvalue]; on the device (``where``, not compat's ``clip``, which reads
        the host on CuPy), so a captured step clips too. A NaN gradient stays NaN (its step is
        skipped). (The bounds are arrays: the 2023.12 standard's ``where`` takes no scalar.)"""
        if self.clipvalue is not None:
            def clip(g: Any) -> Any:
                c = xp.full((), self.clipvalue, dtype=g.dtype, device=g.device)  # (0-d)
                return xp.where(g > c, c, xp.where(g < -c, -c, g))

            return [clip(g) for g in grads]
        if self.clipnorm is not None:
            return [g * self._shrink(xp, xp.sum(g * g), self.clipnorm) for g in grads]
        if self.global_clipnorm is not None and grads:
            total = sum((xp.sum(g * g) for g in grads[1:]), start=xp.sum(grads[0] * grads[0]))
            shrink = self._shrink(xp, total, self.global_clipnorm)  # (once, for all)
            return [g * shrink for g in grads]
        return grads

    def _clip(self) -> tuple[str, float] | None:
        """The clipping as the fused kernels take it: ("value", clipvalue), ("norm",
        clipnorm) or ("global", global_clipnorm); None where gradients are not clipped."""
        for kind, value in (("value", self.clipvalue), ("norm", self.clipnorm),
                            ("global", self.global_clipnorm)):
            if value is not None:
                return kind, value
        return None

    @staticmethod
    def _shrink(xp: Any, squares: Any, c: float) -> Any:
        """c / max(norm, c) for a norm whose square is ``squares`` (0-d): 1 up to c (and for
        a NaN norm); never a division by zero."""
        norm = xp.sqrt(squares)
        return c / xp.where(norm > c, norm, xp.full_like(norm, c))

    @property
    def clipping(self) -> bool:
        """Whether gradients are clipped (then each element of the update's gradient is at
        most the clip value or norm: its square cannot overflow)."""
        return not (self.clipnorm is None and self.clipvalue is None
                    and self.global_clipnorm is None)

    def _update(self, xp: Any, i: int, p: Any, g: Any, scalars: dict[str, Any],
                apply: Any) -> None:
        raise InputError(_no_update(type(self)))

    def _fused_update(self, kernels: Any, params: list[Any], grads: list[Any],
                      scalars: dict[str, Any], apply: Any,
                      clip: tuple[str, float] | None = None) -> bool:
        """The update of every parameter by ``kernels`` (none where ``apply`` is False);
        False where this optimiser has none (a subclass that defines only ``_update`` then
        runs that). Not called where a subclass overrides ``_update`` alone (see :meth:`step`).
        ``clip`` (:meth:`_clip`): the gradients are unclipped, the kernels clip them (given
        only to xpcnn's own, and where the kernels' ``takes_clip`` accepts it)."""
        return False

    @staticmethod
    def _assign(xp: Any, a: Any, new: Any, apply: Any) -> None:
        """``a[...] = new``, or where ``apply`` (a 0-d boolean device array) is False, ``a`` as
        it was: one ``where`` per updated array, decided on the device."""
        a[...] = new if apply is None else xp.where(apply, new, a)

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments, by name, with the class (the clipping settings only
        where set), and a constant rate as it is now, as Keras' keeps the current
        learning_rate: one set with ``optimizer.lr`` (or by a callback) is ``lr``. Another
        schedule is given alone, as Keras' (whose rate on a schedule cannot be set):
        :func:`optimizer_from_config` starts it at its step 0, with neither the step count nor
        a rate set on it (a model file keeps both). A subclass whose constructor takes more
        must give them too (:meth:`check_config`, at save)."""
        clips = {k: v for k, v in self._clips() if v is not None}
        rate = Constant(self.lr) if type(self.schedule) is Constant and \
            self.lr_factor != 1.0 else self.schedule
        return {"class": type(self).__name__, "lr": rate.get_config(),
                "weight_decay": self.weight_decay, **clips}

    def compile_config(self) -> dict[str, Any]:
        """:meth:`get_config` with the schedule as it was made, a constant rate unscaled: the
        compile settings that model files and checkpoints write (a checkpoint resumes under
        them, compiled with an optimiser made the same way), the factor beside them."""
        config = self.get_config()
        if "lr" in config:
            config["lr"] = self.schedule.get_config()
        return config

    def _clips(self) -> tuple[tuple[str, float | None], ...]:
        return (("clipnorm", self.clipnorm), ("clipvalue", self.clipvalue),
                ("global_clipnorm", self.global_clipnorm))

    def _left_out(self) -> list[str]:
        """The settings that :meth:`get_config` gives only where they are not at their
        defaults (the clipping settings unset): a file without them loads those defaults."""
        return [k for k, v in self._clips() if v is None]

    def check_config(self) -> None:
        """Refuse to save an optimiser whose constructor takes settings that its
        ``get_config()`` does not give (but those it leaves out at their defaults,
        :meth:`_left_out`), and its schedule likewise. Run at save, not in get_config, which is
        also called elsewhere."""
        config = self.compile_config()
        check_config_class(self, config, "optimizer", "the constructor's arguments "
                     "({**super().get_config(), ...}: the class and the base's settings)")
        missing = unsaved_settings(self, config, self._left_out())
        untaken = untaken_settings(self, config)
        if missing:
            raise InputError(f"optimizer class {type(self).__name__} takes {missing} but its "
                             "get_config() does not return them: define get_config() returning "
                             "them (with super().get_config()), so that a saved model rebuilds "
                             "it")
        if untaken:
            raise InputError(f"optimizer class {type(self).__name__}'s get_config() gives "
                             f"{untaken}, which its constructor does not take, so that a saved "
                             "model could not rebuild it: take them in __init__ and pass them "
                             "on to super().__init__ (the base class writes its own settings: "
                             "weight_decay and the clipping ones set), or define get_config()")
        self.schedule.check_config()


class SGD(Optimizer):
    """SGD with optional momentum, Nesterov momentum and L2 weight decay (PyTorch semantics:
    g += wd * p; b = momentum * b + g; step along b, or g + momentum * b with Nesterov).

    ``weight_decay`` is PyTorch's coupled L2, which goes through the momentum; Keras 3's SGD
    ``weight_decay`` is decoupled (p -= lr * wd * p before the update), which xpcnn's SGD does
    not offer: the same number gives other weights. Keras' ``l2(l)`` kernel regularizer is
    ``weight_decay=2 * l`` here (every parameter decayed, biases included)."""

    @_takes_learning_rate
    def __init__(self, lr: float | Schedule = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | None = 0.0, *, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None) -> None:
        super().__init__(lr, weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm)
        if not _real(momentum) or not 0.0 <= momentum < 1.0:
            raise InputError(f"SGD momentum must be in [0, 1), got {momentum!r}")
        if flag(nesterov, "SGD nesterov") and momentum == 0.0:
            raise InputError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _slot_names_for_settings(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum else ()

    def _update(self, xp: Any, i: int, p: Any, g: Any, scalars: dict[str, Any],
                apply: Any) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self.slots["momentum"][i]
            # PyTorch starts the buffer at the first gradient, not at momentum * 0 + g: same.
            self._assign(xp, buf, self.momentum * buf + g, apply)
            # (where apply is False, p's new value below is not kept either)
            g = g + self.momentum * buf if self.nesterov else buf
        self._assign(xp, p, p - scalars["lr"] * g, apply)

    def _fused_update(self, kernels: Any, params: list[Any], grads: list[Any],
                      scalars: dict[str, Any], apply: Any,
                      clip: tuple[str, float] | None = None) -> bool:
        bufs = self.slots["momentum"] if self.momentum else None
        kernels.sgd_update(params, grads, bufs, scalars["lr"], self.weight_decay, self.momentum,
                           self.nesterov, apply,
                           # (no keyword where unclipped: kernels taking none still run)
                           **({} if clip is None else {"clip": clip}))
        return True

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma and Ba) with bias correction; ``weight_decay`` adds L2 to the gradient.
    ``amsgrad`` (Reddi et al., as PyTorch's): the denominator takes the largest second moment
    so far, vhat = max(vhat, v), a third slot.

    ``weight_decay`` is PyTorch's Adam's, coupled L2 (g += wd * p, then scaled by the second
    moment); Keras 3's Adam ``weight_decay`` is decoupled: Keras' ``Adam(weight_decay=wd)`` is
    xpcnn's ``AdamW(weight_decay=wd)`` (up to where epsilon goes), not ``Adam``'s."""

    keeps_squares = True
    counts_updates = True
    exact_scalars = ("lr",)
    decoupled = False

    @_takes_learning_rate
    def __init__(self, lr: float | Schedule = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float | None = 0.0, amsgrad: bool = False, *,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None) -> None:
        super().__init__(lr, weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm)
        if not (_real(beta_1) and _real(beta_2) and _real(epsilon)) or not (
                0.0 <= beta_1 < 1.0 and 0.0 <= beta_2 < 1.0) or epsilon <= 0:
            raise InputError("Adam needs 0 <= beta_1, beta_2 < 1 and epsilon > 0, got "
                             f"beta_1={beta_1!r}, beta_2={beta_2!r}, epsilon={epsilon!r}")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.amsgrad = flag(amsgrad, f"{type(self).__name__} amsgrad")

    def _slot_names_for_settings(self) -> tuple[str, ...]:
        return ("m", "v", *(("vhat",) if self.amsgrad else ()))

    def _counted(self, kernels: Any, scalars: dict[str, Any], apply: Any, dtype: Any
                 ) -> dict[str, Any]:
        """The decoupled decay factor, the step size with the first moment's bias correction
        and the second moment's bias correction at t, the updates applied to the moments, this
        one included, counted on the device where a step is skipped: as PyTorch's
        per-parameter step counts, a skipped float16 step does not count, and moments made
        afresh after a layer was frozen are corrected as new ones (not as ones ``iterations``
        old)."""
        decay, step, bc2 = kernels.adam_scalars(self.applied, scalars["lr"], apply,
                                                self.weight_decay, self.beta_1, self.beta_2,
                                                dtype)
        return {"decay": decay, "step": step, "bc2": bc2}

    def _update(self, xp: Any, i: int, p: Any, g: Any, scalars: dict[str, Any],
                apply: Any) -> None:
        if scalars["step"].dtype != p.dtype:  # (parameters of several dtypes: p's numbers)
            scalars = {k: xp.astype(a, p.dtype) for k, a in scalars.items()}
        new_p = p
        if self.weight_decay:
            if self.decoupled:
                new_p = p * scalars["decay"]  # (a device scalar of p's dtype)
            else:
                g = g + self.weight_decay * p
        m, v = self.slots["m"][i], self.slots["v"][i]
        b1, b2 = self.beta_1, self.beta_2
        self._assign(xp, m, b1 * m + (1.0 - b1) * g, apply)
        self._assign(xp, v, b2 * v + (1.0 - b2) * (g * g), apply)
        if self.amsgrad:
            vhat = self.slots["vhat"][i]
            self._assign(xp, vhat, xp.maximum(vhat, v), apply)
            v = vhat
        # (where apply is False, m and v are the old ones here, and p keeps its value)
        denom = xp.sqrt(v / scalars["bc2"]) + self.epsilon
        self._assign(xp, p, new_p - scalars["step"] * m / denom, apply)

    def _fused_update(self, kernels: Any, params: list[Any], grads: list[Any],
                      scalars: dict[str, Any], apply: Any,
                      clip: tuple[str, float] | None = None) -> bool:
        kernels.adam_update(params, grads, self.slots["m"], self.slots["v"], scalars["decay"],
                            scalars["step"], scalars["bc2"], self.weight_decay, self.decoupled,
                            self.beta_1, self.beta_2, self.epsilon, apply,
                            self.slots["vhat"] if self.amsgrad else None,
                            **({} if clip is None else {"clip": clip}))
        return True

    def get_config(self) -> dict[str, Any]:
        # (amsgrad only where set, as the clipping settings: a file without it, one written
        # before it included, is plain Adam's, and its checkpoint resumes into Adam(...))
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, **({"amsgrad": True} if self.amsgrad else {})}

    def _left_out(self) -> list[str]:
        return [*super()._left_out(), *(() if self.amsgrad else ("amsgrad",))]


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter): p *= 1 - lr * weight_decay,
    as PyTorch's AdamW, and as Keras 3's Adam and AdamW decay with ``weight_decay``."""

    decoupled = True

    @_takes_learning_rate
    def __init__(self, lr: float | Schedule = 1e-3, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.01, amsgrad: bool = False, *,
                 clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None) -> None:
        if weight_decay is None:  # (Keras' "no decay" where the default is 0, as Keras 3's
            # AdamW, whose default is not, refuses it: taken, it silently dropped the decay)
            raise InputError("AdamW(weight_decay=None): AdamW's weight_decay is a number, 0.01 "
                             "by default (Keras 3's AdamW refuses None too); give 0.0 for no "
                             "decay")
        super().__init__(lr, beta_1, beta_2, epsilon, weight_decay, amsgrad, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm)


class RMSprop(Optimizer):
    """RMSprop (Hinton's lecture 6e) as PyTorch's ``RMSprop(lr, alpha=rho, eps=epsilon,
    weight_decay, momentum, centered)`` computes it, with Keras' names and defaults (``lr``
    0.001, ``rho`` 0.9): g += wd * p; v = rho * v + (1 - rho) * g^2; with ``centered``, also
    the mean gradient a = rho * a + (1 - rho) * g, and v - a^2 for v below; u = g / (sqrt(v)
    + epsilon) (Keras adds epsilon under the root instead; a centered v - a^2 that rounds
    below 0 counts as 0, where PyTorch's goes NaN); with ``momentum``, b = momentum * b + u, and
    p -= lr * b, else p -= lr * u.

    ``weight_decay`` is PyTorch's coupled L2 (g += wd * p, above); Keras 3's RMSprop
    ``weight_decay`` is decoupled (p -= lr * wd * p before the update), which xpcnn's RMSprop
    does not offer: the same number gives other weights."""

    keeps_squares = True

    @_takes_learning_rate
    def __init__(self, lr: float | Schedule = 1e-3, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, weight_decay: float | None = 0.0,
                 *, clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None) -> None:
        super().__init__(lr, weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm)
        if not (_real(rho) and _real(momentum) and _real(epsilon)) or not (
                0.0 <= rho < 1.0 and 0.0 <= momentum < 1.0) or epsilon <= 0:
            raise InputError("RMSprop needs 0 <= rho < 1, 0 <= momentum < 1 and epsilon > 0, "
                             f"got rho={rho!r}, momentum={momentum!r}, epsilon={epsilon!r}")
        self.rho, self.momentum, self.epsilon = float(rho), float(momentum), float(epsilon)
        self.centered = flag(centered, "RMSprop centered")

    def _slot_names_for_settings(self) -> tuple[str, ...]:
        return ("v", *(("mean_grad",) if self.centered else ()),
                *(("momentum",) if self.momentum else ()))

    def _update(self, xp: Any, i: int, p: Any, g: Any, scalars: dict[str, Any],
                apply: Any) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * p
        rho, v = self.rho, self.slots["v"][i]
        self._assign(xp, v, rho * v + (1.0 - rho) * (g * g), apply)
        # (where apply is False, the slots keep their values, and so does p below)
        var = v
        if self.centered:
            a = self.slots["mean_grad"][i]
            self._assign(xp, a, rho * a + (1.0 - rho) * g, apply)
            # v >= a^2 exactly, but the difference can round below 0 (steady gradients): held
            # at 0 there, where PyTorch's square root makes NaN weights
            var = xp.where(v > a * a, v - a * a, xp.zeros((), dtype=v.dtype, device=v.device))
        u = g / (xp.sqrt(var) + self.epsilon)
        if self.momentum:
            b = self.slots["momentum"][i]
            self._assign(xp, b, self.momentum * b + u, apply)
            u = b
        self._assign(xp, p, p - scalars["lr"] * u, apply)

    def _fused_update(self, kernels: Any, params: list[Any], grads: list[Any],
                      scalars: dict[str, Any], apply: Any,
                      clip: tuple[str, float] | None = None) -> bool:
        kernels.rmsprop_update(params, grads, self.slots["v"],
                               self.slots["mean_grad"] if self.centered else None,
                               self.slots["momentum"] if self.momentum else None,
                               scalars["lr"], self.weight_decay, self.rho, self.momentum,
                               self.epsilon, apply,
                               **({} if clip is None else {"clip": clip}))
        return True

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum,
                "epsilon": self.epsilon, "centered": self.centered}


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get_optimizer(optimizer: str | Optimizer) -> Optimizer:
    if isinstance(optimizer, Optimizer):
        cls = type(optimizer)
        if "applied" not in vars(optimizer):  # (else an AttributeError at its first use)
            raise InputError(f"{cls.__name__}.__init__ must call super().__init__(lr) (with "
                             "weight_decay=... and the clipping settings, as the class takes "
                             "them), which sets up the optimizer's learning rate, step count "
                             "and slots")
        if defining_class(cls, "_update") is Optimizer and defining_class(cls, "step") is \
                Optimizer:  # (refused at compile: its first step would be)
            raise InputError(_no_update(cls))
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    torch = next((k for k in type(optimizer).__mro__
                  if str(k.__module__).startswith("torch.optim")), None)
    if torch is not None:  # (was: "unknown optimizer" around torch's repr, many lines long)
        name = type(optimizer).__name__
        ours = OPTIMIZERS.get(name.lower())
        lr = getattr(optimizer, "defaults", {}).get("lr", 0.001)
        raise InputError(
            f"compile(optimizer=...) was given PyTorch's torch.optim.{name}, which xpcnn does "
            "not run: give xpcnn's optimiser its rate and settings only, " + (
                f"xpcnn.optim.{ours.__name__}({lr!r}, ...)" if ours is not None else
                f"xpcnn has no {name}: xpcnn.optim.SGD, Adam, AdamW or RMSprop, such as "
                f"xpcnn.optim.Adam({lr!r}, ...)") + ", the settings by Keras' names "
            "(momentum=, beta_1=, beta_2=, epsilon=, weight_decay=); compile binds the model's "
            "parameters to it")
    raise InputError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)} "
                     "or an Optimizer instance")


def optimizer_from_config(config: dict[str, Any]) -> Optimizer:
    """The optimiser that ``config`` (:meth:`Optimizer.get_config`'s) describes, at step 0."""
    name, config = _class_config(config, "an optimizer's", "{'class': 'SGD', 'lr': 0.01}")
    cls = registered(OPTIMIZER_CLASSES, name, "optimizer")
    # (a schedule's configuration, as files hold it; a number, as one edits a file by hand)
    lr = config.get("lr")
    config["lr"] = lr if _real(lr) else schedule_from_config(lr)
    return cls(**config)
