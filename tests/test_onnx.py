"""ONNX export: every reference model and every layer type in onnxruntime against xpcnn."""

import os
import re
import sys
import warnings

import numpy as np
import pytest
from nets import add_relu_net, every_layer_net, gap_net, plan_of

import xpcnn
from xpcnn.cli import main as cli_main
from xpcnn.datasets import load_shapes
from xpcnn.errors import InputError, MissingDependencyError
from xpcnn.layers import (
    Add,
    AvgPool2D,
    BatchNorm2D,
    Concatenate,
    Conv2D,
    Dense,
    Dropout,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    MaxPool2D,
    Normalization,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.models import INPUT_SHAPES, NAMES, build_model
from xpcnn.onnx_export import CONVERTERS, GraphBuilder, register_converter

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

TOL = 1e-5


def run_onnx(path, x):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def randomize(model, rng):
    """Non-trivial weights: random biases, BatchNorm affine and running statistics far from
    their initial 0 / 1, so that every weight shows in the output."""
    for layer in model.layers:
        randomize_layer(layer, rng)


def randomize_layer(layer, rng):
    weights = []
    for name, w in zip(layer.weight_names, layer.get_weights(), strict=False):
        if name == "moving_variance":
            w = rng.uniform(0.2, 3.0, w.shape)
        elif name == "gamma":
            w = rng.uniform(0.5, 2.0, w.shape)
        elif name in ("bias", "beta", "moving_mean"):
            w = rng.normal(0.0, 0.3, w.shape)
        weights.append(w)
    layer.set_weights(weights)


def check_model(model, x, tmp_path, input_dtype="float32"):
    """Export, check, run in onnxruntime; returns the largest difference to predict."""
    path = tmp_path / "model.onnx"
    model.export(path, input_dtype=input_dtype)
    onnx.checker.check_model(os.fspath(path), full_check=True)
    expected = model.predict(x)
    got = run_onnx(path, x.astype(input_dtype))
    assert got.shape == expected.shape and got.dtype == np.float32
    # The test means something only where the probabilities differ from uniform.
    assert np.ptp(expected, axis=-1).max() > 0.05
    diff = float(np.abs(got - expected).max())
    assert diff < TOL, diff
    return diff


@pytest.mark.parametrize("name", NAMES)  # the stacks and the residual networks
def test_reference_models_match_predict(name, tmp_path):
    rng = np.random.default_rng(0)
    shape = INPUT_SHAPES[name]
    model = build_model(name, 10, shape, seed=1)
    randomize(model, rng)
    x = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    check_model(model, x, tmp_path)
    check_model(model, x, tmp_path, input_dtype="uint8")  # the same bytes, cast in the graph


@pytest.mark.parametrize("net", [every_layer_net, gap_net])
def test_nets_with_batchnorm_and_every_layer_type_match_predict(net, tmp_path):
    rng = np.random.default_rng(2)
    model = xpcnn.Sequential(net(7), input_shape=(9, 11, 3), seed=0)
    randomize(model, rng)
    check_model(model, rng.integers(0, 256, (4, 9, 11, 3), dtype=np.uint8), tmp_path)


def test_a_trained_model_matches_and_any_batch_size_runs(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 256, (64, 9, 11, 3), dtype=np.uint8), rng.integers(0, 7, 64)
    model = xpcnn.Sequential(gap_net(7), seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-2))
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)  # BatchNorm's statistics move
    check_model(model, x[:1], tmp_path)
    check_model(model, x[:5], tmp_path)


def test_a_model_without_a_final_softmax_exports_its_logits_as_predict_returns_them(tmp_path):
    rng = np.random.default_rng(4)
    model = xpcnn.Sequential([Flatten(), Dense(5)], input_shape=(3, 4, 2), seed=0)
    randomize(model, rng)
    x = rng.normal(0, 3, (6, 3, 4, 2)).astype(np.float32)
    check_model(model, x, tmp_path)
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(run_onnx(tmp_path / "model.onnx", x),
                               x.reshape(6, -1) @ kernel + bias, rtol=1e-5, atol=1e-5)


