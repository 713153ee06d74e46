"""The device launches and the peak device memory of one eager training step of the reference
models on CuPy, counted on the CPU (tests/launch_counter.py: the CuPy kernels and cuDNN graphs
emulated, every CuPy array operation counted as the launches CuPy makes of it, every device
buffer charged while it lives). An eager step at small batches is bound by the host's cost per
launch (20-50 us each on CuPy), and a captured step replays each launch as a graph node: a
change that adds launches must change the numbers pinned here, on purpose. So must a change
that holds more device memory at the step's peak (issue 18: at most 1.5x PyTorch's), or less,
by a MiB or more.

    PYTHONPATH=$PWD:tests python tests/launch_counter.py  # the breakdowns, batch 128
"""

import functools

import numpy as np
import pytest
from cuda_emulator import RawKernel, needs_compiler
from launch_counter import (
    MEMORY,
    OPTIMIZERS,
    breakdown,
    counting,
    counting_backend,
    device_array,
    emulated,
    launch_count,
    measured_step,
    step_launches,
)

import xpcnn
from xpcnn.layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    FeatureNorm,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Softmax,
)

pytestmark = [needs_compiler,
              # (float16 products of the first steps overflow at the initial loss scale)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

# Launches of one step, SGD with momentum, uint8 images on the device, cuda_graphs=False.
PINNED = {
    ("notebook", "float32"): 26, ("notebook", "mixed_float16"): 28,
    ("mnist", "float32"): 28, ("mnist", "mixed_float16"): 30,
    ("cifar", "float32"): 34, ("cifar", "mixed_float16"): 36,
    # (mixed bfloat16: the same kernels as mixed float16, whose loss scale costs no launch)
    ("notebook", "mixed_bfloat16"): 28, ("mnist", "mixed_bfloat16"): 30,
    ("cifar", "mixed_bfloat16"): 36,
    # (mnist-bn: 56 and 58 while GlobalAvgPool2D's gradient was a broadcast view, which the
    # BatchNorm2D before it copied whole)
    ("mnist-bn", "float32"): 55, ("mnist-bn", "mixed_float16"): 57,
    ("resnet20", "float32"): 181, ("resnet20", "mixed_float16"): 183,
}
# The peak device memory of that step in MiB (parameters, optimiser state, batch, saved
# activations and temporaries; not cuDNN's workspaces), to within 1 MiB.
PINNED_MIB = {
    ("notebook", "float32"): 68.2, ("notebook", "mixed_float16"): 39.0,
    ("mnist", "float32"): 69.8, ("mnist", "mixed_float16"): 41.8,
    ("cifar", "float32"): 72.7, ("cifar", "mixed_float16"): 39.9,
    ("notebook", "mixed_bfloat16"): 39.0, ("mnist", "mixed_bfloat16"): 41.8,
    ("cifar", "mixed_bfloat16"): 40.0,
    ("mnist-bn", "float32"): 88.9, ("mnist-bn", "mixed_float16"): 45.3,
    ("resnet20", "float32"): 14.4, ("resnet20", "mixed_float16"): 8.9,
}
# The batch of those steps: 128, or less where a model's emulated step would be slow (the
# launches are the same at any batch; the memory is that batch's).
BATCH = {"resnet20": 8}


@pytest.fixture(scope="module")
def fast_cupy():
    # (each raw kernel run once, not again in reverse to compare: launches and memory are
    # counted here, and test_cuda_kernels_on_cpu checks the kernels in both schedules)
    with emulated() as module, pytest.MonkeyPatch.context() as mp:
        mp.setattr(RawKernel, "check_schedules", False)
        yield module


def _second_step(counter, model, x, y, w=None) -> list:
    """The launches of a model's second training step on (x, y, sample weights w) (the first
    one builds and warms up), its totals read after."""
    model.train_step(x, y, w)
    counter.active = True
    model.train_step(x, y, w)
    counter.active = False
    launches = list(counter.launches)
    model._read_totals()
    return launches


def check_launches(model: str, precision: str, launches: list) -> None:
    """Fail, with the breakdown, where a step's launches are not the pinned number."""
    pinned = PINNED[model, precision]
    assert launch_count(launches) == pinned, (
        f"{model}, {precision}: {launch_count(launches)} launches a step, pinned {pinned} "
        f"(change PINNED where that is meant):\n{breakdown(launches)}")


def check_memory(model: str, precision: str) -> None:
    """Fail, with what held it, where the last counted step's peak memory is not the pinned
    one (to within 1 MiB)."""
    pinned, peak = PINNED_MIB[model, precision], MEMORY.peak / 2**20
    assert abs(peak - pinned) < 1.0, (
        f"{model}, {precision}: {peak:.2f} MiB at a step's peak, pinned {pinned} (change "
        f"PINNED_MIB where that is meant):\n{MEMORY.breakdown()}")


@pytest.mark.parametrize(("model", "precision"), list(PINNED))
def test_launches_and_memory_of_a_training_step(fast_cupy, model, precision):
    check_launches(model, precision, step_launches(model, precision, BATCH.get(model, 128),
                                                   warmup=1, warmup_batch=8))
    check_memory(model, precision)


def test_an_extra_launch_fails_the_count(fast_cupy, monkeypatch):
    """A max pooling launched twice is one launch more, found and named (at batch 16, a
    seventh of the time: a step's launches are the same at any batch)."""
    kernels = fast_cupy.KERNELS
    max_pool = kernels.max_pool

    def twice(*args):
        max_pool(*args)
        return max_pool(*args)

    monkeypatch.setattr(kernels, "max_pool", twice)
    launches = step_launches("mnist", "float32", batch=16, warmup=1)
    pinned = PINNED["mnist", "float32"]
    assert launch_count(launches) == pinned + 1
    with pytest.raises(AssertionError, match=rf"{pinned + 1} launches a step, pinned {pinned}"
                                             r"(.|\n)*maxpool2d forward: kernel xpcnn_max_pool x2"):
        check_launches("mnist", "float32", launches)



def test_an_activation_kept_longer_fails_the_memory_pin(fast_cupy, monkeypatch):
    """A max pooling that keeps a copy of its input until the next step holds 4.5 MiB more
    at the peak (batch 128 of 24 x 24 x 64 float32 values, halved by the pool: 128 x 12 x 12
    x 64 x 4 bytes after it), found and named by the layer and method that allocated it."""
    from xpcnn.layers.pooling import MaxPool2D

    forward = MaxPool2D.forward

    def keeping(self, x, *args, **kwargs):
        y = forward(self, x, *args, **kwargs)
        self.kept = y.copy()
        return y

    monkeypatch.setattr(MaxPool2D, "forward", keeping)
    step_launches("mnist", "float32", warmup=1, warmup_batch=8)
    pinned = PINNED_MIB["mnist", "float32"]
    assert MEMORY.peak / 2**20 == pytest.approx(pinned + 4.5, abs=1.0)
    with pytest.raises(AssertionError, match=r"MiB at a step's peak, pinned (.|\n)*"
                                             r"4\.50  maxpool2d keeping"):
        check_memory("mnist", "float32")

@pytest.mark.parametrize("rows", [1, 128, 1023, 1024, 1031, 131072])
def test_a_bias_gradient_takes_one_launch(fast_cupy, rows):
    """CupyKernels.sum_rows: a Dense layer's bias gradient (one row a sample) and a
    convolution's (one row a pixel) in one launch at any row count (the counters it keeps
    between launches are made, by a memset, at its first use on a device only)."""
    a = np.ones((rows, 32), np.float32)
    fast_cupy.KERNELS.sum_rows(device_array(a))  # (first use: makes the counters)
    with counting(fast_cupy) as counter:
        counter.active = True
        total = fast_cupy.KERNELS.sum_rows(device_array(a))
        counter.active = False
    assert launch_count(counter.launches) == 1, breakdown(counter.launches)
    np.testing.assert_array_equal(total, np.full(32, rows))


def _check_one_loss_launch(fast_cupy, classes, targets, weighted, class_weights=False):
    """An eager float32 step of Flatten -> Dense -> Softmax at batch 128 takes 8 launches,
    its loss one; 10 with sample weights given to train_step itself, which checks their values
    on the device (a comparison and a where: a bad weight skips the step as a bad label does;
    fit's, checked on the host, add none)."""
    import launch_counter

    import xpcnn
    from xpcnn.layers import Dense, Flatten, Softmax

    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Flatten(), Dense(classes), Softmax()], input_shape=(8, 8, 4),
                                 device=launch_counter.counting_backend(), seed=0)
        model.compile(optimizer=launch_counter.OPTIMIZERS["sgd"](), cuda_graphs=False)
        x = device_array(rng.standard_normal((128, 8, 8, 4)).astype(np.float32))
        labels = rng.integers(0, classes, 128)
        y = device_array(np.eye(classes, dtype=np.float32)[labels] if targets == "one-hot"
                         else labels)
        w = device_array(rng.uniform(0.5, 2.0, 128).astype(np.float32)) if weighted else None
        if class_weights:
            model._use_class_weights(rng.uniform(0.5, 2.0, classes))  # (as fit's class_weight)
        launches = _second_step(counter, model, x, y, w)
    assert launch_count(launches) == 8 + 2 * weighted, breakdown(launches)
    loss = [launch for launch in launches if "forward_with_accuracy" in launch.where]
    assert launch_count(loss) == 1, breakdown(launches)


