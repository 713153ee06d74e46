"""The functional API: symbolic tensors, merge layers, the graph executor and its plan,
freezing, and functional models saved, loaded and checked against a PyTorch twin."""

import json
import os
import re
import sys

import array_api_strict as xs
import numpy as np
import pytest
from gradcheck import assert_close, check_layer, numeric_grad, sample_indices
from nets import add_relu_net, plan_of, residual_net

import xpcnn
from xpcnn.errors import DataFormatError, InputError
from xpcnn.layers import (
    Add,
    AvgPool2D,
    BatchNorm2D,
    Concatenate,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.layers.base import Options


def make_model(device="cpu", dtype="float64", seed=0):
    inputs, outputs = residual_net()
    return xpcnn.Model(inputs, outputs, device=device, seed=seed, dtype=dtype)


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    return rng.standard_normal((24, 8, 8, 3)), rng.integers(0, 5, 24)


def test_the_plan_fuses_a_relu_only_where_the_convolution_has_one_reader():
    model = make_model()
    ran, fused, handed = plan_of(model)
    assert fused == ["stem_bn", "conv_a", "add"]
    assert "relu_a" not in ran and "stem_relu" not in ran and "branch_relu" in ran
    assert "res_relu" not in ran and "softmax" not in ran
    assert handed == [("pool_relu", "pool")]
    # the residual Add sums the gradients of its output (read by branch and concat) as it
    # applies its ReLU's; the stem's BatchNorm2D gets the sum of its output's from the model
    plan = model._plan()
    assert [s.layer.name for s in plan.steps if s.options.sum_output_grads] == ["add"]
    assert plan.gathered == {plan.steps[ran.index("add")].output}
    assert not model._plan().options(model.layers[0]).need_input_grad
    assert model._plan().options(model.layers[2]).need_input_grad


def test_summary_shows_inputs_and_trainable_counts():
    model = make_model()
    model.layers[0].trainable = False  # the stem: 3*3*3*4 = 108 weights frozen
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "add (Add)" in text and "stem_relu, bn_b" in text
    assert "concat (Concatenate)" in text and "res_relu, branch, branch_relu, stem_relu" in text
    total = model.count_params()
    bn_stats = 2 * 4 + 2 * 4
    assert f"Total params: {total:,}" in text
    assert f"Non-trainable params: {108 + bn_stats:,}" in text
    assert f"Trainable params: {total - 108 - bn_stats:,}" in text


# -- against PyTorch ---------------------------------------------------------------------------

torch_mirror = None


def _twin(model):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from torch_mirror import mirror, mirror_optimizer

    return torch, mirror(model, torch.float64), mirror_optimizer


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_steps_match_a_pytorch_twin_in_float64(device, optimizer, data):
    model = make_model(device)
    opt = (xpcnn.optim.SGD(0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
           else xpcnn.optim.Adam(1e-2))
    model.compile(optimizer=opt)
    torch, twin, mirror_optimizer = _twin(model)
    topt = mirror_optimizer(opt, twin.parameters())
    x, y = data
    for step in range(4):
        idx = slice(6 * step, 6 * step + 6)
        ours = model.train_on_batch(x[idx], y[idx])[0]
        twin.train()
        loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x[idx])),
                                                 torch.from_numpy(y[idx]))
        topt.zero_grad()
        loss.backward()
        topt.step()
        assert ours == pytest.approx(loss.item(), rel=1e-10, abs=1e-12), f"step {step}"
    twin.eval()  # the running statistics too
    with torch.no_grad():
        want = torch.softmax(twin(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(model.predict(x), want, rtol=1e-10, atol=1e-12)
    stem = twin.stages[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(model.get_weights()[0], stem, rtol=1e-10, atol=1e-12)


def test_a_frozen_layer_and_a_frozen_batchnorm_match_pytorch(data):
    """trainable=False: no gradient for the layer, the optimiser skips it; a frozen
    BatchNorm2D normalises with its running statistics in training (PyTorch: eval mode,
    parameters without gradients)."""
    model = make_model()
    model.compile(optimizer=xpcnn.optim.SGD(0.05, momentum=0.9))
    x, y = data
    model.fit(x[:12], y[:12], epochs=1, batch_size=6, verbose=0, shuffle=False)  # stats move
    frozen = [model.layers[0], model.layers[1]]  # the stem and its BatchNorm
    for layer in frozen:
        layer.trainable = False
    before = [la.get_weights() for la in frozen]
    torch, twin, mirror_optimizer = _twin(model)
    for stage in twin.stages[:2]:
        for p in stage.parameters():
            p.requires_grad_(False)
    topt = mirror_optimizer(model.optimizer, [p for p in twin.parameters() if p.requires_grad])
    for step in range(2):
        idx = slice(12 + 6 * step, 18 + 6 * step)
        ours = model.train_on_batch(x[idx], y[idx])[0]
        twin.train()
        twin.stages[1].eval()  # the frozen BatchNorm
        loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x[idx])),
                                                 torch.from_numpy(y[idx]))
        topt.zero_grad()
        loss.backward()
        topt.step()
        assert ours == pytest.approx(loss.item(), rel=1e-10), f"step {step}"
    for layer, old in zip(frozen, before, strict=True):
        for a, b in zip(layer.get_weights(), old, strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(model.trainable_layers) == len([la for la in model.layers if la.params]) - 2


def _twin_outputs(model, x):
    torch, twin, _ = _twin(model)
    with torch.no_grad():
        out = twin.eval()(torch.from_numpy(x)).numpy()
    return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


@pytest.mark.parametrize("axis", [1, 2, 3, -1, -2, -3])
def test_the_pytorch_twin_concatenates_along_the_layers_axis(axis, rng):
    """The twin's maps are NCHW: Concatenate's H, W, C axes are its 2, 3, 1 (was: every
    Concatenate joined channels, a twin of another shape, a torch error further on); on
    flat inputs the axis is the same."""
    inputs = xpcnn.Input((4, 5, 3))
    joined = Concatenate(axis=axis)([Conv2D(3, 1)(inputs), inputs])
    flat = Concatenate(axis=1 if axis > 0 else -1)([GlobalAvgPool2D()(joined), Flatten()(inputs)])
    for outputs in (joined, Dense(2)(flat)):
        model = xpcnn.Model(inputs, outputs, seed=0, dtype="float64")
        x = rng.standard_normal((2, 4, 5, 3))
        np.testing.assert_allclose(_twin_outputs(model, x), model.predict(x, verbose=0),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", [lambda: MaxPool2D(3, 1, 1), lambda: AvgPool2D(3, 1, 1),
                                  lambda: AvgPool2D(3, 2, "same"), lambda: AvgPool2D((2, 3), 1, 1)])
def test_the_pytorch_twin_of_a_symmetrically_padded_pool_matches(pool, rng):
    """A padded AvgPool2D's mean leaves the padding out: nn.AvgPool2d(count_include_pad=False)
    where the padding is symmetric (was: NotImplementedError for any padding)."""
    model = xpcnn.Sequential([Conv2D(2, 1), pool(), Flatten(), Dense(3)],
                             input_shape=(7, 7, 2), seed=0, dtype="float64")
    x = rng.standard_normal((2, 7, 7, 2))
    np.testing.assert_allclose(_twin_outputs(model, x), model.predict(x, verbose=0),
                               rtol=1e-12, atol=1e-12)


