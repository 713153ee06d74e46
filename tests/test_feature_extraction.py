"""Keras' feature-extraction idiom: ``model.input`` / ``model.output`` and ``layer.output`` as
symbolic tensors, and ``xpcnn.Model(model.input, layer.output)``, a model that shares the
trained layers and predicts what that layer computes."""

import gc

import numpy as np
import pytest
from nets import plan_of, residual_net

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import Conv2D, Dense, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU, Softmax


def sequential_net():
    """A Conv2D -> ReLU the plan fuses, and a Dense before a Softmax left to the loss."""
    return xpcnn.Sequential([Conv2D(4, 3, name="conv"), ReLU(name="relu"), MaxPool2D(2),
                             Flatten(), Dense(5, name="dense"), Softmax()],
                            input_shape=(8, 8, 3), dtype="float64", seed=0)


def functional_net():
    inputs, outputs = residual_net()
    return xpcnn.Model(inputs, outputs, dtype="float64", seed=0)


# (the model, the layers with a ReLU the plan fuses and those ReLUs)
ORIGINALS = {"sequential": (sequential_net, ["conv"], ["relu"]),
             "functional": (functional_net, ["conv_a", "stem_bn", "add"],
                            ["relu_a", "stem_relu", "res_relu"])}


@pytest.fixture
def images():
    return np.random.default_rng(3).standard_normal((6, 8, 8, 3))


def randomize_biases(model, rng):
    """Biases far from 0, so that a convolution's output has signs a ReLU would change."""
    for layer in model.layers:
        if "bias" in layer.params:
            layer.set_weights([w if w.ndim > 1 else rng.normal(0, 1, w.shape)
                               for w in layer.get_weights()])


@pytest.mark.parametrize("kind", ORIGINALS)
def test_an_extractor_predicts_exactly_the_layer_it_ends_at(kind, images, rng):
    make, fused, relus = ORIGINALS[kind]
    model = make()
    randomize_biases(model, rng)
    assert set(fused) <= set(plan_of(model)[1])  # their ReLUs are fused
    outputs = {la.name: np.asarray(y) for la, y in zip(model.layers, model.layer_outputs(images),
                                                       strict=True)}
    for name in (*fused, *relus, "dense"):
        extractor = xpcnn.Model(inputs=model.inputs, outputs=model.get_layer(name).output)
        assert extractor.layers[-1] is model.get_layer(name)
        np.testing.assert_allclose(extractor.predict(images), outputs[name], rtol=1e-12,
                                   atol=1e-12)
    # (not vacuous: the fused layers' outputs have negatives, the ReLUs' none, and the
    # logits are no probabilities)
    for name, relu in zip(fused, relus, strict=True):
        assert outputs[name].min() < 0 <= outputs[relu].min()
    assert not np.allclose(outputs["dense"].sum(axis=1), 1.0)
    # the whole model still ends in probabilities
    np.testing.assert_allclose(model.predict(images).sum(axis=1), 1.0, rtol=1e-12)


def test_the_logits_extracted_are_the_dense_layer_of_the_flattened_features(images):
    model = sequential_net()
    pooled = xpcnn.Model(model.input, model.get_layer("maxpool2d").output).predict(images)
    logits = xpcnn.Model(model.input, model.get_layer("dense").output).predict(images)
    kernel, bias = model.get_layer("dense").get_weights()
    np.testing.assert_allclose(logits, pooled.reshape(6, -1) @ kernel + bias, rtol=1e-12)


def test_symbolic_ends_of_sequential_and_functional_models():
    model = sequential_net()
    assert model.input.shape == (None, 8, 8, 3) and model.inputs == [model.input]
    assert model.output.shape == (None, 5) and model.outputs == [model.output]
    assert model.output is model.layers[-1].output
    assert model.layers[1].input is model.layers[0].output  # a chain
    inputs, outputs = residual_net()
    graph = xpcnn.Model(inputs, outputs)
    assert graph.input is inputs and graph.output is outputs  # the tensors it was traced from
    concat = graph.get_layer("concat")
    assert [t.node.layer.name for t in concat.input] == ["res_relu", "branch", "branch_relu",
                                                        "stem_relu"]


