"""A whole training step captured once as a CUDA graph (CuPy's stream capture) and replayed.

On a GPU a training step is a few dozen kernel launches; at small batches the GPU waits on
Python issuing them (PyTorch's own step graph ran 2.77x faster at batch 128 on an H200). A
replayed graph is one launch. What a captured step needs, and how it gets it:

- Per-step numbers from device memory: the learning rate, Adam's bias corrections and the
  step count are 0-d device arrays refilled before each replay
  (:meth:`xpcnn.optim.Optimizer.step_scalars`; every optimiser's step takes them, so no
  optimiser keeps a step eager), the batch is copied into static input buffers, and random
  layers (Dropout, RandomFlip, RandomCrop) keep their seed and draw count in device memory and
  count their draws there (:mod:`xpcnn.ops.random`). Anything else the host would pass by
  value is baked in at capture: a layer's settings (Dropout's rate, ReLU's max_value...)
  count their changes in ``Layer.settings_changes``, which the trainer hands in with the
  ``switches``, so that a change (a callback's dropout schedule) captures the step again.
- State updated in place: a graph reads and writes the addresses it was captured with. Every
  array that outlives a step (parameters, their optimiser slots, normalisation statistics,
  the random layers' states, the running totals and the float16 loss scale of
  :mod:`xpcnn.totals`) must be written with
  ``a[...] =``; one rebound to a new array during the step would be read stale at the next
  replay. The last warm-up step checks that none is rebound (else the step stays eager, with
  the reason), and each replay that the captured arrays are still the model's (replaced ones,
  by ``set_weights``, ``load_weights`` or a checkpoint, make the step capture again).
- No Python: a replay runs none, so a user's layer, whose forward and backward may keep
  per-step numbers on the host, keeps the steps eager unless its class sets
  ``capturable = True`` (:func:`layer_blockers`, checked again where the layers are built
  again: a layer added).
- No cuBLAS: CuPy 14 refuses to capture it, so matrix products run as cuDNN graphs during the
  warm-up and the capture (``CupyKernels.capturable``).
- No host reads inside the step, and no copies from the host. The optimiser update is CuPy's
  fused one (:meth:`xpcnn.optim.Optimizer.step` given the device ``scalars``: one launch per
  parameter dtype, reading the per-step numbers above from their device arrays); it finds
  the parameters, gradients and slots through a device table of their addresses (as the
  gradients' check, the casts and the normalisation statistics' snapshot and restore find
  theirs). A capture allocates each table (from a memory pool that none of the step's
  temporaries share) and fills it once the capture has ended, before the graph's first launch
  (``CupyKernels.capture_tables``): the addresses in a graph never change, and the tables are
  held with the graph, as the captured arrays are.
- Memory: the steps run from warm-up on with a memory pool of their own, so the blocks a
  graph's temporaries use are never handed to anything else: eager steps (and everything
  outside the steps) take CuPy's default pool. The graphs of several batch shapes share the
  pool, and their temporaries the same blocks, which is what lets an epoch's last, smaller
  batch replay its own graph without a second set of activations. That is safe because they
  run one after another on one stream, and a step reads nothing it did not write before in
  that step but the arrays that outlive it (allocated before the graphs, or held since, so
  never handed out again), the static buffers its batch was just copied into, and the device
  constants the kernels make once and keep (the counters, the eager update tables), which
  come from CuPy's default pool for this reason. A graph's outputs hold its replay's values
  until the next replay of any graph: the caller reads them at once.

Shapes: each batch shape is captured after ``warmup`` eager steps of it on the capture stream
(they compile kernels, build the cuDNN plans and fill the memory pool); an epoch's last,
smaller batch is one more shape (warmed up in the first two epochs, replayed from the third),
and so is a later ``fit``'s other ``batch_size``. At most ``max_graphs`` graphs are kept; the
least recently replayed goes for a new one.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import of_xpcnn

StepFn = Callable[[Any, Any, Any, "dict[str, Any]"], Any]
ArraysFn = Callable[..., "list[Any]"]


def blockers(backend: Any) -> list[str]:
    """Why training steps on ``backend`` cannot be captured (none: they can). No optimiser
    keeps a step eager, nor do xpcnn's own layers (see the module doc); the backend can, and
    so can a user's layer (:func:`layer_blockers`)."""
    if backend.name != "cupy":
        return [f"CUDA graphs need the CuPy backend, not {backend.name}"]
    from .ops import cudnn_conv
    from .ops.kernels import kernels_for

    if not hasattr(kernels_for(backend), "capturable"):
        return ["the CuPy fast path is off (XPCNN_FAST_PATH=0): the standard matrix products "
                "go to cuBLAS, which CuPy cannot capture"]
    if cudnn_conv.load() is None:
        return ["cuDNN could not be loaded: the matrix products would go to cuBLAS, which "
                "CuPy cannot capture"]
    return []


