"""The model object's own API as Keras 3 has it: name and seed checked when set, in-place changes
of ``layers`` checked and refused as a whole, add() on a built model, an input declared before
any layer, from_config's defaults, a frozen model's later layers, and copying a model."""

import copy
import tracemalloc
import warnings

import numpy as np
import pytest

import xpcnn
from xpcnn.errors import InputError
from xpcnn.layers import BatchNorm2D, Conv2D, Dense, Flatten, GlobalAvgPool2D, ReLU, Softmax

X = np.random.default_rng(0).random((4, 6, 6, 1)).astype("float32")
Y = np.array([0, 1, 2, 0])


def trained() -> xpcnn.Sequential:
    model = xpcnn.Sequential([Conv2D(4, 3), ReLU(), Flatten(), Dense(3, name="d"), Softmax()],
                             seed=1)
    model.compile(optimizer="sgd")
    model.fit(X, Y, verbose=0)
    return model


@pytest.mark.parametrize("bad", ["", "  ", 7, ["m"]])
def test_a_models_name_set_later_is_checked_as_the_constructors(bad, tmp_path):
    """model.name = "" or 7 was taken, and save() then wrote a file load_model refused."""
    model = xpcnn.Sequential([Flatten(), Dense(3)], name="mine")
    with pytest.raises(InputError, match="model name must be a non-empty string, got"):
        model.name = bad
    assert model.name == "mine"
    model.name = None  # (the default, as the constructor's name=None)
    assert model.name == "sequential"
    model.name = "renamed"
    model.build((2, 2, 1))
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").name == "renamed"
    inputs = xpcnn.Input((3,))
    functional = xpcnn.Model(inputs, Dense(2)(inputs))
    functional.name = None
    assert functional.name == "model"


@pytest.mark.parametrize("bad", [True, 2.0, None, -1, "3"])
def test_a_models_seed_set_later_is_checked_as_the_constructors(bad):
    """model.seed = True saved a file that did not load; 2.0 or None failed in fit with a bare
    TypeError from NumPy."""
    model = xpcnn.Sequential([Flatten(), Dense(3)], seed=4)
    with pytest.raises(InputError, match="seed must be a non-negative integer, got"):
        model.seed = bad
    assert model.seed == 4


def test_a_numpy_integer_seed_is_taken_as_an_int(tmp_path):
    """model.seed = np.int64(3) trained, then save() refused it as not JSON."""
    model = xpcnn.Sequential([Flatten(), Dense(3)])
    model.seed = np.int64(3)
    assert type(model.seed) is int and model.seed == 3
    model.build((6, 6, 1))
    same = xpcnn.Sequential([Flatten(), Dense(3)], seed=3, input_shape=(6, 6, 1))
    for a, b in zip(model.get_weights(), same.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.save(tmp_path / "m.npz")
    assert xpcnn.load_model(tmp_path / "m.npz").seed == 3


@pytest.mark.parametrize("how", ["a string", "a name twice", "cannot be built there",
                                 "extend, a string last", "setitem"])
def test_an_in_place_change_of_layers_is_checked_and_refused_as_a_whole(how):
    """model.layers.append("x") was a bare AttributeError and left "x" in the list; a change
    refused (a name twice, a Dense on images) stayed, the trained model unbuilt."""
    model = trained()
    layers, weights = list(model.layers), model.get_weights()
    change = {"a string": lambda: model.layers.append("x"),
              "a name twice": lambda: model.layers.append(Dense(3, name="d")),
              "cannot be built there": lambda: model.layers.insert(0, Dense(3)),
              "extend, a string last": lambda: model.layers.extend([ReLU(), "x"]),
              "setitem": lambda: model.layers.__setitem__(1, Dense(5))}[how]
    with pytest.raises(InputError):
        change()
    assert list(model.layers) == layers and model.built
    assert [la.name for la in model.layers] == ["conv2d", "relu", "flatten", "d", "softmax"]
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.predict(X, verbose=0).shape == (4, 3)


def test_an_in_place_change_that_is_taken_builds_at_once():
    model = trained()
    model.layers.insert(4, Dense(3))
    assert model.built and model.layers[4].built and model.output_shape == (None, 3)
    assert model.layers.pop(4).name == "dense"
    assert len(model.layers) == 5 and model.built


@pytest.mark.parametrize("how", ["fit", "build"])
def test_add_on_a_built_model_builds_it_again_at_once(how):
    """add() on a built (trained) model left it unbuilt: model.weights read [] and summary,
    get_weights and count_params were refused, as Keras 3's add() is not."""
    model = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(3)], seed=1)
    model.compile()
    if how == "fit":
        model.fit(X, Y, verbose=0)
    else:
        model.build((6, 6, 1))
    weights = model.get_weights()
    model.add(ReLU())
    assert model.built and len(model.weights) == 4 and model.count_params() == 4 * 10 + 64 * 3 + 3
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.add(Dense(2))
    assert model.built and model.output_shape == (None, 2) and len(model.weights) == 6