def test_an_extractor_shares_the_trained_layers_both_ways(images, rng):
    model = sequential_net()
    model.compile(optimizer=xpcnn.optim.SGD(0.1))
    features = xpcnn.Model(model.input, model.get_layer("conv").output)
    logits = xpcnn.Model(model.input, model.get_layer("dense").output)
    assert features.dtype_name == "float64"  # the layers' own dtype and device: no copy
    assert features.layers[0].params["kernel"] is model.layers[0].params["kernel"]
    before = features.predict(images)
    labels = rng.integers(0, 5, 6)
    model.fit(images, labels, epochs=1, batch_size=6, verbose=0)
    after = features.predict(images)
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, np.asarray(model.layer_outputs(images)[0]), rtol=1e-12)
    # Training the extractor (as Keras allows) trains the original's layers.
    logits.compile(optimizer=xpcnn.optim.SGD(0.1))
    dense = model.get_layer("dense").get_weights()[0]
    logits.fit(images, labels, epochs=1, batch_size=6, verbose=0)
    assert not np.allclose(model.get_layer("dense").get_weights()[0], dense)
    np.testing.assert_allclose(logits.predict(images), np.asarray(model.layer_outputs(images)[4]),
                               rtol=1e-12)


def test_a_float32_model_on_a_float64_models_layers_is_refused_and_rounds_nothing(images):
    """(was: built, it rounded the trained float64 weights to float32 in place, so that the
    original model predicted otherwise after a feature extractor was made, silently)"""
    model = sequential_net()
    weights, probabilities = model.get_weights(), model.predict(images)
    with pytest.raises(InputError, match=r"layer 'conv' \(Conv2D\) holds float64 weights, "
                                         r"trained or set in another model: a float32 model "
                                         r"would round them, in that model too; give this "
                                         r"model dtype='float64'"):
        xpcnn.Model(model.input, model.get_layer("dense").output, dtype="float32")
    for a, b in zip(model.get_weights(), weights, strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(images), probabilities)
    # the layers' own dtype, the default, runs on the very weights
    logits = xpcnn.Model(model.input, model.get_layer("dense").output).predict(images)
    assert logits.dtype == np.float64


def test_a_float32_model_whose_layers_a_float64_model_trained_saves_and_gives_no_weights(
        images, tmp_path):
    """A float32 Sequential used inside a float64 model that trained its layers: save wrote the
    float64 arrays under a float32 configuration (load rounded them, silently) and get_weights
    returned float64 arrays. Both build the model as it runs first, as predict does: refused,
    naming the weights it would round."""
    base = xpcnn.Sequential([Conv2D(4, 3, name="conv"), ReLU(), Flatten()],
                            input_shape=(8, 8, 3), seed=0)
    inputs = xpcnn.Input((8, 8, 3))
    trainer = xpcnn.Model(inputs, Softmax()(Dense(3)(base(inputs))), dtype="float64")
    trainer.compile(optimizer=xpcnn.optim.SGD(0.1))
    trainer.fit(images, np.arange(6) % 3, epochs=1, verbose=0)
    refusal = (r"layer 'conv' \(Conv2D\) holds float64 weights, trained or set in another "
               r"model: a float32 model would round them")
    with pytest.raises(InputError, match=refusal):
        base.save(tmp_path / "base.npz")
    assert not (tmp_path / "base.npz").exists()
    with pytest.raises(InputError, match=refusal):
        base.get_weights()
    assert trainer.get_weights()[0].dtype == np.float64  # (its own, as it runs them)


def test_an_extractor_of_features_cannot_fit_labels_but_shows_and_saves(images, tmp_path):
    model = sequential_net()
    features = xpcnn.Model(model.input, model.get_layer("relu").output, name="features")
    features.compile()
    with pytest.raises(InputError, match=r"per-sample shape \(6, 6, 4\), from layer 'relu' "
                                         r"\(ReLU, 2 of 2\): a classifier ends in one vector"):
        features.fit(images, np.zeros(6, int), verbose=0)
    lines = []
    features.summary(print_fn=lines.append)
    assert [line.split()[0] for line in lines[4:-4]] == ["conv", "relu"]  # its layers only
    features.save(tmp_path / "features.npz")
    again = xpcnn.load_model(tmp_path / "features.npz")
    np.testing.assert_array_equal(again.predict(images), features.predict(images))
    assert again.layers[0] is not model.layers[0]  # a file's model has layers of its own
    assert again.input.shape == (None, 8, 8, 3)  # (Keras' shapes: the batch axis None)
    assert again.get_layer("relu").output.shape == (None, 6, 6, 4)