def test_the_pytorch_twin_refuses_an_asymmetrically_padded_avgpool(rng):
    model = xpcnn.Sequential([AvgPool2D(2, 1, "same")], input_shape=(5, 5, 2))
    with pytest.raises(NotImplementedError, match=r"AvgPool2D padded \(0, 1, 0, 1\)"):
        _twin(model)


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, shapes", [
    (Add(), [(3, 4, 2), (3, 4, 2), (3, 4, 2)]),
    (Concatenate(), [(3, 4, 2), (3, 4, 5)]),
    (Concatenate(), [(4,), (2,)]),
    (Concatenate(axis=1), [(3, 4, 2), (1, 4, 2)]),
    (Concatenate(axis=-2), [(3, 4, 2), (3, 1, 2), (3, 2, 2)]),
])
def test_merge_layer_gradients_match_finite_differences(layer, shapes, rng):
    layer.build(shapes, "cpu", dtype="float64")
    xs_ = [rng.standard_normal((2, *s)) for s in shapes]
    y = layer.forward(xs_, training=True)
    r = rng.standard_normal(y.shape)
    dxs = layer.backward(r)
    assert len(dxs) == len(xs_)
    f = lambda: float(np.sum(layer.forward(xs_) * r))  # noqa: E731
    for k, (x, dx) in enumerate(zip(xs_, dxs, strict=True)):
        assert dx.shape == x.shape
        for idx in sample_indices(x.shape, 20, rng):
            assert_close(dx[idx], numeric_grad(f, x, idx), f"{layer!r} input {k} {idx}")


@pytest.mark.parametrize("inputs", [2, 3])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_an_add_with_its_relu_fused_has_the_gradient_of_both(inputs, parts, rng):
    """An Add with the ReLU() after it fused (the plan's fused_relu), its output's gradient
    given whole or as the parts its readers sent back (sum_output_grads): the gradient of
    sum(relu(x0 + x1 (+ x2)) * (r0 + r1 + ...)) for each input, against finite differences."""
    layer = Add()
    layer.build([(3, 4, 2)] * inputs, "cpu", dtype="float64")
    options = Options(fused_relu=True, sum_output_grads=parts > 1)
    xs_ = [rng.standard_normal((2, 3, 4, 2)) for _ in range(inputs)]
    rs = [rng.standard_normal((2, 3, 4, 2)) for _ in range(parts)]
    y = layer.forward(xs_, training=True, options=options)
    assert y.min() == 0 < y.max()  # (the ReLU cut some outputs: some gradients too)
    dxs = layer.backward(rs if parts > 1 else rs[0], options)
    assert len(dxs) == inputs
    r = sum(rs)
    f = lambda: float(np.sum(layer.forward(xs_, options=options) * r))  # noqa: E731
    for k, (x, dx) in enumerate(zip(xs_, dxs, strict=True)):
        for idx in sample_indices(x.shape, 20, rng):
            assert_close(dx[idx], numeric_grad(f, x, idx), f"input {k} {idx}")


def test_a_model_of_adds_with_their_relu_fused_has_its_loss_gradients(rng):
    """Adds with their ReLU fused, outputs read two and three times (their gradients summed
    by the Adds), a tensor read four times (summed by the model) and a ReLU gradient left to
    a max pool: every parameter's gradient against finite differences of the loss."""
    model = xpcnn.Model(*add_relu_net(classes=3), dtype="float64", seed=3)
    model.compile(optimizer="sgd")
    assert model._plan().gathered
    xp = model.backend.xp
    x = rng.uniform(0, 255, (4, 8, 8, 3))
    y = rng.integers(0, 3, 4)

    def loss():  # (in training: the BatchNorms normalise with the batch's statistics)
        return float(model.loss.forward(xp, model._logits(x, True), y, xp.float64)[0])

    _, dz = model.loss.forward(xp, model._logits(x, True), y, xp.float64)
    model._backward(dz)
    for layer in model.layers:
        for name, p in layer.params.items():
            for idx in sample_indices(p.shape, 4, rng):
                assert_close(layer.grads[name][idx], numeric_grad(loss, p, idx),
                             f"{layer.name}.{name}{idx}")


def test_a_tensor_read_twice_gets_the_sum_of_both_gradients(rng):
    """Fan-out: the input gradient of a model where the same tensor feeds a Dense and a
    Concatenate, against finite differences of the whole model's loss."""
    inputs = xpcnn.Input((6,))
    h = Dense(5, name="h")(inputs)
    out = Softmax()(Dense(3)(Concatenate()([Dense(4)(h), h])))
    model = xpcnn.Model(inputs, out, dtype="float64", seed=3)
    model.compile(optimizer="sgd")
    xp = model.backend.xp
    x = rng.standard_normal((4, 6))
    y = rng.integers(0, 3, 4)

    def loss():
        return float(model.loss.forward(xp, model._logits(x, False), y, xp.float64)[0])

    _, dz = model.loss.forward(xp, model._logits(x, True), y, xp.float64)
    model._backward(dz)
    hidden = model.layers[0]
    for name, p in hidden.params.items():
        for idx in sample_indices(p.shape, 15, rng):
            assert_close(hidden.grads[name][idx], numeric_grad(loss, p, idx), f"h.{name}{idx}")


def test_a_frozen_batchnorm_has_the_gradient_of_its_affine_map(rng):
    bn = BatchNorm2D()
    bn.build((3, 3, 2), "cpu", dtype="float64", rng=rng)
    bn.set_weights([rng.standard_normal(2), rng.standard_normal(2),
                    rng.standard_normal(2), rng.uniform(0.5, 2.0, 2)])
    bn.trainable = False
    stats = [w.copy() for w in bn.get_weights()[2:]]
    check_layer(bn, (3, 3, 2), rng)
    x = rng.standard_normal((2, 3, 3, 2))
    np.testing.assert_allclose(bn.forward(x, training=True), bn.forward(x, training=False))
    assert "gamma" not in bn.grads
    for a, b in zip(bn.get_weights()[2:], stats, strict=True):
        np.testing.assert_array_equal(a, b)  # the statistics did not move


def test_a_frozen_convolution_still_passes_its_input_gradient(rng):
    conv = Conv2D(3, 3, strides=2, padding="same")
    conv.trainable = False
    check_layer(conv, (5, 5, 2), rng)
    assert conv.grads == {}


# -- models ------------------------------------------------------------------------------------


