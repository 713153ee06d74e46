"""A built-in, procedurally generated image dataset that needs no download.

Ten kinds of shape are drawn at a random position, size and colour on a random, shaded background
with pixel noise. The classes differ only in local structure (corners against curves, filled
against outlined, edge orientation), never in where a shape sits or what colour it has, so a
dense-only network, which has to learn every position and colour pairing separately, cannot solve
the task, while a small convolutional network with global pooling can. ``scripts/
shapes_learnability.py`` measures both with PyTorch.

Generation is vectorised: each class is rasterised for all of its images at once from per-image
parameters, so 10,000 images take a fraction of a second.
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
    "cross",
    "horizontal bars",
    "vertical bars",
    "diamond",
)

DEFAULT_N_TRAIN = 10_000
DEFAULT_N_TEST = 2_000

_MIN_IMAGE_SIZE = 16
_MAX_IMAGE_SIZE = 256
_CHUNK = 500


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
    r = rng.uniform(5.0, 11.0, n) * scale
    thick = rng.uniform(1.6, 2.6, n) * scale
    margin = r + 1.0 * scale
    cx = margin + rng.uniform(0.0, 1.0, n) * (size - 2 * margin)
    cy = margin + rng.uniform(0.0, 1.0, n) * (size - 2 * margin)

    fg, bg = _colours(n, rng)
    # A linear shading across the background, in a random direction, so that no pixel's
    # brightness alone tells background from shape.
    angle = rng.uniform(0.0, 2 * np.pi, n)
    amp = rng.uniform(0.0, 40.0, n)
    shade_x = (np.cos(angle) * amp).astype(np.float32)
    shade_y = (np.sin(angle) * amp).astype(np.float32)
    noise_amp = rng.uniform(6.0, 28.0, n).astype(np.float32)

    grid = np.arange(size, dtype=np.float32) + 0.5
    ramp_axis = grid / size - 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    # Render in fixed-size chunks: the float working buffers stay small and are reused, which
    # is several times faster than whole-array temporaries (page faults dominate otherwise).
    chunk = _CHUNK
    buf = np.empty((min(chunk, n), size, size, 3), dtype=np.float32)
    noise = np.empty_like(buf)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
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
        )
        np.add(bg[lo:hi, None, None, :], ramp[..., None], out=out)
        np.copyto(out, fg[lo:hi, None, None, :], where=mask[..., None])
        # Uniform rather than Gaussian noise: it is four times cheaper to draw and just as good
        # at hiding exact pixel values.
        rng.random(out=nz, dtype=np.float32)
        nz -= 0.5
        nz *= 2.0 * noise_amp[lo:hi, None, None, None]
        out += nz
        np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        images[lo:hi] = out
    return images, labels


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
        return ((adx <= t * 0.5) & (ady <= r)) | ((ady <= t * 0.5) & (adx <= r))
    if k == 6:  # cross (an X): the two diagonals, clipped to the box
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
    """Random foreground and background RGB colours, at least a fixed distance apart."""
    min_dist = 90.0
    bg = rng.uniform(0.0, 255.0, (n, 3))
    # Draw a few candidates per image and keep the first that contrasts enough; where none does
    # (rare), fall back to the colour opposite the background, which always contrasts.
    tries = 8
    cand = rng.uniform(0.0, 255.0, (n, tries, 3))
    ok = np.linalg.norm(cand - bg[:, None, :], axis=2) >= min_dist
    first = np.argmax(ok, axis=1)
    fg = cand[np.arange(n), first]
    none_ok = ~ok.any(axis=1)
    fg[none_ok] = 255.0 - bg[none_ok]
    return fg.astype(np.float32), bg.astype(np.float32)
