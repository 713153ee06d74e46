#!/usr/bin/env python
"""Train on a folder of image files, read a batch at a time (Keras' image_dataset_from_directory
layout): one subfolder per class, its image files (PNG, JPEG, BMP, GIF's first frame, in
nested folders too) the class's images, all of one size; names starting with "." are skipped.

    python scripts/train_from_folder.py --make-demo /tmp/shapes-png   # write a folder to try
    python scripts/train_from_folder.py /tmp/shapes-png --epochs 3 --log log.csv --save m.npz

The folder becomes a map-style dataset (``len`` and ``dataset[i] -> (image, label)``), which
``fit`` batches and shuffles itself; the files of the next batches are decoded on a background
thread while the model trains on the current one (:mod:`xpcnn.data`), so the images never all
sit in memory. A held-out fraction (``--val-split``) is evaluated after every epoch and drives
``--early-stopping``. Decoding uses Pillow, which matplotlib (``pip install "xpcnn[viz]"``)
installs. Every file is decoded once before training (and again each epoch as it is read): a
damaged one is refused naming it, before any work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import ScriptParser

import xpcnn
from xpcnn.callbacks import Callback, CSVLogger, EarlyStopping
from xpcnn.cli import (
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE,
    UsageError,
    check_device,
    distinct_outputs,
    hold_out,
    input_folder,
    output_file,
)
from xpcnn.datasets import class_names, load_shapes
from xpcnn.errors import InputError
from xpcnn.models import MODELS, build_model
from xpcnn.viz import VIZ_EXTRA_HINT

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # (Keras' image formats)

#: Pillow's modes of at most 8 bits a channel, which ``convert("RGB")`` maps as Keras' decoders
#: do (a 16-bit colour PNG opens as "RGB" or "RGBA", its high bytes, as TensorFlow reads it).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                             "CMYK", "YCbCr"})


class ImageFolder:
    """``root/<class>/.../<file>``: the classes are the subfolders in sorted order, each
    class's files those under its folder, nested folders included, in sorted order (as Keras'
    image_dataset_from_directory: a folder or file whose name starts with "." is skipped,
    Jupyter's .ipynb_checkpoints for one); ``self[i]`` is the uint8 (H, W, 3) image of file
    ``i`` (a GIF's first frame; a 16-bit greyscale PNG's high bytes) and its label, decoded
    when asked for. Every file's header is read up front: one that is no image, or of another
    size than the first, is an InputError naming it (was: a traceback from inside training);
    :meth:`check_decodes` decodes each file once."""

    def __init__(self, root: str | Path, files: list[tuple[Path, int]] | None = None,
                 size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        where = "(expected ROOT/<class>/<image files>)"
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a folder {where}")
        self.classes = sorted(p.name for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise InputError(f"{self.root}: no class subfolders {where}")
        if files is None:
            files = [(f, label) for label, name in enumerate(self.classes)
                     for f in _images_under(self.root / name)]
            if not files:
                raise InputError(f"{self.root}: no image files ({', '.join(SUFFIXES)}) in its "
                                 "subfolders")
        if size is None and files:  # (files given without their size: read from their headers)
            size = _one_size([f for f, _ in files])
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.files[i]
        pixels = _pixels(path)
        if pixels.shape[1::-1] != self.size:  # (the file changed since it was checked)
            raise InputError(f"{path}: {_wxh(pixels.shape[1::-1])} pixels, where the first "
                             f"image is {_wxh(self.size)}")
        return pixels, label

    def check_decodes(self) -> None:
        """Decode every file once: one damaged after its header (cut short, a bad byte in its
        pixel data) is an InputError naming it now, not an epoch into training."""
        for i in range(len(self)):
            self[i]

    def split(self, fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
        """A seeded random (train, held-out) split of the files, as ``xpcnn train`` splits
        (and refuses, through its ``hold_out``, a fraction that leaves none to train on)."""
        def pick(idx: np.ndarray) -> ImageFolder:
            return ImageFolder(self.root, [self.files[k] for k in idx], self.size)

        order = np.arange(len(self.files))
        (train, _), (held_out, _) = hold_out(order, order, fraction, seed)
        return pick(train), pick(held_out)


def _images_under(folder: Path) -> list[Path]:
    """The image files under ``folder``, nested folders included, in Keras' order (folder by
    folder in sorted order, each one's files sorted); names starting with "." skipped."""
    found = []
    for here, folders, names in os.walk(folder):
        folders[:] = [d for d in folders if not d.startswith(".")]  # (not walked into)
        found.append((here, sorted(n for n in names if not n.startswith(".")
                                   and Path(n).suffix.lower() in SUFFIXES)))
    return [Path(here) / n for here, names in sorted(found) for n in names]


def _wxh(size: tuple[int, int] | None) -> str:
    return "x".join(map(str, size or ()))


def _opened(path: Path) -> Any:
    """``path`` opened by Pillow (its header read), or an InputError naming it."""
    from PIL import Image  # (installed with matplotlib: the viz extra)

    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot read the image ({e})") from e


