"""Layer settings (:class:`xpcnn.layers.base.Setting`): ReLU's ceiling of 0, which Keras 3
takes, and the per-layer hook that Dropout's rate is checked by."""

import os
import warnings

import array_api_strict as xs
import numpy as np
import pytest
from nets import plan_of

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Dropout, Flatten, Layer, ReLU


def _zero_ceiling_model(device="cpu"):
    """A convolution, a plain ReLU() (fused into it) and ReLU(max_value=0) after it."""
    model = xpcnn.Sequential([Conv2D(3, 3, name="conv"), ReLU(name="relu"),
                              ReLU(max_value=0, name="cap"), Flatten(), Dense(4, name="dense")],
                             device=device, seed=0)
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
    return model


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 6, 6, 2)).astype(np.float32), rng.integers(0, 4, 12)


@pytest.mark.parametrize("zero", [0, 0.0, -0.0, np.float32(0)])
def test_a_relu_ceiling_of_zero_gives_zeros_and_a_zero_gradient(zero):
    """ReLU(max_value=0) was refused; Keras 3 takes it (max_value >= 0): the output is all
    zeros and the gradient zero, as torch.clamp(x, 0, 0)'s (whose gradient passes at x == 0
    too, where a ReLU's, Keras' as xpcnn's, is 0). A negative ceiling is still refused."""
    torch = pytest.importorskip("torch")  # (the reference; the suite runs without it)
    layer = ReLU(max_value=zero)
    assert layer.max_value == 0.0 and type(layer.max_value) is float
    assert str(layer.max_value) == "0.0"  # (-0.0 kept as 0.0: no output is -0.0)
    layer.build((3, 4, 2), "cpu", dtype="float64")
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 3, 4, 2))
    x[0, 0, 0] = [0.0, np.nan]
    t = torch.tensor(x, requires_grad=True)
    want = torch.clamp(t, 0.0, 0.0)
    want.backward(torch.tensor(dy))
    for training in (False, True):
        y = layer.forward(x, training=training)
        np.testing.assert_array_equal(y, want.detach().numpy())
        assert not np.signbit(y).any()
    dx = layer.backward(dy)
    assert not dx.any()
    np.testing.assert_array_equal(dx[x != 0], t.grad.numpy()[x != 0])
    with pytest.raises(InputError, match=r"ReLU max_value must be >= 0 or None, got -1e-30"):
        ReLU(max_value=-1e-30)


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_a_relu_ceiling_of_zero_is_a_ceiling_in_the_plan(device, data):
    """A plain ReLU() is fused into the convolution before it; one with a ceiling of 0 is not
    (it is a ceiling, not "none"), whether built so or set after a fit: the model's outputs
    are then one row for every sample and the layers before the ceiling are never updated,
    on NumPy's fast path and under array_api_strict."""
    x, y = data
    model = _zero_ceiling_model(device)
    model.fit(x, y, epochs=1, verbose=0)
    ran, fused, _ = plan_of(model)
    assert fused == ["conv"] and "cap" in ran and "relu" not in ran
    conv = [np.array(w) for w in model.layers[0].get_weights()]
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    for a, b in zip(model.layers[0].get_weights(), conv, strict=True):
        np.testing.assert_array_equal(a, b)
    p = model.predict(x)
    assert np.ptp(p, axis=0).max() == 0 and np.ptp(p[0]) > 0  # (the Dense bias alone)
    # a ceiling assigned after a fit: the plan compiled again, the ReLU no longer fused
    other = xpcnn.Sequential([Conv2D(3, 3, name="conv"), ReLU(name="late"), Flatten(), Dense(4)],
                             device=device, seed=0)
    other.compile(loss="sparse_categorical_crossentropy", optimizer="sgd")
    other.fit(x, y, epochs=1, verbose=0)
    assert plan_of(other)[1] == ["conv"]
    changes = Layer.settings_changes
    other.layers[1].max_value = 0
    assert Layer.settings_changes == changes + 1
    ran, fused, _ = plan_of(other)
    assert fused == [] and "late" in ran
    p = other.predict(x)
    assert np.ptp(p, axis=0).max() == 0


