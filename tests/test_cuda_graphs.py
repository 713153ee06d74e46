"""CUDA-graph capture of the training step (xpcnn.cuda_graphs), the parts a CPU can check: when
a step is warmed up, captured, replayed or run eagerly and why; the optimisers' update with
device scalars; and whole fits through the graph runner against eager fits, with a stand-in
capture whose "graph" re-runs the recorded step on the same static buffers and device
scalars (a real capture only records, so the stand-in undoes the recording run's writes).
tests/test_cuda_kernels_on_cpu.py captures the CuPy update kernels (emulated) and replays them;
tests/test_gpu.py checks replays against eager steps with CuPy's real stream capture."""

import contextlib

import array_api_compat.numpy as xpn
import numpy as np
import pytest
from cuda_emulator import RawKernel, load_emulated_fast_cupy, needs_compiler, restore
from kernel_cases import EVERY_OPTIMISER
from nets import gap_net

import xpcnn
from xpcnn import backend as backend_module
from xpcnn import optim
from xpcnn.cuda_graphs import blockers
from xpcnn.errors import InputError, NonFiniteError
from xpcnn.layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    GlobalAvgPool2D,
    RandomCrop,
    RandomFlip,
    ReLU,
)
from xpcnn.losses import SoftmaxCrossEntropy
from xpcnn.model import Model
from xpcnn.ops import kernels as kernels_module
from xpcnn.training import step as step_module


class FakeCapture:
    """Records a step instead of running it, as stream capture does; ``launch`` runs the
    recorded step again and writes its outputs where the capture's outputs are. A real replay
    runs no Python, so it computes with the host values the capture saw: each launch runs with
    the host objects' numbers and losses (the layers', the model's and its loss's: a loss's
    label_smoothing, counters, flags) as they were at capture, then puts back those of now. A
    step that kept per-step state on the host repeats itself here, and a host value changed
    since the capture is not seen, as on a GPU. While it records, the namespace's matrix
    products raise, as cuBLAS calls do in CuPy 14."""

    def __init__(self, arrays, layers=(), hosts=()):
        self.arrays, self.captures, self.launches, self.fail = arrays, 0, 0, None
        self.hosts, self.scoped = (*layers, *hosts), 0

    def _host_values(self):
        return [(obj, {k: v for k, v in vars(obj).items()
                       if isinstance(v, int | float | SoftmaxCrossEntropy)})
                for obj in self.hosts]

    @contextlib.contextmanager
    def scope(self):
        self.scoped += 1
        yield

    def capture(self, fn):
        if self.fail is not None:
            raise self.fail
        before = [(a, np.array(a, copy=True)) for _, a in self.arrays()]
        host = self._host_values()
        with _cublas_refused():
            out = fn()
        for a, value in before:  # a capture records the work, it does not do it
            a[...] = value
        for obj, values in host:
            vars(obj).update(values)
        self.captures += 1
        return (fn, out, host), out

    def launch(self, graph):
        fn, out, captured = graph
        now = self._host_values()
        for obj, values in captured:
            vars(obj).update(values)
        out[...] = fn()
        for obj, values in now:
            vars(obj).update(values)
        self.launches += 1


