import os

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

# xpcnn is written against the 2023.12 standard, whose where() and elementwise functions take
# no Python scalars (2024.12's do): the tests' array_api_strict holds every run to it, whatever
# version the installed one defaults to (2.2 defaults to 2023.12, 2.6 to 2025.12).
try:
    import array_api_strict
except ImportError:  # (the tests that need it skip)
    pass
else:
    array_api_strict.set_array_api_strict_flags(api_version="2023.12")


def pytest_configure(config):
    # Under pytest-xdist (-n), one BLAS thread a worker: the workers keep every core busy, and
    # OpenBLAS's threads spin-wait for cores other workers hold. Set here, before the workers
    # start, so that they have it before they load NumPy.
    if config.getoption("numprocesses", None):
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(name, "1")


# The most workers `-n auto` starts: past this the longest tests, not the cores, bound the run,
# and each worker imports NumPy and PyTorch and collects the suite (memory, start-up).
# PYTEST_XDIST_AUTO_NUM_WORKERS, when set, is taken as it is.
MOST_WORKERS = 8


@pytest.hookimpl(optionalhook=True, wrapper=True)
def pytest_xdist_auto_num_workers(config):
    workers = yield
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return workers
    return min(workers, MOST_WORKERS)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    data = os.environ.get("XPCNN_DATA_DIR")
    for item in items:
        if "slow" in item.keywords and not data:
            item.add_marker(pytest.mark.skip(reason="XPCNN_DATA_DIR is not set (real-data test)"))
        # the marks a module gives its own cases (test_gpu.py's on the CUDA emulator)
        for mark in getattr(getattr(item, "module", None), "collection_marks", lambda i: [])(item):
            item.add_marker(mark)
    # The slow (real-data) tests first, the rest in their order: under -n, workers start the
    # longest at once rather than one of them ending the run alone with an MNIST epoch.
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture
def shown_bars(monkeypatch):
    """The callbacks' tqdm bars shown (TQDM_DISABLE=1, set above, hides them, as it would a
    user's): for tests of what a bar shows."""
    import functools

    import xpcnn.callbacks

    monkeypatch.setattr(xpcnn.callbacks, "tqdm",
                        functools.partial(xpcnn.callbacks.tqdm, disable=False))
