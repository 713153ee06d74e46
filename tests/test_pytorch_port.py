"""A PyTorch user's port, line by line: PyTorch's habits (channels-first shapes, positional
layer signatures, torch Parameters, optimisers given the parameters, a loss called in
PyTorch's order) are warned of or refused naming both ways, never taken silently."""

import re
import warnings

import numpy as np
import pytest

import xpcnn
from xpcnn import checks, optim
from xpcnn.errors import InputError
from xpcnn.layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    Normalization,
)
from xpcnn.losses import SoftmaxCrossEntropy

try:  # (the suite runs without PyTorch too: the tests of its tensors skip there)
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

_NCHW = r"\(3, 8, 8\), which looks like channels-first images \(C, H, W\), as PyTorch keeps them"


def _head() -> list:
    return [Conv2D(4, 3, padding="same"), GlobalAvgPool2D(), Dense(2)]


def _channels_first_warnings(make) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make()
    return [str(w.message) for w in seen if "channels-first" in str(w.message)
            and issubclass(w.category, UserWarning)]


# -- 1. a channels-first input shape declared ------------------------------------------------

def _via_input():
    m = xpcnn.Sequential()
    m.add(xpcnn.Input((3, 8, 8)))
    for la in _head():
        m.add(la)  # (one warning, not one an add)
    return m


def _via_functional():
    x = xpcnn.Input((3, 8, 8))
    h = x
    for la in _head():
        h = la(h)
    return xpcnn.Model(x, h)


@pytest.mark.parametrize("make", [
    _via_input, _via_functional,
    lambda: xpcnn.Sequential(_head(), input_shape=(3, 8, 8)),
    lambda: xpcnn.Sequential(_head()).build((None, 3, 8, 8)),
], ids=["add_Input", "functional_Input", "input_shape", "build"])
def test_a_declared_channels_first_shape_warns_as_first_data_does(make):
    said = _channels_first_warnings(make)
    assert len(said) == 1, said
    assert "input of model" in said[0] and "(3, 8, 8), which looks like" in said[0]
    assert "Declare (8, 8, 3)" in said[0] and "x.transpose(0, 2, 3, 1)" in said[0]


def test_first_data_warns_once_and_a_filter_covers_both_warnings():
    x, y = np.zeros((4, 3, 8, 8), np.float32), np.arange(4) % 2
    model = xpcnn.Sequential(_head())
    model.compile(optimizer="sgd")
    said = _channels_first_warnings(lambda: model.fit(x, y, verbose=0))
    assert len(said) == 1 and said[0].startswith("xpcnn: x has per-sample shape")
    with warnings.catch_warnings():  # (one filter, the same text, the same class)
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*" + _NCHW, category=UserWarning)
        xpcnn.Sequential(_head(), input_shape=(3, 8, 8))
        xpcnn.Sequential(_head()).predict(x, verbose=0)


def test_a_channels_last_shape_builds_without_a_warning():
    assert not _channels_first_warnings(lambda: xpcnn.Sequential(_head(), input_shape=(8, 8, 3)))
    assert not _channels_first_warnings(lambda: xpcnn.Sequential(_head(), input_shape=(28, 28, 1)))


def test_a_saved_channels_first_model_warns_when_declared_not_at_each_load(tmp_path):
    """(was: load_model and from_config warned again, every time)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = xpcnn.Sequential(_head(), input_shape=(3, 8, 8))
    model.compile(optimizer="sgd")
    model.save(tmp_path / "m.npz")
    assert not _channels_first_warnings(lambda: xpcnn.load_model(tmp_path / "m.npz"))
    assert not _channels_first_warnings(lambda: xpcnn.Sequential.from_config(model.get_config()))
    assert len(_channels_first_warnings(lambda: xpcnn.Sequential(_head(), input_shape=(3, 8, 8)))
               ) == 1  # (declared anew: still warned)


@pytest.mark.parametrize("layer, what", [(Conv2D(32, 3), "a 3x3 kernel"),
                                         (MaxPool2D(2), "a \\(2, 2\\) pool")])
def test_a_window_that_does_not_fit_a_channels_first_input_says_so(layer, what):
    model = xpcnn.Sequential()
    model.add(xpcnn.Input((1, 28, 28)))
    with pytest.raises(InputError, match=what + r".* does not fit an input of 1x28: is the input "
                       r"channels-first, \(C, H, W\) as PyTorch keeps images\? .* declare "
                       r"\(28, 28, 1\)"):
        model.add(layer)


# -- 2. PyTorch's positional layer signatures ------------------------------------------------

def test_conv2d_in_pytorchs_order_warns_naming_both_orders():
    with pytest.warns(UserWarning, match=r"Conv2D\(3, 6, 5\) makes 3 filters of 6x6 at stride 5: "
                      r"PyTorch's order, nn.Conv2d\(in_channels, out_channels, kernel_size, "
                      r"stride\)\? xpcnn's is Conv2D\(filters, kernel_size, strides, padding\)"
                      r".* nn.Conv2d\(3, 6, 5\) is Conv2D\(6, 5\)"):
        Conv2D(3, 6, 5)
    for port in [(3, 16, 3), (1, 32, 3), (64, 128, 3), (6, 16, 5)]:
        with pytest.warns(UserWarning, match="PyTorch's order"):
            Conv2D(*port)


def test_common_strided_convolutions_build_without_a_warning():
    """ResNet's and MobileNet's stems, AlexNet's first layer, ConvNeXt's and a ViT's patches,
    a downsampling conv of a small net."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for args in [(64, 7, 2), (32, 3, 2), (96, 11, 4), (96, 4, 4), (768, 16, 16), (8, 3, 2),
                     (2, 3, 2), (16, 2, 2), (64, 3, 1), (1, 3), (3, 1)]:
            Conv2D(*args)