@contextlib.contextmanager
def _cublas_refused():
    """The namespace's matrix products raise, as CuPy 14 refuses cuBLAS calls during a stream
    capture ("calling cuBLAS API during stream capture is currently unsupported"): a captured
    step's products must go through the kernels (cuDNN graphs on CuPy, ``capturable``). So do
    the functions whose array_api_compat spelling on CuPy reads the host (boolean-mask
    indexing: ``clip``; an output sized by the data: ``nonzero``, ``unique_*``), which a
    capture refuses too ("operation not permitted when stream is capturing")."""

    def refused(*args, **kwargs):
        raise RuntimeError("calling cuBLAS API during stream capture is currently unsupported")

    def reads_the_host(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.MonkeyPatch.context() as mp:
        for module in (xpn, xpn.linalg):
            for name in ("matmul", "tensordot", "vecdot"):
                mp.setattr(module, name, refused)
        for name in ("clip", "nonzero", "unique_all", "unique_counts", "unique_inverse",
                     "unique_values"):
            mp.setattr(xpn, name, reads_the_host)
        yield


def _runner(model, warmup=2):
    """The StepGraphs that Model._step_graphs makes on CuPy, here over NumPy with the
    stand-in capture."""
    model.cuda_graphs_reason = ""
    with pytest.MonkeyPatch.context() as mp:  # (NumPy: "not CuPy" otherwise)
        mp.setattr(step_module, "graph_blockers", lambda backend: [])
        graphs = model._step_graphs()
    capture = FakeCapture(model._graph_arrays, model.layers, (model, model.loss, model.optimizer))
    graphs.capture, graphs.warmup = capture, warmup
    return graphs, capture


def _model(layers, optimizer, dtype="float64"):
    model = xpcnn.Sequential(layers, seed=3, dtype=dtype)
    model.compile(optimizer=optimizer)
    return model


def _data(n=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _bn_net():
    return [Conv2D(6, 3, padding="same"), BatchNorm2D(), ReLU(), GlobalAvgPool2D(), Dense(10)]


def _random_net():
    """Every random layer: augmentation first, dropout inside."""
    return [RandomFlip(), RandomCrop(2), Conv2D(6, 3, padding="same"), ReLU(), Dropout(0.3),
            GlobalAvgPool2D(), Dense(10)]


@pytest.fixture(scope="module", params=["numpy", pytest.param("cupy", marks=needs_compiler)])
def kernels(request):
    """The model's kernels: NumPy's own (in-place updates, given the device scalars in a
    captured step), or CuPy's compiled for the CPU (tests/cuda_emulator.py: fused updates
    reading device scalars)."""
    if request.param == "numpy":
        yield None
        return
    module, saved = load_emulated_fast_cupy()
    module.KERNELS.conv_kernels.set_algorithm("direct")  # (the tiled kernels' emulation is slow)
    # (each raw kernel run once, not again in reverse to compare: captures, replays and whole
    # fits are checked here, and test_cuda_kernels_on_cpu checks the kernels in both schedules,
    # as test_launch_counts does)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RawKernel, "check_schedules", False)
        yield module.KERNELS
    restore(saved)


@pytest.mark.parametrize("net", [gap_net, _bn_net, _random_net])
@pytest.mark.parametrize("make_optimizer", [
    lambda: optim.SGD(optim.StepDecay(0.05, 2, 0.5), momentum=0.9),  # the rate changes
    lambda: optim.AdamW(optim.CosineDecay(3e-3, 7)),
])
def test_a_fit_through_captured_steps_equals_an_eager_fit(monkeypatch, kernels, net,
                                                          make_optimizer):
    """Batches of 16 of 40: per epoch two full batches (warmed up, then captured and
    replayed) and a tail of 8 (a shape of its own: warmed up in the first two epochs, captured
    in the third, replayed in the fourth): the same weights, losses and step count as a fit
    without graphs, the learning-rate schedule reaching every replay. With CuPy's kernels the
    captured steps' updates are the fused ones reading the device scalars (the stand-in's
    replays re-run the step, so their update tables are made as in eager steps)."""
    if kernels is not None:
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        launched, launch = [], type(kernels)._launch_updates

        def counted(self, kernel, *args):
            launched.append(kernel.name)
            launch(self, kernel, *args)

        monkeypatch.setattr(type(kernels), "_launch_updates", counted)
    x, y = _data()
    eager = _model(net(), make_optimizer())
    eager_history = eager.fit(x, y, epochs=4, batch_size=16, verbose=0)
    graphed = _model(net(), make_optimizer())
    graphed.build((12, 12, 3))
    graphs, capture = _runner(graphed)
    if kernels is not None:  # (the stand-in needs neither cuDNN nor deferred tables)
        graphs.capturable, graphs.capture_tables = contextlib.nullcontext, lambda: (
            contextlib.nullcontext([]))
        launched.clear()
    history = graphed.fit(x, y, epochs=4, batch_size=16, verbose=0)
    # 16: warm-up 2, captured 1, replayed 5; 8: warm-up 2, captured 1, replayed 1
    assert (capture.captures, capture.launches) == (2, 8)
    if kernels is not None:  # 4 warm-up, 2 captured, 8 launched steps: none eager
        kind = "sgd" if isinstance(graphed.optimizer, optim.SGD) else "adam"
        assert sorted(launched) == [f"xpcnn_{kind}_at"] * 14
    assert graphed.optimizer.iterations == eager.optimizer.iterations == 12
    np.testing.assert_allclose(history.history["loss"], eager_history.history["loss"],
                               rtol=1e-12)
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("targets", ["labels", "one-hot"])
def test_weighted_fits_through_captured_steps_equal_eager_fits(monkeypatch, kernels, targets):
    """fit's sample weights reach a replay through a static buffer as the batch does, its
    class weights as an array the graphs were captured with: a later fit without them (one
    array fewer) captures every shape again; one with other batches (a new batch size, no
    sample weights) captures its own shape beside the others. Same weights as eager fits.
    With CuPy's kernels, the loss of integer labels or one-hot rows, weighted or not, is
    their fused kernel's in every step (it was the standard version's with weights)."""
    standard = []
    if kernels is not None:
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
        for module in (kernels_module, xpcnn.losses):  # (the standard loss, either place)
            monkeypatch.setattr(module, "cross_entropy", lambda *a, real=module.cross_entropy,
                                **k: standard.append(1) or real(*a, **k))
    x, y = _data()
    if targets == "one-hot":
        y = np.eye(10)[y]
    w = np.random.default_rng(5).uniform(0.0, 2.0, 40)
    fits = [dict(batch_size=16, sample_weight=w, class_weight={3: 4.0}),
            dict(batch_size=16, sample_weight=w),  # the class weights gone
            dict(batch_size=8),  # the sample weights gone, another batch size
            dict(batch_size=8, class_weight={1: 0.5})]
    eager = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed.build((12, 12, 3))
    graphs, capture = _runner(graphed)
    if kernels is not None:
        graphs.capturable, graphs.capture_tables = contextlib.nullcontext, lambda: (
            contextlib.nullcontext([]))
    captures = []
    for kwargs in fits:
        h_eager = eager.fit(x, y, epochs=3, verbose=0, **kwargs)
        h_graphed = graphed.fit(x, y, epochs=3, verbose=0, **kwargs)
        captures.append((capture.captures, capture.launches))
        np.testing.assert_allclose(h_graphed.history["loss"], h_eager.history["loss"],
                                   rtol=1e-12)
        for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    # 16 and the tails of 8: each 2 warm-up, a capture, replays (4 launches and 1); the
    # class weights gone: the same again; batch 8 (5 an epoch): 2 warm-up, capture, 12
    # replays; class weights added: all again
    assert captures == [(2, 5), (4, 10), (5, 23), (6, 36)]
    assert len(graphed._graphs.graphs) == 1
    assert not standard


def test_top_k_metrics_count_in_captured_steps_as_in_eager_ones(monkeypatch, kernels):
    """Top-k counts go to the running totals with the step, written in place (a captured
    step writes the arrays it was captured with): the replayed fit logs the eager fit's
    values, train_on_batch's replay its own step's, and a fit of a model compiled without
    them captures the same arrays as before (only the totals are longer with them). With
    CuPy's kernels, the fused loss and record kernels run, and the counts beside them."""
    from xpcnn.metrics import SparseTopKCategoricalAccuracy

    if kernels is not None:
        monkeypatch.setattr(kernels_module, "fast_kernels", lambda backend: kernels)
    x, y = _data()
    metrics = ["accuracy", "sparse_top_k_categorical_accuracy",
               SparseTopKCategoricalAccuracy(2, "top2")]
    models = []
    for _ in range(2):
        model = xpcnn.Sequential(gap_net(), seed=3, dtype="float64")
        model.compile(optimizer=optim.SGD(0.05, momentum=0.9), metrics=metrics)
        models.append(model)
    eager, graphed = models
    graphed.build((12, 12, 3))
    graphs, capture = _runner(graphed)
    if kernels is not None:
        graphs.capturable, graphs.capture_tables = contextlib.nullcontext, lambda: (
            contextlib.nullcontext([]))
    h_eager = eager.fit(x, y, epochs=4, batch_size=16, verbose=0, validation_data=(x, y))
    h_graphed = graphed.fit(x, y, epochs=4, batch_size=16, verbose=0, validation_data=(x, y))
    assert (capture.captures, capture.launches) == (2, 8)
    assert list(h_graphed.history) == list(h_eager.history)
    for name in ("loss", "accuracy", "sparse_top_k_categorical_accuracy", "top2"):
        np.testing.assert_allclose(h_graphed.history[name], h_eager.history[name], rtol=1e-12)
        np.testing.assert_allclose(h_graphed.history[f"val_{name}"],
                                   h_eager.history[f"val_{name}"], rtol=1e-12)
    top2 = h_eager.history["top2"][-1]
    top5 = h_eager.history["sparse_top_k_categorical_accuracy"][-1]
    assert 0 < top2 < top5 <= 1
    for _ in range(3):  # the 16-sample graph replayed (train_step keeps copies)
        logs = [m.train_on_batch(x[:16], y[:16], return_dict=True) for m in (eager, graphed)]
        assert logs[1] == pytest.approx(logs[0], rel=1e-12)
    assert capture.launches == 11
    state = graphed._running_totals().state
    assert state.shape == (4 + 3 * 7 + 2,)  # [sums, flag, loss, 7 gradients' flags and marks,
    # then the counts of k = 5 and k = 2]


@pytest.mark.parametrize("change", ["label_smoothing set", "model.loss replaced"])
def test_a_loss_changed_after_the_capture_is_captured_again(change):
    """A replay computes with the loss it was captured with: a callback that sets
    ``model.loss.label_smoothing`` mid-fit, or a new ``model.loss`` between fits, captures
    the steps again (a replay kept the capture's smoothing, silently), and the fits equal
    eager ones."""
    from xpcnn.callbacks import LambdaCallback

    x, y = _data()
    eager = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed.build((12, 12, 3))
    _, capture = _runner(graphed)
    histories = []
    for model in (eager, graphed):
        if change == "label_smoothing set":
            smooth = LambdaCallback(on_epoch_begin=lambda epoch, logs, m=model: setattr(
                m.loss, "label_smoothing", 0.3 * (epoch >= 3)))
            history = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[smooth])
        else:
            model.fit(x, y, epochs=3, batch_size=16, verbose=0)
            model.loss = SoftmaxCrossEntropy(label_smoothing=0.5)
            history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        histories.append(history.history["loss"])
    assert capture.captures == 3  # 16 and 8 before the change, 16 again after it
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-12)
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


