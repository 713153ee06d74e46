"""Cases shared by the tests of the CuPy kernels on the GPU (test_gpu.py) and on the CPU
emulator (test_cuda_kernels_on_cpu.py), so that both check the same shapes."""

import array_api_compat.numpy as xpn
import numpy as np
import pytest

import xpcnn
from xpcnn.ops import windows
from xpcnn.ops.kernels import StandardKernels

STANDARD_NUMPY = StandardKernels(xpn)

# (kernel, strides, input shape, pads)
IM2COL = [
    ((3, 3), (1, 1), (3, 10, 9, 3), (0, 0, 0, 0)), ((3, 3), (2, 2), (2, 11, 10, 5), (0, 1, 0, 1)),
    ((5, 3), (2, 1), (2, 12, 9, 2), (0, 0, 0, 0)), ((5, 5), (1, 1), (2, 6, 7, 2), (2, 2, 2, 2)),
    ((1, 1), (1, 1), (2, 4, 4, 7), (0, 0, 0, 0)), ((3, 3), (1, 1), (2, 5, 5, 4), (2, 2, 2, 2)),
    ((3, 3), (1, 1), (3, 10, 9, 3), (1, 1, 1, 1)), ((3, 3), (1, 1), (4, 8, 8, 1), (0, 0, 0, 0)),
]

# (pool, strides, input shape)
MAX_POOL = [
    ((2, 2), (2, 2), (3, 8, 8, 5)),   # windows cover the input
    ((2, 2), (2, 2), (2, 7, 9, 3)),   # a last row and column outside every window
    ((3, 3), (3, 3), (2, 9, 9, 4)),
    ((2, 3), (3, 3), (2, 9, 9, 2)),   # strides larger than the window
    ((3, 3), (2, 2), (2, 9, 9, 3)),   # overlapping windows
]

# (pool, strides, input shape, pads): pools whose gradient is gathered per input element, the
# padding read in place (-inf for a maximum, 0 for a mean)
POOL_PADDED = [
    ((3, 3), (2, 2), (2, 9, 9, 3), (1, 1, 1, 1)),  # ResNet's stem: MaxPool2D(3, 2, padding=1)
    ((3, 3), (1, 1), (2, 6, 7, 2), (1, 1, 1, 1)),  # 3x3 stride 1 "same"
    ((3, 3), (2, 2), (2, 8, 7, 3), (0, 1, 1, 1)),  # "same" of uneven sizes
    ((2, 2), (2, 2), (2, 7, 5, 2), (0, 1, 0, 1)),  # windows apart, "same" of odd sizes
    ((2, 3), (1, 2), (1, 5, 8, 4), (1, 0, 2, 1)),
    ((3, 3), (2, 2), (2, 9, 9, 3), (0, 0, 0, 0)),  # overlapping windows, no padding
    ((2, 2), (2, 2), (2, 7, 9, 3), (0, 0, 0, 0)),  # a last row and column outside every window
]

# every max pool case above, as (pool, strides, input shape, pads)
EVERY_MAX_POOL = [(*case, (0, 0, 0, 0)) for case in MAX_POOL] + POOL_PADDED

# (kernel, strides, input shape, filters, padding)
DIRECT_CONV = [
    ((3, 3), (1, 1), (3, 10, 9, 3), 8, "same"), ((3, 3), (2, 2), (2, 11, 10, 5), 4, "same"),
    ((5, 3), (1, 2), (2, 12, 9, 2), 6, "valid"), ((1, 1), (1, 1), (2, 4, 4, 7), 5, "valid"),
    ((3, 3), (1, 1), (2, 6, 6, 4), 3, 2), ((3, 3), (1, 1), (37, 16, 16, 3), 4, "same"),
    ((3, 3), (1, 1), (4, 8, 8, 16), 8, "same"), ((3, 3), (2, 2), (3, 9, 9, 6), 5, "same"),
    ((3, 3), (1, 1), (8, 8, 8, 12), 7, "same"), ((3, 3), (1, 1), (16, 32, 32, 32), 32, "same"),
]



