"""Figures (xpcnn.viz), the CLI's `visualize` and `train --plots`, and viz without matplotlib."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpcnn
import xpcnn.datasets
from xpcnn import viz
from xpcnn.cli import main
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import (
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Rescaling,
    Softmax,
)

mpl_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def check_png(path, width, height):
    """A real PNG of width x height pixels that is not one flat colour."""
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpl_image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(pixels[..., :3].var()) > 0
    return pixels


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def tiny_model(channels=3, size=12, classes=3):
    model = xpcnn.Sequential([Rescaling(1 / 255), Conv2D(3, 3, padding="same"), ReLU(),
                              MaxPool2D(2), Conv2D(4, 3), Flatten(), Dense(classes), Softmax()],
                             seed=0)
    model.build((size, size, channels))
    return model


@pytest.fixture
def image(rng):
    img = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img[:, 6:, :] //= 4  # a vertical edge
    return img


# -- stage tour ---------------------------------------------------------------------------
def test_stage_tour_writes_one_row_per_layer_plus_the_image(tmp_path, image):
    model = tiny_model()
    fig = viz.plot_stage_tour(model, image, tmp_path / "tour.png", max_maps=2,
                              class_names=["a", "b", "c"], figsize=(4, 5), dpi=50)
    check_png(tmp_path / "tour.png", 200, 250)
    rows = len(model.layers) + 1
    assert len(fig.axes) == 2 * rows  # per row: label (or the image), then maps or bars
    maps = [ax for ax in fig.axes if ax.images][1:]  # the original, then mosaics
    # The input's channels (3, capped at 2), Rescaling, two convs, ReLU, pool: 2 maps each.
    assert [len(ax.get_xticks()) for ax in maps] == [2] * 6
    softmax_axes = fig.axes[-1]
    assert [t.get_text() for t in softmax_axes.get_xticklabels()] == ["a", "b", "c"]
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "conv2d_1" in texts and "(4, 4, 4)" in texts and "maps 0-1 of 3" in texts


def test_stage_tour_builds_an_unbuilt_model_and_takes_gray_and_float_images(tmp_path, rng):
    model = xpcnn.Sequential([Conv2D(2, 3), ReLU(), GlobalAvgPool2D(), Dense(2), Softmax()])
    gray = rng.random((10, 10)).astype(np.float32)
    fig = viz.plot_stage_tour(model, gray, tmp_path / "g.png", figsize=(3, 3), dpi=40)
    assert model.built and model.input_shape == (None, 10, 10, 1)
    assert len(fig.axes) == 2 * (len(model.layers) + 1)
    check_png(tmp_path / "g.png", 120, 120)


def test_stage_tour_rejects_an_image_of_the_wrong_shape(tmp_path):
    with pytest.raises(InputError, match=r"\(12, 12, 3\)"):
        viz.plot_stage_tour(tiny_model(), np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png")
    with pytest.raises(InputError, match="one \\(H, W, C\\) image"):
        viz.plot_stage_tour(tiny_model(), np.zeros((2, 12, 12, 3)), tmp_path / "x.png")
    with pytest.raises(InputError, match="max_maps"):
        viz.plot_stage_tour(tiny_model(), np.zeros((12, 12, 3)), tmp_path / "x.png", max_maps=0)
    assert not (tmp_path / "x.png").exists()


def test_stage_tour_is_as_wide_as_the_maps_it_shows(tmp_path, image):
    """max_maps=200 made the figure 202 inches wide for at most 4 maps a row."""
    fig = viz.plot_stage_tour(tiny_model(), image, tmp_path / "t.png", max_maps=200, dpi=10)
    assert fig.get_size_inches()[0] == pytest.approx(4 + 2.2)
    assert [len(ax.get_xticks()) for ax in image_axes(fig)[1:]] == [3, 3, 3, 3, 3, 4]


def drawn(fig, ax, row, col):
    """The RGBA (0..255) that the Agg canvas drew at the centre of pixel (row, col) of the
    image on ``ax``: what the PNG shows, not what was asked of imshow (the canvas of the
    figure as it was saved)."""
    canvas = np.asarray(fig.canvas.buffer_rgba())
    x, y = ax.transData.transform((col, row))  # (display: from the bottom left)
    return canvas[canvas.shape[0] - 1 - int(y), int(x)].astype(int)


def grey(level):
    return [level, level, level, 255]


def one_conv(channels):
    model = xpcnn.Sequential([Conv2D(2, 3), Flatten(), Dense(2)], seed=0)
    model.build((8, 8, channels))
    return model


@pytest.mark.parametrize("level, dtype, channels, with_demo", [
    (255, np.uint8, 1, True), (128, np.uint8, 1, False), (0, np.uint8, 1, False),
    (0.5, np.float32, 1, True), (1.0, np.float64, 2, True), (128, np.uint8, 2, False),
    (255, np.uint8, 3, False), (128, np.uint8, 3, True)])
def test_input_images_are_drawn_at_their_true_levels(tmp_path, level, dtype, channels,
                                                     with_demo):
    """A constant image is drawn at its level, whatever its channels: a greyscale one was
    drawn stretched to its own min..max (a white or grey image came out black), unlike the
    same image as RGB; its channels beside it too. (The notebook demonstration, 0.6 s a
    figure, draws its original through the same _display_image as the stage tour, checked
    here for every case: it is drawn for one case of each dtype kind and channel count, the
    white greyscale image of the bug among them.)"""
    img = np.full((8, 8, channels), level, dtype)
    want = round(level * 255) if level <= 1 else level
    fig = viz.plot_stage_tour(one_conv(channels), img, tmp_path / "t.png", dpi=30)
    picture, chans = image_axes(fig)[:2]
    for row, col in ((0, 0), (4, 7)):
        np.testing.assert_allclose(drawn(fig, picture, row, col), grey(want), atol=1)
        np.testing.assert_allclose(drawn(fig, chans, row, col), grey(want), atol=1)
    if not with_demo:
        return
    demo = viz.plot_notebook_demo(img, tmp_path / "d.png", dpi=30)
    for ax in image_axes(demo)[::3]:  # (the original, once a row)
        np.testing.assert_allclose(drawn(demo, ax, 3, 3), grey(want), atol=1)


def test_a_dim_greyscale_image_is_drawn_dim_as_the_same_rgb_image(tmp_path):
    """Levels 0..40 of 255 are drawn dark, as RGB ones are (was: stretched to full white)."""
    dim = np.tile(np.linspace(0, 40, 8).astype(np.uint8)[None, :, None], (8, 1, 1))
    shown = {}
    for c in (1, 3):
        fig = viz.plot_stage_tour(one_conv(c), np.repeat(dim, c, axis=2), tmp_path / "t.png",
                                  dpi=30)
        picture = image_axes(fig)[0]
        shown[c] = [drawn(fig, picture, 2, col) for col in range(8)]
    np.testing.assert_array_equal(shown[1], shown[3])
    np.testing.assert_allclose([p[0] for p in shown[1]], dim[0, :, 0], atol=1)


def test_four_channels_are_drawn_as_rgba(tmp_path):
    """An (H, W, 4) image is RGBA, as imshow and Keras' array_to_img take it (was: channel 0
    alone in grey, so opaque red came out black): transparent pixels show the white axes."""
    img = np.zeros((8, 8, 4), np.uint8)
    img[..., 0] = 255
    img[:4, :, 3] = 255  # opaque red above
    img[4:, :4, 3] = 0  # transparent bottom left
    img[4:, 4:, 3] = 128  # half-transparent red bottom right
    fig = viz.plot_stage_tour(one_conv(4), img, tmp_path / "t.png", dpi=30)
    picture, chans = image_axes(fig)[:2]
    np.testing.assert_allclose(drawn(fig, picture, 1, 1), [255, 0, 0, 255], atol=1)
    np.testing.assert_allclose(drawn(fig, picture, 6, 1), grey(255), atol=1)
    np.testing.assert_allclose(drawn(fig, picture, 6, 6), [255, 127, 127, 255], atol=2)
    assert [t.get_text() for t in chans.get_xticklabels()] == ["R", "G", "B", "A"]


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"], "abc"])
def test_stage_tour_refuses_class_names_that_do_not_name_the_outputs(tmp_path, image, names):
    with pytest.raises(InputError, match=r"^class_names must be one name for each of the "
                                         r"model's outputs, whose shape is \(3,\), got "):
        viz.plot_stage_tour(tiny_model(), image, tmp_path / "t.png", class_names=names)
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("figsize, dpi, message", [
    (5, 100, r"figsize must be \(width, height\) in inches, got 5"),
    ((3, 4, 5), 100, r"figsize must be \(width, height\) in inches, got \(3, 4, 5\)"),
    (("a", 5), 100, r"figsize width and height must be a number > 0, got 'a'"),
    ((3, 0), 100, r"figsize width and height must be a number > 0, got 0"),
    ((3, 3), "100", r"dpi must be a number > 0, got '100'"),
    ((3, 3), None, r"dpi must be a number > 0, got None"),
    ([1, [2, 3]], 100, r"figsize must be \(width, height\) in inches, got \[1, \[2, 3\]\]"),
    ((3, 3), 1e6, r"the figure would be 3000000 x 3000000 pixels \(figsize \(3, 3\) at dpi "
                  r"1e\+06\); xpcnn draws at most 32768 pixels a side and 100 million in all: "
                  r"give a smaller figsize or dpi, or more columns"),
])
def test_figsize_and_dpi_are_checked_before_drawing(tmp_path, figsize, dpi, message):
    """(were: a bare TypeError or ValueError, or a MemoryError inside Agg for dpi=1e6)"""
    with pytest.raises(InputError, match="^" + message):
        viz.plot_filters(tiny_model(), tmp_path / "f.png", figsize=figsize, dpi=dpi)
    assert not (tmp_path / "f.png").exists()


def test_figsize_may_be_an_array_of_two(tmp_path):
    """As matplotlib takes it (was refused, for a moment, by the check above)."""
    viz.plot_filters(tiny_model(), tmp_path / "f.png", figsize=np.array([4.0, 3.0]))
    assert (tmp_path / "f.png").stat().st_size > 0


def test_a_figure_too_large_to_draw_is_refused_saying_what_makes_it_smaller(tmp_path):
    """20000 filters in 8 columns were written as a PNG of 520 x 125100 pixels."""
    model = xpcnn.Sequential([Conv2D(20000, 1)], input_shape=(1, 1, 1))
    with pytest.raises(InputError, match=r"^the figure would be 520 x 125100 pixels .*: give a "
                                         r"smaller figsize or dpi, or more columns \(the filters "
                                         r"are drawn in a grid of 8 columns and 2500 rows\)"):
        viz.plot_filters(model, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(InputError, match=r"^the figure would be 20000 x 20000 pixels .* or a "
                                         r"smaller max_maps$"):
        viz.plot_stage_tour(tiny_model(), np.zeros((12, 12, 3)), tmp_path / "t.png",
                            figsize=(200, 200), dpi=100)


# -- the notebook's demonstration -----------------------------------------------------------
def test_edge_filters_are_the_named_constants_on_every_channel():
    model = viz.notebook_demo_model((8, 8, 3), ceiling=0.5)
    kernel, bias = model.layers[0].get_weights()
    assert kernel.shape == (3, 3, 3, 2) and not bias.any()
    for c in range(3):
        np.testing.assert_allclose(kernel[:, :, c, 0], viz.VERTICAL_EDGE / 3)
        np.testing.assert_allclose(kernel[:, :, c, 1], viz.HORIZONTAL_EDGE / 3)
    assert model.layers[1].max_value == 0.5


def test_edge_filters_respond_to_their_edge_and_the_ceiling_caps_them():
    x = np.zeros((1, 8, 8, 3), np.float32)
    x[:, :, :4, :] = 1.0  # bright left half: a vertical edge
    conv, relu, pool, norm = viz.notebook_demo_model((8, 8, 3), ceiling=0.5).layer_outputs(x)
    conv, relu = np.asarray(conv)[0], np.asarray(relu)[0]
    assert conv[:, :, 0].max() == pytest.approx(3.0)  # 3 rows of +1 across the edge
    np.testing.assert_allclose(conv[:, :, 1], 0.0, atol=1e-6)  # no horizontal edge
    assert relu.max() == pytest.approx(0.5) and relu.min() == 0.0
    assert np.asarray(pool).shape == (1, 3, 3, 2) and np.asarray(norm).shape == (1, 3, 3, 2)


def test_notebook_demo_figure(tmp_path, image):
    fig = viz.plot_notebook_demo(image, tmp_path / "demo.png", figsize=(5, 6), dpi=40)
    check_png(tmp_path / "demo.png", 200, 240)
    assert len(image_axes(fig)) == 4 * 3  # 4 stages x (original, vertical, horizontal)
    labels = [ax.get_ylabel() for ax in image_axes(fig)[::3]]
    assert ["ReLU(max_value=1)" in lab for lab in labels] == [False, True, False, False]
    with pytest.raises(InputError, match="at least 4x4"):
        viz.plot_notebook_demo(np.zeros((3, 3, 3)), tmp_path / "small.png")


# -- filters --------------------------------------------------------------------------------
def test_filters_rgb_and_multichannel(tmp_path):
    model = tiny_model()
    fig = viz.plot_filters(model, tmp_path / "f1.png", figsize=(3, 2), dpi=50)
    check_png(tmp_path / "f1.png", 150, 100)
    assert len(fig.axes) == 1  # one image of all tiles; RGB kernels need no colour bar
    tiles = fig.axes[0].images[0].get_array()
    assert tiles.shape == (3, 3 * 3 + 2, 4)  # 3 filters 3x3 in a row, 1-pixel gaps, RGBA
    assert "RGB" in fig.axes[0].get_title()
    # conv2d_1 also sees 3 channels, but they are feature maps, not colours.
    fig = viz.plot_filters(model, tmp_path / "f2.png", layer="conv2d_1", columns=2,
                           figsize=(3, 3), dpi=50)
    check_png(tmp_path / "f2.png", 150, 150)
    assert len(fig.axes) == 2  # the tiles and a colour bar
    assert fig.axes[0].images[0].get_array().shape == (7, 7)  # 4 filters as 2 x 2 tiles
    assert "mean over the 3 input channels" in fig.axes[0].get_title()
    fig = viz.plot_filters(model, tmp_path / "f3.png", layer=4, reduce="first", dpi=30)
    assert "input channel 0 of 3" in fig.axes[0].get_title()
    # A Conv2D on its own, over 3 channels, is taken to be looking at an image.
    fig = viz.plot_filters(model.layers[4], tmp_path / "f4.png", dpi=30)
    assert "RGB" in fig.axes[0].get_title()
    with pytest.raises(InputError, match="reduce"):
        viz.plot_filters(model, tmp_path / "f5.png", reduce="max")


def test_filters_name_the_valid_layers(tmp_path):
    model = tiny_model()
    with pytest.raises(InputError, match=r"valid indices 0\.\.7\); its Conv2D layers are 1, 4"):
        viz.plot_filters(model, tmp_path / "f.png", layer=8)
    with pytest.raises(InputError, match="is a ReLU, not a Conv2D; its Conv2D layers are 1, 4"):
        viz.plot_filters(model, tmp_path / "f.png", layer=2)
    with pytest.raises(InputError, match="no layer named 'nope'"):
        viz.plot_filters(model, tmp_path / "f.png", layer="nope")
    dense_only = xpcnn.Sequential([Flatten(), Dense(2)], input_shape=(4, 4, 1))
    with pytest.raises(InputError, match="no Conv2D layer"):
        viz.plot_filters(dense_only, tmp_path / "f.png")
    with pytest.raises(InputError, match="not built"):
        viz.plot_filters(Conv2D(2, 3), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


# -- training curves ------------------------------------------------------------------------
def test_history_train_against_validation(tmp_path, image):
    model = tiny_model()
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    x = np.stack([image, image[:, ::-1], 255 - image, image // 2])
    y = np.array([0, 1, 2, 0])
    history = model.fit(x, y, epochs=2, batch_size=2, validation_data=(x, y), verbose=0)
    fig = viz.plot_history(history, tmp_path / "h.png", figsize=(6, 3), dpi=50)
    check_png(tmp_path / "h.png", 300, 150)
    assert [ax.get_title() for ax in fig.axes] == ["loss per epoch", "accuracy per epoch"]
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # train and validation
    history = model.fit(x, y, epochs=4, batch_size=2, validation_data=(x, y), verbose=0,
                        validation_freq=2)  # (validated after epochs 2 and 4)
    fig = viz.plot_history(history, tmp_path / "h4.png", dpi=30)
    train, val = fig.axes[0].lines
    assert list(train.get_xdata()) == [1, 2, 3, 4] and list(val.get_xdata()) == [2, 4]
    assert list(val.get_ydata()) == history.history["val_loss"]
    # Its dict does not say after which epochs val_loss was logged: drawn at epochs 1 and 2
    # (was), the curve would be wrong; refused, naming the History as the way.
    with pytest.raises(InputError, match=r"'val_loss' is 2 long and 'loss' 4, and a dict does "
                       r"not say .* pass the History that fit returned"):
        viz.plot_history(history.history, tmp_path / "h6.png", dpi=30)
    by_hand = xpcnn.History()  # (a shorter list whose epochs are not known either)
    by_hand.epoch, by_hand.history = [0, 1, 2, 3], {"loss": [4.0, 3, 2, 1], "val_loss": [3.0, 2]}
    assert by_hand.epochs_of("val_loss") is None
    by_hand.append(4, {"loss": 0.5})
    assert by_hand.epochs_of("val_loss") is None and by_hand.epochs_of("loss") == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="this History does not record after which epochs"):
        viz.plot_history(by_hand, tmp_path / "h5.png", dpi=30)
    hand = xpcnn.History()  # (filled by hand, no epochs, lists of one length: as a dict)
    hand.history = {"loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.6, 0.5]}
    fig = viz.plot_history(hand, tmp_path / "h7.png", dpi=30)
    assert [list(line.get_xdata()) for line in fig.axes[0].lines] == [[1, 2, 3]] * 2
    fig = viz.plot_history({"loss": [1.0, 0.5, 0.4]}, tmp_path / "h2.png", dpi=30)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    with pytest.raises(InputError, match="no loss or metric"):
        viz.plot_history({"seconds": [1.0]}, tmp_path / "h3.png")
    assert not (tmp_path / "h5.png").exists() and not (tmp_path / "h6.png").exists()


def test_history_draws_each_metric_under_the_name_compile_gave_it(tmp_path):
    """A metric named as the user chose ("top3") had no panel (only the names compile takes
    as strings had one); a callback's number has one too; the seconds and the learning rate
    none."""
    model = tiny_model()
    model.compile(optimizer=xpcnn.optim.SGD(0.01), metrics=[
        "acc", xpcnn.metrics.SparseTopKCategoricalAccuracy(2, "top2")])
    x = np.stack([np.zeros((12, 12, 3), np.uint8) + 40 * k for k in range(4)])
    y = np.array([0, 1, 2, 0])
    extra = xpcnn.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(
        spread=float(epoch)))
    history = model.fit(x, y, epochs=2, batch_size=2, validation_data=(x, y), verbose=0,
                        callbacks=[extra, xpcnn.callbacks.ReduceLROnPlateau(patience=5)])
    assert {"seconds", "learning_rate", "spread"} <= set(history.history)
    fig = viz.plot_history(history, tmp_path / "named.png", dpi=30)
    assert [ax.get_title() for ax in fig.axes] == [f"{m} per epoch" for m in (
        "loss", "acc", "top2", "spread")]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2, 1]
    np.testing.assert_array_equal(fig.axes[2].lines[1].get_ydata(),
                                  history.history["val_top2"])
    fig = viz.plot_history({"loss": [1.0, 0.5], "note": ["a", "b"]}, tmp_path / "n.png", dpi=30)
    assert [ax.get_title() for ax in fig.axes] == ["loss per epoch"]  # (no numbers: left out)


def test_history_dicts_of_arrays_and_what_is_not_a_curve(tmp_path):
    """A dict of NumPy arrays (or tuples) is drawn as its lists are (was: "The truth value of
    an array is ambiguous"); a value that is no sequence of numbers is refused, named."""
    fig = viz.plot_history({"loss": np.array([1.0, 0.5, 0.25]), "val_loss": (0.9, 0.6, 0.5),
                            "accuracy": np.array([0.5, 0.75, 0.875], dtype=np.float32),
                            "lr": "not drawn"}, tmp_path / "h.png", dpi=30)
    assert [ax.get_title() for ax in fig.axes] == ["loss per epoch", "accuracy per epoch"]
    train, val = fig.axes[0].lines
    assert list(train.get_xdata()) == list(val.get_xdata()) == [1, 2, 3]
    assert list(train.get_ydata()) == [1.0, 0.5, 0.25] and list(val.get_ydata()) == [0.9, 0.6,
                                                                                     0.5]
    for bad in (3.0, np.ones((2, 2)), ["a", "b"], [1.0, None]):
        with pytest.raises(InputError, match=r"the history's 'loss' must be a sequence of "
                           r"numbers, one for each epoch it was logged in; got "):
            viz.plot_history({"loss": bad}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()



def test_history_of_a_model_compiled_with_acc_draws_its_accuracy(tmp_path):
    """metrics=["acc"] logs acc and val_acc (Keras' naming): drawn as accuracy is (was: no
    accuracy panel at all)."""
    fig = viz.plot_history({"loss": [1.0, 0.5], "acc": [0.5, 0.75], "val_acc": [0.4, 0.7]},
                           tmp_path / "h.png", dpi=30)
    assert [ax.get_title() for ax in fig.axes] == ["loss per epoch", "acc per epoch"]
    train, val = fig.axes[1].lines
    assert list(train.get_ydata()) == [0.5, 0.75] and list(val.get_ydata()) == [0.4, 0.7]

# -- confusion matrix -----------------------------------------------------------------------
def test_confusion_matrix_counts():
    cm = viz.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert viz.confusion_matrix([], [], ["a", "b"]).shape == (2, 2)
    with pytest.raises(InputError, match=r"y_pred must hold integer labels in \[0, 2\]"):
        viz.confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(InputError, match="equal length"):
        viz.confusion_matrix([0, 1], [0], 3)


def test_confusion_matrix_figure(tmp_path, rng):
    model = tiny_model()
    x = rng.integers(0, 256, (9, 12, 12, 3), dtype=np.uint8)
    y = np.arange(9) % 3
    fig = viz.plot_confusion_matrix(model, x, y, tmp_path / "cm.png", class_names=["a", "b", "c"],
                                    figsize=(4, 4), dpi=50)
    check_png(tmp_path / "cm.png", 200, 200)
    assert len(image_axes(fig)) == 1 and len(fig.axes) == 2  # the matrix and its colour bar
    counts = [int(t.get_text()) for t in fig.axes[0].texts]
    assert len(counts) == 9 and sum(counts) == 9
    for names in ("abc", iter("abc"), ["a", "b"]):  # (a str was one class per letter)
        with pytest.raises(InputError, match=r"^class_names must be one name for each of the "
                                             r"model's outputs, whose shape is \(3,\), got "):
            viz.plot_confusion_matrix(model, x, y, tmp_path / "bad.png", class_names=names)
    with pytest.raises(InputError, match="^expected an xpcnn model, got str$"):  # (was an
        viz.plot_confusion_matrix("model", x, y, tmp_path / "bad.png")  # AttributeError)
    assert not (tmp_path / "bad.png").exists()
    features = xpcnn.Model(inputs=model.input, outputs=model.layers[1].output)
    with pytest.raises(InputError, match=r"a confusion matrix needs a classifier, .* this "
                                         r"model's is \(\d+, \d+, \d+\) \(a feature extractor\?\)"):
        viz.plot_confusion_matrix(features, x, y, tmp_path / "features.png")
    assert not (tmp_path / "features.png").exists()


@pytest.mark.parametrize("name", ["demo.pdf", "demo.svg", "demo.jpg", "demo.png.pdf"])
def test_a_figure_path_of_another_format_is_refused(tmp_path, image, name):
    """The figures are PNGs: a .pdf path was given PNG bytes under its name."""
    with pytest.raises(InputError, match=r"^the figures are PNG files: give a path ending in "
                                         r"\.png, got '.*demo\."):
        viz.plot_notebook_demo(image, tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_a_figure_path_ending_in_png_in_capitals_is_drawn(tmp_path, image):
    """(The other side of the refusal above, drawn once: it was drawn after each of its four
    refused names, the same figure, 0.7 s each.)"""
    viz.plot_notebook_demo(image, tmp_path / "demo.PNG")
    assert (tmp_path / "demo.PNG").read_bytes().startswith(b"\x89PNG")


def test_a_figure_path_of_another_format_is_refused_before_any_work(tmp_path, image,
                                                                      monkeypatch):
    """plot_confusion_matrix ran predict over the whole test set (and drew the figure) before
    refusing a .pdf path; each plot checks its path first."""
    model = tiny_model()
    calls = []
    monkeypatch.setattr(model, "predict", lambda *a, **kw: calls.append(a) or 1 / 0)
    monkeypatch.setattr(model, "layer_outputs", lambda *a, **kw: calls.append(a) or 1 / 0)
    x, y = np.zeros((4, 12, 12, 3), np.float32), np.zeros(4, np.int64)
    pdf = str(tmp_path / "fig.pdf")
    refused = r"^the figures are PNG files: give a path ending in \.png, got '.*fig\.pdf'$"
    with pytest.raises(InputError, match=refused):
        viz.plot_confusion_matrix(model, x, y, pdf)
    with pytest.raises(InputError, match=refused):
        viz.plot_stage_tour(model, image, pdf)
    with pytest.raises(InputError, match=refused):  # (bad history too: the path comes first)
        viz.plot_history({"loss": [1.0], "val_loss": []}, pdf)
    with pytest.raises(InputError, match=refused):
        viz.plot_filters(model, pdf, reduce="bad")
    with pytest.raises(InputError, match=refused):
        viz.plot_notebook_demo(np.zeros((2, 2, 3)), pdf)
    assert calls == []
    assert not list(tmp_path.iterdir())


# -- without matplotlib ---------------------------------------------------------------------
def test_plots_name_the_extra_when_matplotlib_is_missing(tmp_path, monkeypatch, image):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "xpcnn\[viz\]"') as info:
        viz.plot_notebook_demo(image, tmp_path / "demo.png")
    assert isinstance(info.value, xpcnn.XpcnnError)
    with pytest.raises(viz.MissingDependencyError):
        viz.plot_history({"loss": [1.0]}, tmp_path / "h.png")
    assert viz.confusion_matrix([0], [0], 1).sum() == 1  # pure NumPy still works
    assert not list(tmp_path.iterdir())


def test_xpcnn_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import xpcnn, xpcnn.viz, xpcnn.cli\n"
            "assert not [m for m in sys.modules if m.startswith('matplotlib.')]\n"
            "try:\n"
            "    xpcnn.viz.plot_history({'loss': [1.0]}, 'never.png')\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "xpcnn[viz]"' in out.stdout


# -- the command line -----------------------------------------------------------------------
@pytest.fixture
def small_shapes(monkeypatch):
    """The CLI's shapes dataset, cut to a few images so that the end-to-end runs are quick."""
    real = xpcnn.datasets.load_dataset

    def load(name, data_dir=None, download=True, **kw):
        if name == "shapes":
            kw = {"n_train": 40, "n_test": 20, **kw}
        return real(name, data_dir, download, **kw)

    monkeypatch.setattr(xpcnn.datasets, "load_dataset", load)


def test_cli_train_plots_then_visualize(tmp_path, small_shapes, capsys):
    model_path, plots, figs = tmp_path / "m.npz", tmp_path / "plots", tmp_path / "figs"
    assert main(["train", "--limit", "30", "--epochs", "1", "--batch-size", "16", "--quiet",
                 "--save", str(model_path), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    for name in ("history.png", "confusion.png"):
        assert f"wrote {plots / name}" in out
        check_png(plots / name, *{"history.png": (1000, 400), "confusion.png": (750, 650)}[name])

    assert main(["visualize", "--model", str(model_path), "--index", "3", "--out", str(figs),
                 "--max-maps", "4", "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in figs.iterdir())
    assert written == ["filters_1_conv2d.png", "filters_3_conv2d_1.png",
                       "filters_5_conv2d_2.png", "tour_shapes_test_3.png"]
    for name in written:
        assert f"wrote {figs / name}" in out
        assert mpl_image.imread(figs / name).var() > 0
    assert "shapes test image 3: label" in out
    # (layer names that are no file names: each filter figure in --out, named after them)
    model = xpcnn.load_model(model_path)
    model.layers[1].name, model.layers[3].name = "block1/conv", "../../escape"
    model.save(model_path)
    shutil.rmtree(figs)
    assert main(["visualize", "--model", str(model_path), "--index", "3", "--out", str(figs),
                 "--max-maps", "4", "--dpi", "40"]) == 0
    assert sorted(p.name for p in figs.iterdir()) == [
        "filters_1_block1_conv.png", "filters_3_.._.._escape.png", "filters_5_conv2d_2.png",
        "tour_shapes_test_3.png"]


def test_cli_visualize_gives_a_probability_for_a_model_that_ends_in_logits(
        tmp_path, small_shapes, capsys):
    """A model without a final Softmax predicts logits (as in Keras): the probability shown is
    their softmax's (was: the logit itself, shown as a percentage)."""
    model = tiny_model(size=32, classes=10)
    model.layers.pop()  # the Softmax: a model that ends in its logits
    model.build((32, 32, 3))
    dense = model.layers[-1]
    dense.set_weights([w * 40.0 for w in dense.get_weights()])  # logits far from [0, 1]
    model.save(tmp_path / "logits.npz")
    assert main(["visualize", "--model", str(tmp_path / "logits.npz"), "--index", "2",
                 "--out", str(tmp_path / "figs"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    _, (x, _) = xpcnn.datasets.load_dataset("shapes")
    logits = model.predict(x[2:3])[0].astype(np.float64)
    assert not 0 <= logits.max() <= 1
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert shown["predicted"] == int(np.argmax(logits))
    np.testing.assert_allclose(shown["probability"], probabilities.max(), rtol=1e-6)


def test_cli_visualize_errors(tmp_path, small_shapes, capsys):
    model = tiny_model(size=32)
    model.save(tmp_path / "m.npz")
    assert main(["visualize", "--model", str(tmp_path / "m.npz"), "--index", "20",
                 "--out", str(tmp_path)]) == 2
    assert "image index 20 does not exist" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"valid indices 0\.\.19"):
        viz._image_for(np.zeros((20, 2, 2, 1)), -1)
    not_a_model = tmp_path / "notes.npz"
    not_a_model.write_text("hello")
    assert main(["visualize", "--model", str(not_a_model), "--out", str(tmp_path)]) == 2
    assert "not a readable xpcnn .npz file" in capsys.readouterr().err
    with pytest.raises(DataFormatError):
        xpcnn.load_model(not_a_model)
    small = tiny_model(size=12)
    small.save(tmp_path / "small.npz")
    assert main(["visualize", "--model", str(tmp_path / "small.npz"), "--out",
                 str(tmp_path)]) == 2
    assert "expects images of shape (12, 12, 3) but shapes images are (32, 32, 3)" in \
        capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_cli_visualize_refuses_a_model_for_flat_inputs(tmp_path, small_shapes, capsys):
    """A model of flat (784,) inputs is refused in one line, exit status 2, naming its input
    shape (was: a bare ValueError from sizing the figure, exit status 1)."""
    model = xpcnn.Sequential([Dense(10), Softmax()], seed=0)
    model.build((784,))
    model.save(tmp_path / "flat.npz")
    assert main(["visualize", "--model", str(tmp_path / "flat.npz"), "--out",
                 str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"xpcnn visualize: error: the model {tmp_path / 'flat.npz'} takes inputs "
                    "of shape (784,), not images (H, W, C): xpcnn visualize shows models of "
                    "images")
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(InputError, match=r"^the model takes inputs of shape \(784,\), not "
                                         r"images \(H, W, C\): the stage tour shows models of "
                                         r"images$"):
        viz.plot_stage_tour(model, np.zeros((28, 28, 1), np.uint8), tmp_path / "t.png")


def test_cli_visualize_names_labels_beyond_the_models_outputs(tmp_path, small_shapes, capsys):
    """A model with 4 outputs on shapes (10 classes), an image labelled beyond them: the title
    names the label and the guess from the dataset's names (was: IndexError, no JSON)."""
    from xpcnn.datasets import class_names
    from xpcnn.models import build_layers

    model = xpcnn.Sequential(build_layers("shapes", 4), seed=0)
    model.build((32, 32, 3))
    model.save(tmp_path / "four.npz")
    _, (_, y) = xpcnn.datasets.load_dataset("shapes")
    index = int(np.flatnonzero(y >= 4)[0])
    assert main(["visualize", "--model", str(tmp_path / "four.npz"), "--index", str(index),
                 "--out", str(tmp_path / "figs"), "--max-maps", "2", "--dpi", "20",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    names = class_names("shapes")
    assert shown["label"] == y[index] and 0 <= shown["predicted"] < 4
    assert f"label {names[y[index]]}, predicted {names[shown['predicted']]} (" in err
    assert len(shown["written"]) == 4 and all(Path(p).exists() for p in shown["written"])


def test_cli_visualize_refuses_a_figure_too_large_before_loading_the_data(
        tmp_path, monkeypatch, capsys):
    """A deep model's stage tour at --max-maps 32 and --dpi 300 (each in its range) is too
    large to draw: refused naming the flags and the largest --dpi that fits, before the
    dataset is loaded (was: after it, naming figsize, no CLI option)."""
    model = xpcnn.Sequential([Conv2D(32, 1), *(ReLU() for _ in range(40)), Flatten(),
                              Dense(10)], seed=0)
    model.build((32, 32, 3))
    model.save(tmp_path / "deep.npz")

    def trap(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the figure size was checked")

    monkeypatch.setattr(xpcnn.datasets, "load_dataset", trap)
    assert main(["visualize", "--model", str(tmp_path / "deep.npz"), "--out", str(tmp_path),
                 "--max-maps", "32", "--dpi", "300"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("xpcnn visualize: error: argument --dpi: the stage tour (44 rows of "
                           "up to 32 maps) would be 10260 x 15299 pixels at --dpi 300 with "
                           "--max-maps 32, more than xpcnn draws") and "figsize" not in line
    dpi = int(line.split("give --dpi ")[1].split()[0])
    assert line.endswith(f"give --dpi {dpi} or less, or a smaller --max-maps")

    def pixels(d):  # (34.2 x 51 inches: 32 maps + 2.2, and 1.15 x 44 rows + 0.4 for the title;
        # whole pixels as Agg sizes its canvas)
        return int(34.2 * d) * int(51 * d)

    assert pixels(dpi) <= 10**8 < pixels(dpi + 1)
    assert not list(tmp_path.glob("*.png"))


def test_cli_visualize_suggests_a_dpi_that_fits_every_figure_and_fewer_maps_only_if_they_help():
    """The --dpi suggested fits every figure too large, not only the first (was: the tour's,
    then refused again for a grid of filters); fewer maps are suggested only where they make
    the figure fit (they shorten no tour, and no grid of filters)."""
    wide = xpcnn.Sequential([Conv2D(4096, 1), *(ReLU() for _ in range(60)), Flatten(),
                             Dense(10)], seed=0)
    wide.build((4, 4, 3))
    args = argparse.Namespace(max_maps=32, dpi=300)
    with pytest.raises(InputError, match=r"give --dpi \d+ or less$") as refused:
        viz._check_sizes(wide, args)
    dpi = int(str(refused.value).split("give --dpi ")[1].split()[0])
    viz._check_sizes(wide, argparse.Namespace(max_maps=32, dpi=dpi))  # (fits every figure)
    with pytest.raises(InputError):
        viz._check_sizes(wide, argparse.Namespace(max_maps=32, dpi=dpi + 1))
    tall = xpcnn.Sequential([Conv2D(2, 1), *(ReLU() for _ in range(110)), Flatten(),
                             Dense(10)], seed=0)
    tall.build((4, 4, 3))
    with pytest.raises(InputError, match=r"the stage tour \(114 rows of up to 2 maps\) would be "
                                         r"\d+ x \d+ pixels at --dpi 300 with --max-maps 2, "
                                         r".* or less$"):
        viz._check_sizes(tall, argparse.Namespace(max_maps=2, dpi=300))


# -- the tour script on the real data -----------------------------------------------------
@pytest.mark.slow
def test_tour_script_on_cifar(tmp_path, monkeypatch, capsys):
    """scripts/tour.py's main in this process, imported as running the script does (its
    folder first on sys.path): a child process spent more time starting Python and importing
    xpcnn and matplotlib than drawing (the command line itself: tests/test_scripts.py)."""
    import importlib

    data = os.environ["XPCNN_DATA_DIR"]
    argv = ["--data-dir", data, "--epochs", "0", "--out", str(tmp_path)]
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "tour.py"), *argv])
    assert importlib.import_module("tour").main(argv) == 0
    stdout = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["1_notebook_demo.png", "2_stage_tour.png", "3_filters_1_conv2d.png",
                     "3_filters_3_conv2d_1.png"]
    for name in names:
        assert f"wrote {tmp_path / name}" in stdout
        assert mpl_image.imread(tmp_path / name).var() > 0
