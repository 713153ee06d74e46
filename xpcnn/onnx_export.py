"""ONNX export: a built model as an ONNX file that onnxruntime (or any ONNX runtime) runs.

``model.export("model.onnx")`` writes a graph that takes what ``predict`` takes, images
(N, H, W, C) with any batch size N, and returns what ``predict`` returns: class probabilities
(N, classes) for a model that ends in a Softmax layer or a ``Dense(activation="softmax")``
(its layers up to the logits, then a softmax),
any other model's output as it is (logits, features). Layers that act only in
training (RandomFlip, RandomCrop, Dropout) are identities, BatchNorm2D uses its running
statistics. The graph computes in float32 whatever the model's dtype or precision, with the
weights rounded to float32 (a finite one beyond float32's range is refused, naming its
layer). Its input is float32 by default; ``input_dtype="uint8"`` takes raw image bytes and
casts them (the model's own Rescaling still scales them).

Tensors stay (N, H, W, C) between layers as in xpcnn; Conv and the pools, which ONNX defines on
(N, C, H, W), are wrapped in a transpose each way (runtimes cancel each adjacent pair), so a
Flatten is a plain reshape in xpcnn's (H, W, C) order.

The exporter walks a list of :class:`LayerStep` (layer, input slots, output slot): the model's
graph, a chain for a Sequential. Each layer type has one converter, found by class name in
:data:`CONVERTERS`; a new layer type registers its own with :func:`register_converter`. Needs
the ``onnx`` package (``pip install "xpcnn[onnx]"``), imported only on export.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .checks import output_file
from .errors import InputError, MissingDependencyError
from .files import atomic_file
from .layers.base import Layer
from .ops.windows import resolve_padding

#: The ONNX operator set the graph uses, and the file format version that goes with it (as
#: onnx 1.12 wrote them): old enough for every current runtime.
OPSET = 17
IR_VERSION = 8
INPUT_DTYPES = ("float32", "uint8")
# The graph's output is named for what it holds: predict's probabilities after a final
# Softmax, else the model's raw outputs (logits, an inner layer's features).
INPUT_NAME, OUTPUT_NAME, RAW_OUTPUT_NAME = "input", "probabilities", "outputs"
ONNX_EXTRA_HINT = 'pip install "xpcnn[onnx]" (or: pip install onnx)'
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class LayerStep(NamedTuple):
    """One step of a model's graph: ``layer`` reads the tensors in slots ``inputs`` and writes
    slot ``output`` (slot 0 is the model's input). (Not an ONNX node: a converter writes those,
    and not a functional graph's :class:`~xpcnn.layers.symbolic.Node`.)"""

    layer: Layer
    inputs: tuple[int, ...]
    output: int


class GraphBuilder:
    """The ONNX nodes and initializers (constant tensors) being written, with unique names
    derived from the layer being converted."""

    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.scope = ""
        self._taken = {INPUT_NAME, OUTPUT_NAME, RAW_OUTPUT_NAME}

    def name(self, hint: str) -> str:
        """A tensor name not used yet: ``scope/hint``, numbered if need be."""
        base = f"{self.scope}/{hint}" if self.scope else hint
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None,
           **attributes: Any) -> str:
        """Append an ONNX node; returns the name of its output."""
        output = output or self.name(op_type)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output],
                                                     name=self.name(f"{op_type}_node"),
                                                     **attributes))
        return output

    def constant(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        """A constant (an initializer) holding ``value``; returns its name. ``dtype`` is
        float32, what the graph computes in, or int64, for an operand ONNX wants as integers
        (a Reshape's shape, a Slice's starts). Refused, naming the layer: a finite value that
        float32 would hold as infinity (a float64 model's weight), and a value int64 would
        change."""
        where = f"layer {self.scope!r} constant {hint!r}" if self.scope else f"constant {hint!r}"
        try:
            wanted = np.dtype(dtype)
        except TypeError:  # (no dtype at all)
            wanted = None
        if wanted not in (np.float32, np.int64):
            raise InputError(f"{where}: dtype must be np.float32 or np.int64, got {dtype!r}")
        given = np.asarray(value)
        with np.errstate(over="ignore", invalid="ignore"):  # (said below, not as NumPy warns)
            array = given.astype(wanted)
        if array.dtype == np.float32:
            # (values below float32's range round to 0 or a subnormal: an error below float32's
            # smallest step, as any rounding of the weights to float32)
            wrong = np.isinf(array) & np.isfinite(given)
            if wrong.any():
                raise InputError(f"{where} holds values beyond the range of float32 (up to "
                                 f"{np.abs(given[wrong]).max():.3g}; float32 ends at "
                                 f"{np.finfo(np.float32).max:.3g}): the ONNX graph computes in "
                                 "float32, where they would become infinity")
        # (an empty operand holds no value to change, [] included, which NumPy makes float64)
        elif given.size and (given.dtype.kind not in "iu" or (array != given).any()):
            raise InputError(f"{where}: int64 takes integers within its range, got "
                             f"{given.dtype} values {given.reshape(-1)[:4].tolist()}")
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name


#: A converter appends the ONNX nodes of one layer to the builder, given the names of the
#: layer's input tensors, and returns the name of its output tensor.
Converter = Callable[[Layer, GraphBuilder, list[str]], str]

#: Layer class name -> converter.
CONVERTERS: dict[str, Converter] = {}


def register_converter(layer_type: str) -> Callable[[Converter], Converter]:
    """Decorator: ``converter`` exports layers whose class is named ``layer_type``."""
    def register(converter: Converter) -> Converter:
        CONVERTERS[layer_type] = converter
        return converter

    return register


# -- the model ---------------------------------------------------------------------------------
def export_model(model: Any, path: str | os.PathLike[str], input_dtype: str = "float32") -> None:
    """Write ``model`` (built) to ``path`` as ONNX; see the module's docstring."""
    onnx = _import_onnx()
    try:  # (np.uint8 and np.dtype("uint8") name it too, as NumPy's own dtype= arguments take)
        named = np.dtype(input_dtype).name
    except (TypeError, ValueError):
        named = None
    if named not in INPUT_DTYPES:
        raise InputError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got "
                         f"{input_dtype!r}")
    input_dtype = named
    model._require_built("export")
    nodes, logits = graph_nodes(model)
    unknown = sorted({type(n.layer).__name__ for n in nodes} - set(CONVERTERS))
    if unknown:
        raise InputError(f"no ONNX converter for layer type(s) {', '.join(unknown)} (model "
                         f"{model.name!r}); known: {', '.join(sorted(CONVERTERS))}. A new "
                         "layer type registers one with xpcnn.onnx_export.register_converter")
    for what, name in [("model", model.name), *(("layer", n.layer.name) for n in nodes)]:
        try:  # (a legal str may hold a lone surrogate: os.fsdecode of an undecodable file name)
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{what} {name!r}: ONNX names are UTF-8 text and this one holds a "
                             "character UTF-8 cannot encode (a lone surrogate, as os.fsdecode "
                             "gives for bytes that are not UTF-8): rename it before export"
                             ) from None
    output_file(path, "the ONNX file")  # (before any work; missing folders are made)
    graph = GraphBuilder(onnx)
    tensors = {0: INPUT_NAME}  # slot -> ONNX tensor name
    if input_dtype == "uint8":
        tensors[0] = graph.op("Cast", [INPUT_NAME], to=onnx.TensorProto.FLOAT)
    for node in nodes:
        graph.scope = node.layer.name
        converter = CONVERTERS[type(node.layer).__name__]
        tensors[node.output] = _converted(
            converter(node.layer, graph, [tensors[t] for t in node.inputs]), converter,
            node.layer, graph)
    graph.scope = ""
    if model._fused_softmax():  # predict's last step: probabilities from the logits
        output = OUTPUT_NAME
        graph.op("Softmax", [tensors[logits]], output, axis=-1)
    else:
        output = RAW_OUTPUT_NAME
        graph.op("Identity", [tensors[logits]], output)
    proto = _model_proto(onnx, model, graph, input_dtype, output)
    with atomic_file(path) as f:
        f.write(proto.SerializeToString())