def _with_pads(kernel, strides, shape, filters, padding):
    pads = padding if isinstance(padding, tuple) else windows.resolve_padding(
        padding, shape[1:3], kernel, strides)
    return kernel, strides, shape, filters, pads


# (kernel, strides, input shape, filters, pads): input gradients gathered per input element
# (cuda_conv's xpcnn_conv_input_grad), strided or padded by a kernel's size or more; C and K
# of no common tile size
CONV_INPUT_GRAD = [_with_pads(*case) for case in [
    ((3, 3), (2, 2), (2, 11, 10, 5), 4, "same"),   # "same" of odd and even sizes: (0,1,0,1)
    ((3, 3), (2, 2), (2, 28, 28, 3), 5, "same"),   # 28 -> 14
    ((3, 3), (2, 2), (1, 7, 7, 5), 3, "same"),     # 7 -> 4, (1,1,1,1); batch 1
    ((1, 1), (2, 2), (2, 9, 8, 7), 5, "valid"),    # ResNet's shortcut, odd size
    ((7, 7), (2, 2), (1, 15, 14, 3), 6, "same"),   # a stem
    ((4, 4), (2, 2), (3, 9, 9, 2), 3, "same"),     # an even kernel: (1,2,1,2)
    ((2, 2), (3, 3), (2, 10, 11, 3), 5, "valid"),  # strides past the kernel: rows in no window
    ((2, 3), (3, 2), (2, 10, 11, 3), 4, (0, 1, 2, 0)),
    ((5, 5), (3, 3), (2, 13, 12, 6), 7, 2),
    ((5, 3), (1, 2), (2, 12, 9, 2), 6, "valid"),
    ((3, 3), (2, 2), (2, 9, 7, 33), 70, 1),        # filters over two 32-wide tiles
    ((1, 1), (1, 1), (2, 5, 5, 3), 4, 1),          # padding of a kernel's size: stride 1
    ((3, 3), (1, 1), (2, 6, 6, 4), 3, 3),
    ((3, 1), (1, 3), (2, 8, 10, 3), 5, (4, 3, 1, 2)),  # padding past the kernel, unequal
    ((3, 3), (2, 1), (1, 5, 6, 1), 1, (3, 0, 1, 1)),   # one channel, one filter
]]

# (rows, classes, label smoothing, integer logits below this (ties) or None: normal * 30)
SOFTMAX_CROSS_ENTROPY = [
    (7, 10, 0.0, None), (128, 10, 0.1, None), (40, 4, 0.0, 3), (33, 37, 0.2, 4), (3, 1, 0.0, None),
    (700, 10, 0.1, None),  # (three blocks of rows)
    # (a row a warp: more classes than a block's rows of them fit in 32 KB; ties broken to the
    # first, warps past the last row, in several blocks)
    (20, 300, 0.1, None), (9, 1000, 0.0, 3),
]

# parameter shapes of one optimiser step (every one updated by the same launch)
UPDATE_SHAPES = [(3, 3, 4, 8), (8,), (1,), (50, 10), (7, 3), (2,)]

# the tiled convolution's cases: those above, plus output channels over one 32-wide tile and
# kernel rows over several 16-long slices
TILED_CONV = DIRECT_CONV + [
    ((3, 3), (1, 1), (2, 8, 8, 8), 40, "same"), ((3, 3), (1, 1), (3, 7, 7, 20), 64, "valid"),
    ((3, 3), (2, 2), (5, 9, 7, 33), 70, 1),
]

