"""The module-level helpers of :class:`~xpcnn.training.Trainer`'s ``fit``, ``evaluate`` and
``predict``: their arguments checked and turned into what the loops take (``validation_freq``,
``checkpoint=PATH``, the validation data, sample weights beside a dataset, a ``train_step`` that
a subclass overrides, one batch of the ``*_on_batch`` methods), and small pieces of their loops
(the callbacks' ``params``, the warning of data that ran out; evaluate's and predict's
progress bar is :class:`~xpcnn.callbacks.ProgbarLogger`, as fit's).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import checks
from ..callbacks import BackupAndRestore, Callback, is_save_freq
from ..data.arrays import check_source, is_stream, one_input
from ..data.sources import Batches
from ..errors import InputError, warn

_GRAPHS = ("compile(cuda_graphs=None), the default, captures each training step on CuPy in a "
           "CUDA graph and replays it, xpcnn's way to cut a step's launch cost")
#: Keras 3's compile keywords that xpcnn's compile takes only at values that are xpcnn's
#: behaviour (their Keras default spelled out, run_eagerly=True: cuda_graphs=False):
#: (the values taken, what to do instead of another value).
KERAS_COMPILE: dict[str, tuple[tuple[Any, ...], str]] = {
    "loss_weights": ((None, (1.0,)), "an xpcnn model has one output and one loss, so there "
                                     "is no other loss to weigh it against; to scale it, weigh "
                                     "its samples (fit's sample_weight=np.full(len(x), w))"),
    "weighted_metrics": ((None, ()), "xpcnn's metrics are never weighted (Keras' metrics, not "
                                     "weighted_metrics): sample_weight weighs the loss alone; "
                                     "compute a weighted accuracy from predict (in a callback, "
                                     "on_epoch_end)"),
    "run_eagerly": ((False, True), "xpcnn has no compiled step function to leave: each step "
                                   "runs its Python (a print or breakpoint in a layer runs "
                                   "every step) except where a CUDA graph replays it; True is "
                                   "compile(cuda_graphs=False), which never does"),
    "steps_per_execution": ((1,), "xpcnn runs one step a call; " + _GRAPHS),
    "jit_compile": (("auto", False), "xpcnn compiles no XLA (nor torch.compile); " + _GRAPHS),
    "auto_scale_loss": ((True,), "compile(precision='mixed_float16') always scales the loss, "
                                 "dynamically (model.loss_scale); 'mixed_bfloat16' and "
                                 "'float32' need no scaling (False is taken there)"),
}


def check_keras_compile(given: dict[str, Any]) -> None:
    """Keras 3's compile keywords in ``given`` (name: value), refused where not one of the
    values :data:`KERAS_COMPILE` takes, naming what to do instead."""
    for key, value in given.items():
        taken, instead = KERAS_COMPILE[key]
        if not checks.is_one_of(value, taken):
            shown = " or ".join(repr(list(v) if isinstance(v, tuple) else v) for v in taken)
            raise InputError(f"compile({key}={value!r}): Keras' keyword, which xpcnn's compile "
                             f"takes only as {shown}: {instead}")


def batch_length(model: Any, x: Any) -> int:
    """The number of samples in ``x``, one batch of arrays (the ``*_on_batch`` methods) of
    ``model`` (``[x]`` as ``x``: :func:`~xpcnn.data.arrays.one_input`): at least 1, so that an empty
    one reaches the checks that name it."""
    if is_stream(x):
        raise InputError("a *_on_batch method takes one batch of arrays, not a dataset or an "
                         "iterable of batches (fit, evaluate and predict take those)")
    x = one_input(model, x)
    shape = getattr(x, "shape", None)
    if shape is None:  # (a list of samples)
        try:
            return max(1, len(x))
        except TypeError:  # (a number: refused by the checks, by name)
            return 1
    # (shape, not len(): the standard has no len() of an array, array_api_strict none at all)
    return max(1, int(shape[0])) if len(shape) else 1


def one_of(callbacks: list[Callback], kind: type[Callback], call: str = "fit") -> Any:
    """The one ``kind`` callback (History, ProgbarLogger) among the user's ``callbacks``, None
    where there is none; refused where there are several (``call``, fit, evaluate or predict,
    keeps one record, shows one bar)."""
    found = [cb for cb in callbacks if isinstance(cb, kind)]
    if len(found) > 1:
        raise InputError(f"callbacks holds {len(found)} {kind.__name__} callbacks: {call} takes "
                         f"one (its own {kind.__name__}, which it adds where callbacks has none)")
    return found[0] if found else None


def parse_validation_freq(value: Any) -> int | frozenset[int]:
    """fit's ``validation_freq``, as Keras 3 takes it: k (validate after every k-th epoch) or
    a collection of the 1-based epochs to validate after."""
    def epoch_number(e: Any) -> bool:
        return isinstance(e, int | np.integer) and not isinstance(e, bool) and e >= 1

    many = isinstance(value, list | tuple | set | frozenset | range)
    if not (all(map(epoch_number, value)) and len(value) > 0 if many else epoch_number(value)):
        raise InputError(f"validation_freq must be a positive integer k (validate after every "
                         f"k-th epoch) or a collection of epoch numbers from 1, got {value!r}")
    return frozenset(int(e) for e in value) if many else int(value)


def inference_params(verbose: int, data: Batches) -> dict[str, Any]:
    """The ``params`` of evaluate's and predict's callbacks, as Keras 3 sets them: one epoch
    of ``steps`` batches (None where unknown before the data ends)."""
    return {"verbose": verbose, "epochs": 1, "steps": data.steps}


def drop_sources(params: dict[str, Any]) -> None:
    """Take the batch source, the stateful callbacks and the CSVLoggers out of fit's
    ``params`` once fit has ended: its callbacks (model.history among them) keep the dict."""
    params.pop("data", None)
    params.pop("stateful", None)
    params.pop("csv_loggers", None)


def reads_iterator(data: Batches) -> bool:
    """Whether ``data`` reads a user's iterator (a generator): one pass, shared by the
    epochs, not a new pass each epoch."""
    return getattr(data, "iterator", None) is not None


def warn_ran_out(data: Batches, steps: int, epoch: int | None, seen: bool = True,
                 ranks: list[int] | None = None) -> None:
    """Warn that evaluation (``epoch`` None) or fit's validation data gave ``steps`` of its
    ``data.steps`` batches, as Keras 3 warns (its means are those of the batches it gave);
    ``seen``: whether any rank gave a sample (else the epoch has no val_* logs); ``ranks``: on
    several ranks, those whose data ran out (``steps``: the fewest they gave)."""
    what = "evaluation data" if epoch is None else "validation data"
    setting = "steps" if epoch is None else "validation_steps"
    then = ("" if epoch is None or not reads_iterator(data) else
            ": training stops after this epoch (an iterator needs validation_steps batches "
            "for every epoch)" + ("; this epoch has no val_* logs" if not seen else ""))
    warn(f"the {what} ran out after {steps} of its {data.steps} batches ({setting})"
         + ("" if ranks is None else f" on rank(s) {ranks}")
         + ("" if epoch is None else f" in epoch {epoch + 1}") + then)


def checkpoint_callback(checkpoint: str | os.PathLike[str] | None, every: int | str,
                        resume: bool) -> list[Callback]:
    """fit's ``checkpoint=PATH``, as the :class:`BackupAndRestore` it is short for."""
    if checkpoint is not None:
        if not is_save_freq(every):  # (named as fit's argument, not as the callback's)
            raise InputError(f"checkpoint_every must be a positive number of steps or 'epoch', "
                             f"got {every!r}")
        backup = BackupAndRestore(checkpoint, every, resume=resume, delete_checkpoint=False)
        backup.what = "fit(checkpoint=...)"
        return [backup]
    if resume:
        raise InputError("resume=True needs checkpoint=PATH, the file to resume from")
    if not (isinstance(every, str) and every == "epoch"):
        raise InputError(f"checkpoint_every={every!r} needs checkpoint=PATH, the file to "
                         "write: without it no checkpoint would be written")
    return []