def test_sequential_and_a_model_of_the_same_stack_train_identically(data):
    def stack():
        return [Conv2D(4, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(5),
                Softmax()]

    seq = xpcnn.Sequential(stack(), input_shape=(8, 8, 3), dtype="float64", seed=2)
    inputs = xpcnn.Input((8, 8, 3))
    x = inputs
    for layer in stack():
        x = layer(x)
    fun = xpcnn.Model(inputs, x, dtype="float64", seed=2)
    assert plan_of(seq) == plan_of(fun)
    for m in (seq, fun):
        m.compile(optimizer="adam")
        m.fit(*data, epochs=2, batch_size=8, verbose=0)
    for a, b in zip(seq.get_weights(), fun.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_sequential_and_a_model_are_layers_of_a_model(data):
    block = xpcnn.Sequential([Conv2D(4, 3, padding="same"), BatchNorm2D(), ReLU()])
    block_in = xpcnn.Input((8, 8, 3))
    residual = xpcnn.Model(block_in, Add()([Conv2D(3, 1)(block_in), block_in]))
    inputs = xpcnn.Input((8, 8, 3))
    x = block(residual(inputs))
    out = Softmax()(Dense(5)(GlobalAvgPool2D()(Add()([x, Conv2D(4, 1)(inputs)]))))
    model = xpcnn.Model(inputs, out, seed=1)
    # shared: training the model trains the blocks' layers
    assert model.layers[:5] == residual.layers + block.layers
    assert model._inbound()[:5] == [(0,), (1, 0), (2,), (3,), (4,)]
    model.compile(optimizer="adam")
    before = block.layers[0].get_weights()[0]
    history = model.fit(*data, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.array_equal(block.layers[0].get_weights()[0], before)


def test_save_and_load_a_graph_round_trip(data, tmp_path):
    model = make_model(dtype="float32")
    model.layers[0].trainable = False
    model.compile(optimizer="adam")
    model.fit(*data, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "graph.npz")
    model.save(path)
    loaded = xpcnn.load_model(path)
    assert type(loaded) is xpcnn.Model and loaded._inbound() == model._inbound()
    assert [la.name for la in loaded.layers] == [la.name for la in model.layers]
    assert not loaded.layers[0].trainable and loaded.layers[1].trainable
    np.testing.assert_array_equal(loaded.predict(data[0]), model.predict(data[0]))
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_inputs_name_is_kept_by_summary_files_and_a_new_build(data, tmp_path):
    """(was: summary named every model's input "input", and a file lost the name)"""
    images = xpcnn.Input((8, 8, 3), name="images")
    x = Conv2D(4, 3, padding="same")(images)
    both = Concatenate()([x, images])  # (the input is read by two layers: a graph, no chain)
    model = xpcnn.Model(images, Softmax()(Dense(5)(GlobalAvgPool2D()(both))), seed=0)
    model.save(tmp_path / "named.npz")
    loaded = xpcnn.load_model(tmp_path / "named.npz")
    for m in (model, loaded):
        lines = []
        m.summary(print_fn=lines.append)
        assert lines[0] == 'Model "model" on cpu, input "images" (None, 8, 8, 3)'
        rows = [line.split() for line in lines]
        assert rows[4][-1] == "images" and rows[5][-2:] == ["conv2d,", "images"]
        assert m.input.name == "images" and m.get_config()["input_name"] == "images"
    loaded.build((10, 10, 3))  # (a new symbolic graph, for these images)
    assert loaded.input.name == "images" and loaded.input.shape == (None, 10, 10, 3)
    plain = xpcnn.Input((8, 8, 3))
    unnamed = xpcnn.Model(plain, Dense(2)(GlobalAvgPool2D()(plain)))
    assert "input_name" not in unnamed.get_config()  # (its file as it was)
    lines = []
    unnamed.summary(print_fn=lines.append)
    assert lines[0] == 'Model "model" on cpu, input (None, 8, 8, 3)'


def test_a_concatenation_along_the_height_saves_and_loads(data, tmp_path):
    inputs = xpcnn.Input((8, 8, 3))
    x = Conv2D(4, 3, padding="same")(inputs)
    c = Concatenate(axis=1, name="tall")([x, MaxPool2D((2, 1))(x)])  # (12, 8, 4)
    model = xpcnn.Model(inputs, Softmax()(Dense(5)(GlobalAvgPool2D()(c))), seed=0)
    assert model.layers[2].output_shape == (12, 8, 4)
    model.save(tmp_path / "tall.npz")
    loaded = xpcnn.load_model(tmp_path / "tall.npz")
    assert loaded.layers[2].get_config() == {"name": "tall", "axis": 1}
    np.testing.assert_array_equal(loaded.predict(data[0]), model.predict(data[0]))


def test_a_graph_model_resumes_exactly_from_a_checkpoint(data, tmp_path):
    x, y = data
    path = str(tmp_path / "run.npz")

    def run(epochs, resume=False):
        model, steps_run = make_model(dtype="float32"), []
        model.compile(optimizer="adam")
        model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, checkpoint=path,
                  checkpoint_every=1, resume=resume, callbacks=[xpcnn.callbacks.LambdaCallback(
                      on_train_batch_end=lambda batch, logs: steps_run.append(batch))])
        return model, len(steps_run)

    whole, _ = run(3)
    os.unlink(path)
    run(1)
    resumed, ran = run(3, resume=True)
    assert ran == 2 * 3  # epochs 2 and 3 of 3 steps, from the checkpoint (not afresh)
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_file_with_a_broken_graph_is_refused(tmp_path):
    from xpcnn.saving.model_file import model_config
    from xpcnn.saving.npz import encode_json, write_npz_atomic

    model = make_model(dtype="float32")
    config = model_config(model)
    config["layers"][3]["inbound"] = [9]  # a layer reading a later one's output
    path = str(tmp_path / "bad.npz")
    write_npz_atomic(path, {"__config__": encode_json(config)})
    with pytest.raises(DataFormatError, match="invalid layer graph: layer 3 .* reads \\[9\\]"):
        xpcnn.load_model(path)


# -- bad graphs --------------------------------------------------------------------------------


def test_bad_graphs_get_clear_errors():
    inputs = xpcnn.Input((8, 8, 3))
    x = Conv2D(4, 3, padding="same")(inputs)
    with pytest.raises(InputError, match=r"Add\) adds inputs of one shape, got \(8, 8, 4\), "
                                         r"\(8, 8, 3\)"):
        Add()([x, inputs])
    with pytest.raises(InputError, match=r"Concatenate\) joins inputs along axis -1, so every "
                                         r"other axis must match; got \(8, 8, 4\), \(4, 4, 4\)"):
        Concatenate()([x, MaxPool2D(2)(x)])
    with pytest.raises(InputError, match=r"has axis 4, but its inputs have 4 axes with the "
                                         r"batch: expected 1..3 or -3..-1"):
        Concatenate(axis=4)([x, x])
    for axis in (0, 1.0, True, "1"):
        with pytest.raises(InputError, match="Concatenate axis must be a non-zero int"):
            Concatenate(axis=axis)
    with pytest.raises(InputError, match="takes a list of two or more tensors, got one tensor"):
        Add()(x)
    with pytest.raises(InputError, match="takes one tensor, got a list of 2"):
        ReLU()([x, x])
    with pytest.raises(InputError, match="computed from input 'input' of shape "
                                         "\\(None, 8, 8, 3\\), which is not this model's "
                                         "input \\(another tensor of the same name\\): the "
                                         "graph .* is disconnected"):
        xpcnn.Model(xpcnn.Input((8, 8, 3)), x)
    with pytest.raises(InputError, match="the model has no layers"):
        xpcnn.Model(inputs, inputs)
    other = xpcnn.Input((8, 8, 4), name="other")
    with pytest.raises(InputError, match="computed from input 'other' of shape"):
        xpcnn.Model(inputs, Add()([x, other]))
    shared = Conv2D(4, 3, padding="same")
    with pytest.raises(InputError, match="is called twice in this graph: .* shared layers"):
        xpcnn.Model(inputs, shared(shared(x)))
    with pytest.raises(InputError, match="must be the tensor xpcnn.Input"):
        xpcnn.Model(x, ReLU()(x))
    with pytest.raises(InputError, match="Input shape must be positive sizes"):
        xpcnn.Input((0, 3))


def test_keras_habits_xpcnn_does_not_share_get_clear_errors():
    """What a Keras user writes and xpcnn does not do is refused, naming why: several inputs
    or outputs, Keras' training= on a call in a graph (it would be ignored), an array among a
    merge's symbolic tensors, a model called twice (siamese weights)."""
    inputs, other = xpcnn.Input((8, 8, 3)), xpcnn.Input((8, 8, 3), name="other")
    x = Conv2D(3, 3, padding="same")(inputs)
    with pytest.raises(InputError, match="^Model inputs must be one symbolic tensor, got 2: an "
                                         "xpcnn model has one input and one output$"):
        xpcnn.Model([inputs, other], Add()([x, other]))
    with pytest.raises(InputError, match="^Model outputs must be one symbolic tensor, got 2"):
        xpcnn.Model(inputs, [x, ReLU()(x)])
    training = ("called on a symbolic tensor with training={}: a graph does not record it, fit "
                "runs every layer in training mode and predict in inference mode")
    with pytest.raises(InputError, match=r"^layer 'dropout' \(Dropout\) "
                                         + training.format("True")):
        Dropout(0.5)(x, training=True)
    base = xpcnn.Sequential([BatchNorm2D()], name="base")
    with pytest.raises(InputError, match="^model 'base' " + training.format("False")):
        base(x, training=False)
    with pytest.raises(InputError, match=r"^layer 'add' \(Add\) got a list of symbolic tensors "
                                         r"and arrays \(SymbolicTensor, ndarray\): in a "
                                         "functional model every input is a symbolic tensor"):
        Add()([x, np.zeros((1, 8, 8, 3))])
    block_in = xpcnn.Input((8, 8, 3))
    block = xpcnn.Model(block_in, ReLU()(Conv2D(3, 3, padding="same", name="c")(block_in)))
    with pytest.raises(InputError, match=r"^layer 'c' is called twice in this graph: .* shared "
                                         r"layers \(a layer, or a model, called twice\)"):
        xpcnn.Model(inputs, block(block(inputs)))
    drop = Dropout(0.5)
    drop.build((3,))
    assert drop(np.ones((2, 3))).tolist() == [[1.0] * 3] * 2  # on a batch: inference by default


def test_keras_operators_on_symbolic_tensors_name_the_layer_that_does_it():
    """Keras 3's operators on symbolic tensors (its residual x = x + y, x * 0.5, x[..., 0]) were
    bare TypeErrors ("unsupported operand type(s) for +") and np.asarray(x) a 0-d object
    array: each is refused naming the layer to write, and that way computes what the
    operator would (checked against NumPy)."""
    inputs = xpcnn.Input((4, 4, 3))
    a = Conv2D(3, 1, name="c")(inputs)
    layers_only = "on a symbolic tensor (Keras 3's operator): a functional model's tensors are " \
        "transformed by layers only; "
    for op, written, way in [
            (lambda: a + inputs, "a + b", "write Add()([a, b])"),
            (lambda: a - inputs, "a - b", "write Add()([a, Rescaling(-1.0)(b)])"),
            (lambda: a * 0.5, "a * c", "write Rescaling(c)(a), with c = 0.5"),
            (lambda: 0.5 * a, "c * a", "write Rescaling(c)(a), with c = 0.5"),
            (lambda: a / 4, "a / c", "write Rescaling(1 / c)(a), with c = 4"),
            (lambda: 2.0 - a, "c - a", "write Rescaling(-1.0, offset=c)(a), with c = 2.0"),
            (lambda: a + 1, "a + c", "write Rescaling(1.0, offset=c)(a), with c = 1"),
            (lambda: a * inputs, "a * b", "xpcnn has no layer for it: write it as a layer of "
                                          "your own"),
            (lambda: a + "x", "a + x", "layers take symbolic tensors, not str")]:
        with pytest.raises(InputError, match=re.escape(f"{written} {layers_only}{way}")):
            op()
    with pytest.raises(InputError, match=re.escape("-a on a symbolic tensor (Keras 3's "
                                                   "operator)") + ".*Rescaling\\(-1.0\\)\\(a\\)"):
        -a  # noqa: B018
    with pytest.raises(InputError, match=r"\[\(Ellipsis, 0\)\] \(Keras 3's slicing\): .* xpcnn "
                                         "has no layer that slices; write it as a layer of your "
                                         "own"):
        a[..., 0]  # noqa: B018
    with pytest.raises(InputError, match="holds no values: it stands for a batch in a "
                                         "functional model's graph; model.predict"):
        np.asarray(a)
    # (the ways named compute what the operators would)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3))
    model = xpcnn.Model(inputs, a, dtype="float64", seed=0)
    conv = model.predict(x, verbose=0)
    for way, expected in [(Add()([a, Rescaling(-1.0)(inputs)]), conv - x),
                          (Rescaling(0.5)(a), conv * 0.5), (Rescaling(1 / 4)(a), conv / 4),
                          (Rescaling(-1.0, offset=2.0)(a), 2.0 - conv)]:
        got = xpcnn.Model(inputs, way, dtype="float64").predict(x, verbose=0)
        np.testing.assert_allclose(got, expected, rtol=1e-15, atol=1e-15)


def test_a_layer_taken_out_of_a_model_does_its_own_work(data):
    """The plan lives in the model: the first convolution of a trained model (which the plan
    runs without an input gradient, its ReLU fused) still returns its input gradient and its
    own output when called by itself."""
    model = make_model()
    model.compile(optimizer="sgd")
    model.fit(*data, epochs=1, batch_size=8, verbose=0)
    conv_a = next(la for la in model.layers if la.name == "conv_a")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4))
    y = conv_a.forward(x, training=True)
    assert float(np.min(y)) < 0  # no ReLU fused into it
    # the input and kernel gradients of each layer by itself, against finite differences
    check_layer(conv_a, (8, 8, 4), rng, x=x)
    stem = model.layers[0]
    assert stem.name == "stem"
    check_layer(stem, (8, 8, 3), rng, x=data[0][:2].copy())