OPTIMISERS = pytest.mark.parametrize("make", [
    lambda: xpcnn.optim.SGD(0.1),
    lambda: xpcnn.optim.SGD(0.1, weight_decay=0.01),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9),
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda: xpcnn.optim.Adam(1e-2),
    lambda: xpcnn.optim.Adam(1e-2, weight_decay=1e-2),
    lambda: xpcnn.optim.AdamW(1e-2),
    # (AMSGrad's largest second moment; beta_2 0.9, so that v falls below it within steps)
    lambda: xpcnn.optim.Adam(1e-2, beta_2=0.9, weight_decay=1e-2, amsgrad=True),
    lambda: xpcnn.optim.AdamW(1e-2, beta_2=0.9, amsgrad=True),
    lambda: xpcnn.optim.RMSprop(1e-2),
    lambda: xpcnn.optim.RMSprop(1e-2, momentum=0.9),
    lambda: xpcnn.optim.RMSprop(1e-2, centered=True),
    lambda: xpcnn.optim.RMSprop(1e-2, momentum=0.9, centered=True, weight_decay=1e-3),
], ids=["sgd", "sgd-wd", "momentum", "nesterov-wd", "adam", "adam-l2", "adamw",
        "adam-amsgrad-l2", "adamw-amsgrad", "rmsprop", "rmsprop-momentum", "rmsprop-centered",
        "rmsprop-centered-momentum-wd"])

#: Gradient clipping (before any update, fused or standard), one of each kind.
CLIPPED = [
    lambda: xpcnn.optim.SGD(0.05, momentum=0.9, global_clipnorm=0.5),
    lambda: xpcnn.optim.Adam(1e-2, clipvalue=0.3),
    lambda: xpcnn.optim.RMSprop(1e-2, momentum=0.9, clipnorm=0.4),
    lambda: xpcnn.optim.AdamW(1e-2, beta_2=0.9, amsgrad=True, global_clipnorm=0.5),
]
CLIPPED_IDS = ["momentum-global-clipnorm", "adam-clipvalue", "rmsprop-clipnorm",
               "adamw-amsgrad-global-clipnorm"]

#: OPTIMISERS (each with fused kernels) and clipped ones.
EVERY_OPTIMISER = pytest.mark.parametrize("make", [*OPTIMISERS.args[1], *CLIPPED],
                                          ids=[*OPTIMISERS.kwargs["ids"], *CLIPPED_IDS])


def gated_updates(xp, kernels, make, rng, dtype=np.float32):
    """Three steps of a fused and a standard optimiser, the middle one with NaN gradients and
    ``apply`` False (a step the device found non-finite). Checks that step changes no parameter
    and no slot in either; returns the final (fused, standard) parameters to compare."""
    params = [rng.standard_normal(s).astype(dtype) for s in UPDATE_SHAPES]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for ok in (True, False, True):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        if not ok:
            grads[1][0] = np.nan
        before = [[a.copy() for a in arrays] for arrays in (
            fused, standard, *opt_fused.slots.values(), *opt_std.slots.values())]
        opt_fused.step(xp, fused, grads, kernels, apply=np.asarray(ok))
        opt_std.step(xp, standard, grads, apply=np.asarray(ok))
        if not ok:
            after = (fused, standard, *opt_fused.slots.values(), *opt_std.slots.values())
            for old, new in zip(before, after, strict=True):
                assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    return fused, standard


def device_scalars(opt, dtype):
    """The next step's numbers as 0-d arrays of ``dtype``, or float64 for those the
    optimiser reads exactly (as a captured step has them)."""
    return {k: np.asarray(v, np.float64 if k in opt.exact_scalars else dtype)
            for k, v in opt.step_scalars().items()}


def step_with(xp, opt, params, grads, kernels, scalar_dtype=None):
    """One step; with ``scalar_dtype``, its numbers as 0-d arrays of it (a captured step's,
    which leaves counting the step to its caller)."""
    if scalar_dtype is None:
        opt.step(xp, params, grads, kernels)
        return
    opt.step(xp, params, grads, kernels, scalars=device_scalars(opt, scalar_dtype))
    opt.iterations += 1


def two_dtype_updates(xp, kernels, make, rng, dtypes, scalar_dtype=None):
    """Three steps of a fused (``kernels``) and a standard optimiser over parameters of the two
    ``dtypes`` in turn; returns (fused optimiser, its parameters, standard optimiser, its
    parameters) to compare."""
    params = [rng.standard_normal(s).astype(dt) for s, dt in
              zip(UPDATE_SHAPES, list(dtypes) * 3, strict=True)]
    fused, standard = [p.copy() for p in params], [p.copy() for p in params]
    opt_fused, opt_std = make(), make()
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
        step_with(xp, opt_fused, fused, grads, kernels, scalar_dtype)
        step_with(xp, opt_std, standard, grads, None, scalar_dtype)
    return opt_fused, fused, opt_std, standard


