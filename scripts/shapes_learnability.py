"""Check that the shapes dataset needs convolutions: a small conv net solves it, an MLP can't.

Trains, with PyTorch on the CPU, the conv net that ``xpcnn train`` uses by default and a dense-only
network on ``xpcnn.datasets.load_shapes`` and prints test accuracy after every epoch. PyTorch is
used only here, as an independent reference; the library itself never imports it.

    python scripts/shapes_learnability.py                 # defaults: 3 conv epochs, 9 MLP epochs
    python scripts/shapes_learnability.py --seeds 0 1 2   # repeat over dataset/model seeds

The defaults mirror ``xpcnn train --dataset shapes``: He-uniform kernels in the hidden layers and
Glorot-uniform in the classifier, zero biases, Adam at 3e-3 with a per-step cosine decay to 1% of
it, batch 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xpcnn.datasets.shapes import DEFAULT_N_TEST, DEFAULT_N_TRAIN, load_shapes  # noqa: E402


def conv_net(filters: tuple[int, int, int]) -> nn.Module:
    """Conv 3x3 same + ReLU, pool, conv, pool, conv, global average pool, dense 10."""
    f1, f2, f3 = filters
    return nn.Sequential(
        nn.Conv2d(3, f1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(f1, f2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(f2, f3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(f3, 10),
    )


def mlp(size: int, width: int) -> nn.Module:
    """Flatten, dense ``width`` + ReLU, dense ``width`` + ReLU, dense 10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * size * size, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def keras_init(model: nn.Module, init: str) -> None:
    """Zero biases; He- (or Glorot-) uniform hidden kernels, Glorot-uniform for the last layer."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, m in enumerate(layers):
        if init == "he" and i < len(layers) - 1:
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # = Keras he_uniform
        else:
            nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    xt: torch.Tensor,
    yt: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    label: str,
    init: str = "he",
    schedule: str = "cosine",
) -> list[float]:
    """Adam on cross-entropy; returns the test accuracy after each epoch."""
    keras_init(model, init)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.01)
        if schedule == "cosine"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    accs = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xt[i : i + 500]).argmax(1) for i in range(0, len(xt), 500)])
        acc = float((pred == yt).float().mean())
        accs.append(acc)
        print(
            f"  {label} epoch {epoch}: loss {total / len(x):.4f}  test acc {acc:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return accs


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> float NCHW in [0, 1], labels -> int64."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    return xt, torch.from_numpy(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    p.add_argument("--n-test", type=int, default=DEFAULT_N_TEST)
    p.add_argument("--epochs", type=int, default=3, help="conv net epochs")
    p.add_argument("--mlp-epochs", type=int, default=9, help="MLP epochs (3x the budget)")
    p.add_argument("--filters", type=int, nargs=3, default=(16, 32, 64))
    p.add_argument("--mlp-width", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mlp-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--init", choices=("he", "glorot"), default="he")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--skip-conv", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        (x, y), (xt, yt) = load_shapes(args.n_train, args.n_test, seed=seed)
        print(f"seed {seed}: generated {len(x)} + {len(xt)} images in "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
        x, y = to_tensors(x, y)
        xt, yt = to_tensors(xt, yt)
        torch.manual_seed(seed)
        conv = mlp_acc = None
        if not args.skip_conv:
            conv = train(conv_net(tuple(args.filters)), x, y, xt, yt, args.epochs, args.lr,
                         args.batch, seed, "conv", args.init, args.schedule)[-1]
        if not args.skip_mlp:
            mlp_acc = max(train(mlp(x.shape[-1], args.mlp_width), x, y, xt, yt,
                                args.mlp_epochs, args.mlp_lr, args.batch, seed, "mlp",
                                args.init, args.schedule))
        results.append((seed, conv, mlp_acc))

    print("\nseed  conv (final epoch)  mlp (best epoch)")
    for seed, conv, mlp_acc in results:
        c = "-" if conv is None else f"{conv:.4f}"
        m = "-" if mlp_acc is None else f"{mlp_acc:.4f}"
        print(f"{seed:4d}  {c:>18}  {m:>16}")
    convs = [r[1] for r in results if r[1] is not None]
    mlps = [r[2] for r in results if r[2] is not None]
    if len(results) > 1:
        c = f"{np.mean(convs):.4f}" if convs else "-"
        m = f"{np.mean(mlps):.4f}" if mlps else "-"
        print(f"mean  {c:>18}  {m:>16}")


if __name__ == "__main__":
    main()
