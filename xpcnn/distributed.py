"""Data parallelism: the same training on N processes, one device each, launched by MPI.

``mpiexec -n 4 xpcnn train ...`` or ``mpiexec -n 4 python my_script.py`` runs the same program
on four ranks; ``fit`` needs no change. As in ChainerMN, Horovod and PyTorch DDP:

* every rank holds the whole model on its own device (``"cuda"`` means ``cuda:<local rank>``,
  see :func:`device_for_rank`); rank 0's initial weights are broadcast to the others;
* ``fit(batch_size=B)`` makes global batches of ``N * B`` samples, exactly the batches of one
  process at that size (one seeded permutation), and each rank takes its own slice of each
  (arrays and map-style datasets, :func:`xpcnn.data.sources.rank_slices`; an iterable of batches is
  each rank's own, and before each of its steps the ranks tell each other their batches'
  sizes, in one small host allreduce);
* after the backward pass the gradients are averaged, weighted by each rank's share of the
  samples, so that a step equals the single-process step on the whole global batch. They are
  packed into a few flat buckets (1 MiB for the first, then 25 MiB, as DDP; made again when a
  callback freezes or unfreezes a layer, on every rank at the same step), each reduced as
  soon as backward has produced all of its gradients, while backward goes on: NCCL on CuPy
  arrays for GPU ranks (on its own stream), MPI ``Iallreduce`` on host arrays for CPU ranks.
  A layer frozen or unfrozen, or a learning rate set, on some ranks only is refused on every
  rank at that step, naming the layer or the rates and the ranks: each rank's mark of its
  step (which layers it trained, its rate) goes in the agreement after it, and on CPU ranks
  in the step's sums too, compared before any bucket is waited for (buckets of other sizes
  made the reductions erroneous: a hang, or a mix of gradients); GPU ranks compare them in
  the agreement alone, after NCCL's reductions, which may wait on the device first;
* random layers (Dropout, RandomFlip, RandomCrop) draw the numbers of the global batch and
  take their slice, so each sample gets the numbers it gets in one process;
* ``evaluate`` and the training metrics are summed over the ranks (``evaluate`` refuses weights
  that differ between the ranks, as loaded on rank 0 alone: :func:`broadcast_weights`;
  ``predict`` runs whole on each rank with that rank's own model, no exchange); a
  ``model.stop_training`` set on any rank stops every rank at the same step (an agreement
  after each step's callbacks and after ``on_epoch_end``), and a ``model.stop_evaluating``
  set on any rank ends every rank's evaluation after the same batch (an agreement after each
  batch, where a callback has test hooks of its own); only rank 0 prints progress
  and writes files (models, checkpoints, figures): a save that every rank calls returns on
  each once rank 0 has written, and one that rank 0 calls alone returns at once
  (:func:`write_on_root`);
* ``fit`` refuses, on every rank, layers, compile settings, data, arguments and callbacks that
  differ between the ranks (the files its callbacks write too), and checkpoints resumed by
  some ranks only; the checks run on a communicator of their own, each first telling the
  others its call and size, so a rank in another check (an ``evaluate`` on rank 0 alone as the
  others begin ``fit``) is refused, saying which, and one in a check while the others train is
  paired with nothing (it waits for the timeout, saying that a rank may not be making the
  call);
* a rank that raises ends the whole job (``MPI_Abort``, with that rank's traceback), one that
  dies is reported by ``mpiexec`` (which ends the others), and an MPI wait (the CPU ranks'
  allreduce, the weight broadcast, the sums of ``evaluate``) longer than ``timeout`` seconds
  (``XPCNN_DIST_TIMEOUT``, default 600) raises on the waiting rank. NCCL's waits are on the
  device and have no such limit: a GPU rank that hangs without dying is not detected;
* a ``fit`` or ``evaluate`` that an error ends on one rank alone (its data's, a callback's,
  ``on_train_end``'s too), caught by the script or not, ends it on the others at once: that
  rank tells them (a small message, :func:`together`), and a rank waiting in one of the call's
  MPI exchanges raises a :class:`DistributedError` naming that rank and its error. Each call
  makes its exchanges on communicators of its own, so a script that catches the error on every
  rank and calls ``fit`` again goes on (an exchange left unfinished stays with the call that
  failed, whose communicators are then kept for good: after about a thousand such calls MPI
  has none left, and fit and evaluate say to restart the job; the others' are freed). An error
  that a callback catches (a nested ``evaluate``'s) tells no one: the others then wait in the
  call's next exchange until the timeout, or are refused there as in another call. A
  non-finite step (NaN or infinity, found where a rank reads its running totals: rank 0's
  progress bar alone, say) is raised on every rank at the same step, in the agreement after
  its callbacks or at the epoch's end, naming the rank whose slice of the batch made it and
  that rank's layer, as one process does (so :class:`~xpcnn.callbacks.TerminateOnNaN` stops
  every rank there, printing where).

BatchNorm normalises each rank's slice with that slice's own statistics (as DDP does by
default), so a BatchNorm model does not train exactly as in one process; its running
statistics are averaged over the ranks at the end of each epoch, before each checkpoint, and
where TerminateOnNaN ends fit inside an epoch.

CPU ranks on one node share its cores from the start (:func:`init`): each gets cores / (ranks
on the node) threads unless ``OPENBLAS_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set.

In a single process (no MPI launcher in the environment) this module does nothing and never
imports mpi4py.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from . import checks
from .errors import (
    DeviceError,
    InputError,
    MissingDependencyError,
    NonFiniteError,
    XpcnnError,
    add_note,
)
from .ops.kernels import fast_kernels

#: Bytes of gradients per bucket, as PyTorch DDP: 1 MiB for the first (the last layers': it
#: goes out early in backward), 25 MiB for the others.
FIRST_BUCKET_BYTES, BUCKET_BYTES = 1 << 20, 25 << 20
#: Environment variables by which MPI launchers tell a process its rank and the world's size:
#: Open MPI, then MPICH's Hydra (also Intel MPI, and Slurm's srun --mpi=pmi2).
_LAUNCHERS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))
MPI_EXTRA_HINT = 'pip install "xpcnn[mpi]" (mpi4py and MPICH), or mpi4py alone for a cluster\'s MPI'
# How long a failing rank waits, after printing its error, before it aborts the job.
ABORT_GRACE_SECONDS = 0.5


class DistributedError(XpcnnError, RuntimeError):
    """A failure of the ranks to work together: a timeout, a mismatch between ranks."""


class RootNonFiniteError(DistributedError, NonFiniteError):
    """Rank 0's write refused NaN or infinity (a :class:`NonFiniteError` there): one on the
    other ranks too, so that a :class:`~xpcnn.callbacks.TerminateOnNaN` ends them alike."""


@dataclass(frozen=True)
class World:
    """The processes of one job: this one's ``rank`` among ``size``, and on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comm: Any = None  # the mpi4py communicator; None in a single process
    timeout: float = 600.0  # seconds a rank waits in a collective before it gives up
    # comm's duplicate for rank 0's reports of its writes (write_on_root): they never pair with
    # a collective of training, which one rank's save alone may fall between
    reports: Any = None
    # comm's duplicate for the tagged sums (host_sum's checks, names and payloads): a check on
    # one rank alone (an evaluate in a rank-0 callback) never pairs with the others' training
    checks: Any = None
    # comm's duplicate for a rank's notice that its fit or evaluate failed (see together)
    notices: Any = None
    # comm's duplicate from which each fit and evaluate duplicates communicators of its own
    # (see together), at its start: nothing else is exchanged on it
    calls: Any = None

    @property
    def is_root(self) -> bool:
        """True on rank 0, the one that prints and writes files."""
        return self.rank == 0


_WORLD: dict[str, World] = {}


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process as one of several (read from the
    environment: no MPI import)."""
    sizes = [os.environ.get(size, "") for _, size in _LAUNCHERS]
    return any(v.isdigit() and int(v) > 1 for v in sizes)


def world() -> World:
    """This process's :class:`World`: found at the first call, from the launcher's environment
    (or an mpi4py already initialised with several ranks); a one-process world otherwise."""
    if "world" not in _WORLD:
        mpi = sys.modules.get("mpi4py.MPI")
        running = mpi is not None and mpi.Is_initialized() and mpi.COMM_WORLD.Get_size() > 1
        _WORLD["world"] = init() if launched_by_mpi() or running else World()
    return _WORLD["world"]


def init(comm: Any = None, timeout: float | None = None) -> World:
    """Join the ranks of ``comm`` (an mpi4py communicator; default ``MPI.COMM_WORLD``) and make
    them this process's world. Needed only to choose the communicator or the timeout:
    :func:`world` calls it by itself under ``mpiexec``. ``init(MPI.COMM_SELF)`` makes a launched
    process train on its own."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MissingDependencyError(f"training on several processes needs mpi4py and an MPI: "
                                     f"{MPI_EXTRA_HINT}") from e
    comm = MPI.COMM_WORLD if comm is None else comm
    timeout = _seconds(os.environ.get("XPCNN_DIST_TIMEOUT", "600") if timeout is None
                       else timeout)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    several = comm.Get_size() > 1
    here = World(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), comm,
                 timeout, *(comm.Dup() if several else None for _ in range(4)))
    node.Free()
    # (a new world's calls are numbered afresh: the old one's notices are not its own; the
    # old one's last call's communicators are never agreed on, so never freed)
    if _CALL["ended"] is not None:
        _LEFT.extend(_CALL["ended"][0])
    _CALL.update(number=0, inside=0, comms=None, waits=0, gave_up=False, open=[], ended=None)
    _HEARD.clear()
    # (as the world is made, not at the first fit: an evaluate-only job's ranks each took
    # every core of the node, oversubscribing it)
    _share_cores(here)
    if here.size > 1:
        _abort_all_on_error(here)
        if not _REPORTS_END:  # (run before mpi4py's MPI_Finalize, registered earlier)
            atexit.register(_end_reports)
            _REPORTS_END.append(True)
        # Which process is which rank: a launcher that reports a dead process by its pid
        # (MPICH's Hydra) is then understood.
        peers = comm.allgather(f"{socket.gethostname()}:{os.getpid()}")
        if here.is_root:
            sys.stderr.write(f"xpcnn: {here.size} ranks (host:pid): " + ", ".join(
                f"rank {r} = {p}" for r, p in enumerate(peers)) + "\n")
    _WORLD["world"] = here
    return here