# The step-record cases (xpcnn.ops.step_record): gradients of these shapes (an empty one among
# them) and dtypes, and six steps on one state. An element above the largest magnitude whose
# square each dtype holds:
SQUARE_OVERFLOWS = {"float16": 6e4, "float32": 1e30, "float64": 1e160}  # (/ 8 still are)
RECORD_SHAPES = [(3, 3, 4, 8), (8,), (0,), (50, 10), (1,)]
# (cycled over the shapes)
RECORD_DTYPES = [("float32",), ("float64",), ("float16",), ("float16", "float32", "float64")]
def record_checks(dtypes):
    """How many check launches (and tables) a step's record takes for these gradients: one
    per dtype of a non-empty gradient."""
    return len({dtypes[k % len(dtypes)] for k, shape in enumerate(RECORD_SHAPES)
                if np.prod(shape)})


# (initial [scale, good steps] or None, whether the optimiser keeps squares)
RECORD_SCALING = [(None, False), (None, True), ((4.0, 1999.0), True), ((2.0, 0.0), False)]


def recorded_steps(xp, record, dtypes, scaling, squares, step_on_device, host=np.asarray):
    """Six steps recorded by ``record`` (a ``record_step``) on arrays of ``xp`` (NumPy or
    CuPy), each step on the same arrays, changed in place: all
    finite; a NaN in gradient 1; (after a read) an element whose square overflows in gradient
    0; a NaN loss; (after a read) an infinity in the last gradient; all finite. Returns each
    step's (state, scaling, apply) and the gradients at the end (divided by the loss scale at
    each step where there is one), on the host (``host`` brings an array of ``xp`` there)."""
    from xpcnn.ops.step_record import BAD_STEP, GROWTH_INTERVAL, cleared

    assert GROWTH_INTERVAL == 2000  # (the first scaling case grows at its first step)
    rng = np.random.default_rng(7)
    grads = [xp.asarray(rng.standard_normal(shape).astype(dtypes[k % len(dtypes)]))
             for k, shape in enumerate(RECORD_SHAPES)]
    state = xp.asarray([0.0, 0.0, *cleared(len(grads))])
    scale = None if scaling is None else xp.asarray(scaling, dtype=xp.float32)
    stats = xp.asarray([0.75, 3.0], dtype=xp.float32)
    number = xp.asarray(0.0)  # (the step's number as a captured step reads it)
    untouched = host(grads[3]).copy()  # (no step sets an element of it)
    out = []
    for step in range(1, 7):
        if step == 2:  # (and an overflowing square in the same gradient: still flagged 1)
            grads[1][5] = np.nan
            grads[1][6] = SQUARE_OVERFLOWS[str(grads[1].dtype)]
        if step in (3, 5):  # (what the host's read of the state resets)
            state[BAD_STEP:] = xp.asarray(cleared(len(grads)))
        if step == 3:
            grads[1][5:7] = 0.5
            grads[0][1, 2, 3, 4] = SQUARE_OVERFLOWS[str(grads[0].dtype)]
        if step == 4:
            stats[0] = np.nan
        if step == 5:
            grads[0][1, 2, 3, 4] = 0.25
            stats[0] = 0.5
            grads[-1][0] = -np.inf
        if step == 6:
            grads[-1][0] = 1.0
        number[...] = step
        if scale is not None:  # (as the standard divides: by a product with the inverse)
            inverse = np.float32(1.0) / host(scale)[0]
            untouched = (untouched * inverse).astype(untouched.dtype)
        apply = record(state, stats, grads, 128.0, number if step_on_device else step, scale,
                       squares)
        out.append((host(state).copy(), None if scale is None else host(scale).copy(),
                    bool(host(apply))))
    np.testing.assert_array_equal(host(grads[3]), untouched)
    return out, [host(g) for g in grads]


