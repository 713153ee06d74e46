"""Command line: ``xpcnn train``, ``xpcnn visualize`` and ``xpcnn info``.

A command that cannot work ends with exit status 2 and one line on stderr naming the flag to
change, before any data is loaded or any training done; every path it will write is checked
first, so that no work is lost at the end. Ctrl-C ends training with status 130 and one line
saying where it stopped (with ``--checkpoint``, after writing a checkpoint at that step, from
which ``--resume`` continues). With ``--json``, stdout holds exactly one JSON object: the results,
or ``{"error": ..., "exit_status": ...}``. A reader of the output that stops early (``| head``)
loses no work: the command goes on quietly to its end, with exit status 141.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from . import __version__, checks, distributed, optim
from .backend import PRECISIONS, get_backend
from .callbacks import Callback, CSVLogger, EarlyStopping
from .datasets.download import Spelling, data_dir_spelled
from .errors import InputError, TrainingInterrupted, XpcnnError
from .files import try_writing_in
from .models import NAMES, build_model
from .onnx_export import ONNX_EXTRA_HINT
from .saving.checkpoint import ResumeAdvice, resume_advised
from .saving.model_file import refuse_foreign_suffix
from .viz import TRAINING_PLOTS, VIZ_EXTRA_HINT

DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10")
DEFAULT_MODEL = {"shapes": "shapes", "mnist": "mnist", "fashion-mnist": "mnist",
                 "cifar10": "cifar"}
DEFAULT_EPOCHS = {"shapes": 4, "mnist": 3, "fashion-mnist": 5, "cifar10": 10}
VIZ_HINT = f"needs matplotlib, which is not installed: {VIZ_EXTRA_HINT}"
#: How the dataset loaders' messages name the data folder to a command-line user.
DATA_DIR_FLAG = Spelling("--data-dir", "--data-dir DIR")


class UsageError(XpcnnError):
    """A command-line argument that cannot work; the message starts with the flag."""


class Interrupted(Exception):
    """Ctrl-C: the message says where the command stopped."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors become one line (see :func:`main`) rather than a usage
    block and an exit from inside the parser; an abbreviated flag is refused (``--jso`` was
    taken for ``--json`` by argparse, not by main(), which printed no JSON then)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)  # (the subcommands' parsers too)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- values the flags take ---------------------------------------------------------------------


