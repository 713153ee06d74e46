"""Figures: what a network does to an image, its filters, its training curves, its mistakes.

Everything here writes PNG files and returns the matplotlib ``Figure`` it drew. matplotlib is
the optional extra ``[viz]`` (``pip install "xpcnn[viz]"``) and is imported only inside the
plotting functions, so ``import xpcnn`` works without it. Figures are drawn on the Agg canvas
directly, never through ``pyplot``: no window opens, no global backend is switched, and nothing
is left open in a pyplot registry.

* :func:`plot_stage_tour`: the feature maps after every layer of a model for one image.
* :func:`plot_notebook_demo`: the original notebook's demonstration, hand-made edge filters
  through Conv2D, a ReLU ceiling, max pooling and FeatureNorm.
* :func:`plot_filters`: a Conv2D layer's kernels.
* :func:`plot_history`: loss and accuracy per epoch, train against validation.
* :func:`plot_confusion_matrix` (and the pure-NumPy :func:`confusion_matrix`).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import checks, distributed
from .callbacks import FIT_LOGS
from .errors import InputError, MissingDependencyError
from .files import atomic_file, replaceable
from .history import EpochRecord
from .layers import Conv2D, FeatureNorm, Layer, MaxPool2D, ReLU
from .model import Model, Sequential
from .ops.softmax import softmax

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

VIZ_EXTRA_HINT = 'pip install "xpcnn[viz]"'

#: Prewitt filter for vertical edges: positive where the image gets darker left to right.
VERTICAL_EDGE = np.array([[1.0, 0.0, -1.0],
                          [1.0, 0.0, -1.0],
                          [1.0, 0.0, -1.0]], dtype=np.float32)
#: Prewitt filter for horizontal edges: positive where the image gets darker top to bottom.
HORIZONTAL_EDGE = np.ascontiguousarray(VERTICAL_EDGE.T)
#: The demonstration's ReLU ceiling (``ReLU(max_value=...)``) on images scaled to [0, 1]:
#: a strong edge responds with up to 3, so the ceiling visibly flattens the strongest ones.
NOTEBOOK_CEILING = 1.0

_SIGNED_CMAP = "RdBu_r"
_POSITIVE_CMAP = "viridis"
_GAP_COLOUR = "0.8"  # between filter tiles: light grey, so near-white kernels keep an edge
# A figure larger than this is refused rather than drawn (or cut down): Agg stops at 65536
# pixels a side, and well before that one figure takes gigabytes of memory and a PNG no viewer
# shows whole; the error says which figsize, dpi or setting made it so large.
_MAX_SIDE = 2**15
_MAX_PIXELS = 10**8  # (400 MB of RGBA in Agg's buffer)


# -- matplotlib, imported on first use ------------------------------------------------------
def _new_figure(figsize: tuple[float, float], dpi: float, smaller: str = "") -> Figure:
    """A Figure on the Agg canvas, with constrained layout (no overlapping labels); one of more
    than ``_MAX_SIDE`` pixels a side or ``_MAX_PIXELS`` in all is refused, ``smaller`` saying
    what else than figsize and dpi makes it smaller."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            f"xpcnn's figures need matplotlib, which is not installed: {VIZ_EXTRA_HINT}") from e
    try:  # (a pair, or an array of two)
        pair = not isinstance(figsize, str) and np.shape(figsize) == (2,)
    except ValueError:  # (a ragged sequence)
        pair = False
    if not pair:
        raise InputError(f"figsize must be (width, height) in inches, got {figsize!r}")
    w, h = (checks.number(v, "figsize width and height", low=0, low_open=True) for v in figsize)
    dpi = checks.number(dpi, "dpi", low=0, low_open=True)
    pixels = _pixels((w, h), dpi)
    if not _fits(pixels):
        raise InputError(f"the figure would be {pixels[0]} x {pixels[1]} pixels (figsize "
                         f"{figsize!r} at dpi {dpi:g}); xpcnn draws at most {_MAX_SIDE} pixels "
                         f"a side and {_MAX_PIXELS // 10**6} million in all: give a smaller "
                         "figsize or dpi" + (f", or {smaller}" if smaller else ""))
    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _pixels(figsize: tuple[float, float], dpi: float) -> tuple[int, int]:
    return int(figsize[0] * dpi), int(figsize[1] * dpi)  # (as Agg sizes its canvas)


def _fits(pixels: tuple[int, int]) -> bool:
    return max(pixels) <= _MAX_SIDE and pixels[0] * pixels[1] <= _MAX_PIXELS


def _largest_dpi(figsize: tuple[float, float]) -> int:
    """The largest whole dpi at which a figure of ``figsize`` inches is drawn (0: none)."""
    dpi = math.floor(min(_MAX_SIDE / max(figsize), math.sqrt(_MAX_PIXELS / math.prod(figsize))))
    while dpi > 0 and not _fits(_pixels(figsize, dpi)):  # (rounding to whole pixels)
        dpi -= 1
    return dpi