def test_conv2d_by_keywords_or_loaded_does_not_warn_of_pytorchs_order(tmp_path):
    """Only filters, kernel_size and strides all positional are PyTorch's habit (was: keyword
    calls, load_model, from_config and copies of Conv2D(8, 8, 4) warned too)."""
    with pytest.warns(UserWarning, match="PyTorch's order"):
        model = xpcnn.Sequential([Conv2D(8, 8, 4), GlobalAvgPool2D(), Dense(2)],
                                 input_shape=(16, 16, 1))
    model.compile(optimizer="sgd")
    model.save(tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Conv2D(6, 7, strides=2)
        Conv2D(filters=6, kernel_size=7, strides=2)
        xpcnn.load_model(tmp_path / "m.npz")
        xpcnn.Sequential.from_config(model.get_config())
        model.layers[0].unbuilt_copy()


def test_a_conv2d_kernel_too_large_names_pytorchs_order():
    model = xpcnn.Sequential()
    model.add(xpcnn.Input((28, 28, 1)))
    with pytest.warns(UserWarning), pytest.raises(
            InputError, match=r"a 32x32 kernel .* does not fit an input of 28x28: PyTorch's order, "
                              r"nn.Conv2d\(in_channels, out_channels, kernel_size, stride\)\?"):
        model.add(Conv2D(1, 32, 3))
    with pytest.raises(InputError, match=r"Conv2D\(64, 3, 1, 1, 1\): Keras' order, .*reads "
                                         r".*data_format=1; .*\. PyTorch's order, nn.Conv2d\("):
        Conv2D(64, 3, 1, 1, 1)  # (nn.Conv2d(64, ?, 3, 1, 1)'s stride and padding)


def test_a_too_large_window_hints_only_where_the_hint_can_be_the_cause():
    """(was: "PyTorch's order?" for Keras' Conv2D(64, 5) on a 4x4 map, and "channels-first?"
    for a model's feature map of (3, 7, 64)): PyTorch's order only for no more filters than
    the kernel is wide, channels-first only for the model's input."""
    model = xpcnn.Sequential([Conv2D(8, 3, 2, padding="same")], input_shape=(8, 8, 3))
    with pytest.raises(InputError, match=r"does not fit an input of 4x4$"):
        model.add(Conv2D(64, 5))
    model = xpcnn.Sequential([Conv2D(64, 1, 2)], input_shape=(6, 14, 3))  # (then (3, 7, 64))
    with pytest.raises(InputError, match=r"does not fit an input of 3x7$"):
        model.add(Conv2D(16, 5))
    with pytest.raises(InputError, match=r"does not fit an input of 3x7$"):
        Conv2D(16, 5)(Conv2D(64, 1, 2)(xpcnn.Input((6, 14, 3))))
    with pytest.raises(InputError, match=r"does not fit an input of 1x28: is the input "
                                         r"channels-first"):
        Conv2D(16, 5)(xpcnn.Input((1, 28, 28)))


def test_dense_and_batchnorm_in_pytorchs_order_name_both_orders():
    with pytest.raises(InputError, match=r"Dense\(9216, 128\): a number where xpcnn takes an "
                                         r"activation's name: PyTorch's order, nn.Linear\("
                                         r"in_features, out_features\)\? xpcnn's is Dense\(units, "
                                         r"activation\).*: Dense\(128\)$"):
        Dense(9216, 128)
    with pytest.raises(InputError, match=r"BatchNorm2D\(64\): PyTorch's nn.BatchNorm2d\("
                                         r"num_features\)\? xpcnn infers the number of features "
                                         r".*: BatchNorm2D\(\)$"):
        BatchNorm2D(64)
    with pytest.raises(InputError, match=r"BatchNorm2D\(64\): .*: BatchNorm2D\(eps=0.001\)$"):
        BatchNorm2D(64, 1e-3)  # (nn.BatchNorm2d(64, 1e-3): its eps kept; was: BatchNorm2D())
    with pytest.raises(InputError, match=r"momentum must be in \[0, 1\], got 1.5$"):
        BatchNorm2D(1.5)
    # (Keras' BatchNormalization(-1, 0.99): its axis first, named so)
    with pytest.raises(InputError, match=r"got -1; BatchNorm2D\(-1, \.\.\.\) is Keras' order, "
                                         r"whose first argument is the axis: .*\(Keras' "
                                         r"momentum=0.99 is xpcnn's 0.01\)$"):
        BatchNorm2D(-1, 0.99)
    # (nn.BatchNorm2d(1), one channel: taken, a momentum of 1 being one, but said; was only
    # the warning of Keras' momentum, review h8 2)
    with pytest.warns(RuntimeWarning, match=r"Keras' momentum=0.99.*BatchNorm2D\(1\): "
                                            r"PyTorch's nn.BatchNorm2d\(num_features\) of one "
                                            r"channel\? xpcnn infers the number of features "
                                            r"from the input: BatchNorm2D\(\)$"):
        assert BatchNorm2D(1).momentum == 1
    with pytest.warns(RuntimeWarning) as said:
        BatchNorm2D(1.0)
    assert "nn.BatchNorm2d" not in str(said[0].message)
    assert BatchNorm2D(0).momentum == 0


# -- 3. torch Parameters as weights ----------------------------------------------------------

def _small():
    model = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(3)], input_shape=(6, 6, 1),
                             dtype="float64")
    return model