def test_one_extractor_of_every_layer_is_refused_naming_forward():
    model = sequential_net()
    with pytest.raises(InputError, match=r"Model outputs must be one symbolic tensor, got 6: an "
                                         r"xpcnn model has one input and one output "
                                         r"\(model.layer_outputs\(x\) returns every "
                                         r"layer's output\)"):
        xpcnn.Model(model.inputs, [layer.output for layer in model.layers])


def test_without_a_graph_there_is_no_symbolic_tensor():
    model = xpcnn.Sequential([Conv2D(2, 3), Flatten(), Dense(3)])
    for what in ("input", "output", "inputs", "outputs"):
        with pytest.raises(InputError, match=rf"model 'sequential' has no symbolic "
                                             rf"{what.rstrip('s')} before it is built: call "
                                             r"build\(input_shape\), give Sequential\(\.\.\., "
                                             r"input_shape=\.\.\.\)"):
            getattr(model, what)
    with pytest.raises(InputError, match=r"layer 'conv2d' \(Conv2D\) has no symbolic output: it "
                                         "is in no functional graph and no built Sequential"):
        _ = model.layers[0].output
    model.build((5, 5, 1))
    assert model.layers[0].output.shape == (None, 3, 3, 2)


def test_a_layer_called_at_two_places_asks_which(images):
    conv = Conv2D(4, 3)
    # (both kept: a model's calls leave its layers' inbound nodes when it is collected)
    one = xpcnn.Sequential([conv, Flatten(), Dense(3)], input_shape=(8, 8, 3))
    two = xpcnn.Sequential([conv, MaxPool2D(2), Flatten(), Dense(2)], input_shape=(8, 8, 3))
    for what in ("output", "input"):
        with pytest.raises(InputError, match=rf"layer 'conv2d' \(Conv2D\) is called at 2 "
                                             rf"places .* so its {what} is ill-defined: Keras "
                                             rf"asks for get_{what}_at\(node_index\)"):
            getattr(conv, what)
    del two
    assert conv.output.node.inputs == (one.input,)


def test_a_block_inside_a_model_keeps_its_own_symbolic_graph(images):
    # As in Keras: a model called on a tensor does not record its layers' calls, so a
    # pretrained base keeps base.input -> layer.output.
    base = xpcnn.Sequential([Conv2D(4, 3, name="conv"), ReLU(), Flatten()],
                            input_shape=(8, 8, 3), dtype="float64")
    inputs = xpcnn.Input((8, 8, 3))
    head = xpcnn.Model(inputs, Softmax()(Dense(2)(base(inputs))))
    conv = base.get_layer("conv")
    assert conv in head.layers and conv.output.node.inputs == (base.input,)
    np.testing.assert_allclose(xpcnn.Model(base.input, conv.output).predict(images),
                               np.asarray(base.layer_outputs(images)[0]), rtol=1e-12)
    # (was: "disconnected", from input 'input', which is not this model's input 'input')
    with pytest.raises(InputError, match=r"computed from input 'input' of shape \(None, 8, 8, "
                                         r"3\), the input of model 'sequential', which is not "
                                         r"this model's input \(another tensor of the same "
                                         r"name\): the layers of a built model have their "
                                         r"output in its own graph, .* use xpcnn.Model\(m.input, "
                                         r"layer.output\), m that model"):
        xpcnn.Model(head.input, conv.output)


def test_an_unbuilt_block_called_inside_a_model_is_built_there_with_its_own_graph(images):
    """As Keras builds a Sequential at its first call (was: left unbuilt, its layers' output
    refused, its weights [] though the model trained them)."""
    base = xpcnn.Sequential([Conv2D(4, 3, name="conv"), ReLU(), Flatten()], name="base")
    inputs = xpcnn.Input((8, 8, 3))
    head = xpcnn.Model(inputs, Softmax()(Dense(2)(base(inputs))))
    assert base.built and base.input.shape == (None, 8, 8, 3)
    conv = head.get_layer("conv")
    assert conv.output.node.inputs == (base.input,)
    np.testing.assert_array_equal(xpcnn.Model(base.input, conv.output).predict(images),
                                  np.asarray(head.layer_outputs(images)[0]))