def _png_path(path: Any) -> str:
    """``path`` for a figure: a PNG file's (a .pdf or .svg was given PNG bytes under its name)."""
    path = checks.output_file(path, "the figure", replaced=False)  # (a pipe: written in place)
    suffix = os.path.splitext(path)[1]
    if suffix and suffix.lower() != ".png":
        raise InputError(f"the figures are PNG files: give a path ending in .png, got "
                         f"{path!r}")
    return path


def _save(fig: Figure, path: str) -> None:
    """Write ``fig`` as a PNG of exactly figsize * dpi pixels at ``path`` (which
    :func:`_png_path` checked before any work), creating the folder; through
    :func:`~xpcnn.files.atomic_file` (a failed write names the file and keeps the old one),
    but a pipe or a device (/dev/stdout), which cannot be renamed over, in place."""
    if not replaceable(path):
        fig.savefig(path, format="png", dpi=fig.dpi)
        return
    with atomic_file(path) as f:  # (which creates the folder)
        fig.savefig(f, format="png", dpi=fig.dpi)


# -- inputs -------------------------------------------------------------------------------
def _as_image(image: Any) -> np.ndarray:
    """One image as a host (H, W, C) array; (H, W) and (1, H, W, C) are accepted too."""
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise InputError(f"image must be one (H, W, C) image, got shape {np.shape(image)}")
    arr = checks.as_images(arr[None], "image")[0]
    if not np.all(np.isfinite(arr)):
        raise InputError("image holds NaN or infinite values")
    return arr


def _unit_scale(img: np.ndarray) -> np.ndarray:
    """An (H, W, C) image as float in [0, 1]: integers and [0, 255] floats divided by 255,
    other ranges stretched."""
    x = img.astype(np.float64)
    if np.issubdtype(img.dtype, np.integer) or (x.min() >= 0 and 1 < x.max() <= 255):
        x = x / 255.0
    elif x.min() < 0 or x.max() > 1:
        span = x.max() - x.min()
        x = (x - x.min()) / (span if span > 0 else 1.0)
    return np.clip(x, 0.0, 1.0)


def _display_image(img: np.ndarray) -> np.ndarray:
    """An (H, W, C) image as RGB or RGBA in [0, 1], which imshow draws at those levels (a 2-D
    array it would stretch to its own min..max: a constant white image came out black).

    1 channel is grey; 3 are RGB; 4 are RGBA, as imshow and Keras' ``array_to_img`` take them
    (transparent pixels show the white axes behind); any other number shows channel 0 in grey
    (the row of channels beside it shows each).
    """
    x = _unit_scale(img)
    if x.shape[2] in (3, 4):
        return x
    return np.repeat(x[:, :, :1], 3, axis=2)


def _image_for(x: Any, index: int, what: str = "images") -> np.ndarray:
    n = len(x)
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < n:
        raise InputError(f"image index {index!r} does not exist: the {what} hold {n} images "
                         f"(valid indices 0..{n - 1})")
    return np.asarray(x[index])


def _a_model(model: Any) -> Model:
    if not isinstance(model, Model):
        raise InputError(f"expected an xpcnn model, got {type(model).__name__}")
    return model


def _ready_model(model: Any, sample_shape: tuple[int, ...]) -> Model:
    model = _a_model(model)
    if not model.layers:
        raise InputError("the model has no layers to show")
    if not model.built:
        model.build((None, *sample_shape))  # (per sample: a build of its own, never warned)
    return model


def _check_takes_images(model: Model, whose: str, what: str) -> None:
    """Refuse a model of flat inputs (784,): ``what`` shows the maps of (H, W, C) images."""
    shape = tuple(model._input_shape or ())
    if len(shape) != 3:
        raise InputError(f"{whose} takes inputs of shape {shape}, not images (H, W, C): "
                         f"{what} shows models of images")


def _check_class_names(class_names: Any, output_shape: tuple[int, ...]) -> None:
    """None, or one name for each of a model's outputs (a str was one class per letter)."""
    if class_names is not None and (isinstance(class_names, str | bytes) or not isinstance(
            class_names, Sequence | np.ndarray) or output_shape != (len(class_names),)):
        raise InputError(f"class_names must be one name for each of the model's outputs, "
                         f"whose shape is {output_shape}, got {class_names!r}")


# -- drawing helpers -------------------------------------------------------------------------
def _limits(values: np.ndarray) -> tuple[float, float, str]:
    """Colour limits and colormap: symmetric and diverging when negative values occur."""
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        m = max(-lo, hi, 1e-12)
        return -m, m, _SIGNED_CMAP
    return 0.0, max(hi, 1e-12), _POSITIVE_CMAP


