"""MNIST reference recipe: the `mnist` model (conv 32, conv 64, max pool, dropout, Dense 128,
dropout, Dense 10) with Adam and a cosine learning rate, on the full training set.

    python scripts/mnist_recipe.py --data-dir ../shared/data --epochs 6 --json mnist.json

Target: at least 99.3% test accuracy (LeNet-5: 99.05%; Keras' mnist_convnet: 99.2%).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import xpcnn
from xpcnn.datasets import load_mnist
from xpcnn.models import build_layers


def recipe(epochs: int, steps_per_epoch: int, lr: float = 2e-3, device: str = "cpu",
           seed: int = 0, precision: str = "float32") -> xpcnn.Sequential:
    """The compiled MNIST model: Adam, a short linear warm-up, then cosine decay to 1%."""
    model = xpcnn.Sequential(build_layers("mnist"), device=device, seed=seed, name="mnist")
    total = epochs * steps_per_epoch
    warmup = min(200, total // 10 + 1)
    schedule = xpcnn.optim.LinearWarmup(
        xpcnn.optim.CosineDecay(lr, max(1, total - warmup), min_lr=lr / 100), warmup)
    model.compile(optimizer=xpcnn.optim.Adam(schedule), precision=precision)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N training images only")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()

    (x, y), (x_test, y_test) = load_mnist(args.data_dir)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    model = recipe(args.epochs, math.ceil(len(x) / args.batch_size), args.lr, args.device,
                   args.seed, args.precision)
    t0 = time.perf_counter()
    history = model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        validation_data=(x_test, y_test))
    seconds = time.perf_counter() - t0
    result = model.evaluate(x_test, y_test)
    print(f"MNIST test accuracy {result['accuracy']:.4f} after {args.epochs} epochs, "
          f"{seconds:.0f} s of training on {model.backend.label} ({args.precision})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"test_accuracy": result["accuracy"], "test_loss": result["loss"],
                       "epochs": args.epochs, "seconds": seconds, "device": model.backend.label,
                       "precision": args.precision, "history": history.history}, f, indent=2)


if __name__ == "__main__":
    main()
