import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from specdiff_train.data import TOY2D, DiffusionDataModule, digits_dataset, make_toy2d


@pytest.mark.parametrize("name", TOY2D)
def test_toy2d_is_deterministic_and_unit_scale(name):
    a, b = make_toy2d(name, 2000, seed=3), make_toy2d(name, 2000, seed=3)
    assert a.shape == (2000, 2) and np.array_equal(a, b)
    assert not np.array_equal(a, make_toy2d(name, 2000, seed=4))
    assert 0.3 < a.std() < 3


def test_unknown_toy_name_lists_the_choices():
    with pytest.raises(ValueError, match="data.name.*8gaussians"):
        DiffusionDataModule(dataset="toy2d", name="spiral")


def test_digits_are_cached_and_reloaded(tmp_path):
    first = digits_dataset(tmp_path)
    assert len(first) == 1797 and (tmp_path / "digits" / "dataset_info.json").exists()
    assert digits_dataset(tmp_path)["label"][:20] == first["label"][:20]


@pytest.mark.parametrize("kwargs,shape", [(dict(dataset="toy2d"), (2,)), (dict(dataset="digits"), (1, 8, 8))])
def test_datamodule_batches(tmp_path, kwargs, shape):
    dm = DiffusionDataModule(**kwargs, batch_size=32, cache_dir=str(tmp_path))
    assert dm.sample_shape == shape  # known before setup: the CLI links it into the model
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, *shape) and batch.dtype == torch.float32
    if len(shape) == 3:
        assert batch.min() >= -1 and batch.max() <= 1
    assert dm.reference_samples(16).shape == (16, *shape)


def _write_pngs(folder, n=6, size=12):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_and_parquet_are_resized_to_the_config(tmp_path):
    _write_pngs(tmp_path / "imgs" / "train")
    dm = DiffusionDataModule(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=8, channels=1,
                             batch_size=4, val_fraction=0.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 8, 8) and -1 <= batch.min() and batch.max() <= 1

    images = [Image.open(tmp_path / "imgs" / "train" / f"{i}.png") for i in range(6)]
    Dataset.from_dict({"img": images}).to_parquet(str(tmp_path / "d.parquet"))
    dm = DiffusionDataModule(dataset="parquet", data_files=str(tmp_path / "d.parquet"), image_column="img",
                             image_size=4, channels=3, batch_size=2, val_fraction=0.0)
    dm.setup()
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 4, 4)


def test_missing_image_column_names_the_columns(tmp_path):
    _write_pngs(tmp_path / "imgs" / "train")
    dm = DiffusionDataModule(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=8, channels=1,
                             image_column="pixels")
    with pytest.raises(ValueError, match="image_column.*'pixels'.*image"):
        dm.setup()


def test_hub_dataset_needs_shape_and_fails_clearly_offline():
    with pytest.raises(ValueError, match="image_size and data.channels"):
        DiffusionDataModule(dataset="mnist")
    dm = DiffusionDataModule(dataset="surely-not-a-dataset/xyz", image_size=28, channels=1)
    with pytest.raises(ValueError, match="could not load"):
        dm.setup()