def _bare(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# -- the stage tour --------------------------------------------------------------------------
def _layer_label(i: int, layer: Layer, out: np.ndarray, max_maps: int) -> str:
    kind = type(layer).__name__
    lines = [f"{i}: {layer.name}"] + ([kind] if layer.name != kind.lower() else [])
    lines.append(str(tuple(out.shape)))
    lines.append(f"[{_fmt(out.min())}, {_fmt(out.max())}]")
    if out.ndim == 3 and out.shape[2] > max_maps:
        lines.append(f"maps 0-{max_maps - 1} of {out.shape[2]}")
    return "\n".join(lines)


def _mosaic(maps: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, K) maps side by side in ``slots`` tiles with NaN gaps; returns it and the tile
    centres (one image is far faster to draw than one axes per map)."""
    h, w, k = maps.shape
    gap = max(1, round(w / 10))
    out = np.full((h, slots * (w + gap) - gap), np.nan)
    for c in range(k):
        out[:, c * (w + gap):c * (w + gap) + w] = maps[:, :, c]
    return out, np.arange(k) * (w + gap) + (w - 1) / 2


def _show_mosaic(ax: Axes, maps: np.ndarray, slots: int, vmin: float, vmax: float,
                 cmap: str, labels: Sequence[str]) -> None:
    import matplotlib

    tiles, centres = _mosaic(maps, slots)
    ax.imshow(tiles, cmap=matplotlib.colormaps[cmap].with_extremes(bad="white"), vmin=vmin,
              vmax=vmax if vmax > vmin else vmin + 1, interpolation="nearest")
    ax.set_xticks(centres, labels, fontsize=6)
    ax.set_yticks([])
    ax.tick_params(length=0, pad=1)
    for side in ax.spines.values():
        side.set_visible(False)


def _tour_layout(shapes: Sequence[tuple[int, ...]], max_maps: int, titled: bool
                 ) -> tuple[int, tuple[float, float]]:
    """The stage tour's map slots a row and its figsize, from the per-sample shapes of the
    input and of every layer's output."""
    # Each row of maps as wide as the most maps a row shows, not max_maps (2000 made the
    # figure 2000 inches wide for 4 maps).
    slots = max((min(s[2], max_maps) for s in shapes if len(s) == 3), default=1)
    return slots, (1.0 * slots + 2.2, 1.15 * len(shapes) + (0.4 if titled else 0.0))


def plot_stage_tour(model: Model, image: Any, path: str | os.PathLike[str],
                    max_maps: int = 8, class_names: Sequence[str] | None = None,
                    title: str | None = None, figsize: tuple[float, float] | None = None,
                    dpi: float = 100) -> Figure:
    """The feature maps after every layer of ``model`` for one ``image``, written to ``path``.

    Row 0 is the original image beside its channels, both at their true levels (uint8 0..255
    and floats in [0, 1] from black to white; floats in another range stretched to their own
    min..max): 1 channel is drawn grey, 3 as RGB, 4 as RGBA (transparent pixels show white),
    any other number as channel 0 in grey. Row ``i + 1`` is layer ``i``'s output: its first
    ``max_maps`` feature maps on one colour scale per row fitted to that row's values (so a
    row shows where its maps respond most, not absolute levels: its label gives the range;
    diverging, blue-white-red, where the row has negative values; viridis from 0 otherwise),
    or a bar chart for flat outputs
    (``class_names``, one per output, label the output vector, and the logits under a final
    Softmax layer). The text at the left of each row names the layer, its type, output shape
    and value range. Returns the Figure: two axes per row (label or original, then maps),
    ``len(model.layers) + 1`` rows.
    """
    path = _png_path(path)  # (before any work)
    max_maps = checks.positive_int(max_maps, "max_maps")
    img = _as_image(image)
    model = _ready_model(model, img.shape)
    _check_takes_images(model, "the model", "the stage tour")
    _check_class_names(class_names, model.output_shape[1:])
    outs = [model.backend.to_numpy(o)[0].astype(np.float64) for o in model.layer_outputs(img[None])]
    nrows = len(outs) + 1
    slots, fitted = _tour_layout([a.shape for a in [img, *outs]], max_maps, bool(title))
    if figsize is None:
        figsize = fitted
    fig = _new_figure(figsize, dpi, "a smaller max_maps")
    if title:
        fig.suptitle(title, fontsize=11)
    gs = fig.add_gridspec(nrows, 2, width_ratios=[1.5, max(slots, 2)])

    # Row 0: the original image, then its channels.
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(_display_image(img), interpolation="nearest")
    ax.set_title(f"input {tuple(img.shape)}", fontsize=8)
    _bare(ax)
    k = min(img.shape[2], max_maps)
    names = {3: ["R", "G", "B"], 4: ["R", "G", "B", "A"]}.get(
        img.shape[2], [f"channel {c}" for c in range(k)])
    # (the channels on the image's own fixed scale: black 0, white full)
    _show_mosaic(fig.add_subplot(gs[0, 1]), _unit_scale(img)[:, :, :k], slots, 0.0, 1.0,
                 "gray", names[:k])

    # Class names label the output and, under a final Softmax, the logits before it.
    last = len(outs) - 1
    named = {last, last - 1} if model._ends_in_a_softmax_layer() else {last}
    for i, (layer, out) in enumerate(zip(model.layers, outs, strict=True)):
        lab = fig.add_subplot(gs[i + 1, 0])
        lab.axis("off")
        lab.text(0.0, 0.5, _layer_label(i, layer, out, max_maps), fontsize=7.5, va="center",
                 ha="left", family="monospace", transform=lab.transAxes)
        ax = fig.add_subplot(gs[i + 1, 1])
        if out.ndim == 3:
            k = min(out.shape[2], max_maps)
            vmin, vmax, cmap = _limits(out[:, :, :k])
            _show_mosaic(ax, out[:, :, :k], slots, vmin, vmax, cmap,
                         [str(c) for c in range(k)])
            continue
        flat = out.reshape(-1)
        colors = np.where(flat >= 0, "tab:blue", "tab:red")
        if flat.size <= 256:
            ax.bar(np.arange(flat.size), flat, width=0.8, color=colors)
        else:  # thousands of bars are slow to draw; one line collection is not
            ax.vlines(np.arange(flat.size), 0, flat, colors=colors, linewidth=0.5)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlim(-0.6, flat.size - 0.4)
        ax.tick_params(labelsize=6)
        if i in named and class_names is not None:
            ax.set_xticks(np.arange(flat.size), [str(n) for n in class_names], fontsize=6)
            top = int(np.argmax(flat))
            ax.set_title(f"largest: {class_names[top]} ({flat[top]:.3f})", fontsize=7)
    _save(fig, path)
    return fig


# -- the notebook's demonstration -----------------------------------------------------------
def edge_kernel(channels: int) -> np.ndarray:
    """Conv2D kernel (3, 3, channels, 2): the vertical then the horizontal edge filter.

    Each input channel gets the filter weighted ``1 / channels``, so the filters see the
    image's mean brightness and respond with at most 3 on images scaled to [0, 1].
    """
    channels = checks.positive_int(channels, "channels")
    k = np.stack([VERTICAL_EDGE, HORIZONTAL_EDGE], axis=-1)[:, :, None, :]
    return np.repeat(k, channels, axis=2).astype(np.float32) / channels


def notebook_demo_model(input_shape: tuple[int, int, int],
                        ceiling: float = NOTEBOOK_CEILING) -> Sequential:
    """Conv2D with the two edge filters, ReLU(max_value=ceiling), MaxPool2D(2), FeatureNorm."""
    model = Sequential([Conv2D(2, 3, name="edges"), ReLU(max_value=ceiling, name="ceiling"),
                        MaxPool2D(2, name="pool"), FeatureNorm(name="norm")],
                       name="notebook_demo")
    model.build(tuple(input_shape))
    conv = model.layers[0]
    conv.set_weights([edge_kernel(int(input_shape[-1])), np.zeros(2, dtype=np.float32)])
    return model


def plot_notebook_demo(image: Any, path: str | os.PathLike[str],
                       ceiling: float = NOTEBOOK_CEILING,
                       figsize: tuple[float, float] = (7.5, 10.0), dpi: float = 100) -> Figure:
    """The notebook's figures: edge filters, ReLU ceiling, max pooling, FeatureNorm.

    ``image`` (H, W, C), uint8 or float, is scaled to [0, 1] and sent through
    :func:`notebook_demo_model`. Each row is one stage: the original image (at its true
    levels, drawn as :func:`plot_stage_tour` draws it), then the vertical and the horizontal
    edge map after that stage, on one colour scale per row, shown by the row's colour bar:
    fitted to the row's values, except the ReLU and pooling rows, which span [0, ceiling] so
    the flattened peaks show. Returns the Figure (a 4 x 3 grid of images plus one colour bar
    per row).
    """
    path = _png_path(path)  # (before any work)
    img = _as_image(image)
    if img.shape[0] < 4 or img.shape[1] < 4:
        raise InputError(f"the demonstration needs an image of at least 4x4 pixels, got "
                         f"{img.shape[:2]}")
    x = _unit_scale(img)
    model = notebook_demo_model(x.shape, ceiling)
    outs = [model.backend.to_numpy(o)[0] for o in model.layer_outputs(x[None].astype(np.float32))]
    stages = [
        ("Conv2D 3x3 (Prewitt)", "signed edge response"),
        (f"ReLU(max_value={ceiling:g})", "negatives to 0, peaks capped"),
        ("MaxPool2D(2)", "largest of each 2x2"),
        ("FeatureNorm()", "each map to mean 0, std 1"),
    ]
    fig = _new_figure(figsize, dpi)
    fig.suptitle("The notebook's edge filters, stage by stage", fontsize=12)
    axes = fig.subplots(len(stages), 3, squeeze=False)
    shown = _display_image(img)
    for r, ((name, what), out) in enumerate(zip(stages, outs, strict=True)):
        ax = axes[r, 0]
        ax.imshow(shown, interpolation="nearest")
        _bare(ax)
        ax.set_ylabel(f"{r + 1}. {name}\n{what}", fontsize=9)
        if r == 0:
            ax.set_title(f"original {tuple(img.shape)}", fontsize=9)
        if isinstance(model.layers[r], ReLU | MaxPool2D):
            vmin, vmax, cm = 0.0, float(ceiling), _POSITIVE_CMAP
        else:
            vmin, vmax, cm = _limits(out)
        im = None
        for c, label in enumerate(("vertical edges", "horizontal edges")):
            ax = axes[r, c + 1]
            im = ax.imshow(out[:, :, c], cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
            _bare(ax)
            ax.set_title(f"{label} {out.shape[:2]}" if r == 0 or out.shape != outs[r - 1].shape
                         else label, fontsize=9)
        fig.colorbar(im, ax=list(axes[r, 1:]), shrink=0.85, aspect=15)
    _save(fig, path)
    return fig


# -- filters --------------------------------------------------------------------------------
def conv_layer_indices(model: Model) -> list[int]:
    """Indices (into ``model.layers``) of the model's Conv2D layers."""
    return [i for i, la in enumerate(model.layers) if isinstance(la, Conv2D)]


def _pick_conv(model_or_layer: Any, layer: int | str | None) -> Conv2D:
    if isinstance(model_or_layer, Conv2D):
        if layer is not None:
            raise InputError("pass layer=None when plotting a Conv2D layer itself")
        conv = model_or_layer
    elif isinstance(model_or_layer, Model):
        model = model_or_layer
        convs = conv_layer_indices(model)
        which = f"its Conv2D layers are {', '.join(map(str, convs))}" if convs else \
            "it has no Conv2D layer"
        if layer is None:
            if not convs:
                raise InputError(f"the model has no Conv2D layer whose filters could be shown "
                                 f"(layers: {', '.join(type(la).__name__ for la in model.layers)})")
            layer = convs[0]
        if isinstance(layer, str):
            names = [la.name for la in model.layers]
            if layer not in names:
                raise InputError(f"the model has no layer named {layer!r}; {which} "
                                 f"(names: {', '.join(names)})")
            layer = names.index(layer)
        n = len(model.layers)
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) \
                or not 0 <= layer < n:
            raise InputError(f"layer index {layer!r} does not exist: the model has {n} layers "
                             f"(valid indices 0..{n - 1}); {which}")
        conv = model.layers[int(layer)]
        if not isinstance(conv, Conv2D):
            raise InputError(f"layer {layer} ({conv.name!r}) is a {type(conv).__name__}, not a "
                             f"Conv2D; {which}")
    else:
        raise InputError(f"plot_filters expects an xpcnn model or a Conv2D layer, got "
                         f"{type(model_or_layer).__name__}")
    if not conv.built:
        raise InputError(f"layer {conv.name!r} is not built yet: build the model first")
    return conv


def _filters_layout(filters: int, columns: int, rgb: bool
                    ) -> tuple[int, int, tuple[float, float]]:
    """Columns, rows and figsize of :func:`plot_filters`' grid of ``filters`` tiles."""
    ncols = min(columns, filters)
    nrows = math.ceil(filters / ncols)
    return ncols, nrows, (max(4.0, 0.5 * ncols + (0.4 if rgb else 1.2)), 0.5 * nrows + 1.0)


def _in_colour(model_or_layer: Model | Conv2D, conv: Conv2D) -> bool:
    """Whether :func:`plot_filters` draws ``conv``'s kernels as colours: a first convolution
    over 3 channels (the image's RGB)."""
    first = not isinstance(model_or_layer, Model) or \
        conv is model_or_layer.layers[conv_layer_indices(model_or_layer)[0]]
    return conv.input_shape[-1] == 3 and first


def plot_filters(model_or_layer: Model | Conv2D, path: str | os.PathLike[str],
                 layer: int | str | None = None, reduce: str = "mean", columns: int = 8,
                 figsize: tuple[float, float] | None = None, dpi: float = 100) -> Figure:
    """A grid of one Conv2D layer's kernels, one tile per output filter, ``columns`` a row.

    ``layer`` picks the Conv2D of a model by index into ``model.layers`` or by name (default:
    the first Conv2D). The kernels of a first convolution over 3 channels (the image's RGB)
    are shown as colours, each filter scaled to [0, 1] on its own; other kernels as one signed
    map on a shared colour scale: the mean over the input channels (``reduce="mean"``) or the
    first channel (``reduce="first"``); the title says which. Tiles are numbered by row label
    plus column label. Returns the Figure (one image of all tiles; a colour bar when signed).
    """
    path = _png_path(path)  # (before any work)
    if reduce not in ("mean", "first"):
        raise InputError(f"reduce must be 'mean' or 'first', got {reduce!r}")
    columns = checks.positive_int(columns, "columns")
    conv = _pick_conv(model_or_layer, layer)
    kernel = conv.get_weights()[0].astype(np.float64)  # (kh, kw, C_in, C_out)
    kh, kw, c_in, c_out = kernel.shape
    rgb = _in_colour(model_or_layer, conv)
    ncols, nrows, fitted = _filters_layout(c_out, columns, rgb)
    if figsize is None:
        figsize = fitted
    fig = _new_figure(figsize, dpi, "more columns (the filters are drawn in a grid of "
                      f"{ncols} columns and {nrows} rows)")
    ax = fig.subplots()
    if rgb:
        how = "RGB, each filter scaled to [0, 1]"
    elif c_in == 1:
        how = "one input channel, shared scale"
    elif reduce == "mean":
        how = f"mean over the {c_in} input channels, shared scale"
    else:
        how = f"input channel 0 of {c_in}, shared scale"
    ax.set_title(f"{conv.name}: {c_out} filters {kh}x{kw}x{c_in}\n({how})", fontsize=10)
    gap = max(1, round(kh / 4))
    step_y, step_x = kh + gap, kw + gap
    shape = (nrows * step_y - gap, ncols * step_x - gap)
    if rgb:
        tiles = np.zeros((*shape, 4))  # RGBA: the gaps stay transparent
        for f in range(c_out):
            k = kernel[:, :, :, f]
            span = k.max() - k.min()
            r, c = divmod(f, ncols)
            tiles[r * step_y:r * step_y + kh, c * step_x:c * step_x + kw, :3] = \
                (k - k.min()) / (span if span > 0 else 1.0)
            tiles[r * step_y:r * step_y + kh, c * step_x:c * step_x + kw, 3] = 1.0
        ax.set_facecolor(_GAP_COLOUR)
        ax.imshow(tiles, interpolation="nearest")
    else:
        import matplotlib

        maps = kernel.mean(axis=2) if reduce == "mean" else kernel[:, :, 0, :]
        m = max(float(np.abs(maps).max()), 1e-12)
        tiles = np.full(shape, np.nan)
        for f in range(c_out):
            r, c = divmod(f, ncols)
            tiles[r * step_y:r * step_y + kh, c * step_x:c * step_x + kw] = maps[:, :, f]
        cmap = matplotlib.colormaps[_SIGNED_CMAP].with_extremes(bad=_GAP_COLOUR)
        im = ax.imshow(tiles, cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, aspect=25)
    ax.set_xticks(np.arange(ncols) * step_x + (kw - 1) / 2, [f"+{c}" for c in range(ncols)],
                  fontsize=7)
    ax.set_yticks(np.arange(nrows) * step_y + (kh - 1) / 2,
                  [str(r * ncols) for r in range(nrows)], fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=2)
    ax.set_xlabel("filter number = row + column", fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    _save(fig, path)
    return fig


# -- training curves ------------------------------------------------------------------------
def _logged(logs: Mapping[str, Any], key: str) -> np.ndarray:
    """``logs[key]`` as a float64 vector (empty where absent): a list or array of numbers."""
    values = logs.get(key)
    if values is None:
        return np.empty(0)
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise InputError(f"the history's {key!r} must be a sequence of numbers, one for each "
                         f"epoch it was logged in; got {values!r:.80}")
    return arr.astype(np.float64)


def _numbers(values: Any) -> bool:
    """Whether ``values`` is absent or a sequence of numbers (a callback's log that is not one
    is left out of the figure)."""
    if values is None:
        return True
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        return False
    return arr.ndim == 1 and arr.dtype.kind in "iuf"


def plot_history(history: EpochRecord | Mapping[str, Sequence[float]],
                 path: str | os.PathLike[str], figsize: tuple[float, float] = (10.0, 4.0),
                 dpi: float = 100) -> Figure:
    """Loss and accuracy per epoch, train against validation (``val_*``) where recorded.

    ``history`` is what ``fit`` returns or its ``.history`` dict (lists or arrays of numbers).
    One panel for the loss and one per metric the history holds, under the name compile gave
    it (``accuracy``, ``acc``, ``top3``...), or a number a callback logged (not the seconds or
    the learning rate); each curve at the epochs it was logged in (``fit(validation_freq=k)``
    validates every k-th). A dict (or a History filled by hand) does not say which epochs
    those are, so one whose lists differ in length is refused: pass the History that ``fit``
    returned. Returns the Figure.
    """
    path = _png_path(path)  # (before any work)
    logs = getattr(history, "history", history)
    epochs_of = getattr(history, "epochs_of", None)  # (a History: each key's own epochs)
    if not isinstance(logs, Mapping):
        raise InputError(f"plot_history expects a History or its .history dict, got "
                         f"{type(history).__name__}")
    # (the loss, then each metric the history holds, under the name compile gave it, or a
    # callback's number: not the seconds or the rate, which are no measure of the fit)
    names = dict.fromkeys(["loss", *(str(k).removeprefix("val_") for k in logs)])
    metrics = [m for m in names if m not in ("seconds", "learning_rate") and (
        m in FIT_LOGS or all(_numbers(logs.get(k)) for k in (m, f"val_{m}")))]
    curves = {k: v for m in metrics for k in (m, f"val_{m}") if (v := _logged(logs, k)).size}
    metrics = [m for m in metrics if m in curves or f"val_{m}" in curves]
    if not metrics:
        raise InputError(f"the history has no loss or metric to plot (keys: "
                         f"{', '.join(map(str, logs)) or 'none'}); train for at least one epoch")
    longest = max(curves, key=lambda k: curves[k].size)
    epochs: dict[str, np.ndarray] = {}
    for key, values in curves.items():
        # (0-based; a resumed run may not start at 0)
        known = None if epochs_of is None else epochs_of(key)
        if known is None:  # (a dict, or a History filled by hand: one value an epoch where
            # every list has as many)
            known = range(values.size) if values.size == curves[longest].size else None
        if known is None:  # (drawn from epoch 1 on, they would be at the wrong epochs)
            raise InputError(
                f"the history's {key!r} is {values.size} long and {longest!r} "
                f"{curves[longest].size}, and " + (
                    "a dict does not say after which epochs they were logged (fit("
                    "validation_freq=k) validates after every k-th): pass the History that fit "
                    "returned, which records them" if epochs_of is None else
                    "this History does not record after which epochs they were logged (a "
                    "History filled by hand, or read from an older checkpoint)"))
        epochs[key] = np.asarray(known) + 1
    fig = _new_figure(figsize, dpi)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for key, label, style in ((metric, "train", "o-"), (f"val_{metric}", "validation", "s--")):
            if key not in curves:
                continue
            values = curves[key]
            ax.plot(epochs[key], values, style, label=f"{label} (last {values[-1]:.4g})",
                    markersize=4)
        ax.set_title(f"{metric} per epoch", fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)
    return fig


# -- confusion matrix -----------------------------------------------------------------------
def confusion_matrix(y_true: Any, y_pred: Any, classes: int | Sequence[Any]) -> np.ndarray:
    """Counts (classes, classes): row = true class, column = predicted class (pure NumPy).

    ``classes`` is the number of classes or a sequence of class names.
    """
    if isinstance(classes, str | bool) or not isinstance(classes, int | np.integer | Sequence
                                                                 | np.ndarray):
        raise InputError(f"classes must be the number of classes or a sequence of class names, "
                         f"got {classes!r}")  # (a str was taken for the names of its letters)
    k = len(classes) if not isinstance(classes, int | np.integer) else int(classes)
    if k < 1:
        raise InputError(f"classes must be at least 1, got {classes!r}")
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise InputError(f"y_true and y_pred must be 1-D label arrays of equal length, got "
                         f"shapes {t.shape} and {p.shape}")
    for what, a in (("y_true", t), ("y_pred", p)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= k):
            # (class names have no min: that was a UFuncTypeError)
            values = f", values {a.min()}..{a.max()}" if np.issubdtype(a.dtype, np.number) else ""
            raise InputError(f"{what} must hold integer labels in [0, {k - 1}]; got dtype "
                             f"{a.dtype}{values}")
    flat = t.astype(np.int64) * k + p.astype(np.int64)
    return np.bincount(flat, minlength=k * k).reshape(k, k)


def plot_confusion_matrix(model: Model, x: Any, y: Any, path: str | os.PathLike[str],
                          class_names: Sequence[str] | None = None, batch_size: int = 256,
                          figsize: tuple[float, float] = (7.5, 6.5), dpi: float = 100
                          ) -> Figure:
    """The model's confusion matrix on (x, y), written to ``path``.

    Cells show counts, coloured by the fraction of the true class (row) they hold, so rare and
    common classes read alike. Returns the Figure (the matrix axes and its colour bar).
    """
    path = _png_path(path)  # (before predict runs over x)
    probs = _a_model(model).predict(x, batch_size=batch_size)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise InputError(f"a confusion matrix needs a classifier, whose output is one vector of "
                         f"class scores a sample; this model's is {probs.shape[1:]} (a feature "
                         "extractor?)")
    k = probs.shape[1]
    _, labels = checks.as_labels(y, len(probs), k, "y")
    _check_class_names(class_names, probs.shape[1:])
    cm = confusion_matrix(labels, np.argmax(probs, axis=1), k)
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in
                                                                          range(k)]
    rows = cm.sum(axis=1, keepdims=True)
    frac = cm / np.maximum(rows, 1)
    fig = _new_figure(figsize, dpi)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix: accuracy {accuracy:.3f} on {cm.sum()} images", fontsize=11)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    slanted = max(len(n) for n in names) > 3  # long names slant so that they never overlap
    ax.set_xticks(np.arange(k), names, rotation=45 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(np.arange(k), names, fontsize=8)
    if k <= 20:
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.85)
    _save(fig, path)
    return fig


# -- the command line's figures -------------------------------------------------------------
def _names_for(names: Sequence[str] | None, k: int) -> list[str] | None:
    """The first ``k`` class names, or None when there are fewer than ``k``."""
    return [str(n) for n in names[:k]] if names is not None and len(names) >= k else None


#: The files :func:`write_training_plots` writes in its folder (``xpcnn train --plots``).
TRAINING_PLOTS = ("history.png", "confusion.png")


def write_training_plots(out_dir: str | os.PathLike[str], history: EpochRecord, model: Model,
                         x_test: Any, y_test: Any, class_names: Sequence[str] | None = None
                         ) -> list[str]:
    """:data:`TRAINING_PLOTS` in ``out_dir`` (``xpcnn train --plots``)."""
    paths = [os.path.join(os.fspath(out_dir), name) for name in TRAINING_PLOTS]
    plot_history(history, paths[0])
    plot_confusion_matrix(model, x_test, y_test, paths[1],
                          class_names=_names_for(class_names, model.num_classes))
    return paths


_FILTER_COLUMNS = 8  # (xpcnn visualize's grids of filters)


def _check_sizes(model: Model, args: Any) -> None:
    """Refuse ``xpcnn visualize``'s figures that would be too large at ``--max-maps`` and
    ``--dpi``, sized from the model's shapes alone (each flag in its range, a deep model's tour
    may still be too large), naming those flags and the largest ``--dpi`` that fits."""
    shapes = [tuple(model._input_shape or ()), *(tuple(la.output_shape) for la in model.layers)]
    slots, tour = _tour_layout(shapes, args.max_maps, titled=True)
    sizes = [(f"the stage tour ({len(shapes)} rows of up to {slots} maps)", tour)]
    convs = conv_layer_indices(model)
    for i in convs:
        conv = model.layers[i]
        sizes.append((f"the filters of layer {i}", _filters_layout(
            conv.output_shape[-1], _FILTER_COLUMNS, _in_colour(model, conv))[2]))
    too_large = [(what, figsize) for what, figsize in sizes
                 if not _fits(_pixels(figsize, args.dpi))]
    if too_large:
        what, figsize = too_large[0]
        pixels = _pixels(figsize, args.dpi)
        # (a --dpi that fits every figure; fewer maps only where they make the tour fit)
        dpi = min(_largest_dpi(size) for _, size in too_large)
        fewer = too_large == sizes[:1] and _fits(_pixels(
            _tour_layout(shapes, 1, titled=True)[1], args.dpi))
        raise InputError(
            f"argument --dpi: {what} would be {pixels[0]} x {pixels[1]} pixels at --dpi "
            f"{args.dpi:g}" + (f" with --max-maps {args.max_maps}" if figsize is tour else "")
            + f", more than xpcnn draws ({_MAX_SIDE} a side, "
            f"{_MAX_PIXELS // 10**6} million in all): give --dpi {dpi} or less"
            + (", or a smaller --max-maps" if fewer else ""))


def visualize_command(args: Any) -> dict[str, Any]:
    """``xpcnn visualize``: the stage tour of one dataset image and every Conv2D's filters."""
    from .datasets import class_names, load_dataset
    from .saving import load_model

    model = load_model(args.model, device=args.device)
    # (before _check_sizes, which sizes the maps of (H, W, C) inputs)
    _check_takes_images(model, f"the model {args.model}", "xpcnn visualize")
    _check_sizes(model, args)  # (before loading the dataset)
    train, test = load_dataset(args.dataset, data_dir=args.data_dir)
    split = args.split or ("test" if test is not None else "train")
    if split == "test" and test is None:
        raise InputError(f"the {args.dataset} files here have no test split; use --split train")
    x, y = test if split == "test" else train
    try:
        image = _image_for(x, args.index, f"{args.dataset} {split} images")
    except InputError as e:
        raise InputError(f"argument --index: {e}") from e
    if tuple(image.shape) != tuple(model._input_shape or ()):
        raise InputError(f"the model {args.model} expects images of shape "
                         f"{tuple(model._input_shape or ())} but {args.dataset} images are "
                         f"{tuple(image.shape)}")
    every_name = class_names(args.dataset)
    names = _names_for(every_name, model.num_classes)
    probs = model.predict(image[None])[0]
    if not model._fused_softmax():  # (a model that ends in its logits)
        probs = softmax(np, probs.astype(np.float64))
    label, guess = int(y[args.index]), int(np.argmax(probs))
    # (the dataset names the label and the guess; a model with fewer outputs than it has
    # classes gets a label beyond them, one with more a guess beyond its names: numbers)
    name = (lambda k: str(every_name[k]) if k < len(every_name) else str(k))  # noqa: E731
    title = (f"{args.dataset} {split} image {args.index}: label {name(label)}, predicted "
             f"{name(guess)} ({probs[guess]:.0%})")
    out = os.fspath(args.out)
    paths = [os.path.join(out, f"tour_{args.dataset}_{split}_{args.index}.png")]
    # (a layer's name may hold any character: "block1/conv" made a subfolder, "../x" left
    # --out; in a file name, each character that is no letter, digit, "_", "." or "-" is "_")
    safe = [re.sub(r"[^\w.-]", "_", la.name) for la in model.layers]
    paths += [os.path.join(out, f"filters_{i}_{safe[i]}.png") for i in conv_layer_indices(model)]
    if not distributed.is_root():  # (under mpiexec, as `xpcnn train`: rank 0 writes and speaks)
        return {"written": paths, "label": label, "predicted": guess,
                "probability": float(probs[guess])}
    plot_stage_tour(model, image, paths[0], max_maps=args.max_maps, class_names=names,
                    title=title, dpi=args.dpi)
    for i, path in zip(conv_layer_indices(model), paths[1:], strict=True):
        plot_filters(model, path, layer=i, columns=_FILTER_COLUMNS, dpi=args.dpi)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print  # --json: JSON alone
    say(title)
    for p in paths:
        say(f"wrote {p}")
    return {"written": paths, "label": label, "predicted": guess,
            "probability": float(probs[guess])}
