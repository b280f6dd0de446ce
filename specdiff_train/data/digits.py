"""scikit-learn's bundled 8x8 digits (1797 images, no download) as a `datasets.Dataset`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk


def build_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8), 0..255
    return Dataset.from_dict({"image": images.tolist(), "label": digits.target.tolist()})


def digits_dataset(cache_dir: str | Path = "data") -> Dataset:
    """The digits Dataset (columns "image": 8x8 uint8 lists, "label"), cached under cache_dir/digits."""
    path = Path(cache_dir) / "digits"
    if (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    dataset = build_digits_dataset()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(path))
    return dataset
