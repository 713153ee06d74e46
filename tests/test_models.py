"""The reference models of xpcnn.models: every name builds with the right shapes, the residual
networks have the layout their papers give, train a step, and the CLI knows them."""

import json
import re
from collections import Counter

import numpy as np
import pytest

import xpcnn
import xpcnn.datasets
from xpcnn.cli import main
from xpcnn.errors import InputError
from xpcnn.layers import Add, Conv2D, Dense, MaxPool2D
from xpcnn.models import INPUT_SHAPES, MODELS, NAMES, NETWORKS, build_layers, build_model

# Small inputs keep the builds and steps fast; every model accepts these.
SHAPES = {"mnist": (12, 12, 1), "mnist-bn": (12, 12, 1), "notebook": (12, 12, 3)}


def _shape(name):
    return SHAPES.get(name, (16, 16, 3))


@pytest.mark.parametrize("name", NAMES)
def test_every_model_builds_with_its_output_shape(name):
    model = build_model(name, 7, _shape(name), seed=1)
    assert isinstance(model, xpcnn.Model if name in NETWORKS else xpcnn.Sequential)
    assert model.built and model.input_shape[1:] == _shape(name) and model.output_shape == (None, 7)
    assert model.name == name


def test_names_are_the_stacks_and_the_networks():
    assert set(NAMES) == set(MODELS) | set(NETWORKS) and len(NAMES) == len(MODELS) + len(NETWORKS)
    # (the networks were left out of the names listed)
    with pytest.raises(InputError, match=f"^unknown model 'resnet21'; expected one of "
                                         f"{', '.join(NAMES)}$"):
        build_model("resnet21")
    with pytest.raises(InputError, match=r"model 'resnet20' is a graph network, not a stack of "
                                         r"layers: build_model\('resnet20'\) builds it"):
        build_layers("resnet20")


@pytest.mark.parametrize("name", ["resnet20", "cifar"])
@pytest.mark.parametrize("shape", [32, (32, 32), (32, 32, 0), [32.0, 32, 3], "32x32"])
def test_an_input_shape_that_is_no_image_shape_is_refused_by_name(name, shape):
    """(was, for a network: a bare "TypeError: 'int' object is not iterable")"""
    with pytest.raises(InputError, match=r"input_shape must be the per-sample shape \(H, W, C\) "
                                         r"of images, three positive ints \(the model is made "
                                         rf"for \(32, 32, 3\)\), got {re.escape(repr(shape))}$"):
        build_model(name, input_shape=shape)


def test_a_network_for_images_of_other_than_3_channels_is_refused_by_name():
    """(was: "Normalization has 3 channel statistics but the input has 1 channels", of a
    layer the user never made)"""
    for network in NETWORKS:
        with pytest.raises(InputError, match=r"the residual networks normalise RGB images by "
                                             r"CIFAR-10's channel statistics: their input_shape "
                                             r"is \(H, W, 3\), got \(28, 28, 1\)"):
            build_model(network, input_shape=(28, 28, 1))


def test_every_model_has_the_input_shape_of_its_dataset():
    assert set(INPUT_SHAPES) == set(NAMES)
    for name, shape in INPUT_SHAPES.items():
        assert shape == ((28, 28, 1) if name.startswith("mnist") else (32, 32, 3)), name
    for name in NAMES:
        model = build_model(name, 10, INPUT_SHAPES[name], seed=1)
        assert model.predict(np.zeros((1, *INPUT_SHAPES[name]), np.uint8)).shape == (1, 10)
    for name in NETWORKS:  # (a network is built for its input shape when none is given)
        assert build_model(name).input_shape[1:] == INPUT_SHAPES[name]


def _convs(model):
    return Counter(la.kernel_size for la in model.layers if isinstance(la, Conv2D))


def test_resnet20_is_he_et_al_s_layout():
    model = build_model("resnet20")
    # 19 3x3 convolutions and the Dense layer are its 20 layers; two 1x1 projections where
    # the stages change size; 9 residual additions; 16/32/64 filters at 32/16/8 pixels.
    assert _convs(model) == {(3, 3): 19, (1, 1): 2}
    assert sum(isinstance(la, Add) for la in model.layers) == 9
    assert sum(isinstance(la, Dense) for la in model.layers) == 1
    sizes = {la.output_shape for la in model.layers if isinstance(la, Conv2D)}
    assert sizes == {(32, 32, 16), (16, 16, 32), (8, 8, 64)}
    assert model.count_params() == 274_042  # about 0.27 M, as the paper's Table 6