def layer_blockers(layers: list[Any]) -> list[str]:
    """Why ``layers`` keep the training steps eager (none: they do not): a layer of a user's
    class (a subclass of a built-in included) whose class does not set ``capturable = True``.
    A replayed step runs no Python, so whatever a user's forward or backward keeps on the host
    from step to step (a step counter, a Python float a callback schedules) would stay as the
    captured step left it, silently; xpcnn's own layers keep such numbers on the device, or
    capture again when a setting changes (see the module doc)."""
    for layer in layers:
        cls = type(layer)
        if not of_xpcnn(cls.__module__) and cls.capturable is not True:
            return [f"layer {layer.name!r} is of a user's class, {cls.__name__}, which does not "
                    "set capturable = True: a step replayed from a CUDA graph runs none of its "
                    "Python, so a number its forward or backward keeps on the host between "
                    "steps (a step counter, a float a callback sets) would stay as captured; "
                    "set capturable = True on the class where every per-step value lives in "
                    "its device arrays (params and state, written in place)"]
    return []


class CupyCapture:
    """The CuPy side: a capture stream and a memory pool of the graphs' own.

    The capture stream does not synchronise implicitly with any other (an implicit dependency
    on the legacy default stream would invalidate a capture); around the warm-up and the
    capture, events order its work after the caller's stream's and the caller's after it. A
    captured graph is launched on the caller's stream itself, in order with its other work."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Warm-up and capture: on the capture stream (after the caller's stream's work, and
        before its next), from the private pool, with cuDNN's handle on that stream before any
        capture begins."""
        from .ops import cudnn_conv

        caller = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream, self.cupy.cuda.using_allocator(self.pool.malloc):
            cudnn_conv.use_current_stream()
            yield
        caller.wait_event(self.stream.record())

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """``fn()``'s work as a graph, and its result; the capture is ended even when ``fn``
        fails (then its exception propagates)."""
        self.stream.begin_capture()
        try:
            out = fn()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stream.end_capture()
            raise
        return self.stream.end_capture(), out

    def launch(self, graph: Any) -> None:
        """Run ``graph`` on the caller's (CuPy's current) stream."""
        graph.launch(stream=self.cupy.cuda.get_current_stream())


@contextlib.contextmanager
def _nothing_deferred() -> Iterator[list[Any]]:
    yield []


def _no_switches() -> None:
    return None


@dataclass
class _Graph:
    """One batch shape's captured step: the shape, the graph, the static buffers its batch is
    copied into (x, y, and the sample weights' or None), its outputs (a replay rewrites them),
    and the device tables its update kernels read and the device scalars it was captured
    reading (held so that their memory stays theirs)."""

    shape: tuple[Any, ...]
    graph: Any
    static: tuple[Any, ...]
    outputs: Any
    tables: list[Any]
    scalars: dict[str, Any]