def check_fit_data(x: Any, y: Any, validation_data: Any, validation_split: float,
                   steps: int | None, validation_steps: int | None,
                   class_weight: Any = None, sample_weight: Any = None) -> None:
    """fit's data arguments, checked before any batch source is made (none draws a batch)."""
    checks.number(validation_split, "validation_split", 0.0, 1.0, high_open=True)
    checks.check_class_weight_type(class_weight)
    refuse_stream_weights(x, sample_weight)
    if validation_split and validation_data is not None:  # (one would be ignored, silently)
        raise InputError(f"pass validation_data or validation_split, not both: got "
                         f"validation_split={validation_split!r} and validation_data")
    if validation_split and is_stream(x):
        raise InputError("validation_split needs arrays; pass validation_data with a "
                         "dataset or generator")
    check_source(x, y, steps)
    if validation_data is not None:
        check_source(*validation_triple(validation_data)[:2], validation_steps, "x_val",
                     steps_name="validation_steps")


def validation_triple(validation_data: Any) -> tuple[Any, Any, Any]:
    """``validation_data`` as (x_val, y_val, sample weights or None); a dataset or an iterable
    of batches holds its targets (y_val None)."""
    if is_stream(validation_data):
        return validation_data, None, None
    if not isinstance(validation_data, tuple | list) or len(validation_data) not in (2, 3):
        raise InputError("validation_data must be a pair (x_val, y_val), a triple (x_val, "
                         "y_val, sample weights), a dataset or an iterable of batches, got "
                         f"{type(validation_data).__name__}")
    x, y, *w = validation_data
    refuse_stream_weights(x, w[0] if w else None)
    return x, y, w[0] if w else None


def refuse_stream_weights(x: Any, weights: Any) -> None:
    """Sample weights given beside a dataset or an iterable of batches: refused (they give
    their own)."""
    if weights is not None and is_stream(x):
        raise InputError("sample_weight= needs arrays x and y; a dataset or an iterable of "
                         "batches gives its sample weights itself, as (x, y, sample_weight) "
                         "batches or (x_i, y_i, w_i) samples")


def weights_name(what: str) -> str:
    """How the sample weights of the data called ``what`` are named in errors."""
    return "sample_weight" if what == "x" else f"the sample weights of {what}"
