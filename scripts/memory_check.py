"""Does training leak memory? Train on the built-in shapes dataset and watch memory per epoch.

    python scripts/memory_check.py                    # 20 epochs on 2,000 images, CPU
    python scripts/memory_check.py --checkpoint /tmp/mem.ckpt.npz --checkpoint-every 10

After each epoch it records the resident set size (VmRSS from /proc/self/status) and the memory
that tracemalloc sees Python and NumPy holding. Memory may grow while the first epochs warm up
(allocator pools, BLAS buffers, caches); from the end of the second epoch on it must stay flat:
the script prints a table and a verdict, and exits with status 1 when either figure grew by more
than ``--tolerance-mb`` (default 5 MB) after epoch 2.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

import xpcnn
from xpcnn.callbacks import LambdaCallback
from xpcnn.datasets import load_shapes
from xpcnn.models import build_layers

MB = 1e6


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--limit", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance-mb", type=float, default=5.0)
    p.add_argument("--checkpoint", default=None, help="also write a checkpoint while training")
    p.add_argument("--checkpoint-every", type=int, default=None)
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (growth is measured after the second epoch)")

    (x, y), (x_val, y_val) = load_shapes(n_train=args.limit, n_test=200, seed=args.seed)
    model = xpcnn.Sequential(build_layers(args.model, 10), device=args.device, seed=args.seed)
    model.compile(optimizer=xpcnn.optim.Adam(1e-3))
    rows: list[tuple[int, float, float, float, float, float]] = []
    tracemalloc.start()
    start = time.perf_counter()

    def record(epoch: int, logs: dict[str, float]) -> None:
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        rows.append((epoch + 1, logs["loss"], logs["val_accuracy"], rss_bytes() / MB,
                     current / MB, peak / MB))
        r = rows[-1]
        print(f"{r[0]:>5} {r[1]:>8.4f} {r[2]:>8.3f} {r[3]:>10.1f} {r[4]:>12.2f} {r[5]:>12.2f}",
              flush=True)

    print(f"memory check: {args.model} model, {len(x)} shapes images, batch {args.batch_size}, "
          f"{args.epochs} epochs on {model.backend.label}"
          + (f", checkpointing to {args.checkpoint}" if args.checkpoint else ""))
    print(f"{'epoch':>5} {'loss':>8} {'val_acc':>8} {'RSS (MB)':>10} {'traced (MB)':>12} "
          f"{'peak (MB)':>12}")
    model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0,
              validation_data=(x_val, y_val), checkpoint=args.checkpoint,
              callbacks=[LambdaCallback(on_epoch_end=record)],
              checkpoint_every=args.checkpoint_every or "epoch")
    seconds = time.perf_counter() - start
    tracemalloc.stop()

    base = rows[1]  # after the second epoch
    rss_growth = max(r[3] for r in rows[1:]) - base[3]
    traced_growth = max(r[4] for r in rows[1:]) - base[4]
    rss_end, traced_end = rows[-1][3] - base[3], rows[-1][4] - base[4]
    print(f"after epoch 2: RSS {base[3]:.1f} MB, traced {base[4]:.2f} MB; from there to the end: "
          f"RSS {rss_end:+.1f} MB (largest rise {rss_growth:+.1f} MB), traced {traced_end:+.2f} "
          f"MB (largest rise {traced_growth:+.2f} MB); {seconds:.0f} s in all")
    worst = max(rss_growth, traced_growth)
    if worst > args.tolerance_mb:
        print(f"VERDICT: FAIL - memory grew by {worst:.1f} MB after epoch 2 "
              f"(tolerance {args.tolerance_mb} MB)")
        return 1
    print(f"VERDICT: PASS - no growth beyond {args.tolerance_mb} MB after epoch 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
