"""Downloads against a local HTTP server on 127.0.0.1: success, bad checksum, HTTP errors, cut
transfers. A failed download must leave neither the file nor a temporary file behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from datasets_helpers import (
    META,
    MNIST_STEMS,
    Route,
    cifar_pickle,
    gz,
    http_server,
    idx_bytes,
    md5,
    random_cifar,
    random_mnist,
    tar_gz,
    write_mnist,
)

from xpcnn.datasets import download as dl
from xpcnn.datasets import load_cifar10, load_dataset, load_fashion_mnist, load_mnist
from xpcnn.datasets.download import download_file
from xpcnn.errors import DownloadError, InputError

MNIST_NAMES = [stem + ".gz" for stem in MNIST_STEMS.values()]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    for var in ("DATA_DIR", "MNIST_URL", "FASHION_MNIST_URL", "CIFAR10_URL"):
        monkeypatch.delenv(f"XPCNN_{var}", raising=False)
    # Should anything fall back to the per-user cache, it lands in the test's folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _files(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- download_file ----------------------------------------------------------------------------


def test_download_success(tmp_path, rng):
    body = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    with http_server({"/f.bin": Route(body)}) as srv:
        out = download_file(srv.url + "f.bin", tmp_path / "sub" / "f.bin", md5(body))
    assert out == tmp_path / "sub" / "f.bin"
    assert out.read_bytes() == body
    assert _files(tmp_path / "sub") == ["f.bin"]


def test_download_without_checksum(tmp_path):
    with http_server({"/f.bin": Route(b"abc")}) as srv:
        download_file(srv.url + "f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == b"abc"


def test_checksum_mismatch_leaves_nothing(tmp_path):
    with (
        http_server({"/f.bin": Route(b"not what was published")}) as srv,
        pytest.raises(DownloadError, match="checksum mismatch") as e,
    ):
        download_file(srv.url + "f.bin", tmp_path / "f.bin", "0" * 32)
    assert "0" * 32 in str(e.value)
    assert _files(tmp_path) == []


def test_bad_download_keeps_existing_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"old")
    with (
        http_server({"/f.bin": Route(b"new")}) as srv,
        pytest.raises(DownloadError, match="checksum mismatch"),  # (not any failure)
    ):
        download_file(srv.url + "f.bin", tmp_path / "f.bin", md5(b"other"))
    assert (tmp_path / "f.bin").read_bytes() == b"old"
    assert _files(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("status", [404, 500])
def test_http_error(tmp_path, status):
    with (
        http_server({"/f.bin": Route(b"x", status=status)}) as srv,
        pytest.raises(DownloadError, match=f"HTTP {status}"),
    ):
        download_file(srv.url + "f.bin", tmp_path / "f.bin", md5(b"x"))
    assert _files(tmp_path) == []


@pytest.mark.parametrize("with_md5", [True, False])
def test_interrupted_transfer(tmp_path, rng, with_md5):
    body = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    with (
        http_server({"/f.bin": Route(body, cut_after=50_000)}) as srv,
        pytest.raises(DownloadError, match="cut short|closed early"),
    ):
        download_file(srv.url + "f.bin", tmp_path / "f.bin", md5(body) if with_md5 else None)
    assert _files(tmp_path) == []


def test_size_cap(tmp_path):
    with (
        http_server({"/f.bin": Route(b"x" * 5000)}) as srv,
        pytest.raises(DownloadError, match="limit"),
    ):
        download_file(srv.url + "f.bin", tmp_path / "f.bin", max_bytes=1000)
    assert _files(tmp_path) == []


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(DownloadError, match="failed"):
        download_file(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", timeout=5)
    assert _files(tmp_path) == []


def test_only_http(tmp_path):
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(DownloadError, match="only http and https"):
        download_file((tmp_path / "src").as_uri(), tmp_path / "f.bin")
    assert not (tmp_path / "f.bin").exists()


def test_interrupt_removes_temp_file(tmp_path, monkeypatch):
    def stream(url, out, *args):
        out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_stream", stream)
    with pytest.raises(KeyboardInterrupt):
        download_file("http://127.0.0.1:9/f.bin", tmp_path / "f.bin")
    assert _files(tmp_path) == []


# -- loaders that download --------------------------------------------------------------------


def _mnist_routes(arrays) -> tuple[dict[str, Route], dict[str, str]]:
    routes, sums = {}, {}
    for key, stem in MNIST_STEMS.items():
        body = gz(idx_bytes(arrays[key]))
        routes[f"/{stem}.gz"] = Route(body)
        sums[f"{stem}.gz"] = md5(body)
    return routes, sums


def _check(result, arrays):
    (x, y), (xt, yt) = result
    np.testing.assert_array_equal(x[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(y, arrays["train_labels"])
    np.testing.assert_array_equal(xt[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(yt, arrays["test_labels"])


def test_load_mnist_downloads(tmp_path, rng, monkeypatch):
    arrays = random_mnist(rng)
    routes, sums = _mnist_routes(arrays)
    monkeypatch.setitem(dl.MD5SUMS, "mnist", sums)
    with http_server(routes) as srv:
        _check(load_mnist(tmp_path, base_url=srv.url), arrays)
        assert sorted(srv.requests) == sorted(routes)
        assert _files(tmp_path / "mnist") == sorted(MNIST_NAMES)
        # Present now: the second load reads the files without asking the server.
        _check(load_mnist(tmp_path, base_url=srv.url), arrays)
        assert len(srv.requests) == 4


def test_download_goes_to_cache_by_default(tmp_path, rng, monkeypatch):
    arrays = random_mnist(rng)
    routes, sums = _mnist_routes(arrays)
    monkeypatch.setitem(dl.MD5SUMS, "fashion-mnist", sums)
    with http_server(routes) as srv:
        monkeypatch.setenv("XPCNN_FASHION_MNIST_URL", srv.url)
        _check(load_fashion_mnist(), arrays)
    assert _files(tmp_path / "xdg-cache" / "xpcnn" / "fashion-mnist") == sorted(MNIST_NAMES)


def test_only_missing_files_are_fetched(tmp_path, rng, monkeypatch):
    arrays = random_mnist(rng)
    routes, sums = _mnist_routes(arrays)
    monkeypatch.setitem(dl.MD5SUMS, "mnist", sums)
    paths = write_mnist(tmp_path / "mnist", arrays, gzipped=False)
    paths["test_images"].unlink()
    paths["test_labels"].unlink()
    with http_server(routes) as srv:
        _check(load_dataset("mnist", tmp_path, base_url=srv.url), arrays)
        assert sorted(srv.requests) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]


def test_a_file_missing_beside_the_others_is_fetched_there_alone(tmp_path, rng, monkeypatch):
    """Three of MNIST's files at the top level, the message naming the fourth there: that one
    is fetched, into the top level (was: all four into mnist/, the three present ignored)."""
    arrays = random_mnist(rng)
    routes, sums = _mnist_routes(arrays)
    monkeypatch.setitem(dl.MD5SUMS, "mnist", sums)
    paths = write_mnist(tmp_path, arrays)
    paths["test_labels"].unlink()
    with http_server(routes) as srv:
        _check(load_mnist(tmp_path, base_url=srv.url), arrays)
        assert srv.requests == ["/t10k-labels-idx1-ubyte.gz"]
    assert not (tmp_path / "mnist").exists()


def test_loader_checksum_mismatch(tmp_path, rng):
    # The official MD5s cannot match our fake files: nothing may be kept.
    routes, _ = _mnist_routes(random_mnist(rng))
    with http_server(routes) as srv, pytest.raises(DownloadError, match="checksum mismatch") as e:
        load_mnist(tmp_path, base_url=srv.url)
    assert f"Put these files in {tmp_path}:" in str(e.value)
    assert not (tmp_path / "mnist").exists()  # the folder made for the download is gone again


def test_loader_server_error_message(tmp_path):
    with http_server({}) as srv, pytest.raises(DownloadError) as e:
        load_mnist(tmp_path, base_url=srv.url)
    msg = str(e.value)
    assert "HTTP 404" in msg and f"Put these files in {tmp_path}:" in msg
    assert all(name in msg for name in MNIST_NAMES)
    assert "XPCNN_DATA_DIR" in msg and "data_dir" in msg
    assert not (tmp_path / "mnist").exists()


def test_load_cifar10_downloads(tmp_path, rng, monkeypatch):
    (x, y), (xt, yt) = random_cifar(rng, 6), random_cifar(rng, 3)
    body = tar_gz(
        {
            "cifar-10-batches-py/data_batch_1": cifar_pickle(x, y),
            "cifar-10-batches-py/test_batch": cifar_pickle(xt, yt),
            "cifar-10-batches-py/batches.meta": META,
        }
    )
    monkeypatch.setitem(dl.MD5SUMS, "cifar10", {"cifar-10-python.tar.gz": md5(body)})
    with http_server({"/cifar-10-python.tar.gz": Route(body)}) as srv:
        monkeypatch.setenv("XPCNN_CIFAR10_URL", srv.url.rstrip("/"))  # a missing slash is fine
        (xi, yi), (xti, yti) = load_cifar10(tmp_path)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yti, yt)
    assert _files(tmp_path) == ["cifar-10-python.tar.gz"]


def test_cifar_interrupted_download(tmp_path):
    body = b"\x1f\x8b" + b"z" * 100_000
    with (
        http_server({"/cifar-10-python.tar.gz": Route(body, cut_after=1000)}) as srv,
        pytest.raises(DownloadError, match="cut short|closed early") as e,
    ):
        load_cifar10(tmp_path, base_url=srv.url)
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert _files(tmp_path) == []


# -- offline ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "sub"), [(load_mnist, "mnist"), (load_fashion_mnist, "fashion-mnist")]
)
def test_offline_message_idx(tmp_path, loader, sub):
    with pytest.raises(DownloadError) as e:
        loader(tmp_path, download=False)
    msg = str(e.value)
    assert f"Put these files in {tmp_path}:" in msg  # the top level works: no subfolder needed
    assert all(name in msg for name in MNIST_NAMES)
    assert "XPCNN_DATA_DIR" in msg and "data_dir" in msg and "download=True" in msg
    assert not (tmp_path / sub).exists()


def test_offline_message_cifar(tmp_path, monkeypatch):
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path))
    with pytest.raises(DownloadError) as e:
        load_dataset("cifar10", download=False)
    msg = str(e.value)
    assert f"Put this file in {tmp_path}: cifar-10-python.tar.gz" in msg
    assert "cifar-10-batches-py" in msg and "XPCNN_DATA_DIR" in msg
    assert "https://www.cs.toronto.edu/~kriz/" in msg


def test_a_missing_file_is_named_where_the_others_are(tmp_path, rng):
    """Three of MNIST's files at the top level (where they work): the message names the fourth
    and the top-level folder, not a subfolder."""
    paths = write_mnist(tmp_path, random_mnist(rng))
    paths["test_labels"].unlink()
    with pytest.raises(DownloadError) as e:
        load_mnist(tmp_path, download=False)
    msg = str(e.value)
    assert f"not complete in {tmp_path}: missing t10k-labels-idx1-ubyte.gz." in msg
    assert f"Put this file in {tmp_path}: t10k-labels-idx1-ubyte.gz" in msg
    assert "train-images" not in msg and str(tmp_path / "mnist") not in msg


@pytest.mark.parametrize("how", ["argument", "environment"])
@pytest.mark.parametrize("loader", [load_mnist, load_cifar10])
def test_a_mistyped_data_folder_is_neither_created_nor_downloaded_into(tmp_path, monkeypatch,
                                                                       how, loader):
    typo = tmp_path / "dtaa"
    with http_server({}) as srv:
        if how == "environment":
            monkeypatch.setenv("XPCNN_DATA_DIR", str(typo))
        with pytest.raises(InputError, match=f"the data folder {typo} .* does not exist"):
            loader(typo if how == "argument" else None, base_url=srv.url)
        assert srv.requests == []
    assert not typo.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is not a folder"):
        loader(tmp_path / "file", download=False)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_download_is_created_as_the_umask_says(tmp_path, rng, umask):
    import stat

    body = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    old = os.umask(umask)
    try:
        with http_server({"/f.bin": Route(body)}) as srv:
            download_file(srv.url + "f.bin", tmp_path / "f.bin", md5(body))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o666 & ~umask