def flag_type(convert: Callable[[str], Any], check: Callable[[Any, str], Any],
              want: str) -> Callable[[str], Any]:
    """A flag's value: ``convert(text)``, which ``check`` (an :mod:`xpcnn.checks` helper, called
    as ``check(value, what)``) accepts; otherwise "expected {want}, got {text!r}"."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
            check(value, want)
        except (ValueError, OverflowError):  # (InputError is a ValueError)
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        return value

    return parse


POSITIVE = flag_type(int, checks.positive_int, "a whole number >= 1")
NON_NEGATIVE = flag_type(int, checks.non_negative_int, "a whole number >= 0")
LEARNING_RATE = flag_type(float, partial(checks.number, low=0.0, low_open=True),
                          "a learning rate > 0, such as 3e-3")
FRACTION = flag_type(float, partial(checks.number, low=0.0, high=1.0, low_open=True,
                                    high_open=True),
                     "a fraction between 0 and 1 (both excluded), such as 0.1")
# A stage tour is about (max maps + 2) x 1.15 (layers + 1) inches: a deep model's may be too
# large at the top of both ranges (visualize then names the largest --dpi that fits).
MAX_MAPS = flag_type(int, partial(checks.number, low=1, high=32), "a whole number from 1 to 32")
DPI = flag_type(float, partial(checks.number, low=10.0, high=300.0),
                "a resolution from 10 to 300 pixels per inch")
PRECISION_NAMES = tuple(PRECISIONS)  # (compile's names)


# -- paths, checked before any work ------------------------------------------------------------


def _user_path(path: str) -> str:
    """A path argument with ``~`` expanded, once, for its checks and its use alike (a shell
    leaves ``--save=~/m.npz`` as it is)."""
    return os.path.expanduser(path)


def _no_folder(flag: str, path: str, folder: str | Path) -> UsageError:
    """``folder``, where ``path`` would be written, is missing or not a folder."""
    what = "is not a folder" if os.path.exists(folder) else "does not exist"
    return UsageError(f"argument {flag}: {path!r}: the folder {str(folder)!r} {what}")


def _cannot_write(flag: str, path: str, folder: str | Path, error: OSError) -> UsageError:
    """``path`` cannot be written (in ``folder``, where known): ``error`` says why."""
    where = f" in {str(folder)!r}" if folder else ""
    return UsageError(f"argument {flag}: {path!r}: cannot write{where} "
                      f"({error.strerror or error})")


#: The file a folder given to an output flag might have been meant to hold.
_EXAMPLE_FILE = {"--export": "model.onnx", "--log": "log.csv", "--json": "results.json"}


def output_file(flag: str, path: str | None, replaced: bool = True) -> None:
    """A file to write for ``flag``, unless None: :func:`xpcnn.checks.output_file`'s checks
    (:func:`~xpcnn.checks.output_file_problem`), in a folder that exists (the writers would
    make a missing one: here a mistyped folder is refused), worded in terms of the flag. Where
    the file is written in place (not ``replaced``), it may be a pipe (a script's plain write
    may go to /dev/stdout)."""
    if path is None:
        return
    example = _EXAMPLE_FILE.get(flag, "model.npz")
    if not path:
        raise UsageError(f"argument {flag}: an empty path; give a file path such as "
                         f"{example!r}")
    problem = checks.output_file_problem(path, replaced, new_folders=False)
    if problem is None:
        return
    kind, folder, error = problem
    if kind in ("names a folder", "is a folder"):
        raise UsageError(f"argument {flag}: {path!r} is a folder; give a file path such as "
                         f"{str(Path(path) / example)!r}")
    if kind == "not a regular file":
        raise UsageError(f"argument {flag}: {path!r} exists and is not a regular file (a "
                         "device or a pipe), where the file is written anew and renamed over "
                         f"the old one; give a file path such as {example!r}")
    if kind.startswith("standard "):
        raise UsageError(f"argument {flag}: {path!r} is this command's {kind}, redirected to "
                         f"the file {folder!r}: {checks.stream_as_file(replaced)}")
    if kind == "no folder":
        raise _no_folder(flag, path, folder)
    assert error is not None  # (a "cannot write" comes with the OS's error)
    raise _cannot_write(flag, path, folder, error) from error


def output_folder(flag: str, path: str) -> None:
    """A folder to write into: it exists, or its parent does (it is created then)."""
    if not path:  # (Path("") is the working folder; `--plots "$OUT"` with OUT unset, say)
        raise UsageError(f"argument {flag}: an empty path; give a folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"argument {flag}: {path!r} exists and is not a folder")
    folder = p if p.is_dir() else p.absolute().parent
    if not folder.is_dir():
        raise _no_folder(flag, path, folder)
    try:
        try_writing_in(folder)
    except OSError as e:
        raise _cannot_write(flag, path, folder, e) from e


def distinct_outputs(outputs: dict[str, str | None]) -> None:
    """Each output flag given (not None) a file of its own."""
    for flag, path in outputs.items():
        others = [f for f, p in outputs.items() if f != flag and p is not None and path
                  is not None and Path(p).resolve() == Path(path).resolve()]  # (links too)
        if others:
            raise UsageError(f"argument {flag}: the same file as {others[0]}; each output "
                             "needs a file of its own")


def input_folder(flag: str, path: str | None) -> None:
    """A folder to read, unless None."""
    if path is None:
        return
    if not path:  # (Path("") is the current folder; the loaders refuse it as data_dir="")
        raise UsageError(f"argument {flag}: an empty path; give a folder")
    if not Path(path).is_dir():
        what = "is not a folder" if Path(path).exists() else "does not exist"
        raise UsageError(f"argument {flag}: the folder {path!r} {what}")


def _input_file(flag: str, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "is not a file" if p.exists() else \
            "does not exist"
        raise UsageError(f"argument {flag}: {path!r} {what}")


def check_device(flag: str, name: str) -> None:
    """A device flag's value that works here."""
    try:
        get_backend(name)
    except XpcnnError as e:
        raise UsageError(f"argument {flag}: {e}") from e


