"""A built-in, procedurally generated image dataset that needs no download.

Ten kinds of shape (``SHAPES_CLASSES``) are drawn at a random position and size, in a random grey
level with a slight colour tint, on a background of another grey level (brighter or darker, at
least 100 levels apart) shaded in a random direction, with uniform pixel noise. The classes differ
only in local structure (corners against curves, filled against outlined, edge orientation),
never in where a shape sits or how bright it is, so a dense-only network, which must learn every
position and contrast separately, does not get far, while a small convolutional network with
global pooling solves it within a few epochs. ``scripts/shapes_learnability.py`` measures both
with PyTorch; the settings below were tuned with it.

Generation is vectorised: each class is rasterised for all of its images in a chunk at once from
per-image parameters, so 10,000 images take about half a second on one core.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

SHAPES_CLASSES: tuple[str, ...] = (
    "filled square",
    "hollow square",
    "filled circle",
    "ring",
    "triangle",
    "plus",
    "diagonal cross",
    "horizontal bars",
    "vertical bars",
    "diamond",
)

DEFAULT_N_TRAIN = 10_000
DEFAULT_N_TEST = 2_000

_MIN_IMAGE_SIZE = 16
_MAX_IMAGE_SIZE = 256
_CHUNK = 500

# Generator settings, tuned with scripts/shapes_learnability.py (sizes in pixels at 32x32).
_RADIUS = (5.0, 11.0)  # half the side of a shape's bounding box
_THICK = (1.6, 2.6)  # line width of outlines, bars and crosses
_PLUS_THICK = 2.3  # the plus has wider arms: else it is the hollow square's near twin
_MIN_GAP = 100.0  # least difference of grey level between shape and background
_TINT = 15.0  # per-channel colour offset on top of the grey levels
_SHADE = 90.0  # most brightness change across the background, in a random direction
_LIGHT = 40.0  # most amplitude of each of two smooth waves of light over the whole image
_LIGHT_FREQ = 1.0  # their highest frequency, in cycles per image
_NOISE = (6.0, 28.0)  # range of the per-image amplitude of uniform pixel noise


def load_shapes(
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    seed: int = 0,
    image_size: int = 32,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Generate the shapes dataset: ``(x_train, y_train), (x_test, y_test)``.

    Images are uint8 of shape ``(N, image_size, image_size, 3)``, labels int64 in 0..9 (names in
    ``SHAPES_CLASSES``). Classes are balanced: their counts differ by at most one. Train and test
    come from independent streams derived from ``seed``, so the same seed gives bit-identical
    arrays and the test images are not drawn from the training stream.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or not _MIN_IMAGE_SIZE <= image_size <= _MAX_IMAGE_SIZE
    ):
        raise InputError(
            f"image_size must be an integer in {_MIN_IMAGE_SIZE}..{_MAX_IMAGE_SIZE}, "
            f"got {image_size!r}"
        )
    # Two children of one SeedSequence are independent streams: the test set is never a
    # continuation or a prefix of the training stream, whatever n_train is.
    train_seq, test_seq = np.random.SeedSequence(int(seed)).spawn(2)
    train = generate_shapes(int(n_train), np.random.default_rng(train_seq), int(image_size))
    test = generate_shapes(int(n_test), np.random.default_rng(test_seq), int(image_size))
    return train, test


def generate_shapes(
    n: int, rng: np.random.Generator, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` balanced, shuffled images from ``rng``: ``(uint8 (n, S, S, 3), int64 (n,))``."""
    size = image_size
    scale = size / 32.0
    labels = np.arange(n, dtype=np.int64) % len(SHAPES_CLASSES)
    rng.shuffle(labels)

    # Per-image geometry. The half-size r keeps every shape inside the frame; a fractional centre
    # varies how edges fall on the pixel grid.
    r = rng.uniform(*_RADIUS, n) * scale
    # At least a pixel wide, so that at small image sizes no line can fall between pixel centres.
    thick = np.maximum(rng.uniform(*_THICK, n) * scale, 1.0)
    margin = r + 1.0 * scale
    cx = margin + rng.uniform(0.0, 1.0, n) * (size - 2 * margin)
    cy = margin + rng.uniform(0.0, 1.0, n) * (size - 2 * margin)

    fg, bg = _colours(n, rng)
    # A linear shading across the background, in a random direction, so that no pixel's
    # brightness alone tells background from shape.
    angle = rng.uniform(0.0, 2 * np.pi, n)
    amp = rng.uniform(0.0, _SHADE, n)
    shade_x = (np.cos(angle) * amp).astype(np.float32)
    shade_y = (np.sin(angle) * amp).astype(np.float32)
    noise_amp = rng.uniform(*_NOISE, n).astype(np.float32)
    # Uneven lighting over shape and background alike: two slow waves per image. It leaves every
    # edge intact, so convolutions do not mind, while a dense layer sees each pixel shift by tens
    # of levels from image to image.
    wave_fx = rng.uniform(-_LIGHT_FREQ, _LIGHT_FREQ, (n, 2)).astype(np.float32)
    wave_fy = rng.uniform(-_LIGHT_FREQ, _LIGHT_FREQ, (n, 2)).astype(np.float32)
    wave_phase = rng.uniform(0.0, 2 * np.pi, (n, 2)).astype(np.float32)
    wave_amp = rng.uniform(0.0, _LIGHT, (n, 2)).astype(np.float32)

    grid = np.arange(size, dtype=np.float32) + 0.5
    unit = grid / size  # pixel centres in image widths
    ramp_axis = grid / size - 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    # Render in fixed-size chunks: the float working buffers stay small and are reused, which
    # is several times faster than whole-array temporaries (page faults dominate otherwise).
    # They are channels-first, (m, 3, S*S), so that every broadcast runs over long rows rather
    # than over a trailing axis of 3; one transposing copy per chunk makes the result NHWC.
    pixels = size * size
    rows = min(_CHUNK, n)
    buf = np.empty((rows, 3, pixels), dtype=np.float32)
    noise = np.empty_like(buf)
    out8 = np.empty((rows, 3, pixels), dtype=np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        m = hi - lo
        out, nz = buf[:m], noise[:m]
        dx = grid[None, None, :] - cx[lo:hi, None, None].astype(np.float32)
        dy = grid[None, :, None] - cy[lo:hi, None, None].astype(np.float32)
        rr = r[lo:hi, None, None].astype(np.float32)
        tt = thick[lo:hi, None, None].astype(np.float32)
        mask = np.zeros((m, size, size), dtype=bool)
        lab = labels[lo:hi]
        for k in range(len(SHAPES_CLASSES)):
            sel = lab == k
            if sel.any():
                mask[sel] = _draw(k, dx[sel], dy[sel], rr[sel], tt[sel])
        ramp = (
            shade_x[lo:hi, None, None] * ramp_axis[None, None, :]
            + shade_y[lo:hi, None, None] * ramp_axis[None, :, None]
        ).reshape(m, 1, pixels)
        np.add(bg[lo:hi, :, None], ramp, out=out)
        np.copyto(out, fg[lo:hi, :, None], where=mask.reshape(m, 1, pixels))
        out += _light(wave_fx[lo:hi], wave_fy[lo:hi], wave_phase[lo:hi], wave_amp[lo:hi], unit)
        # Uniform rather than Gaussian noise: it is four times cheaper to draw and just as good
        # at hiding exact pixel values.
        rng.random(out=nz, dtype=np.float32)
        nz -= 0.5
        nz *= 2.0 * noise_amp[lo:hi, None, None]
        out += nz
        np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        np.copyto(out8[:m], out, casting="unsafe")
        images[lo:hi] = out8[:m].reshape(m, 3, size, size).transpose(0, 2, 3, 1)
    return images, labels


def _light(
    fx: np.ndarray, fy: np.ndarray, phase: np.ndarray, amp: np.ndarray, unit: np.ndarray
) -> np.ndarray:
    """Sum over waves j of ``amp_j cos(2 pi (fx_j x + fy_j y) + phase_j)``, as (m, 1, S*S).

    Separable: cos(a + b) = cos a cos b - sin a sin b turns it into two small batched matrix
    products instead of a cosine per pixel.
    """
    a = 2 * np.pi * fx[:, :, None] * unit[None, None, :] + phase[:, :, None]  # (m, 2, S) in x
    b = 2 * np.pi * fy[:, :, None] * unit[None, None, :]  # (m, 2, S) in y
    wb = amp[:, :, None] * np.cos(b)
    sb = amp[:, :, None] * np.sin(b)
    field = wb.transpose(0, 2, 1) @ np.cos(a) - sb.transpose(0, 2, 1) @ np.sin(a)  # (m, y, x)
    return field.reshape(len(fx), 1, -1)


def _draw(k: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The boolean mask of class ``k`` for offsets ``dx, dy`` from the centre (broadcast)."""
    adx, ady = np.abs(dx), np.abs(dy)
    box = np.maximum(adx, ady)
    if k == 0:  # filled square
        return box <= r
    if k == 1:  # hollow square
        return (box <= r) & (box > r - t)
    d2 = dx * dx + dy * dy
    if k == 2:  # filled circle
        return d2 <= r * r
    if k == 3:  # ring
        return (d2 <= r * r) & (d2 > (r - t) ** 2)
    if k == 4:  # triangle, apex up: half-width grows linearly from the apex to the base
        return (dy >= -r) & (dy <= r) & (adx <= (dy + r) * 0.5)
    if k == 5:  # plus
        w = t * (0.5 * _PLUS_THICK)
        return ((adx <= w) & (ady <= r)) | ((ady <= w) & (adx <= r))
    if k == 6:  # diagonal cross, an X: the two diagonals, clipped to the box
        w = t * 0.7071
        return ((np.abs(dx - dy) <= w) | (np.abs(dx + dy) <= w)) & (box <= r)
    if k == 7:  # horizontal bars: top, middle and bottom stripes
        return (adx <= r) & ((ady <= t * 0.5) | (np.abs(ady - (r - t * 0.5)) <= t * 0.5))
    if k == 8:  # vertical bars
        return (ady <= r) & ((adx <= t * 0.5) | (np.abs(adx - (r - t * 0.5)) <= t * 0.5))
    if k == 9:  # diamond
        return adx + ady <= r
    raise InputError(f"no shape class {k}")


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours: grey levels at least ``_MIN_GAP`` apart, tinted.

    The shape is brighter than the background as often as darker, so no fixed pixel value means
    "shape". The gap is along the grey axis, with a small random tint per channel: a contrast
    that a 3x3 filter picks up at once, where fully random hues made the conv net learn several
    times slower without making the task any harder for the MLP.
    """
    bg_level = rng.uniform(0.0, 255.0, n)
    # Draw the foreground level uniformly from [0, bg - gap] U [bg + gap, 255], which is never
    # empty since 255 > 2 * gap.
    below = np.maximum(bg_level - _MIN_GAP, 0.0)
    above = np.maximum(255.0 - (bg_level + _MIN_GAP), 0.0)
    u = rng.uniform(0.0, 1.0, n) * (below + above)
    fg_level = np.where(u < below, u, bg_level + _MIN_GAP + (u - below))
    tint = rng.uniform(-_TINT, _TINT, (2, n, 3))
    fg = np.clip(fg_level[:, None] + tint[0], 0.0, 255.0)
    bg = np.clip(bg_level[:, None] + tint[1], 0.0, 255.0)
    return fg.astype(np.float32), bg.astype(np.float32)