def test_add_refused_on_a_built_model_leaves_it_as_it_was():
    model = trained()
    weights = model.get_weights()
    with pytest.raises(InputError, match="is not the last layer"):
        model.add(Dense(2))  # (after the final Softmax)
    assert len(model.layers) == 5 and model.built and model.output_shape == (None, 3)
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="named 'd'"):
        model.add(Dense(3, name="d"))
    assert len(model.layers) == 5 and model.built


@pytest.mark.parametrize("how", ["Input", "input_shape", "add(Input)"])
def test_an_input_declared_before_any_layer_as_in_keras(how):
    """Sequential([xpcnn.Input(shape)]) and Sequential(input_shape=shape) with no layers yet
    were refused ("the model has no layers"); Keras 3 takes them."""
    if how == "Input":
        model = xpcnn.Sequential([xpcnn.Input((6, 6, 1), name="pixels")])
    elif how == "input_shape":
        model = xpcnn.Sequential(input_shape=(6, 6, 1))
    else:
        model = xpcnn.Sequential()
        model.add(xpcnn.Input((6, 6, 1), name="pixels"))
    assert not model.built
    model.add(Flatten())
    assert model.built and model.input_shape == (None, 6, 6, 1)
    model.add(Dense(3))
    assert model.output_shape == (None, 3)
    if how != "input_shape":
        assert model.input.name == "pixels"


def test_a_second_input_is_refused_as_in_keras():
    """add(Input(a)) then add(Input(b)) silently replaced the first."""
    for model in (xpcnn.Sequential([xpcnn.Input((6, 6, 1))]),
                  xpcnn.Sequential(input_shape=(6, 6, 1))):
        with pytest.raises(InputError, match=r"already has its input, of shape \(6, 6, 1\)"):
            model.add(xpcnn.Input((4, 4, 1)))
        model.add(Flatten())
        assert model.input_shape == (None, 6, 6, 1)
    with pytest.raises(InputError, match="input_shape must be positive sizes"):
        xpcnn.Sequential(input_shape=(0, 3))


@pytest.mark.parametrize("what", ["summary", "count_params", "get_weights"])
def test_a_model_of_no_layers_yet_says_so_where_it_must_be_built(what):
    """Sequential([Input(shape)]).summary() said "must be built ... call build(input_shape)",
    though its input is declared (and build refuses a model of no layers). Unlike Keras 3,
    which builds such a model (0 parameters), xpcnn builds a model once it has a layer."""
    declared = xpcnn.Sequential([xpcnn.Input((4, 4, 3))])
    with pytest.raises(InputError, match=(
            rf"model 'sequential' has no layers yet: add\(\) some before {what} \(its input, "
            r"of shape \(4, 4, 3\), is declared: it is built as the first layer is added\)$")):
        getattr(declared, what)()
    with pytest.raises(InputError, match=rf"has no layers yet: add\(\) some before {what}$"):
        getattr(xpcnn.Sequential(), what)()
    assert declared.weights == []  # (as in Keras)
    declared.add(Flatten())
    assert declared.count_params() == 0


def test_layers_appended_to_a_model_with_an_input_declared_build_for_it():
    model = xpcnn.Sequential(input_shape=(6, 6, 1))
    model.layers.append(Flatten())
    assert model.built and model.output_shape == (None, 36)