def recorded_scales(kernels, xp, scale, overflows, host=np.asarray):
    """The loss scale after each step of ``overflows`` (True: a gradient overflows), each
    step's "apply" and whether it was recorded as an error, by ``kernels.record_step`` on
    arrays of ``xp`` (``host`` brings one to the host)."""
    from xpcnn.ops.step_record import BAD_STEP, cleared

    scaling = xp.asarray(np.array([scale, 0.0], np.float32))
    scales, applied, errors = [], [], []
    for step, bad in enumerate(overflows, 1):
        state = xp.asarray(np.array([0.0, 0.0, *cleared(1)]))
        grad = xp.asarray(np.array([np.inf if bad else 1.0, 2.0], np.float32))
        apply = kernels.record_step(state, xp.asarray(np.array([0.5, 1.0], np.float32)),
                                    [grad], 4.0, step, scaling, False)
        scales.append(float(host(scaling)[0]))
        applied.append(bool(host(apply)))
        errors.append(float(host(state)[BAD_STEP]) >= 0)
    return scales, applied, errors


def check_recorded_steps(steps, scaling, squares):
    """What :func:`recorded_steps` must give: the loss scale rescues the overflows it can,
    else each bad step is recorded where none is yet (a square's overflow only with
    ``squares``), and no update applies from a recorded one to the next read."""
    from xpcnn.ops.step_record import BAD_GRADS, BAD_STEP

    n = len(RECORD_SHAPES)
    # (the marks, a fast version's scratch within a step, are 0 after every step)
    assert all(not state[BAD_GRADS + n:].any() for state, _, _ in steps)
    applied = [apply for _, _, apply in steps]
    bad = [(float(state[BAD_STEP]), list(state[BAD_GRADS:BAD_GRADS + n]))
           for state, _, _ in steps]
    if scaling == (4.0, 1999.0):  # grows at step 1; rescues steps 2 and 5; step 3's square
        # overflow is an error (of the unscaled gradient: no scale fixes it), the scale kept
        assert [float(s[0]) for _, s, _ in steps] == [8.0, 4.0, 4.0, 4.0, 2.0, 2.0]
        assert applied == [True, False, False, False, False, True]
        assert bad[2] == bad[3] == (3.0, [2.0, 0.0, 0.0, 0.0, 0.0]) and bad[5][0] == -1.0
        return
    if scaling == (2.0, 0.0):  # rescues steps 2 and 5, halving below 1 (as PyTorch's)
        # (good steps counted, and the scale kept, neither on an error (the NaN loss of step
        # 4) nor after one: training stops there, as before it)
        assert [(float(s[0]), float(s[1])) for _, s, _ in steps] == [
            (2.0, 1.0), (1.0, 0.0), (1.0, 1.0), (1.0, 1.0), (0.5, 0.0), (0.5, 1.0)]
        assert applied == [True, False, True, False, False, True]
        assert bad[3] == (4.0, [0.0] * 5) and np.isnan(steps[3][0][3])
        assert [b[0] for k, b in enumerate(bad) if k != 3] == [-1.0] * 5
        return
    assert bad[1] == (2.0, [0.0, 1.0, 0.0, 0.0, 0.0])
    assert bad[4] == (5.0, [0.0, 0.0, 0.0, 0.0, 1.0])
    if squares:
        assert applied == [True, False, False, False, False, False]
        assert bad[3] == (3.0, [2.0, 0.0, 0.0, 0.0, 0.0])  # (the NaN loss after it: not kept)
    else:
        assert applied == [True, False, True, False, False, False]
        assert bad[3] == (4.0, [0.0] * 5) and np.isnan(steps[3][0][3])

# The device tables that one training step of nets.gap_net leaves to fill after its capture
# (CupyKernels.capture_tables), by precision: BatchNorm2D's statistics kept and put back
# (snapshot_state and restore_state: two launches, one table), the gradients' check
# (record_step) and the fused update; under mixed float16 also the casts of the weights to
# float16 and of the gradients back to float32 (cast_all), one launch and one table each.
GAP_NET_STEP_TABLES = {"float32": 3, "mixed_float16": 5}



