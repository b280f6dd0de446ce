"""Pictures of samples: 2-D scatter plots and image grids, as pure functions.

Each function renders with matplotlib's Agg canvas (no pyplot, no global backend state), writes a
PNG when `path` is given, and returns the picture as an (H, W, 3) uint8 array, ready for a logger
(`SummaryWriter.add_image(..., dataformats="HWC")`).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _render(fig: Figure, path: str | Path | None) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return image


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def scatter_plot(
    samples,
    reference=None,
    path: str | Path | None = None,
    title: str | None = None,
    *,
    size: float = 5.0,
    labels=None,
) -> np.ndarray:
    """Scatter 2-D `samples` (N, 2) over optional `reference` data (M, 2) drawn in grey; with `labels`
    (N,), each class in its own colour.

    The window covers the bulk of both point sets with a margin.
    """
    samples = _numpy(samples)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"scatter_plot: expected samples of shape (N, 2), got {tuple(samples.shape)}")
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    frame = samples
    if reference is not None:
        reference = _numpy(reference)
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", alpha=0.6, label="data", linewidths=0)
        frame = np.concatenate([reference, samples])
    if labels is None:
        ax.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:blue", alpha=0.8, label="samples", linewidths=0)
    else:
        ax.scatter(samples[:, 0], samples[:, 1], s=3, c=_numpy(labels) % 10, cmap="tab10", vmin=0, vmax=9,
                   alpha=0.8, label="samples (colour: class)", linewidths=0)
    finite = frame[np.isfinite(frame).all(axis=1)]
    if len(finite):
        # A square window over the bulk of the points, so a few outliers do not squash the picture.
        lo, hi = np.percentile(finite, [0.5, 99.5], axis=0)
        centre, half = (lo + hi) / 2, 0.6 * (hi - lo).max() + 1e-3
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _render(fig, path)


def image_grid(
    samples,
    path: str | Path | None = None,
    nrow: int | None = None,
    title: str | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    pixels_per_image: int = 48,
) -> np.ndarray:
    """Tile images (N, C, H, W) with C in {1, 3}, values in `value_range`, into a grid of `nrow`
    images per row (default: a square grid)."""
    images = _numpy(samples)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    lo, hi = value_range
    images = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
    pad = 1
    grid = np.ones((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    inches = max(2.0, nrow * pixels_per_image / 100)
    title_lines = len(textwrap.wrap(title, width=max(30, int(nrow * pixels_per_image / 6)))) if title else 0
    fig = Figure(figsize=(inches, inches * grid.shape[0] / grid.shape[1] + 0.15 + 0.15 * title_lines), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:  # wrapped to the grid's width
        ax.set_title(textwrap.fill(title, width=max(30, int(nrow * pixels_per_image / 6))), fontsize=8)
    fig.tight_layout(pad=0.2)
    return _render(fig, path)


def plot_samples(samples, path: str | Path | None = None, title: str | None = None, reference=None,
                 labels=None) -> np.ndarray:
    """A scatter plot for 2-D samples (N, 2), an image grid for images (N, C, H, W). With `labels` (N,) in
    class order (`guidance.class_grid_labels`), points are coloured by class and images go one class per row."""
    if samples.dim() == 2 and samples.shape[1] == 2:
        return scatter_plot(samples, reference, path, title, labels=labels)
    if samples.dim() == 4:
        per_row = None if labels is None else max(1, int((torch.as_tensor(labels) == labels[0]).sum()))
        return image_grid(samples, path, nrow=per_row, title=title)
    raise ValueError(f"plot_samples: no picture for samples of shape {tuple(samples.shape)}; "
                     "expected (N, 2) points or (N, C, H, W) images")