def _converted(result: Any, converter: Converter, layer: Any, graph: GraphBuilder) -> str:
    """``result``, what ``converter`` returned for ``layer``, where it names a tensor of the
    graph (a user's converter that returned None failed in the next layer's node, in onnx's
    own TypeError)."""
    if isinstance(result, str) and (result in graph._taken or any(
            result in node.output for node in graph.nodes)):
        return result
    raise InputError(f"the ONNX converter {getattr(converter, '__name__', converter)!r} of "
                     f"layer {layer.name!r} ({type(layer).__name__}) returned {result!r}: a "
                     "converter returns the name of its output tensor (what graph.op(...) "
                     "returns, or an input's name)")


def graph_nodes(model: Any) -> tuple[list[LayerStep], int]:
    """A model's layers up to its logits as steps of its graph (a Sequential's is a chain),
    and the logits' slot (a final Softmax layer is left out: the export ends with predict's
    softmax)."""
    inbound = model._inbound()
    nodes = [LayerStep(layer, ins, k + 1)
             for k, (layer, ins) in enumerate(zip(model.layers, inbound, strict=True))]
    if model._ends_in_a_softmax_layer():
        return nodes[:-1], inbound[-1][0]
    return nodes, len(nodes)


def _model_proto(onnx: Any, model: Any, graph: GraphBuilder, input_dtype: str, output: str
                 ) -> Any:
    helper = onnx.helper
    elem = onnx.TensorProto.UINT8 if input_dtype == "uint8" else onnx.TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem, ["N", *model._input_shape])]
    outputs = [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT,
                                             ["N", *model._output_shape])]
    proto = helper.make_model(
        helper.make_graph(graph.nodes, model.name, inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="xpcnn",
        doc_string=f"xpcnn model {model.name!r}: (N, H, W, C) images -> what predict returns")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs the onnx package, which is not "
                                     f"installed: {ONNX_EXTRA_HINT}") from e
    return onnx