def test_a_dense_softmax_activation_exports_as_a_final_softmax_layer(tmp_path):
    """Dense(activation="softmax") at the end: the export's logits, then predict's softmax
    (one Softmax node, not two), the same probabilities as Dense then Softmax()."""
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    probabilities = []
    for last in ([Dense(5, activation="softmax")], [Dense(5), Softmax()]):
        model = xpcnn.Sequential([Conv2D(3, 3, activation="relu"), Flatten(), *last],
                                 input_shape=(6, 6, 3), seed=0)
        randomize(model, rng := np.random.default_rng(13))
        check_model(model, x, tmp_path)
        proto = onnx.load(os.fspath(tmp_path / "model.onnx"))
        assert [n.op_type for n in proto.graph.node].count("Softmax") == 1
        probabilities.append(run_onnx(tmp_path / "model.onnx", x.astype(np.float32)))
    np.testing.assert_array_equal(*probabilities)


def test_a_feature_extractor_exports_the_inner_layer_output(tmp_path):
    rng = np.random.default_rng(11)
    model = xpcnn.Sequential(gap_net(4), input_shape=(6, 6, 3), seed=0)
    randomize(model, rng)
    extractor = xpcnn.Model(model.input, model.get_layer("conv2d_1").output)
    x = rng.integers(0, 256, (3, 6, 6, 3)).astype(np.float32)
    check_model(extractor, x, tmp_path)
    assert run_onnx(tmp_path / "model.onnx", x).shape == (3, 3, 3, 8)
    onnx = pytest.importorskip("onnx")
    names = lambda path: [o.name for o in onnx.load(str(path)).graph.output]  # noqa: E731
    assert names(tmp_path / "model.onnx") == ["outputs"]  # (features, not probabilities)
    model.export(tmp_path / "classifier.onnx")
    assert names(tmp_path / "classifier.onnx") == ["probabilities"]


def test_a_float64_model_exports_in_float32(tmp_path):
    rng = np.random.default_rng(5)
    model = xpcnn.Sequential(gap_net(7), input_shape=(9, 11, 3), seed=0, dtype="float64")
    randomize(model, rng)
    check_model(model, rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8), tmp_path)


# -- one layer at a time: its converter alone against its forward pass ------------------------
LAYERS = {
    "conv_valid": lambda: Conv2D(4, 3),
    "conv_same_strided": lambda: Conv2D(5, (3, 2), strides=(2, 3), padding="same"),
    "conv_int_padding_relu": lambda: Conv2D(3, 2, padding=2, activation="relu"),
    "conv_no_bias": lambda: Conv2D(2, (1, 3), strides=2, use_bias=False),
    "maxpool": lambda: MaxPool2D(2),
    "maxpool_same_strided": lambda: MaxPool2D((3, 2), strides=(2, 1), padding="same"),
    "maxpool_int_padding": lambda: MaxPool2D(3, strides=2, padding=1),
    "avgpool_same": lambda: AvgPool2D(2, padding="same"),
    "avgpool_int_padding": lambda: AvgPool2D((3, 2), strides=(1, 2), padding=1),
    "global_avgpool": lambda: GlobalAvgPool2D(),
    "flatten": lambda: Flatten(),
    "relu": lambda: ReLU(),
    "relu_max_value": lambda: ReLU(max_value=0.7),
    "softmax": lambda: Softmax(),
    "batchnorm": lambda: BatchNorm2D(eps=1e-3),
    "featurenorm": lambda: FeatureNorm(eps=0.5),  # a large eps, so a wrong one shows
    "rescaling_offset": lambda: Rescaling(0.5, offset=-1.25),
    "normalization_per_channel": lambda: Normalization([0.1, -0.2, 0.3], [0.5, 2.0, 1.5]),
    "normalization_scalar": lambda: Normalization(0.25, 3.0),
    "dropout": lambda: Dropout(0.5),
    "random_flip": lambda: RandomFlip(),
    "random_crop": lambda: RandomCrop(2),
}
FLAT_LAYERS = {
    "dense": lambda: Dense(5),
    "dense_relu_no_bias": lambda: Dense(4, activation="relu", use_bias=False),
    "batchnorm_flat": lambda: BatchNorm2D(),
}


