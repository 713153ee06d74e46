"""One code path on every Array API backend: strict, PyTorch CPU, CuPy (where a GPU exists)."""

import types

import array_api_strict as xs
import numpy as np
import pytest
from nets import (
    add_relu_net,
    bn_relu_net,
    every_layer_net,
    frozen_trunk_model,
    fused_relu_net,
    gap_net,
    kept_for_backward,
    plan_of,
)

import xpcnn
from xpcnn import graph
from xpcnn import layers as L
from xpcnn.backend import get_backend
from xpcnn.errors import DeviceError
from xpcnn.layers.base import Options, RandomLayer
from xpcnn.ops.kernels import StandardKernels, compute_scope


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 40)


def _train(device, data, optimizer, net=every_layer_net, epochs=2, dtype="float32"):
    x, y = data
    model = xpcnn.Sequential(net(), device=device, seed=0, dtype=dtype)
    model.compile(optimizer=optimizer)
    history = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
                        validation_data=(x[:8], y[:8]))
    return model, history


def _sgd():
    return xpcnn.optim.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=f"weight array {i}")


@pytest.mark.parametrize("device", [xs, (xs, xs.Device("device1"))],
                         ids=["strict-default-device", "strict-device1"])
def test_training_runs_standard_only_under_array_api_strict(device, data):
    """array_api_strict rejects anything outside the standard and any mixing of devices; with
    its flags off, also boolean indexing and every function whose output's shape depends on
    the data (nonzero, unique_*): on a GPU each of those reads the host, and a CUDA graph's
    capture refuses them."""
    with xs.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        model, history = _train(device, data, _sgd())
    ref, ref_history = _train("cpu", data, _sgd())
    assert history.history["loss"] == pytest.approx(ref_history.history["loss"], rel=1e-5)
    assert_same_weights(model.get_weights(), ref.get_weights())
    probs = model.predict(data[0][:5])
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # model(x) leaves its outputs on the model's device, in its namespace.
    called = model(data[0][:5])
    assert type(called) is type(xs.asarray(0)) and called.device == model.backend.device
    np.testing.assert_array_equal(model.backend.to_numpy(called), probs)
    # Every parameter and optimiser slot stayed on the model's device.
    dev = model.backend.device
    for layer in model.layers:
        for a in (*layer.params.values(), *layer.state.values()):
            assert a.device == dev
    for slot in model.optimizer.slots.values():
        assert all(a.device == dev for a in slot)


@pytest.mark.parametrize("optimizer", [
    lambda: xpcnn.optim.SGD(0.05, clipvalue=0.5), lambda: xpcnn.optim.SGD(0.05, clipnorm=0.5),
    lambda: xpcnn.optim.RMSprop(1e-3, centered=True)],
    ids=["clipvalue", "clipnorm", "rmsprop-centered"])
def test_training_keeps_to_the_2023_12_standard(optimizer, data):
    """xpcnn is written against the 2023.12 standard, whose ``where`` takes arrays only (Python
    scalars came in 2024.12): a step with a capped ReLU, each clipping and a centered RMSprop,
    under array_api_strict held to 2023.12 whatever its own default, gives NumPy's numbers."""
    x, y = data[0][:32], data[1][:32]

    def trained(device):
        model = xpcnn.Sequential([L.Rescaling(1 / 255), L.Conv2D(4, 3), L.ReLU(max_value=1.0),
                                  L.MaxPool2D(2), L.Flatten(), L.Dense(10), L.Softmax()],
                                 device=device, seed=0)
        model.compile(optimizer=optimizer())
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        return model

    with xs.ArrayAPIStrictFlags(api_version="2023.12"):
        strict = trained(xs)
    assert_same_weights(strict.get_weights(), trained("cpu").get_weights())


# array_api_compat's aliases (1.16) that assign through boolean masks, reading the host: on
# CuPy ``clip`` and ``sign`` (which sets NaN's by mask there), on PyTorch ``sign``. xpcnn
# spells them otherwise (``where``); array_api_strict's own are clean, so the test below takes
# them away.
HOST_READING_ALIASES = ("clip", "sign")