@needs_torch
@pytest.mark.filterwarnings("ignore:.*nn.Flatten orders")  # (its order: another test's)
def test_torch_parameters_are_taken_as_weights():
    model = _small()
    new = [np.random.default_rng(k).standard_normal(w.shape) for k, w in
           enumerate(model.get_weights())]
    params = [torch.nn.Parameter(torch.tensor(w)) for w in new]  # (requires_grad, as torch's)
    model.set_weights(params)
    for got, want in zip(model.get_weights(), new, strict=True):
        np.testing.assert_array_equal(got, want)
    model.layers[0].set_weights([p * 2 for p in params[:2]])
    np.testing.assert_array_equal(model.layers[0].get_weights()[0], 2 * new[0])
    model.weights[0].assign(params[0])
    np.testing.assert_array_equal(model.get_weights()[0], new[0])
    with pytest.raises(InputError, match=r"weight 'bias' must be an array NumPy can read, got a "
                                         r"Tensor .*BFloat16.*: pass t.float\(\)$"):
        model.weights[1].assign(torch.zeros(4, dtype=torch.bfloat16))


@needs_torch
@pytest.mark.filterwarnings("ignore:.*nn.Flatten orders")  # (its order: another test's)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_tensors_set_as_weights_are_copied_not_aliased(dtype):
    """A CPU tensor's NumPy read is a view of it: the weights copy it, so that a change of
    the tensor after set_weights / assign changes no weight, and training changes no tensor."""
    model = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(3)], input_shape=(6, 6, 1),
                             dtype=dtype)
    tdt = getattr(torch, dtype)
    params = [torch.nn.Parameter(torch.ones(w.shape, dtype=tdt)) for w in model.get_weights()]
    model.set_weights(params)
    with torch.no_grad():
        params[0].mul_(5)
    assert float(model.get_weights()[0].ravel()[0]) == 1.0
    bias = torch.ones(4, dtype=tdt)
    model.layers[0].set_weights([torch.ones(3, 3, 1, 4, dtype=tdt), bias])
    bias.mul_(7)
    assert float(model.layers[0].get_weights()[1][0]) == 1.0
    bias = torch.zeros(4, dtype=tdt)
    model.weights[1].assign(bias)
    bias.add_(9)
    assert float(model.get_weights()[1][0]) == 0.0
    bias.zero_()
    model.compile(optimizer="sgd")
    x = np.random.default_rng(0).standard_normal((8, 6, 6, 1)).astype(dtype)
    model.fit(x, np.arange(8) % 3, verbose=0)
    assert not bool(bias.any()) and float(np.abs(model.get_weights()[1]).max()) > 0


@needs_torch
def test_a_state_dicts_weights_in_pytorchs_layout_are_refused_saying_how_to_convert():
    """(was: only "must have shape (3, 3, 2, 4), got (4, 2, 3, 3)"); a square Linear weight
    cannot be told from its transpose (README says so)."""
    model = xpcnn.Sequential([Conv2D(4, 3), Flatten(), Dense(3)], input_shape=(6, 6, 2))
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
                                      torch.nn.Linear(64, 3))
    state = list(torch_model.state_dict().values())
    with pytest.raises(InputError, match=r"must have shape \(3, 3, 2, 4\), got \(4, 2, 3, 3\): "
                                         r"PyTorch's nn.Conv2d layout.* "
                                         r"weight.permute\(2, 3, 1, 0\)"):
        model.set_weights(state)
    state[0] = state[0].permute(2, 3, 1, 0)
    with pytest.raises(InputError, match=r"must have shape \(64, 3\), got \(3, 64\): PyTorch's "
                                         r"nn.Linear layout.* weight.T$"):
        model.set_weights(state)
    state[2] = state[2].T
    with pytest.warns(UserWarning, match=r"nn.Flatten orders"):  # (its columns' order)
        model.set_weights(state)  # (in xpcnn's layout; Flatten's order aside)
    np.testing.assert_array_equal(model.get_weights()[0], state[0].detach().numpy())