def layer_graph(layer):
    """An ONNX model of ``layer``'s converter alone, input and output named as the export."""
    graph = GraphBuilder(onnx)
    graph.scope = layer.name
    y = CONVERTERS[type(layer).__name__](layer, graph, ["input"])
    graph.op("Identity", [y], "output")
    helper = onnx.helper
    model = helper.make_model(
        helper.make_graph(graph.nodes, "layer", [helper.make_tensor_value_info(
            "input", onnx.TensorProto.FLOAT, ["N", *layer.input_shape])],
            [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT,
                                           ["N", *layer.output_shape])], graph.initializers),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


@pytest.mark.parametrize("case", sorted(LAYERS) + sorted(FLAT_LAYERS))
def test_each_layer_converter_matches_its_forward(case):
    rng = np.random.default_rng(sorted(LAYERS).index(case) if case in LAYERS else 99)
    layer = {**LAYERS, **FLAT_LAYERS}[case]()
    shape = (6,) if case in FLAT_LAYERS else (7, 5, 3)  # odd sizes: uneven "same" padding
    layer.build(shape, rng=rng)
    randomize_layer(layer, rng)
    x = rng.normal(0.5, 2.0, (3, *shape)).astype(np.float32)
    expected = np.asarray(layer.forward(x, training=False))
    got = layer_graph(layer)(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_every_layer_type_has_a_converter():
    public = {name for name in xpcnn.layers.__all__
              if isinstance(getattr(xpcnn.layers, name), type)
              and issubclass(getattr(xpcnn.layers, name), Layer)
              and name != "Layer"}
    assert public <= set(CONVERTERS), public - set(CONVERTERS)
    tested = {type(make()).__name__ for make in {**LAYERS, **FLAT_LAYERS}.values()}
    tested |= {"Add", "Concatenate"}  # (in the functional model's test)
    assert public <= tested, public - tested


def test_an_adapted_normalization_exports_its_statistics_weights(tmp_path):
    """An adapted Normalization holds its statistics as weights (mean and variance), not in
    its configuration: the export failed with KeyError 'mean'. Its graph uses the shift and
    scale that predict uses, float32 and uint8 input alike."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (12, 6, 5, 3)).astype(np.uint8)
    norm = Normalization()
    norm.adapt((x * [1.0, 0.5, 0.1] + [0.0, 40.0, 7.0]).astype(np.float32))
    model = xpcnn.Sequential([norm, Conv2D(4, 3), Flatten(), Dense(3), Softmax()],
                             input_shape=(6, 5, 3), seed=0)
    randomize(model, rng)
    assert model.layers[0].get_config() == {"name": "normalization", "adapted": True}
    check_model(model, x.astype(np.float32) * [1.0, 0.5, 0.1] + [0.0, 40.0, 7.0], tmp_path)
    check_model(model, x, tmp_path, input_dtype="uint8")


# -- errors, registration, writing ------------------------------------------------------------
class Doubling(Layer):
    def forward(self, x, training=False, options=None):  # (options: the plan's, unused)
        return x * 2.0


def test_an_unknown_layer_type_is_named_and_a_registered_converter_exports_it(
        tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    model = xpcnn.Sequential([Flatten(), Doubling(), Dense(3)], input_shape=(2, 2, 1))
    randomize(model, rng)
    with pytest.raises(InputError, match="no ONNX converter for layer type.*Doubling.*"
                                         "register_converter"):
        model.export(tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)  # checked before anything is written
    monkeypatch.setitem(CONVERTERS, "Doubling", None)  # removed again after the test
    register_converter("Doubling")(
        lambda layer, graph, inputs: graph.op("Mul", [inputs[0], graph.constant("two", 2.0)]))
    check_model(model, rng.normal(0, 2, (2, 2, 2, 1)).astype(np.float32), tmp_path)


def test_a_converter_that_returns_no_tensor_name_is_named(tmp_path, monkeypatch):
    """A user's converter that forgot its ``return`` failed in the next layer's node, in onnx's
    own "bad argument type" TypeError: refused naming the converter and its layer, no file."""
    model = xpcnn.Sequential([Flatten(), Doubling(), Dense(3)], input_shape=(2, 2, 1), seed=0)
    monkeypatch.setitem(CONVERTERS, "Doubling", None)  # removed again after the test

    @register_converter("Doubling")
    def forgets_return(layer, graph, inputs):
        graph.op("Mul", [inputs[0], graph.constant("two", 2.0)])

    for converter, got in ((forgets_return, "None"),
                           (lambda layer, graph, inputs: [inputs[0]], r"\['flatten/Flatten'\]"),
                           (lambda layer, graph, inputs: "nowhere", "'nowhere'")):
        register_converter("Doubling")(converter)
        with pytest.raises(InputError, match=rf"the ONNX converter '.*' of layer 'doubling' "
                                             rf"\(Doubling\) returned {got}: a converter returns "
                                             "the name of its output tensor"):
            model.export(tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)
    register_converter("Doubling")(lambda layer, graph, inputs: inputs[0])  # (an identity)
    model.export(tmp_path / "m.onnx")


def test_keras_export_arguments_are_taken_or_refused_naming_what_xpcnn_writes(
        tmp_path, capsys):
    """Keras 3's ``export(path, format="onnx")`` (or ``export(path, "onnx")``) was a bare
    TypeError (or "input_dtype must be one of float32, uint8, got 'onnx'"): taken, as its
    ``verbose``; its other formats, an input_signature and PyTorch's opset are refused."""
    model = xpcnn.Sequential([Conv2D(2, 3), GlobalAvgPool2D(), Dense(3)], input_shape=(6, 6, 1),
                             seed=0)
    model.export(tmp_path / "a.onnx", format="onnx", opset_version=17)  # (its own: taken)
    model.export(tmp_path / "b.onnx", "onnx", verbose=True)
    assert capsys.readouterr().out == f"Saved ONNX model at '{tmp_path / 'b.onnx'}'.\n"
    x = np.random.default_rng(0).random((2, 6, 6, 1), np.float32)
    for name in ("a.onnx", "b.onnx"):
        session = ort.InferenceSession(str(tmp_path / name))
        np.testing.assert_allclose(session.run(None, {"input": x})[0], model.predict(x, verbose=0),
                                   rtol=1e-5, atol=1e-6)
    for kwargs, message in [
            (dict(format="tf_saved_model"), r"export\(format='tf_saved_model'\): xpcnn's "
                                            "export writes ONNX only"),
            (dict(input_signature=[None]), r"export\(input_signature=\.\.\.\): Keras' keyword"),
            (dict(opset_version=13), r"export\(opset_version=\.\.\.\): xpcnn's export "
                                     "writes ONNX opset 17"),
            (dict(dynamo=True), "unexpected keyword argument 'dynamo'")]:
        with pytest.raises(InputError, match=message):
            model.export(tmp_path / "c.onnx", **kwargs)
    assert not (tmp_path / "c.onnx").exists()


def test_a_model_that_predict_refuses_is_not_exported(tmp_path):
    """A Softmax over (H, W, C) maps: predict refuses the model (a classifier ends in one
    vector of class scores); the file, a per-pixel softmax, was written all the same."""
    model = xpcnn.Sequential([Conv2D(3, 1), Softmax()], input_shape=(3, 4, 3), seed=0)
    x = np.zeros((1, 3, 4, 3), np.float32)
    with pytest.raises(InputError, match=r"the model's output has per-sample shape \(3, 4, 3\)"
                       ) as refused:
        model.predict(x, verbose=0)
    with pytest.raises(InputError, match=re.escape(str(refused.value))):
        model.export(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="has no layers yet: add"):  # (was an IndexError
        xpcnn.Sequential().export(tmp_path / "m.onnx")  # from the check above)
    assert not os.listdir(tmp_path)


class ToVector(Layer):
    """A user's layer whose converter needs an int64 operand (Reshape's shape)."""

    def _build(self, input_shape, rng):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=False, options=None):
        return self.xp.reshape(x, (x.shape[0], -1))


