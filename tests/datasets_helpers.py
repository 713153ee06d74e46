"""Writers for small dataset files in the exact upstream formats, and a local HTTP server.

Used by test_datasets.py and test_download.py; nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MNIST_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# -- IDX --------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """An uncompressed IDX file of uint8 ``arr`` (1-D labels or 3-D images)."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def idx_header(kind: str, *dims: int) -> bytes:
    """Just a header, for files whose header lies about the payload."""
    return bytes([0, 0, 0x08, 3 if kind == "images" else 1]) + struct.pack(f">{len(dims)}I", *dims)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def random_mnist(rng: np.random.Generator, n_train: int = 30, n_test: int = 12) -> dict:
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: dict, *, gzipped: bool = True, dotted: bool = False) -> dict:
    """Write the four IDX files into ``folder``; returns key -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, stem in MNIST_STEMS.items():
        name = stem.replace("-idx", ".idx", 1) if dotted else stem
        data = idx_bytes(arrays[key])
        if gzipped:
            name, data = name + ".gz", gz(data)
        path = folder / name
        path.write_bytes(data)
        paths[key] = path
    return paths


# -- CIFAR ------------------------------------------------------------------------------------


def random_cifar(rng: np.random.Generator, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """HWC uint8 images and int64 labels."""
    return (
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n).astype(np.int64),
    )


def rows(images_hwc: np.ndarray) -> np.ndarray:
    """The CIFAR file layout: per image, R plane, G plane, B plane, each row-major."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def cifar_pickle(
    images_hwc: np.ndarray,
    labels: np.ndarray,
    *,
    str_keys: bool = False,
    data: object = None,
    label_list: object = None,
) -> bytes:
    """A batch as Python 3 writes it at protocol 2 (numpy array data, list labels).

    ``data`` / ``label_list`` replace the respective entries, to write malformed batches.
    """
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    batch = {
        k("batch_label"): k("training batch 1 of 5"),
        k("labels"): [int(v) for v in labels] if label_list is None else label_list,
        k("data"): rows(images_hwc) if data is None else data,
        k("filenames"): [k(f"img_{i}.png") for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def py2_style_pickle(images_hwc: np.ndarray, labels: np.ndarray) -> bytes:
    """A batch byte for byte in the style of the official files, which Python 2 wrote.

    Keys and pixel data are Python-2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes) and the array
    comes from ``numpy.core.multiarray._reconstruct``; Python 3 cannot write this itself.
    """

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    data = rows(images_hwc)
    out = [b"\x80\x02}(", s(b"batch_label"), s(b"training batch 1 of 5"), s(b"labels"), b"]("]
    out += [i(int(v)) for v in labels]
    out += [b"e", s(b"data")]
    out += [b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n", i(0), b"\x85", s(b"b")]
    out += [b"\x87R(", i(1), i(data.shape[0]), b"J" + struct.pack("<i", data.shape[1]), b"\x86"]
    out += [b"cnumpy\ndtype\n", s(b"u1"), i(0), i(1), b"\x87R("]
    out += [i(3), s(b"|"), b"NNN", i(-1), i(-1), i(0), b"tb", b"\x89", s(data.tobytes()), b"tb"]
    out += [b"u."]
    return b"".join(out)


def tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """A gzipped tar of regular files (and optional symlinks name -> target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        dirs = sorted({m.split("/")[0] for m in members if "/" in m and not m.startswith("/")})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


META = pickle.dumps(
    {b"label_names": [b"airplane"], b"num_cases_per_batch": 10000, b"num_vis": 3072}, protocol=2
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- HTTP -------------------------------------------------------------------------------------


@dataclass
class Route:
    """What the server answers for one path."""

    body: bytes = b""
    status: int = 200
    # Announce the full length but send only this many bytes, then drop the connection.
    cut_after: int | None = None


@dataclass
class Server:
    url: str
    routes: dict[str, Route]
    requests: list[str] = field(default_factory=list)


@contextmanager
def http_server(routes: dict[str, Route]) -> Iterator[Server]:
    """Serve ``routes`` (path -> Route) on 127.0.0.1 at a free port, in a thread."""
    state = Server(url="", routes=routes)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            state.requests.append(self.path)
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            if route.status != 200:
                self.send_error(route.status)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            body = route.body if route.cut_after is None else route.body[: route.cut_after]
            self.wfile.write(body)
            if route.cut_after is not None:
                self.wfile.flush()
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass  # keep test output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # A short poll interval: shutdown() waits up to one interval, which adds up over tests.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def small_shapes(monkeypatch: Any, n_train: int, n_test: int = 20) -> None:
    """``load_dataset`` gives the shapes dataset at these sizes (for the CLI's tests of its logs,
    files and messages, which do not depend on the data's size: generating the default sizes and
    evaluating on their test set cost most of a short run)."""
    import xpcnn.datasets

    real = xpcnn.datasets.load_dataset

    def load(name, data_dir=None, download=True, **kw):
        return real(name, data_dir, download, **{"n_train": n_train, "n_test": n_test, **kw})

    monkeypatch.setattr(xpcnn.datasets, "load_dataset", load)

