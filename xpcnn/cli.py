"""Command line: ``xpcnn train``, ``xpcnn visualize`` and ``xpcnn info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from . import __version__, optim
from .backend import get_backend
from .callbacks import Callback, CSVLogger, EarlyStopping
from .errors import XpcnnError
from .model import Sequential
from .models import MODELS, build_layers

DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10")
DEFAULT_MODEL = {"shapes": "shapes", "mnist": "mnist", "fashion-mnist": "mnist",
                 "cifar10": "cifar"}
DEFAULT_EPOCHS = {"shapes": 4, "mnist": 3, "fashion-mnist": 5, "cifar10": 10}


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a reference model on a dataset and report accuracy",
                       description="Train a reference model; by default the built-in shapes "
                       "dataset on the CPU (no download).")
    p.add_argument("--dataset", choices=DATASETS, default="shapes")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (default: $XPCNN_DATA_DIR, else the "
                   "per-user cache, downloading there if needed)")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="reference model (default: the dataset's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                   help="learning-rate schedule over the whole run")
    p.add_argument("--precision", choices=("float32", "mixed_float16", "mixed_bfloat16"),
                   default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-split", type=float, default=None,
                   help="hold out this fraction of the training set; accuracy is then "
                   "reported on it (the default for a dataset without a test split: 0.1)")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N training samples only")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained model here")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write training curves (train against the evaluation split, which is "
                   "then evaluated every epoch) and the confusion matrix as PNGs to DIR "
                   "(needs matplotlib: pip install \"xpcnn[viz]\")")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="keep the whole training state in this file (written atomically at the "
                   "end of every epoch, and every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also write the checkpoint every STEPS training steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint where an interrupted run stopped (same "
                   "final weights as an uninterrupted run); starts afresh if the file is absent")
    p.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop when the evaluation split's loss (evaluated every epoch) has not "
                   "improved for PATIENCE epochs, and keep the best epoch's weights (with "
                   "--val-split the test set plays no part in that choice)")
    p.add_argument("--log", default=None, metavar="CSV",
                   help="write each epoch's metrics to this CSV file")
    p.add_argument("--json", action="store_true",
                   help="make the last line of output one JSON object with the results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int
           ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A seeded, stratification-free random split into (train, held-out)."""
    if not 0.0 < fraction < 1.0:
        raise XpcnnError(f"--val-split must be in (0, 1), got {fraction}")
    order = np.random.default_rng([seed, 12345]).permutation(len(x))
    n_val = max(1, int(round(len(x) * fraction)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def train(args: argparse.Namespace) -> dict[str, Any]:
    from .datasets import load_dataset

    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.resume and not args.checkpoint:
        raise XpcnnError("--resume needs --checkpoint PATH, the file to resume from")
    (x, y), test = load_dataset(args.dataset, data_dir=args.data_dir)
    evaluated_on = "test set"
    if test is None or args.val_split is not None:
        fraction = 0.1 if args.val_split is None else args.val_split
        (x, y), test = _split(x, y, fraction, args.seed)
        evaluated_on = f"held-out {fraction:.0%} of the training set"
        if args.val_split is None:
            say(f"{args.dataset} in this folder has no test split: holding out {fraction:.0%} "
                "of the training set (--val-split) and reporting accuracy on it")
    if args.limit is not None:
        x, y = x[:args.limit], y[:args.limit]
    x_test, y_test = test
    model_name = args.model or DEFAULT_MODEL[args.dataset]
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    classes = int(max(y.max(), y_test.max())) + 1
    model = Sequential(build_layers(model_name, classes), device=args.device, seed=args.seed,
                       name=model_name)
    steps = max(1, epochs * -(-len(x) // args.batch_size))
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 3e-3)
    schedule = optim.CosineDecay(lr, steps, min_lr=lr * 0.01) if args.schedule == "cosine" \
        else optim.Constant(lr)
    optimizer = {"adam": lambda: optim.Adam(schedule), "adamw": lambda: optim.AdamW(schedule),
                 "sgd": lambda: optim.SGD(schedule, momentum=0.9, nesterov=True,
                                          weight_decay=5e-4)}[args.optimizer]()
    model.compile(optimizer=optimizer, precision=args.precision)
    say(f"training {model_name} on {args.dataset} ({len(x)} images {x.shape[1:]}) for {epochs} "
        f"epochs on {model.backend.label}")
    callbacks: list[Callback] = []
    if args.early_stopping is not None:
        if args.early_stopping < 0:
            raise XpcnnError(f"--early-stopping needs a patience >= 0, got {args.early_stopping}")
        callbacks.append(EarlyStopping("val_loss", patience=args.early_stopping,
                                       restore_best_weights=True, verbose=not args.json))
    if args.log:
        callbacks.append(CSVLogger(args.log))
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                        verbose=0 if args.quiet or args.json else 1, checkpoint=args.checkpoint,
                        checkpoint_every="epoch" if args.checkpoint_every is None
                        else args.checkpoint_every, resume=args.resume, callbacks=callbacks,
                        validation_data=(x_test, y_test) if args.plots or
                        args.early_stopping is not None else None)
    seconds = time.perf_counter() - t0
    result = model.evaluate(x_test, y_test)
    say(f"{evaluated_on} accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f}), "
        f"{len(x_test)} images; training took {seconds:.1f} s")
    if args.save:
        model.save(args.save)
        say(f"saved the model to {args.save}")
    if args.plots:
        from .datasets import class_names
        from .viz import write_training_plots

        for path in write_training_plots(args.plots, history, model, x_test, y_test,
                                         class_names(args.dataset)):
            say(f"wrote {path}")
    return {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "evaluated_on": evaluated_on, "epochs": epochs, "seconds": round(seconds, 3),
            "device": model.backend.label, "dataset": args.dataset, "model": model_name,
            "train_samples": int(len(x)), "test_samples": int(len(x_test)),
            "history": history.history}


def _add_visualize(sub: Any) -> None:
    p = sub.add_parser("visualize", help="figures of a saved model: feature maps and filters",
                       description="Write the feature maps after every layer for one dataset "
                       "image (the stage tour) and the filters of every Conv2D layer as PNGs; "
                       'needs matplotlib (pip install "xpcnn[viz]").')
    p.add_argument("--model", required=True, metavar="PATH", help="a model file from --save")
    p.add_argument("--dataset", choices=DATASETS, default="shapes")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (as train)")
    p.add_argument("--split", choices=("train", "test"), default=None,
                   help="where --index points (default: test, else train)")
    p.add_argument("--index", type=int, default=0, help="which image of the split")
    p.add_argument("--out", default="figures", metavar="DIR", help="folder for the PNGs")
    p.add_argument("--max-maps", type=int, default=8, help="feature maps shown per layer")
    p.add_argument("--dpi", type=float, default=100, help="PNG pixels per inch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def visualize(args: argparse.Namespace) -> dict[str, Any]:
    from .viz import visualize_command

    return visualize_command(args)


def info(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, devices and the BLAS in use."""
    import array_api_compat

    out: dict[str, Any] = {"xpcnn": __version__, "python": sys.version.split()[0],
                           "numpy": np.__version__,
                           "array_api_compat": array_api_compat.__version__}
    try:
        cfg = np.show_config(mode="dicts")
        out["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # older NumPy: no dict mode
        out["numpy_blas"] = None
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xpcnn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xpcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_visualize(sub)
    p_info = sub.add_parser("info", help="versions, devices and the BLAS in use")
    p_info.add_argument("--device", default="auto")
    p_info.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = {"train": train, "visualize": visualize, "info": info}[args.command](args)
    except XpcnnError as e:
        print(f"xpcnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
