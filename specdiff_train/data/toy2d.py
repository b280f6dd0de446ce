"""Deterministic 2-D toy distributions, roughly unit scale."""
from __future__ import annotations

import numpy as np
from datasets import Dataset

TOY2D = ("8gaussians", "moons", "checkerboard", "swissroll")
# Classes of each distribution's "label" column: the mixture component a point was drawn from (8 Gaussians,
# 2 moons, 8 checkerboard squares, 3 turns of the swiss roll).
TOY2D_CLASSES = {"8gaussians": 8, "moons": 2, "checkerboard": 8, "swissroll": 3}


def make_toy2d(name: str, num_samples: int, seed: int = 0, return_labels: bool = False):
    """(num_samples, 2) float32 points of the named distribution, a pure function of the seed; with
    `return_labels`, also the (num_samples,) int64 component of each point (`TOY2D_CLASSES`)."""
    points, labels = _toy2d(name, num_samples, seed)
    return (points, labels) if return_labels else points


def _toy2d(name: str, num_samples: int, seed: int):
    rng = np.random.default_rng(seed)
    if name == "8gaussians":
        component = rng.integers(0, 8, num_samples)
        angles = 2 * np.pi * component / 8
        centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 2.0
        points = centers + 0.15 * rng.standard_normal((num_samples, 2))
    elif name == "moons":
        upper = rng.random(num_samples) < 0.5
        component = (~upper).astype(np.int64)
        theta = np.pi * rng.random(num_samples)
        points = np.where(
            upper[:, None],
            np.stack([np.cos(theta), np.sin(theta)], 1),
            np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1),
        )
        points = (points - np.array([0.5, 0.25])) * 1.5 + 0.05 * rng.standard_normal((num_samples, 2))
    elif name == "checkerboard":
        x1 = rng.random(num_samples) * 4 - 2
        u = rng.random(num_samples)  # drawn before the row, as always: the points stay those of earlier versions
        row = rng.integers(0, 2, num_samples)
        x2 = u - row * 2.0
        component = np.floor(x1 + 2).astype(np.int64).clip(0, 3) * 2 + row
        x2 = x2 + (np.floor(x1) % 2)
        points = np.stack([x1, x2], 1)
    elif name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(num_samples))
        component = np.floor((t - 1.5 * np.pi) / np.pi).astype(np.int64).clip(0, 2)
        points = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5.0 + 0.05 * rng.standard_normal((num_samples, 2))
    else:
        from ..errors import suggest

        raise ValueError(f"data.name: unknown toy distribution {name!r}.{suggest(name, TOY2D)} Choose one of {list(TOY2D)}")
    return points.astype(np.float32), component.astype(np.int64)


def toy2d_dataset(name: str, num_samples: int, seed: int = 0) -> Dataset:
    """The toy distribution as a `datasets.Dataset` with columns "x" (the points) and "label" (their component)."""
    points, labels = _toy2d(name, num_samples, seed)
    return Dataset.from_dict({"x": points, "label": labels})
