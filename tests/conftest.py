import os

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


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
