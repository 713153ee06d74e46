"""Parity with PyTorch: the same network, initial weights, batches and optimiser on both sides.

1. float64, first ``--check-steps`` training steps: the per-step losses of xpcnn and PyTorch
   must agree to 1e-4 relative (they agree to ~1e-12 in practice).
2. float32, full run: per-epoch loss and accuracy of both, side by side, and the final test
   accuracy of each (target: within 0.2 points on MNIST, 1 point on the CIFAR-10 subset).

    python scripts/parity_torch.py --dataset mnist --data-dir ../shared/data --epochs 2
    python scripts/parity_torch.py --dataset cifar10 --data-dir ../shared/data --epochs 3 \
        --batch-size 64 --val-split 0.2 --seeds 5

Dropout masks and augmentation draws are shared (see torch_mirror.py), so the two runs see the
same numbers; only floating-point rounding differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ScriptParser  # noqa: E402
from torch_mirror import mirror, mirror_optimizer  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn.cli import (  # noqa: E402
    DATA_DIR_FLAG,
    DEFAULT_MODEL,
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE,
    hold_out,
    input_folder,
    output_file,
)
from xpcnn.datasets import load_dataset  # noqa: E402
from xpcnn.datasets.download import data_dir_spelled  # noqa: E402
from xpcnn.models import MODELS, build_layers  # noqa: E402


def make_pair(model_name: str, input_shape, classes: int, dtype: str, optimizer: str, lr: float,
              seed: int):
    model = xpcnn.Sequential(build_layers(model_name, classes), input_shape=input_shape,
                             seed=seed, dtype=dtype)
    opt = (xpcnn.optim.SGD(lr, momentum=0.9) if optimizer == "sgd" else xpcnn.optim.Adam(lr))
    model.compile(optimizer=opt)
    twin = mirror(model, torch.float64 if dtype == "float64" else torch.float32)
    topt = mirror_optimizer(opt, twin.parameters())
    return model, twin, topt


def xpcnn_step(model, xb: np.ndarray, yb: np.ndarray) -> tuple[float, float]:
    dtype = np.float64 if model.dtype_name == "float64" else np.float32
    loss, accuracy = model.train_on_batch(xb.astype(dtype), yb)  # (read at once, as .item())
    return loss, accuracy * len(xb)


def torch_step(twin, topt, xb: np.ndarray, yb: np.ndarray, dtype) -> tuple[float, float]:
    twin.train()
    logits = twin(torch.from_numpy(xb.astype(dtype)))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(yb))
    topt.zero_grad(set_to_none=True)
    loss.backward()
    topt.step()
    return loss.item(), float((logits.argmax(1).numpy() == yb).sum())


def torch_accuracy(twin, x: np.ndarray, y: np.ndarray, dtype=np.float32) -> float:
    twin.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), 500):
            logits = twin(torch.from_numpy(x[s:s + 500].astype(dtype)))
            correct += int((logits.argmax(1).numpy() == y[s:s + 500]).sum())
    return correct / len(x)


def training_run(args: argparse.Namespace, name: str, x: np.ndarray, y: np.ndarray,
                x_test: np.ndarray, y_test: np.ndarray, classes: int, seed: int) -> dict:
    """One training run (in ``args.dtype``) of both libraries from the same start; per-epoch
    rows and the final test accuracies."""
    model, twin, topt = make_pair(name, x.shape[1:], classes, args.dtype, args.optimizer,
                                  args.lr, seed)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    rows = []
    print(f"seed {seed}\n{'epoch':>5}  {'xpcnn loss':>10} {'acc':>7} {'s':>6}   "
          f"{'torch loss':>10} {'acc':>7} {'s':>6}")
    for epoch in range(args.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        sums = np.zeros(4)
        times = [0.0, 0.0]
        for s in range(0, len(x), args.batch_size):
            idx = order[s:s + args.batch_size]
            t0 = time.perf_counter()
            la, ca = xpcnn_step(model, x[idx], y[idx])
            t1 = time.perf_counter()
            lb, cb = torch_step(twin, topt, x[idx], y[idx], dtype)
            times[0] += t1 - t0
            times[1] += time.perf_counter() - t1
            sums += [la * len(idx), ca, lb * len(idx), cb]
        n = len(x)
        row = {"epoch": epoch + 1, "xpcnn_loss": sums[0] / n, "xpcnn_acc": sums[1] / n,
               "xpcnn_seconds": times[0], "torch_loss": sums[2] / n, "torch_acc": sums[3] / n,
               "torch_seconds": times[1]}
        rows.append(row)
        print(f"{epoch + 1:>5}  {row['xpcnn_loss']:>10.4f} {row['xpcnn_acc']:>7.4f} "
              f"{times[0]:>6.0f}   {row['torch_loss']:>10.4f} {row['torch_acc']:>7.4f} "
              f"{times[1]:>6.0f}")
    acc_x = model.evaluate(x_test, y_test, return_dict=True)["accuracy"]
    acc_t = torch_accuracy(twin, x_test, y_test, dtype)
    print(f"test accuracy: xpcnn {acc_x:.4f}, PyTorch {acc_t:.4f}, difference "
          f"{100 * (acc_x - acc_t):+.2f} points on {len(x_test)} images", flush=True)
    return {"seed": seed, "epochs": rows, "xpcnn_test_accuracy": acc_x,
            "torch_test_accuracy": acc_t, "difference_points": 100 * (acc_x - acc_t)}


def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=("shapes", "mnist", "fashion-mnist",
                                                          "cifar10"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--epochs", type=POSITIVE, default=1)
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--lr", type=LEARNING_RATE, default=1e-3)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--seeds", type=POSITIVE, default=1,
                   help="float32 runs with seeds --seed, --seed+1, ...: reports the mean "
                   "difference and its standard error (default 1)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="first N training images only")
    p.add_argument("--val-split", type=FRACTION, default=0.1,
                   help="held-out fraction when the dataset has no test split")
    p.add_argument("--check-steps", type=POSITIVE, default=20)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the full training runs (float64: the two runs should stay "
                   "together to the end, showing float32 rounding as the only difference)")
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    p.check(input_folder, "--data-dir", args.data_dir)  # (before the data and the training)
    p.check(output_file, "--json", args.json, replaced=False)
    torch.set_num_threads(args.threads)

    with data_dir_spelled(DATA_DIR_FLAG):  # (a missing file's message names --data-dir)
        (x, y), test = p.data(load_dataset, args.dataset, args.data_dir)
    if test is None:
        (x, y), test = hold_out(x, y, args.val_split, args.seed)
        print(f"no test split: evaluating on a held-out {args.val_split:.0%} of the training set")
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    x_test, y_test = test
    name = args.model or DEFAULT_MODEL[args.dataset]
    classes = int(max(y.max(), y_test.max())) + 1
    report: dict = {"dataset": args.dataset, "model": name, "optimizer": args.optimizer,
                    "lr": args.lr, "batch_size": args.batch_size}

    # 1. float64: the first steps' losses, step by step.
    model, twin, topt = make_pair(name, x.shape[1:], classes, "float64", args.optimizer, args.lr,
                                  args.seed)
    order = np.random.default_rng([args.seed, 0]).permutation(len(x))
    worst = 0.0
    check_steps = min(args.check_steps, math.ceil(len(x) / args.batch_size))  # (one epoch at most)
    print(f"{'step':>4}  {'xpcnn loss (f64)':>20}  {'torch loss (f64)':>20}  {'rel diff':>9}")
    for step in range(check_steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        a, _ = xpcnn_step(model, x[idx], y[idx])
        b, _ = torch_step(twin, topt, x[idx], y[idx], np.float64)
        rel = abs(a - b) / max(abs(b), 1e-300)
        worst = max(worst, rel)
        print(f"{step:>4}  {a:>20.15f}  {b:>20.15f}  {rel:>9.2e}")
    report["float64_steps"] = check_steps
    report["float64_max_rel_loss_diff"] = worst
    print(f"first {check_steps} steps in float64: max relative loss difference {worst:.2e} "
          f"({'PASS' if worst <= 1e-4 else 'FAIL'} at 1e-4)")

    # 2. float32 (or --dtype): full training, side by side, once per seed (each seed its own initial
    # weights, batch order and dropout draws; the held-out images stay the same).
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        runs.append(training_run(args, name, x, y, x_test, y_test, classes, seed))
    report["runs"], report["dtype"] = runs, args.dtype
    diffs = np.array([r["difference_points"] for r in runs])
    if len(runs) > 1:
        se = diffs.std(ddof=1) / math.sqrt(len(diffs))
        report.update(mean_difference_points=float(diffs.mean()), standard_error_points=se,
                      mean_xpcnn_test_accuracy=float(np.mean([r["xpcnn_test_accuracy"]
                                                              for r in runs])),
                      mean_torch_test_accuracy=float(np.mean([r["torch_test_accuracy"]
                                                              for r in runs])))
        print(f"over {len(runs)} seeds: xpcnn {report['mean_xpcnn_test_accuracy']:.4f}, PyTorch "
              f"{report['mean_torch_test_accuracy']:.4f}; difference per seed "
              f"{', '.join(f'{d:+.2f}' for d in diffs)} points; mean {diffs.mean():+.2f} "
              f"+/- {se:.2f} (standard error) points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if worst <= 1e-4 and all(math.isfinite(r["xpcnn_test_accuracy"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