def needs_matplotlib(flag: str | None) -> None:
    """Refuse ``flag`` (None: the command itself, ``xpcnn visualize``) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(VIZ_HINT if flag is None else f"argument {flag}: {VIZ_HINT}")


# -- train -------------------------------------------------------------------------------------


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a reference model on a dataset and report accuracy",
                       description="Train a reference model; by default the built-in shapes "
                       "dataset on the CPU (no download).")
    p.add_argument("--dataset", choices=DATASETS, default="shapes")
    p.add_argument("--data-dir", default=None, type=_user_path,
                   help="an existing folder with the dataset files (default: $XPCNN_DATA_DIR, "
                   "else the per-user cache, downloading there if needed)")
    p.add_argument("--model", choices=sorted(NAMES), default=None,
                   help="reference model (default: the dataset's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--epochs", type=POSITIVE, default=None)
    p.add_argument("--batch-size", type=POSITIVE, default=64,
                   help="samples per step (under mpiexec -n N: per process, N times this in all)")
    p.add_argument("--lr", type=LEARNING_RATE, default=None, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adam", "adamw", "rmsprop", "sgd"), default="adam")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning-rate schedule over the whole run")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="float32")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--val-split", type=FRACTION, default=None,
                   help="hold out this fraction of the training set; accuracy is then "
                   "reported on it (the default for a dataset without a test split: 0.1)")
    p.add_argument("--limit", type=POSITIVE, default=None,
                   help="train on the first N training samples only")
    p.add_argument("--save", default=None, type=_user_path, metavar="PATH",
                   help="write the trained model here")
    p.add_argument("--export", default=None, type=_user_path, metavar="PATH.onnx",
                   help="write the trained model as ONNX here (needs onnx: pip install "
                   "\"xpcnn[onnx]\")")
    p.add_argument("--plots", default=None, type=_user_path, metavar="DIR",
                   help="write training curves (train against the evaluation split, which is "
                   "then evaluated every epoch) and the confusion matrix as PNGs to DIR "
                   "(needs matplotlib: pip install \"xpcnn[viz]\")")
    p.add_argument("--checkpoint", default=None, type=_user_path, metavar="PATH",
                   help="keep the whole training state in this file (written atomically at the "
                   "end of every epoch, every --checkpoint-every steps, and where Ctrl-C stops "
                   "the run)")
    p.add_argument("--checkpoint-every", type=POSITIVE, default=None, metavar="STEPS",
                   help="also write the checkpoint every STEPS training steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint where an interrupted run stopped (same "
                   "final weights as an uninterrupted run); starts afresh if the file is absent")
    p.add_argument("--early-stopping", type=NON_NEGATIVE, default=None, metavar="PATIENCE",
                   help="stop when the evaluation split's loss (evaluated every epoch) has not "
                   "improved for PATIENCE epochs, and keep the best epoch's weights (with "
                   "--val-split the test set plays no part in that choice)")
    p.add_argument("--log", default=None, type=_user_path, metavar="CSV",
                   help="write each epoch's metrics to this CSV file")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout: the results, or the error")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--epoch-lines", action="store_true",
                   help="one line an epoch instead of progress bars (Keras' verbose=2: for "
                   "log files)")


def _check_train(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be known before loading data or training."""
    for flag, needs in (("--resume", args.resume), ("--checkpoint-every",
                                                    args.checkpoint_every is not None)):
        if needs and not args.checkpoint:
            raise UsageError(f"argument {flag}: needs --checkpoint PATH, the file "
                             f"{'to resume from' if flag == '--resume' else 'to write'}")
    input_folder("--data-dir", args.data_dir)
    outputs = {"--save": args.save, "--checkpoint": args.checkpoint, "--log": args.log,
               "--export": args.export}
    for flag, path in outputs.items():
        output_file(flag, path)
        if flag in ("--save", "--checkpoint") and path is not None and not (
                flag == "--checkpoint" and os.path.exists(path)):  # (before training: its
            try:  # save was refused after it, the model lost; an existing checkpoint resumes)
                refuse_foreign_suffix(path, f"argument {flag}:")
            except InputError as e:
                raise UsageError(str(e)) from None
    if args.plots is not None:
        outputs.update(_plots_outputs(args.plots, outputs))
        needs_matplotlib("--plots")
    distinct_outputs(outputs)  # (the figures too: they overwrote a --save of DIR/history.png)
    if args.export is not None and importlib.util.find_spec("onnx") is None:
        raise UsageError(f"argument --export: needs onnx, which is not installed: "
                         f"{ONNX_EXTRA_HINT}")
    check_device("--device", args.device)
    _check_model(args.model or DEFAULT_MODEL[args.dataset], args.dataset)
    compute = PRECISIONS[args.precision]
    if compute is not None:  # (bfloat16 needs ml_dtypes: was refused after loading the data)
        try:
            get_backend(args.device).dtype(compute)
        except XpcnnError as e:
            raise UsageError(f"argument --precision: {args.precision} on {args.device}: "
                             f"{e}") from e


