"""Where dataset files live, and fetching them safely when they are missing.

The data folder is, in order: the ``data_dir`` argument, the ``XPCNN_DATA_DIR`` environment
variable, or a per-user cache folder (``$XDG_CACHE_HOME/xpcnn``, else ``~/.cache/xpcnn``).

Downloads are checked against published MD5 sums while they stream and are written atomically: the
bytes go to a temporary file in the destination folder, which is fsynced and renamed over the final
name only once the length and checksum are right. An interrupted or bad download therefore never
leaves a file that a later run would take for good.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DownloadError, InputError
from ..files import atomic_file

log = logging.getLogger(__name__)

DATA_DIR_ENV = "XPCNN_DATA_DIR"

#: Where each dataset is fetched from. Tests and mirrors can change these, pass ``base_url=`` to a
#: loader, or set the environment variable named in ``URL_ENV_VARS``.
BASE_URLS: dict[str, str] = {
    # The mirror torchvision uses: yann.lecun.com itself now refuses most automated downloads.
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

URL_ENV_VARS: dict[str, str] = {
    "mnist": "XPCNN_MNIST_URL",
    "fashion-mnist": "XPCNN_FASHION_MNIST_URL",
    "cifar10": "XPCNN_CIFAR10_URL",
}

#: MD5 sums of the files as served, as torchvision and the dataset authors publish them.
MD5SUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    },
}

_CHUNK = 1 << 20
# Far above the largest file fetched here (CIFAR-10, 163 MiB): a server that keeps sending is
# cut off rather than allowed to fill the disk.
DEFAULT_MAX_BYTES = 512 << 20


@dataclass(frozen=True)
class Spelling:
    """How the loaders' messages name the data folder option to the one who gives it:
    ``name`` where they say which setting named a folder, ``usage`` where they say how to
    give another."""

    name: str
    usage: str


#: A Python caller's: the loaders' ``data_dir`` argument.
PYTHON_SPELLING = Spelling("data_dir", "data_dir=...")
_SPELLING = contextvars.ContextVar("xpcnn_data_dir_spelling", default=PYTHON_SPELLING)


@contextlib.contextmanager
def data_dir_spelled(spelling: Spelling) -> Iterator[None]:
    """Within it, the loaders' messages name the data folder option as ``spelling`` (the
    command line's ``--data-dir``, which its user gives rather than ``data_dir=``)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def default_data_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/xpcnn``, else ``~/.cache/xpcnn``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "xpcnn"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder to read datasets from: ``data_dir``, else ``$XPCNN_DATA_DIR``, else the cache."""
    if data_dir is not None:
        if not isinstance(data_dir, str | os.PathLike) or not os.fspath(data_dir):
            raise InputError(f"data_dir must be a folder path (a str or a pathlib.Path) or None, "
                             f"got {data_dir!r}")
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return default_data_dir()


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """:func:`resolve_data_dir`, checked: a folder named by ``data_dir`` or ``$XPCNN_DATA_DIR``
    must exist (a mistyped path is reported, never created and downloaded into); only the
    default cache is created when a download needs it."""
    root = resolve_data_dir(data_dir)
    if root != default_data_dir() and not root.is_dir():
        named = _SPELLING.get().name if data_dir is not None else f"${DATA_DIR_ENV}"
        what = "is not a folder" if root.exists() else "does not exist"
        raise InputError(f"the data folder {root} ({named}) {what}: check the path (xpcnn "
                         "creates only its default cache folder; create the folder yourself to "
                         "download into it)")
    return root


def base_url_for(dataset: str, base_url: str | None = None) -> str:
    """The URL folder for ``dataset``: ``base_url``, else its environment variable, else default."""
    if base_url is not None and not isinstance(base_url, str):
        raise InputError(f"base_url must be a URL (a str) or None, got {base_url!r}")
    url = base_url or os.environ.get(URL_ENV_VARS[dataset], "") or BASE_URLS[dataset]
    return url if url.endswith("/") else url + "/"


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str | None = None,
    *,
    timeout: float = 60.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Fetch ``url`` to ``dest`` atomically, checking the MD5 (when given) while streaming.

    Raises ``DownloadError`` for any failure (network, HTTP status, short transfer, checksum);
    then neither ``dest`` nor a temporary file is left behind. An existing ``dest`` is replaced
    only by a complete, verified download.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"refusing to download {url!r}: only http and https URLs are allowed")
    try:
        with contextlib.ExitStack() as stack:
            try:
                out = stack.enter_context(atomic_file(dest, suffix=".part"))
            except OSError as e:
                raise DownloadError(f"cannot write to {dest.parent}: {e}") from e
            # Whatever happens (including Ctrl-C), atomic_file leaves no partial file behind.
            _stream(url, out, md5, timeout, max_bytes)
    except Exception as e:
        if isinstance(e, DownloadError):
            raise
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
        if isinstance(e, (OSError, http.client.HTTPException, ValueError)):
            raise DownloadError(f"downloading {url} failed: {_describe(e)}") from e
        raise
    return dest


def _stream(url: str, out: BinaryIO, md5: str | None, timeout: float, max_bytes: int) -> None:
    """Copy the body of ``url`` to ``out``, checking length, size cap and checksum."""
    digest = hashlib.md5(usedforsecurity=False)
    req = urllib.request.Request(url, headers={"User-Agent": "xpcnn"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise DownloadError(f"{url} is {expected} bytes, more than the limit of {max_bytes}")
        received = 0
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise DownloadError(f"{url} sent more than the limit of {max_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
    if expected is not None and received != expected:
        raise DownloadError(
            f"downloading {url} was cut short: got {received} of {expected} bytes"
        )
    if md5 is not None and digest.hexdigest() != md5.lower():
        raise DownloadError(
            f"checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected {md5.lower()} "
            "(a corrupt transfer, or a changed file on the server)"
        )


def _describe(e: BaseException) -> str:
    """A short reason for a network error; URLError hides the useful part in ``reason``."""
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed early after {len(e.partial)} bytes"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def fetch(dataset: str, names: Iterable[str], folder: Path, base_url: str | None = None) -> None:
    """Download the named files of ``dataset`` into ``folder``, verifying each published MD5.

    A ``folder`` created for them is removed again if nothing could be downloaded into it."""
    url_base = base_url_for(dataset, base_url)
    sums = MD5SUMS[dataset]
    created = not folder.exists()
    try:
        for name in names:
            url = urllib.parse.urljoin(url_base, name)
            log.info("downloading %s to %s", url, folder)
            download_file(url, folder / name, sums.get(name))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # (only while it is empty)
                folder.rmdir()
        raise


def missing_files_message(
    title: str, names: Iterable[str], folder: Path, *, url: str, also: str = "", cause: str = ""
) -> str:
    """The error text for absent files: which are missing, where to put them, and how to point
    xpcnn at another folder."""
    names = list(names)
    listed = ", ".join(names)
    these = "these files" if len(names) > 1 else "this file"
    parts = []
    if cause:
        parts.append(f"Could not download {title}: {cause}.")
    else:
        parts.append(f"{title} is not complete in {folder}{also}: missing {listed}.")
    parts.append(
        f"Put {these} in {folder}: {listed} (from {url}). To read them from another folder, "
        f"pass {_SPELLING.get().usage} or set the environment variable {DATA_DIR_ENV}."
    )
    if not cause:
        parts.append("Or load with download=True to fetch them into that folder.")
    return " ".join(parts)