@pytest.mark.parametrize("classes", [10, 1000])  # (a row a thread; a row a warp)
@pytest.mark.parametrize("targets, weighted", [("labels", False), ("one-hot", False),
                                               ("labels", True), ("one-hot", True)])
def test_the_loss_takes_one_launch_for_one_hot_targets_and_sample_weights(
        fast_cupy, classes, targets, weighted):
    """Softmax cross-entropy in one launch for integer labels, one-hot rows and sample
    weights alike: 8 launches an eager float32 step of Flatten -> Dense -> Softmax at batch
    128 (one-hot rows or weights took the loss's standard path: 40)."""
    _check_one_loss_launch(fast_cupy, classes, targets, weighted)


@pytest.mark.parametrize("classes", [10, 1000])  # (a row a thread; a row a warp)
@pytest.mark.parametrize("targets, weighted", [("labels", False), ("one-hot", False),
                                               ("labels", True), ("one-hot", True)])
def test_class_weights_are_looked_up_in_the_loss_launch(fast_cupy, classes, targets,
                                                         weighted):
    """fit's class_weight costs no launch: its table is indexed by the labels in the loss's
    kernel, 8 launches an eager float32 step of Flatten -> Dense -> Softmax at batch 128 as
    without it (10 with sample weights given to train_step: their check, as without it; the
    lookup's standard operations before the loss: 13, 14 for one-hot rows)."""
    _check_one_loss_launch(fast_cupy, classes, targets, weighted, class_weights=True)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
