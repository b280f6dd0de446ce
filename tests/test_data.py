import pickle
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.callbacks import Callback
from PIL import Image

from specdiff_train.data import TOY2D, DiffusionDataModule, digits_dataset, make_toy2d, toy2d_dataset
from specdiff_train.nets.classifier import digits_images


@pytest.mark.parametrize("name", TOY2D)
def test_toy2d_is_deterministic_and_unit_scale(name):
    a, b = make_toy2d(name, 2000, seed=3), make_toy2d(name, 2000, seed=3)
    assert a.shape == (2000, 2) and np.array_equal(a, b)
    assert not np.array_equal(a, make_toy2d(name, 2000, seed=4))
    assert 0.3 < a.std() < 3


def test_unknown_toy_name_lists_the_choices():
    with pytest.raises(ValueError, match="data.name.*8gaussians"):
        DiffusionDataModule(dataset="toy2d", name="spiral")
    with pytest.raises(ValueError, match="unknown toy distribution 'spiral'.*swissroll"):
        make_toy2d("spiral", 10)
    assert toy2d_dataset("moons", 10).column_names == ["x", "label"]


def test_digits_are_cached_and_reloaded(tmp_path):
    first = digits_dataset(tmp_path)
    assert len(first) == 1797 and (tmp_path / "digits" / "dataset_info.json").exists()
    again = digits_dataset(tmp_path)
    assert again.cache_files and again.cache_files[0]["filename"].startswith(str(tmp_path / "digits"))
    assert again["label"][:20] == first["label"][:20] and np.array(again["image"]).max() == 16


def test_a_digits_cache_in_an_older_format_is_rebuilt(tmp_path):
    Dataset.from_dict({"image": [[[255] * 8] * 8], "label": [0]}).save_to_disk(str(tmp_path / "digits"))
    assert len(digits_dataset(tmp_path)) == 1797 and len(digits_dataset(tmp_path)) == 1797


def test_digits_batches_are_the_pixel_values_rescaled_exactly(tmp_path):
    dm = DiffusionDataModule(dataset="digits", val_fraction=0.0, batch_size=1797, cache_dir=str(tmp_path))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    expected = digits_images()[0]  # 0..16 -> x / 8 - 1, what the feature network was trained on
    assert sorted(map(tuple, batch.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))


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
    pickle.dumps(dm.train_dataloader().dataset)  # DataLoader workers need to pickle it


def test_split_is_deterministic_in_the_seed_and_val_is_not_shuffled():
    def split(seed):
        dm = DiffusionDataModule(dataset="toy2d", num_samples=200, val_fraction=0.1, batch_size=8, seed=seed)
        dm.setup()
        return dm

    a, b, c = split(0), split(0), split(1)
    val_a = torch.cat(list(a.val_dataloader()))
    assert val_a.shape == (20, 2) and torch.equal(val_a, torch.cat(list(a.val_dataloader())))
    assert torch.equal(val_a, torch.cat(list(b.val_dataloader())))
    assert not torch.equal(val_a, torch.cat(list(c.val_dataloader())))
    train = torch.cat(list(a.train_dataloader()))
    assert not (train[:, None] == val_a[None]).all(-1).any()  # disjoint
    assert torch.equal(a.reference_samples(10, seed=2), b.reference_samples(10, seed=2))
    assert a.reference_samples(50).shape == (50, 2)  # more than the val split: drawn from train


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


def test_save_to_disk_folders_load_with_their_split(tmp_path):
    images = [Image.new("RGB", (6, 6), (255, 0, 0))] * 4
    DatasetDict({"test": Dataset.from_dict({"image": images})}).save_to_disk(str(tmp_path / "dd"))
    dm = DiffusionDataModule(dataset="disk", data_dir=str(tmp_path / "dd"), split="test", image_size=4, channels=3,
                             val_fraction=0.0, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 4, 4)
    torch.testing.assert_close(batch[:, :, 1, 1], torch.tensor([[1.0, -1.0, -1.0]] * 4))
    with pytest.raises(ValueError, match="data.data_dir"):
        DiffusionDataModule(dataset="disk", image_size=4, channels=3).setup()


def test_missing_image_column_names_the_columns(tmp_path):
    _write_pngs(tmp_path / "imgs" / "train")
    dm = DiffusionDataModule(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=8, channels=1,
                             image_column="pixels")
    with pytest.raises(ValueError, match="image_column.*'pixels'.*image"):
        dm.setup()


def test_hub_dataset_needs_shape_and_fails_clearly_offline(monkeypatch):
    with pytest.raises(ValueError, match="image_size and data.channels"):
        DiffusionDataModule(dataset="mnist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = DiffusionDataModule(dataset="surely-not-a-dataset/xyz", image_size=28, channels=3)
    assert dm.sample_shape == (3, 28, 28)  # known without loading anything
    with pytest.raises(ValueError, match="could not load.*HF_HUB_OFFLINE.*imagefolder"):
        dm.prepare_data()


def test_an_unknown_dataset_name_is_refused_as_such(monkeypatch):
    """A typo is refused as an unknown name (with a suggestion) before any image-size demand; a name the
    hub has, or that cannot be checked offline and is not close to a known one, still gets the size demand."""
    from specdiff_train.data import datamodule

    with pytest.raises(ValueError, match=r"data.dataset: unknown dataset 'toy3d'. Did you mean 'toy2d'\?.*local Hugging Face cache"):
        DiffusionDataModule(dataset="toy3d")  # offline (conftest): the hub is not asked
    monkeypatch.setattr(datamodule, "hub_dataset_status", lambda name: "absent")
    with pytest.raises(ValueError, match="unknown dataset 'cifar-tenn'.*not on the Hugging Face hub"):
        DiffusionDataModule(dataset="cifar-tenn")
    monkeypatch.setattr(datamodule, "hub_dataset_status", lambda name: "hub")
    with pytest.raises(ValueError, match="image_size and data.channels: required for dataset='toy3d'"):
        DiffusionDataModule(dataset="toy3d")


class _Record(Callback):
    """Records each training step's first row; raises KeyboardInterrupt (Ctrl-C) before step `stop_at`."""

    def __init__(self, stop_at=None):
        self.rows, self.stop_at = {}, stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.stop_at:
            raise KeyboardInterrupt
        self.rows[trainer.global_step] = batch[0].tolist()


@pytest.mark.parametrize("stop_at", [17, 21])  # mid-epoch (11 batches an epoch)
def test_an_interrupted_run_resumes_with_the_same_data_order(tmp_path, stop_at):
    """Ctrl-C in the middle of an epoch saves last.ckpt; the resumed run trains on exactly the batches an
    uninterrupted run would have (rest of the epoch, then the next epochs), with no "not resumable" warning."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers import TinyDenoiser
    from specdiff_train.models import TargetDiffusion

    def fit(root, record, ckpt_path=None):
        data = DiffusionDataModule(num_samples=200, batch_size=16)  # 190 training rows: 11 batches an epoch
        trainer = Trainer(default_root_dir=root, max_steps=30, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1,
                          callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True, save_on_exception=True)])
        trainer.fit(TargetDiffusion(TinyDenoiser(hidden=8), val_num_samples=0), data, ckpt_path=ckpt_path)

    fit(tmp_path / "a", straight := _Record())
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, after the checkpoint
        fit(tmp_path / "b", first := _Record(stop_at=stop_at))
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == stop_at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "b", resumed := _Record(), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert sorted(resumed.rows) == list(range(stop_at, 30))
    assert {**first.rows, **resumed.rows} == straight.rows