@needs_torch
def test_batchnorms_num_batches_tracked_is_dropped_by_set_weights():
    """A state_dict's values keep BatchNorm's num_batches_tracked (a 0-d int64) after its
    running_var: dropped there by the model's and the layer's set_weights, as the README says
    (was: refused by count, the error not naming it); any other count is still refused, one
    integer scalar out of its place named."""
    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                             torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    for i, bn in ((1, tm[1]), (3, tm[3])):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(1, 2), bn.weight.data.add_(i)
    model = xpcnn.Sequential([Conv2D(4, 3), BatchNorm2D(), Conv2D(2, 1), BatchNorm2D()],
                             input_shape=(8, 8, 3))
    values = [v.permute(2, 3, 1, 0) if v.ndim == 4 else v for v in tm.state_dict().values()]
    assert len(values) == len(model.get_weights()) + 2
    model.set_weights(values)
    want = [v.numpy() for v in values if v.ndim]
    for got, w in zip(model.get_weights(), want, strict=True):
        np.testing.assert_array_equal(got, w)
    tm[3].weight.data.mul_(3)
    model.layers[3].set_weights(list(tm[3].state_dict().values()))  # (the layer's own too)
    np.testing.assert_array_equal(model.layers[3].get_weights()[0], tm[3].weight.detach())

    with pytest.raises(InputError, match=r"expects 12 arrays .*got 14 \(1 num_batches_tracked "
                                         r"dropped\)$"):
        model.set_weights(values[:-1] + [values[-2]])  # (one array too many, not the counter)
    misplaced = [np.array(3)] + [v for v in values if v.ndim]
    with pytest.raises(InputError, match=r"got 13; array 0 is a 0-d integer, as PyTorch "
                                         r"BatchNorm's num_batches_tracked: .*remove it"):
        model.set_weights(misplaced)
    with pytest.raises(InputError, match=r"expects 4 weight arrays .*got 5; array 0 is a 0-d"):
        model.layers[1].set_weights([np.array(5), *model.layers[1].get_weights()])
    with pytest.raises(InputError, match=r"expects 4 weight arrays .*got 3$"):
        model.layers[1].set_weights(model.layers[1].get_weights()[:3])


class _Steps(xpcnn.layers.Layer):
    """A user's layer with a scalar weight, which a 0-d integer may set."""

    weight_names = ("steps",)

    def _build(self, input_shape, rng):
        self._param("steps", np.zeros(()), trainable=False)
        return input_shape

    def forward(self, x, training=False, options=None):
        return x


class _CountingBatchNorm(BatchNorm2D):
    weight_names = (*BatchNorm2D.weight_names, "steps")

    def _build(self, input_shape, rng):
        shape = super()._build(input_shape, rng)
        self._param("steps", np.zeros(()), trainable=False)
        return shape


def test_a_scalar_weight_after_a_moving_variance_is_kept_where_the_count_fits():
    """A 0-d integer right after a moving_variance is dropped as num_batches_tracked only
    where the list does not fit as given and fits without it: a user's scalar weight there,
    in a list of the right count, is set (was: dropped, the list then refused one short),
    by the model's set_weights and by the layer's."""
    model = xpcnn.Sequential([Conv2D(2, 3), BatchNorm2D(), _Steps()], input_shape=(5, 5, 1))
    values = model.get_weights()
    model.set_weights([*values[:-1], np.array(7)])
    assert model.layers[2].get_weights()[0] == 7
    model.set_weights([*values[:-1], np.array(7), np.array(8)])  # (a state_dict's: dropped)
    assert model.layers[2].get_weights()[0] == 8
    with pytest.raises(InputError, match=r"expects 7 arrays .*got 9 \(1 num_batches_tracked "
                                         r"dropped\)$"):  # (fits neither way: the hint kept)
        model.set_weights([*values[:-1], np.array(7), np.array(8), np.array(9)])
    layer = _CountingBatchNorm()
    layer.build((4, 4, 2))
    layer.set_weights([*layer.get_weights()[:4], np.array(5)])
    assert layer.get_weights()[4] == 5
    layer.set_weights([*layer.get_weights()[:4], np.array(6), np.array(9)])  # (a state_dict's)
    assert layer.get_weights()[4] == 9


@needs_torch
def test_normalization_takes_torch_parameters():
    layer = Normalization(mean=torch.nn.Parameter(torch.tensor([0.5, 1.0, 2.0])),
                          std=torch.nn.Parameter(torch.tensor([2.0, 4.0, 0.5])))
    assert layer.mean == [0.5, 1.0, 2.0] and layer.std == [2.0, 4.0, 0.5]


# -- 4. optimisers made PyTorch's way --------------------------------------------------------

@pytest.mark.parametrize("params", [
    lambda m: m.trainable_weights, lambda m: iter(m.trainable_weights),
    lambda m: (w for w in m.trainable_weights), lambda m: [{"params": m.trainable_weights}],
], ids=["list", "iterator", "generator", "param_groups"])
@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop])
def test_an_optimiser_given_the_parameters_is_refused_clearly(cls, params):
    name = cls.__name__
    with pytest.raises(InputError, match=rf"^{name}\(...\) was given \w+ as its first argument, "
                                         rf"the learning rate: PyTorch's order, torch.optim."
                                         rf"{name}\(params, lr\)\? compile binds the model's "
                                         r"parameters to the optimiser: pass the rate"):
        cls(params(_small()), lr=0.001)


