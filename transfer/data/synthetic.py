"""The synthetic dataset: ten coloured shapes on noisy backgrounds, generated from a seed (NumPy only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SYNTHETIC_CLASSES = (
    "circle", "square", "triangle", "cross", "ring",
    "horizontal_bar", "vertical_bar", "diagonal_line", "diamond", "checker",
)  # fmt: skip

# Masks over coordinates (u, v) normalised by the shape's radius; v grows downwards.
_SHAPE_MASKS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u**2 + v**2 < 1.0,  # circle
    lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,  # square
    lambda u, v: (v > -0.9) & (v < 0.8) & (abs(u) < (v + 0.9) * 0.6),  # triangle
    lambda u, v: ((abs(u) < 0.3) & (abs(v) < 1.0)) | ((abs(v) < 0.3) & (abs(u) < 1.0)),  # cross
    lambda u, v: (u**2 + v**2 < 1.0) & (u**2 + v**2 > 0.36),  # ring
    lambda u, v: (abs(v) < 0.3) & (abs(u) < 1.1),  # horizontal bar
    lambda u, v: (abs(u) < 0.3) & (abs(v) < 1.1),  # vertical bar
    lambda u, v: (abs(u - v) < 0.4) & (abs(u + v) < 1.6),  # diagonal line
    lambda u, v: abs(u) + abs(v) < 1.0,  # diamond
    lambda u, v: (np.maximum(abs(u), abs(v)) < 1.0) & ((np.floor(u * 2) + np.floor(v * 2)) % 2 == 0),  # checker
)
_SYNTH_SIZE = 32
_SYNTH_CHUNK = 1024  # images generated per vectorised step (bounds memory for large sets)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in [0, 1], shape (N,)) to RGB (N, 3) in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def synthetic_images(n: int, seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 RGB images of ten coloured shapes on noisy backgrounds, balanced and deterministic by seed.

    A class is its shape and a typical hue (jittered), so both shape and colour features separate the classes.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(_SHAPE_MASKS)
    y = rng.permutation(np.arange(n) % n_classes)
    x = np.empty((n, _SYNTH_SIZE, _SYNTH_SIZE, 3), np.uint8)
    grid = np.arange(_SYNTH_SIZE, dtype=np.float32) + 0.5
    for start in range(0, n, _SYNTH_CHUNK):
        labels = y[start : start + _SYNTH_CHUNK]
        m = len(labels)
        radius = rng.uniform(7.0, 11.0, m).astype(np.float32)[:, None, None]
        cx, cy = (rng.uniform(-4.0, 4.0, (2, m)).astype(np.float32) + _SYNTH_SIZE / 2)[..., None, None]
        angle = rng.uniform(-0.25, 0.25, m).astype(np.float32)[:, None, None]  # about +-15 degrees
        dx, dy = (grid[None, None, :] - cx) / radius, (grid[None, :, None] - cy) / radius
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, np.cos(angle) * dy - np.sin(angle) * dx
        mask = np.zeros((m, _SYNTH_SIZE, _SYNTH_SIZE), bool)
        for k, shape in enumerate(_SHAPE_MASKS):
            chosen = labels == k
            mask[chosen] = shape(u[chosen], v[chosen])
        hue = (labels / n_classes + rng.normal(0.0, 0.02, m)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0, m), rng.uniform(0.8, 1.0, m)) * 255
        background = rng.uniform(0.0, 70.0, (m, 1)) + rng.uniform(-15.0, 15.0, (m, 3))  # dark, weakly tinted
        image = np.where(mask[..., None], colour[:, None, None, :], background[:, None, None, :])
        image += rng.normal(0.0, 12.0, image.shape)
        x[start : start + m] = np.clip(image, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)