def test_a_subclass_build_runs_for_the_builds_xpcnn_makes_as_keras_calls_its_hook():
    """A subclass's build, Keras' hook, was skipped by the builds xpcnn makes itself (the
    first data's, input_shape=, add()); they pass the batch's shape, None in front."""
    calls = []

    class Hooked(xpcnn.Sequential):
        def build(self, input_shape=None):
            calls.append(input_shape)
            super().build(input_shape)

    model = Hooked([Dense(2)])
    model.compile(optimizer="sgd")
    model.fit(np.zeros((8, 4), "float32"), np.zeros(8, int), epochs=1, verbose=0)
    declared = Hooked([Dense(2)], input_shape=(4,))
    assert calls == [(None, 4), (None, 4)]
    declared.add(Dense(3))
    assert calls[2:] == [(None, 4)] and declared.output_shape == (None, 3)


@pytest.mark.parametrize("cls", [xpcnn.Sequential, xpcnn.Model])
@pytest.mark.parametrize("key", ["name", "seed", "dtype", "input_shape", "layers"])
def test_from_config_takes_the_constructors_defaults_for_missing_keys(cls, key):
    """from_config without name, seed or dtype was a bare KeyError."""
    source = xpcnn.Sequential([Conv2D(3, 3), Flatten(), Dense(2)], seed=5, name="src",
                              input_shape=(5, 5, 1))
    config = {k: v for k, v in source.get_config().items() if k != key}
    if key == "layers":
        with pytest.raises(InputError, match="the configuration: .*layers"):
            cls.from_config(config)
        return
    model = cls.from_config(config)
    assert model.name == {"name": cls._default_name}.get(key, "src")
    assert model.seed == (0 if key == "seed" else 5)
    assert model.dtype_name == "float32"
    assert model.built == (key != "input_shape")
    if key not in ("seed", "input_shape"):
        for a, b in zip(source.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["constructor", "setter"])
def test_a_frozen_model_freezes_the_layers_added_later_as_keras_trains_none(how):
    """Sequential([...], trainable=False) then add(Dense(2)): model.trainable read True again
    and fit trained the new Dense, where Keras 3's frozen model trains none of its weights."""
    x = np.random.default_rng(0).random((8, 2, 2, 1)).astype("float32")
    y = np.arange(8) % 2
    if how == "constructor":
        model = xpcnn.Sequential([Flatten(), Dense(4)], seed=0, trainable=False)
    else:
        model = xpcnn.Sequential([Flatten(), Dense(4)], seed=0)
        model.trainable = False
    model.add(Dense(2))
    model.layers.append(ReLU())
    assert not model.trainable and not any(la.trainable for la in model.layers)
    model.compile(optimizer="sgd")
    model.build((2, 2, 1))
    assert model.trainable_weights == []
    before = model.get_weights()
    model.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.trainable = True  # (unfrozen: layers added now train)
    model.add(Dense(2))
    assert model.trainable and all(la.trainable for la in model.layers)