@pytest.mark.parametrize("make, match", [
    (lambda: optim.Adam(lr=1e-3, betas=(0.8, 0.99)),
     r"^Adam\(betas=\(0.8, 0.99\)\): PyTorch's keyword, which xpcnn's Adam does not take: "
     r"xpcnn's names are Keras', beta_1 and beta_2: Adam\(beta_1=0.8, beta_2=0.99\)$"),
    (lambda: optim.AdamW(eps=1e-6), r"^AdamW\(eps=1e-06\): .*AdamW\(epsilon=1e-06\)$"),
    (lambda: optim.RMSprop(lr=1e-2, alpha=0.99), r"^RMSprop\(alpha=0.99\): .*rho: "
                                                 r"RMSprop\(rho=0.99\)$"),
    (lambda: optim.SGD(0.1, momentum=0.9, dampening=0.1),
     r"^SGD\(dampening=0.1\): .*xpcnn's SGD has no dampening \(PyTorch's default, 0, only\)$"),
    (lambda: optim.SGD(params=[], lr=0.1), r"^SGD\(params=\[\]\): .*compile binds"),
    # (Keras' name only where the class takes it; was: SGD(epsilon=...), Adam(rho=...), "xpcnn's
    # SGD" for Adam, and beta_1=None for one number)
    (lambda: optim.SGD(0.1, eps=1e-8), r"^SGD\(eps=1e-08\): .*xpcnn's SGD has no such setting$"),
    (lambda: optim.SGD(0.1, betas=(0.9, 0.99)), r"xpcnn's SGD has no such setting$"),
    (lambda: optim.Adam(alpha=0.9), r"^Adam\(alpha=0.9\): .*xpcnn's Adam has no such setting$"),
    (lambda: optim.Adam(dampening=0.5), r"^Adam\(dampening=0.5\): .*xpcnn's Adam has no "
                                        r"dampening"),
    (lambda: optim.Adam(maximize=0), r"^Adam\(maximize=0\): .*not offered"),
    (lambda: optim.Adam(betas=0.9), r"beta_1 and beta_2, a number each: Adam\(beta_1=..., "
                                    r"beta_2=...\)$"),
    (lambda: optim.Adam(maximize=True), r"^Adam\(maximize=True\): .*not offered"),
    (lambda: optim.SGD(0.1, foreach=True), r"^SGD\(foreach=True\): .*not offered"),
    (lambda: optim.AdamW(fused=True), r"^AdamW\(fused=True\): .*not offered"),
    (lambda: optim.RMSprop(capturable=True), r"^RMSprop\(capturable=True\): .*not offered"),
    (lambda: optim.Adam(differentiable=True), r"^Adam\(differentiable=True\): .*not offered"),
])
def test_pytorchs_optimiser_keywords_name_xpcnns(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_a_users_optimiser_taking_a_pytorch_name_keeps_it():
    class Mine(optim.SGD):
        def __init__(self, lr=0.01, eps=1e-3):
            super().__init__(lr)
            self.eps = eps

        def get_config(self):
            return {**super().get_config(), "eps": self.eps}

    assert Mine(0.1, eps=0.5).eps == 0.5


# -- 5. AvgPool2D's integer padding: PyTorch's count_include_pad=False -----------------------

@needs_torch
def test_avgpool_integer_padding_leaves_the_padding_out_as_pytorchs_count_include_pad_false():
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 3))
    model = xpcnn.Sequential([AvgPool2D(3, 1, padding=1)], input_shape=(5, 5, 3), dtype="float64")
    want = torch.nn.functional.avg_pool2d(torch.tensor(x).permute(0, 3, 1, 2), 3, 1, padding=1,
                                          count_include_pad=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-12, atol=1e-12)
    assert "count_include_pad=False" in AvgPool2D.__doc__


# -- 7. a loss called in PyTorch's order -----------------------------------------------------

def test_a_loss_called_in_pytorchs_order_asks_whether_the_arguments_are_swapped():
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 2])
    loss = SoftmaxCrossEntropy(from_logits=True)
    with pytest.raises(InputError, match=r"got shape \(4,\): arguments swapped\? "
                                         r"SoftmaxCrossEntropy is called as Keras' losses are, "
                                         r"loss\(y_true, y_pred\); PyTorch's order"):
        loss(logits, y)
    with pytest.raises(InputError, match=r"got shape \(4,\)$"):  # (no swap: no such word)
        loss(y, y)
    assert "PyTorch's" in SoftmaxCrossEntropy.__call__.__doc__


@needs_torch
def test_the_swap_hint_reads_y_true_without_converting_and_needs_integer_targets():
    """(was: a ragged y_true or a torch bfloat16 one raised NumPy's or torch's own error from
    the hint's conversion, and a correct-order call with a 1-D float y_pred was told "swapped")"""
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    loss = SoftmaxCrossEntropy(from_logits=True)
    with pytest.raises(InputError, match=r"got shape \(4,\): arguments swapped\?"):
        loss(torch.tensor(logits, dtype=torch.bfloat16), torch.tensor([0, 2, 1, 2]))
    with pytest.raises(InputError, match=r"got shape \(3,\)$"):
        loss([[1.0, 2.0], [3.0]], np.zeros(3, np.float32))
    with pytest.raises(InputError, match=r"got shape \(4,\)$"):  # (y_pred float: no swap)
        loss(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], np.zeros(4, np.float32))