def assert_same(got, want, err_msg=""):
    """``np.testing.assert_array_equal``, with ml_dtypes' bfloat16 compared as float32 (exact):
    NumPy 2.2's (the last for Python 3.10) does not take its NaNs for NaNs."""
    got, want = np.asarray(got), np.asarray(want)
    if "bfloat16" in (got.dtype.name, want.dtype.name):
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        got, want = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=err_msg)


def check_max_pool_of_nonfinite_gradients(paths, rng, kernel, strides, shape, pads, dtype,
                                          device=np.asarray, host=np.asarray):
    """An infinite or NaN output gradient through MaxPool2D reaches its window's first maximum
    only, as PyTorch routes it: the window's other inputs get 0, not inf * 0's NaN. (With an
    input ReLU's gradient, an inf whose window's maximum is <= 0 is NaN there: inf * 0, as
    RELU_BACKWARD has it on every path.) Each kernels object in ``paths`` is called as the
    layer calls it and must give the first's bits, which are checked against the gradient
    routed window by window here, in float64. ``device`` and ``host`` as in check_add_relu."""
    x = rng.integers(-2, 3, shape).astype(dtype)  # ties: the first maximum must win
    out_hw = windows.output_size(shape[1:3], kernel, strides, pads)
    xpad = windows.pad(xpn, x, pads, -np.inf)
    dy = rng.standard_normal((shape[0], *out_hw, shape[3])).astype(dtype)
    dy[0, 0, 0, 0], dy[-1, -1, -1, -1], dy[-1, 0, -1, 0] = np.inf, -np.inf, np.nan
    dy[0, -1, 0, -1] = np.inf
    y = STANDARD_NUMPY.max_pool(xpad, kernel, strides, out_hw)
    for relu_grad in (False, True):
        g = dy.astype(np.float64)
        if relu_grad:
            with np.errstate(invalid="ignore"):
                g = g * (y > 0)
        want, wide = np.zeros(xpad.shape), xpad.astype(np.float64)
        for n, oh, ow, c in np.ndindex(*g.shape):
            h, w = oh * strides[0], ow * strides[1]
            a, b = divmod(int(np.argmax(wide[n, h:h + kernel[0], w:w + kernel[1], c])),
                          kernel[1])  # (argmax: the first maximum, row-major)
            want[n, h + a, w + b, c] += g[n, oh, ow, c]
        want = windows.unpad(want, pads)
        assert np.isnan(want).sum() == np.isnan(g).sum() > 0 and np.isinf(want).any()
        first = None
        for kernels in paths:
            with np.errstate(invalid="ignore"):  # (the ReLU's inf * 0, on NumPy)
                if kernels.pads_in_max_pool:
                    on, routes = kernels.max_pool_train(device(x), kernel, strides, out_hw,
                                                        pads)
                    got = kernels.max_pool_backward(routes, on, device(dy), kernel, strides,
                                                    out_hw, relu_grad, pads)
                else:
                    on, routes = kernels.max_pool_train(device(xpad), kernel, strides, out_hw)
                    got = windows.unpad(kernels.max_pool_backward(
                        routes, on, device(dy), kernel, strides, out_hw, relu_grad), pads)
            got = np.ascontiguousarray(host(got))
            assert got.dtype == dy.dtype and got.shape == x.shape
            if first is None:
                first = got
                tol = 1e-2 if np.dtype(dtype).itemsize == 2 else 1e-6
                np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)
            assert_same(got, first, err_msg=type(kernels).__name__)
            if not relu_grad:  # (routed, not multiplied: +0 where a negative dy passes not)
                zeros = got.astype(np.float64)
                zeros = zeros[zeros == 0]
                assert not np.signbit(zeros).any(), type(kernels).__name__