@pytest.mark.parametrize("call", ["model(x)", "predict"])
def test_inference_ends_in_one_softmax_launch(fast_cupy, call, precision):
    """A model ending in Softmax at inference: its layers' launches, then the softmax in one
    (its cast from float16 logits included), and predict's one batch not copied to be joined:
    5 launches for Flatten -> Dense(relu) -> Dense -> Softmax in float32 (it took 10, and
    predict 11: a cast of the logits to their own dtype, five for the softmax, a concatenate),
    6 under mixed precision (the weights' cast)."""
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Flatten(), Dense(64, activation="relu"), Dense(10), Softmax()],
                                 input_shape=(8, 8, 4), device=counting_backend(), seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), precision=precision, cuda_graphs=False)
        x = device_array(rng.standard_normal((128, 8, 8, 4)).astype(np.float32))
        run = (lambda: model(x)) if call == "model(x)" else (
            lambda: model.predict(x, batch_size=128))
        want = run()
        counter.active = True
        got = run()
        counter.active = False
        launches = list(counter.launches)
    assert launch_count(launches) == {"float32": 5, "mixed_float16": 6}[precision], (
        breakdown(launches))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).dtype == np.float32
    np.testing.assert_allclose(np.asarray(got).sum(axis=1), 1.0, rtol=1e-5)