def test_a_frozen_model_trains_no_layer_unfrozen_after_it_as_in_keras():
    """model.trainable = False, then a layer's flag set True: the model's own flag masks it,
    as Keras 3's (was: model.trainable read True again, and fit trained that layer). The
    layer's own flag reads True; trainable_weights is empty; fit changes no weight; layers
    added meanwhile are frozen; model.trainable = True unfreezes every layer."""
    x = np.random.default_rng(0).random((8, 2, 2, 1)).astype("float32")
    y = np.arange(8) % 2
    model = xpcnn.Sequential([Flatten(), Dense(4), Dense(2)], seed=0, trainable=False)
    model.layers[-1].trainable = True
    model.compile(optimizer="adam")
    model.build((2, 2, 1))
    assert not model.trainable and model.layers[-1].trainable
    assert model.trainable_weights == [] and model.trainable_layers == []
    assert len(model.non_trainable_weights) == 4
    before = model.get_weights()
    model.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.add(Dense(2))
    assert not model.layers[-1].trainable and not model.trainable
    model.trainable = True
    assert all(la.trainable for la in model.layers) and len(model.trainable_weights) == 6
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(before[0], model.get_weights()[0])
    empty = xpcnn.Sequential(trainable=False)
    empty.add(Dense(2))
    assert not empty.layers[0].trainable
    assert xpcnn.Sequential().trainable is True  # (its own flag, as Keras')
    every = xpcnn.Sequential([Dense(2, trainable=False)])
    assert every.trainable and every.trainable_layers == []  # (Keras' reads True too)
    default = xpcnn.Sequential()
    default.add(Dense(2))
    assert default.layers[0].trainable
    # A BatchNorm2D unfrozen itself still moves its statistics in a frozen model, as Keras 3's
    # (it reads its own flag); no trainable weight is updated, and summary does not mark it
    # frozen (was: marked frozen, while fit moved its statistics).
    bn = xpcnn.Sequential([BatchNorm2D(), Flatten(), Dense(2)], input_shape=(2, 2, 1), seed=0,
                          trainable=False)
    bn.layers[0].trainable = True
    bn.compile(optimizer="sgd")
    assert bn.trainable_weights == [] and len(bn.non_trainable_weights) == 6
    before = bn.get_weights()
    bn.fit(x, y, epochs=1, verbose=0)
    kept = [np.array_equal(a, b) for a, b in zip(before, bn.get_weights(), strict=True)]
    assert kept == [True, True, False, False, True, True]  # (gamma, beta, mean, variance...)
    lines: list[str] = []
    bn.summary(print_fn=lines.append, show_trainable=True)
    rows = {line.split()[0]: line for line in lines}
    assert "frozen" not in rows["batchnorm2d"] and rows["batchnorm2d"].rstrip().endswith("Y")
    assert "dense (Dense) frozen" in rows["dense"] and rows["dense"].rstrip().endswith("N")
    assert "Trainable params: 0" in lines


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("api", ["sequential", "functional", "alone"])
def test_a_models_flag_sets_that_of_a_base_added_whole_as_keras_sets_a_nested_models(flag, api):
    """outer.trainable = True left a base frozen as a whole with its own flag False (its
    layers' True), so base.fit trained nothing; Keras' setter sets a nested model's too,
    whether added to a Sequential or called in a functional model (was: only the former);
    Sequential([base]) and base each hold the other's layers whole: both set, once."""
    base = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3), Dense(3)], seed=0)
    base.trainable = not flag
    if api == "functional":
        inputs = xpcnn.Input((4,))
        outer = xpcnn.Model(inputs, Dense(2)(base(inputs)))
    else:
        outer = xpcnn.Sequential([base] if api == "alone" else [base, Dense(2)])
    outer.trainable = not flag
    outer.trainable = flag
    assert outer.trainable is flag and base.trainable is flag
    assert all(la.trainable is flag for la in base.layers)
    assert len(base.trainable_weights) == (4 if flag else 0)
    assert base.trainable_layers == (list(base.layers) if flag else [])
    x = np.random.default_rng(0).random((8, 4)).astype("float32")
    base.compile(optimizer="sgd")
    before = base.get_weights()
    base.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    assert flag != np.array_equal(before[0], base.get_weights()[0])


def test_a_frozen_base_unfrozen_in_part_trains_that_part_inside_another_model_as_keras():
    """Inside another model only that model's own flag counts, with the layers' (Keras 3
    trains a layer of a frozen base unfrozen since); the base's own flag masks them where the
    base itself trains, and its summary marks them frozen."""
    base = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3), Dense(3)])
    base.trainable = False
    base.layers[0].trainable = True
    outer = xpcnn.Sequential([base, Dense(2)])
    assert outer.trainable and outer.trainable_layers == [base.layers[0], outer.layers[-1]]
    assert base.trainable_layers == [] and not base.trainable
    lines: list[str] = []
    base.summary(print_fn=lines.append)
    assert "dense (Dense) frozen" in "\n".join(lines)


def test_copying_a_model_is_refused_naming_the_ways_to_copy_one():
    model = trained()
    with pytest.raises(InputError, match=r"type\(model\)\.from_config\(model\.get_config\(\)\) "
                                         r"then set_weights\(model\.get_weights\(\)\)"):
        copy.deepcopy(model)
    second = type(model).from_config(model.get_config())
    second.set_weights(model.get_weights())
    np.testing.assert_allclose(second.predict(X, verbose=0), model.predict(X, verbose=0))