# -- 9. one number as sample weights ---------------------------------------------------------

@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_one_bad_number_as_sample_weights_is_not_told_to_use_np_full(value):
    with pytest.raises(InputError, match=r"is one number, .* shape \(8,\): weights must be "
                                         r"finite and >= 0$"):
        checks.as_sample_weights(value, 8)
    with pytest.raises(InputError, match=r"pass np.full\(8, 2.0\)"):
        checks.as_sample_weights(2.0, 8)


def test_pytorchs_defaults_spelled_out_are_taken_by_the_optimisers():
    """PyTorch's keywords given PyTorch's default, which is what xpcnn does (no dampening, a
    minimised loss, its own update path), are taken, as the layers take Keras' defaults spelled
    out (was: refused as "not offered" or "no such setting")."""
    sgd = optim.SGD(0.1, momentum=0.9, dampening=0, maximize=False, foreach=None)
    adam = optim.Adam(1e-3, fused=None, capturable=False, differentiable=False, maximize=False)
    assert (sgd.lr, sgd.momentum, adam.lr) == (0.1, 0.9, 1e-3)
    assert optim.SGD(0.1, dampening=0.0).get_config() == optim.SGD(0.1).get_config()


def test_a_window_that_does_not_fit_deep_in_a_channels_first_model_names_its_input():
    """A PyTorch port's channels-first input often fails a layer later (a 1x30 map after a
    3x3 convolution of a (3, 32, 32) input): the error asks whether the model's input is
    channels-first and names the shape to declare (it gave no hint)."""
    said = r"model's input \(3, 32, 32\) channels-first.*declare \(32, 32, 3\)"
    with pytest.raises(InputError, match=said), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the declared shape's own warning)
        xpcnn.Sequential([xpcnn.Input((3, 32, 32)), Conv2D(16, 3), MaxPool2D(2)], device="cpu")


# -- 10. PyTorch's layer keywords ------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: xpcnn.layers.Dropout(p=0.25),
     r"^Dropout\(p=0.25\): PyTorch's keyword, which xpcnn's Dropout does not take: "
     r"xpcnn's name is Keras', rate: Dropout\(rate=0.25\)$"),
    (lambda: Conv2D(8, 3, stride=2), r"^Conv2D\(stride=2\): .*Conv2D\(strides=2\)$"),
    (lambda: Conv2D(8, 3, bias=False), r"^Conv2D\(bias=False\): .*Conv2D\(use_bias=False\)$"),
    (lambda: Conv2D(in_channels=3, out_channels=8, kernel_size=3),
     r"^Conv2D\(in_channels=3\): .*xpcnn infers it from the input: leave in_channels out$"),
    (lambda: Conv2D(8, 3, dilation=2), r"has no dilation \(dilation=1 only\)$"),
    (lambda: Conv2D(8, 3, padding_mode="reflect"), r"padding_mode='zeros' only"),
    (lambda: Conv2D(8, 3, device="cuda"), r"^Conv2D\(device='cuda'\): .*Sequential\(device="),
    (lambda: Dense(in_features=3, out_features=4), r"leave in_features out$"),
    (lambda: Dense(4, out_features=4), r"^Dense\(out_features=4\): .*Dense\(units=4\)$"),
    (lambda: MaxPool2D(kernel_size=3), r"^MaxPool2D\(kernel_size=3\): .*MaxPool2D\(pool_size=3\)$"),
    (lambda: AvgPool2D(2, stride=1), r"^AvgPool2D\(stride=1\): .*AvgPool2D\(strides=1\)$"),
    (lambda: MaxPool2D(2, ceil_mode=True), r"ceil_mode=False only"),
    (lambda: AvgPool2D(3, 1, padding=1, count_include_pad=True),
     r"leaves the padding out of its means \(count_include_pad=False only\)$"),
    (lambda: BatchNorm2D(num_features=16), r"leave num_features out$"),
    (lambda: BatchNorm2D(affine=False), r"affine=True only"),
    (lambda: BatchNorm2D(bias=False), r"^BatchNorm2D\(bias=False\): .*\(bias=True only\)$"),
    (lambda: MaxPool2D(2, return_indices=True), r"^MaxPool2D\(return_indices=True\): .*"
                                                r"xpcnn's MaxPool2D gives no indices"),
    (lambda: xpcnn.layers.ReLU(inplace=True), r"^ReLU\(inplace=True\): .*in place"),
    (lambda: Flatten(start_dim=2), r"start_dim=1, end_dim=-1 only"),
    (lambda: xpcnn.layers.Softmax(dim=1), r"dim=-1 only; for \(N, classes\) scores that is "
                                          r"PyTorch's dim=1"),
])
def test_pytorchs_layer_keywords_name_xpcnns(make, match):
    """(was: Python's "unexpected keyword argument 'p'", naming no way out)"""
    with pytest.raises(InputError, match=match):
        make()