# Launches of one eager float32 step (SGD with momentum, cuda_graphs=False) of small models
# whose pooling once left its kernels: a GlobalAvgPool2D head's gradient, a broadcast view,
# put the MaxPool2D or FeatureNorm before it on its standard path (41 and 24 launches), an
# overlapping or padded MaxPool2D's gradient looped over its taps (87 and 90, a padded copy
# forward), AvgPool2D had no kernel at all (26, 41 and 44). (name: launches, the layers
# between a first convolution and the head)
POOL_PINNED = {
    "MaxPool2D(2) -> GlobalAvgPool2D": (16, lambda: [MaxPool2D(2)]),
    "FeatureNorm -> GlobalAvgPool2D": (16, lambda: [FeatureNorm()]),
    "BatchNorm2D -> GlobalAvgPool2D": (20, lambda: [BatchNorm2D()]),
    # (a convolution after the pool: its input gradient is read)
    "MaxPool2D(3, 2)": (18, lambda: [MaxPool2D(3, 2), Conv2D(8, 3, padding="same")]),
    "MaxPool2D(3, 2, padding=1)": (18, lambda: [MaxPool2D(3, 2, padding=1),
                                                Conv2D(8, 3, padding="same")]),
    "MaxPool2D(3, 1, padding='same')": (18, lambda: [MaxPool2D(3, 1, padding="same"),
                                                     Conv2D(8, 3, padding="same")]),
    "AvgPool2D(2)": (14, lambda: [AvgPool2D(2)]),
    "AvgPool2D(3, 2)": (14, lambda: [AvgPool2D(3, 2)]),
    "AvgPool2D(3, 1, padding='same')": (14, lambda: [AvgPool2D(3, 1, padding="same")]),
}


@pytest.mark.parametrize("name", list(POOL_PINNED))
def test_pooling_keeps_to_its_kernels(fast_cupy, name):
    """One launch each way for every pooling, padded and overlapping windows included, and the
    layer before a GlobalAvgPool2D on its own kernels (at batch 8: the launches are the same at
    any batch)."""
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        pinned, body = POOL_PINNED[name]
        head = GlobalAvgPool2D() if name.endswith("GlobalAvgPool2D") else Flatten()
        model = xpcnn.Sequential([Conv2D(8, 3, padding="same"), *body(), head, Dense(10),
                                  Softmax()], input_shape=(12, 12, 4),
                                 device=counting_backend(), seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False)
        x = device_array(rng.standard_normal((8, 12, 12, 4)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 8))
        launches = _second_step(counter, model, x, y)
    assert launch_count(launches) == pinned, breakdown(launches)


# The peak device memory in MiB (within 1 MiB) of one eager float32 step at batch 16 of four
# Conv2D -> BatchNorm2D -> ReLU blocks on 32 x 32 x 16 images (1 MiB an activation) and a
# GlobalAvgPool2D -> Dense head: with every layer before the Dense frozen, what the model's
# inference holds (the trunk keeps nothing for a backward that never runs; it kept 10.1 MiB
# while it did, as much as the whole model's step). (At batch 64 these were 12.1 and 40.2 MiB,
# and the bug's 40.1: a quarter of the batch, a quarter of the activations and of the time.)
FROZEN_TRUNK_MIB = {"trunk frozen": 3.1, "nothing frozen": 10.1}


