"""The device launches of one eager training step of the reference models on CuPy, counted on
the CPU (tests/launch_counter.py: the CuPy kernels and cuDNN graphs emulated, every CuPy array
operation counted as the launches CuPy makes of it). An eager step at small batches is bound by
the host's cost per launch (20-50 us each on CuPy), and a captured step replays each launch as
a graph node: a change that adds launches must change the numbers pinned here, on purpose.

    PYTHONPATH=$PWD:tests python tests/launch_counter.py  # the breakdowns, batch 128
"""

import numpy as np
import pytest
from cuda_emulator import needs_compiler
from launch_counter import (
    breakdown,
    counting,
    device_array,
    emulated,
    launch_count,
    step_launches,
)

pytestmark = [needs_compiler,
              # (float16 products of the first steps overflow at the initial loss scale)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

# Launches of one step, SGD with momentum, uint8 images on the device, cuda_graphs=False.
PINNED = {
    ("notebook", "float32"): 34, ("notebook", "mixed_float16"): 36,
    ("mnist", "float32"): 29, ("mnist", "mixed_float16"): 31,
    ("cifar", "float32"): 37, ("cifar", "mixed_float16"): 39,
}


@pytest.fixture(scope="module")
def fast_cupy():
    with emulated() as module:
        yield module


def check_launches(model: str, precision: str, launches: list) -> None:
    """Fail, with the breakdown, where a step's launches are not the pinned number."""
    pinned = PINNED[model, precision]
    assert launch_count(launches) == pinned, (
        f"{model}, {precision}: {launch_count(launches)} launches a step, pinned {pinned} "
        f"(change PINNED where that is meant):\n{breakdown(launches)}")


@pytest.mark.parametrize(("model", "precision"), list(PINNED))
def test_launches_of_a_training_step(fast_cupy, model, precision):
    check_launches(model, precision, step_launches(model, precision, warmup=1))


def test_an_extra_launch_fails_the_count(fast_cupy, monkeypatch):
    """A max pooling launched twice is one launch more, found and named."""
    kernels = fast_cupy.KERNELS
    max_pool = kernels.max_pool

    def twice(*args):
        max_pool(*args)
        return max_pool(*args)

    monkeypatch.setattr(kernels, "max_pool", twice)
    launches = step_launches("mnist", "float32", warmup=1)
    pinned = PINNED["mnist", "float32"]
    assert launch_count(launches) == pinned + 1
    with pytest.raises(AssertionError, match=rf"{pinned + 1} launches a step, pinned {pinned}"
                                             r"(.|\n)*maxpool2d forward: kernel xpcnn_max_pool x2"):
        check_launches("mnist", "float32", launches)


@pytest.mark.parametrize("rows", [1, 128, 1023, 1024, 1031, 131072])
def test_a_bias_gradient_takes_one_launch(fast_cupy, rows):
    """CupyKernels.sum_rows: a Dense layer's bias gradient (one row a sample) and a
    convolution's (one row a pixel) in one launch at any row count (the counters it keeps
    between launches are made, by a memset, at its first use on a device only)."""
    a = np.ones((rows, 32), np.float32)
    fast_cupy.KERNELS.sum_rows(device_array(a))  # (first use: makes the counters)
    with counting(fast_cupy) as counter:
        counter.active = True
        total = fast_cupy.KERNELS.sum_rows(device_array(a))
        counter.active = False
    assert launch_count(counter.launches) == 1, breakdown(counter.launches)
    np.testing.assert_array_equal(total, np.full(32, rows))
