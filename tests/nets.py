"""Small networks shared by tests: every layer type, sized to run in well under a second."""

import numpy as np

import xpcnn
from xpcnn import optim
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
    MaxPool2D,
    RandomCrop,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)


def every_layer_net(classes: int = 10) -> list:
    """Each layer type once, in an order where no two backends can route a tie differently
    (FeatureNorm after the last ReLU-then-MaxPool, so pooling never sees tied values)."""
    return [RandomFlip(), RandomCrop(2), Rescaling(1 / 255), Conv2D(4, 3, padding="same"),
            BatchNorm2D(), ReLU(6.0), MaxPool2D(2), Conv2D(6, 3, strides=2, padding="same"),
            FeatureNorm(), ReLU(), AvgPool2D(2, padding="same"), Dropout(0.3), Flatten(),
            Dense(12, activation="relu"), Dense(classes), Softmax()]


def gap_net(classes: int = 10) -> list:
    return [Rescaling(1 / 255), Conv2D(8, 3, padding="same", use_bias=False), BatchNorm2D(),
            ReLU(), MaxPool2D(2), Conv2D(8, 3, padding="same", activation="relu"),
            GlobalAvgPool2D(), Dense(classes), Softmax()]


def fused_relu_net(classes: int = 10) -> list:
    """The reference models' shapes: convolutions with fused ReLU (the first computes no input
    gradient); a ReLU() layer that the model fuses into the convolution before it, whose
    gradient the FeatureNorm after it applies; a convolution feeding a max pool that applies
    its ReLU's gradient; a ReLU() fused into a Dense layer."""
    return [Rescaling(1 / 255), Conv2D(6, 3, padding="same", activation="relu"),
            Conv2D(6, 3, padding="same"), ReLU(), FeatureNorm(),
            Conv2D(6, 3, padding="same", activation="relu"), MaxPool2D(2), Flatten(),
            Dense(8), ReLU(), Dense(classes), Softmax()]


def bn_relu_net(classes: int = 10) -> list:
    """BatchNorm2D -> ReLU() twice, fused by the plan: the first BatchNorm2D applies its ReLU's
    gradient itself, the second leaves it to the max pool after it."""
    return [Rescaling(1 / 255), Conv2D(6, 3, padding="same", use_bias=False), BatchNorm2D(),
            ReLU(), Conv2D(6, 3, padding="same", use_bias=False), BatchNorm2D(), ReLU(),
            MaxPool2D(2), Flatten(), Dense(classes), Softmax()]


def plan_of(model) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """A built model's plan by layer names: the layers it runs (up to the logits), those that
    apply the ReLU() after them, and the (layer, reader) pairs where the reader applies the
    first layer's ReLU gradient."""
    plan = model._plan()
    writer = {s.output: s.layer for s in plan.steps}
    ran = [s.layer.name for s in plan.steps]
    fused = [s.layer.name for s in plan.steps if s.options.fused_relu]
    handed = [(writer[s.inputs[0]].name, s.layer.name) for s in plan.steps
              if s.options.apply_input_relu_grad]
    return ran, fused, handed


def random_layers_net(batchnorm: bool = True) -> list:
    """Random layers of every kind (flip, crop on the input, dropout inside) around one
    convolution, for 8x8x3 images: what checkpoints and several ranks must reproduce exactly.
    BatchNorm is optional, since on several ranks it normalises each rank's slice by itself."""
    norm = [BatchNorm2D()] if batchnorm else []
    return [RandomFlip(), RandomCrop(1), Rescaling(1 / 255), Conv2D(4, 3, padding="same"), *norm,
            ReLU(), MaxPool2D(2), Dropout(0.25), Flatten(), Dense(10), Softmax()]