# -- one converter per layer type ----------------------------------------------------------
def _weights(layer: Layer) -> dict[str, np.ndarray]:
    """The layer's weights by name (Keras layouts, the model's dtype)."""
    return dict(zip(layer.present_weight_names(), layer.get_weights(), strict=True))


def _relu_if(layer: Layer, graph: GraphBuilder, y: str) -> str:
    """``y`` through the layer's fused activation: "relu"; none, or a last Dense layer's
    "softmax", which the export ends with (as predict applies it to the logits)."""
    return graph.op("Relu", [y]) if layer.get_config()["activation"] == "relu" else y


def _window_attributes(layer: Layer, size: tuple[int, int], strides: tuple[int, int]
                       ) -> dict[str, Any]:
    """kernel_shape, strides and pads of a Conv or pool, with xpcnn's padding rule."""
    top, bottom, left, right = resolve_padding(layer.get_config()["padding"],
                                               layer.input_shape[:2], size, strides)
    return {"kernel_shape": list(size), "strides": list(strides),
            "pads": [top, left, bottom, right]}


@register_converter("RandomFlip")
@register_converter("RandomCrop")
@register_converter("Dropout")
def _identity(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    """Layers that act only in training."""
    return graph.op("Identity", inputs)


@register_converter("Rescaling")
def _rescaling(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    config = layer.get_config()
    y = graph.op("Mul", [inputs[0], graph.constant("scale", config["scale"])])
    return graph.op("Add", [y, graph.constant("offset", config["offset"])]) \
        if config["offset"] else y


@register_converter("Normalization")
def _normalization(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # The very shift and scale its kernels read, as host arrays: given statistics' mean and
    # 1 / std, or an adapted layer's mean and variance weights (its configuration holds
    # neither), so that the graph computes what predict does.
    shift, scale = (layer.backend.to_numpy(a) for a in layer._arrays_now())
    y = graph.op("Sub", [inputs[0], graph.constant("mean", shift)])
    return graph.op("Mul", [y, graph.constant("inv_std", scale)])


@register_converter("Conv2D")
def _conv2d(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    config, weights = layer.get_config(), _weights(layer)
    # Keras' (kh, kw, C_in, C_out) kernel as ONNX's (C_out, C_in, kh, kw)
    operands = [graph.op("Transpose", inputs, perm=NCHW),
                graph.constant("kernel", weights["kernel"].transpose(3, 2, 0, 1))]
    if config["use_bias"]:
        operands.append(graph.constant("bias", weights["bias"]))
    y = graph.op("Conv", operands, **_window_attributes(layer, tuple(config["kernel_size"]),
                                                        tuple(config["strides"])))
    return _relu_if(layer, graph, graph.op("Transpose", [y], perm=NHWC))


def _pool(op_type: str, layer: Layer, graph: GraphBuilder, inputs: list[str],
          **extra: Any) -> str:
    config = layer.get_config()
    attributes = _window_attributes(layer, tuple(config["pool_size"]), tuple(config["strides"]))
    pads, size = attributes["pads"], attributes["kernel_shape"]
    if any(p >= size[i % 2] for i, p in enumerate(pads)):
        raise InputError(f"layer {layer.name!r}: ONNX pools need less padding than the pool "
                         f"size, got padding {config['padding']!r} for a {size} pool")
    y = graph.op(op_type, [graph.op("Transpose", inputs, perm=NCHW)], **attributes, **extra)
    return graph.op("Transpose", [y], perm=NHWC)


@register_converter("MaxPool2D")
def _max_pool(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # xpcnn pads with -inf: ONNX's MaxPool ignores padding, the same thing.
    return _pool("MaxPool", layer, graph, inputs)


@register_converter("AvgPool2D")
def _avg_pool(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # The mean over the real (unpadded) inputs of each window, as xpcnn takes it.
    return _pool("AveragePool", layer, graph, inputs, count_include_pad=0)


@register_converter("GlobalAvgPool2D")
def _global_avg_pool(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    return graph.op("ReduceMean", inputs, axes=[1, 2], keepdims=0)


@register_converter("Flatten")
def _flatten(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # (N, H, W, C) -> (N, H*W*C) in (H, W, C) order: the tensor is NHWC, as in xpcnn.
    return graph.op("Flatten", inputs, axis=1)


@register_converter("Dense")
def _dense(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    weights = _weights(layer)
    operands = [inputs[0], graph.constant("kernel", weights["kernel"])]
    if layer.get_config()["use_bias"]:
        operands.append(graph.constant("bias", weights["bias"]))
    return _relu_if(layer, graph, graph.op("Gemm", operands))


@register_converter("ReLU")
def _relu(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    max_value = layer.get_config()["max_value"]
    # (a ceiling above float32's range, a float64 model's, clips nothing the graph computes)
    if max_value is None or max_value >= float(np.finfo(np.float32).max):
        return graph.op("Relu", inputs)
    return graph.op("Clip", [inputs[0], graph.constant("min", 0.0),
                             graph.constant("max", max_value)])


@register_converter("Add")
def _add(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    return graph.op("Sum", inputs)


@register_converter("Concatenate")
def _concatenate(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    return graph.op("Concat", inputs, axis=layer.batch_axis)  # (the layout is xpcnn's)


@register_converter("Softmax")
def _softmax(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    return graph.op("Softmax", inputs, axis=-1)


@register_converter("BatchNorm2D")
def _batch_norm(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # Inference as the layer computes it, on the last (channel) axis of NHWC or (N, features):
    # (x - moving_mean) * (1 / sqrt(moving_variance + eps)) * gamma + beta.
    w = _weights(layer)
    var = w["moving_variance"]
    inv_std = 1.0 / np.sqrt(var + var.dtype.type(layer.get_config()["eps"]))
    y = graph.op("Sub", [inputs[0], graph.constant("moving_mean", w["moving_mean"])])
    y = graph.op("Mul", [y, graph.constant("inv_std", inv_std)])
    y = graph.op("Mul", [y, graph.constant("gamma", w["gamma"])])
    return graph.op("Add", [y, graph.constant("beta", w["beta"])])


@register_converter("FeatureNorm")
def _feature_norm(layer: Layer, graph: GraphBuilder, inputs: list[str]) -> str:
    # As the layer computes it, per image and channel over H x W:
    # centred = x - mean; y = centred * (1 / sqrt(mean(centred^2) + eps)).
    x = inputs[0]
    centred = graph.op("Sub", [x, graph.op("ReduceMean", [x], axes=[1, 2], keepdims=1)])
    var = graph.op("ReduceMean", [graph.op("Mul", [centred, centred])], axes=[1, 2], keepdims=1)
    std = graph.op("Sqrt", [graph.op("Add", [var, graph.constant("eps",
                                                                 layer.get_config()["eps"])])])
    inv_std = graph.op("Div", [graph.constant("one", 1.0), std])
    return graph.op("Mul", [centred, inv_std])
