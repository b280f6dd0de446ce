"""scikit-learn's bundled 8x8 digits (1797 images, no download) as a `datasets.Dataset`."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from datasets import Array2D, ClassLabel, Dataset, DatasetInfo, Features, load_from_disk

DIGITS_MAX = 16  # pixel values are 0..16: x / (DIGITS_MAX / 2) - 1 maps them onto [-1, 1]
# Written into the cached dataset's description; a cache without it (an older format) is rebuilt.
_FORMAT = "scikit-learn 8x8 digits; image: uint8 pixel values 0..16 (format 2)"


def build_digits_dataset() -> Dataset:
    """The digits with their original pixel values: columns "image" (8x8 uint8, 0..16) and "label"."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = Features({"image": Array2D((8, 8), "uint8"), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict(
        {"image": digits.images.astype(np.uint8), "label": digits.target},
        info=DatasetInfo(description=_FORMAT, features=features),
    )


def digits_dataset(cache_dir: str | Path = "data") -> Dataset:
    """The digits Dataset, cached with `save_to_disk` under cache_dir/digits and reloaded from there."""
    path = Path(cache_dir) / "digits"
    if (path / "dataset_info.json").exists():
        cached = load_from_disk(str(path))
        if cached.info.description == _FORMAT:
            return cached
        shutil.rmtree(path, ignore_errors=True)  # an older format
    dataset = build_digits_dataset()
    # Write next to the cache and rename, so a process reading the cache never sees half a dataset.
    tmp = path.with_name(f".digits-{os.getpid()}")
    dataset.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process renamed its copy first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset
