"""Image datasets from the hub, local files or disk, turned into float tensors in [-1, 1]."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_dataset, load_from_disk
from PIL import Image

LOCAL_BUILDERS = ("imagefolder", "parquet")
_MODES = {1: "L", 3: "RGB"}


def _offline_note() -> str:
    flags = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")]
    return f" {' and '.join(flags)} is set, so nothing is downloaded." if flags else ""


def _offline() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_dataset_status(name: str) -> str:
    """Where a dataset name can come from: "folder" (a path on disk), "cached" (in the local Hugging Face
    caches), "hub" (the hub has it), "absent" (the hub answered that it does not), or "unknown" (offline,
    or the hub could not be asked)."""
    if Path(name).exists():
        return "folder"
    try:
        from datasets import config as datasets_config
        from huggingface_hub import constants

        if (Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}").exists() or \
                (Path(datasets_config.HF_DATASETS_CACHE) / name.replace("/", "___")).exists():
            return "cached"
    except ImportError:  # pragma: no cover
        pass
    if _offline():
        return "unknown"
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import RepositoryNotFoundError

        HfApi().dataset_info(name, timeout=10)
        return "hub"
    except RepositoryNotFoundError:
        return "absent"
    except Exception:  # noqa: BLE001 - no network, rate limits, ...: nothing can be said
        return "unknown"


def load_image_dataset(
    dataset: str, name: str | None, split: str, data_dir: str | None, data_files: str | list[str] | None
) -> Dataset:
    """A `datasets.Dataset` from a hub name, a local builder ("imagefolder", "parquet") or "disk".

    Raises:
        ValueError: a required path is missing, or the dataset could not be loaded (the message says
            why and how to use a local copy instead).
    """
    if dataset == "disk" and not data_dir:
        raise ValueError("data.data_dir: required with dataset='disk' (a folder written by save_to_disk)")
    if dataset in LOCAL_BUILDERS and not (data_dir or data_files):
        raise ValueError(f"data.data_dir or data.data_files: required with dataset={dataset!r}")
    try:
        if dataset == "disk":
            loaded = load_from_disk(data_dir)
            return loaded[split] if hasattr(loaded, "keys") else loaded
        if dataset in LOCAL_BUILDERS:
            return load_dataset(dataset, data_dir=data_dir, data_files=data_files, split=split)
        return load_dataset(dataset, name, split=split)
    except Exception as err:  # hub, network and file errors come in many types; say what to do
        raise ValueError(
            f"data.dataset: could not load {dataset!r} (config {name!r}, split {split!r}): "
            f"{type(err).__name__}: {err}.{_offline_note()} Use a local copy instead: dataset: imagefolder "
            "with data_dir, dataset: parquet with data_files, or dataset: disk with data_dir "
            "(a folder written by save_to_disk)."
        ) from err


def check_column(dataset: Dataset, column: str, field: str = "data.image_column", holds: str = "the images") -> None:
    """Refuse a dataset without the column (`field` names the setting), listing the columns it has."""
    if column not in dataset.column_names:
        raise ValueError(
            f"{field}: the dataset has no column {column!r}; its columns are {dataset.column_names}. "
            f"Set {field} to the one holding {holds}."
        )


def to_tensor_image(image, image_size: int, channels: int) -> torch.Tensor:
    """One PIL image or uint8 array -> (channels, size, size) float32 in [-1, 1] (bicubic resize)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert(_MODES[channels])
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


class ImageRowConverter:
    """Dataset row -> image tensor (with a label column: (image, label)); a class rather than a lambda so
    DataLoader workers can pickle it."""

    def __init__(self, column: str, image_size: int, channels: int, label_column: str | None = None):
        """Args: the image column, the side to resize to, 1 (grayscale) or 3 (RGB) channels, the label column."""
        self.column, self.image_size, self.channels = column, image_size, channels
        self.label_column = label_column

    def __call__(self, row: dict):
        image = to_tensor_image(row[self.column], self.image_size, self.channels)
        return image if self.label_column is None else (image, int(row[self.label_column]))