def test_a_users_converter_writes_int64_constants_and_a_bad_constant_is_named(
        tmp_path, monkeypatch):
    """GraphBuilder.constant(..., dtype=np.int64) for an operand ONNX takes as integers (was:
    float32 only, onnx's own InferenceError from inside export); another dtype, or a value
    int64 would change, is refused naming the layer and the constant."""
    rng = np.random.default_rng(6)
    model = xpcnn.Sequential([ToVector(), Dense(3)], input_shape=(2, 3, 2), seed=0)
    randomize(model, rng)
    monkeypatch.setitem(CONVERTERS, "ToVector", None)  # removed again after the test
    for value, dtype, match in [
            ([0, 1.5], np.int64, r"layer 'tovector' constant 'shape': int64 takes integers "
                                 r"within its range, got float64 values \[0.0, 1.5\]"),
            ([0, -1], np.float64, r"layer 'tovector' constant 'shape': dtype must be "
                                  r"np.float32 or np.int64, got <class 'numpy.float64'>")]:
        register_converter("ToVector")(lambda layer, graph, inputs, value=value, dtype=dtype:
                                       graph.op("Reshape", [inputs[0], graph.constant(
                                           "shape", value, dtype=dtype)]))
        with pytest.raises(InputError, match=match):
            model.export(tmp_path / "m.onnx")
    register_converter("ToVector")(lambda layer, graph, inputs: graph.op(
        "Reshape", [inputs[0], graph.constant("shape", [0, -1], dtype=np.int64)]))
    check_model(model, rng.normal(0, 2, (4, 2, 3, 2)).astype(np.float32), tmp_path)