def test_training_takes_none_of_compats_host_reading_aliases(data):
    """A full training step in the standard spelling (every layer, weighted, Adam with its
    gradients clipped, with validation) under array_api_strict without ``clip`` and ``sign``:
    it must not reach them."""
    without = types.ModuleType("array_api_strict_without_host_reads")
    without.__dict__.update({k: v for k, v in vars(xs).items()
                             if k not in HOST_READING_ALIASES and not k.startswith("__")})
    model = xpcnn.Sequential(every_layer_net(), device=without, seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(1e-3, clipvalue=0.5))  # (clipping: where, too)
    x, y = data
    with xs.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, class_weight={1: 2.0},
                  validation_data=(x[:8], y[:8]))
        probabilities = model.predict(x[:4])
    assert model.backend.xp is without  # (the step ran in it)
    assert np.isfinite(model.history.history["val_loss"][0])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _compat(name):
    import importlib

    return importlib.import_module(f"array_api_compat.{name}")


@pytest.mark.parametrize("namespace, dtype", [
    (namespace, dtype) for namespace in ("strict", "numpy", "torch")
    for dtype in ("float16", "float32", "float64")
    if (namespace, dtype) != ("strict", "float16")])  # (array_api_strict has no float16)
def test_standard_relu_against_numpy(namespace, dtype):
    """The standard ReLU (``where``, not ``clip``) in each namespace and dtype: NaN,
    infinities, zeros and the ceiling as NumPy's clip has them, in the input's dtype (a zero's
    sign aside: -0.0 stays -0.0, as in the CUDA kernel)."""
    if namespace == "torch":
        pytest.importorskip("torch", reason="PyTorch is not installed")
    xp = xs if namespace == "strict" else _compat(namespace)
    x = np.array([np.nan, -np.inf, -2.5, -0.0, 0.0, 0.5, 2.0, 3.0, np.inf], dtype)
    std = StandardKernels(xp)
    for cap in (None, 2.0, 6):
        y = std.relu(xp.asarray(x), cap)
        assert y.dtype == getattr(xp, dtype)
        got = np.asarray(y.cpu()) if namespace == "torch" else np.asarray(y)
        np.testing.assert_array_equal(got, np.clip(x, 0.0, cap))
        assert np.signbit(got[3]) and not np.signbit(got[4])


@pytest.mark.parametrize("make", [
    lambda: xpcnn.optim.Adam(1e-3),
    lambda: xpcnn.optim.RMSprop(1e-3, momentum=0.9, centered=True, weight_decay=1e-4),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, global_clipnorm=0.05)],
    ids=["adam", "rmsprop", "sgd-global-clipnorm"])
def test_strict_optimizers_and_float64(data, make):
    model, h = _train(xs, data, make(), net=gap_net, dtype="float64")
    ref, h_ref = _train("cpu", data, make(), net=gap_net, dtype="float64")
    assert_same_weights(model.get_weights(), ref.get_weights(), rtol=1e-10, atol=1e-12)