def _plots_outputs(folder: str, outputs: dict[str, str | None]) -> dict[str, str]:
    """``--plots``' folder checked (not another output's path, writable) and its figures'
    paths, for :func:`distinct_outputs` (an existing file there is overwritten)."""
    for flag, path in outputs.items():
        if path is not None and Path(path).resolve() == Path(folder).resolve():
            raise UsageError(f"argument --plots: {folder!r} is also the path of {flag}; give "
                             "--plots a folder of its own")
    output_folder("--plots", folder)
    figures = {f"--plots ({name})": os.path.join(folder, name) for name in TRAINING_PLOTS}
    for path in figures.values():
        if os.path.isdir(path):
            raise UsageError(f"argument --plots: {path!r} is a folder, where a figure would "
                             "be written; move it, or give --plots another folder")
        if os.path.isdir(folder):  # (a missing one is made: nothing in it yet)
            output_file("--plots", path, replaced=False)
    return figures


def _check_model(name: str, dataset: str) -> None:
    """``--model`` takes ``--dataset``'s images (built here for them: a few milliseconds)."""
    from .datasets import IMAGE_SHAPES

    shape = IMAGE_SHAPES[dataset]
    try:
        build_model(name, 10, shape, device="cpu")  # (on the host: the same layers' checks)
    except InputError as e:  # (a network made for other images: resnet20's are CIFAR's)
        raise UsageError(f"argument --model: {name} does not take {dataset}'s "
                         f"{'x'.join(map(str, shape))} images: {e}") from e


def percent(fraction: float) -> str:
    """``fraction`` as a percentage for messages: 0.1 as "10%"."""
    return f"{100 * fraction:g}%"


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratification-free random split of ``n`` samples: the indices of (train,
    held-out), ``fraction`` of them (rounded, at least one) held out."""
    n_val = max(1, int(round(n * fraction)))
    order = np.random.default_rng([seed, 12345]).permutation(n)
    return order[n_val:], order[:n_val]


def hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int
             ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`split_indices` applied to (x, y): (train, held-out)."""
    train, val = split_indices(len(x), fraction, seed)
    if not len(train):
        raise UsageError(f"argument --val-split: {fraction:g} of the {len(x)} training images "
                         f"holds out {len(val)} and leaves none to train on; choose a smaller "
                         "fraction")
    return (x[train], y[train]), (x[val], y[val])