def test_a_rebuilt_or_refused_sequential_keeps_one_graph(images):
    model = sequential_net()
    with pytest.raises(InputError, match="layer 'dense' .* holds weights for inputs of shape"):
        model.build((10, 10, 3))  # refused: the model stays built for its own images
    assert model.input.shape == (None, 8, 8, 3)
    assert model.get_layer("relu").output.shape == (None, 6, 6, 4)
    convolutions = xpcnn.Sequential([Conv2D(2, 3), ReLU()], input_shape=(8, 8, 3))
    convolutions.build((10, 10, 3))
    assert convolutions.input.shape == (None, 10, 10, 3)
    assert convolutions.output.shape == (None, 8, 8, 2)
    assert [len(la.inbound_nodes) for la in convolutions.layers] == [1, 1]
    fresh = xpcnn.Sequential([Conv2D(2, 3), Flatten(), Dense(3), Softmax()])
    fresh.compile()
    with pytest.raises(InputError, match="label"):
        fresh.fit(images, np.full(6, 7), verbose=0)  # refused: the model stays unbuilt
    assert not fresh.built and all(not la.inbound_nodes for la in fresh.layers)
    fresh.build((8, 8, 3))
    assert [len(la.inbound_nodes) for la in fresh.layers] == [1, 1, 1, 1]


def conv_net(side):
    """A functional model of convolutions and global pooling (its weights fit any image size),
    the tensors it was traced from, and the Conv2D's output."""
    inputs = xpcnn.Input((side, side, 3))
    conv = Conv2D(4, 3, padding="same", name="conv")(inputs)
    outputs = Dense(2, name="dense")(GlobalAvgPool2D()(ReLU(name="relu")(conv)))
    return xpcnn.Model(inputs, outputs, dtype="float64", name="net"), inputs, conv, outputs


def test_a_functional_model_built_for_other_images_keeps_one_graph_with_its_layers(images):
    """``model.build`` for other images (the advice of the error for them) moves the model's
    input and its layers' outputs to one graph of the new shape, as a Sequential's (was:
    ``model.input`` moved alone, so ``Model(model.input, layer.output)`` was refused as
    disconnected, also after building back)."""
    model, inputs, conv, outputs = conv_net(6)
    before = xpcnn.Model(model.input, model.get_layer("conv").output)
    model.build((None, 8, 8, 3))
    layer = model.get_layer("conv")
    assert model.input.shape == (None, 8, 8, 3) and layer.output.shape == (None, 8, 8, 4)
    assert layer.input is model.input and model.output is model.get_layer("dense").output
    assert [len(la.inbound_nodes) for la in model.layers] == [1, 1, 1, 1]
    extractor = xpcnn.Model(model.input, layer.output)
    np.testing.assert_array_equal(extractor.predict(images),
                                  np.asarray(model.layer_outputs(images)[0]))
    # an extractor made before keeps its own graph and images, and built for others, it
    # leaves the model's as it was
    small = images[:, :6, :6]
    np.testing.assert_array_equal(before.predict(small), xpcnn.Model(inputs, conv).predict(small))
    assert xpcnn.Model(before.input, before.output).output_shape == (None, 6, 6, 4)
    before.build((None, 10, 10, 3))
    assert layer.input is model.input
    # built back for the input it was traced from: the tensors it was traced from again
    model.build((None, 6, 6, 3))
    assert model.input is inputs and layer.output is conv and model.output is outputs
    assert xpcnn.Model(model.input, layer.output).output_shape == (None, 6, 6, 4)


def test_ends_taken_before_and_after_a_rebuild_are_refused_naming_it():
    model, inputs, _, _ = conv_net(6)
    model.build((None, 8, 8, 3))
    with pytest.raises(InputError, match=r"from input 'input' of shape \(None, 8, 8, 3\), which "
                                         r"is not this model's input, of shape \(None, 6, 6, 3\) "
                                         r".*the graph model 'net' made when built again for "
                                         r"inputs of shape \(None, 8, 8, 3\) \(model.build\).* "
                                         r"xpcnn.Model\(m.input, layer.output\)"):
        xpcnn.Model(inputs, model.get_layer("conv").output)


def test_a_rebuilt_model_collected_gives_its_layers_their_traced_calls_back():
    """An extractor of its traced graph outlives it with its layers' outputs there."""
    model, inputs, conv, _ = conv_net(6)
    extractor = xpcnn.Model(inputs, conv)
    model.build((None, 8, 8, 3))
    assert extractor.get_layer("conv").output is not conv
    del model
    gc.collect()
    assert extractor.get_layer("conv").output is conv