def test_pytorchs_layer_defaults_spelled_out_are_taken():
    layers = [Conv2D(8, 3, dilation=1, padding_mode="zeros", device=None),
              MaxPool2D(2, dilation=(1, 1), ceil_mode=False, return_indices=False),
              AvgPool2D(2, count_include_pad=False, divisor_override=None),
              BatchNorm2D(affine=True, track_running_stats=True, bias=True, dtype=None),
              xpcnn.layers.Dropout(0.5, inplace=False), xpcnn.layers.ReLU(inplace=False),
              Flatten(start_dim=1, end_dim=-1), xpcnn.layers.Softmax(dim=-1)]
    plain = [Conv2D(8, 3), MaxPool2D(2), AvgPool2D(2), BatchNorm2D(), xpcnn.layers.Dropout(0.5),
             xpcnn.layers.ReLU(), Flatten(), xpcnn.layers.Softmax()]
    for given, default in zip(layers, plain, strict=True):
        config, want = given.get_config(), default.get_config()
        config.pop("name"), want.pop("name")
        assert config == want
    with pytest.raises(InputError, match=r"ceil_mode=False only"):
        MaxPool2D(2, ceil_mode=1)  # (1 is not False: is_one_of compares types too)
    # (each pool by its own nn twin: nn.AvgPool2d has no return_indices, nn.MaxPool2d no
    # count_include_pad; was: one table for both, each explaining the other)
    for make in (lambda: AvgPool2D(2, return_indices=False),
                 lambda: MaxPool2D(2, count_include_pad=False)):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            make()


def test_a_users_layer_keeps_its_own_keywords_of_pytorchs_names():
    class Mine(xpcnn.layers.Dropout):
        def __init__(self, p=0.5, name=None):
            super().__init__(p, name=name)

    assert Mine(p=0.25).rate == 0.25


@needs_torch
def test_a_pytorch_weight_whose_layouts_share_a_shape_warns_unless_converted():
    """A square nn.Linear weight, or the kernel of n filters of n x n over n channels, has the
    same shape in both layouts: given as PyTorch keeps it (contiguous), it warns; converted (a
    view: .T, .permute(2, 3, 1, 0)) or as NumPy, it does not (was: taken silently, a wrong
    model)."""
    model = xpcnn.Sequential([Conv2D(3, 3), Flatten(), Dense(12), Dense(12)],
                             input_shape=(5, 5, 3))
    conv, lin = torch.nn.Conv2d(3, 3, 3), torch.nn.Linear(12, 12)
    cases = [(model.layers[0], [conv.weight, conv.bias], r"weight.permute\(2, 3, 1, 0\)"),
             (model.layers[3], [lin.weight, lin.bias], r"weight.T \(a view")]
    for layer, weights, match in cases:
        with pytest.warns(UserWarning, match=r"a contiguous torch tensor of shape .* the same in "
                                             r"PyTorch's layout as in Keras': .*" + match) as seen:
            layer.set_weights(weights)
        assert seen[0].filename == __file__  # (pointed at the user's call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.layers[0].set_weights([conv.weight.permute(2, 3, 1, 0), conv.bias])
        model.layers[3].set_weights([lin.weight.T, lin.bias])
        model.layers[3].set_weights([lin.weight.detach().numpy(), lin.bias.detach().numpy()])
    np.testing.assert_array_equal(model.layers[3].get_weights()[0], lin.weight.detach().numpy())


def _linear_after_flatten_warnings(model, weights) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.set_weights(weights)
    return [str(w.message) for w in seen if "nn.Flatten" in str(w.message)]


@needs_torch
def test_a_linear_weight_after_a_flatten_of_a_map_warns_with_the_reorder_that_fixes_it():
    """PyTorch's nn.Flatten orders a map's features (C, H, W), xpcnn's (H, W, C): a Linear's
    weight.T after it has the right shape and computes another function. A torch tensor given
    there warns, in a Sequential and in a functional model (through a Dropout), with the
    reorder, which gives PyTorch's outputs; a NumPy array stays silent (was: taken silently,
    outputs 0.5 apart)."""
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                             torch.nn.Linear(4 * 4 * 5, 3)).double().eval()
    model = xpcnn.Sequential([Conv2D(4, 3, activation="relu"), Flatten(), Dense(3)],
                             input_shape=(6, 7, 2), dtype="float64")
    conv, lin = tm[0], tm[3]
    said = _linear_after_flatten_warnings(
        model, [conv.weight.permute(2, 3, 1, 0), conv.bias, lin.weight.T, lin.bias])
    assert len(said) == 1 and said[0].startswith(
        "xpcnn: layer 'dense' weight 'kernel': a torch tensor for a Dense reading Flatten "
        "'flatten' of a (4, 5, 4) map")
    reorder = re.search(r"(weight\.reshape\(.*?\)\.permute\(.*?\)\.reshape\(.*?\)) in place of "
                        r"weight\.T", said[0]).group(1)
    kernel = eval(reorder, {"weight": lin.weight.detach()})  # (the message's own formula)
    assert _linear_after_flatten_warnings(
        model, [a.detach().numpy() for a in
                (conv.weight.permute(2, 3, 1, 0), conv.bias, kernel, lin.bias)]) == []
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 2))
    with torch.no_grad():
        want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-12, atol=1e-12)

    inputs = xpcnn.Input((6, 7, 2))
    features = xpcnn.layers.Dropout(0.5)(Flatten()(Conv2D(4, 3)(inputs)))
    hidden = Dense(80, name="hidden")(features)
    graph = xpcnn.Model(inputs, Dense(3, name="head")(hidden))
    lin80 = torch.nn.Linear(80, 80)
    said = _linear_after_flatten_warnings(graph, [conv.weight.permute(2, 3, 1, 0), conv.bias,
                                                  lin80.weight.T, lin80.bias,
                                                  lin.weight.T, lin.bias])
    assert len(said) == 1 and "layer 'hidden' weight 'kernel'" in said[0]  # (not the head)