def train(args: argparse.Namespace) -> dict[str, Any]:
    from .datasets import load_dataset

    _check_train(args)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if not distributed.is_root():  # on several ranks (mpiexec), rank 0 speaks for all
        say = lambda *a: None  # noqa: E731
    (x, y), test = load_dataset(args.dataset, data_dir=args.data_dir)
    evaluated_on = "test set"
    if test is None or args.val_split is not None:
        fraction = 0.1 if args.val_split is None else args.val_split
        (x, y), test = hold_out(x, y, fraction, args.seed)
        evaluated_on = f"held-out {percent(fraction)} of the training set"
        if args.val_split is None:
            say(f"{args.dataset} in this folder has no test split: holding out "
                f"{percent(fraction)} of the training set (--val-split) and reporting accuracy "
                "on it")
    if args.limit is not None:
        x, y = x[:args.limit], y[:args.limit]
    x_test, y_test = test
    model_name = args.model or DEFAULT_MODEL[args.dataset]
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    classes = int(max(y.max(), y_test.max())) + 1
    model = build_model(model_name, classes, x.shape[1:], device=args.device, seed=args.seed)
    # (on several ranks, steps of the global batch: N x --batch-size)
    steps_per_epoch = -(-len(x) // (args.batch_size * distributed.world().size))
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 3e-3)
    schedule = optim.CosineDecay(lr, epochs * steps_per_epoch, min_lr=lr * 0.01) \
        if args.schedule == "cosine" else optim.Constant(lr)
    optimizer = {"adam": lambda: optim.Adam(schedule), "adamw": lambda: optim.AdamW(schedule),
                 "rmsprop": lambda: optim.RMSprop(schedule),
                 "sgd": lambda: optim.SGD(schedule, momentum=0.9, nesterov=True,
                                          weight_decay=5e-4)}[args.optimizer]()
    model.compile(optimizer=optimizer, precision=args.precision)
    ranks = distributed.world().size
    others = f" and {ranks - 1} other rank(s), a global batch of {ranks * args.batch_size}" \
        if ranks > 1 else ""
    say(f"training {model_name} on {args.dataset} ({len(x)} images {x.shape[1:]}) for {epochs} "
        f"epoch{'s' * (epochs != 1)} on {model.backend.label}{others}")
    callbacks: list[Callback] = []
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping("val_loss", patience=args.early_stopping,
                                       restore_best_weights=True, verbose=not args.json))
    if args.log:  # (callbacks print and write on rank 0 only)
        # (not appended to: a resumed run's log is written anew from its first epoch's end,
        # with the rows of the epochs its checkpoint holds first, so that it holds the
        # uninterrupted run's rows even where a run stopped between a row and its checkpoint)
        callbacks.append(CSVLogger(args.log))
    kept_before = _file_state(args.checkpoint)
    t0 = time.perf_counter()
    try:
        with resume_advised(RESUME_ADVICE):  # (a refused --resume names the flags to keep)
            history = model.fit(
                x, y, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                verbose=0 if args.quiet or args.json else 2 if args.epoch_lines else 1,
                checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every or "epoch",
                resume=args.resume, callbacks=callbacks,
                validation_data=(x_test, y_test) if args.plots is not None or
                args.early_stopping is not None else None)
    except TrainingInterrupted as e:
        raise Interrupted(f"interrupted at {e.where}; the checkpoint {e.checkpoint} holds the "
                          "training state there: run the same command with --resume to "
                          "continue") from None
    except KeyboardInterrupt:  # (with --checkpoint: a second Ctrl-C, which does not wait)
        done = model.optimizer.iterations  # type: ignore[union-attr]
        # (the last step done: step N/N of an epoch that ended, not step 0 of the next)
        epoch, step = divmod(done - 1, steps_per_epoch) if done else (0, -1)
        raise Interrupted(f"interrupted at epoch {epoch + 1}, after step "
                          f"{step + 1}/{steps_per_epoch}; "
                          + _what_was_kept(args, kept_before, steps_per_epoch)) from None
    seconds = time.perf_counter() - t0
    loss, accuracy = model.evaluate(x_test, y_test)
    say(f"{evaluated_on} accuracy: {accuracy:.4f} (loss {loss:.4f}), "
        f"{len(x_test)} images; training took {seconds:.1f} s")
    if args.save:
        model.save(args.save)
        say(f"saved the model to {args.save}")
    if args.export:
        model.export(args.export)
        say(f"exported the model as ONNX to {args.export}")
    if args.plots is not None and distributed.is_root():
        from .datasets import class_names
        from .viz import write_training_plots

        for path in write_training_plots(args.plots, history, model, x_test, y_test,
                                         class_names(args.dataset)):
            say(f"wrote {path}")
    trained = len(history.epoch)  # (a resumed run's earlier epochs too; fewer: stopped early)
    return {"test_accuracy": accuracy, "test_loss": loss,
            "evaluated_on": evaluated_on, "epochs": trained, "epochs_asked": epochs,
            "stopped_early": trained < epochs, "seconds": round(seconds, 3),
            "device": model.backend.label, "dataset": args.dataset, "model": model_name,
            "train_samples": int(len(x)), "test_samples": int(len(x_test)),
            "history": history.history}


