"""CIFAR-10 reference recipe: the `cifar-augmented` model (conv 32, 32, pool, 64, 64, pool,
Dense 128, with random crops, flips and dropout) trained with Adam and a cosine learning rate
(``--optimizer sgd``: SGD + Nesterov momentum). Also trains the notebook's own network with
``--model notebook``.

    python scripts/cifar_recipe.py --data-dir ../shared/data --epochs 20 --json cifar.json

The CIFAR-10 subset in ../shared/data has one training batch and no test batch: the recipe
then holds out 10% of it (--val-split) and reports accuracy on that held-out part.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import xpcnn
from xpcnn.cli import _split
from xpcnn.datasets import load_cifar10
from xpcnn.models import build_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cifar-augmented",
                   choices=("cifar-augmented", "cifar", "notebook"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam",
                   help="sgd: Nesterov momentum 0.9 and weight decay 5e-4; adam: Adam")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the cosine schedule (default: sgd 0.05, "
                   "adam 1e-3)")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()

    (x, y), test = load_cifar10(args.data_dir)
    where = "test set"
    if test is None:
        (x, y), test = _split(x, y, args.val_split, args.seed)
        where = f"held-out {args.val_split:.0%} of data_batch_1 (no test batch present)"
    x_test, y_test = test
    model = xpcnn.Sequential(build_layers(args.model), device=args.device, seed=args.seed,
                             name=args.model)
    steps = args.epochs * math.ceil(len(x) / args.batch_size)
    lr = args.lr if args.lr is not None else {"sgd": 0.05, "adam": 1e-3}[args.optimizer]
    schedule = xpcnn.optim.CosineDecay(lr, steps, min_lr=lr / 100)
    model.compile(optimizer=xpcnn.optim.Adam(schedule) if args.optimizer == "adam" else
                  xpcnn.optim.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4))
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        validation_data=(x_test, y_test))
    seconds = time.perf_counter() - t0
    result = model.evaluate(x_test, y_test)
    print(f"CIFAR-10 {args.model}: accuracy {result['accuracy']:.4f} on the {where} "
          f"({len(x_test)} images) after {args.epochs} epochs, {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "optimizer": args.optimizer, "lr": lr,
                       "accuracy": result["accuracy"], "evaluated_on": where,
                       "epochs": args.epochs, "seconds": seconds, "history": history.history},
                      f, indent=2)


if __name__ == "__main__":
    main()