def test_a_relu_ceiling_of_zero_saves_loads_and_exports(data, tmp_path):
    """ReLU(max_value=0) through a model file (its config 0.0, loaded as a ceiling) and, where
    onnx is installed, an ONNX export (Clip with a max of 0) predicting as the model does."""
    x, y = data
    model = _zero_ceiling_model()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.npz")
    same = xpcnn.load_model(tmp_path / "m.npz")
    assert same.layers[2].max_value == 0.0 and same.layers[2].get_config()["max_value"] == 0.0
    np.testing.assert_array_equal(same.predict(x), model.predict(x))
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    model.export(tmp_path / "m.onnx")
    onnx.checker.check_model(os.fspath(tmp_path / "m.onnx"), full_check=True)
    session = ort.InferenceSession(os.fspath(tmp_path / "m.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, model.predict(x), rtol=0, atol=1e-6)


def test_a_refused_dropout_rate_leaves_the_old_rates_drawn_share():
    """A rate refused by the Setting's per-layer hook (float16 cannot draw it) puts back the
    old rate and the share each dtype draws for it, not the refused rate's."""
    drop = Dropout(0.3)
    drop.build((4,), "cpu", dtype="float32", compute_dtype="float16")
    before = {d: drop._drawn_rate(d) for d in (drop.dtype, drop.compute_dtype)}
    assert before[drop.compute_dtype] != 0.3  # (float16 draws 0.30029296875)
    with pytest.raises(InputError, match="cannot be drawn in float16"):
        drop.rate = 0.99999  # (float32 draws it, before float16 refuses it)
    assert drop.rate == 0.3
    assert drop._drawn_rates == before


# -- Keras' spellings of layer arguments ------------------------------------------------------


@pytest.mark.parametrize("make", [lambda a: Dense(3, activation=a),
                                  lambda a: Conv2D(3, 3, activation=a)], ids=["Dense", "Conv2D"])
def test_keras_linear_activation_is_no_activation(make):
    """``activation="linear"`` is Keras' explicit None: it was refused."""
    layer = make("linear")
    assert layer.activation is None and layer.get_config()["activation"] is None
    layer.activation = "LINEAR"  # (as assigned later too)
    assert layer.activation is None
    with pytest.raises(InputError, match="activation must be None or 'relu'"):
        make("tanh")


def test_a_keras_batchnorm_momentum_is_warned_about():
    """Keras' BatchNormalization(momentum=0.99) keeps 99% of the moving statistics; xpcnn's
    momentum (PyTorch's) is the batch's share, so the ported 0.99 kept 1%, silently."""
    from xpcnn.layers import BatchNorm2D

    with pytest.warns(RuntimeWarning, match=r"momentum 0.99 .*PyTorch's convention.*Keras' "
                                            r"momentum=0.99 is xpcnn's 0.01"):
        layer = BatchNorm2D(momentum=0.99)
    assert layer.momentum == 0.99  # (taken: a user may mean it)
    with pytest.warns(RuntimeWarning, match="momentum 0.9 "):
        layer.momentum = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchNorm2D(momentum=0.5).momentum = 0.01


_CROP = (r"xpcnn's RandomCrop\(padding=4\) pads each image by `padding` zeros and crops it "
         r"back to the input size .*Keras' RandomCrop\(height, width\)")


@pytest.mark.parametrize("args, kwargs, said", [
    ((28, 28), {}, r"RandomCrop\(28, 28\): Keras' order, RandomCrop\(height, width, \.\.\.\), "
                   r"reads height=28, width=28; xpcnn's order is RandomCrop\(padding, \*, "
                   r"name\)\. " + _CROP + r".*\. torchvision's order, RandomCrop\(size, "
                   r"padding\)\? xpcnn's RandomCrop takes no size"),
    # (Keras' seed=None, positional: was taken, the None at the name's place as no name)
    ((3, None, None), {}, r"RandomCrop\(3, None, None\): Keras' order, .*reads height=3, "
                          r"width=None, seed=None; .*" + _CROP),
    ((28, 28, 1), {}, r"reads height=28, width=28, seed=1; .*" + _CROP + r".*random layers take "
                      "no seed"),
    ((), {"height": 28, "width": 28}, r"RandomCrop\(height=28\): Keras' keyword, which "
                                      r"xpcnn's RandomCrop does not take: " + _CROP),
    ((28, 28), {"seed": 1}, r"RandomCrop\(seed=1\): Keras' keyword.*random layers take no "
                            r"seed of their own: the model's seed \(Sequential\(seed=...\)\)"),
    ((), {"data_format": "channels_first"}, r"RandomCrop\(data_format='channels_first'\): "
                                            r".*x.transpose\(0, 2, 3, 1\)"),
    ((4,), {"dtype": "float32"}, r"RandomCrop\(dtype='float32'\): .*its model's"),
    ((4,), {"input_shape": (32, 32, 3)}, r"RandomCrop\(input_shape=\(32, 32, 3\)\): .*give "
                                         "the model the input shape"),
    ((32,), {"padding": 4}, r"RandomCrop\(32, padding=4\): padding given by position and by "
                            r"keyword: xpcnn's order is RandomCrop\(padding, \*, name\)\. "
                            r"torchvision's order, RandomCrop\(size, padding\)\? xpcnn's "
                            r"RandomCrop takes no size.* is RandomCrop\(padding=4\)"),
    ((), {"size": 32}, r"RandomCrop\(size=32\): PyTorch's keyword.*takes no size"),
    ((4,), {"fill": 255}, r"RandomCrop\(fill=255\): .*pads with zeros \(fill=0 only\)"),
    ((4,), {"padding_mode": "reflect"}, r"padding_mode='constant' only"),
    ((4,), {"pad_if_needed": True}, r"always fits: leave pad_if_needed out"),
])
def test_random_crop_refuses_keras_and_torchvision_arguments_by_name(args, kwargs, said):
    """RandomCrop's **keras skipped the keyword tables: dtype=None, data_format=,
    input_shape=, fill=... were bare TypeErrors, seed=None refused, torchvision's
    RandomCrop(32, padding=4) "got multiple values for argument 'padding'"."""
    from xpcnn.layers import RandomCrop

    with pytest.raises(InputError, match=said):
        RandomCrop(*args, **kwargs)


def test_random_crop_takes_the_defaults_the_other_layers_take():
    from xpcnn.layers import RandomCrop

    for kwargs in ({"dtype": None}, {"data_format": "channels_last"}, {"data_format": None},
                   {"seed": None}, {"fill": 0}, {"padding_mode": "constant"},
                   {"pad_if_needed": False}):
        assert RandomCrop(3, **kwargs).get_config() == {"name": "randomcrop", "padding": 3}
    assert RandomCrop(3, name="crop").name == "crop"
    with pytest.raises(TypeError, match="unexpected keyword argument 'paddin'"):
        RandomCrop(paddin=2)
    assert RandomCrop.from_config(RandomCrop(3, trainable=False).get_config()).padding == 3


_NHWC = r"xpcnn's images are always \(N, H, W, C\)"


@pytest.mark.parametrize("make, said", [
    (lambda L: L.RandomFlip("horizontal", 42),
     r"RandomFlip\('horizontal', 42\): Keras' order, RandomFlip\(mode, seed, \.\.\.\), reads "
     r"mode='horizontal', seed=42; xpcnn's order is RandomFlip\(mode, \*, name\)\. xpcnn's "
     r"random layers take no seed of their own"),
    (lambda L: L.RandomFlip("horizontal", None, "channels_first"),
     r"reads mode='horizontal', seed=None, data_format='channels_first'.*always \(N, H, W, C\)"),
    (lambda L: L.Dropout(0.5, (None, 1, 8)),
     r"Dropout\(0.5, \(None, 1, 8\)\): Keras' order, Dropout\(rate, noise_shape, \.\.\.\), reads "
     r"rate=0.5, noise_shape=\(None, 1, 8\); xpcnn's order is Dropout\(rate, \*, name\).*drops "
     r"each value on its own \(no noise_shape\)"),
    (lambda L: L.Dropout(0.5, None, 3), r"reads rate=0.5, noise_shape=None, seed=3; .*random "
                                        "layers take no seed"),
    (lambda L: L.Dropout(0.5, None, None, 1),
     r"Dropout\(0.5, None, None, 1\): Keras' order, Dropout\(rate, noise_shape, seed\), reads "
     r"rate=0.5, noise_shape=None, seed=None, and no more"),
    (lambda L: L.RandomFlip(p=0.3), r"RandomFlip\(p=0.3\): PyTorch's keyword.*probability 1/2"),
    (lambda L: L.Dropout(0.5, (None, 1, 8), name="d"),
     r"Dropout\(0.5, \(None, 1, 8\), name='d'\): Keras' order.*noise_shape=\(None, 1, 8\);.*"
     r"\(no noise_shape\)"),
    # (a layer's name is a keyword, as in Keras: a string there was taken for the name; review
    # h8 1: the pools' channels_first data_format, Dense's bias_initializer...)
    (lambda L: L.Dropout(0.5, "drop"), r"reads rate=0.5, noise_shape='drop'; .*no noise_shape"),
    (lambda L: L.MaxPool2D(2, 2, "valid", "channels_first"),
     r"MaxPool2D\(2, 2, 'valid', 'channels_first'\): Keras' order, MaxPool2D\(pool_size, "
     r"strides, padding, data_format, \.\.\.\), reads pool_size=2, strides=2, padding='valid', "
     r"data_format='channels_first'; xpcnn's order is MaxPool2D\(pool_size, strides, padding, "
     r"\*, name\)\. " + _NHWC),
    (lambda L: L.AvgPool2D(3, 1, "same", "channels_first"), r"AvgPool2D\(.*" + _NHWC),
    (lambda L: L.Flatten("channels_first"),
     r"Flatten\('channels_first'\): Keras' order, Flatten\(data_format\), reads "
     r"data_format='channels_first'; xpcnn's order is Flatten\(\*, name\)\. " + _NHWC),
    (lambda L: L.GlobalAvgPool2D("channels_first"), r"GlobalAvgPool2D\(.*" + _NHWC),
    (lambda L: L.GlobalAvgPool2D("channels_last", True),
     r"reads data_format='channels_last', keepdims=True; .*gives \(N, C\) \(keepdims=False only"),
    (lambda L: L.Dense(3, None, True, "glorot_uniform", "ones"),
     r"Dense\(3, None, True, 'glorot_uniform', 'ones'\): Keras' order, Dense\(units, activation, "
     r"use_bias, kernel_initializer, bias_initializer, \.\.\.\), reads .*bias_initializer='ones'; "
     r"xpcnn's order is Dense\(units, activation, use_bias, kernel_initializer, \*, name\)\. "
     r"the bias starts at zeros"),
    (lambda L: L.Dense(3, None, True, "glorot_uniform", "zeros", "l2"),
     r"kernel_regularizer='l2'; .*take no regularizer"),
    (lambda L: L.ReLU(6.0, 0.1), r"ReLU\(6.0, 0.1\): Keras' order, ReLU\(max_value, "
                                 r"negative_slope, \.\.\.\), reads max_value=6.0, "
                                 r"negative_slope=0.1; .*no negative slope"),
    (lambda L: L.Softmax(1), r"Softmax\(1\): .*reads axis=1; .*over the last axis"),
    (lambda L: L.BatchNorm2D(-1, 0.99, 0.001),
     r"BatchNorm2D\(-1, 0.99, 0.001\): Keras' order, BatchNorm2D\(axis, momentum, epsilon, "
     r"\.\.\.\), reads axis=-1, momentum=0.99, epsilon=0.001; xpcnn's order is "
     r"BatchNorm2D\(momentum, eps, \*, name\)\. .*the last axis.*BatchNorm2D\(eps=0.001\); its "
     r"momentum is PyTorch's too, .*Keras' momentum=0.99 is BatchNorm2D\(momentum=0.01\)"),
    (lambda L: L.Conv2D(8, 3, 1, "valid", None, 2),
     r"Conv2D\(8, 3, 1, 'valid', None, 2\): Keras' order, Conv2D\(filters, kernel_size, "
     r"strides, padding, data_format, dilation_rate, \.\.\.\), reads .*dilation_rate=2; xpcnn's "
     r"order is Conv2D\(filters, kernel_size, strides, padding, \*, activation, use_bias, "
     r"kernel_initializer, name\)\. xpcnn's Conv2D has no dilation \(dilation_rate 1 only\)$"),
    (lambda L: L.Conv2D(8, 3, 1, "same", "channels_first"), r"data_format='channels_first'; .*"
                                                           + _NHWC),
    (lambda L: L.Conv2D(8, 3, 1, "same", "relu"), r"reads .*data_format='relu'; .*\*, "
                                                  r"activation, use_bias"),
    (lambda L: L.Normalization([0.5], [0.25], [0.0625]),
     r"Keras' order, Normalization\(axis, mean, variance, \.\.\.\), reads axis=\[0.5\], "
     r"mean=\[0.25\], variance=\[0.0625\]; xpcnn's order is Normalization\(mean, std, \*, name, "
     r"variance, adapted\)\. .*normalizes each channel"),
])
def test_keras_positional_arguments_are_refused_by_their_keras_name(make, said):
    """Keras' positional arguments beyond xpcnn's (RandomFlip's seed, Dropout's noise_shape, a
    pool's data_format...) were read as the layer's name ("layer name must be a non-empty
    string or None, got 42", or silently a name: MaxPool2D(2, 2, "valid", "channels_first")
    pooled (N, H, W, C) as named 'channels_first'), or were a bare TypeError, or taken for
    another argument (Conv2D's 5th for the activation): now read as Keras reads them."""
    import xpcnn.layers as L

    with pytest.raises(InputError, match=said):
        make(L)


def test_keras_positional_refusals_name_the_xpcnn_call_a_subclass_made():
    """A user's subclass calling its base's constructor in Keras' order: the refusal was of
    the subclass's call ("MyDense(8, ...): xpcnn's order is MyDense(units, ...)"), which the
    user never wrote so; a pool named _Pool2D, a private class."""
    import xpcnn.layers as L

    class MyDense(L.Dense):
        def __init__(self, units, extra, name=None):
            super().__init__(units, None, True, "glorot_uniform", name)
            self.extra = extra

    class MyPool(L.MaxPool2D):
        pass

    with pytest.raises(InputError, match=r"^MyDense's super\(\).__init__ called Dense\(8, None, "
                                         r"True, 'glorot_uniform', 'd'\): Keras' order, Dense\("
                                         r"units, .*; xpcnn's order is Dense\(units, "):
        MyDense(8, 2, name="d")
    with pytest.raises(InputError, match=r"^MaxPool2D\(2, 2, 'valid', 'channels_first'\): "
                                         r"Keras' order, MaxPool2D\(pool_size, .*xpcnn's order "
                                         r"is MaxPool2D\(pool_size, "):
        MyPool(2, 2, "valid", "channels_first")


def test_keras_positional_defaults_and_keywords_are_taken():
    """Keras' positional arguments beyond xpcnn's are taken at Keras' defaults, and passed as
    xpcnn's keywords where it takes them (Conv2D's activation, a pool's name); the name is a
    keyword, as in Keras."""
    import xpcnn.layers as L

    def same(layer, like):
        assert type(layer) is type(like) and layer.get_config() == like.get_config()

    same(L.Dropout(0.5, None, None), L.Dropout(0.5))
    same(L.RandomFlip("horizontal", None, "channels_last"), L.RandomFlip())
    same(L.RandomFlip(p=0.5), L.RandomFlip())
    same(L.Dropout(0.5, None, name="drop"), L.Dropout(0.5, name="drop"))
    same(L.Dropout(0.5, None, None, name="drop"), L.Dropout(0.5, name="drop"))
    same(L.RandomFlip("horizontal", None, name="flip"), L.RandomFlip(name="flip"))
    same(L.MaxPool2D(2, 2, "valid", "channels_last", "pool"), L.MaxPool2D(2, name="pool"))
    same(L.AvgPool2D(3, 1, "same", None), L.AvgPool2D(3, 1, "same"))
    same(L.Flatten(None), L.Flatten())
    same(L.GlobalAvgPool2D("channels_last", False), L.GlobalAvgPool2D())
    same(L.Softmax(-1), L.Softmax())
    same(L.ReLU(6.0, 0.0, 0), L.ReLU(6.0))
    same(L.Dense(3, None, True, "he_normal", "zeros", None, None, None, None, None, None, None,
                 None), L.Dense(3, kernel_initializer="he_normal"))
    same(L.Conv2D(8, 3, 2, "same", "channels_last", 1, 1, "relu", False, "he_normal", "zeros",
                  None), L.Conv2D(8, 3, 2, "same", activation="relu", use_bias=False,
                                  kernel_initializer="he_normal"))
    for make in (lambda: L.MaxPool2D(2, 2, "valid", None, "p", name="q"),
                 lambda: L.Conv2D(8, 3, 1, "same", None, 1, 1, "relu", activation="relu")):
        with pytest.raises(InputError, match="given by position and by keyword"):
            make()
    for make in (lambda: L.FeatureNorm(1e-5, "fn"), lambda: L.Add("add"),
                 lambda: L.Concatenate(-1, "cat"), lambda: L.Rescaling(0.5, 0.0, "scale")):
        with pytest.raises(TypeError, match="positional argument"):
            make()


@pytest.mark.parametrize("make, said", [
    (lambda L: L.BatchNorm2D(epsilon=1e-3),
     r"BatchNorm2D\(epsilon=0.001\): Keras' keyword, which xpcnn's BatchNorm2D does not take: "
     r"xpcnn's name is eps \(PyTorch's\): BatchNorm2D\(eps=0.001\); its momentum is PyTorch's "
     r"too, .*Keras' momentum=0.99 is BatchNorm2D\(momentum=0.01\)"),
    (lambda L: L.BatchNorm2D(0.01, center=False), r"BatchNorm2D\(center=False\): .* always "
                                                  r"learns a scale \(gamma\) and an offset"),
    (lambda L: L.BatchNorm2D(axis=1), r"BatchNorm2D\(axis=1\): .*the last axis of \(N, H, W, C\)"),
    (lambda L: L.FeatureNorm(epsilon=1e-3), r"FeatureNorm\(epsilon=0.001\): .*FeatureNorm\(eps="),
    (lambda L: L.Conv2D(8, 3, data_format="channels_first"),
     r"Conv2D\(data_format='channels_first'\): .*always \(N, H, W, C\).*x.transpose\(0, 2, 3, 1\)"),
    (lambda L: L.Conv2D(8, 3, dilation_rate=2), r"Conv2D\(dilation_rate=2\): .*no dilation"),
    (lambda L: L.Conv2D(8, bias_initializer="ones"), r"the bias starts at zeros .*set_weights"),
    (lambda L: L.Dense(4, kernel_regularizer="l2"),
     r"Dense\(kernel_regularizer='l2'\): .*no regularizer: give the optimizer a weight_decay"),
    (lambda L: L.Dense(4, kernel_constraint="non_neg"), r"take no weight constraint"),
    (lambda L: L.Dense(4, dtype="float64"), r"Dense\(dtype='float64'\): .*its model's: "
                                            r"Sequential\(dtype='float64'\)"),
    (lambda L: L.Dense(4, input_shape=(8,)), r"Sequential\(\[...\], input_shape=\(28, 28, 1\)\)"),
    (lambda L: L.MaxPool2D(2, data_format="channels_first"), r"MaxPool2D\(data_format="),
    (lambda L: L.AvgPool2D(data_format="channels_first"), r"AvgPool2D\(data_format="),
    (lambda L: L.Dropout(0.5, seed=3), r"Dropout\(seed=3\): .*random layers take no seed"),
    (lambda L: L.Dropout(0.5, noise_shape=(None, 1, 1, 8)), r"no noise_shape"),
    (lambda L: L.ReLU(negative_slope=0.1), r"ReLU\(negative_slope=0.1\): .*no negative slope"),
    (lambda L: L.ReLU(threshold=1.0), r"ReLU\(threshold=1.0\): .*no threshold"),
    (lambda L: L.RandomFlip(seed=1), r"RandomFlip\(seed=1\): .*random layers take no seed"),
    (lambda L: L.Normalization(axis=1), r"Normalization\(axis=1\): .*each channel"),
    (lambda L: L.Rescaling(1 / 255, dtype="float16"), r"Rescaling\(dtype='float16'\)"),
    # (layers with no settings of their own: Keras' MNIST tutorial's first line included)
    (lambda L: L.Flatten(input_shape=(28, 28)), r"Flatten\(input_shape=\(28, 28\)\): .*Sequen"),
    # (Keras 2's: was Python's bare "unexpected keyword argument")
    (lambda L: L.Dense(4, input_dim=3), r"Dense\(input_dim=3\): Keras' keyword.*input_shape="),
    (lambda L: L.Conv2D(4, 3, batch_input_shape=(None, 8, 8, 1)),
     r"Conv2D\(batch_input_shape=.*batch_input_shape\[1:\] \(the batch size is fit's\)"),
    (lambda L: L.Flatten(data_format="channels_first"), r"Flatten\(data_format="),
    (lambda L: L.Conv2D(8, 3, groups=True), r"Conv2D\(groups=True\): .*groups=1 only"),
    (lambda L: L.GlobalAvgPool2D(keepdims=True), r"gives \(N, C\)"),
    (lambda L: L.Softmax(axis=1), r"Softmax\(axis=1\): .*last axis"),
    (lambda L: L.Add(dtype="float64"), r"Add\(dtype='float64'\)")])
def test_keras_keywords_a_layer_does_not_take_get_a_clear_error(make, said):
    """A Keras port's ``BatchNorm2D(epsilon=1e-3)``, ``Conv2D(data_format=...)``... was
    Python's bare "unexpected keyword argument": now an InputError naming xpcnn's argument or
    what to do instead (no alias taken)."""
    from xpcnn import layers as L

    with pytest.raises(InputError, match=said):
        make(L)


@pytest.mark.parametrize("make", [
    lambda L: L.Softmax(axis=-1), lambda L: L.GlobalAvgPool2D(keepdims=False),
    lambda L: L.GlobalAvgPool2D(data_format="channels_last"),
    lambda L: L.Flatten(data_format="channels_last"),
    lambda L: L.Conv2D(8, 3, data_format="channels_last", dilation_rate=(1, 1), groups=1,
                       bias_initializer="zeros"),
    lambda L: L.MaxPool2D(2, data_format="channels_last"),
    lambda L: L.AvgPool2D(data_format="channels_last"),
    lambda L: L.Dense(4, bias_initializer="zeros"), lambda L: L.Dropout(0.5, noise_shape=None),
    lambda L: L.BatchNorm2D(axis=-1, center=True, scale=True, gamma_initializer="ones"),
    lambda L: L.ReLU(negative_slope=0.0, threshold=0), lambda L: L.RandomFlip(
        data_format="channels_last"), lambda L: L.Normalization(axis=-1, invert=False),
])
def test_a_keras_keyword_given_the_value_xpcnn_has_is_taken(make):
    """Keras' default spelled out, as a port writes it, is what xpcnn's layer does: taken, the
    layer as without it (was: refused as if it asked something else)."""
    from xpcnn import layers as L

    layer = make(L)
    plain = type(layer)(**{k: v for k, v in layer.get_config().items() if k != "name"})
    assert layer.get_config() == {**plain.get_config(), "name": layer.name}


@pytest.mark.parametrize("make", [
    lambda L: L.Conv2D(8, 3, data_format=None, kernel_regularizer=None, bias_regularizer=None,
                       activity_regularizer=None, kernel_constraint=None, bias_constraint=None),
    lambda L: L.MaxPool2D(2, data_format=None), lambda L: L.AvgPool2D(data_format=None),
    lambda L: L.Flatten(data_format=None), lambda L: L.GlobalAvgPool2D(data_format=None),
    lambda L: L.Dropout(0.5, seed=None, noise_shape=None),
    lambda L: L.Dense(4, kernel_regularizer=None, bias_constraint=None, lora_rank=None,
                      lora_alpha=None, quantization_config=None),
    lambda L: L.Conv2D(8, 3, lora_rank=None, lora_alpha=None),  # (Keras 3's BaseConv's)
    lambda L: L.BatchNorm2D(beta_regularizer=None, gamma_constraint=None, renorm_clipping=None),
    lambda L: L.RandomFlip(seed=None, data_format=None), lambda L: L.ReLU(max_value=None),
])
def test_keras_none_defaults_spelled_out_are_taken(make):
    """Keras 3's None defaults (data_format=None: the configured "channels_last"; seed=None; no
    regularizer, constraint or LoRA), as its signatures and get_config write them, are what
    xpcnn's layer does: taken (was: refused as if they asked something else)."""
    from xpcnn import layers as L

    layer = make(L)
    plain = type(layer)(**{k: v for k, v in layer.get_config().items() if k != "name"})
    assert layer.get_config() == {**plain.get_config(), "name": layer.name}
    with pytest.raises(InputError, match="take no regularizer"):  # (a real one still refused)
        L.Dense(4, kernel_regularizer="l2")
    with pytest.raises(InputError, match="take no regularizer"):  # (not a Keras Dropout's)
        L.Dropout(0.5, kernel_regularizer=None)
    with pytest.raises(InputError, match=r"Conv2D\(lora_rank=4\): .*Conv2D has no LoRA"):
        L.Conv2D(8, 3, lora_rank=4)  # (a real rank still refused)


def test_a_keras_keyword_refusal_leaves_other_keywords_and_users_constructors_alone():
    """An unknown keyword that is no Keras one is still Python's TypeError; a user's subclass
    whose constructor takes a Keras name takes it, and one passing it on is refused by the
    built-in constructor, under its own class name."""
    from xpcnn import layers as L

    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilonn'"):
        L.BatchNorm2D(epsilonn=1e-3)

    class KerasBN(L.BatchNorm2D):
        def __init__(self, epsilon=1e-3, name=None):
            super().__init__(0.01, eps=epsilon, name=name)

    class PassesOn(L.BatchNorm2D):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    assert KerasBN(epsilon=1e-2).eps == 1e-2
    assert PassesOn(eps=1e-2, name="bn").eps == 1e-2
    with pytest.raises(InputError, match=r"PassesOn\(epsilon=0.01\): .*BatchNorm2D\(eps=0.01\)"):
        PassesOn(epsilon=1e-2)
    assert L.BatchNorm2D(momentum=0.01, eps=1e-3, name="bn", trainable=False).eps == 1e-3