class StepGraphs:
    """A training step run eagerly, warmed up, captured, then replayed (see the module doc),
    with a graph for each batch shape (at most ``max_graphs``, the least recently used
    dropped for a new one).

    ``step(xb, yb, wb, scalars)`` is one training step on images ``xb``, targets ``yb`` and
    sample weights ``wb`` (None: none) without host reads whose optimiser update
    takes the per-step numbers from ``scalars`` (0-d arrays); it returns device arrays, which
    after a replay hold that replay's values. ``arrays()`` lists every array that outlives a
    step, by name ("param ..." first); ``arrays(named=False)`` the arrays alone, in the same
    order (checked before each replay). ``scalars_for_next()`` gives the next step's numbers
    (host floats) and ``advance()`` counts a step done; ``capturable()`` is the kernels'
    context for matrix products that can be captured; ``capture_tables`` (None: nothing to
    defer) the kernels' context around the capture in which the fused updates defer filling
    their device tables until it has ended
    (:meth:`~xpcnn.ops.fast_cupy.CupyKernels.capture_tables`); ``switches`` (None: none) what
    else chose the captured work, read before each step: the layers' settings changes
    (``Layer.settings_changes``) and the kernels' cuDNN switches
    (:meth:`~xpcnn.ops.fast_cupy.CupyKernels.graph_switches`), as the trainer combines them;
    ``blockers`` (None: none) why the step must now run eagerly for good, asked where the
    switches changed (the layers built again: :func:`layer_blockers`);
    ``capture`` the CUDA side (:class:`CupyCapture` by default; tests give a stand-in). The
    scalars are in the parameters' dtype, those named in ``exact`` (a step count, Adam's
    learning rate) in float64.
    """

    def __init__(self, step: StepFn, arrays: ArraysFn, scalars_for_next: Callable[[], dict],
                 advance: Callable[[], None], backend: Any, capturable: Any,
                 capture: Any = None, warmup: int = 2, exact: tuple[str, ...] = (),
                 capture_tables: Callable[[], Any] | None = None, max_graphs: int = 4,
                 switches: Callable[[], Any] | None = None,
                 blockers: Callable[[], list[str]] | None = None) -> None:
        if warmup < 2:
            raise ValueError("at least two warm-up steps: the first may create arrays (the "
                             "optimiser's slots), the last checks that none is rebound")
        self.step, self.arrays = step, arrays
        self.scalars_for_next, self.advance = scalars_for_next, advance
        self.backend, self.capturable = backend, capturable
        self.capture_tables = capture_tables or _nothing_deferred
        self.switches = switches or _no_switches
        self.blockers = blockers or list
        self._switched: Any = None  # (the switches the graphs were captured under)
        self.capture = capture  # (made on first use: CuPy is imported only then)
        self.warmup, self.exact, self.max_graphs = warmup, exact, max_graphs
        self.reason = ""  # why the step runs eagerly for good ("" while capture is possible)
        #: Why a batch shape runs eagerly for good while others are replayed (its capture
        #: failed after another shape's had succeeded), by shape.
        self.refused: dict[tuple[Any, ...], str] = {}
        #: The captured steps by batch shape, the most recently replayed last.
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.warm: dict[tuple[Any, ...], int] = {}  # warm-up steps run, by shape not captured
        self._shape: tuple[Any, ...] = ()  # the batch shape of the step being decided
        self._last: _Graph | None = None  # the graph replayed last (the most recent in graphs)
        self._scalars: dict[str, Any] | None = None  # refilled before each step
        self._filled: dict[str, float] = {}  # (the numbers they hold)
        # the arrays the graphs were captured with (held so that their memory stays theirs),
        # or before any graph, those the warm-up steps left: changed, both start again
        self._captured: list[Any] = []

    def decide(self, xb: Any, yb: Any, wb: Any = None) -> str:
        """What the next step on this batch does: "eager" (for good), "warmup", "capture" or
        "replay", for this batch's shape (an epoch's last, smaller batch is a shape of its
        own: warmed up and captured as the others)."""
        if self.reason:
            return "eager"
        # (str(dtype): ~2 us)
        self._shape = shape = (tuple(xb.shape), xb.dtype, tuple(yb.shape), yb.dtype,
                               None if wb is None else (tuple(wb.shape), wb.dtype))
        switched = self.switches()
        blocked = self.blockers() if switched != self._switched else None
        if blocked:  # (the graphs captured before are of other layers: dropped)
            self.reason = blocked[0]
            self.graphs, self.warm, self._captured, self._last = {}, {}, [], None
            return "eager"
        if (self.graphs or self.warm) and (self._replaced() or switched != self._switched):
            # weights replaced, slots dropped (a layer frozen), a layer's setting or cuDNN's
            # switches changed (the graphs replay their capture's values and plans): warm up
            # and capture again
            self.graphs, self.warm, self._captured = {}, {}, []
            self._last = None
        self._switched = switched
        last = self._last
        if last is not None and shape == last.shape:  # (the shape of the step before: ~1 us
            return "replay"  # less than the table's lookup and reordering)
        entry = self.graphs.get(shape)
        if entry is not None:
            self._last = self.graphs[shape] = self.graphs.pop(shape)  # (the most recent, last)
            return "replay"
        if shape in self.refused:
            return "eager"
        return "warmup" if self.warm.get(shape, 0) < self.warmup else "capture"

    def run(self, xb: Any, yb: Any, wb: Any = None) -> Any | None:
        """One training step on (xb, yb, wb) warmed up, captured or replayed: its outputs;
        None where this step runs eagerly instead (the caller runs it)."""
        action = self.decide(xb, yb, wb)
        if action == "eager":
            return None
        if self._fill_scalars():  # (new device scalars: the graphs read the old ones)
            self.graphs, self.warm, self._captured, self._last = {}, {}, [], None
            action = self.decide(xb, yb, wb)
        if self.capture is None:
            self.capture = CupyCapture()
        if action == "replay":
            entry = self._last
            static_x, static_y, static_w = entry.static
            static_x[...] = xb
            static_y[...] = yb
            if static_w is not None:
                static_w[...] = wb
            self.capture.launch(entry.graph)
            self.advance()
            return entry.outputs
        batch = (xb, yb, wb)
        with self.capture.scope(), self.capturable():
            return self._warm_up(batch) if action == "warmup" else self._capture(batch)

    def _run(self, batch: tuple[Any, Any, Any]) -> Any:
        out = self.step(*batch, self._scalars)
        self.advance()
        return out

    def _warm_up(self, batch: tuple[Any, Any, Any]) -> Any:
        """An eager step on the capture stream and pool; the last one also checks that the
        step rebinds none of the arrays that outlive it (the first may create some, such as
        the optimiser's slots)."""
        before = self.arrays()
        out = self._run(batch)
        if len(self.warm) >= 4 * self.max_graphs:  # (a stream of ever new shapes)
            self.warm.clear()
        warm = self.warm[self._shape] = self.warm.get(self._shape, 0) + 1
        rebound = self._rebound(before)
        if warm == self.warmup and rebound:
            self.reason = f"{rebound} is replaced by each step rather than updated in place"
        if not self.graphs:  # (the arrays the next warm-up steps and capture must find)
            self._captured = self.arrays(named=False)
        return out

    def _capture(self, batch: tuple[Any, Any, Any]) -> Any:
        if len(self.graphs) >= self.max_graphs:  # the least recently replayed shape's goes
            del self.graphs[next(iter(self.graphs))]
            self._last = None
        xp = self.backend.xp
        static = tuple(None if a is None else xp.asarray(a, copy=True) for a in batch)
        before, scalars = self.arrays(), self._scalars
        try:
            # (the tables are filled on leaving, after the capture ended, before any launch)
            with self.capture_tables() as tables:
                graph, out = self.capture.capture(lambda: self.step(*static, scalars))
        except Exception as e:  # what the capture refused, e.g. a read from the host
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            # (where another shape's graph works, this shape alone runs eagerly)
            if self.graphs:
                self.refused[self._shape] = f"capturing the step failed: {first}"
            else:
                self.reason = f"capturing the step failed: {first}"
            return self._run(batch)  # (a capture only records: nothing ran)
        rebound = self._rebound(before)
        if rebound:  # the warm-up steps rebound nothing: the step changed between them
            raise RuntimeError(f"xpcnn: {rebound} was replaced while the training step was "
                               "captured in a CUDA graph; compile(cuda_graphs=False) avoids it")
        self.graphs[self._shape] = self._last = _Graph(self._shape, graph, static, out, tables,
                                                       scalars)
        self.warm.pop(self._shape, None)
        self._captured = [a for _, a in before]
        self.capture.launch(graph)  # the capture only recorded the step: now run it
        self.advance()
        return out

    def _replaced(self) -> bool:
        """True where an array the graphs were captured with is no longer the model's (weights
        set or loaded since): each replay asks, so by identity alone, with no names."""
        now = self.arrays(named=False)
        return len(now) != len(self._captured) or not all(map(operator.is_, now,
                                                               self._captured))

    def _rebound(self, before: list[tuple[str, Any]]) -> str:
        """The first array that is no longer the object it was in ``before`` ("" if none)."""
        now = self.arrays()
        if [n for n, _ in now] != [n for n, _ in before]:
            return "the list of the model's arrays"
        return next((n for (n, a), (_, b) in zip(before, now, strict=True) if a is not b), "")

    def _fill_scalars(self) -> bool:
        """Put the next step's numbers into the device scalars (made on first use), one 0-d
        array each: the graph reads them where it was captured reading them. A number that
        did not change since it was last put there (a constant learning rate) costs nothing:
        on CuPy each fill is a launch. True where the scalars were made anew (first use, or
        an optimiser's ``step_scalars()`` gave other names): graphs captured before read the
        old ones."""
        values = self.scalars_for_next()
        if self._scalars is None or self._scalars.keys() != values.keys():
            dtype, wide = self._dtype(), getattr(self.backend.xp, "float64", None)
            self._scalars = {k: self.backend.asarray(v, dtype=wide if k in self.exact and wide
                                                     else dtype) for k, v in values.items()}
            self._filled = dict(values)
            return True
        for k, v in values.items():
            if self._filled[k] != v:
                self._scalars[k][...] = v
                self._filled[k] = v
        return False

    def _dtype(self) -> Any:
        """The parameters' dtype (the scalars meet them in the update)."""
        for name, a in self.arrays():
            if name.startswith("param"):
                return a.dtype
        return self.backend.dtype("float32")