@pytest.mark.parametrize("frozen", list(FROZEN_TRUNK_MIB))
def test_a_frozen_trunk_keeps_no_activations_for_backward(fast_cupy, frozen):
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        blocks = [[Conv2D(16, 3, padding="same", use_bias=False), BatchNorm2D(), ReLU()]
                  for _ in range(4)]
        model = xpcnn.Sequential([*sum(blocks, []), GlobalAvgPool2D(), Dense(10), Softmax()],
                                 input_shape=(32, 32, 16), device=counting_backend(), seed=0)
        if frozen == "trunk frozen":
            for layer in model.layers[:-2]:
                layer.trainable = False
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False)
        x = device_array(rng.standard_normal((16, 32, 32, 16)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 16))
        model.train_step(x, y)
        measured_step(counter, model, x, y)
    pinned, peak = FROZEN_TRUNK_MIB[frozen], MEMORY.peak / 2**20
    assert abs(peak - pinned) < 1.0, (f"{frozen}: {peak:.2f} MiB at a step's peak, pinned "
                                      f"{pinned}:\n{MEMORY.breakdown()}")


@pytest.mark.parametrize(("metrics", "pinned"), [
    ((), 13), ((5,), 15), ((5, 3), 15)], ids=["accuracy", "top-5", "top-5 and top-3"])
def test_top_k_metrics_take_one_launch_for_every_k(fast_cupy, metrics, pinned):
    """A 16-32-100 MLP's eager step (batch 64): the top-k metrics' counts for all their k's
    in one launch, then the concatenation with the loss's stats, added to the running totals
    by the step's record kernel with the loss and correct count (no launch more); the
    standard counts took ~16 launches a k (33 and 37), their add after the record 3 (18)."""
    from xpcnn.metrics import SparseTopKCategoricalAccuracy

    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Dense(32, activation="relu"), Dense(100)], input_shape=(16,),
                                 device=counting_backend(), seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False, metrics=[
            "accuracy", *(SparseTopKCategoricalAccuracy(k, name=f"top{k}") for k in metrics)])
        x = device_array(rng.standard_normal((64, 16)).astype(np.float32))
        y = device_array(rng.integers(0, 100, 64))
        launches = _second_step(counter, model, x, y)
    assert launch_count(launches) == pinned, breakdown(launches)


def test_a_step_holds_no_earlier_step_gradients(fast_cupy):
    """The gradients are dropped once the update applied them (PyTorch's
    zero_grad(set_to_none=True)): a 256-1024-1024-10 MLP's step at batch 16 peaks at its
    parameters and momentum (10.1 MiB) and the gradients it makes, 15.4 MiB; 19.4 MiB while
    each layer kept the step before's gradients (5.1 MiB) until its own backward."""
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Dense(1024, activation="relu"), Dense(1024, activation="relu"),
                                  Dense(10)], input_shape=(256,), device=counting_backend(),
                                 seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False)
        x = device_array(rng.standard_normal((16, 256)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 16))
        model.train_step(x, y)
        assert all(not la.grads for la in model.layers)
        measured_step(counter, model, x, y)
    assert abs(MEMORY.peak / 2**20 - 15.4) < 1.0, MEMORY.breakdown()


def _mlp_step(fast_cupy, precision, **clip):
    """The launches of one eager step of a 256-512-512-10 MLP at batch 16 (SGD momentum,
    with ``clip``); MEMORY then holds its peak. (512 wide, not 1024: the emulated update,
    record and norm kernels take time in proportion to the parameters, and its gradients,
    1.5 MiB, 0.5 MiB the largest, still stand far above the 0.1 MiB the peaks may differ by.)"""
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Dense(512, activation="relu"), Dense(512, activation="relu"),
                                  Dense(10)], input_shape=(256,), device=counting_backend(),
                                 seed=0)
        model.compile(optimizer=xpcnn.optim.SGD(0.01, momentum=0.9, **clip),
                      precision=precision, cuda_graphs=False)
        x = device_array(rng.standard_normal((16, 256)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 16))
        model.train_step(x, y)
        launches = measured_step(counter, model, x, y)
    return launches


# What clipping adds to a step: clipvalue, nothing (clipped as the fused update loads each
# gradient); a norm, one launch (every gradient's sum of squares). Neither copies a gradient.
# (It was 7-9 standard launches per parameter array, 56 for this MLP's six by clipnorm; and
# clipvalue's clipped copy of the gradients at the step's peak: 5.1 MiB for the 1024-wide MLP
# this was measured on then, 1.5 MiB for the 512-wide one now.)
CLIP_LAUNCHES = {"clipnorm": 1, "global_clipnorm": 1, "clipvalue": 0}