def test_a_graph_trains_in_mixed_precision_and_shows_one_tour_row_per_layer(data, tmp_path):
    from xpcnn.viz import plot_stage_tour

    model = make_model(dtype="float32")
    model.compile(optimizer="adam", precision="mixed_float16")
    history = model.fit(data[0].astype(np.float32), data[1], epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(str(p.dtype) == "float32" for la in model.layers for p in la.params.values())
    fig = plot_stage_tour(model, data[0][0].astype(np.float32), tmp_path / "tour.png")
    assert len(fig.axes) == 2 * (len(model.layers) + 1)


def test_a_graph_on_pytorch_tensors_ends_with_numpy_weights(data):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    import array_api_compat.torch as xt

    weights = []
    for device in ("cpu", xt):
        model = make_model(device, dtype="float64")
        model.compile(optimizer="adam")
        model.fit(*data, epochs=1, batch_size=8, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_frozen_base_model_keeps_its_weights_under_a_new_head(data):
    base = xpcnn.Sequential([Conv2D(4, 3, padding="same"), BatchNorm2D(), ReLU()],
                            input_shape=(8, 8, 3))
    base.layers[1].set_weights([np.full(4, 2.0), np.full(4, 0.5), np.full(4, 0.1),
                                np.full(4, 3.0)])  # as if trained
    frozen = [w.copy() for w in base.get_weights()]
    base.trainable = False
    inputs = xpcnn.Input((8, 8, 3))
    model = xpcnn.Model(inputs, Softmax()(Dense(5)(GlobalAvgPool2D()(base(inputs)))))
    model.compile(optimizer="adam")
    head = model.layers[-2].get_weights()[0]
    model.fit(*data, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(base.get_weights(), frozen, strict=True):
        np.testing.assert_array_equal(a, b)  # the BatchNorm's statistics too
    assert not np.array_equal(model.layers[-2].get_weights()[0], head)
    assert model.trainable_layers == [model.layers[-2]] and not base.trainable


def test_a_sequential_of_a_base_model_and_a_head_shares_and_freezes_its_layers(data):
    """Keras' ``Sequential([base, head...])`` (it was refused: "add() expects an xpcnn layer,
    got Sequential"): the base's layers join the chain, shared; frozen, they keep their
    weights and BatchNorm statistics while the head trains, and the two models agree on
    them. A base whose layers branch, an atomic refusal and a model added to itself named."""
    base = xpcnn.Sequential([Conv2D(4, 3, padding="same"), BatchNorm2D(), ReLU()],
                            input_shape=(8, 8, 3), name="base")
    frozen = [w.copy() for w in base.get_weights()]
    base.trainable = False
    model = xpcnn.Sequential([base, GlobalAvgPool2D(), Dense(5, activation="softmax")])
    assert [la for la in model.layers[:3]] == list(base.layers)
    assert model.built and model.input_shape == (None, 8, 8, 3)  # (the base's, as in Keras)
    model.compile(optimizer="adam")
    model.fit(*data, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(base.get_weights(), frozen, strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.trainable_layers == [model.layers[-1]]
    x = data[0][:4]
    features = xpcnn.Sequential(list(model.layers[:3])).predict(x)
    np.testing.assert_array_equal(features, base.predict(x))
    base.trainable = True
    model.compile(optimizer="adam")
    model.fit(*data, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(base.get_weights()[0], frozen[0])  # (the base trains with it)

    inputs = xpcnn.Input((8, 8, 3))
    branching = xpcnn.Model(inputs, Add()([inputs, Conv2D(3, 3, padding="same")(inputs)]),
                            name="block")
    with pytest.raises(InputError, match="^model 'block''s layers branch .*: a Sequential "
                                         "holds a chain; call the model on a symbolic tensor"):
        xpcnn.Sequential([branching, Flatten()])
    head = xpcnn.Sequential([Dense(2, name="out")])
    target = xpcnn.Sequential([Flatten(), Dense(3, name="out")])
    with pytest.raises(InputError, match="two layers of the model are named 'out'"):
        target.add(xpcnn.Sequential([ReLU(), *head.layers]))
    assert [type(la) for la in target.layers] == [Flatten, Dense]  # (nothing added)
    with pytest.raises(InputError, match="^model 'sequential.*' cannot be added to itself$"):
        target.add(target)


def same_conv_reference(x, kernel, bias):
    """A stride-1 "same" convolution in plain NumPy, kernel in Keras' (kh, kw, C, K) layout."""
    kh, kw = kernel.shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    h, w = x.shape[1:3]
    return bias + sum(np.einsum("nhwc,ck->nhwk", padded[:, i:i + h, j:j + w], kernel[i, j])
                      for i in range(kh) for j in range(kw))


def test_a_convolution_run_on_small_images_then_used_on_larger_ones_computes_for_them(rng):
    """A pretrained convolution that has already run keeps its weights in a model on larger
    images and convolves them as such (not with the geometry of its first images)."""
    base = xpcnn.Sequential([Conv2D(3, 3, padding="same")], input_shape=(6, 6, 2),
                            dtype="float64")
    base.layers[0].forward(rng.standard_normal((2, 6, 6, 2)))
    inputs = xpcnn.Input((8, 8, 2))
    model = xpcnn.Model(inputs, Softmax()(Dense(3)(GlobalAvgPool2D()(base(inputs)))),
                        dtype="float64")
    x = rng.standard_normal((4, 8, 8, 2))
    kernel, bias = base.layers[0].get_weights()
    np.testing.assert_allclose(model.layer_outputs(x)[0], same_conv_reference(x, kernel, bias),
                               rtol=1e-12, atol=1e-12)


def test_a_base_frozen_through_a_model_on_larger_images_trains_on_as_frozen_alone(data):
    """A trained base whose convolution a new model on larger images freezes and builds for
    them trains its head next as the same base frozen alone does: its optimiser starts its
    slots afresh for the parameters it now trains (was: the rebuild for its own images
    dropped the compiled plan, so the change went unseen and the old slots met the new
    parameters: 'operands could not be broadcast together' from inside the Adam update)."""
    x, y = data
    bases = []
    for _ in range(2):
        base = xpcnn.Sequential([Conv2D(3, 3, name="conv"), GlobalAvgPool2D(), Dense(5),
                                 Softmax()], input_shape=(8, 8, 3), dtype="float64")
        base.compile(optimizer=xpcnn.optim.Adam(0.01))
        base.fit(x, y, epochs=1, batch_size=8, verbose=0)
        bases.append(base)
    shared, alone = bases
    larger = xpcnn.Input((10, 10, 3))
    features = xpcnn.Model(shared.input, shared.get_layer("globalavgpool2d").output)
    features.trainable = False
    head = xpcnn.Model(larger, Softmax()(Dense(5)(features(larger))))
    head.compile(optimizer=xpcnn.optim.SGD(0.1))
    head.fit(np.zeros((4, 10, 10, 3)), y[:4], verbose=0)
    alone.get_layer("conv").trainable = False
    for base in bases:
        base.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(shared.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_step_runs_shared_layers_as_built_for_its_own_images(data):
    """A raw train_step loop after another model built the shared layers for larger images
    trains as if that model did not exist (was: a ValueError, 'strides is incompatible with
    shape', from inside the convolution: only fit and train_on_batch built them again)."""
    x, y = data
    models = [xpcnn.Sequential([Conv2D(3, 3, name="conv"), BatchNorm2D(), ReLU(),
                                GlobalAvgPool2D(name="pool"), Dense(5), Softmax()],
                               input_shape=(8, 8, 3), dtype="float64") for _ in range(2)]
    shared, alone = models
    for model in models:
        model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
    larger = xpcnn.Input((11, 11, 3))
    features = xpcnn.Model(shared.input, shared.get_layer("pool").output)
    xpcnn.Model(larger, Softmax()(Dense(5)(features(larger))))
    assert shared.get_layer("conv").input_shape == (11, 11, 3)
    for model in models:
        for _ in range(3):
            model.train_step(model._to_device(x), model.backend.asarray(y))
    for a, b in zip(shared.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("meanwhile", ["builds", "trains", "moves"])
def test_fit_runs_shared_layers_as_built_for_its_own_images_after_a_callback_used_them(
        data, meanwhile):
    """A callback, after fit's first step, builds a model of the shared layers for larger
    images (and trains its own head on them), or moves a model of them to another
    device: fit's next steps run them as built for its own images, on its own device, and
    train as if that model did not exist (fit checks its own batches once, not each step:
    this check stays in every step)."""
    x, y = data

    def make():
        model = xpcnn.Sequential([Conv2D(3, 3, name="conv"), ReLU(), GlobalAvgPool2D(
            name="pool"), Dense(5), Softmax()], input_shape=(8, 8, 3), dtype="float64")
        model.compile(optimizer=xpcnn.optim.SGD(0.1, momentum=0.9))
        return model

    def use_shared_layers(batch, logs):
        if batch:
            return
        if meanwhile == "moves":
            features.to(xs)
            return
        larger = xpcnn.Input((11, 11, 3))
        other = xpcnn.Model(larger, Softmax()(Dense(5)(features(larger))))
        assert shared.get_layer("conv").input_shape == (11, 11, 3)
        if meanwhile == "trains":  # (its own head: the shared layers frozen meanwhile)
            features.trainable = False
            other.compile(optimizer=xpcnn.optim.SGD(0.1))
            other.fit(np.ones((4, 11, 11, 3)), y[:4], verbose=0)
            features.trainable = True

    shared, alone = make(), make()
    features = xpcnn.Model(shared.input, shared.get_layer("pool").output)
    callback = xpcnn.callbacks.LambdaCallback(on_train_batch_end=use_shared_layers)
    shared.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[callback])
    alone.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert shared.get_layer("conv").input_shape == (8, 8, 3)
    for a, b in zip(shared.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_summary_and_output_shape_are_of_the_models_own_images_where_a_block_is_shared():
    block_in = xpcnn.Input((6, 6, 2))
    block = xpcnn.Model(block_in, Conv2D(3, 3, strides=2, padding="same")(block_in))
    larger = xpcnn.Input((8, 8, 2))
    xpcnn.Model(larger, Softmax()(Dense(4)(Flatten()(block(larger)))))
    lines = []
    block.summary(print_fn=lines.append)
    assert block.output_shape == (None, 3, 3, 3)
    assert "conv2d (Conv2D)  (None, 3, 3, 3)  57" in [line.rstrip() for line in lines]


def test_predicting_with_a_model_sharing_a_block_leaves_the_others_training_as_it_was(rng):
    """Another model's images rebuild the shared block for them; this model's next step
    rebuilds it back and trains on as if nothing happened (Adam's moments kept, and the
    Dropout's stream)."""
    x, y = rng.standard_normal((16, 6, 6, 2)), rng.integers(0, 3, 16)
    larger = rng.standard_normal((4, 8, 8, 2))

    def train(interrupted):
        block = xpcnn.Sequential([Conv2D(3, 3, padding="same"), ReLU(), Dropout(0.5)])
        inputs, other_in = xpcnn.Input((6, 6, 2)), xpcnn.Input((8, 8, 2))
        model = xpcnn.Model(inputs, Softmax()(Dense(3)(GlobalAvgPool2D()(block(inputs)))),
                            dtype="float64", seed=1)
        other = xpcnn.Model(other_in, Softmax()(Dense(3)(GlobalAvgPool2D()(block(other_in)))),
                            dtype="float64", seed=2)
        model.compile(optimizer="adam")
        for _ in range(2):
            model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
            if interrupted:
                other.predict(larger)
        return model.get_weights()

    for a, b in zip(train(False), train(True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_custom_layer_whose_get_config_does_not_make_it_again_is_named():
    class Scale(xpcnn.layers.Layer):
        def __init__(self, factor, name=None):
            super().__init__(name)
            self.factor = factor

        def forward(self, x, training=False, options=None):
            return x * self.factor

    with pytest.raises(InputError, match=r"^layer 'scale' \(Scale\) cannot be made again from "
                                         r"its get_config\(\) \{'name': 'scale'\} \(.*missing 1 "
                                         r"required positional argument: 'factor'\)\): a layer's "
                                         r"get_config\(\) returns its constructor's arguments"):
        Scale(2.0)(xpcnn.Input((4,)))


def test_a_new_model_renames_its_new_layers_not_those_other_models_hold():
    """A name clash with a block's layer renames the new layer: renaming the block's would
    change the names another model holding the block shows (two 'conv2d_1' there)."""
    base = xpcnn.Sequential([Conv2D(2, 1)], input_shape=(4, 4, 3))
    first_in = xpcnn.Input((4, 4, 3))
    first = xpcnn.Model(first_in, Softmax()(Dense(3)(Flatten()(Conv2D(2, 1)(base(first_in))))))
    names = ["conv2d", "conv2d_1", "flatten", "dense", "softmax"]
    assert [la.name for la in first.layers] == names
    inputs = xpcnn.Input((4, 4, 3))
    second = xpcnn.Model(inputs, Softmax()(Dense(3)(Flatten()(base(Conv2D(3, 1)(inputs))))))
    assert [la.name for la in first.layers] == names
    assert [la.name for la in base.layers] == ["conv2d"]
    assert [la.name for la in second.layers] == ["conv2d_1", *names[:1], *names[2:]]


def test_a_model_runs_a_shared_block_in_its_own_precision(rng):
    """Another model compiled for mixed precision computes the block in float16; this float32
    model still computes it in float32 (its predictions do not move)."""
    block = xpcnn.Sequential([Conv2D(8, 3, padding="same"), ReLU()])
    inputs, other_in = xpcnn.Input((6, 6, 2)), xpcnn.Input((6, 6, 2))
    model = xpcnn.Model(inputs, Softmax()(Dense(3)(GlobalAvgPool2D()(block(inputs)))))
    other = xpcnn.Model(other_in, Softmax()(Dense(3)(GlobalAvgPool2D()(block(other_in)))))
    x = 10 * rng.standard_normal((4, 6, 6, 2)).astype(np.float32)
    before = model.predict(x)
    other.compile(optimizer="sgd", precision="mixed_float16")
    other.predict(x)
    assert block.layers[0].compute_dtype == np.float16
    np.testing.assert_array_equal(model.predict(x), before)
    assert block.layers[0].compute_dtype == np.float32


def test_a_sequential_renames_its_new_layers_not_those_other_models_hold():
    """As a functional Model does: the layer a built model holds keeps its name (it was
    renamed, and the model holding it showed two 'conv2d_1')."""
    base = xpcnn.Sequential([Conv2D(2, 1), Conv2D(2, 1)], input_shape=(4, 4, 3))
    second = xpcnn.Sequential([Conv2D(3, 1), base.layers[0], Conv2D(2, 1)])
    assert [la.name for la in base.layers] == ["conv2d", "conv2d_1"]
    assert [la.name for la in second.layers] == ["conv2d_1", "conv2d", "conv2d_2"]
    both = xpcnn.Sequential([Conv2D(3, 1), *base.layers])
    assert [la.name for la in both.layers][1:] == ["conv2d", "conv2d_1"]
    assert len({la.name for la in both.layers}) == 3
    assert [la.name for la in base.layers] == ["conv2d", "conv2d_1"]


def test_built_layers_of_one_automatic_name_are_joined_the_later_renamed(tmp_path):
    """Two towers made by one function, or two trained models, each with its automatic
    'conv2d' or 'dense', joined in one model (Keras' multi-branch pattern): they are (the
    later one renamed, as Keras' session-wide names would have it), not refused; a new layer
    gives way to both. Names given in code are never moved (next test)."""
    inputs = xpcnn.Input((6, 6, 1))

    def tower():
        return xpcnn.Model(inputs, Flatten()(Conv2D(2, 3)(inputs)))

    a, b = tower(), tower()
    joined = xpcnn.Model(inputs, Dense(3)(Concatenate()([a(inputs), b(inputs)])))
    assert [la.name for la in joined.layers] == ["conv2d", "flatten", "conv2d_1", "flatten_1",
                                                 "concatenate", "dense"]
    assert a.get_layer("conv2d") is joined.layers[0]
    assert b.layers[0].name == "conv2d_1"  # (b's own name of it now: one layer, one name)
    one = xpcnn.Sequential([Dense(3)], input_shape=(4,))
    two = xpcnn.Sequential([Dense(2)], input_shape=(3,))
    both = xpcnn.Sequential([one.layers[0], two.layers[0], Dense(2)])
    assert [la.name for la in both.layers] == ["dense", "dense_1", "dense_2"]
    # names read from files give way too: two pretrained models joined, and a file that holds
    # one name twice (a name set alike after building) loads
    one.save(tmp_path / "one.npz")
    two.save(tmp_path / "two.npz")
    loaded = [xpcnn.load_model(tmp_path / f"{k}.npz").layers[0] for k in ("one", "two")]
    assert [la.name for la in xpcnn.Sequential(loaded).layers] == ["dense", "dense_1"]
    both.build((4,))
    both.layers[1].name = "dense"  # (given: the automatic one gives way, as at construction)
    assert [la.name for la in both.layers] == ["dense_1", "dense", "dense_2"]
    both.save(tmp_path / "both.npz")
    with np.load(tmp_path / "both.npz") as f:
        entries = dict(f)
    config = json.loads(bytes(entries["__config__"]))
    for spec in config["layers"][:2]:
        spec["config"]["name"] = "dense"  # (as an older xpcnn could write it)
    entries["__config__"] = np.frombuffer(json.dumps(config).encode(), np.uint8)
    np.savez(tmp_path / "twice.npz", **entries)
    assert [la.name for la in xpcnn.load_model(tmp_path / "twice.npz").layers] == [
        "dense", "dense_1", "dense_2"]


def test_a_name_the_user_gave_is_never_moved_or_taken(tmp_path):
    """An automatic name gives way to the user's (the layer named 'conv2d_1' was renamed
    'conv2d_1_1' and the automatic one took its name); two names given alike are refused, as
    in Keras; the names come back alike from a file."""
    seq = xpcnn.Sequential([Conv2D(8, 3), Conv2D(16, 3), Conv2D(32, 3, name="conv2d_1")],
                           input_shape=(9, 9, 1))
    assert [la.name for la in seq.layers] == ["conv2d", "conv2d_2", "conv2d_1"]
    assert seq.get_layer("conv2d_1").filters == 32
    inputs = xpcnn.Input((9, 9, 1))
    named = Conv2D(32, 3)
    named.name = "conv2d"  # (set later, it is the user's too)
    graph = xpcnn.Model(inputs, named(Conv2D(16, 3)(inputs)))
    assert [la.name for la in graph.layers] == ["conv2d_1", "conv2d"]
    assert graph.get_layer("conv2d") is named
    seq.save(tmp_path / "seq.npz")
    assert [la.name for la in xpcnn.load_model(tmp_path / "seq.npz").layers] == \
        ["conv2d", "conv2d_2", "conv2d_1"]
    given = (r"^two layers of the model are named 'x', a name given to both \(a Dense and a "
             r"Dense\); names in a model are unique")
    with pytest.raises(InputError, match=given):
        xpcnn.Sequential([Dense(3, name="x"), Dense(2, name="x")])
    with pytest.raises(InputError, match=given):
        xpcnn.Model(inputs, Dense(2, name="x")(Dense(3, name="x")(Flatten()(inputs))))


def test_a_layer_renamed_in_a_model_to_another_layers_given_name_is_refused(tmp_path):
    """Renaming a layer of a model to a name another of its layers was given: two layers of
    one name (get_layer found the first, the weights' paths were alike, the file loaded with
    the second renamed 'd_1'). Refused as at the model's construction, the layer keeping its
    name, in a graph, a Sequential and a model the layer is shared by; a name an automatic one
    holds takes it from that one, as at construction; a layer out of a model is free again."""
    inputs = xpcnn.Input((5, 5, 3))
    conv = Conv2D(2, 3, name="c")
    graph = xpcnn.Model(inputs, Dense(3, name="d")(Flatten()(conv(inputs))), seed=0)
    seq = xpcnn.Sequential([xpcnn.Input((5, 5, 3)), Conv2D(2, 3, name="a"), Flatten(),
                            Dense(3, name="b")])
    clash = r"two layers of the model are named '{0}', a name given to both"
    for model, old, new in ((graph, "c", "d"), (seq, "a", "b")):
        with pytest.raises(InputError, match=clash.format(new)):
            model.get_layer(old).name = new
        assert [la.name for la in model.layers if la.name in (old, new)] == [old, new]
        assert model.get_layer(old).name_given
    shared = xpcnn.Model(inputs, Dense(4, name="e")(graph.layers[-1].output))
    with pytest.raises(InputError, match=clash.format("e")):
        graph.get_layer("d").name = "e"  # (free in graph, taken in shared)
    assert graph.get_layer("d").name == "d"
    graph.get_layer("flatten").name = "d_flat"  # (another name: taken)
    with pytest.raises(InputError, match=clash.format("b")):
        seq.get_layer("flatten").name = "b"
    assert seq.layers[-1].name == "b" and seq.layers[1].name == "flatten"
    seq.get_layer("a").name = "flatten"  # an automatic name gives way
    assert [la.name for la in seq.layers] == ["flatten", "flatten_1", "b"]
    seq.save(tmp_path / "seq.npz")
    assert [la.name for la in xpcnn.load_model(tmp_path / "seq.npz").layers] == \
        ["flatten", "flatten_1", "b"]
    popped = seq.pop()
    popped.name = "flatten"  # (out of the model: no longer its name to refuse)
    assert popped.name == "flatten" and shared.get_layer("d_flat") is graph.layers[1]


def test_a_refused_model_gives_its_layers_their_names_back():
    """A Sequential or graph that renamed a built layer for itself, then was refused at its
    build: the layer has its name again, and its own model's get_layer finds it (was: left
    renamed)."""
    a = xpcnn.Sequential([Dense(3)], input_shape=(4,))
    b = xpcnn.Sequential([Dense(2)], input_shape=(3,))
    with pytest.raises(InputError):  # (a's Dense takes 4 features, b's gives 2)
        xpcnn.Sequential([b.layers[0], a.layers[0]], input_shape=(3,))
    inputs = xpcnn.Input((3,))
    with pytest.raises(InputError):
        xpcnn.Model(inputs, a.layers[0](b.layers[0](inputs)))
    assert a.get_layer("dense") is a.layers[0] and b.get_layer("dense") is b.layers[0]


def test_from_config_copies_an_architecture_as_keras_does(data):
    """``Model.from_config(model.get_config())`` (Keras' way of copying an architecture) made a
    bare TypeError (it wanted the layers made already); layers had no from_config. Now a new
    model of new layers, of the same names, classes, graph and settings, built where the
    configuration has its input shape, sharing nothing with the original."""
    model = xpcnn.Model(*residual_net(), seed=3)
    model.compile(optimizer="adam")
    model.fit(*data, epochs=1, verbose=0)
    config = model.get_config()
    copy = xpcnn.Model.from_config(config)
    assert type(copy) is xpcnn.Model and copy.built and copy.get_config() == config
    assert all(a is not b for a, b in zip(copy.layers, model.layers, strict=True))
    fresh = xpcnn.Model(*residual_net(), seed=3)  # (the configuration's seed: the untrained
    # model's weights)
    for a, b in zip(copy.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = data[0][:3]
    assert copy.predict(x).shape == model.predict(x).shape

    seq = xpcnn.Sequential([Conv2D(4, 3, name="features"), Flatten(), Dense(3)], seed=1)
    same = xpcnn.Sequential.from_config(seq.get_config())  # (unbuilt: built at its use)
    assert not same.built and [la.name for la in same.layers] == ["features", "flatten", "dense"]
    assert same.predict(np.ones((2, 6, 6, 1))).shape == (2, 3)

    dense = Dense(5, activation="relu", name="head")
    again = Dense.from_config(dense.get_config())
    assert again is not dense and again.get_config() == dense.get_config()
    with pytest.raises(InputError, match=r"Dense.from_config: the configuration .* does not fit "
                                         r"Dense's constructor \(.*'filters'"):
        Dense.from_config({**dense.get_config(), "filters": 3})
    with pytest.raises(InputError, match=r"Model.from_config takes the dict a model's "
                                         r"get_config\(\) returns, got str"):
        xpcnn.Model.from_config("model.npz")
    wrong = {**config, "layers": [{"class": "Nonesuch", "config": {}}]}
    with pytest.raises(InputError, match=r"^Model.from_config: the configuration: unknown layer "
                                         r"type 'Nonesuch'"):
        xpcnn.Model.from_config(wrong)
    with pytest.raises(InputError, match=r"^Sequential.from_config: the configuration is of a "
                                         r"model whose layers branch .*: "
                                         r"xpcnn.Model.from_config copies it$"):
        xpcnn.Sequential.from_config(config)  # (was: "layer 1 ('add', Add) takes two or more
    # inputs, got 1")


def test_an_unbuilt_layer_called_on_a_batch_is_built_for_it_as_in_keras():
    """``Dense(3)(x)`` was refused until ``build``; Keras builds a layer at its first call.
    Built for the batch's per-sample shape, in float32, on its namespace and device, as
    ``build`` builds it (its own weights: each build outside a model draws its own); a merge
    layer for its inputs' shapes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 6, 3))
    for make, batch in ((lambda: Conv2D(4, 3, padding="same"), x),
                        (lambda: Conv2D(2, 3), (x * 40 + 100).astype(np.uint8)),
                        (lambda: Dense(5, activation="relu"), x.reshape(2, -1))):
        called, built = make(), make()
        y = called(batch)
        built.build(batch.shape[1:])
        built.set_weights(called.get_weights())
        assert called.built and called.input_shape == batch.shape[1:]
        assert called.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(y, built(batch))
    add = Add()
    assert add([x, x]).shape == x.shape and add.input_shape == (x.shape[1:], x.shape[1:])
    strict = Dense(2)
    out = strict(xs.asarray(x.reshape(2, -1)))
    assert isinstance(out, type(xs.asarray(0.0))) and strict.backend.xp is xs
    assert out.shape == (2, 2)


def test_assigning_a_functional_models_layers_is_refused():
    """f.layers = f.layers[:-1] was taken silently, and predict failed later with a bare
    "zip() argument 2 is longer than argument 1": a functional model's layers are its graph's
    (Keras' layers has no setter)."""
    inputs = xpcnn.Input((8, 8, 3))
    model = xpcnn.Model(inputs, Dense(4)(Flatten()(Conv2D(4, 3)(inputs))))
    layers = list(model.layers)
    for value in (layers[:-1], list(layers), None):
        with pytest.raises(InputError, match="layers are its graph's, not to change: build "
                                             r"another xpcnn.Model\(inputs, outputs\)"):
            model.layers = value
    assert list(model.layers) == layers
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    assert model.predict(x, verbose=0).shape == (2, 4)


def test_model_called_on_a_list_of_one_symbolic_tensor_takes_that_tensor():
    """``model([inp])`` said "x must hold real numbers ..., got dtype object"; as Keras for a
    one-input model it is ``model(inp)``; a list of two is refused by name; and
    ``model(x, training="yes")`` quoted the value as training=True."""
    from xpcnn.layers import Conv2D, ReLU

    inp = xpcnn.Input((8, 8, 3))
    base = xpcnn.Sequential([Conv2D(4, 3), ReLU()], input_shape=(8, 8, 3), seed=0)
    out = base([inp])
    assert out.shape[1:] == (6, 6, 4)
    model = xpcnn.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), base.predict(x, verbose=0))
    for bad in ((inp, inp), [inp, x]):
        with pytest.raises(InputError, match="takes one input tensor, got a"):
            base(bad)
    with pytest.raises(InputError, match="called with training='yes'"):
        base(x, training="yes")


def test_sequential_add_of_an_input_or_a_built_base_declares_the_input_as_in_keras():
    """Keras 3's ``model = Sequential(); model.add(Input(shape)); model.add(...)`` was refused
    ("add() expects an xpcnn layer, got a symbolic tensor"), and ``add(base)`` of a built base
    left the model unbuilt while ``Sequential([base, ...])`` was built. Both declare the input
    now: the model is built for it as layers follow; a layer it cannot take is refused, the
    model as it was."""
    model = xpcnn.Sequential()
    model.add(xpcnn.Input((4, 4, 1), name="img"))
    model.add(Flatten())
    model.add(Dense(3))
    assert model.built and model.input_shape == (None, 4, 4, 1) and model.input.name == "img"
    with pytest.raises(InputError, match="layer 'conv2d' \\(Conv2D\\) expects per-sample inputs"):
        model.add(Conv2D(2, 3))
    assert [type(la) for la in model.layers] == [Flatten, Dense] and model.built
    base = xpcnn.Sequential([Conv2D(2, 3), Flatten()], input_shape=(6, 6, 1))
    stacked = xpcnn.Sequential()
    stacked.add(base)
    stacked.add(Dense(2))
    assert stacked.built and stacked.input_shape == (None, 6, 6, 1)
    with pytest.raises(InputError, match="an xpcnn.Input\\(shape\\) is added first"):
        stacked.add(xpcnn.Input((6, 6, 1)))


def test_a_model_made_with_trainable_false_freezes_its_layers_as_in_keras():
    """Keras 3's Sequential(layers, trainable=False) and Model(inputs, outputs,
    trainable=False) (were: a TypeError): the layers given are frozen, as setting
    model.trainable = False freezes them; a layer added later is too (Keras' frozen model
    trains none of its layers)."""
    model = xpcnn.Sequential([Flatten(), Dense(3)], trainable=False)
    assert not model.trainable and not any(la.trainable for la in model.layers)
    model.add(Dense(2))
    assert not model.layers[-1].trainable and not model.trainable
    inputs = xpcnn.Input((4,))
    functional = xpcnn.Model(inputs, Dense(2)(inputs), trainable=False)
    assert not functional.trainable and functional.trainable_layers == []
    with pytest.raises(InputError, match="trainable must be True or False, got 'no'"):
        xpcnn.Sequential([Dense(2)], trainable="no")