class _GainFromStep5(optim.SGD):
    """A user's optimiser whose step_scalars() gains a name from step 5 on (a gain of 1)."""

    def step_scalars(self):
        scalars = super().step_scalars()
        return {**scalars, "gain": 1.0} if self.iterations >= 4 else scalars

    def _update(self, xp, i, p, g, scalars, apply):
        super()._update(xp, i, p, g * scalars.get("gain", 1.0), scalars, apply)


def test_an_optimisers_new_scalar_names_capture_the_steps_again():
    """Where step_scalars() gives other names, the runner's device scalars are made anew, and
    the graphs captured reading the old ones are captured again (they read scalars that no
    schedule reached any more, freed on a GPU): the fit equals an eager fit."""
    x, y = _data()
    eager = _model(gap_net(), _GainFromStep5(optim.StepDecay(0.2, 3, 0.5)))
    graphed = _model(gap_net(), _GainFromStep5(optim.StepDecay(0.2, 3, 0.5)))
    graphed.build((12, 12, 3))
    _, capture = _runner(graphed)
    h_eager = eager.fit(x, y, epochs=5, batch_size=16, verbose=0)
    h_graphed = graphed.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert capture.captures == 3  # 16 before step 5; 16 and 8 after it
    np.testing.assert_allclose(h_graphed.history["loss"], h_eager.history["loss"], rtol=1e-12)
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_train_on_batch_with_class_weights_keeps_its_graphs():
    """Each train_on_batch with class weights writes them into the one device table the graph
    was captured with: later calls replay it, with their own weights (not a capture each)."""
    x, y = _data(16)
    eager = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed = _model(gap_net(), optim.SGD(0.05, momentum=0.9))
    graphed.build((12, 12, 3))
    graphs, capture = _runner(graphed)
    for i in range(6):
        for model in (eager, graphed):
            model.train_on_batch(x, y, class_weight={1: 2.0 + i, 7: 0.5 * i})
    assert (capture.captures, capture.launches) == (1, 4)  # warm-up 2, capture, 3 replays
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_a_shape_whose_capture_fails_runs_eagerly_beside_the_others():
    """A capture refused for one batch shape while another's graph works: that shape runs
    eagerly, the other's graph stays (a first capture refused turns graphs off, as before)."""
    model = _model(gap_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    xb, yb = model._to_device(_data(8)[0]), np.zeros(8, np.int64)
    for _ in range(4):  # warm-up 2, capture, replay
        graphs.run(xb, yb)
    capture.fail = RuntimeError("out of memory allocating 1024 bytes")
    tail = (xb[:3], yb[:3])
    assert [graphs.decide(*tail) for _ in range(1)] == ["warmup"]
    for _ in range(3):
        graphs.run(*tail)
    assert graphs.decide(*tail) == "eager" and graphs.run(*tail) is None
    assert graphs.refused == {graphs._shape: "capturing the step failed: out of memory "
                                             "allocating 1024 bytes"}
    assert graphs.reason == "" and graphs.decide(xb, yb) == "replay"


def test_a_replay_refills_only_the_numbers_that_changed():
    """Before each replay the step's numbers go to the device scalars the graph reads, each
    fill a launch on CuPy: a constant learning rate is put there once, the step count at every
    step, a schedule's rate whenever it moves."""
    fills = []

    class Counted(np.ndarray):
        def __setitem__(self, key, value):
            fills.append(self.name)
            super().__setitem__(key, value)

    for lr, want_lr in ((0.01, 0), (optim.StepDecay(0.05, 2, 0.5), 2)):
        model = _model(gap_net(), optim.SGD(lr, momentum=0.9))
        model.build((12, 12, 3))
        graphs, capture = _runner(model)
        # (the device scalars made here, counting their fills, holding nothing yet)
        graphs._scalars = {k: np.zeros((), np.float64).view(Counted) for k in ("lr",
                                                                               "iteration")}
        for k, a in graphs._scalars.items():
            a.name = k
        graphs._filled = {"lr": None, "iteration": None}
        xb, yb = model._to_device(_data(8)[0]), np.zeros(8, np.int64)
        for _ in range(6):  # warm-up 2, capture, 3 replays (the schedule: 0.05 x 2, 0.025 x 2,
            graphs.run(xb, yb)  # 0.0125 x 2)
        assert capture.launches == 4
        assert fills.count("iteration") == 6 and fills.count("lr") == 1 + want_lr
        fills.clear()


def test_decisions_per_batch_shape_and_when_weights_are_replaced():
    """Each batch shape (and dtype, and sample weights or none) is warmed up and captured on
    its own, an epoch's tail as any other; new weights drop every graph; past ``max_graphs``
    the least recently replayed goes."""
    model = _model(gap_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    xb = model._to_device(_data(8)[0])
    yb = np.zeros(8, np.int64)
    full, tail = (xb, yb), (xb[:3], yb[:3])
    done = []
    for batch in [full, tail, full, full, full, tail, full, tail, full]:
        done.append(graphs.decide(*batch))
        graphs.run(*batch)
    assert done == ["warmup", "warmup", "warmup", "capture", "replay", "warmup", "replay",
                    "capture", "replay"]
    assert len(graphs.graphs) == 2 and capture.captures == 2
    model.set_weights(model.get_weights())  # new arrays: the graphs would read the old ones
    assert [graphs.decide(*batch) for batch in (full, tail)] == ["warmup", "warmup"]
    assert graphs.graphs == {}
    for _ in range(3):
        graphs.run(*full)
    assert graphs.decide(*full) == "replay" and capture.captures == 3
    weighted = (xb, yb, np.ones(8))
    others = [weighted, (xb, yb.astype(np.int32)), (xb.astype(np.float32), yb)]
    assert [graphs.decide(*batch) for batch in others] == ["warmup"] * 3
    graphs.max_graphs = 2
    for batch in [weighted] * 3 + [full] + [others[1]] * 3:
        graphs.run(*batch)
    # (the weighted batches' graph was the least recently replayed: it went for the int32's)
    assert [shape[3] for shape in graphs.graphs] == [np.int64, np.int32]
    assert graphs.decide(*weighted) == "warmup"


def test_the_update_tables_are_filled_after_the_capture_and_held_with_its_graph():
    """The kernels' ``capture_tables`` context spans the capture alone: it is left (and fills
    the tables) after the capture ended and before the graph's first launch, and the tables
    live as long as that graph (a new capture holds its own)."""
    events = []

    class LoggedCapture(FakeCapture):
        def capture(self, fn):
            events.append("capture")
            return super().capture(fn)

        def launch(self, graph):
            events.append("launch")
            super().launch(graph)

    @contextlib.contextmanager
    def capture_tables():
        tables = []
        events.append("capture_tables")
        yield tables
        events.append("filled")
        tables.append(f"table {events.count('filled')}")

    model = _model(gap_net(), optim.Adam(1e-3))
    model.build((12, 12, 3))
    graphs, _ = _runner(model)
    graphs.capture = LoggedCapture(model._graph_arrays)
    graphs.capture_tables = capture_tables
    xb, yb = model._to_device(_data(8)[0]), np.zeros(8, np.int64)
    for _ in range(4):  # warm-up 2, capture, replay
        graphs.run(xb, yb)
    assert events == ["capture_tables", "capture", "filled", "launch", "launch"]
    assert [g.tables for g in graphs.graphs.values()] == [["table 1"]]
    model.set_weights(model.get_weights())  # new arrays: warmed up and captured again
    for _ in range(3):
        graphs.run(xb, yb)
    assert events[5:] == ["capture_tables", "capture", "filled", "launch"]
    assert [g.tables for g in graphs.graphs.values()] == [["table 2"]]


def test_a_replay_checks_the_models_arrays_unnamed_in_the_named_lists_order():
    """What a replay checks (the arrays alone, no names formatted) is the named list of every
    array that outlives a step, in its order: parameters, statistics, optimiser slots, random
    states, the running totals, the float16 loss scale."""
    model = xpcnn.Sequential([*_random_net()[:3], BatchNorm2D(), *_random_net()[3:]], seed=3)
    model.compile(optimizer=optim.Adam(1e-3), precision="mixed_float16")
    model.fit(*_data(8), verbose=0)
    named, unnamed = model._graph_arrays(), model._graph_arrays(named=False)
    kinds = [name.split(" ")[0] for name, _ in named]
    assert kinds == sorted(kinds, key=["param", "state", "optimizer", "random", "the"].index)
    assert {"param", "state", "optimizer", "random"} <= set(kinds)
    assert [name for name, _ in named[-2:]] == ["the running totals", "the loss scale"]
    assert len(unnamed) == len(named) and all(
        a is b for (_, a), b in zip(named, unnamed, strict=True))


def test_a_step_that_rebinds_its_state_stays_eager_with_the_reason():
    model = _model(_bn_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    bn = model.layers[1]
    forward = type(bn).forward

    def rebinding(self, x, *args, **kwargs):  # the old, out-of-place moving-mean update
        y = forward(self, x, *args, **kwargs)
        self.state["moving_mean"] = self.state["moving_mean"] * 1.0
        return y

    bn.forward = rebinding.__get__(bn)
    graphs, capture = _runner(model)
    xb, yb = model._to_device(_data(8)[0]), np.zeros(8, np.int64)
    assert graphs.run(xb, yb) is not None and graphs.run(xb, yb) is not None  # warm-up
    assert graphs.reason == ("state batchnorm2d.moving_mean is replaced by each step rather than "
                             "updated in place")
    assert graphs.decide(xb, yb) == "eager" and graphs.run(xb, yb) is None
    assert capture.captures == 0 and model.optimizer.iterations == 2


def test_a_refused_capture_runs_the_step_eagerly_once_with_the_reason():
    model = _model(gap_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    capture.fail = RuntimeError("operation not permitted when stream is capturing\ndetails")
    xb, yb = model._to_device(_data(8)[0]), np.zeros(8, np.int64)
    for _ in range(2):
        graphs.run(xb, yb)
    before = model.get_weights()
    stats = graphs.run(xb, yb)
    assert stats is not None and model.optimizer.iterations == 3
    assert not np.array_equal(model.get_weights()[0], before[0])  # the step ran, once
    assert graphs.reason == ("capturing the step failed: operation not permitted when stream "
                             "is capturing")
    assert graphs.decide(xb, yb) == "eager"


def test_train_step_returns_a_replays_stats_as_copies_that_the_next_replay_leaves_alone():
    """A replay writes its [loss, correct count] where the graph's outputs are, which the next
    replay rewrites: train_step's caller gets copies (``keep``); fit, which reads none, takes
    the graph's own. (Checked on the step train_step wraps: NumPy's indexing, unlike CuPy's,
    copies train_step's two 0-d results anyway.)"""
    model = _model(gap_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    x, y = _data(32)
    batches = [(model.backend.asarray(x[i:i + 16]), model.backend.asarray(y[i:i + 16]))
               for i in (0, 16)]
    for _ in range(3):  # warm-up 2, capture
        model.train_step(*batches[0])
    kept = model._train_step(*batches[0], keep=True)  # a replay, as train_step runs it
    values = np.array(kept, copy=True)
    fits = model._train_step(*batches[1], keep=False)  # the next replay, as fit runs it
    assert capture.launches == 3 and fits is next(iter(graphs.graphs.values())).outputs
    np.testing.assert_array_equal(kept, values)
    assert not np.array_equal(fits, values)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_a_non_finite_replayed_step_is_skipped_and_reported_as_eagerly():
    """The same error as an eager step's, and the same model after it: the update skipped on
    the device, and the step counted in the graph's device scalar (the batch statistics a
    BatchNorm took are the eager step's too)."""
    x, y = _data(48)
    x = x.astype(np.float64)  # (float batches, so that one can hold an infinity)
    x_bad = x[:16].copy()
    x_bad[3] = np.inf
    models = []
    for graphed in (False, True):
        model = _model(gap_net(), optim.SGD(0.01))
        if graphed:
            model.build((12, 12, 3))
            graphs, capture = _runner(model)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # graphed: warm-up 2, capture
        for batch, labels in ((x[16:32], y[16:32]), (x_bad, y[:16])):  # graphed: replays
            model.train_step(model.backend.asarray(batch), model.backend.asarray(labels))
        with pytest.raises(NonFiniteError, match="step 5: the loss is nan; the first "
                           "non-finite values appear in the input batch"):
            model._read_totals()  # (fit reads them at least every READ_EVERY steps)
        assert model.optimizer.iterations == 4  # the skipped step does not count
        models.append(model)
    assert capture.launches == 3  # the capture's own run and two replays
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make_optimizer", [lambda: optim.SGD(0.01), lambda: optim.Adam(1e-3)],
                         ids=["sgd", "adam"])
def test_a_replayed_step_on_labels_that_are_no_class_is_skipped_and_named_as_eagerly(
        make_optimizer):
    """train_step's check of the labels' values runs inside the captured step: a replay on a
    label that is no class skips its update (BatchNorm's statistics put back) and is named as
    an eager step is; with Adam, whose overflow watch takes each gradient's largest
    magnitude, as with SGD, which sums them."""
    x, y = _data(48)
    bad = y[:16].copy()
    bad[5] = 10  # (10 classes: 0 to 9)
    models = []
    for graphed in (False, True):
        model = _model(gap_net(), make_optimizer())
        if graphed:
            model.build((12, 12, 3))
            graphs, capture = _runner(model)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # graphed: warm-up 2, capture
        model.train_step(model.backend.asarray(x[:16]), model.backend.asarray(y[16:32]))
        moving = [a.copy() for la in model.layers for a in la.state.values()]
        model.train_step(model.backend.asarray(x[:16]), model.backend.asarray(bad))  # replays
        assert moving and all(np.array_equal(a, b) for a, b in zip(
            moving, [a for la in model.layers for a in la.state.values()], strict=True))
        with pytest.raises(InputError, match=r"training stopped at step 5: labels in y must be "
                                             r"in \[0, 9\] for a model of 10 classes; found "
                                             r"values from 0 to 10"):
            model._read_totals()
        assert model.optimizer.iterations == 4
        models.append(model)
    assert capture.launches == 3  # the capture's own run and two replays
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@EVERY_OPTIMISER
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_update_with_device_scalars_is_the_standard_one_bit_for_bit(make, dtype):
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s).astype(dtype) for s in [(3, 3, 2, 4), (4,), (6, 5)]]
    standard, scalar = [p.copy() for p in params], [p.copy() for p in params]
    opt_standard, opt_scalar = make(), make()
    for _ in range(4):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        values = opt_scalar.step_scalars()
        device = {k: np.asarray(v, np.float64 if k in opt_scalar.exact_scalars else dtype)
                  for k, v in values.items()}  # (0-d arrays, as StepGraphs fills them)
        opt_scalar.step(xpn, scalar, grads, scalars=device)
        opt_scalar.iterations += 1
        opt_standard.step(xpn, standard, grads)
    for a, b in zip(scalar, standard, strict=True):
        np.testing.assert_array_equal(a, b)
    grads = [np.full(p.shape, np.nan, dtype) for p in params]
    kept = [p.copy() for p in scalar]
    slots = {k: [s.copy() for s in v] for k, v in opt_scalar.slots.items()}
    device = {k: np.asarray(v, dtype) for k, v in opt_scalar.step_scalars().items()}
    opt_scalar.step(xpn, scalar, grads, apply=np.asarray(False), scalars=device)
    for a, b in zip(scalar, kept, strict=True):
        np.testing.assert_array_equal(a, b)
    for k, v in slots.items():
        for a, b in zip(opt_scalar.slots[k], v, strict=True):
            np.testing.assert_array_equal(a, b)


@needs_compiler
def test_what_keeps_a_step_eager(monkeypatch):
    """Only the backend: not CuPy, CuPy without its fast path, or without cuDNN (its matrix
    products would go to cuBLAS, which CuPy cannot capture). xpcnn's layers (random ones too)
    and optimisers never do (the other tests here capture them); a user's layer does, unless
    its class sets ``capturable = True`` (test_a_users_layer_keeps_the_steps_eager_...)."""
    import sys

    from cudnn_emulator import fake_cudnn, import_cudnn_conv

    assert blockers(xpcnn.backend.get_backend("cpu")) == [
        "CUDA graphs need the CuPy backend, not numpy"]
    module, saved = load_emulated_fast_cupy()  # (its cuDNN does not load)
    try:
        cupy_like = backend_module.Backend(xpn, "cpu", "cupy")  # (CuPy's kernels, NumPy arrays)
        assert blockers(cupy_like) == ["cuDNN could not be loaded: the matrix products would "
                                       "go to cuBLAS, which CuPy cannot capture"]
        monkeypatch.setitem(sys.modules, "cudnn", fake_cudnn())
        monkeypatch.delenv("XPCNN_CUDNN", raising=False)
        import_cudnn_conv()  # (afresh: it loads the fake frontend)
        assert blockers(cupy_like) == []
        old = backend_module.set_fast_path(False)
        try:
            assert blockers(cupy_like)[0].startswith("the CuPy fast path is off")
        finally:
            backend_module.set_fast_path(old)
    finally:
        restore(saved)


def test_an_optimiser_that_defines_only_its_update_is_captured_too():
    """A user's Optimizer subclass with ``_update`` alone (the base's step numbers: the
    learning rate) reads its rate from the device scalar in captured steps: a fit through
    the stand-in graphs equals the eager one, the schedule reaching every replay."""

    class PlainSGD(optim.Optimizer):
        def _update(self, xp, i, p, g, scalars, apply):
            self._assign(xp, p, p - scalars["lr"] * g, apply)

    x, y = _data()
    eager = _model(gap_net(), PlainSGD(optim.StepDecay(0.05, 2, 0.5)))
    eager_history = eager.fit(x, y, epochs=2, batch_size=16, verbose=0)
    graphed = _model(gap_net(), PlainSGD(optim.StepDecay(0.05, 2, 0.5)))
    graphed.build((12, 12, 3))
    graphs, capture = _runner(graphed)
    history = graphed.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert (capture.captures, capture.launches) == (1, 2)  # warm-up 2, captured 1, replayed 1
    assert graphed.optimizer.iterations == eager.optimizer.iterations == 6
    np.testing.assert_array_equal(history.history["loss"], eager_history.history["loss"])
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_compile_switch(recwarn):
    x, y = _data(16)
    model = _model(gap_net(), optim.SGD(0.01), dtype="float32")
    assert model.cuda_graphs is None
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # NumPy: eager, quietly
    assert model.cuda_graphs_reason == "CUDA graphs need the CuPy backend, not numpy"
    assert not recwarn.list
    model.compile(optimizer=optim.SGD(0.01), cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="training steps run without CUDA graphs: CUDA "
                      "graphs need the CuPy backend, not numpy"):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.compile(optimizer=optim.SGD(0.01), cuda_graphs=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.cuda_graphs_reason == "" and model._graphs is None
    with pytest.raises(InputError, match="cuda_graphs must be True, False or None, got 'yes'"):
        model.compile(cuda_graphs="yes")
    assert isinstance(model, Model)


def test_the_cupy_side_orders_warm_up_and_capture_by_events_and_replays_on_the_callers_stream(
        monkeypatch):
    """CupyCapture against a stand-in ``cupy`` that records stream calls: the warm-up and the
    capture run on the capture stream after the caller's work and before its next (events); a
    replay is launched on the caller's stream itself, with no events."""
    import sys
    import types

    from xpcnn.cuda_graphs import CupyCapture

    calls = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def record(self):
            calls.append(("record", self.name))
            return self.name

        def wait_event(self, event):
            calls.append(("wait", self.name, event))

        def __enter__(self):
            calls.append(("enter", self.name))

        def __exit__(self, *exc):
            calls.append(("exit", self.name))

    caller = Stream("caller")
    cuda = types.SimpleNamespace(
        Stream=lambda non_blocking: Stream("capture"), MemoryPool=lambda: types.SimpleNamespace(
            malloc=None), get_current_stream=lambda: caller,
        using_allocator=lambda malloc: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    cudnn_conv = types.SimpleNamespace(
        use_current_stream=lambda: calls.append(("cudnn on", "capture")))
    monkeypatch.setitem(sys.modules, "xpcnn.ops.cudnn_conv", cudnn_conv)
    monkeypatch.setattr(xpcnn.ops, "cudnn_conv", cudnn_conv, raising=False)
    capture = CupyCapture()
    with capture.scope():
        calls.append(("step",))
    assert calls == [("record", "caller"), ("wait", "capture", "caller"), ("enter", "capture"),
                     ("cudnn on", "capture"), ("step",), ("exit", "capture"),
                     ("record", "capture"), ("wait", "caller", "capture")]
    calls.clear()
    graph = types.SimpleNamespace(launch=lambda stream: calls.append(("launch", stream.name)))
    capture.launch(graph)
    assert calls == [("launch", "caller")]


def test_adams_fresh_moments_after_a_freeze_are_corrected_as_new_in_captured_steps():
    """A layer frozen between epochs: the step's numbers, taken before it runs, already count
    Adam's moments as made afresh (the old ones are dropped first), as an eager step's do
    (was: the first step after the freeze corrected them as iterations old, ~3x its update)."""
    from xpcnn.callbacks import LambdaCallback

    x, y = _data()

    def fitted(graphs):
        model = _model(gap_net(), optim.Adam(3e-3))
        model.build((12, 12, 3))
        if graphs:
            _runner(model)
        freeze = LambdaCallback(on_epoch_begin=lambda epoch, logs: setattr(
            model.layers[1], "trainable", epoch < 2))
        model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[freeze])
        return model

    eager, graphed = fitted(False), fitted(True)
    assert graphed.optimizer.iterations == eager.optimizer.iterations == 12
    assert int(np.asarray(graphed.optimizer.applied)) == 6
    assert int(np.asarray(eager.optimizer.applied)) == 6
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("change", ["freeze", "rebuild"])
@pytest.mark.parametrize("after_warmups", [1, 2])
def test_slots_dropped_before_a_capture_warm_the_step_up_again(change, after_warmups):
    """Slots dropped by a freeze after one or both warm-up steps, before any capture: the
    step warms up again (its first step makes the slots afresh, outside a capture), then is
    captured and replayed, with the weights of eager steps (was: the capture made the slots
    and raised "the list of the model's arrays was replaced", or the step ran eagerly for good
    with a false reason). A rebuild for the same shape keeps them (as Keras keeps the
    optimizer's variables) and warms the step up again too (a layer's arrays that are no
    weights may be new), with the weights of eager steps."""
    x, y = _data(16)

    def trained(graphed):
        model = _model(gap_net(), optim.Adam(3e-3))
        model.build((12, 12, 3))
        capture = _runner(model)[1] if graphed else None
        for _ in range(after_warmups):
            model.train_on_batch(x, y)
        if change == "freeze":
            model.layers[1].trainable = False
        else:
            model.build((12, 12, 3))
        for _ in range(4):  # two warm-up steps, the capture (launched once), a replay
            model.train_on_batch(x, y)
        return model, capture

    (eager, _), (graphed, capture) = trained(False), trained(True)
    assert (capture.captures, capture.launches) == (1, 2)
    if change == "rebuild":
        assert graphed.optimizer.slots  # (kept)
    assert graphed.cuda_graphs_reason == ""
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_a_change_of_the_cudnn_switches_captures_the_step_again(kernels, monkeypatch):
    """A replay runs the cuDNN plans of its capture: where the switches that choose them
    change (``XPCNN_TF32=0`` for full float32, ``XPCNN_DETERMINISTIC=1``), the step warms up
    and is captured again under the new ones (was: the replays went on with the old plans).
    CuPy's kernels read the switches from the environment, as cuDNN's graphs do."""
    x, y = _data(16)
    model = _model(gap_net(), optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    if kernels is None:
        switched = {"XPCNN_TF32": "1"}
        graphs.switches = lambda: dict(switched)
    else:  # (the emulated CuPy kernels' own reading of the environment)
        graphs.switches = kernels.graph_switches
        monkeypatch.delenv("XPCNN_TF32", raising=False)
    for _ in range(4):  # two warm-up steps, the capture, a replay
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (1, 2)
    if kernels is None:
        switched["XPCNN_TF32"] = "0"
    else:
        monkeypatch.setenv("XPCNN_TF32", "0")
    for _ in range(4):
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (2, 4)


def test_a_layer_setting_changed_after_the_capture_captures_the_step_again():
    """A replay runs the values its capture baked in (Dropout's rate is a kernel argument,
    and at rate 0 no kernel is captured at all): a rate set by a callback's schedule after
    the capture makes the next step warm up and capture again (was: the replays went on with
    the old rate on a GPU). The same rate set again, and the layers' own passes, change
    nothing: the step goes on replaying."""
    x, y = _data(16)
    net = [Conv2D(6, 3, padding="same"), ReLU(), Dropout(0.0), GlobalAvgPool2D(), Dense(10)]
    model = _model(net, optim.SGD(0.01))
    model.build((12, 12, 3))
    capture = _runner(model)[1]
    for _ in range(4):  # two warm-up steps, the capture, a replay
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (1, 2)
    dropout = model.layers[2]
    dropout.rate = 0.0  # unchanged: replayed
    model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (1, 3)
    dropout.rate = 0.5
    model.train_on_batch(x, y)  # a warm-up step: eager, no launch
    assert (capture.captures, capture.launches) == (1, 3)
    for _ in range(3):  # the second warm-up step, the capture, a replay
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (2, 5) and dropout.calls == 4


def test_layer_settings_count_their_changes_after_build_only():
    """Every host value a training pass reads counts a change of a built layer (what the
    trainer hands StepGraphs with cuDNN's switches), not the constructor's, a build's, a
    pass's, nor a value set again unchanged."""
    from xpcnn.layers import FeatureNorm, Rescaling
    from xpcnn.layers.base import Layer

    cases = [(Dropout(0.2), "rate", 0.3), (ReLU(6.0), "max_value", 4.0),
             (BatchNorm2D(), "momentum", 0.5), (BatchNorm2D(), "eps", 1e-3),
             (FeatureNorm(), "eps", 1e-3), (Rescaling(0.5), "scale", 2.0),
             (Rescaling(0.5), "offset", 1.0), (RandomCrop(1), "padding", 2)]
    x = np.random.default_rng(0).random((2, 4, 4, 3))
    for layer, name, value in cases:
        before = Layer.settings_changes
        layer.build((4, 4, 3), "cpu", "float64")
        layer(x, training=True)
        setattr(layer, name, getattr(layer, name))  # (the same value)
        assert Layer.settings_changes == before, (layer, name)
        setattr(layer, name, value)
        assert Layer.settings_changes == before + 1, (layer, name)
        assert getattr(layer, name) == value
        layer(x, training=True)  # (honoured eagerly, and counted once)
        assert Layer.settings_changes == before + 1, (layer, name)


def test_a_shared_layer_built_again_by_another_model_makes_the_step_captured_again():
    """A layer shared with another model, built again for this one's inputs after that
    model ran it, has new arrays that are no weights (AvgPool2D's count table): the captured
    step read the old one's address (freed), replayed as if nothing had changed, and a table
    first made inside a capture was a host copy recorded in the graph. The model's builds now
    count in what chose the captured work: the next step warms up and captures again."""
    pool, gap, dense = AvgPool2D(2, padding="same"), GlobalAvgPool2D(), Dense(10)
    a = xpcnn.Sequential([pool, gap, dense], seed=3)
    a.compile(optimizer=optim.SGD(0.01))
    a.build((11, 11, 3))
    b = xpcnn.Sequential([pool, gap, dense], seed=3)
    b.build((24, 24, 3))
    graphs, capture = _runner(a)
    rng = np.random.default_rng(0)
    xb, yb = a._to_device(rng.random((8, 11, 11, 3))), np.zeros(8, np.int64)
    a._rebuild_if_shared()
    actions = []
    for _ in range(4):
        actions.append(graphs.decide(xb, yb))
        a.train_on_batch(xb, yb)
    assert actions == ["warmup", "warmup", "capture", "replay"]
    b.predict(rng.random((2, 24, 24, 3)), verbose=0)  # (b builds the pool for its images)
    a._rebuild_if_shared()  # (as a's next step does first)
    assert pool._inv_counts is None
    assert graphs.decide(xb, yb) == "warmup"
    a.train_on_batch(xb, yb)
    assert pool._inv_counts is not None  # (made in the warm-up, not inside a capture)


class _WarmupGate(xpcnn.layers.Layer):
    """A user's layer keeping a host number between steps: its input times min(1, t / 4), t the
    training passes so far (a warm-up)."""

    def __init__(self, name=None):
        super().__init__(name)
        self.t = 0

    def forward(self, x, training=False, options=None):
        if training:
            self.t += 1
        self._g = min(1.0, self.t / 4)
        return x * self._g

    def backward(self, dy, options=None):
        return dy * self._g


class _DeviceScale(xpcnn.layers.Layer):
    """A user's layer whose every per-step value is a device array (its trained scale),
    declared capturable."""

    capturable = True
    weight_names = ("w",)

    def _build(self, input_shape, rng):
        self._param("w", np.full(input_shape[-1], 0.5))
        return input_shape

    def forward(self, x, training=False, options=None):
        self._x = x
        return x * self.params["w"]

    def backward(self, dy, options=None):
        self.grads["w"] = self.xp.sum(dy * self._x, axis=0)
        return dy * self.params["w"]


def _user_net(user):
    return [Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D(), Dense(6), user, Dense(10)]


@pytest.mark.parametrize("user", [_WarmupGate, _DeviceScale])
def test_a_users_layer_keeps_the_steps_eager_unless_its_class_sets_capturable(monkeypatch,
                                                                             user):
    """A replay runs no Python: a user's layer that counts its steps on the host repeated the
    captured step's count in every replay, silently (was: captured as any layer, on CuPy by
    default). A model holding a user's layer now trains eagerly, the layer named in
    ``cuda_graphs_reason``, unless its class sets ``capturable = True`` (its per-step values
    all on the device): then its steps are captured and replayed. Either way the fit is the
    eager one."""
    monkeypatch.setattr(step_module, "graph_blockers", lambda backend: [])  # (as on CuPy)
    x, y = _data(32)
    eager = _model(_user_net(user(name="user")), optim.SGD(0.05))
    eager.compile(optimizer=optim.SGD(0.05), cuda_graphs=False)
    eager.fit(x, y, epochs=3, batch_size=8, verbose=0, shuffle=False)
    graphed = _model(_user_net(user(name="user")), optim.SGD(0.05))
    graphed.build((12, 12, 3))
    graphs = graphed._step_graphs()
    if user is _WarmupGate:
        assert graphs is None
        assert graphed.cuda_graphs_reason.startswith(
            "layer 'user' is of a user's class, _WarmupGate, which does not set capturable = "
            "True: a step replayed from a CUDA graph runs none of its Python")
    else:
        capture = graphs.capture = FakeCapture(graphed._graph_arrays, graphed.layers)
    graphed.fit(x, y, epochs=3, batch_size=8, verbose=0, shuffle=False)
    if user is _WarmupGate:
        assert graphed.get_layer("user").t == eager.get_layer("user").t == 12
    else:
        assert (capture.captures, capture.launches) == (1, 10)  # (its launch, 9 replays)
    assert graphed.optimizer.iterations == 12
    for a, b in zip(graphed.get_weights(), eager.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_a_users_layer_added_after_the_capture_makes_the_steps_eager():
    """The layers built again with a user's layer among them (one added to a Sequential that
    was replaying its captured step): the next step runs eagerly for good, the graphs of the
    old layers dropped, and the reason names the layer."""
    x, y = _data(16)
    model = _model([Conv2D(4, 3, padding="same"), ReLU(), GlobalAvgPool2D(), Dense(10)],
                   optim.SGD(0.01))
    model.build((12, 12, 3))
    graphs, capture = _runner(model)
    for _ in range(4):  # two warm-up steps, the capture, a replay
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (1, 2)
    model.add(_WarmupGate(name="gate"))
    xb, yb = model._to_device(x), np.asarray(y)
    assert graphs.decide(xb, yb) == "eager" and not graphs.graphs
    assert graphs.reason.startswith("layer 'gate' is of a user's class, _WarmupGate")
    for _ in range(2):
        model.train_on_batch(x, y)
    assert (capture.captures, capture.launches) == (1, 2)
    assert model.get_layer("gate").t == 2
    assert model.cuda_graphs_reason == graphs.reason and model._step_graphs() is None