@functools.cache
def _plain_mlp_step(fast_cupy, precision) -> tuple[int, int]:
    """The launches and peak bytes of :func:`_mlp_step` without clipping (the same for every
    clipping compared with it: made once a precision)."""
    launches = launch_count(_mlp_step(fast_cupy, precision))
    return launches, MEMORY.peak


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
@pytest.mark.parametrize("clip", list(CLIP_LAUNCHES))
def test_clipping_takes_at_most_one_launch_and_no_gradient_copy(fast_cupy, clip, precision):
    plain, plain_peak = _plain_mlp_step(fast_cupy, precision)
    launches = _mlp_step(fast_cupy, precision, **{clip: 0.5})
    assert launch_count(launches) == plain + CLIP_LAUNCHES[clip], breakdown(launches)
    assert abs(MEMORY.peak - plain_peak) < 0.1 * 2**20, MEMORY.breakdown()


# Launches of one eager float32 step (SGD with momentum, cuda_graphs=False, batch 2: the
# launches and their breakdown are those of batch 16, at a seventh of the time, the kernel
# gradients still summed from several parts) of
# Conv2D(16, 3, 'same') -> the convolution named -> Flatten -> Dense(10) -> Softmax on
# 16 x 16 x 16 images, on xpcnn's hand-written kernels (cuDNN unloaded, as with XPCNN_CUDNN=0).
# A strided or over-padded convolution's input gradient was im2col + matmul + col2im, a
# scatter per kernel tap (42, 25, 122 and 42 launches; 1.88, 1.36 and 4.84 MiB at the peak for
# the strided three); now one gather launch (22 each; 1.41, 1.36 and 2.82 MiB). (A stride-1 one
# keeps the tiled kernel: 23.) Then 18 (19): the kernel gradients come back in the kernels' own
# layout, which the record and the update copied (2 a layer). Then 16 for all: the tiled kernel
# reads the (K, kh, kw, C) kernel in place, where each forward copied it to a (kh*kw*C, K)
# matrix (2) and the stride-1 input gradient to a rotated one (1).
HAND_WRITTEN_PINNED = {
    "3x3 stride 1 'same'": (16, lambda: Conv2D(32, 3, padding="same")),
    "3x3 stride 2 'same'": (16, lambda: Conv2D(32, 3, strides=2, padding="same")),
    "1x1 stride 2": (16, lambda: Conv2D(32, 1, strides=2)),
    "7x7 stride 2 'same'": (16, lambda: Conv2D(32, 7, strides=2, padding="same")),
    "3x3 padding 3": (16, lambda: Conv2D(32, 3, padding=3)),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN_PINNED))
def test_hand_written_convolution_input_gradients_take_one_launch(fast_cupy, monkeypatch, name):
    """The second convolution's backward: its kernel gradient (the tiled kernel and the parts'
    sum) and its input gradient in one launch (for stride 1 too: the tiled kernel reads the
    rotated kernel in place, where it took a copy first)."""
    import xpcnn.ops.cudnn_conv as cudnn_conv

    monkeypatch.setattr(cudnn_conv, "load", lambda: None)
    rng = np.random.default_rng(0)
    pinned, layer = HAND_WRITTEN_PINNED[name]
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Conv2D(16, 3, padding="same"), layer(), Flatten(), Dense(10),
                                  Softmax()], input_shape=(16, 16, 16),
                                 device=counting_backend(), seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False)
        x = device_array(rng.standard_normal((2, 16, 16, 16)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 2))
        launches = _second_step(counter, model, x, y)
    assert launch_count(launches) == pinned, breakdown(launches)
    backward = [launch for launch in launches if launch.where == "conv2d_1 backward"]
    assert launch_count(backward) == 3, breakdown(launches)
    # (and no copy of the kernel before either convolution's forward)
    assert not [launch for launch in launches if launch.kind == "copy"
                and launch.where.endswith("forward") and launch.where.startswith("conv2d")], (
        breakdown(launches))


