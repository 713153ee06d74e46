"""Property tests: every file loader meets random, truncated and mutated bytes.

Whatever the bytes, a loader either returns or raises one of xpcnn's own errors (a subclass of
``XpcnnError``): never another exception, never a hang (a hard timer, and hypothesis' deadline),
never an allocation sized by a lying header (tracemalloc's peak around each example stays under a
small bound). Loaders: the IDX parser (bytes and gzipped files), the CIFAR pickle parser, model
files (``xpcnn.load_model``), checkpoints (``load_checkpoint``) and weights (``load_weights``).

Run ``pytest tests/test_fuzz_files.py --hypothesis-show-statistics`` to see how many cases each
property ran.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import pickle
import signal
import struct
import tracemalloc
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xpcnn
from xpcnn.datasets.cifar import parse_batch
from xpcnn.datasets.idx import read_idx_file
from xpcnn.errors import DataFormatError, XpcnnError
from xpcnn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    RandomFlip,
    ReLU,
    Rescaling,
    Softmax,
)
from xpcnn.saving.checkpoint import load_checkpoint, save_checkpoint
from xpcnn.saving.npz import NpzArchive

#: Memory any one load may take beyond what its input could justify.
PEAK_LIMIT = 32 * 2**20
HARD_TIMEOUT_S = 10.0
FUZZ = settings(max_examples=500, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    """Raised by the hard timer: a loader that runs this long is taken to hang."""


def _alarm(signum, frame):
    raise Hang(f"a loader ran for more than {HARD_TIMEOUT_S} s")


def run_loader(load: Callable[[bytes], object], data: bytes) -> None:
    """Run ``load(data)``: it returns or raises XpcnnError, within time and memory bounds."""
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, HARD_TIMEOUT_S)
    try:
        load(data)
    except XpcnnError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    limit = PEAK_LIMIT + 64 * len(data)
    assert peak < limit, f"a {len(data)}-byte input made the loader allocate {peak} bytes"


# -- valid seeds to mutate -----------------------------------------------------------------------


def idx_file(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    if kind == "images":
        return struct.pack(">IIII", 0x803, 3, 4, 5) + rng.integers(0, 256, 60, np.uint8).tobytes()
    return struct.pack(">II", 0x801, 6) + bytes([0, 1, 2, 9, 3, 4])


def cifar_batch() -> bytes:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (2, 3072), np.uint8)
    return pickle.dumps({b"batch_label": b"testing", b"labels": [3, 7], b"data": data,
                         b"filenames": [b"a.png", b"b.png"]}, protocol=2)


def tiny_model() -> xpcnn.Sequential:
    model = xpcnn.Sequential([RandomFlip(), Rescaling(1 / 255), Conv2D(2, 3), BatchNorm2D(),
                              ReLU(), Dropout(0.2), Flatten(), Dense(3), Softmax()], seed=0)
    model.compile(optimizer=xpcnn.optim.Adam(xpcnn.optim.CosineDecay(1e-2, 10)))
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (4, 5, 5, 1), np.uint8), np.array([0, 1, 2, 0]),
              batch_size=4, verbose=0)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = tiny_model()
    model.save(str(folder / "model.npz"))
    save_checkpoint(model, folder / "ckpt.npz")
    return Seeds(model=(folder / "model.npz").read_bytes(),
                 ckpt=(folder / "ckpt.npz").read_bytes(), dir=folder)


class Seeds(dict):
    """The valid files to mutate (a short repr keeps hypothesis' reports readable)."""

    def __repr__(self) -> str:
        return "<seed files>"


# -- mutations -----------------------------------------------------------------------------------


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` with a few bytes overwritten, flipped, inserted or deleted, or cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def bytes_from(seed: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations and mutations of ``seed``, and seed-prefixed noise."""
    return st.one_of(
        st.binary(max_size=512),
        st.integers(0, len(seed)).map(lambda k: seed[:k]),
        mutated(seed),
        st.binary(max_size=64).map(lambda tail: seed[:16] + tail),
    )


def npz_members(data: bytes) -> dict[str, bytes]:
    """The members of the zip ``data``, by name (a new dict at each call, the seeds' unzipped
    once: the strategies below unzip a seed at every example)."""
    return dict(_unzipped(data))


@functools.lru_cache(maxsize=8)
def _unzipped(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def pack(members: dict[str, bytes]) -> bytes:
    """A valid zip (right CRCs) around possibly hostile members."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return out.getvalue()


@st.composite
def inner_mutations(draw, seed: bytes) -> bytes:
    """A valid zip whose JSON configuration or one array (header or data) is mutated: past the
    zip layer's checksums, into the configuration and array parsers."""
    members = npz_members(seed)
    name = draw(st.sampled_from(sorted(members)))
    blob = members[name]
    if name == "__config__.npy" and draw(st.booleans()):
        # Mutate the JSON text, then store it as a valid uint8 array.
        text = bytes(np.load(io.BytesIO(blob)))
        buf = io.BytesIO()
        np.save(buf, np.frombuffer(draw(mutated(text)), np.uint8))
        blob = buf.getvalue()
    else:
        blob = draw(mutated(blob))
    members[name] = blob
    return pack(members)


@st.composite
def config_edits(draw, seed: bytes) -> bytes:
    """A valid file whose configuration has one value replaced by an arbitrary JSON value."""
    members = npz_members(seed)
    config = json.loads(bytes(np.load(io.BytesIO(members["__config__.npy"]))))
    paths = list(_leaves(config))
    path = draw(st.sampled_from(paths))
    value = draw(st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                           st.floats(allow_nan=True), st.text(max_size=5),
                           st.lists(st.integers(-5, 10**6), max_size=4),
                           st.just({}), st.just([[[[]]]])))
    target = config
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(config).encode(), np.uint8))
    members["__config__.npy"] = buf.getvalue()
    return pack(members)


def _leaves(obj, prefix=()):
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        yield prefix
        return
    if isinstance(obj, dict) or obj:  # (a new key; a list's first item, where it has one)
        yield prefix + ("__new__",) if isinstance(obj, dict) else prefix + (0,)
    for k, v in items:
        yield from _leaves(v, (*prefix, k))


# -- the loaders -----------------------------------------------------------------------------------


def via_file(folder, load):
    def run(data: bytes) -> None:
        path = folder / "input.bin"
        # (a new file each time: rewriting one in place, truncated, made ext4 flush it to the
        # disk at every close, 1-3 ms an example, most of an IDX example's time)
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        load(str(path))
    return run


def load_weights_into_tiny(path: str) -> None:
    model = xpcnn.Sequential([RandomFlip(), Rescaling(1 / 255), Conv2D(2, 3), BatchNorm2D(),
                              ReLU(), Dropout(0.2), Flatten(), Dense(3), Softmax()])
    model.load_weights(path)


# -- properties ----------------------------------------------------------------------------------


def idx_reader(kind: str) -> Callable[[object], Callable[[bytes], None]]:
    """For a folder, a loader that writes its bytes there and reads them as an IDX ``kind``."""
    return lambda folder: via_file(folder, lambda p: read_idx_file(p, kind=kind))


@settings(FUZZ, max_examples=500)
@given(data=bytes_from(idx_file("images")), kind=st.sampled_from(["images", "labels"]))
def test_read_idx_file_images(files, data, kind):
    run_loader(idx_reader(kind)(files["dir"]), data)


@settings(FUZZ, max_examples=500)
@given(data=bytes_from(idx_file("labels")))
def test_read_idx_file_labels(files, data):
    run_loader(idx_reader("labels")(files["dir"]), data)


@settings(FUZZ, max_examples=300)
@given(data=st.one_of(bytes_from(idx_file("images")),
                      bytes_from(gzip.compress(idx_file("images"), mtime=0))))
def test_read_idx_file_gzipped_or_raw(files, data):
    run_loader(via_file(files["dir"], lambda p: read_idx_file(p, kind="images")), data)


@settings(FUZZ, max_examples=600)
@given(data=bytes_from(cifar_batch()))
def test_parse_cifar_batch(data):
    run_loader(parse_batch, data)


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_load_model(files, data):
    seed = files["model"]
    blob = data.draw(st.one_of(bytes_from(seed), inner_mutations(seed), config_edits(seed)))
    run_loader(via_file(files["dir"], xpcnn.load_model), blob)


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_load_checkpoint(files, data):
    seed = files["ckpt"]
    blob = data.draw(st.one_of(bytes_from(seed), inner_mutations(seed), config_edits(seed)))
    run_loader(via_file(files["dir"], load_checkpoint), blob)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_load_weights(files, data):
    seed = data.draw(st.sampled_from([files["model"], files["ckpt"]]))
    blob = data.draw(st.one_of(bytes_from(seed), inner_mutations(seed), config_edits(seed)))
    run_loader(via_file(files["dir"], load_weights_into_tiny), blob)


# -- lying headers, one by one ---------------------------------------------------------------------


def npy(header: dict, payload: bytes) -> bytes:
    text = repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


LIES = {
    "idx images claim 2**31 bytes": (idx_reader("images"),
                                     struct.pack(">IIII", 0x803, 2**31 // 784, 28, 28) + b"x"),
    "idx labels claim 4e9 items": (idx_reader("labels"),
                                   struct.pack(">II", 0x801, 2**32 - 1) + b"\x01" * 8),
    "npy claims 10**10 floats": (None, npy({"descr": "<f8", "fortran_order": False,
                                            "shape": (10**10,)}, b"\x00" * 8)),
    "npy claims 2*10**7 floats (would fit in memory)": (
        None, npy({"descr": "<f8", "fortran_order": False, "shape": (2 * 10**7,)}, b"\x00" * 8)),
    "npy claims a negative size": (None, npy({"descr": "<f4", "fortran_order": False,
                                              "shape": (-4, 2)}, b"\x00" * 8)),
    "npy holds objects": (None, npy({"descr": "|O", "fortran_order": False, "shape": (1,)},
                                    b"\x00" * 8)),
}


@pytest.mark.parametrize("name", sorted(LIES))
def test_a_lying_header_allocates_nothing_big(files, name):
    reader, data = LIES[name]
    if reader is None:  # an array inside an otherwise valid model file
        members = npz_members(files["model"])
        members["layer2.0.npy"] = data
        data, load = pack(members), via_file(files["dir"], xpcnn.load_model)
    else:
        load = reader(files["dir"])
    with pytest.raises(DataFormatError):
        load(data)
    run_loader(load, data)


def _config_lie(files, edit, name="model") -> bytes:
    members = npz_members(files[name])
    config = json.loads(bytes(np.load(io.BytesIO(members["__config__.npy"]))))
    edit(config)
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(config).encode(), np.uint8))
    members["__config__.npy"] = buf.getvalue()
    return pack(members)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["layers"][7]["config"].update(units=10**9), "needs 19000000000 weight values"),
    (lambda c: c["layers"][2]["config"].update(filters=10**6), "needs 10000000 weight values"),
    (lambda c: c.update(input_shape=[10**5, 10**5, 3]), "more than 2147483648 values"),
    (lambda c: c["layers"][2]["config"].update(padding=10**6), "more than 2147483648 values"),
    (lambda c: c["layers"][2]["config"].update(kernel_size=[10**6, 10**6]),
     "needs 2000000000002 weight values"),
])
def test_a_configuration_that_lies_about_sizes_is_refused_before_building(files, edit, message):
    data = _config_lie(files, edit)
    load = via_file(files["dir"], xpcnn.load_model)
    with pytest.raises(DataFormatError, match=message):
        load(data)
    run_loader(load, data)


def _set(path, value):
    def edit(config):
        for k in path[:-1]:
            config = config[k]
        config[path[-1]] = value
    return edit


def _sparse_true(config):  # (True == 1: {True} <= {0, 1} passed)
    config["history"] = {"epoch": [0, 1], "history": {"loss": [1.0, 0.9], "val_loss": [1.2]},
                         "sparse": {"val_loss": [True]}}


LOOSE_FIELDS = [  # (file, loader, edit, message): each loaded before, converted or as if right
    ("model", "model", _set(["seed"], 1.5), r"seed is 1\.5, expected an int >= 0"),
    ("model", "weights", _set(["seed"], True), r"seed is True, expected an int >= 0"),
    ("model", "model", _set(["seed"], "3"), r"seed is '3', expected an int >= 0"),
    ("model", "model", _set(["name"], 5), r"name is 5, expected a string"),
    ("model", "model", _set(["name"], None), r"name is None, expected a string"),
    ("model", "weights", _set(["version"], 1.0), r"model format version 1\.0 is not supported"),
    ("model", "model", _set(["version"], True), r"model format version True is not supported"),
    ("model", "model", _set(["layers", 2, "trainable"], 0),
     r"layer 2's trainable is 0, expected true or false"),
    ("model", "weights", _set(["layers", 7, "trainable"], "no"),
     r"layer 7's trainable is 'no', expected true or false"),
    ("model", "model", _set(["compile", "metrics"], "accuracy"),
     r"compile metrics is 'accuracy', expected a list of names"),
    ("model", "model", _set(["layers"], {"0": {}}), r"layers is a dict, expected a list"),
    ("model", "weights", _set(["layers", 3, "config"], ["batchnorm2d"]),
     r"layer 3 is not a dict of its 'class' \(a name\) and 'config' \(a dict\)"),
    ("ckpt", "checkpoint", _set(["version"], 2.0), r"checkpoint version 2\.0 is not supported"),
    ("ckpt", "model", _set(["version"], 99), r"checkpoint version 99 is not supported"),
    ("ckpt", "weights", _set(["version"], "2"), r"checkpoint version '2' is not supported"),
    ("ckpt", "checkpoint", _set(["model", "seed"], 2.0), r"seed is 2\.0, expected an int"),
    ("ckpt", "checkpoint", _set(["optimizer", "slots", "m"], 6.0),
     r"optimizer slots 'm' is 6\.0, expected 6, one for each trainable parameter"),
    ("ckpt", "checkpoint", _set(["history", "epoch"], [-1]),
     r"bad history entry: epoch is \[-1\], expected epoch numbers, ints >= 0"),
    ("ckpt", "checkpoint", _sparse_true,
     r"bad history entry: the epochs of 'val_loss' is \[True\], expected epoch numbers"),
]


@pytest.mark.parametrize("name, loader, edit, message", LOOSE_FIELDS)
def test_a_field_of_the_wrong_type_or_range_is_refused_by_name(files, name, loader, edit,
                                                               message):
    """A field that only loosely has its type is refused as strictly as the others, naming it,
    its value and what was expected (was: a seed of 1.5 loaded as 1, a name of 5 as '5', a
    trainable of "no" as true, version 1.0 or true as 1, a checkpoint's slot count 6.0 as 6,
    negative or boolean epoch numbers, any version of a checkpoint read by load_model; a
    layers entry of another shape was a bare TypeError's message)."""
    load = via_file(files["dir"], {"model": xpcnn.load_model, "checkpoint": load_checkpoint,
                                   "weights": load_weights_into_tiny}[loader])
    with pytest.raises(DataFormatError, match=message):
        load(_config_lie(files, edit, name))


def test_a_zip_entry_claiming_a_huge_size_is_refused(files):
    data = bytearray(files["model"])
    # Patch the uncompressed size of every central-directory entry to 2**31.
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        data[pos + 24:pos + 28] = struct.pack("<I", 2**31)
        pos = data.find(b"PK\x01\x02", pos + 4)
    load = via_file(files["dir"], xpcnn.load_model)
    with pytest.raises(DataFormatError, match="claims 2147483648 bytes"):
        load(bytes(data))
    run_loader(load, bytes(data))


class _Marker:
    """Unpickling this would create a file: the proof that a loader ran code."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_from_outside_never_run_code(files, tmp_path):
    _Marker.path = str(tmp_path / "ran")
    evil = pickle.dumps(_Marker(), protocol=2)
    # A model file whose weight is a pickled object array ...
    members = npz_members(files["model"])
    buf = io.BytesIO()
    np.save(buf, np.array([_Marker()], dtype=object), allow_pickle=True)
    members["layer2.0.npy"] = buf.getvalue()
    model_file = tmp_path / "evil.npz"
    model_file.write_bytes(pack(members))
    checkpoint_file = tmp_path / "evil-ckpt.npz"
    ck = npz_members(files["ckpt"])
    ck["slot.m.0.npy"] = buf.getvalue()
    checkpoint_file.write_bytes(pack(ck))
    for load in (xpcnn.load_model, load_checkpoint, load_weights_into_tiny):
        with pytest.raises(DataFormatError):
            load(str(model_file))
    with pytest.raises(DataFormatError):
        load_checkpoint(str(checkpoint_file))
    # Loading only the model or its weights never reads (inflates) the optimiser's slots.
    xpcnn.load_model(str(checkpoint_file))
    load_weights_into_tiny(str(checkpoint_file))
    # ... and a CIFAR batch that is such a pickle.
    with pytest.raises(DataFormatError, match="refused"):
        parse_batch(evil)
    # A bare pickle or .npy file given as a model file.
    for blob in (evil, buf.getvalue()):
        model_file.write_bytes(blob)
        with pytest.raises(DataFormatError):
            xpcnn.load_model(str(model_file))
    assert not (tmp_path / "ran").exists()


def test_seeds_are_valid(files):
    """The unmutated seeds load, so the mutations start from files that really are valid."""
    (files["dir"] / "seed-idx3-ubyte").write_bytes(idx_file("images"))
    assert read_idx_file(files["dir"] / "seed-idx3-ubyte", kind="images").shape == (3, 4, 5)
    assert parse_batch(cifar_batch())[0].shape == (2, 32, 32, 3)
    for name in ("model", "ckpt"):
        path = files["dir"] / f"{name}.npz"
        with NpzArchive(path) as npz:
            assert set(npz.entries) >= {"__config__", "layer2.0"}
        xpcnn.load_model(str(path))
        load_weights_into_tiny(str(path))
    assert load_checkpoint(files["dir"] / "ckpt.npz").model.optimizer.iterations == 1
