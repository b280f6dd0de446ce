"""Deterministic 2-D toy distributions, roughly unit scale."""
from __future__ import annotations

import numpy as np
from datasets import Dataset

TOY2D = ("8gaussians", "moons", "checkerboard", "swissroll")


def make_toy2d(name: str, num_samples: int, seed: int = 0) -> np.ndarray:
    """(num_samples, 2) float32 points of the named distribution, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    if name == "8gaussians":
        angles = 2 * np.pi * rng.integers(0, 8, num_samples) / 8
        centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 2.0
        points = centers + 0.15 * rng.standard_normal((num_samples, 2))
    elif name == "moons":
        upper = rng.random(num_samples) < 0.5
        theta = np.pi * rng.random(num_samples)
        points = np.where(
            upper[:, None],
            np.stack([np.cos(theta), np.sin(theta)], 1),
            np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1),
        )
        points = (points - np.array([0.5, 0.25])) * 1.5 + 0.05 * rng.standard_normal((num_samples, 2))
    elif name == "checkerboard":
        x1 = rng.random(num_samples) * 4 - 2
        x2 = rng.random(num_samples) - rng.integers(0, 2, num_samples) * 2.0
        x2 = x2 + (np.floor(x1) % 2)
        points = np.stack([x1, x2], 1)
    elif name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(num_samples))
        points = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5.0 + 0.05 * rng.standard_normal((num_samples, 2))
    else:
        from ..errors import suggest

        raise ValueError(f"data.name: unknown toy distribution {name!r}.{suggest(name, TOY2D)} Choose one of {list(TOY2D)}")
    return points.astype(np.float32)


def toy2d_dataset(name: str, num_samples: int, seed: int = 0) -> Dataset:
    """The toy distribution as a `datasets.Dataset` with one column "x"."""
    return Dataset.from_dict({"x": make_toy2d(name, num_samples, seed)})