def test_strict_fused_relu_paths(data):
    """A first convolution's ReLU gradient masked chunk by chunk, ReLU() layers fused into the
    layer before them, ReLU gradients left to a FeatureNorm and to a max pool, in the
    standard spelling under array_api_strict, against NumPy's fast path."""
    model, _ = _train(xs, data, _sgd(), net=fused_relu_net, dtype="float64")
    ref, _ = _train("cpu", data, _sgd(), net=fused_relu_net, dtype="float64")
    conv, fnorm, conv_relu, pool, dense = (model.layers[i] for i in (2, 4, 5, 6, 8))
    ran, fused, handed = plan_of(model)
    assert fused == [conv.name, dense.name] and model.layers[3].name not in ran
    assert handed == [(conv.name, fnorm.name), (conv_relu.name, pool.name)]
    assert_same_weights(model.get_weights(), ref.get_weights(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_batchnorm_with_its_relu_fused_trains_as_with_relu_layers(device, data, monkeypatch):
    """BatchNorm2D with the ReLU() after it fused (its mask recomputed in backward, or left
    to a max pool) ends training with the weights, bit for bit, of the same model whose ReLU
    layers run on their own: on NumPy's fast path and in the standard spelling."""
    fused, _ = _train(device, data, _sgd(), net=bn_relu_net)
    ran, fused_layers, handed = plan_of(fused)
    assert fused_layers == ["batchnorm2d", "batchnorm2d_1"] and "relu" not in ran
    assert handed == [("batchnorm2d_1", "maxpool2d")]
    monkeypatch.setattr(xpcnn.layers.BatchNorm2D, "can_fuse_relu", False)
    apart, _ = _train(device, data, _sgd(), net=bn_relu_net)
    assert plan_of(apart)[1] == []
    for u, v in zip(fused.get_weights(), apart.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def train_frozen_trunk(device, data, functional, monkeypatch, keep_all=False,
                       precision="float32"):
    """:func:`nets.frozen_trunk_model` after two epochs (SGD), and its frozen layers; with
    ``keep_all``, every layer keeping what it kept before ``Options.keep_for_backward``."""
    with monkeypatch.context() as mp:
        if keep_all:
            mp.setattr(graph, "Options",
                       lambda **options: Options(**{**options, "keep_for_backward": True}))
        model, trunk = frozen_trunk_model(device, functional)
        model.compile(optimizer=_sgd(), precision=precision)
        model.fit(*data, epochs=2, batch_size=16, verbose=0)
    return model, trunk


def assert_trained_alike(a, b):
    """Models ``a`` and ``b`` hold the same weights, statistics and random states, bit for
    bit."""
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    for la, lb in zip(a.layers, b.layers, strict=True):
        if isinstance(la, RandomLayer):
            np.testing.assert_array_equal(la.backend.to_numpy(la.random_state),
                                          lb.backend.to_numpy(lb.random_state))


@pytest.mark.parametrize("functional", [False, True], ids=["sequential", "functional"])
@pytest.mark.parametrize("device", ["cpu", xs], ids=["numpy", "strict"])
def test_a_frozen_trunk_keeps_nothing_for_backward_and_trains_as_before(device, functional,
                                                                        data, monkeypatch):
    """The layers before every trained one (frozen, or without weights), whose backward never
    runs, keep nothing from a training pass (as PyTorch saves nothing for a module whose
    parameters need no gradient), while Dropout draws and a frozen BatchNorm2D normalises as
    before: the model ends training with the weights, statistics and random states, bit for
    bit, of the same model whose trunk keeps what it did before."""
    lean, trunk = train_frozen_trunk(device, data, functional, monkeypatch)
    assert {layer.name: kept_for_backward(layer) for layer in trunk} == \
        {layer.name: [] for layer in trunk}
    keeping, trunk = train_frozen_trunk(device, data, functional, monkeypatch, keep_all=True)
    assert any(kept_for_backward(layer) for layer in trunk)
    assert_trained_alike(lean, keeping)
    np.testing.assert_array_equal(lean.predict(data[0][:8]), keeping.predict(data[0][:8]))


def _train_add_relu_net(device, data, precision):
    model = xpcnn.Model(*add_relu_net(), device=device, seed=0)
    model.compile(optimizer=_sgd(), precision=precision)
    # (one epoch, 3 steps: a gradient summed or masked otherwise changes the first update)
    model.fit(*data, epochs=1, batch_size=16, verbose=0)
    return model


@pytest.mark.parametrize("device, precision", [("cpu", "float32"), ("cpu", "mixed_float16"),
                                               (xs, "float32")],
                         ids=["numpy", "numpy-mixed", "strict"])
def test_adds_with_their_relu_fused_train_as_with_relu_layers(device, precision, data,
                                                              monkeypatch):
    """Add layers with the ReLU() after them fused, summing the gradients of an output read
    two and three times as they apply their ReLU's (or leaving it to a max pool), end training
    with the weights, bit for bit, of the same model with those gradients summed by the model
    first, and with its ReLU layers run on their own: on NumPy's fast path (float16
    activations and gradients too) and in the standard spelling."""
    train = lambda: _train_add_relu_net(device, data, precision)  # noqa: E731
    fused = train()
    plan = fused._plan()
    ran, fused_layers, handed = plan_of(fused)
    assert fused_layers == ["stem_bn", "add_1", "add_2", "add_3", "add_4"]
    assert not any(name.startswith("relu_") for name in ran)
    assert handed == [("add_4", "pool")]
    writer = {s.output: s.layer.name for s in plan.steps}
    assert sorted(writer[i] for i in plan.gathered) == ["add_1", "add_2"]
    assert [s.layer.name for s in plan.steps if s.options.sum_output_grads] == ["add_1", "add_2"]
    monkeypatch.setattr(xpcnn.layers.Add, "can_sum_output_grads", False)
    summed_first = train()
    assert not summed_first._plan().gathered
    monkeypatch.setattr(xpcnn.layers.Add, "can_fuse_relu", False)
    apart = train()
    assert plan_of(apart)[1] == ["stem_bn"]
    for other in (summed_first, apart):
        for u, v in zip(fused.get_weights(), other.get_weights(), strict=True):
            np.testing.assert_array_equal(u, v)


def test_pytorch_cpu_ends_with_the_same_weights_as_numpy(data):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import array_api_compat.torch as xt

    for opt in (_sgd, lambda: xpcnn.optim.AdamW(1e-3)):
        ref, _ = _train("cpu", data, opt(), epochs=3,
                        net=every_layer_net if opt is _sgd else gap_net)
        model, _ = _train(xt, data, opt(), epochs=3,
                          net=every_layer_net if opt is _sgd else gap_net)
        assert all(isinstance(w, torch.Tensor) for la in model.layers for w in la.params.values())
        assert_same_weights(model.get_weights(), ref.get_weights())


def test_same_seed_same_weights_bit_identical(data):
    a, _ = _train("cpu", data, _sgd())
    b, _ = _train("cpu", data, _sgd())
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        assert np.array_equal(u, v)
    c = xpcnn.Sequential(every_layer_net(), input_shape=(8, 8, 3), seed=1)
    fresh = xpcnn.Sequential(every_layer_net(), input_shape=(8, 8, 3), seed=0)
    assert not np.array_equal(c.get_weights()[0], fresh.get_weights()[0])


def test_one_seed_gives_the_same_initial_weights_on_every_backend():
    a = xpcnn.Sequential(every_layer_net(), input_shape=(8, 8, 3), seed=7)
    b = xpcnn.Sequential(every_layer_net(), input_shape=(8, 8, 3), seed=7, device=xs)
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        assert np.array_equal(u, v)


@pytest.mark.parametrize("flag", ["tpu", "cuda:x", "cpu:1", 3, "gpu:-1"])
def test_unknown_device_is_a_clear_error(flag):
    with pytest.raises(DeviceError, match="expected 'cpu', 'cuda', 'cuda:N'"):
        get_backend(flag)


def test_one_to_host_copies_every_namespaces_arrays_for_the_backend_and_the_loss():
    """backend.to_host is the one device -> host copy (the loss had its own, telling CuPy and
    PyTorch by duck typing: a PyTorch tensor, which has no __array_namespace__, stayed one)."""
    torch = pytest.importorskip("torch")

    from xpcnn import losses
    from xpcnn.backend import to_host

    assert not hasattr(losses, "_to_host")
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for a in (xs.asarray(values), torch.asarray(values, requires_grad=True)):
        host = to_host(a)
        assert type(host) is np.ndarray and np.array_equal(host, values)
        assert np.array_equal(get_backend("cpu").to_numpy(a), values)
    assert to_host(values) is values and to_host([1, 2]) == [1, 2] and to_host(3.0) == 3.0
    assert get_backend("cpu").to_numpy(np.float32(2)).shape == ()  # (a scalar: 0-d)
    weights = torch.asarray([1.0, 1.0], requires_grad=True)  # (was kept a tensor, refused)
    loss = xpcnn.SoftmaxCrossEntropy(from_logits=True)(
        torch.asarray([0, 1]), xs.asarray([[2.0, 0.0], [0.0, 2.0]]), weights)
    assert float(loss) == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)


def test_compute_scope_makes_a_cupy_backends_gpu_current():
    """On CuPy a run of work happens with the model's GPU current (where CuPy allocates and
    launches: the CuPy kernels' outputs would otherwise land on GPU 0 for a "cuda:1" model).
    Checked with a stand-in device, so it runs without a GPU."""
    import array_api_compat.numpy as xpn

    from xpcnn.backend import Backend, set_fast_path

    current = []  # the stand-in runtime's devices made current (CuPy's setDevice), in order

    class Device:
        def __init__(self, index):
            self.id = index

        def __enter__(self):
            current.append(self.id)

        def __exit__(self, *exc):
            current.pop()

    old = set_fast_path(False)  # (the CuPy kernels need CuPy)
    try:
        backend = Backend(xpn, Device(1), "cupy")
        with compute_scope(backend):
            assert current == [1]
        assert current == []
        # a Device of its own each time: CuPy keeps the ids to go back to on the object, and
        # the loop's scope and the prefetch thread's are entered at once
        scopes = [backend.on_device() for _ in range(2)]
        assert scopes[0] is not scopes[1] and {s.id for s in scopes} == {1}
        assert backend.device not in scopes
        with compute_scope(get_backend("cpu")):
            assert current == []
    finally:
        set_fast_path(old)


def test_the_backend_module_names_no_ops_module():
    """backend.py is the bottom layer: the fast kernels' modules are found (and imported) by
    xpcnn.ops.kernels, not by a string in backend.py that no import tool sees."""
    import ast
    import inspect

    from xpcnn import backend as backend_module

    tree = ast.parse(inspect.getsource(backend_module))
    named = [node.value for node in ast.walk(tree)  # (a module name: no docstring's prose)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and "ops." in node.value and not any(c.isspace() for c in node.value)]
    imported = [node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and "ops" in node.module]
    assert named == [] and imported == []
    assert not hasattr(backend_module, "importlib")
    assert not hasattr(backend_module.Backend, "fast")
    assert not hasattr(backend_module.Backend, "compute_scope")


def test_a_gpu_chunk_bound_of_none_is_the_whole_batch(monkeypatch):
    """GPU_CHUNK_BYTES = None (scripts/bench_gpu.py --gpu-chunk-mb 0) reaches the im2col loops
    as no bound: one chunk of the whole batch; the CPU's bound is always a number."""
    import array_api_compat.numpy as xpn

    from xpcnn import backend as backend_module
    from xpcnn.ops.im2col import images_per_chunk

    gpu_like = backend_module.Backend(xpn, "cpu", "cupy")
    assert gpu_like.chunk_bytes == backend_module.GPU_CHUNK_BYTES
    assert isinstance(get_backend("cpu").chunk_bytes, int)
    monkeypatch.setattr(backend_module, "GPU_CHUNK_BYTES", None)
    assert gpu_like.chunk_bytes is None
    assert images_per_chunk(512, 1 << 20, gpu_like.chunk_bytes, gpu_like.min_chunks) == 512


def test_cuda_without_cupy_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(DeviceError, match=r"xpcnn\[cuda12\]"):
        get_backend("cuda")
    assert get_backend("auto").name == "numpy"


def test_model_moves_between_devices(data):
    model, _ = _train("cpu", data, _sgd())
    before = model.predict(data[0][:4])
    model.to((xs, xs.Device("device1")))
    assert model.backend.name == "array_api_strict"
    np.testing.assert_allclose(model.predict(data[0][:4]), before, rtol=1e-6)
    model.fit(data[0], data[1], epochs=1, batch_size=16, verbose=0)  # optimiser state moved too
    model.to("cpu")
    assert all(isinstance(w, np.ndarray) for la in model.layers for w in la.params.values())


@pytest.mark.parametrize("fail_at", [1, 7, 10**6])  # a layer's weight; an optimiser slot
def test_a_move_that_fails_partway_leaves_the_model_where_it_was(data, fail_at, monkeypatch):
    """Out of device memory in the middle of ``to``: every weight, statistic and optimiser slot
    stays on the old device, and the model trains on there (was: some layers moved, the model
    unusable on either device)."""
    model, _ = _train("cpu", data, _sgd())
    weights, slots = model.get_weights(), model.optimizer.slots
    copies = [0]
    real = xpcnn.Backend.asarray

    def asarray(self, a, dtype=None):
        copies[0] += 1
        if copies[0] >= fail_at and self.name == "array_api_strict":
            raise MemoryError("out of device memory")
        return real(self, a, dtype)

    monkeypatch.setattr(xpcnn.Backend, "asarray", asarray)
    if fail_at < 10**6:
        with pytest.raises(MemoryError):
            model.to((xs, xs.Device("device1")))
    else:  # (the count the whole move takes: a failure at the very last copy)
        model.to((xs, xs.Device("device1")))
        moved = copies[0]
        model.to("cpu")
        copies[0], fail_at = 0, moved
        with pytest.raises(MemoryError):
            model.to((xs, xs.Device("device1")))
    monkeypatch.undo()
    assert model.backend.name == "numpy" and model.optimizer.slots.keys() == slots.keys()
    for layer in model.layers:
        assert all(isinstance(a, np.ndarray) for a in (*layer.params.values(),
                                                      *layer.state.values()))
    assert all(isinstance(a, np.ndarray) for v in model.optimizer.slots.values() for a in v)
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    model.fit(*data, epochs=1, batch_size=16, verbose=0)


def _cupy_ready():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_ready(), reason="needs CuPy and a CUDA GPU")
def test_numpy_and_cupy_training_steps_agree(data, monkeypatch):
    monkeypatch.setenv("XPCNN_TF32", "0")  # (cuDNN's default TF32 differs from float32 by ~3e-4)
    ref, _ = _train("cpu", data, _sgd())
    model, _ = _train("cuda", data, _sgd())
    assert model.backend.name == "cupy"
    # Dropout and augmentation draw from CuPy's generator on the GPU, so compare a net
    # without them for the weights, and the full net for finite training.
    ref2, _ = _train("cpu", data, _sgd(), net=gap_net)
    gpu2, _ = _train("cuda", data, _sgd(), net=gap_net)
    assert_same_weights(gpu2.get_weights(), ref2.get_weights())
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# Each way a device array reaches the host: on a GPU, every one makes the host wait for the device.
_TO_HOST = ("__array__", "__bool__", "__complex__", "__dlpack__", "__float__", "__index__",
            "__int__", "__iter__", "to_device")


def _crossings(monkeypatch):
    """Record every device -> host crossing of a strict array and every upload (Backend.asarray)."""
    seen = []
    array = type(xs.asarray(0))
    for name in _TO_HOST:
        real = getattr(array, name)
        monkeypatch.setattr(array, name, lambda self, *a, _real=real, _name=name, **k: (
            seen.append(_name), _real(self, *a, **k))[1])
    upload = xpcnn.Backend.asarray
    monkeypatch.setattr(xpcnn.Backend, "asarray", lambda self, *a, **k: (
        seen.append("upload"), upload(self, *a, **k))[1])
    return seen


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_training_step_never_waits_for_the_device(data, optimizer, monkeypatch):
    """Data on the device, a learning rate that changes every step, every layer type, validation:
    what crosses between host and device depends on the epochs, not on the steps (the running
    totals are read when an epoch ends), and no device value ever becomes a Python number (a
    ``float(loss)`` or an ``if xp.any(...)`` in a step would)."""
    rate = xpcnn.optim.CosineDecay(1e-2, 100)
    opt = {"sgd": lambda: xpcnn.optim.SGD(rate, momentum=0.9), "adam": lambda: xpcnn.optim.Adam(
        rate, weight_decay=1e-3)}[optimizer]
    x, y = xs.asarray(data[0]), xs.asarray(data[1])
    counts = []
    for batch_size in (20, 8):  # 2 and 5 steps an epoch (both under READ_EVERY)
        model = xpcnn.Sequential(every_layer_net(), device=xs, seed=0)
        model.compile(optimizer=opt())
        model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)  # (builds, makes scratch)
        seen = _crossings(monkeypatch)
        model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0,
                  validation_data=(x[:8, ...], y[:8]))
        monkeypatch.undo()
        assert not set(seen) - {"upload", "__dlpack__"}, seen
        counts.append(len(seen))
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_a_layer_moved_keeps_its_bfloat16_compute_dtype(device):
    """Layer.to named a bfloat16 dtype "float16" ("float16" is in "bfloat16"), so a
    mixed_bfloat16 model moved to another backend computed in float16."""
    from xpcnn.backend import dtype_name

    if device == "torch":
        torch = pytest.importorskip("torch")
        device = torch
    model = xpcnn.Sequential([xpcnn.layers.Dense(3)], input_shape=(4,), seed=0)
    model.compile(optimizer="sgd", precision="mixed_bfloat16")
    model.to(device)
    layer = model.layers[0]
    assert dtype_name(layer.compute_dtype) == "bfloat16"
    assert dtype_name(layer.dtype) == "float32"
    for name in ("float16", "bfloat16", "float32", "float64"):
        assert dtype_name(model.backend.dtype(name)) == name


def test_one_dtype_name_next_to_backend_dtype():
    """A dtype's name was made in layers.arguments (float dtypes) and again in graph (any
    dtype, for errors): one function in backend.py now does both."""
    torch = pytest.importorskip("torch")

    from xpcnn import graph
    from xpcnn.backend import dtype_name
    from xpcnn.layers import arguments

    assert not hasattr(arguments, "dtype_name") and not hasattr(graph, "_dtype")
    for dtype, name in ((xs.float32, "float32"), (torch.float16, "float16"),
                        (np.dtype("float16"), "float16"), (np.float32, "float32")):
        assert dtype_name(dtype) == name
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(xs.float64) == "float64"
    with pytest.raises(xpcnn.InputError, match="unsupported dtype .*int32.* expected float16"):
        dtype_name(xs.int32)
    for dtype in (xs.int32, np.dtype("int32"), torch.int32):
        assert dtype_name(dtype, float_only=False) == "int32"
