"""Reproduce the original notebook's figures on one image: the edge filters stage by stage, then
the notebook's network, trained briefly, seen layer by layer, its filters, its training curves
and its confusion matrix.

The image is a CIFAR-10 one from the data folder (``--data-dir``, else ``$XPCNN_DATA_DIR``, else
the per-user cache; nothing is downloaded), or a built-in shapes image when there is none.

    python scripts/tour.py --data-dir ../shared/data --index 7 --out tour
    python scripts/tour.py --epochs 0          # untrained network: no curves, no matrix

Needs matplotlib (``pip install "xpcnn[viz]"``). Prints the path of every figure it writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CEILING, ScriptParser  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn import viz  # noqa: E402
from xpcnn.cli import (  # noqa: E402
    NON_NEGATIVE,
    POSITIVE,
    input_folder,
    needs_matplotlib,
    output_folder,
)
from xpcnn.datasets import class_names, load_cifar10, load_shapes  # noqa: E402
from xpcnn.errors import DownloadError  # noqa: E402
from xpcnn.models import build_layers  # noqa: E402


def load_images(data_dir: str | None, say: bool = True
                ) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 from the data folder if it is there, else the built-in shapes."""
    try:
        (x, y), _ = load_cifar10(data_dir, download=False)
        return "cifar10", (x, y)
    except DownloadError:
        if say:
            print("no CIFAR-10 files in the data folder: using the built-in shapes dataset")
        (x, y), _ = load_shapes(n_train=6000, n_test=0)
        return "shapes", (x, y)


def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="folder with cifar-10-*.tar.gz (default: $XPCNN_DATA_DIR)")
    p.add_argument("--index", type=NON_NEGATIVE, default=7, help="which image to follow")
    p.add_argument("--out", default="tour", help="folder for the PNGs")
    p.add_argument("--epochs", type=NON_NEGATIVE, default=2,
                   help="training epochs (0: untrained)")
    p.add_argument("--limit", type=POSITIVE, default=4000, help="training images")
    p.add_argument("--ceiling", type=CEILING, default=viz.NOTEBOOK_CEILING,
                   help="the demonstration's ReLU max_value")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    args = p.parse_args(argv)
    p.check(input_folder, "--data-dir", args.data_dir)  # (before the data and the training)
    p.check(output_folder, "--out", args.out)
    p.check(needs_matplotlib, "--out")

    name, (x, y) = p.data(load_images, args.data_dir)  # (a corrupt file: one line)
    names = class_names(name)
    if not 0 <= args.index < len(x):
        p.error(f"--index {args.index} does not exist: the {name} training images are "
                f"0..{len(x) - 1}")
    image = x[args.index]
    out = Path(args.out)
    written: list[Path] = []

    # 1. The notebook's hand-made edge filters, stage by stage.
    written.append(out / "1_notebook_demo.png")
    viz.plot_notebook_demo(image, written[-1], ceiling=args.ceiling)

    # 2. The notebook's network, briefly trained on other images than the one followed.
    model = xpcnn.Sequential(build_layers("notebook", len(names)), seed=args.seed,
                             name="notebook")
    model.build(image.shape)
    keep = np.arange(len(x)) != args.index
    xs, ys = x[keep], y[keep]
    n_val = min(1000, len(xs) // 5)
    x_val, y_val = xs[-n_val:], ys[-n_val:]
    x_tr, y_tr = xs[:-n_val][:args.limit], ys[:-n_val][:args.limit]
    if args.epochs > 0:
        model.compile(optimizer=xpcnn.optim.Adam(1e-3))
        print(f"training the notebook's network on {len(x_tr)} {name} images for "
              f"{args.epochs} epoch{'s' * (args.epochs != 1)}")
        history = model.fit(x_tr, y_tr, epochs=args.epochs, batch_size=64,
                            validation_data=(x_val, y_val), seed=args.seed)
        written.append(out / "4_history.png")
        viz.plot_history(history, written[-1])
        written.append(out / "5_confusion.png")
        viz.plot_confusion_matrix(model, x_val, y_val, written[-1], class_names=names)

    # 3. What that network does to the image, layer by layer, and its filters.
    state = "trained" if args.epochs > 0 else "untrained"
    guess = int(np.argmax(model.predict(image[None])[0]))
    title = (f"the notebook's network ({state}) on {name} image {args.index}: "
             f"{names[int(y[args.index])]}, predicted {names[guess]}")
    written.append(out / "2_stage_tour.png")
    viz.plot_stage_tour(model, image, written[-1], class_names=names, title=title)
    for i in viz.conv_layer_indices(model):
        written.append(out / f"3_filters_{i}_{model.layers[i].name}.png")
        viz.plot_filters(model, written[-1], layer=i)

    for path in sorted(written):
        print(f"wrote {os.fspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