def _pixels(path: Path) -> np.ndarray:
    """The uint8 (H, W, 3) pixels of the image file ``path``, or an InputError naming it."""
    with _opened(path) as image:
        mode = image.mode
        # (Pillow opens a 16-bit greyscale PNG as "I;16"; older versions as "I")
        sixteen_bit = mode.startswith("I;16") or (mode == "I" and image.format == "PNG")
        if mode not in EIGHT_BIT_MODES and not sixteen_bit:  # (32-bit, float, LAB, ...)
            raise InputError(
                f"{path}: a {image.format} image of Pillow mode {mode!r}, which is not read: "
                "the images are read with 8-bit channels, or as 16-bit greyscale scaled to "
                "8 bits, and these pixels have no such scale (converting them would clip or "
                "garble them); save it as an 8-bit image or a 16-bit greyscale PNG")
        try:
            if not sixteen_bit:
                return np.asarray(image.convert("RGB"))
            # the high byte (v >> 8), as Keras' image_dataset_from_directory reads one
            # (TensorFlow's decode_png to uint8: libpng's png_set_strip_16), the grey copied
            # to the 3 channels; convert("RGB") clips every value above 255 at 255
            grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        except (OSError, ValueError) as e:  # (a file cut short or damaged after its header)
            raise InputError(f"{path}: cannot decode the image ({e})") from e


def _one_size(paths: list[Path]) -> tuple[int, int]:
    """The (width, height) of every image, from the headers; an InputError naming a file that
    is not an image, or one of another size, and the first."""
    size: tuple[int, int] | None = None
    for path in paths:
        with _opened(path) as image:
            if size is None:
                size = image.size
            elif image.size != size:
                raise InputError(f"{path}: {_wxh(image.size)} pixels, where {paths[0]} is "
                                 f"{_wxh(size)}: the images of a folder are all of one size")
    assert size is not None
    return size


def needs_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UsageError("argument FOLDER: its images are read (and --make-demo's written) "
                         f"with Pillow, which is not installed: {VIZ_EXTRA_HINT}") from None


def demo_folder(flag: str, path: str) -> None:
    """A folder for ``--make-demo`` to write in (made where missing): not "" (which would be
    the current folder), nor a file, nor under one."""
    if not path:
        raise UsageError(f"argument {flag}: an empty path; give a folder (made if missing)")
    for folder in (Path(path), *Path(path).parents):
        # (the nearest that exists: a folder, or nothing can be made; os.path's tests take a
        # name the OS refuses, too long say, as missing: making it then says why)
        if os.path.exists(folder):
            if os.path.isdir(folder):
                return
            where = "" if str(folder) == path else f": {str(folder)!r}"
            raise UsageError(f"argument {flag}: {path!r}{where} exists and is not a folder")


def make_demo(root: Path, count: int) -> None:
    """Write ``count`` images of the built-in shapes dataset as PNG files under ``root``."""
    from PIL import Image

    (x, y), _ = load_shapes(n_train=count, n_test=1)
    names = class_names("shapes")
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    print(f"wrote {count} PNG images in {len(set(y.tolist()))} class folders under {root}")


def main(argv: list[str] | None = None) -> int:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    # (a str, not a Path: Path("") is ".", which would slip an empty FOLDER past its check)
    p.add_argument("folder", help="ROOT with one subfolder of images per class")
    p.add_argument("--make-demo", action="store_true",
                   help="write shapes images into FOLDER as PNG files instead of training")
    p.add_argument("--count", type=POSITIVE, default=2000, help="images --make-demo writes")
    p.add_argument("--model", choices=sorted(MODELS), default="shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=POSITIVE, default=3)
    p.add_argument("--batch-size", type=POSITIVE, default=64)
    p.add_argument("--lr", type=LEARNING_RATE, default=3e-3)
    p.add_argument("--val-split", type=FRACTION, default=0.1)
    p.add_argument("--early-stopping", type=NON_NEGATIVE, default=None, metavar="PATIENCE")
    p.add_argument("--log", default=None, metavar="CSV", help="per-epoch metrics to this file")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained model here")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = p.parse_args(argv)
    p.check(needs_pillow)
    if args.make_demo:
        p.check(demo_folder, "FOLDER", args.folder)
        try:
            make_demo(Path(args.folder), args.count)
        except OSError as e:  # (a folder that cannot be written: no permission, a full disk)
            p.error(f"argument FOLDER: {args.folder!r}: cannot write ({e.strerror or e})")
        return 0
    p.check(input_folder, "FOLDER", args.folder)  # (before the training)
    p.check(output_file, "--save", args.save)
    p.check(output_file, "--log", args.log)
    p.check(distinct_outputs, {"--save": args.save, "--log": args.log})
    p.check(check_device, "--device", args.device)
    try:
        return _train(args)
    except (InputError, UsageError) as e:  # (a file of the folder, --val-split: one line)
        p.error(str(e))


def _train(args: argparse.Namespace) -> int:
    folder = ImageFolder(args.folder)  # (every header read)
    train, held_out = folder.split(args.val_split, args.seed)
    folder.check_decodes()  # (before any training: a damaged file found later loses work)
    model = build_model(args.model, len(train.classes), device=args.device, seed=args.seed)
    model.compile(optimizer=xpcnn.optim.Adam(args.lr))
    callbacks: list[Callback] = []
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping(patience=args.early_stopping, restore_best_weights=True))
    if args.log:
        callbacks.append(CSVLogger(args.log))
    history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        validation_data=held_out, callbacks=callbacks,
                        verbose=0 if args.quiet or args.json else 1)
    result = model.evaluate(held_out, return_dict=True)
    if args.save:
        model.save(args.save)
    if args.json:
        print(json.dumps({"classes": train.classes, "train_images": len(train),
                          "held_out_images": len(held_out), **result,
                          "history": history.history}))
    else:
        print(f"{len(train.classes)} classes, {len(train)} training images: held-out accuracy "
              f"{result['accuracy']:.4f} (loss {result['loss']:.4f}) on {len(held_out)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
