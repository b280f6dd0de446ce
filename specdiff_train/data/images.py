"""Image datasets from the hub, local files or disk, turned into float tensors in [-1, 1]."""
from __future__ import annotations

import os

import numpy as np
import torch
from datasets import Dataset, load_dataset, load_from_disk

LOCAL_BUILDERS = ("imagefolder", "parquet")


def load_image_dataset(dataset: str, name: str | None, split: str, data_dir: str | None, data_files) -> Dataset:
    """A `datasets.Dataset` from a hub name, a local builder ("imagefolder", "parquet") or "disk"."""
    try:
        if dataset == "disk":
            if not data_dir:
                raise ValueError("data.data_dir: required with dataset='disk' (a folder written by save_to_disk)")
            loaded = load_from_disk(data_dir)
            return loaded[split] if hasattr(loaded, "keys") else loaded
        if dataset in LOCAL_BUILDERS:
            if not (data_dir or data_files):
                raise ValueError(f"data.data_dir or data.data_files: required with dataset={dataset!r}")
            return load_dataset(dataset, data_dir=data_dir, data_files=data_files, split=split)
        return load_dataset(dataset, name, split=split)
    except ValueError:
        raise
    except Exception as err:  # hub / file errors come in many types; say what to do
        offline = " HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so nothing is downloaded." if (
            os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1") else ""
        raise ValueError(
            f"data.dataset: could not load {dataset!r} (split {split!r}): {type(err).__name__}: {err}.{offline} "
            "Use a local copy instead: dataset: imagefolder with data_dir, dataset: parquet with data_files, "
            "or dataset: disk with data_dir (a folder written by save_to_disk)."
        ) from err


def check_column(dataset: Dataset, column: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(
            f"data.image_column: the dataset has no column {column!r}; its columns are {dataset.column_names}. "
            f"Set data.image_column to the one holding the images."
        )


def to_tensor_images(images, image_size: int, channels: int) -> torch.Tensor:
    """PIL images or nested arrays -> (N, channels, size, size) float32 in [-1, 1]."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    out = np.empty((len(images), channels, image_size, image_size), dtype=np.float32)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert(mode)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32).reshape(image_size, image_size, channels)
        out[i] = array.transpose(2, 0, 1)
    return torch.from_numpy(out / 127.5 - 1.0)