@needs_torch
@pytest.mark.parametrize("shape, pool", [((1, 1, 8), Flatten()), ((4, 2, 1), Flatten()),
                                         ((4, 2, 8), GlobalAvgPool2D())])
def test_a_linear_weight_after_one_order_of_features_does_not_warn(shape, pool):
    """A Flatten of one position or one channel, or a global pool, orders the features as
    PyTorch does: no warning there."""
    model = xpcnn.Sequential([pool, Dense(3)], input_shape=shape)
    lin = torch.nn.Linear(model.layers[0].output_shape[0], 3)
    assert _linear_after_flatten_warnings(model, [lin.weight.T, lin.bias]) == []


@needs_torch
def test_a_state_dict_cast_as_a_whole_names_its_num_batches_tracked_in_the_count_error():
    """.float() on every value turns num_batches_tracked into a 0-d float, which is not
    dropped: the count error names it (was: only "expects 8 arrays, got 9")."""
    tm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                             torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    model = xpcnn.Sequential([Conv2D(4, 3), BatchNorm2D(), Conv2D(2, 1), BatchNorm2D()],
                             input_shape=(6, 6, 1))
    values = [(v.permute(2, 3, 1, 0) if v.ndim == 4 else v).float()
              for v in tm.state_dict().values()]
    with pytest.raises(InputError, match=r"expects 12 arrays .*got 14; arrays 6, 13 are 0-d, "
                                         r"right after a BatchNorm2D's moving_variance, as "
                                         r"PyTorch BatchNorm's num_batches_tracked cast to "
                                         r"float .*remove them$"):
        model.set_weights(values)
    values[6] = values[6].long()  # (one dropped as it should be, the other named)
    with pytest.raises(InputError, match=r"got 14 \(1 num_batches_tracked dropped\); array 13 "
                                         r"is 0-d, .*remove it$"):
        model.set_weights(values)
    with pytest.raises(InputError, match=r"expects 4 weight arrays .*got 5; array 4 is 0-d, "
                                         r"right after"):
        model.layers[1].set_weights(values[2:6] + [values[13]])
    model.set_weights(values[:13])  # (the float one removed)


@needs_torch
def test_a_state_dict_a_module_or_its_parameters_are_told_the_port_recipe():
    """(was: "expects a list of arrays ..., got OrderedDict", "got Sequential")"""
    tm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    model = xpcnn.Sequential([Conv2D(4, 3), BatchNorm2D()], input_shape=(6, 6, 1))
    recipe = (r"with each Conv2d weight .permute\(2, 3, 1, 0\) and each Linear weight .T "
              r"\(Keras' layouts\)$")
    for given, got, how in [
            (tm.state_dict(), "OrderedDict", r"from a PyTorch state_dict, pass "
                                             r"list\(state_dict.values\(\)\), "),
            (tm, "Sequential", r"from a PyTorch module, pass "
                               r"list\(module.state_dict\(\).values\(\)\), "),
            (tm.parameters(), "generator", r"pass list\(...\) of it; from a PyTorch module, "
                                           r"list\(module.state_dict\(\).values\(\)\) "
                                           r"\(parameters\(\) leaves out BatchNorm's running "
                                           r"statistics\), "),
            (tm.state_dict().values(), "odict_values", r"pass list\(...\) of it; ")]:
        with pytest.raises(InputError, match=r"set_weights expects a list of arrays \(as "
                                             r"get_weights returns\), got " + got + ": " + how
                                             + ".*" + recipe):
            model.set_weights(given)
    with pytest.raises(InputError, match=r"layer 'batchnorm2d' set_weights expects a list of "
                                         r"arrays .*got OrderedDict: from a PyTorch state_dict"):
        model.layers[1].set_weights(tm[1].state_dict())


@needs_torch
def test_a_square_conv2d_weight_of_a_channels_last_model_warns_unless_converted():
    """A channels_last Conv2d weight is still PyTorch's (out, in, kh, kw) tensor, though not
    contiguous: taken unconverted, it warns as a contiguous one does (was: silent, a wrong
    model); its permute(2, 3, 1, 0) does not."""
    conv = torch.nn.Conv2d(3, 3, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    layer = xpcnn.Sequential([Conv2D(3, 3)], input_shape=(5, 5, 3)).layers[0]
    with pytest.warns(UserWarning, match=r"a channels_last torch tensor of shape \(3, 3, 3, 3\), "
                                         r"the same in PyTorch's layout as in Keras'"):
        layer.set_weights([conv.weight, conv.bias])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.set_weights([conv.weight.permute(2, 3, 1, 0), conv.bias])
    np.testing.assert_array_equal(layer.get_weights()[0],
                                  conv.weight.detach().numpy().transpose(2, 3, 1, 0))
