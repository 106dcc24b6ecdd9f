"""A segmentation set made on the spot, for dense fine-tuning with no download: images of shapes
and their masks of class indices, the same for the same seed on any machine.

Each image has a background (a random colour, a gradient across it, and noise) and one to
``max_shapes`` shapes: a disc, a square, a triangle or a ring, each at a random size, position
(part of it may lie outside the image), angle, colour and texture (flat, stripes or speckle),
drawn in turn so later shapes hide earlier ones; the mask holds, for each pixel, the class of the
shape on top, or ``0`` for the background. A shape's colour says nothing of its class and stands
out from the background around it, so the class is in the shape alone.

Example:
    >>> images, masks = shapes(4, size=32, seed=0)
    >>> images.shape, images.dtype, masks.shape, masks.dtype
    ((4, 32, 32, 3), dtype('uint8'), (4, 32, 32), dtype('int64'))
    >>> CLASSES
    ('background', 'disc', 'square', 'triangle', 'ring')
"""

from __future__ import annotations

import numpy as np

from autocut import _validate

__all__ = ["shapes", "CLASSES"]

CLASSES = ("background", "disc", "square", "triangle", "ring")
_MIN_CONTRAST = 60.0  # the least distance (RGB, 0-255) between a shape's colour and the background's under it


def shapes(n: int = 800, size: int = 64, seed: int = 0, max_shapes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of shapes and their masks (see the module docstring).

    Args:
        n: how many images.
        size: their side, in pixels (at least 16).
        seed: the same seed gives the same images and masks (numpy's PCG64).
        max_shapes: the most shapes an image has (at least 1).

    Returns:
        ``(images, masks)``: ``(n, size, size, 3)`` ``uint8`` RGB, and ``(n, size, size)`` ``int64``
        class indices into :data:`CLASSES`.
    """
    n = _validate.positive_int("n", n)
    size = _validate.positive_int("size", size)
    max_shapes = _validate.positive_int("max_shapes", max_shapes)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels (a shape needs room to show its class), got {size}")
    rng = np.random.Generator(np.random.PCG64(seed))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.int64)
    for i in range(n):
        canvas = _background(rng, xs, ys, size)
        for _ in range(rng.integers(1, max_shapes + 1)):
            kind = int(rng.integers(1, len(CLASSES)))
            inside = _shape(rng, kind, xs, ys, size)
            if not inside.any():
                continue
            colour = _contrasting(rng, canvas[inside].mean(0))
            canvas[inside] = _textured(rng, colour, xs, ys)[inside]
            masks[i][inside] = kind
        images[i] = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return images, masks


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys) / size - 0.5  # -0.5 .. 0.5 across the image
    gradient = ramp[..., None] * rng.uniform(-60, 60, 3)
    return base + gradient + rng.normal(0, rng.uniform(4, 16), (*xs.shape, 3))


def _shape(rng: np.random.Generator, kind: int, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """The pixels a shape of class ``kind`` covers: a random size, centre (inside the image) and angle."""
    r = rng.uniform(size / 10, size / 4)
    cx, cy = rng.uniform(0, size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * (xs - cx) + np.sin(angle) * (ys - cy)
    v = -np.sin(angle) * (xs - cx) + np.cos(angle) * (ys - cy)
    d2 = u * u + v * v
    name = CLASSES[kind]
    if name == "disc":
        return d2 <= r * r
    if name == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if name == "triangle":  # equilateral, circumradius r: inside the three edges
        edges = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        return np.logical_and.reduce([-(ex * u + ey * v) <= r / 2 for ex, ey in edges])
    return (d2 <= r * r) & (d2 >= (r * rng.uniform(0.45, 0.65)) ** 2)  # ring


def _contrasting(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least :data:`_MIN_CONTRAST` from ``under`` (the mean colour it covers)."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            return colour


def _textured(rng: np.random.Generator, colour: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``colour`` over the image: flat, in stripes (at a random angle and period) or speckled."""
    texture = rng.integers(3)
    out = np.broadcast_to(colour, (*xs.shape, 3)).astype(np.float64)
    if texture == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        stripes = np.sin(2 * np.pi * (np.cos(angle) * xs + np.sin(angle) * ys) / period)
        out = out + stripes[..., None] * 20
    elif texture == 2:
        out = out + rng.normal(0, 18, out.shape)
    return out