def test_an_empty_int64_constant_is_taken():
    """GraphBuilder.constant(name, [], dtype=np.int64): an empty list, which NumPy makes
    float64, holds no value int64 would change: taken (was: refused as float64 values []), as
    ReduceSum's empty axes, which sum over every axis."""
    graph = GraphBuilder(onnx)
    axes = graph.constant("axes", [], dtype=np.int64)
    graph.op("ReduceSum", ["input", axes], "output", keepdims=0)
    held = onnx.numpy_helper.to_array(graph.initializers[-1])
    assert (held.dtype, held.shape) == (np.int64, (0,))
    helper = onnx.helper
    model = helper.make_model(
        helper.make_graph(graph.nodes, "sum", [helper.make_tensor_value_info(
            "input", onnx.TensorProto.FLOAT, [2, 3])], [helper.make_tensor_value_info(
                "output", onnx.TensorProto.FLOAT, [])], graph.initializers),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert session.run(None, {"input": x})[0] == 15.0


def test_a_float64_weight_beyond_float32s_range_is_refused_naming_its_layer(tmp_path):
    """The graph computes in float32: a float64 model's finite weight beyond its range would
    be infinity there (was: exported, inf and NaN where predict gives [[1, 2]], only NumPy's
    overflow warning). One below float32's range rounds as any weight does, within float32's
    smallest step (1e-45): exported, without a warning."""
    model = xpcnn.Sequential([Flatten(), Dense(2), Dense(2)], input_shape=(2, 1, 1),
                             dtype="float64", seed=0)
    model.layers[1].set_weights([np.array([[1e39, 0.0], [0.0, 1.0]]), np.zeros(2)])
    model.layers[2].set_weights([np.array([[1e-39, 0.0], [0.0, 1.0]]), [1e-50, 0.0]])
    with pytest.raises(InputError, match=r"^layer 'dense' constant 'kernel' holds values beyond "
                                         r"the range of float32 \(up to 1e\+39; float32 ends "
                                         r"at 3.4e\+38\): the ONNX graph computes in float32, "
                                         r"where they would become infinity$"):
        model.export(tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)
    model.layers[1].set_weights([np.array([[1e30, 0.0], [0.0, 1.0]]), np.zeros(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.export(tmp_path / "m.onnx")
    x = np.array([[[[1.0]], [[2.0]]]], np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), model.predict(x, verbose=0),
                               rtol=1e-6)


def test_a_functional_model_with_merges_and_a_reused_tensor_matches_predict(tmp_path):
    rng = np.random.default_rng(8)
    inputs = xpcnn.Input((9, 11, 3))
    x = ReLU()(BatchNorm2D()(Conv2D(4, 3, padding="same")(inputs)))
    y = Conv2D(4, 3, padding="same", activation="relu")(x)
    z = Add()([x, y, Conv2D(4, 1)(x)])  # x read three times
    c = Concatenate()([z, MaxPool2D(1)(x)])
    c = Concatenate(axis=1)([c, Conv2D(8, 1)(x)])  # along the height
    flat = GlobalAvgPool2D()(c)
    outputs = Softmax()(Dense(7)(Concatenate()([flat, Dense(3)(flat)])))
    model = xpcnn.Model(inputs, outputs, seed=0)
    randomize(model, rng)
    check_model(model, rng.integers(0, 256, (4, 9, 11, 3), dtype=np.uint8).astype(np.float32),
                tmp_path)


def test_adds_with_their_relu_fused_export_as_a_sum_then_a_relu(tmp_path):
    """The plan runs an Add and the ReLU() after it as one; the file keeps both layers."""
    rng = np.random.default_rng(12)
    model = xpcnn.Model(*add_relu_net(), seed=0)
    randomize(model, rng)
    assert {"add_1", "add_2", "add_3", "add_4"} <= set(plan_of(model)[1])
    check_model(model, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8).astype(np.float32),
                tmp_path)
    nodes = onnx.load(os.fspath(tmp_path / "model.onnx")).graph.node
    sums = [n for n in nodes if n.op_type == "Sum"]
    assert [len(n.input) for n in sums] == [2, 3, 3, 2]
    for n in sums:
        assert [r.op_type for r in nodes if n.output[0] in r.input] == ["Relu"]


def test_a_model_with_a_nested_sequential_matches_predict(tmp_path):
    rng = np.random.default_rng(9)
    inputs = xpcnn.Input((8, 6, 3))
    x = ReLU()(BatchNorm2D()(Conv2D(4, 3, padding="same", use_bias=False)(
        Rescaling(1 / 255)(inputs))))
    block = xpcnn.Sequential([Conv2D(3, 3, strides=2, padding="same"), ReLU(6.0)])
    c = Concatenate()([MaxPool2D(2)(x), block(x), AvgPool2D(2)(x)])
    outputs = Softmax()(Dense(5)(Flatten()(FeatureNorm()(c))))
    model = xpcnn.Model(inputs, outputs, seed=0)
    randomize(model, rng)
    x = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    check_model(model, x, tmp_path)
    check_model(model, x, tmp_path, input_dtype="uint8")


def test_a_model_exports_its_shared_block_as_built_for_its_own_images(tmp_path):
    """A block shared with a model on other images was last built for those: the export
    writes the padding of this model's images (a strided "same" convolution's differs)."""
    rng = np.random.default_rng(11)
    block = xpcnn.Sequential([Conv2D(3, 3, strides=2, padding="same")])
    inputs = xpcnn.Input((6, 6, 2))
    model = xpcnn.Model(inputs, Softmax()(Dense(4)(Flatten()(block(inputs)))))
    randomize(model, rng)
    larger = xpcnn.Input((7, 7, 2))
    xpcnn.Model(larger, Softmax()(Dense(4)(Flatten()(block(larger)))))
    check_model(model, rng.normal(0, 2, (3, 6, 6, 2)).astype(np.float32), tmp_path)


def test_a_model_whose_logits_are_a_merge_matches_predict(tmp_path):
    rng = np.random.default_rng(10)
    inputs = xpcnn.Input((5,))
    model = xpcnn.Model(inputs, Add()([Dense(4)(inputs), Dense(4, activation="relu")(inputs)]))
    randomize(model, rng)
    check_model(model, rng.normal(0, 2, (6, 5)).astype(np.float32), tmp_path)


def test_an_unbuilt_model_and_a_bad_input_dtype_are_refused(tmp_path):
    with pytest.raises(InputError, match="must be built before export"):
        xpcnn.Sequential([Flatten(), Dense(3)]).export(tmp_path / "m.onnx")
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1))
    for wrong in ("float16", np.float16, "no dtype", True, None):
        with pytest.raises(InputError, match="input_dtype must be one of float32, uint8, got "):
            model.export(tmp_path / "m.onnx", input_dtype=wrong)
    assert not os.listdir(tmp_path)
    # (NumPy's spellings of a dtype name it too: np.uint8 was refused, np.dtype("uint8") taken)
    x = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    for dtype in (np.uint8, np.dtype("uint8")):
        check_model(model, x, tmp_path, input_dtype=dtype)