def test_a_model_frozen_as_a_whole_keeps_its_own_flag_in_files_and_configurations(tmp_path):
    """The model's own flag, False while a layer's own is True, is written (get_config's
    "trainable": false) and read back by from_config and load_model (was: lost, so the
    loaded model trained that layer)."""
    model = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3), Dense(2)], trainable=False)
    model.layers[-1].trainable = True
    assert model.get_config()["trainable"] is False
    model.save(tmp_path / "m.npz")
    for copied in (xpcnn.load_model(tmp_path / "m.npz"),
                   xpcnn.Sequential.from_config(model.get_config())):
        assert not copied.trainable and [la.trainable for la in copied.layers] == [False, True]
        assert copied.trainable_weights == []
    assert "trainable" not in xpcnn.Sequential([xpcnn.Input((4,)), Dense(2)]).get_config()


def test_images_of_another_size_name_the_build_that_keeps_the_weights():
    """A model of convolutions and global pooling given images of another size: the error
    says that model.build((None, 8, 8, 2)) rebuilds it keeping its weights, and it does; not
    where a Flatten's Dense would need other weights. Input((None, None, 2)) says that inputs
    have fixed sizes and how to take others."""
    from xpcnn.layers import GlobalAvgPool2D

    model = xpcnn.Sequential([xpcnn.Input((5, 5, 2)), Conv2D(3, 3, padding="same"),
                              GlobalAvgPool2D(), Dense(2)])
    big = np.ones((2, 8, 8, 2), "float32")
    with pytest.raises(InputError, match=r"expects \(5, 5, 2\) .*: model.build\(\(None, 8, 8, "
                                         r"2\)\) rebuilds it for these images, keeping its "
                                         r"weights$"):
        model.predict(big, verbose=0)
    weights = model.get_weights()
    assert model.input_shape == (None, 5, 5, 2)  # (the hint built nothing)
    model.build((None, 8, 8, 2))
    for a, b in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.predict(big, verbose=0).shape == (2, 2)
    flat = xpcnn.Sequential([xpcnn.Input((5, 5, 2)), Conv2D(3, 3), Flatten(), Dense(2)])
    with pytest.raises(InputError, match=r"expects \(5, 5, 2\) .*= \(2, 8, 8, 2\)$"):
        flat.predict(big, verbose=0)
    with pytest.raises(InputError, match=r"got \(None, None, 2\): xpcnn's inputs have fixed "
                                         r"sizes, where Keras' None takes any; .*model.build"):
        xpcnn.Input((None, None, 2))