def test_a_mixed_precision_step_runs_on_the_hand_written_kernels(fast_cupy, monkeypatch):
    """Mixed float16 with cuDNN unloaded: the float16 convolutions ask the GPU's compute
    capability (tensor cores from 7.0), which the emulated cuDNN's device lacked (an
    AttributeError at the first convolution). The step's launches: those of float32 (16, as
    the 3x3 stride 2 'same' case above), the weights' and gradients' casts (2) and the
    input's cast to float16 (the kernel gradients' copies for the record and the update, and
    the unscaled copies' two back: 27 launches, no longer made), and each forward's copy of
    its kernel to a (kh*kw*C, K) matrix (2): the emulated GPU (compute capability 6.0) has no
    float16 tensor cores, so the direct kernels run, which read that matrix row-major."""
    import xpcnn.ops.cudnn_conv as cudnn_conv

    monkeypatch.setattr(cudnn_conv, "load", lambda: None)
    rng = np.random.default_rng(0)
    with counting(fast_cupy) as counter:
        model = xpcnn.Sequential([Conv2D(16, 3, padding="same"),
                                  Conv2D(32, 3, strides=2, padding="same"), Flatten(),
                                  Dense(10), Softmax()], input_shape=(16, 16, 16),
                                 device=counting_backend(), seed=0)
        model.compile(optimizer=OPTIMIZERS["sgd"](), cuda_graphs=False,
                      precision="mixed_float16")
        x = device_array(rng.standard_normal((16, 16, 16, 16)).astype(np.float32))
        y = device_array(rng.integers(0, 10, 16))
        launches = _second_step(counter, model, x, y)
    assert launch_count(launches) == 21, breakdown(launches)


# Launches of one eager step of cifar on the hand-written kernels (cuDNN unloaded), at batch 2
# (the launches are the same at any batch, their breakdown too at batches 1, 2 and 8; a step
# on the emulated kernels takes time in proportion to its batch: 8 took 7 s in mixed float16;
# at 2 the 32 x 32 convolutions' kernel gradients still sum several parts in both precisions,
# the 16 x 16 ones' in float32): 51 and 54 while each convolution's kernel gradient
# came back as a transposed view, copied by the step's record and by the update (and, under
# loss scaling, its unscaled copy copied back: two more); the parts were summed by a reduction.
# Then float32 43 -> 36: the tiled kernel reads the (K, kh, kw, C) kernel in place, where each
# forward copied it to a matrix (4) and each stride-1 input gradient to a rotated one (3).
# (Mixed float16 keeps its 42: without tensor cores (the emulated GPU's compute capability is
# 6.0) its convolutions run on the direct kernels, whose forward takes the matrix copy.)
HAND_WRITTEN_CIFAR = {"float32": 36, "mixed_float16": 42}


@pytest.mark.parametrize("precision", list(HAND_WRITTEN_CIFAR))
def test_hand_written_kernel_gradients_need_no_copy(fast_cupy, monkeypatch, precision):
    """The parts of a kernel gradient are summed straight into the (K, kh, kw, C) layout of
    the kernel, its bias gradient beside it, in one launch: the record and the update read
    every gradient in place."""
    import xpcnn.ops.cudnn_conv as cudnn_conv

    monkeypatch.setattr(cudnn_conv, "load", lambda: None)
    launches = step_launches("cifar", precision, batch=2, warmup=1, warmup_batch=1)
    assert launch_count(launches) == HAND_WRITTEN_CIFAR[precision], breakdown(launches)
    after = [launch for launch in launches if launch.kind == "copy"
             and launch.where in ("RunningTotals.add", "SGD._fused_update")]
    assert not after, breakdown(launches)
    sums = [launch for launch in launches if launch.name == "xpcnn_conv_sum_parts"]
    assert len(sums) == 4 and not [launch for launch in launches if launch.kind == "reduction"]