def test_fast_resnet_layout_and_width():
    model = build_model("fast-resnet")
    assert _convs(model) == {(3, 3): 8}
    assert sum(isinstance(la, Add) for la in model.layers) == 2
    widths = [la.filters for la in model.layers if isinstance(la, Conv2D)]
    assert widths == [32, 64, 64, 64, 128, 256, 256, 256]
    assert [la.pool_size for la in model.layers if isinstance(la, MaxPool2D)][-1] == (4, 4)
    full = xpcnn.models.fast_resnet(width=64)  # the DAWNBench original: 6.5 M parameters
    assert 6.5e6 < full.count_params() < 6.6e6


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_train_a_small_batch(name):
    """A few SGD steps on one batch lower its loss (forward, backward and update all run)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 16)
    model = build_model(name, 10, (16, 16, 3), seed=0)
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
    before = model.evaluate(x, y)[0]
    weights = model.get_weights()
    history = model.fit(x, y, epochs=6, batch_size=16, shuffle=False, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert model.evaluate(x, y)[0] < before
    changed = [not np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True)]
    assert all(changed)  # every parameter and running statistic moved


@pytest.fixture
def small_shapes(monkeypatch):
    """The CLI's shapes dataset, a few 16x16 images, so that the end-to-end runs are quick."""
    real = xpcnn.datasets.load_dataset

    def load(name, data_dir=None, download=True, **kw):
        return real(name, data_dir, download, **{"n_train": 24, "n_test": 8, "image_size": 16,
                                                 **kw})

    monkeypatch.setattr(xpcnn.datasets, "load_dataset", load)


@pytest.mark.parametrize("name", NETWORKS)
def test_cli_trains_and_saves_a_network(name, small_shapes, tmp_path, capsys):
    path = tmp_path / "net.npz"
    assert main(["train", "--model", name, "--epochs", "1", "--batch-size", "8", "--json",
                 "--save", str(path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == name and result["train_samples"] == 24
    loaded = xpcnn.load_model(path)
    x = xpcnn.datasets.load_dataset("shapes")[1][0]
    model = build_model(name, 10, (16, 16, 3))
    model.set_weights(loaded.get_weights())
    np.testing.assert_allclose(loaded.predict(x), model.predict(x), rtol=1e-5, atol=1e-6)


def test_resnet20_predicts_as_a_pytorch_resnet20_in_float64():
    """An independent ResNet-20 in PyTorch (its usual padding 1 at stride 2, projection
    shortcuts), given the same weights, predicts the same probabilities: the builder wires the
    blocks as He et al. do. BatchNorm statistics are random, so that they matter."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    F = torch.nn.functional
    model = build_model("resnet20", 10, (16, 16, 3), seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    weights = [w if w.ndim != 1 else rng.uniform(0.5, 1.5, w.shape) for w in model.get_weights()]
    model.set_weights(weights)
    arrays = iter(torch.from_numpy(w) for w in weights)

    def conv_bn(x, strides=1, relu=True):
        kernel = next(arrays).permute(3, 2, 0, 1)  # Keras (kh, kw, in, out) -> (out, in, kh, kw)
        x = F.conv2d(x, kernel, stride=strides, padding=kernel.shape[-1] // 2)
        gamma, beta, mean, var = (next(arrays) for _ in range(4))
        x = F.batch_norm(x, mean, var, gamma, beta, training=False, eps=1e-5)
        return F.relu(x) if relu else x

    x = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
                 for v in ([125.3, 123.0, 113.9], [63.0, 62.1, 66.7]))
    h = conv_bn((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std)
    for stage in range(3):
        for block in range(3):
            strides = 2 if stage and not block else 1
            y = conv_bn(conv_bn(h, strides), relu=False)
            shortcut = conv_bn(h, strides, relu=False) if strides == 2 else h
            h = F.relu(shortcut + y)
    kernel, bias = next(arrays), next(arrays)
    logits = h.mean(dim=(2, 3)) @ kernel + bias
    assert next(arrays, None) is None  # every weight used, in the model's order
    np.testing.assert_allclose(model.predict(x), F.softmax(logits, 1).numpy(), rtol=1e-10,
                               atol=1e-13)