def test_large_images_get_no_weights_drawn_for_the_build_hint_nor_the_output_shape():
    """A model of (8, 8, 1) images given a 512x512 one: its InputError's hint was decided on
    copies of every layer built for it, drawing a 1M x 64 Dense kernel (768 MB, 3 s; larger
    images could be killed by the OS); so did compute_output_shape. Now the walk stops at the
    first layer whose weights would change, before building it, and a Dense's copy is built
    for one feature. The hint still appears where the weights keep their shapes."""
    flat = xpcnn.Sequential([Conv2D(4, 3, padding="same"), Flatten(), Dense(64)],
                            input_shape=(8, 8, 1))
    pooled = xpcnn.Sequential([Conv2D(4, 3, padding="same"), GlobalAvgPool2D(), Dense(64)],
                              input_shape=(8, 8, 1))
    big = np.zeros((1, 512, 512, 1), "float32")
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"expects \(8, 8, 1\) .*= \(1, 512, 512, 1\)$"):
            flat.predict(big, verbose=0)
        assert flat.compute_output_shape((None, 512, 512, 1)) == (None, 64)
        with pytest.raises(InputError, match=r"model.build\(\(None, 512, 512, 1\)\) rebuilds it "
                                             r"for these images, keeping its weights$"):
            pooled.predict(big, verbose=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert flat.input_shape == pooled.input_shape == (None, 8, 8, 1)


def test_summary_takes_keras_keywords_it_can_honour_and_refuses_the_others_by_name():
    """Keras' summary(line_length=80, expand_nested=True, show_trainable=True) (was: a bare
    TypeError): the table is line_length wide, with a Trainable column; positions and
    layer_range are refused naming what instead, an unknown keyword naming those taken."""
    model = xpcnn.Sequential([xpcnn.Input((4,)), Dense(3, trainable=False), Dense(2)])
    lines: list[str] = []
    model.summary(print_fn=lines.append, line_length=80, expand_nested=True, show_trainable=True)
    assert lines[1] == "-" * 80 and "Trainable" in lines[2]
    assert lines[4].rstrip().endswith("N") and lines[5].rstrip().endswith("Y")
    with pytest.raises(InputError, match=r"summary\(positions=\[0.3, 0.6, 1.0\]\): Keras' "
                                         r"keyword, which xpcnn's summary takes only as None: "
                                         r"its columns"):
        model.summary(positions=[0.3, 0.6, 1.0])
    with pytest.raises(InputError, match=r"summary\(layer_range=.*model.get_layer\(name\)"):
        model.summary(layer_range=["dense", "dense_1"])
    with pytest.raises(InputError, match=r"summary\(colour=1\): summary takes print_fn, "
                                         r"line_length"):
        model.summary(colour=1)
    with pytest.raises(InputError, match="summary line_length must be"):
        model.summary(line_length=0)


def test_build_without_a_shape_builds_for_the_input_declared():
    """Keras' model.build() (was: a bare TypeError): for the input declared (an Input,
    input_shape=) or built for; a model with neither is told what to pass."""
    declared = xpcnn.Sequential([Dense(2)], input_shape=(4,))
    declared.build()
    assert declared.input_shape == (None, 4)
    added = xpcnn.Sequential()
    added.add(xpcnn.Input((4,)))
    added.add(Dense(2))
    weights = added.get_weights()
    added.build()
    np.testing.assert_array_equal(weights[0], added.get_weights()[0])
    unknown = xpcnn.Sequential([Dense(2)])
    with pytest.raises(InputError, match=r"build\(\) has no input shape to build for: .*pass "
                                         r"the per-sample shape"):
        unknown.build()
    assert not unknown.built


def test_compute_output_shape_neither_builds_nor_changes_the_model():
    """Keras 3's model.compute_output_shape (was: an AttributeError): the batch axis first,
    kept; worked out on copies for a shape the model is not built for."""
    model = xpcnn.Sequential([Flatten(), Dense(2)])
    assert model.compute_output_shape((None, 4)) == (None, 2) and not model.built
    model.build((6, 6, 1))
    weights = model.get_weights()
    assert model.compute_output_shape((8, 6, 6, 1)) == (8, 2)
    assert model.compute_output_shape((None, 3, 3, 1)) == (None, 2)
    assert model.input_shape == (None, 6, 6, 1)
    np.testing.assert_array_equal(weights[0], model.get_weights()[0])
    with pytest.raises(InputError, match=r"compute_output_shape takes the input batch's shape, "
                                         r"its batch axis first"):
        model.compute_output_shape(4)


def test_build_warns_where_a_flatten_first_takes_a_batch_size_as_part_of_each_sample():
    """Keras' build((8, 5, 5, 1)) is a batch of 8; with a Flatten first xpcnn takes (8, 5, 5,
    1) as each sample: it warns, naming the shapes to use; not for (None, 8, 5, 5, 1), nor a
    declared input or the first data of that shape."""
    model = xpcnn.Sequential([Flatten(), Dense(2)])
    with pytest.warns(UserWarning, match=r"build\(\(8, 5, 5, 1\)\) builds it for samples of "
                                         r"shape \(8, 5, 5, 1\).*a Flatten.*if 8 is a batch "
                                         r"size .*\(5, 5, 1\) or \(None, 5, 5, 1\)"):
        model.build((8, 5, 5, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xpcnn.Sequential([Flatten(), Dense(2)]).build((None, 8, 5, 5, 1))
        declared = xpcnn.Sequential([xpcnn.Input((8, 5, 5, 1)), Flatten()])
        declared.add(Dense(2))
        data = xpcnn.Sequential([Flatten(), Dense(2)])
        data.predict(np.zeros((2, 8, 5, 5, 1), "float32"), verbose=0)