def check_add_relu(fast, standard, rng, shape, dtype, device=np.asarray, host=np.asarray):
    """An Add layer's kernels with the ReLU after it fused, each way (backward summing the
    gradients of an output read two and three times), of two and three inputs, with a NaN and
    sums of exactly 0: the fast version gives the standard one's bits, which are the sums
    and masks written out in NumPy; inputs of two dtypes (the standard version promotes them)
    the standard version's result. ``device`` puts a NumPy array where the kernels run,
    ``host`` brings a result back."""
    def arrays(k):
        out = [np.asarray(rng.standard_normal(shape), dtype) for _ in range(k)]
        flat = [a.reshape(-1) for a in out]
        flat[0][:3] = [np.nan, 1.0, 0.5]
        flat[1][1:3] = [-1.0, -0.5]  # (sums of exactly 0: the ReLU blocks their gradient)
        return out

    def equal(got, want):
        assert_same(host(got), want)

    for k in (2, 3):
        xs = arrays(k)
        total = xs[0] + xs[1] if k == 2 else xs[0] + xs[1] + xs[2]
        on = [device(a) for a in xs]
        y = host(standard.add_relu(on, True))
        assert_same(y, np.maximum(total, np.dtype(dtype).type(0)))
        equal(fast.add_relu(on, True), y)
        equal(fast.add_relu(on, False), total)
        dys = arrays(k)
        dsum = dys[0] + dys[1] if k == 2 else dys[0] + dys[1] + dys[2]
        on, y_on = [device(a) for a in dys], device(y)
        want = host(standard.add_relu_backward(on, y_on))
        assert_same(want, dsum * (y > 0))
        assert 0 < np.count_nonzero(want) < want.size
        equal(fast.add_relu_backward(on, y_on), want)
        equal(fast.add_relu_backward(on, None), dsum)
        equal(fast.add_relu_backward(on[:1], y_on), host(standard.relu_backward(on[0], y_on)))
    wide = device(np.asarray(rng.standard_normal(shape), np.float64))
    mixed = [device(np.asarray(rng.standard_normal(shape), dtype)), wide]
    equal(fast.add_relu(mixed, True), host(standard.add_relu(mixed, True)))
    equal(fast.add_relu_backward(mixed, wide), host(standard.add_relu_backward(mixed, wide)))


# (rows, classes) of the top-k metrics' counts (a warp a row, 8 rows a block): a row alone,
# several blocks and a last one part full, a 1000-class head (a lane several classes)
# (44 x 7: several blocks of 8 rows and a remainder, k at the classes' count; was 300 x 7, the
# same layout in 38 blocks, while test_top_k_counts_spread_a_warp_a_row_over_the_gpu's 2100
# rows take more blocks than a block's threads)
TOP_K = [(1, 5), (37, 10), (44, 7), (9, 1000)]
TOP_K_KS = (1, 2, 5, 7, 2**40)  # (one beyond the classes: all of them)


def top_k_inputs(rng, rows, classes, dtype, targets):
    """Logits of ``dtype`` for the top-k counts, with ties (a few levels), a NaN, +-inf in a
    row's other scores and as a target, and ``targets``: labels of that integer dtype (one of
    them no class, where the dtype can say so), "one-hot" rows of float32 (two of them with a
    tie, one with a NaN) or float16 ones."""
    z = rng.integers(-2, 3, (rows, classes)).astype(np.float64)
    labels = rng.integers(0, classes, rows)
    if rows > 8:
        z[1, (labels[1] + 1) % classes] = np.nan  # (greater than nothing)
        z[2, labels[2]] = np.nan  # (a NaN target never counts)
        z[3, labels[3]] = np.inf
        z[4, (labels[4] + 1) % classes] = np.inf
        z[5, (labels[5] + 1) % classes] = -np.inf
        z[6, labels[6]] = -np.inf
        z[7] = 1.0  # (all tied: in every top-k)
    z = z.astype(dtype)
    if targets in ("one-hot", "float16"):
        y = np.eye(classes, dtype=np.float32)[labels]
        if rows > 8 and classes > 1:
            y[0, (labels[0] + 1) % classes] = 1.0  # (a tie: the first largest is the target)
            y[8, (labels[8] + 1) % classes] = np.nan
        return z, y.astype(np.float16 if targets == "float16" else np.float32)
    y = labels.astype(targets)
    if rows > 8:
        y[8] = classes if np.iinfo(targets).max >= classes else y[8]
        if np.iinfo(targets).min < 0:
            y[0] = -1
    return z, y