def _seconds(value: Any) -> float:
    try:
        return checks.number(float(value), "the collective timeout", low=0.0, low_open=True)
    except (TypeError, ValueError):  # (InputError is a ValueError)
        raise DistributedError(f"the collective timeout (XPCNN_DIST_TIMEOUT, or init's "
                               f"timeout) must be a positive number of seconds, got {value!r}"
                               ) from None


def _abort_all_on_error(here: World) -> None:
    """An exception that ends this rank ends every rank (else they wait for it forever): print
    it, named by rank, then ``MPI_Abort``."""
    if getattr(sys.excepthook, "xpcnn_abort", False):  # (init called again)
        sys.excepthook = sys.excepthook.previous  # type: ignore[attr-defined]
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        sys.stderr.write(f"xpcnn: rank {here.rank} of {here.size} failed; ending all ranks\n")
        previous(kind, value, tb)
        sys.stderr.flush()
        # mpiexec stops forwarding a rank's output once the job is aborted: give it a moment to
        # pass on the traceback (seen cut short without this).
        time.sleep(ABORT_GRACE_SECONDS)
        here.comm.Abort(1)

    hook.xpcnn_abort, hook.previous = True, previous  # type: ignore[attr-defined]
    sys.excepthook = hook


def abort(code: int) -> None:
    """End every rank of a distributed job with exit status ``code`` (nothing in one process):
    for errors a rank handles itself, such as the command line's."""
    here = world()
    if here.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        here.comm.Abort(code)


def device_for_rank(device: Any) -> Any:
    """The device a rank uses for a device flag: on several ranks, ``"cuda"`` / ``"gpu"`` (no
    index) and ``"auto"`` where there is a GPU mean ``"cuda:<local rank>"``; anything else, and
    everything in one process, is kept as it is."""
    flag = device.strip().lower() if isinstance(device, str) else None
    if flag not in ("cuda", "gpu", "auto") or world().size == 1:
        return device
    from .backend import cuda_available

    if not cuda_available():  # "cuda" then fails with get_backend's own clear message
        return "cpu" if flag == "auto" else device
    import cupy

    here, count = world(), cupy.cuda.runtime.getDeviceCount()
    if here.local_rank >= count:
        raise DeviceError(f"rank {here.rank} is process {here.local_rank + 1} of "
                          f"{here.local_size} on its node, which has {count} GPU(s): start at "
                          "most one process per GPU on each node")
    return f"cuda:{here.local_rank}"


# -- communicators: sum buffers over the ranks, started now and waited for later --------------


class MpiSum:
    """Sums NumPy buffers over the ranks with MPI, in place and non-blocking."""

    #: Its buffers are host arrays: numbers summed with a step's stats are read at no cost
    #: (GradientBuckets' marks).
    host = True

    def __init__(self, here: World) -> None:
        from mpi4py import MPI

        self.world, self.mpi = here, MPI

    def start(self, buf: Any) -> Any:
        request = _comm(self.world).Iallreduce(self.mpi.IN_PLACE, buf, op=self.mpi.SUM)
        # (kept until waited for: one an error leaves unfinished keeps its call's
        # communicators, see together; completed ones are null, and dropped here)
        _CALL["open"] = [r for r in _CALL["open"] if r] + [request]
        return request

    def progress(self, handles: list[Any]) -> None:
        """Let MPI move the started reductions on (MPICH progresses only inside MPI calls)."""
        if handles:
            self.mpi.Request.Testall(handles)

    def wait(self, handles: list[Any], what: str) -> None:
        _wait(self.world, handles, what)


