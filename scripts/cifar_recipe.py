"""CIFAR-10 reference recipes: a model and how it is trained (``RECIPES``), evaluated once at
the end.

- ``cifar-augmented`` (the default; conv 32, 32, pool, 64, 64, pool, Dense 128, with random crops,
  flips and dropout): Adam, cosine learning rate, batch 64.
- ``resnet20`` (He et al.'s ResNet-20) and ``fast-resnet`` (the DAWNBench ResNet-9, its widths
  halved), both with random crops and flips: SGD with Nesterov momentum and weight decay 5e-4,
  a one-cycle learning rate, label smoothing 0.1, batch 128.
- ``cifar`` and the notebook's own network (``notebook``) as the stack models.

    python scripts/cifar_recipe.py --data-dir ../shared/data --epochs 20 --json cifar.json
    python scripts/cifar_recipe.py --data-dir ../shared/data --model resnet20 --epochs 60

Every knob below overrides the model's recipe. The CIFAR-10 subset in ../shared/data has one
training batch and no test batch: the recipe then holds out 10% of it (--val-split) and reports
accuracy on that held-out part.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from _common import SMOOTHING, WEIGHT_DECAY, ScriptParser

import xpcnn
from xpcnn.cli import (
    DATA_DIR_FLAG,
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE,
    check_device,
    hold_out,
    input_folder,
    output_file,
    percent,
)
from xpcnn.datasets import load_cifar10
from xpcnn.datasets.download import data_dir_spelled
from xpcnn.models import build_model

ADAM = dict(optimizer="adam", lr=1e-3, schedule="cosine", weight_decay=0.0, label_smoothing=0.0,
            batch_size=64)
RESIDUAL = dict(optimizer="sgd", schedule="one-cycle", weight_decay=5e-4, label_smoothing=0.1,
                batch_size=128)
RECIPES: dict[str, dict[str, Any]] = {
    "cifar-augmented": ADAM, "cifar": ADAM, "notebook": ADAM,
    "resnet20": {**RESIDUAL, "lr": 0.1},
    "fast-resnet": {**RESIDUAL, "lr": 0.2},
}
#: What --optimizer brings along where it changes a recipe's optimiser (as before the recipes).
OPTIMIZER_DEFAULTS = {"sgd": dict(lr=0.05, weight_decay=5e-4), "adam": dict(lr=1e-3,
                                                                           weight_decay=0.0)}


def compiled(name: str, knobs: dict[str, Any], steps: int, device: str = "cpu",
             seed: int = 0) -> xpcnn.Model:
    """Model ``name`` compiled with the recipe ``knobs`` for a run of ``steps`` steps:
    ``cosine`` decays to lr / 100, ``one-cycle`` is :class:`xpcnn.optim.OneCycle`; SGD uses
    Nesterov momentum 0.9."""
    lr, wd = knobs["lr"], knobs["weight_decay"]
    schedule = (xpcnn.optim.OneCycle(lr, steps) if knobs["schedule"] == "one-cycle" else
                xpcnn.optim.CosineDecay(lr, steps, min_lr=lr / 100))
    optimizer = (xpcnn.optim.Adam(schedule, weight_decay=wd) if knobs["optimizer"] == "adam" else
                 xpcnn.optim.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=wd))
    model = build_model(name, 10, (32, 32, 3), device=device, seed=seed)
    model.compile(loss=xpcnn.SoftmaxCrossEntropy(knobs["label_smoothing"]), optimizer=optimizer)
    return model


def main() -> None:
    p = ScriptParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cifar-augmented", choices=sorted(RECIPES))
    p.add_argument("--epochs", type=POSITIVE, default=20)
    p.add_argument("--batch-size", type=POSITIVE, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                   help="sgd: Nesterov momentum 0.9")
    p.add_argument("--lr", type=LEARNING_RATE, default=None, help="peak learning rate")
    p.add_argument("--schedule", choices=("cosine", "one-cycle"), default=None)
    p.add_argument("--weight-decay", type=WEIGHT_DECAY, default=None)
    p.add_argument("--label-smoothing", type=SMOOTHING, default=None)
    p.add_argument("--val-split", type=FRACTION, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()
    p.check(input_folder, "--data-dir", args.data_dir)  # (before the data and the training)
    p.check(output_file, "--json", args.json, replaced=False)  # (written in place: /dev/stdout too)
    p.check(check_device, "--device", args.device)
    knobs = dict(RECIPES[args.model])
    if args.optimizer not in (None, knobs["optimizer"]):
        knobs.update(OPTIMIZER_DEFAULTS[args.optimizer])
    knobs.update({k: v for k in knobs if (v := getattr(args, k)) is not None})

    with data_dir_spelled(DATA_DIR_FLAG):  # (a missing file's message names --data-dir)
        (x, y), test = p.data(load_cifar10, args.data_dir)
    where = "test set"
    if test is None:
        (x, y), test = hold_out(x, y, args.val_split, args.seed)
        where = f"held-out {percent(args.val_split)} of data_batch_1 (no test batch present)"
    x_test, y_test = test
    steps = args.epochs * math.ceil(len(x) / knobs["batch_size"])
    model = compiled(args.model, knobs, steps, args.device, args.seed)
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=knobs["batch_size"], seed=args.seed)
    seconds = time.perf_counter() - t0
    result = model.evaluate(x_test, y_test, return_dict=True)
    print(f"CIFAR-10 {args.model}: accuracy {result['accuracy']:.4f} on the {where} "
          f"({len(x_test)} images) after {args.epochs} epochs, {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, **knobs, "accuracy": result["accuracy"],
                       "evaluated_on": where, "epochs": args.epochs, "seconds": seconds,
                       "device": model.backend.label, "history": history.history}, f, indent=2)


if __name__ == "__main__":
    main()