def test_a_ceiling_beyond_float32s_range_exports_as_a_plain_relu(tmp_path):
    """ReLU(max_value=1e300) in a float64 model: the float32 graph's values never reach it, so
    it is a Relu (was: refused as a constant beyond float32's range)."""
    model = xpcnn.Sequential([Flatten(), Dense(3), ReLU(max_value=1e300)], input_shape=(2, 2, 1),
                             dtype="float64", seed=0)
    check_model(model, np.random.default_rng(0).normal(0, 3, (4, 2, 2, 1)), tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "Relu" in ops and "Clip" not in ops


def test_an_unwritable_path_is_refused_before_any_work(tmp_path, monkeypatch):
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1))
    calls = []
    monkeypatch.setitem(CONVERTERS, "Flatten", lambda *a: calls.append(a))
    with pytest.raises(InputError, match="the ONNX file .* is a folder; give the path of a file"):
        model.export(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot write the ONNX file .* is not a folder"):
        model.export(tmp_path / "file" / "m.onnx")  # a file where a folder should be
    assert calls == []


def test_an_export_makes_its_missing_folders_as_saving_does(tmp_path):
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1))
    model.save(tmp_path / "a" / "m.npz")
    model.export(tmp_path / "b" / "c" / "m.onnx")
    assert (tmp_path / "b" / "c" / "m.onnx").stat().st_size > 0