def _file_state(path: str | None) -> tuple[int, int, int] | None:
    """What tells whether a file was written again since (None: absent, or no path)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)


def _what_was_kept(args: argparse.Namespace, before: tuple[int, int, int] | None,
                   steps_per_epoch: int) -> str:
    """After a Ctrl-C that did not wait for a checkpoint (the second one): what --checkpoint's
    file holds now, which the interruption left as it was (it is written by a rename)."""
    if not args.checkpoint:
        return "nothing was kept (--checkpoint PATH keeps the training state, and --resume " \
            "continues from it)"
    now = _file_state(args.checkpoint)
    if now is None:
        return f"nothing was kept (no checkpoint had been written to {args.checkpoint} yet)"
    if now == before and not args.resume:  # (an earlier run's file, which this one never wrote)
        return f"nothing of this run was kept ({args.checkpoint} holds an earlier run's " \
            "checkpoint, as it was before this run)"
    where = ""
    try:  # (its position, from the file's small JSON entry; the arrays are not read)
        from .saving.checkpoint import checkpoint_config, read_progress
        from .saving.npz import NpzArchive

        with NpzArchive(args.checkpoint, "the checkpoint") as npz:
            progress = read_progress(checkpoint_config(npz).get("progress"), args.checkpoint)
        where = f" (the end of epoch {progress.epoch})" if not progress.step else \
            f" (epoch {progress.epoch + 1}, step {progress.step}/{steps_per_epoch})"
        if not progress.step and not progress.epoch:
            where = " (the start of training)"
    except Exception:  # (the message goes on without the position)
        pass
    return f"the last complete checkpoint stays in {args.checkpoint}{where}: run the same " \
        "command with --resume to continue from it"


# -- visualize and info ------------------------------------------------------------------------


def _add_visualize(sub: Any) -> None:
    p = sub.add_parser("visualize", help="figures of a saved model: feature maps and filters",
                       description="Write the feature maps after every layer for one dataset "
                       "image (the stage tour) and the filters of every Conv2D layer as PNGs; "
                       'needs matplotlib (pip install "xpcnn[viz]").')
    p.add_argument("--model", required=True, type=_user_path, metavar="PATH",
                   help="a model file from --save")
    p.add_argument("--dataset", choices=DATASETS, default="shapes")
    p.add_argument("--data-dir", default=None, type=_user_path,
                   help="folder with the dataset files (as train)")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="where --index points (default: test, else train)")
    p.add_argument("--index", type=NON_NEGATIVE, default=0, help="which image of the split")
    p.add_argument("--out", default="figures", type=_user_path, metavar="DIR",
                   help="folder for the PNGs")
    p.add_argument("--max-maps", type=MAX_MAPS, default=8,
                   help="feature maps shown per layer, 1 to 32")
    p.add_argument("--dpi", type=DPI, default=100,
                   help="PNG pixels per inch, 10 to 300; a figure has at most 100 million pixels "
                   "(a deep model's stage tour at many maps may need less: the error says how "
                   "much), checked before the dataset is loaded")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout: what was written, or the error")


def visualize(args: argparse.Namespace) -> dict[str, Any]:
    from .viz import visualize_command

    _input_file("--model", args.model)
    input_folder("--data-dir", args.data_dir)
    output_folder("--out", args.out)
    needs_matplotlib(None)
    check_device("--device", args.device)
    return visualize_command(args)


def info(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, devices and the BLAS in use."""
    import array_api_compat

    check_device("--device", args.device)
    out: dict[str, Any] = {"xpcnn": __version__, "python": sys.version.split()[0],
                           "numpy": np.__version__,
                           "array_api_compat": array_api_compat.__version__}
    try:
        cfg = np.show_config(mode="dicts")
        out["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # older NumPy: no dict mode
        out["numpy_blas"] = None
    try:  # (bfloat16 on NumPy and CuPy, for mixed_bfloat16; its version read, not imported)
        out["ml_dtypes"] = importlib.metadata.version("ml_dtypes")
    except importlib.metadata.PackageNotFoundError:
        out["ml_dtypes"] = None
    try:
        import cupy

        out["cupy"] = cupy.__version__
        out["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        gpus = [cupy.cuda.runtime.getDeviceProperties(i)
                for i in range(cupy.cuda.runtime.getDeviceCount())]
        # compute capability 7.0+: float16 convolutions on the tensor cores; 8.0+: TF32 too
        out["gpus"] = [f"{g['name'].decode()} (compute capability {g['major']}.{g['minor']})"
                       for g in gpus]
        out["cupy_tf32"] = os.environ.get("CUPY_TF32", "0")
    except Exception as e:  # not installed, or no driver/GPU
        out["cupy"] = None
        out["gpus"] = []
        out["cupy_note"] = f"{type(e).__name__}: {e}"
    out["auto_device"] = get_backend(args.device).label
    if not args.json:  # (--json: the JSON alone, for a program to read)
        for k, v in out.items():
            print(f"{k:>18}: {v}")
    return out


COMMANDS = {"train": train, "visualize": visualize, "info": info}


def _parser() -> _Parser:
    parser = _Parser(prog="xpcnn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xpcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_visualize(sub)
    p_info = sub.add_parser("info", help="versions, devices and the BLAS in use")
    p_info.add_argument("--device", default="auto")
    p_info.add_argument("--json", action="store_true")
    return parser


class _ReaderGone:
    """sys.stdout or sys.stderr during a command: once the reader of its pipe has gone
    (``xpcnn train --save m.npz | head -1``), what is printed goes to os.devnull, quietly, and
    the command goes on (training, saving, exporting, plotting: no work lost); :attr:`gone`
    then says so (exit status 141, as a shell gives a command that SIGPIPE ended)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.gone = stream, False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        self.gone = True
        try:  # (the stream's buffered text, and all after it, go to os.devnull: no error at exit)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stream.flush()
        except (OSError, ValueError):  # (no file descriptor: a stream of a test, say)
            pass

    def __getattr__(self, name: str) -> Any:  # (isatty, fileno, encoding: the stream's)
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """The ``xpcnn`` command: its exit status (0, 2 for a usage error, 130 for Ctrl-C, 141
    where the reader of stdout or stderr went away before the end, all work done)."""
    if sys.stdout is None or sys.stderr is None:  # (pythonw: nothing to guard)
        return _main(argv)
    out, err = _ReaderGone(sys.stdout), _ReaderGone(sys.stderr)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        status = _main(argv)
        out.flush()  # (block-buffered into a pipe: what is left, while still guarded)
        err.flush()
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream
    return 141 if status == 0 and (out.gone or err.gone) else status


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    prog = f"xpcnn {command}" if command else "xpcnn"
    # (until the arguments are parsed: a usage error, --json=1's own too)
    as_json = any(a == "--json" or a.startswith("--json=") for a in argv)
    try:
        args = _parser().parse_args(argv)
        as_json = args.json
        with data_dir_spelled(DATA_DIR_FLAG), warnings.catch_warnings():
            warnings.showwarning = partial(_show_warning, prog)
            result = COMMANDS[args.command](args)
    except Interrupted as e:
        return _fail(prog, str(e), 130, as_json)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130, as_json)
    except XpcnnError as e:
        return _fail(prog, f"error: {e}", 2, as_json)
    except MemoryError:
        return _fail(prog, "error: out of memory (a smaller --batch-size needs less)", 1,
                     as_json)
    except OSError as e:  # the disk filled up, a file vanished: no traceback, the reason
        return _fail(prog, f"error: {e}", 1, as_json)
    if as_json and distributed.is_root():  # (a reader that has gone: see _ReaderGone)
        print(json.dumps(result), flush=True)
    return 0


#: The callbacks the command makes, as its warnings name them: by their flags.
CALLBACK_FLAGS = {"EarlyStopping": "--early-stopping", "CSVLogger": "--log"}


def _show_warning(prog: str, message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning as the command's other messages: one line ``xpcnn train: warning: ...`` on
    stderr (not Python's, which showed a source line of xpcnn's own ``__main__.py``), the
    callbacks the command made named by their flags."""
    text = " ".join(str(message).split()).removeprefix("xpcnn: ")
    for name, flag in CALLBACK_FLAGS.items():  # (in lists of names: ['EarlyStopping'])
        text = text.replace(repr(name), flag)
    here = distributed.world()
    rank = f" (rank {here.rank} of {here.size})" if here.size > 1 else ""
    print(f"{prog}{rank}: warning: {text}", file=sys.stderr if file is None else file)


#: What a refused ``--resume`` says to keep the same: the flags that decide the run's data,
#: batches, callbacks and compile settings.
RESUME_ADVICE = ResumeAdvice(
    run="the same --dataset, --val-split, --limit, --batch-size, --seed, --early-stopping and "
        "--data-dir files",
    compile="give the same --model, --epochs, --optimizer, --lr, --schedule and --precision",
    fresh="no --resume (or another --checkpoint)", takes_precision=False)


def _fail(prog: str, message: str, status: int, as_json: bool) -> int:
    """One line on stderr; with --json, also one JSON object on stdout. On several ranks
    (mpiexec) the line names the rank, the JSON is rank 0's alone (stdout holds one object,
    as in a run that succeeds), and every rank ends (they would wait for this one)."""
    here = distributed.world()
    rank = f" (rank {here.rank} of {here.size})" if here.size > 1 else ""
    line = f"{prog}{rank}: {' '.join(message.split())}"
    print(line, file=sys.stderr)
    if as_json and here.is_root:
        print(json.dumps({"error": line, "exit_status": status}))
    distributed.abort(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