class NcclSum:
    """Sums CuPy buffers over the ranks with NCCL on a stream of its own (the NCCL id goes to
    every rank over MPI). ``start`` orders the reduction after the work queued so far on the
    current stream; ``wait`` orders the current stream's next work after it: neither blocks the
    host."""

    host = False  # (device buffers: a read of the stats would wait for the device)

    def __init__(self, here: World, device: Any) -> None:
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        uid = nccl.get_unique_id() if here.rank == 0 else None
        uid = _comm(here).bcast(uid, root=0)
        with device:
            self.comm = nccl.NcclCommunicator(here.size, uid, here.rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.types = {np.dtype(np.float16): nccl.NCCL_FLOAT16,
                      np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def start(self, buf: Any) -> Any:
        cuda = self.cupy.cuda
        ready = cuda.Event(disable_timing=True)
        ready.record(cuda.get_current_stream())
        self.stream.wait_event(ready)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.types[buf.dtype],
                            self.nccl.NCCL_SUM, self.stream.ptr)
        done = cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    def progress(self, handles: list[Any]) -> None:
        """NCCL moves on by itself."""

    def wait(self, handles: list[Any], what: str) -> None:
        stream = self.cupy.cuda.get_current_stream()
        for done in handles:
            stream.wait_event(done)


def _wait(here: World, requests: list[Any], what: str, hint: str = "") -> None:
    """Wait for MPI requests (collectives) for at most ``here.timeout`` seconds (``hint``: more
    of what the error says may have happened); stopped by another rank's failure
    (:func:`together`). A wait given up leaves its requests unfinished: they are kept, with
    their buffers, to the end (MPI may still write there), and so are its call's
    communicators, never used again (see :func:`together`)."""
    from mpi4py import MPI

    try:
        _poll(here, lambda: MPI.Request.Testall(requests), lambda: DistributedError(
            f"rank {here.rank} of {here.size} waited {here.timeout:g} s for the other ranks in "
            f"{what}: one of them is stuck or has died{hint} (XPCNN_DIST_TIMEOUT sets the "
            "limit)"), what)
    except BaseException:
        _LEFT.extend(requests)
        _CALL["gave_up"] = True
        raise
    _CALL["waits"] += 1


def _poll(here: World, done: Callable[[], bool], late: Callable[[], Exception], what: str,
          exchange: bool = True) -> None:
    """Call ``done`` until it is true, for at most ``here.timeout`` seconds (then raise
    ``late()``), or until another rank's notice that its fit or evaluate failed (inside one
    here: :func:`together`), raised here naming that rank and its error (``what``: what this
    rank waited for), unless the wait is an ``exchange`` (a collective) that the failing rank
    completed before it failed: that one completes here too (the notice is raised at the
    call's next). MPI moves a non-blocking operation on only inside MPI calls, so this polls
    without sleeping (yielding the core to any other thread that wants it) for a second,
    then every millisecond; notices are looked for every millisecond."""
    start, listen = time.monotonic(), 0.0
    while not done():
        waited = time.monotonic() - start
        if waited >= listen:
            listen = waited + 1e-3
            failed = _heard(here)
            if failed is not None and not (exchange and failed[4] > _CALL["waits"]):
                raise _failed_there(here, failed, what)
        if waited > here.timeout:
            raise late()
        if waited < 1.0:
            os.sched_yield()
        else:
            time.sleep(1e-3)


# -- each fit and evaluate on communicators of its own; one rank's failure ends it on all ------

#: The tag of a rank's notice that its fit or evaluate failed, on ``World.notices``.
_NOTICE_TAG = 2
# This process's fit and evaluate calls on several ranks: how many began (each rank's n-th
# pairs with the others' n-th as it begins, so a number names the same call on every rank),
# whether one runs, its communicators (see together), how many of its exchanges (waits of
# _wait) completed here (a notice carries the failing rank's count), whether this rank gave up
# a wait in it, its reductions started and not yet waited for (MpiSum), the last call's
# communicators and whether an exchange of that call was left unfinished here (decided on at
# the next call's start), and how many calls' communicators were kept for good.
_CALL: dict[str, Any] = {"number": 0, "inside": 0, "comms": None, "waits": 0, "gave_up": False,
                         "open": [], "ended": None, "kept": 0}
# notices received (call number, rank, call, error, exchanges completed there); kept while
# their call runs, so that each later wait in it raises too
_HEARD: list[tuple[int, int, str, str, int]] = []
_TOLD: list[Any] = []  # this rank's notices (their send requests) not known to be delivered
# communicators and requests of exchanges left unfinished on some rank: never freed (a freed
# communicator's context is reused, and a message of that exchange still on its way would
# then pair with a later call's), nor their buffers (MPI may still write there)
_LEFT: list[Any] = []


def _comm(here: World, checks: bool = False) -> Any:
    """The communicator of ``here``'s collectives (``checks``: of its tagged sums, see
    :func:`host_sum`), that of the fit or evaluate running, if one is (:func:`together`)."""
    comms = _CALL["comms"]
    if comms is not None and here is _WORLD.get("world"):
        return comms[1] if checks else comms[0]
    return here.checks if checks and here.checks is not None else here.comm


@contextlib.contextmanager
def together(call: str) -> Iterator[None]:
    """Around ``call`` (fit, evaluate) on several ranks. It begins by duplicating
    ``World.calls`` (twice: for its collectives and its tagged sums) on every rank, and makes
    every exchange on those duplicates: where an error ended an earlier call on one rank, and
    an exchange of that call was left unfinished on another, the ranks' next calls still pair
    exactly (each rank's n-th call with the others' n-th), so a script that catches the error
    on every rank and calls again goes on. Where an error ends it on this rank (its data's, a
    callback's, a step's), every other rank is told at once (a small message on
    ``World.notices``, not waited for), and one waiting inside the same call raises a
    :class:`DistributedError` naming this rank and its error (it otherwise waited for the
    timeout, blaming a stuck rank). Calls within calls (an evaluate in a callback of fit) are
    the outer one's. Nothing in one process.

    A call's duplicates are freed at the next call's start, where every rank agrees (its
    first exchange) that none left an exchange of that call unfinished (gave up a wait, or
    ended with a reduction started and not completed): so every rank frees them, or none
    (``MPI_Comm_free`` is collective), and a message of an abandoned exchange still on its
    way never meets a later call's communicator. Otherwise they are kept for good; MPI has a
    few thousand (MPICH: 2048 a process), so a job in which about a thousand calls ended
    that way is told to restart (:func:`_own_communicators`)."""
    here = world()
    if here.size == 1 or _CALL["inside"]:
        yield
        return
    comms = _own_communicators(here, call)
    _CALL.update(number=_CALL["number"] + 1, inside=1, comms=comms, waits=0, gave_up=False,
                 open=[])
    try:
        _settle_last_call(here, call)
        yield
    except BaseException as error:
        # (not a Ctrl-C, which mpiexec gives every rank; nor the error of another's notice)
        if not isinstance(error, KeyboardInterrupt) and \
                getattr(error, "heard_from", None) is None:
            _tell(here, call, error)
        raise
    finally:
        _CALL.update(inside=0, comms=None, ended=(comms, _left_unfinished()))


def _left_unfinished() -> bool:
    """Whether the call ending here left an exchange unfinished on this rank: a wait given up,
    or a reduction started (MpiSum) that is not complete now (an error between a step's start
    of its sums and their wait); those requests are kept with their buffers."""
    started = [r for r in _CALL["open"] if r]
    _CALL["open"] = []
    if started:
        from mpi4py import MPI

        try:
            done = MPI.Request.Testall(started)
        except Exception:  # (an MPI error in the exchange: unfinished)
            done = False
        if not done:
            _LEFT.extend(started)
            return True
    return bool(_CALL["gave_up"])


def _settle_last_call(here: World, call: str) -> None:
    """As a call begins, in its first exchange: free the last call's communicators on every
    rank where no rank left an exchange of that call unfinished; keep them for good
    otherwise (this rank's or another's)."""
    ended, _CALL["ended"] = _CALL["ended"], None
    unfinished = 1.0 if ended is None or ended[1] else 0.0  # (no last call here: keep)
    agreed = False
    try:
        agreed = host_sum(here, [unfinished], f"the start of {call}")[0] == 0
    finally:
        if ended is not None:
            if agreed:
                for comm in ended[0]:
                    comm.Free()
            else:
                _LEFT.extend(ended[0])
                _CALL["kept"] += 1


def _own_communicators(here: World, call: str) -> tuple[Any, Any]:
    """Two duplicates of ``here.calls``, made on every rank as ``call`` begins (with the
    timeout: a rank not making the call is named as such). MPI's refusal to make them (it has
    no context left: too many kept, see :func:`together`) is a :class:`DistributedError`."""
    from mpi4py import MPI

    made: list[Any] = []
    try:
        for _ in range(2):  # (one by one: a first made before the second fails is kept)
            made.append(here.calls.Idup())
        requests = [request for _, request in made]
        _poll(here, lambda: MPI.Request.Testall(requests), lambda: DistributedError(
            f"rank {here.rank} of {here.size} waited {here.timeout:g} s for the other ranks to "
            f"begin {call}: one of them is stuck or has died, or is not making this call: fit "
            "and evaluate must be called on every rank, in the same order; the ranks' calls "
            "no longer pair, so end the job (XPCNN_DIST_TIMEOUT sets the limit)"),
            f"the start of {call}")
    except MPI.Exception as e:
        _LEFT.extend(made)
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(
            f"rank {here.rank} of {here.size} could not make the communicators of this {call} "
            f"(MPI: {said}): MPI has a limited number of communicators (MPICH: 2048 a "
            f"process), and {_CALL['kept']} earlier fit or evaluate calls of this job ended "
            "with an exchange left unfinished (a rank failed or timed out while another "
            "waited), each keeping its two for good; end the job and start it again (from "
            "its last checkpoint)") from e
    except BaseException:
        _LEFT.extend(made)
        raise
    return made[0][0], made[1][0]


def _tell(here: World, call: str, error: BaseException) -> None:
    """Send every other rank the notice that ``call`` failed here with ``error``. Never
    raises: where the notice cannot be sent, ``error`` says so in a note."""
    try:
        said = _message(error).encode(errors="replace")[:_MESSAGE_BYTES].decode(
            errors="ignore")  # (a character cut in two)
        _TOLD[:] = [r for r in _TOLD if not r.Test()]
        notice = (_CALL["number"], here.rank, call, said, _CALL["waits"])
        for rank in range(here.size):
            if rank != here.rank:
                _TOLD.append(here.notices.isend(notice, dest=rank, tag=_NOTICE_TAG))
    except Exception as failed:
        add_note(error, f"xpcnn could not tell the other ranks of this error "
                        f"({type(failed).__name__}: they wait for this rank until the timeout)")


def _message(error: BaseException) -> str:
    """``error``'s type and message; its type alone where its message cannot be made."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:  # (a __str__ that raises)
        return f"{type(error).__name__} (its message could not be made)"


def _heard(here: World) -> tuple[int, int, str, str, int] | None:
    """Inside a call (:func:`together`), another rank's notice that the same call failed there,
    if one has come; notices of earlier calls (an error every rank raised, whose notices no
    one waited for) are dropped."""
    if here.notices is None or not _CALL["inside"]:
        return None
    while here.notices.iprobe(tag=_NOTICE_TAG):
        _HEARD.append(here.notices.recv(tag=_NOTICE_TAG))
    number = _CALL["number"]
    _HEARD[:] = [n for n in _HEARD if n[0] >= number]
    return next((n for n in _HEARD if n[0] == number), None)


def _failed_there(here: World, failed: tuple[int, int, str, str, int], what: str
                  ) -> DistributedError:
    """The error of another rank's notice ``failed``, heard while this rank waited in
    ``what``."""
    _, rank, call, said, _ = failed
    error = DistributedError(f"rank {rank} of {here.size} failed in {call}: {said} (rank "
                             f"{here.rank} stopped waiting for it in {what})")
    error.heard_from = rank  # type: ignore[attr-defined]
    return error


#: Bytes of each rank's name of the operation it is in, exchanged before a tagged sum.
_TAG_BYTES = 96
#: Numbers of a tagged sum's layout exchanged with its name: the payload's length, then what
#: its columns are (the numbers of layers, of data sources...).
_LAYOUT_INTS = 4


def host_sum(here: World, values: Sequence[float], what: str, tagged: bool = False,
             layout: Sequence[int] = (),
             other_layout: Callable[[list[tuple[int, ...]]], str] | None = None
             ) -> list[float]:
    """The sum over the ranks of a few host numbers (float64), with the timeout. ``tagged``
    (the checks made once a call, never a training step's sums): on a communicator of their
    own (``World.checks``, or the one their fit or evaluate made, see :func:`together`: never
    paired with training's collectives), the ranks first tell each other ``what`` they are
    in and the payload's length and ``layout`` (at most
    :data:`_LAYOUT_INTS` - 1 counts of what its columns are), in an exchange of a size that
    every tagged sum shares (:func:`_same_operation`): a rank in another call (an
    ``evaluate`` on rank 0 alone as the others begin ``fit``) is refused on every rank,
    saying which; a payload of another length is never exchanged (erroneous MPI, read as
    shifted columns), refused instead with ``other_layout(each rank's layout)``, or a
    message naming the lengths."""
    buf = np.asarray(values, dtype=np.float64)
    if here.size > 1:
        from mpi4py import MPI

        comm = _comm(here)
        if tagged:  # (name and payload on one communicator: they never pair apart)
            comm = _comm(here, checks=True)
            _same_operation(here, comm, what, [buf.size, *layout], other_layout)
        _wait(here, [comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)], what)
    return [float(v) for v in buf]


def _same_operation(here: World, comm: Any, what: str, layout: Sequence[int],
                    other_layout: Callable[[list[tuple[int, ...]]], str] | None) -> None:
    """Exchange each rank's ``what`` (its first :data:`_TAG_BYTES` bytes) and ``layout`` (the
    payload's length, then the caller's counts) on ``comm``, and raise where they differ."""
    from mpi4py import MPI

    if len(layout) > _LAYOUT_INTS:
        raise ValueError(f"a tagged sum's layout holds at most {_LAYOUT_INTS - 1} counts")
    table = np.zeros((here.size, _TAG_BYTES + _LAYOUT_INTS), dtype=np.int64)
    mine = what.encode()[:_TAG_BYTES]
    table[here.rank, :len(mine)] = np.frombuffer(mine, dtype=np.uint8)
    table[here.rank, _TAG_BYTES:_TAG_BYTES + len(layout)] = layout
    _wait(here, [comm.Iallreduce(MPI.IN_PLACE, table, op=MPI.SUM)], what, hint=(
        ", or is not making this call: fit and evaluate must be called on every rank, in the "
        "same order"))
    names = [bytes(row[:_TAG_BYTES].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
             for row in table]
    if len(set(names)) > 1:
        said = ", ".join(f"rank(s) {[r for r in range(here.size) if names[r] == name]} in "
                         f"{name}" for name in dict.fromkeys(names))
        raise DistributedError(f"the ranks are in different calls: {said}: fit and evaluate "
                               "must be called on every rank, in the same order (predict and "
                               "save may be called on rank 0 alone)")
    layouts = [tuple(int(v) for v in row[_TAG_BYTES:_TAG_BYTES + len(layout)])
               for row in table]
    if len(set(layouts)) > 1:
        if other_layout is not None:
            raise DistributedError(other_layout([t[1:] for t in layouts]))
        said = ", ".join(f"rank(s) {[r for r in range(here.size) if layouts[r] == t]} "
                         f"{t[0]}" for t in dict.fromkeys(layouts))
        raise DistributedError(f"the ranks have other numbers of values to sum in {what}: "
                               f"{said}: every rank must build and compile the model alike "
                               "(its metrics too)")


#: Bytes of rank 0's error message that :func:`write_on_root` passes to the other ranks.
_MESSAGE_BYTES = 1000
#: The tag of rank 0's reports of its writes, on ``World.reports``.
_REPORT_TAG = 1
_SENT: list[Any] = []  # rank 0's reports (their send requests) not yet known to be delivered
_REPORTS_END: list[bool] = []  # whether _end_reports is registered to run at exit
_LEAVING: list[bool] = []  # inside on_the_way_out


@contextlib.contextmanager
def on_the_way_out() -> Iterator[None]:
    """Inside, :func:`write_on_root` writes for a run that is ending with an error (a
    ModelCheckpoint's save put off, written as a callback's error goes on): rank 0 writes and
    tells no one, the other ranks return at once. The error may be one rank's alone, whose
    others are not saving: a wait on either side would hold the job for the timeout instead
    of letting the error end it now."""
    _LEAVING.append(True)
    try:
        yield
    finally:
        _LEAVING.pop()


def write_on_root(write: Callable[[], bool | None], path: str) -> bool:
    """Run ``write`` (a file's write to ``path``) on rank 0 alone; returns whether it wrote
    (``write`` returns False where it chose not to). Rank 0 never waits for the others: it
    writes, then sends its outcome (point to point, on ``World.reports``, without waiting for
    receipt) to every other rank. A rank other than 0 that calls this for the same ``path``
    waits for that outcome (with the world's timeout), so that it may read the file back at
    once, as PyTorch DDP scripts do by hand with a barrier, and returns whether rank 0 wrote.
    So both habits work: every rank calling a save, and ``if rank == 0: model.save(p)`` (rank
    0 returns at once; the others, which did not ask, are not told). Where ``write`` raised,
    rank 0 raises its error again and the others a :class:`DistributedError` naming it and
    ``path`` (a :class:`RootNonFiniteError` for a :class:`NonFiniteError`). A rank waiting
    takes the first outcome for its ``path`` and drops those of other files (saves rank 0
    made alone); an outcome of a save of the same path that rank 0 made alone and this rank
    has not yet taken is taken for this one's (the file is whole, maybe older). Inside
    :func:`on_the_way_out`, no one waits or is told. In one process, just ``write()``."""
    here = world()
    if here.size == 1:
        return write() is not False
    if here.is_root:
        try:
            wrote = write() is not False
        except BaseException as error:
            message = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
            _report(here, (path, 2 if isinstance(error, NonFiniteError) else 1, False,
                           message.decode(errors="ignore")))  # (a character cut in two)
            raise
        _report(here, (path, 0, wrote, ""))
        return wrote
    if _LEAVING:
        return True  # (rank 0's outcome unknown here: it may have written)
    status, wrote, said = _reported(here, path)
    if status:
        kind = RootNonFiniteError if status == 2 else DistributedError
        raise kind(f"rank 0 failed to write {path}, which this rank waited for: {said}")
    return wrote


def _report(here: World, outcome: tuple[str, int, bool, str]) -> None:
    """Rank 0 sends ``outcome`` (path, status: 0 wrote or chose not to, 1 failed, 2 failed on
    NaN or infinity; whether it wrote; its error) to every other rank, without waiting: a
    message of about a kilobyte, which MPI delivers eagerly. The requests are kept (completed
    ones dropped here, the rest completed or freed at exit: see :func:`_end_reports`)."""
    if _LEAVING:
        return
    _SENT[:] = [r for r in _SENT if not r.Test()]
    for rank in range(1, here.size):
        _SENT.append(here.reports.isend(outcome, dest=rank, tag=_REPORT_TAG))


def _reported(here: World, path: str) -> tuple[int, bool, str]:
    """On a rank other than 0: rank 0's outcome of its write of ``path`` (status, wrote,
    error), the first one for that path; those of other paths are dropped."""
    got: list[Any] = []

    def arrived() -> bool:
        while here.reports.iprobe(source=0, tag=_REPORT_TAG):
            outcome = here.reports.recv(source=0, tag=_REPORT_TAG)
            if outcome[0] == path:
                got.append(outcome)
                return True
        return False

    _poll(here, arrived, lambda: DistributedError(
        f"rank 0 did not report its write of {path} within {here.timeout:g} s "
        f"(XPCNN_DIST_TIMEOUT; rank {here.rank} of {here.size} waited for it): every rank must "
        "call save, save_weights, export or save_checkpoint with the same path, or rank 0 "
        "alone (if rank == 0: model.save(path)), never another rank alone"),
        f"rank 0's report of its write of {path}", exchange=False)
    _, status, wrote, said = got[0]
    return int(status), bool(wrote), str(said)


def _end_reports() -> None:
    """At exit, before ``MPI_Finalize``: rank 0 frees the requests of reports not yet
    delivered (to ranks that never asked for them; the requests are kept, and with them their
    buffers), the other ranks drop the reports that arrived unasked, so that no operation is
    left pending."""
    here = _WORLD.get("world")
    if here is None or here.reports is None:
        return
    from mpi4py import MPI

    if MPI.Is_finalized():
        return
    for request in _TOLD:  # (notices to ranks that had left the call, or ended)
        if not request.Test():
            request.Free()
    while here.notices.iprobe(tag=_NOTICE_TAG):
        here.notices.recv(tag=_NOTICE_TAG)
    if here.is_root:
        for request in _SENT:
            if not request.Test():
                request.Free()
    else:
        while here.reports.iprobe(source=0, tag=_REPORT_TAG):
            here.reports.recv(source=0, tag=_REPORT_TAG)


# -- gradients ----------------------------------------------------------------------------------


class GradientBuckets:
    """Averages the gradients of ``layers`` over the ranks, in flat buckets of about
    ``bucket_bytes``, each reduced as soon as backward has filled it.

    Parameters are bucketed in backward order (last layer first), so the first bucket is full
    while backward still runs through the earlier layers. Per step: :meth:`begin` with this
    rank's share of the global batch and its [loss, correct, top-k counts...] stats (reduced
    alongside), then
    :meth:`layer_done` after each layer's backward, then :meth:`finish` for the averaged
    gradients (views into the buckets, in ``layers``' parameter order: the model's trainable
    layers, as the optimiser takes them) and the summed stats.
    A non-finite gradient on any rank makes the sum non-finite on every rank, so the overflow
    check after it (mixed precision) skips the step on all of them.

    ``extra`` (host communicators): numbers summed with each step's stats, which ``check`` is
    given before any bucket is waited for (each rank's mark of the layers it trains, in its
    own slots: a rank whose buckets hold other layers, of other sizes, made the bucket
    reductions erroneous MPI, which hung or summed a mix). ``deferred``: buckets made again
    mid-fit (a layer frozen or unfrozen on this rank), whose first step starts none before
    that check, so that a rank still holding the old ones is never paired with them.
    """

    def __init__(self, comm: Any, xp: Any, layers: Sequence[Any],
                 bucket_bytes: int = BUCKET_BYTES,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES, *,
                 extra: np.ndarray | None = None,
                 check: Callable[[np.ndarray], None] | None = None,
                 deferred: bool = False) -> None:
        self.comm, self.xp, self.layers = comm, xp, tuple(layers)
        self.extra, self.check = extra, check
        self._defer = deferred and extra is not None
        self._stats_handle: Any = None
        self._count = 0  # (the stats' numbers, before the extra ones)
        self.entries = [(layer, key) for layer in layers for key in layer.params]
        # Backward order; a bucket closes once it holds its cap (DDP's rule): in the reference
        # models the first holds the big Dense kernel, whose allreduce then runs while backward
        # goes through the convolutions.
        self.buckets: list[list[int]] = [[]]  # entry indices
        size = 0
        for i in reversed(range(len(self.entries))):
            layer, key = self.entries[i]
            p = layer.params[key]
            self.buckets[-1].append(i)
            size += p.size * p.dtype.itemsize
            if size >= (first_bucket_bytes if len(self.buckets) == 1 else bucket_bytes):
                self.buckets.append([])
                size = 0
        self.buckets = [b for b in self.buckets if b]
        self.offsets: dict[int, tuple[int, int]] = {}  # entry -> its slice of its bucket
        for bucket in self.buckets:
            n = 0
            for i in bucket:
                size = self._param(i).size
                self.offsets[i] = (n, n + size)
                n += size
        owners: dict[int, set[int]] = {}  # id(layer) -> buckets holding its parameters
        for b, bucket in enumerate(self.buckets):
            for i in bucket:
                owners.setdefault(id(self.entries[i][0]), set()).add(b)
        self.owner = {layer: tuple(sorted(b)) for layer, b in owners.items()}  # (in order)
        # How many layers each bucket waits for: a step counts them down (see layer_done).
        self.layers_per_bucket = [len({id(self.entries[i][0]) for i in b}) for b in self.buckets]
        self.buffers: list[Any] = [None] * len(self.buckets)  # this step's, once started
        self._handles: list[Any] = []
        self._weight = 1.0

    def _param(self, i: int) -> Any:
        layer, key = self.entries[i]
        return layer.params[key]

    def begin(self, weight: float, stats: Any) -> None:
        """Start a step in which this rank's batch is ``weight`` of the global batch: the
        gradients to come must be those of ``weight`` x this batch's loss (the model scales
        the loss gradient), ``stats`` is [mean loss, correct count, top-k counts...] of this
        batch (the counts summed over the ranks as the correct count is)."""
        self._weight = weight
        self._left = list(self.layers_per_bucket)
        self.buffers = [None] * len(self.buckets)
        self._handles = []
        self._stats = self.xp.concat([stats[:1] * weight, stats[1:]])
        self._count = int(self._stats.shape[0])
        if self.extra is not None:
            self._stats = self.xp.concat([self._stats, self.xp.asarray(
                self.extra, dtype=self._stats.dtype)])
        self._stats_handle = self.comm.start(self._stats)

    def layer_done(self, layer: Any) -> None:
        """``layer``'s backward has run: start every bucket it completes."""
        for b in self.owner.get(id(layer), ()):
            self._left[b] -= 1
            if self._left[b] == 0:
                self._start(b)
        self.comm.progress(self._handles)

    def finish(self) -> tuple[list[Any], Any]:
        """Start what is left (gradients that backward did not produce count as zeros), wait;
        returns the averaged gradients and the summed stats."""
        if self.extra is not None:
            self._checked()  # (before the buckets' wait, which other sizes never end)
        for b, buf in enumerate(self.buffers):
            if buf is None:
                self._start(b)
        stats = [] if self.extra is not None else [self._stats_handle]
        self.comm.wait([*stats, *self._handles], "the gradient allreduce")
        grads: list[Any] = [None] * len(self.entries)
        for b, bucket in enumerate(self.buckets):
            for i in bucket:
                start, stop = self.offsets[i]
                grads[i] = self.xp.reshape(self.buffers[b][start:stop], self._param(i).shape)
        return grads, self._stats if self.extra is None else self._stats[:self._count]

    def _checked(self) -> None:
        """Wait for this step's stats, once, and give ``check`` their extra numbers."""
        if self._stats_handle is None:
            return
        handle, self._stats_handle = self._stats_handle, None
        self.comm.wait([handle], "the gradient allreduce")
        self._defer = False  # (the next steps start their buckets as backward fills them)
        if self.check is not None:
            self.check(np.asarray(self._stats[self._count:]))

    def _start(self, b: int) -> None:
        """Pack bucket ``b`` (one concatenation: one launch on a GPU) and start its sum. The
        gradients are already weighted (the model scales the loss gradient, see begin)."""
        if self._defer:
            self._checked()
        xp = self.xp
        parts = []
        for i in self.buckets[b]:
            layer, key = self.entries[i]
            g, p = layer.grads.get(key), self._param(i)
            if g is None and self._weight != 0:  # (as one process names it: not summed as 0)
                raise InputError(f"layer {layer.name!r} ({type(layer).__name__})'s backward "
                                 f"gave no gradient for its parameter {key!r}: backward must "
                                 "fill grads[name] for every one of its params")
            # (a mixed-precision layer's gradient in the compute dtype: summed in the
            # parameter's)
            parts.append(xp.zeros_like(p) if self._weight == 0 else
                         xp.astype(g, p.dtype, copy=False))
        self.buffers[b] = xp.concat([xp.reshape(g, (-1,)) for g in parts])
        self._handles.append(self.comm.start(self.buffers[b]))


# -- what fit does on several ranks -----------------------------------------------------------


class DataParallel:
    """The distributed side of ``fit`` and ``evaluate`` for one model on ``here``'s ranks."""

    def __init__(self, model: Any, here: World, comm: Any = None) -> None:
        self.model, self.world = model, here
        backend = model.backend
        # comm: an MpiSum / NcclSum, or anything with their start/progress/wait (tests)
        self.comm = comm if comm is not None else _communicator(here, backend)
        # (the mark of the last step, which each agreement to stop compares: which layers it
        # trained, its buckets' (see _buckets), its learning rate and its number; a rate of -1
        # before any step)
        self.trained_mark: list[float] = []
        self.moved: dict[int, Any] = {}  # (frozen since the last average_state: see there)
        self.step_lr, self.step_number = -1.0, 0
        self.buckets = self._buckets(tuple(model.trainable_layers))
        from .layers.base import RandomLayer

        self.random_layers = [la for la in model.layers if isinstance(la, RandomLayer)]
        self.total, self.weight = 0, 1.0  # the global batch's size, this rank's share of it
        # whether the ranks agreed to stop at this step (agree_to_stop); None: not asked yet
        self.stop_agreed: bool | None = None
        # a NonFiniteError that this step's callbacks raised here (holding_non_finite), and
        # whether the agreement found one on any rank
        self.held: NonFiniteError | None = None
        self.non_finite_agreed = False

    # the batch
    def set_batch(self, local: int) -> None:
        """Before a training step on ``local`` samples, this rank's part of the global batch:
        learn every rank's part (one small host allreduce), so that random layers draw the
        global batch's numbers and keep this part's, and the gradients are weighted by
        ``local / total``."""
        sizes = np.zeros(self.world.size)
        sizes[self.world.rank] = local
        sizes = host_sum(self.world, sizes, "the batch sizes")
        ended = [r for r in range(self.world.size) if sizes[r] < 0]
        if ended:
            raise DistributedError(f"the training data of rank(s) {ended} ran out of batches "
                                   "before this rank's: every rank must give the same number "
                                   "of batches an epoch")
        self.use_slice(int(sum(sizes[:self.world.rank])), local, int(sum(sizes)))

    def end_batches(self, steps: int, epoch: int) -> None:
        """After this rank's last batch of ``epoch`` (``steps`` of them) from an iterable: tell
        the others, in the exchange of the batch sizes (-1: no more), and learn whether every
        rank ended there too (a rank whose data ran out early left the others waiting in that
        exchange for the whole timeout, then blaming a stuck rank)."""
        sizes = np.zeros(self.world.size)
        sizes[self.world.rank] = -1
        sizes = host_sum(self.world, sizes, "the batch sizes")
        going = [r for r in range(self.world.size) if sizes[r] >= 0]
        if going:
            raise DistributedError(f"the training data of this rank ran out after {steps} "
                                   f"batches in epoch {epoch + 1} while rank(s) {going} had "
                                   "more: every rank must give the same number of batches an "
                                   "epoch")

    def use_slice(self, start: int, local: int, total: int) -> None:
        """This rank's part is samples ``start:start + local`` of a global batch of ``total``."""
        for layer in self.random_layers:
            layer.batch_slice = (start, total)
        self.total, self.weight = total, local / total

    def buckets_for(self, trained: tuple[Any, ...]) -> GradientBuckets:
        """The buckets of ``trained``, the layers this step updates: made again after a layer
        was frozen or unfrozen (by a callback, which runs on every rank, so every rank makes
        the same buckets at the same step; one that did so on some ranks only is refused on
        every rank: see :meth:`_buckets`). Called once a step, before its sums: the step's
        learning rate and number are noted for the agreement after it (:meth:`agree_to_stop`)."""
        if self.buckets.layers is not trained and self.buckets.layers != trained:
            # (a layer frozen now moved its statistics until now: averaged at the next
            # average_state, whose rule leaves a frozen layer's alone)
            self.moved.update((id(la), la) for la in self.buckets.layers
                              if la.state and la.updates_state)
            self.buckets = self._buckets(trained, deferred=True)
        optimizer = self.model.optimizer
        self.step_lr, self.step_number = float(optimizer.lr), optimizer.iterations + 1
        return self.buckets

    def _buckets(self, trained: tuple[Any, ...], deferred: bool = False) -> GradientBuckets:
        """Buckets for the layers ``trained`` (``deferred``: made again mid-fit), marked with
        which of the model's layers they are. With host communicators (MPI), the marks go with
        each step's stats and are compared before any bucket is waited for, so that the
        ranks' buckets never differ unnoticed: a callback that froze a layer on one rank alone
        made the reductions erroneous (a hang, or a mix of gradients, silently)."""
        chosen = {id(la) for la in trained}
        self.trained_mark = _bits([id(la) in chosen for la in self.model.layers])
        here, extra = self.world, None
        if getattr(self.comm, "host", False) and here.size > 1:
            table = np.zeros((here.size, len(self.trained_mark)))
            table[here.rank] = self.trained_mark
            extra = table.ravel()
        return GradientBuckets(self.comm, self.model.backend.xp, trained, extra=extra,
                               check=self._refuse_other_marks, deferred=deferred)

    def _refuse_other_marks(self, marks: np.ndarray) -> None:
        """Raise, on every rank alike, where the ranks' marks ``marks`` (their rows, each
        with the layers a rank trained, then maybe its learning rate) differ."""
        marks = marks.reshape(self.world.size, -1)
        if (marks == marks[0]).all():  # (every step: no layer looked at)
            return
        apart = _marks_apart(self.world, marks, self.model.layers, self.step_number)
        if apart is not None:
            raise DistributedError(apart)

    def empty_step(self, zeros: Any, trained: tuple[Any, ...]) -> tuple[Any, list[Any]]:
        """The step of a rank without a sample in this batch: its random layers still count
        the batch (to draw as the others do afterwards), it adds zeros to the sums of the
        gradients of ``trained``."""
        for layer in self.random_layers:
            if layer.draws_in_training():  # (as the ranks with samples count theirs)
                layer.skip_draw()
        buckets = self.buckets_for(trained)
        buckets.begin(0.0, zeros)
        grads, stats = buckets.finish()
        return stats, grads

    def end_fit(self) -> None:
        for layer in self.random_layers:
            layer.batch_slice = None

    # the model
    def check_same_layers(self) -> None:
        """Refuse, on every rank alike, a model whose layers' settings differ between the ranks
        (a Normalization adapted on each rank's own shard: their models would predict
        differently, and rank 0's alone would be saved), or whose compile settings do (an
        optimiser, learning rate or step count, loss, metrics or precision of a rank's own:
        the ranks' weights drifted apart, or the averaged gradient was a silent mix). One host
        allreduce of a checksum a layer: of its settings and of the bytes of its state that
        training never moves (an adapted Normalization's statistics, weights that the
        broadcast would overwrite); and one a part of compile's settings."""
        layers = self.model.layers
        backend = self.model.backend
        compiled = _compile_settings(self.model)

        def checksum(la: Any) -> int:
            crc = _crc(la.get_config())
            for a in ([] if la.updates_state else la.state.values()):
                crc = zlib.crc32(np.ascontiguousarray(backend.to_numpy(a)).tobytes(), crc)
            return crc

        row = [checksum(la) for la in layers] + [_crc(v) for v in compiled.values()]

        def other_count(counts: list[tuple[int, ...]]) -> str:
            ranks = [r for r in range(self.world.size) if counts[r][0] != counts[0][0]]
            return (f"the model has another number of layers on rank(s) {ranks} than on rank 0 "
                    f"({', '.join(str(counts[r][0]) for r in ranks)} against {counts[0][0]}): "
                    "every rank must build the same model")

        sums = _rank_checksums(self.world, row, "fit (the layers' and compile's settings)",
                               [len(layers), len(compiled)], other_count)
        differ = np.flatnonzero((sums != sums[0]).any(axis=0))
        if differ.size:
            i = int(differ[0])
            ranks = _differing_ranks(sums, i)
            if i >= len(layers):
                raise DistributedError(
                    f"the model was compiled with another {list(compiled)[i - len(layers)]} on "
                    f"rank(s) {ranks} than on rank 0: every rank must compile the model alike "
                    "(optimizer, its learning rate and step count, loss, metrics, precision)")
            raise DistributedError(
                f"layer {layers[i].name!r} ({type(layers[i]).__name__}) has other settings on "
                f"rank(s) {ranks} than on rank 0: every rank must build the same model (rank "
                "0's weights go to all, its settings do not); a Normalization adapted on each "
                "rank's own shard, say: adapt it on the same data on every rank, or give mean "
                "and std")

    def check_same_data(self, data: Any, validation: Any = None,
                        class_weights: np.ndarray | None = None,
                        arguments: dict[str, Any] | None = None) -> None:
        """Refuse, on every rank alike, training (or ``validation``) data, fit's
        ``class_weights`` (its table, as fit uses it) or ``arguments`` (by name: fit's
        arguments, its callbacks) that differ between the ranks: see
        :func:`refuse_different_data`."""
        refuse_different_data(self.world, [("training", data)] + (
            [] if validation is None else [("validation", validation)]),
            class_weights=class_weights, arguments=arguments)

    def agree(self, error: BaseException | None, what: str) -> None:
        """:func:`agree` in fit."""
        agree(self.world, error, what)

    def check_same_start(self, start: Any, paths: Sequence[str]) -> None:
        """After the callbacks' ``on_train_begin``, before any step: refuse, on every rank
        alike, a fit that resumed from a checkpoint (``start``, its position: None where it
        starts afresh) on some ranks and not on others, or at another point, or from another
        file (its progress and history differ). A checkpoint on a node-local disk is found
        by rank 0 alone: the ranks then averaged the gradients of different epochs, a silent
        mix. ``paths``: the checkpoints' (for the message)."""
        row = [0.0, 0.0, 0.0, 0.0]
        if start is not None:
            history = self.model.history
            row = [1.0, float(start.epoch), float(start.step),
                   float(_crc({"progress": start.entry(), "history": history.history}))]
        sums = _rank_checksums(self.world, row, "fit (where it resumes)")
        groups: dict[tuple[float, ...], list[int]] = {}
        for r in range(self.world.size):
            groups.setdefault(tuple(sums[r]), []).append(r)
        if len(groups) == 1:
            return
        said = "; ".join(
            f"rank(s) {ranks} start afresh (no checkpoint there)" if not key[0] else
            f"rank(s) {ranks} resume at epoch {int(key[1]) + 1}, step {int(key[2])}"
            for key, ranks in groups.items())
        where = " or ".join(repr(os.fspath(p)) for p in paths) or "the checkpoint"
        raise DistributedError(
            f"the ranks resume fit from different checkpoints at {where}: {said} (where two "
            "groups resume at the same point, from files of other runs): every rank must "
            "read the same file: give a path that every rank reads (a shared file system, not "
            "a node-local disk), or copy rank 0's file to that path on every node")

    def agree_to_stop(self, interrupted: bool = False) -> tuple[bool, bool]:
        """Whether any rank's ``model.stop_training`` is set, and whether any rank got a
        Ctrl-C (``interrupted``: this one's), after a step's callbacks (a checkpoint's asks
        with its Ctrl-C, else fit itself) and after ``on_epoch_end``: set on one rank alone (a
        signal handler, a callback deciding on that rank's own state), it left the others
        waiting in the next step's allreduce. One tagged host sum (on ``World.checks``: never
        paired with training's collectives); where any rank stops, every rank's
        ``stop_training`` is set (never cleared here: a signal's since the exchange waits
        for the next). The answer is kept for fit's loop (:meth:`agreed_stop`). The sum
        carries each rank's mark of its last step too (the layers it trained, its learning
        rate): where they differ (a callback's freeze or learning rate on some ranks only),
        every rank raises a :class:`DistributedError` naming the layer or the rates, and the
        ranks."""
        model, here = self.model, self.world
        # (and the last step's mark: layers frozen, or a learning rate set, on some ranks
        # only, were a silent mix of the ranks' steps, or a hang blamed on a stuck rank)
        marks = np.zeros((here.size, len(self.trained_mark) + 1))
        marks[here.rank] = [*self.trained_mark, self.step_lr]
        got = host_sum(here, [float(model.stop_training), float(interrupted),
                              float(self.held is not None), *marks.ravel()],
                       "fit (the agreement to stop)", tagged=True)
        self._refuse_other_marks(np.asarray(got[3:]))
        if got[0]:
            model.stop_training = True
        self.stop_agreed = got[0] > 0
        self.non_finite_agreed = self.non_finite_agreed or got[2] > 0
        return got[0] > 0, got[1] > 0

    def agreed_stop(self) -> bool:
        """In fit's loop, after a step's callbacks or ``on_epoch_end``: whether every rank
        stops there (agreed now, unless a checkpoint's callback agreed since the last
        call); where a rank held a non-finite step's error, every rank raises it
        (:meth:`agree_non_finite`)."""
        if self.stop_agreed is None:
            self.agree_to_stop()
        stop, self.stop_agreed = bool(self.stop_agreed), None
        if self.non_finite_agreed:
            self.non_finite_agreed = False
            self.agree_non_finite(self.held)
        return stop

    @contextlib.contextmanager
    def holding_non_finite(self) -> Iterator[None]:
        """Around each of a step's callbacks: a :class:`NonFiniteError` it raises here (a read
        of the running totals on this rank alone: rank 0's progress bar, every half second) is
        held (the first of the step's) for the step's agreement (:meth:`agreed_stop`), which
        raises it on every rank alike (raised at once, it ended fit on this rank alone, and
        the others waited for it in the next step's exchanges until the timeout). Each
        callback is held apart, so that every rank runs the same callbacks: a later one that
        exchanges (a save on every rank) would otherwise wait for this rank until the
        timeout."""
        try:
            yield
        except NonFiniteError as error:
            if self.held is None:
                self.held = error

    def agree_non_finite(self, error: BaseException | None) -> NoReturn:
        """Raise, on every rank at once, the error of the non-finite step that a rank found
        (``error``: this rank's own, from a read of its running totals; where None, they are
        read now: every rank's flag the same step, the loss and gradients being summed),
        naming the rank whose slice of the batch made it, as its own error does (its batch
        and layer, as in one process): the others' said only that another rank's had. One
        tagged host sum of every rank's error message."""
        self.held = None
        if error is None:
            try:
                self.model._read_totals()
            except (NonFiniteError, InputError) as e:  # (InputError: labels that are no class)
                error = e
        here = self.world
        table = np.zeros((here.size, 1 + _MESSAGE_BYTES))
        if error is not None:
            said = str(error).encode()[:_MESSAGE_BYTES]
            table[here.rank, 0] = 1 if isinstance(error, NonFiniteError) else 2
            table[here.rank, 1:1 + len(said)] = np.frombuffer(said, dtype=np.uint8)
        got = np.asarray(host_sum(here, table.ravel(), "fit (where a non-finite step arose)",
                                  tagged=True)).reshape(table.shape)
        kinds = [int(k) for k in got[:, 0]]
        views = [bytes(row[1:].astype(np.uint8)).rstrip(b"\0").decode(errors="ignore")
                 for row in got]
        agreed = _agreed_non_finite(here, error, kinds, views)
        # (raised on every rank alike: fit, ending quietly on it (TerminateOnNaN), may make
        # one more exchange on every rank, which a rank's own error cannot)
        agreed.on_every_rank = True  # type: ignore[attr-defined]
        raise agreed

    def broadcast_weights(self) -> None:
        """Every rank takes rank 0's weights (its parameters and BatchNorm statistics)."""
        _take_root_weights(self.world, self.model, _host_weights(self.model), _comm(self.world),
                           "the broadcast of the initial weights")

    def average_state(self) -> None:
        """Average the layers' non-trainable state (BatchNorm's running statistics), which
        each rank updates from its own slices (:attr:`~xpcnn.layers.base.Layer.moves_state`).
        A frozen built-in layer's are left alone: it runs in inference mode and never changes
        them (rank 0's were broadcast at the start), and the average of equal values is not
        always that value in floating point (three alike float64 statistics, summed and
        divided by 3, moved by an ulp at each epoch's end), except where it was frozen since
        the last average (its statistics moved, each rank's its own, until then); so are state
        that training never moves (``updates_state`` False: adapted statistics)."""
        layers = [la for la in self.model.layers if la.moves_state or id(la) in self.moved]
        self.moved.clear()
        if not layers:
            return
        from mpi4py import MPI

        backend = self.model.backend
        host = [(la, k, np.array(backend.to_numpy(a), dtype=np.float64))
                for la in layers for k, a in la.state.items()]
        _wait(self.world, [_comm(self.world).Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
                           for _, _, a in host], "the average of the BatchNorm statistics")
        for la, k, a in host:
            la.state[k] = backend.asarray(a / self.world.size, dtype=la.dtype)


#: Layers a number of a mark holds (one bit each): exact in float32 stats too.
_BITS = 24


def _bits(flags: Sequence[bool]) -> list[float]:
    """``flags`` packed :data:`_BITS` to a number (at least one number)."""
    return [float(sum(1 << j for j, on in enumerate(flags[i:i + _BITS]) if on))
            for i in range(0, len(flags), _BITS)] or [0.0]


def _unbits(numbers: Sequence[float], n: int) -> list[bool]:
    """The ``n`` flags that :func:`_bits` packed into ``numbers``."""
    return [bool(int(numbers[i // _BITS]) >> (i % _BITS) & 1) for i in range(n)]


def _marks_apart(here: World, marks: np.ndarray, layers: Sequence[Any], step: int
                 ) -> str | None:
    """What differs between the ranks' marks of training step ``step`` (``marks``' rows, a
    rank's: which of ``layers`` it trained, packed by :func:`_bits`; then, where there, its
    learning rate), for a refusal; None where nothing does."""
    size, chunks = here.size, len(_bits([False] * len(layers)))
    trained = [_unbits(row[:chunks], len(layers)) for row in marks]
    for i, la in enumerate(layers):
        on = [r for r in range(size) if trained[r][i]]
        if 0 < len(on) < size:
            off = [r for r in range(size) if r not in on]
            return (f"the ranks trained other layers at step {step}: layer {la.name!r} "
                    f"({type(la).__name__}) on rank(s) {on}, not on rank(s) {off}: a callback "
                    "froze or unfroze it on some ranks only (one deciding on its rank's own "
                    "state, say), and the gradients of other layers cannot be averaged; every "
                    "rank must freeze and unfreeze the same layers at the same step")
    rates = [float(row[chunks]) for row in marks] if marks.shape[1] > chunks else []
    if len(set(rates)) > 1:
        said = ", ".join(f"{rate} on rank(s) {[r for r in range(size) if rates[r] == rate]}"
                         for rate in dict.fromkeys(rates))
        return (f"the ranks trained step {step} at other learning rates: {said}: a callback "
                "or schedule set it on some ranks only (one deciding on its rank's own state, "
                "say), and the ranks' weights drift apart; every rank must train at the same "
                "learning rate at every step (a LearningRateScheduler with the same function "
                "on every rank)")
    return None


#: Words of a rank's non-finite error that name no place in its own batch: its batch and outputs
#: are finite (another rank's made the summed loss non-finite), or they could not be looked at
#: again (xpcnn.training.step's and xpcnn.totals' messages).
_NAMES_NO_PLACE = ("another rank's", "is not named")


def _agreed_non_finite(here: World, error: BaseException | None, kinds: list[int],
                       views: list[str]) -> BaseException:
    """The error this rank raises for a non-finite step, from every rank's ``views`` (their
    errors' messages; ``kinds``: 1 a NonFiniteError, 2 an InputError, 0 none): where the
    ranks' views differ, the view of the rank whose own batch made it (this rank's where it is
    one), its rank named; a rank whose labels were no classes is named by the others in a
    :class:`DistributedError` (its own InputError is raised there)."""
    found = [r for r in range(here.size) if kinds[r] == 2 or kinds[r] == 1 and not any(
        words in views[r] for words in _NAMES_NO_PLACE)]
    if not found or len({v for k, v in zip(kinds, views, strict=True) if k}) == 1:
        if error is not None:  # (every rank's view alike: a gradient's, the weights')
            return error
        r = next((r for r in range(here.size) if kinds[r]), None)
        if r is None:
            return DistributedError("a rank held a non-finite step's error, but no rank's "
                                    "running totals flag one (read and dropped by a callback?)")
        return NonFiniteError(f"{views[r]} (rank {r} of {here.size}'s view)")
    source = here.rank if here.rank in found else found[0]
    if kinds[source] == 2:
        return error if source == here.rank and error is not None else DistributedError(
            f"rank {source} of {here.size} stopped training: InputError: {views[source]}")
    others = [r for r in found if r != source]
    return NonFiniteError(
        f"{views[source]} (on rank {source} of {here.size}, in its slice of the global batch"
        + (f"; rank(s) {others} found one in theirs too" if others else "") + ")")


def agree(here: World, error: BaseException | None, what: str, tag: str | None = None
          ) -> None:
    """Raise, on every rank, where ``what`` (a part of fit, else ``tag`` names the call and the
    part, for :func:`host_sum`) failed on any (``error``:
    this rank's, raised again here; the others a :class:`DistributedError` naming the ranks
    that failed): a refusal on one rank alone (a path only rank 0 checks, a NaN in that node's
    copy of the data) otherwise left the others waiting in the next exchange until the
    timeout. One tagged host sum of a flag a rank."""
    failed = np.zeros(here.size)
    failed[here.rank] = error is not None
    got = host_sum(here, failed, f"fit ({what})" if tag is None else tag, tagged=True)
    if error is not None:
        raise error
    ranks = [r for r in range(here.size) if got[r]]
    if ranks:
        raise DistributedError(f"{what} failed on rank(s) {ranks}: their error says why")


@contextlib.contextmanager
def agreeing(what: str, tag: str) -> Iterator[None]:
    """Around checks that may refuse on one rank alone (its copy of the data): on several
    ranks, an :class:`Exception` inside is :func:`agree`'d, so that every rank fails at once;
    nothing in one process."""
    here = world()
    if here.size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # (raised again by agree, after the others learn of it)
        error = e
    agree(here, error, what, tag)


def any_rank(here: World, flag: bool, what: str) -> bool:
    """Whether ``flag`` is set on any of ``here``'s ranks: one tagged host sum (``what``
    names it, as for :func:`host_sum`); ``flag`` itself in one process."""
    if here.size == 1:
        return flag
    return host_sum(here, [float(flag)], what, tagged=True)[0] > 0


def agree_to_stop_evaluating(here: World, stop: bool, ended: bool, what: str
                             ) -> tuple[bool, bool]:
    """After each batch of an evaluation (``evaluate``, fit's validation) whose callbacks may
    set ``model.stop_evaluating`` (see :func:`any_rank`): whether it is set on any rank
    (``stop``: this rank's), and whether every rank's batches have ended (``ended``: this
    one's, which then agrees once for each batch that another rank still evaluates, an
    iterable's). A flag set on one rank alone (a callback deciding on that rank's own running
    means, as its test batch logs are) summed a prefix of that rank's batches with the
    others' whole passes, silently. One tagged host sum."""
    got = host_sum(here, [float(stop), float(ended)], what, tagged=True)
    return got[0] > 0, got[1] == here.size


def refuse_different_data(here: World, sources: Sequence[tuple[str, Any]], call: str = "fit",
                          class_weights: np.ndarray | None = None,
                          arguments: dict[str, Any] | None = None, model: Any = None) -> None:
    """Refuse, on every rank alike, data that differs between the ranks (each rank takes its
    slice of every batch of the same data: per-rank shards, a PyTorch habit, trained or
    evaluated half of it, silently, and data of other lengths gave the ranks other logs, whose
    callbacks could then decide otherwise and hang the job). ``sources``: (what, batch
    source), "training", "validation" or "evaluation" data of ``call``. One host allreduce of
    a checksum a source, of :meth:`xpcnn.data.Batches.same_data_mark` (arrays: their sizes
    and contents, the batch size, seed and shuffling; a dataset: its length and type, and the
    indices of a ``Subset``; an iterable, each rank's own, is not checked), and of fit's
    ``class_weights`` with the training data's (each rank weighed its slice of every batch
    with its own: the averaged gradient was a silent mix); and one a value of ``arguments``
    (fit's epochs, its callbacks...: where they differed, a rank waited for the others
    until the timeout, then blamed a stuck rank, or the ranks averaged the gradients of
    different epochs). With ``model`` (evaluate's), one a layer of a CRC-32 of its weights and
    state, read to the host (on CuPy, a copy of every weight from the device once a call): the
    ranks' sums of their slices' scores mixed the models of ranks that loaded other weights
    (rank 0 alone, the Horovod habit, which fit's broadcast serves but evaluate has not)."""
    arguments = arguments or {}
    layers = [] if model is None else list(model.layers)
    row: list[float] = []
    for what, data in sources:
        mark = data.same_data_mark()
        # (all ones weighs as None does)
        if what == "training" and class_weights is not None and np.any(class_weights != 1.0):
            mark = {"data": mark, "class_weight": [float(w) for w in class_weights]}
        row.append(-1.0 if mark is None else _crc(mark))
    row += [_crc(v) for v in arguments.values()]
    row += [_weights_crc(model.backend, la) for la in layers]

    def other_count(counts: list[tuple[int, ...]]) -> str:
        if len({c[2] for c in counts}) > 1:
            ranks = [r for r in range(here.size) if counts[r][2] != counts[0][2]]
            return (f"the model has another number of layers on rank(s) {ranks} than on rank "
                    f"0 ({', '.join(str(counts[r][2]) for r in ranks)} against "
                    f"{counts[0][2]}): every rank must build the same model")
        # (fit's sources are its training data and, on some ranks only here, its validation)
        more = [r for r in range(here.size) if counts[r][0] > min(c[0] for c in counts)]
        fewer = [r for r in range(here.size) if r not in more]
        if more:
            return (f"{call} on several ranks was given validation data on some ranks only "
                    f"(rank(s) {more}, not rank(s) {fewer}): every rank must pass the same "
                    "validation_data, or none")
        return (f"{call} on several ranks was given other arguments on some ranks: every rank "
                f"must call {call} with the same arguments and callbacks")

    sums = _rank_checksums(here, row, f"{call} (the data's checksums)",
                           [len(sources), len(arguments), len(layers)], other_count)
    for i, name in enumerate(arguments, len(sources)):
        ranks = _differing_ranks(sums, i)
        if ranks and name == SEED_ARGUMENT:
            raise DistributedError(
                f"{call} on several ranks shuffles with another seed on rank(s) {ranks} than "
                "on rank 0 (fit's seed, by default the model's: Sequential(seed=...)), so "
                "each rank would take its slices of other batches: give the model the same "
                "seed on every rank (not seed + rank: rank 0's initial weights go to every "
                "rank anyway), or pass the same fit(seed=...)")
        if ranks and name == FILES_ARGUMENT:
            raise DistributedError(
                f"{call} on several ranks was given other files to write on rank(s) {ranks} "
                "than on rank 0 (a BackupAndRestore's or fit(checkpoint=...)'s path, a "
                "ModelCheckpoint's filepath or a CSVLogger's filename): rank 0 alone writes "
                "them, and the others wait for its report of the same path; give every rank "
                "the same one, not a path of each rank's own (f'ckpt{rank}.npz')")
        if ranks:
            raise DistributedError(
                f"{call} on several ranks was given another {name} on rank(s) {ranks} than on "
                f"rank 0: every rank must call {call} with the same arguments and callbacks "
                "(not a callback on rank 0 alone)")
    for i, (what, _) in enumerate(sources):
        ranks = _differing_ranks(sums, i)
        if ranks:
            whole = "whole arrays (or dataset)" if what != "evaluation" else \
                "whole arrays (or dataset) to evaluate"
            raise DistributedError(
                f"{call} on several ranks was given other {what} data on rank(s) {ranks} than "
                "on rank 0 (other samples or sizes, or other sample weights" + (
                    ", class_weight" if what == "training" else "") +
                ", batch_size, seed or shuffle): "
                f"every rank passes the same {whole}, and each takes its own slice of every "
                "batch; do not split the data into per-rank shards")
    for i, la in enumerate(layers, len(sources) + len(arguments)):
        ranks = _differing_ranks(sums, i)
        if ranks:
            raise DistributedError(
                f"{call} on several ranks found other weights on rank(s) {ranks} than on rank "
                f"0, first in layer {la.name!r} ({type(la).__name__}): each rank scores its "
                "slice of every batch and the sums are added up, a mix of the models; load "
                "the weights on every rank (model.load_weights(path) on all, not on rank 0 "
                "alone), or call xpcnn.distributed.broadcast_weights(model) on every rank to "
                "give every rank rank 0's")


def _weights_crc(backend: Any, layer: Any) -> int:
    """CRC-32 of the bytes of ``layer``'s weights and state, in order (host copies)."""
    crc = 0
    for a in [*layer.params.values(), *layer.state.values()]:
        crc = zlib.crc32(np.ascontiguousarray(backend.to_numpy(a)).tobytes(), crc)
    return crc


def broadcast_weights(model: Any) -> None:
    """Give every rank rank 0's weights (parameters and state), as ``fit`` does as it starts:
    for weights loaded on rank 0 alone (the Horovod and DDP habit) before ``evaluate``, which
    refuses weights that differ between the ranks. A collective: call it on every rank, with
    the same built model (checked first, in a tagged exchange). Nothing in one process."""
    here = world()
    if here.size == 1:
        return
    # (weights loaded on rank 0 alone built its model alone: every rank fails at once, the
    # unbuilt named, where one left the others in the exchange below; review RE)
    with agreeing("broadcast_weights' check that the model is built",
                  "broadcast_weights (the model built)"):
        model._require_built("broadcast_weights")
    weights = _host_weights(model)
    host_sum(here, [0.0], "broadcast_weights", tagged=True, layout=[
        len(weights), sum(w.nbytes for w in weights)])
    comm = _comm(here, checks=True)  # (after the tag: paired)
    _take_root_weights(here, model, weights, comm, "broadcast_weights")


def _host_weights(model: Any) -> list[np.ndarray]:
    """``model``'s weights (parameters and state), as contiguous host arrays to broadcast."""
    return [np.ascontiguousarray(w) for w in model.get_weights()]


def _take_root_weights(here: World, model: Any, weights: list[np.ndarray], comm: Any,
                       what: str) -> None:
    """Broadcast rank 0's ``weights`` (this rank's host copies, overwritten) on ``comm`` and
    set them on every other rank's ``model``."""
    _wait(here, [comm.Ibcast(w, root=0) for w in weights], what)
    if not here.is_root:
        model.set_weights(weights)


def _rank_checksums(here: World, row: Sequence[float], what: str, layout: Sequence[int] = (),
                    other_layout: Callable[[list[tuple[int, ...]]], str] | None = None
                    ) -> np.ndarray:
    """Every rank's ``row`` of checksums, a (ranks, len(row)) float64 matrix: each rank puts
    its row in a matrix of zeros, and one tagged :func:`host_sum` (``what``, ``layout`` and
    ``other_layout`` as there) adds the matrices up."""
    sums = np.zeros((here.size, len(row)))
    sums[here.rank] = row
    return np.asarray(host_sum(here, sums.ravel(), what, tagged=True, layout=layout,
                               other_layout=other_layout)).reshape(sums.shape)


def _differing_ranks(sums: np.ndarray, i: int) -> list[int]:
    """The ranks whose checksum ``i`` (a column of :func:`_rank_checksums`) is not rank 0's."""
    return [r for r in range(sums.shape[0]) if sums[r, i] != sums[0, i]]


def _crc(value: Any) -> int:
    """CRC-32 of ``value`` as JSON (sorted keys; an object by its repr, without a memory
    address, which differs between the processes)."""
    def plain(o: Any) -> str:
        text = repr(o)
        return type(o).__qualname__ if " at 0x" in text else text

    return zlib.crc32(json.dumps(value, sort_keys=True, default=plain).encode())


def _compile_settings(model: Any) -> dict[str, Any]:
    """What ``compile`` set that every rank must share, by the name a refusal gives it."""
    optimizer = getattr(model, "optimizer", None)
    loss = getattr(model, "loss", None)
    return {
        "optimizer (class, settings, learning rate or step count)": None if optimizer is None
        else [type(optimizer).__name__, optimizer.get_config(), float(optimizer.lr),
              int(optimizer.iterations)],
        "loss": None if loss is None else [type(loss).__name__, loss.get_config()],
        "precision": getattr(model, "precision", None),
        "metrics": list(getattr(model, "metrics", ()) or ())}


#: The names of fit's shuffling seed and of its callbacks' files among :func:`fit_arguments`
#: (their refusals say more).
SEED_ARGUMENT, FILES_ARGUMENT = "seed", "files to write"


def fit_arguments(epochs: int, initial_epoch: int, steps_per_epoch: Any, validation_steps: Any,
                  validation_freq: Any, callbacks: Sequence[Any], seed: int = 0,
                  files: Sequence[str] = ()) -> dict[str, Any]:
    """fit's arguments that every rank must share beyond its data, by name, for
    :func:`refuse_different_data`: the ``callbacks`` (fit's own History and progress bar left out by
    the caller: rank 0 alone shows one) by class, and the save frequency of those that save;
    the shuffling ``seed`` (the model's where fit is given none: a per-rank model seed, a
    PyTorch habit, was blamed on the data, whose checksums include it); the ``files`` that its
    callbacks write, as given (a path of each rank's own, ``f"ckpt{rank}.npz"``: rank 0 wrote
    its own, and the others waited for its report of theirs until the timeout, after an epoch
    of training)."""
    return {SEED_ARGUMENT: seed, "epochs": epochs, "initial_epoch": initial_epoch,
            "steps_per_epoch": steps_per_epoch, "validation_steps": validation_steps,
            "validation_freq": sorted(validation_freq) if isinstance(
                validation_freq, frozenset) else validation_freq,  # (a set's order varies)
            "callbacks (their classes and save_freq)": [
                [type(cb).__name__, getattr(cb, "save_freq", None)] for cb in callbacks],
            FILES_ARGUMENT: list(files)}


_COMMUNICATORS: dict[tuple[int, str], Any] = {}


def _communicator(here: World, backend: Any) -> Any:
    """NCCL for CuPy ranks, MPI for NumPy ones; made once per world and device (an NCCL
    communicator takes a collective and some time to set up)."""
    key = (id(here), backend.label)
    if key not in _COMMUNICATORS:
        if backend.name == "cupy":
            _COMMUNICATORS[key] = NcclSum(here, backend.device)
        elif backend.name == "numpy":
            _COMMUNICATORS[key] = MpiSum(here)
        else:
            raise DeviceError(f"training on several ranks runs on NumPy (CPU, with MPI) or CuPy "
                              f"(CUDA, with NCCL), not on {backend.name}")
    return _COMMUNICATORS[key]


def _share_cores(here: World) -> None:
    """The ranks on one node share its cores: unless the user set a thread count, each rank's
    CPU kernels (NumPy's, and the OpenBLAS they run on, which every backend's host work uses)
    get cores / (ranks on the node) threads. Set as the world is made (:func:`init`)."""
    chosen = any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))
    if chosen:
        return
    from .backend import get_backend

    fast = fast_kernels(get_backend("cpu"))
    if fast is not None:
        fast.set_threads(max(1, (os.cpu_count() or 1) // here.local_size))


def data_parallel(model: Any) -> DataParallel | None:
    """The model's :class:`DataParallel` on this process's world; None in one process."""
    here = world()
    return None if here.size == 1 else DataParallel(model, here)


def is_root() -> bool:
    """True where this process should print and write files: rank 0, or a single process."""
    return world().is_root