def test_a_failed_export_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1))
    path = tmp_path / "m.onnx"
    model.export(path)
    before = path.read_bytes()

    def disk_full(proto):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", disk_full)  # while writing
    with pytest.raises(OSError, match="No space left"):
        model.export(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_without_onnx_a_missing_dependency_error_gives_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    model = xpcnn.Sequential([Flatten(), Dense(3)], input_shape=(2, 2, 1))
    with pytest.raises(MissingDependencyError, match=r'pip install "xpcnn\[onnx\]"'):
        model.export(tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


def test_cli_train_exports_and_checks_first(tmp_path, capsys, monkeypatch):
    path = tmp_path / "shapes.onnx"
    args = ["train", "--limit", "40", "--epochs", "1", "--batch-size", "20", "--quiet"]
    assert cli_main([*args, "--export", str(tmp_path)]) == 2  # a folder: refused at once
    assert "is a folder; give a file path such as" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        assert cli_main([*args, "--export", str(path)]) == 2
        assert 'pip install "xpcnn[onnx]"' in capsys.readouterr().err
    assert not path.exists()
    assert cli_main([*args, "--save", str(tmp_path / "shapes.npz"), "--export", str(path)]) == 0
    model = xpcnn.load_model(str(tmp_path / "shapes.npz"))
    x = load_shapes()[1][0][:4]
    np.testing.assert_allclose(run_onnx(path, x.astype(np.float32)), model.predict(x),
                               rtol=0, atol=TOL)


@pytest.mark.parametrize("where", ["layer", "model"])
def test_a_name_utf8_cannot_encode_is_refused_by_name_before_any_file(where, tmp_path):
    """A str holding a lone surrogate (os.fsdecode of bytes that are not UTF-8) is a legal
    name that saves and loads, but ONNX names are UTF-8: export refuses it by name, before
    writing, where onnx would fail deep inside."""
    name = os.fsdecode(b"stage_\xff")
    layer_name, model_name = (name, None) if where == "layer" else ("flatten", name)
    model = xpcnn.Sequential([xpcnn.Input((4, 4, 2)), Flatten(name=layer_name), Dense(3)],
                             seed=0, name=model_name)
    path = tmp_path / "m.onnx"
    with pytest.raises(InputError, match=rf"{where} 'stage_\\udcff': ONNX names are UTF-8"):
        model.export(path)
    assert not path.exists()