def tiny_images(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` random uint8 8x8x3 images and labels of 10 classes (seed 0)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (samples, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, samples)


def four_class_net() -> list:
    """One convolution and a dense layer of 4 classes, for the images of :func:`four_class_data`."""
    return [Rescaling(1 / 255), Conv2D(3, 3), ReLU(), Flatten(), Dense(4), Softmax()]


def four_class_data() -> tuple[np.ndarray, np.ndarray]:
    """20 random uint8 6x6x3 images (seed 0) and their labels, of 4 classes."""
    return np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8), \
        np.arange(20) % 4


def four_class_model():
    """:func:`four_class_net`, compiled with SGD(0.01) and built for the images of
    :func:`four_class_data`: what tests of misuse call wrongly."""
    m = xpcnn.Sequential(four_class_net(), seed=0)
    m.compile(optimizer=optim.SGD(0.01))
    m.build((6, 6, 3))
    return m


def residual_net(shape=(8, 8, 3), classes=5):
    """A residual block with BatchNorm, a Concatenate branch, tensors read two and three times,
    a Conv2D -> ReLU and a BatchNorm2D -> ReLU the plan can fuse and a Conv2D -> ReLU it must
    not (the convolution's output has a second reader), and a ReLU whose gradient the max
    pool after it applies."""
    inputs = xpcnn.Input(shape)
    x = Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = ReLU(name="stem_relu")(BatchNorm2D(name="stem_bn")(x))  # fused; read three times
    y = Conv2D(4, 3, padding="same", name="conv_a")(x)
    y = ReLU(name="relu_a")(y)  # fused into conv_a: its only reader
    # (no bias before a BatchNorm: its gradient is rounding noise, which Adam would amplify)
    y = Conv2D(4, 3, padding="same", use_bias=False, name="conv_b")(y)
    y = BatchNorm2D(name="bn_b")(y)
    z = ReLU(name="res_relu")(Add(name="add")([x, y]))
    a = Conv2D(3, 1, name="branch")(z)
    r = ReLU(name="branch_relu")(a)  # not fused: the branch's output is also concatenated
    c = Concatenate(name="concat")([z, a, r, x])
    p = MaxPool2D(2, name="pool")(ReLU(name="pool_relu")(c))  # the pool applies its gradient
    g = GlobalAvgPool2D(name="gap")(p)
    outputs = Softmax(name="softmax")(Dense(classes, name="dense")(g))
    return inputs, outputs


def add_relu_net(shape=(8, 8, 3), classes=10):
    """Residual blocks whose Add -> ReLU() the plan fuses: the first block's output read by
    two layers, the second's (an Add of three inputs) by three, whose gradients the Adds sum
    as they apply their ReLU's; the last Add's ReLU gradient left to the max pool after it."""
    inputs = xpcnn.Input(shape)
    x = Rescaling(1 / 255)(inputs)
    x = ReLU(name="stem_relu")(BatchNorm2D(name="stem_bn")(
        Conv2D(4, 3, padding="same", use_bias=False, name="stem")(x)))
    y = BatchNorm2D(name="bn_a")(Conv2D(4, 3, padding="same", use_bias=False, name="conv_a")(x))
    z = ReLU(name="relu_1")(Add(name="add_1")([x, y]))  # read twice
    w = Conv2D(4, 3, padding="same", name="conv_b")(z)
    z = ReLU(name="relu_2")(Add(name="add_2")([z, w, Conv2D(4, 1, name="proj")(x)]))
    z = ReLU(name="relu_3")(Add(name="add_3")([z, Conv2D(4, 1, name="conv_c")(z),
                                                Conv2D(4, 3, padding="same", name="conv_d")(z)]))
    p = MaxPool2D(2, name="pool")(ReLU(name="relu_4")(Add(name="add_4")([z, x])))
    outputs = Softmax()(Dense(classes, name="dense")(GlobalAvgPool2D()(p)))
    return inputs, outputs


def frozen_trunk_net(classes: int = 10) -> list:
    """A trunk of every layer that keeps arrays for its backward, Dropout and BatchNorm2D
    among them (up to the Flatten), then a head of Dense -> Dropout -> Dense."""
    return [Rescaling(1 / 255), Conv2D(4, 3, padding="same", use_bias=False), BatchNorm2D(),
            ReLU(), Dropout(0.3), MaxPool2D(2), Conv2D(6, 3, padding="same", activation="relu"),
            FeatureNorm(), ReLU(6.0), AvgPool2D(2, padding="same"), Flatten(),
            Dense(12, activation="relu"), Dropout(0.2), Dense(classes), Softmax()]


def frozen_trunk_model(device, functional: bool = False) -> tuple:
    """:func:`frozen_trunk_net` (or :func:`residual_net`, 10 classes) with every layer before its
    head frozen (``trainable = False``), so that no backward runs through them; returns the
    model and those layers."""
    if functional:
        model = xpcnn.Model(*residual_net(classes=10), device=device, seed=0)
        head = [layer.name for layer in model.layers].index("dense")
    else:
        model = xpcnn.Sequential(frozen_trunk_net(), device=device, seed=0)
        head = len(model.layers) - 4
    for layer in model.layers[:head]:
        layer.trainable = False
    return model, model.layers[:head]


def kept_for_backward(layer) -> list[str]:
    """The names of what ``layer`` keeps from its last training pass for its backward: its
    ``_cache*`` attributes that hold something, but a convolution's engine and the weights'
    casts (kept for every pass)."""
    return sorted(k for k, v in vars(layer).items() if k.startswith("_cache") and v is not None
                  and k not in ("_cache_engine", "_cache_weights_by_thread"))
