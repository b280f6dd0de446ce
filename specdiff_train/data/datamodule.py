"""The LightningDataModule behind every config: toy 2-D data, bundled digits, or any image dataset."""
from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .digits import DIGITS_MAX, digits_dataset
from ..errors import suggest
from .images import LOCAL_BUILDERS, ImageRowConverter, check_column, hub_dataset_status, load_image_dataset
from .toy2d import TOY2D, TOY2D_CLASSES, toy2d_dataset

BUILTIN = ("toy2d", "digits")


class _Rows(Dataset):
    """Rows of a tensor (or of a tuple of tensors: (data, labels)), or of a `datasets.Dataset` converted
    one image at a time."""

    def __init__(self, source, indices: torch.Tensor, convert=None):
        """Args: a tensor or Dataset, the row indices to serve, and an optional row converter."""
        self.source, self.indices, self.convert = source, indices, convert

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        if isinstance(self.source, tuple):
            return tuple(column[index] for column in self.source)
        row = self.source[index]
        return self.convert(row) if self.convert else row


KNOWN = (*BUILTIN, *LOCAL_BUILDERS, "disk")


def check_dataset_name(dataset: str) -> None:
    """Refuse a dataset name that is neither bundled, local, a folder nor (as far as can be told) a hub
    dataset, with a suggestion, before asking for the image size of a dataset that does not exist."""
    if dataset in KNOWN:
        return
    status = hub_dataset_status(dataset)
    hint = suggest(dataset, KNOWN)
    if status == "absent" or (status == "unknown" and hint):
        hub = ("not on the Hugging Face hub" if status == "absent" else
               "not in the local Hugging Face cache (offline or unreachable: the hub was not asked)")
        raise ValueError(
            f"data.dataset: unknown dataset {dataset!r}.{hint} It is not bundled ({', '.join(BUILTIN)}), not a "
            f"local builder ({', '.join(KNOWN[len(BUILTIN):])}), not a folder, and {hub}. A hub dataset also needs "
            "data.image_size and data.channels."
        )


class EpochSampler(DistributedSampler):
    """The training order: a permutation per epoch that depends only on (seed, epoch), split across
    processes (a `DistributedSampler`, so Lightning leaves it in place under DDP).

    `resume(epoch, batches_done, batch_size)` makes the next iteration skip the batches that an
    interrupted run already trained on in that epoch, so a resumed run sees the same data order as an
    uninterrupted one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        """Args: the rows, the number of processes and this one's rank, the seed of the order."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def resume(self, epoch: int, batches_done: int, batch_size: int) -> int:
        """Start at `epoch`, after the `batches_done` batches an interrupted run had trained on in it
        (nothing is skipped when that is the whole epoch); returns the number of batches skipped."""
        self.set_epoch(epoch)
        self._skip = batches_done * batch_size if 0 < batches_done < self.num_samples // batch_size else 0
        return self._skip // batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0  # only the resumed epoch is cut
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler`, with the `state_dict` / `load_state_dict` that Lightning
    looks for: a run resumed mid-epoch continues the data order where it stopped (see `EpochSampler`)."""

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"seed": sampler.seed, "num_rows": len(sampler.dataset), "num_replicas": sampler.num_replicas,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        # The position itself comes from the trainer's restored step (DiffusionDataModule.train_dataloader).
        now = self.state_dict()
        changed = [f"{k} {state.get(k)} -> {now[k]}" for k in now if state.get(k) != now[k]]
        if changed:
            rank_zero_warn(f"data: the training order differs from the interrupted run's ({', '.join(changed)}): "
                           "the resumed run does not continue where it stopped in the epoch.")


class DiffusionDataModule(LightningDataModule):
    """Training data for diffusion models; batches are float32 tensors (B, *sample_shape), or with
    `label_column`, (data, labels) with int64 labels (B,) for conditional targets.

    Args:
        dataset: "toy2d", "digits" (scikit-learn's bundled 8x8 digits), "imagefolder" (data_dir),
            "parquet" (data_files), "disk" (a `save_to_disk` folder in data_dir), or a hub name
            such as "mnist" or "uoft-cs/cifar10".
        name: the toy distribution for toy2d ("8gaussians", "moons", "checkerboard", "swissroll"),
            else the hub dataset's config name.
        num_samples: points generated for toy2d.
        data_dir: folder for imagefolder / disk datasets.
        data_files: file(s) for parquet datasets.
        split: split to load from hub and local datasets.
        image_column: column holding the images.
        label_column: column holding class labels, for conditional targets ("label" for digits, MNIST,
            CIFAR-10, imagefolder's class folders, and toy2d, whose label is a point's mixture component);
            None (default): unconditional batches without labels.
        image_size: images are resized to image_size x image_size (required for non-builtin datasets).
        channels: 1 (grayscale) or 3 (RGB) (required for non-builtin datasets).
        val_fraction: share of the data held out for validation (deterministic in `seed`).
        batch_size: per-process batch size.
        num_workers: DataLoader workers.
        seed: seed of the toy data and of the train/val split.
        cache_dir: where bundled datasets are cached (digits -> cache_dir/digits).
    """

    def __init__(
        self,
        dataset: str = "toy2d",
        name: str | None = None,
        num_samples: int = 50000,
        data_dir: str | None = None,
        data_files: str | list[str] | None = None,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str = "data",
    ):
        super().__init__()
        if dataset == "toy2d":
            name = name or "8gaussians"
            if name not in TOY2D:
                raise ValueError(f"data.name: unknown toy distribution {name!r}.{suggest(name, TOY2D)} "
                                 f"Choose one of {list(TOY2D)}")
            sample_shape = (2,)
        elif dataset == "digits":
            if image_size not in (None, 8) or channels not in (None, 1):
                raise ValueError("data.image_size / data.channels: the digits are 8x8 grayscale; leave them unset")
            sample_shape = (1, 8, 8)
        else:
            if image_size is None or channels is None:
                check_dataset_name(dataset)
                raise ValueError(
                    f"data.image_size and data.channels: required for dataset={dataset!r} "
                    "(e.g. image_size: 28, channels: 1 for MNIST; 32 and 3 for CIFAR-10)"
                )
            if channels not in (1, 3):
                raise ValueError(f"data.channels: expected 1 (grayscale) or 3 (RGB), got {channels}")
            sample_shape = (channels, image_size, image_size)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction: expected a value in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size: expected >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.dataset, self.name = dataset, name
        self.num_samples, self.data_dir, self.data_files, self.split = num_samples, data_dir, data_files, split
        self.image_column, self.image_size, self.channels = image_column, image_size, channels
        self.label_column = label_column
        self.val_fraction, self.batch_size, self.num_workers = val_fraction, batch_size, num_workers
        self.seed, self.cache_dir = seed, cache_dir
        self._sample_shape = sample_shape
        self._source = self._dataset = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, known from the arguments alone (the CLI links it into the model)."""
        return self._sample_shape

    @property
    def num_classes(self) -> int | None:
        """Classes of the label column (None without one, or when the dataset does not say)."""
        if self.label_column is None:
            return None
        if self.dataset == "toy2d":
            return TOY2D_CLASSES[self.name]
        if self.dataset == "digits":
            return 10
        self.setup()
        feature = getattr(self._dataset, "features", {}).get(self.label_column)
        return getattr(feature, "num_classes", None)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: build caches and download here, once.
        if self.dataset == "digits":
            digits_dataset(self.cache_dir)
        elif self.dataset not in BUILTIN:
            load_image_dataset(self.dataset, self.name, self.split, self.data_dir, self.data_files)

    def _load(self):
        """(source, convert): a tensor of all rows (with labels: a (data, labels) pair of tensors), or a
        Dataset with a per-row converter."""
        if self.dataset in BUILTIN:
            if self.dataset == "toy2d":
                table = toy2d_dataset(self.name, self.num_samples, self.seed)
                data = table.with_format("torch")[:]["x"].float()
            else:
                table = digits_dataset(self.cache_dir)
                data = (table.with_format("torch")[:]["image"].float() / (DIGITS_MAX / 2) - 1.0).unsqueeze(1)
            if self.label_column is None:
                return data, None
            check_column(table, self.label_column, "data.label_column", "class labels")
            return (data, table.with_format("torch")[:][self.label_column].long()), None
        data = load_image_dataset(self.dataset, self.name, self.split, self.data_dir, self.data_files)
        self._dataset = data
        check_column(data, self.image_column)
        if self.label_column is not None:
            check_column(data, self.label_column, "data.label_column", "class labels")
        return data, ImageRowConverter(self.image_column, self.image_size, self.channels, self.label_column)

    def setup(self, stage: str | None = None) -> None:
        if self._source is not None:
            return
        self._source, self._convert = self._load()
        n = len(self._source[0] if isinstance(self._source, tuple) else self._source)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        num_val = int(round(self.val_fraction * n))
        self._val_idx, self._train_idx = order[:num_val], order[num_val:]
        if len(self._train_idx) == 0:
            raise ValueError(f"data: no training rows left (dataset has {n} rows, val_fraction={self.val_fraction})")

    def _loader(self, indices: torch.Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(
            _Rows(self._source, indices, self._convert),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(indices) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch by (seed, epoch) and resumable mid-epoch (`EpochSampler`), unless batches
        and optimizer steps differ (gradient accumulation, limit_train_batches): then a plain shuffle."""
        trainer = self.trainer
        rows = _Rows(self._source, self._train_idx, self._convert)
        if trainer is not None and (trainer.accumulate_grad_batches != 1 or trainer.limit_train_batches != 1.0):
            return self._loader(self._train_idx, shuffle=True)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(rows, num_replicas=world, rank=rank, seed=self.seed)
        drop_last = sampler.num_samples >= self.batch_size
        if trainer is not None and trainer.fit_loop.restarting and drop_last:  # resuming: continue the epoch
            # Lightning's own count of the batches done in this epoch (a batch whose end hooks ran counts)
            sampler.resume(trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                           self.batch_size)
        return ResumableLoader(rows, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val_idx if len(self._val_idx) else self._train_idx[: self.batch_size], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def reference_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        """n data points (from the validation split, or the training split if it is too small)."""
        self.setup()
        pool = self._val_idx if len(self._val_idx) >= n else self._train_idx
        if len(pool) < n:
            raise ValueError(f"reference_samples: asked for {n} points, the dataset has only {len(pool)}")
        pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
        rows = _Rows(self._source, pick, self._convert)
        return torch.stack([_data_of(rows[i]) for i in range(n)]).float()

    def reference_labels(self, n: int, seed: int = 0) -> torch.Tensor:
        """The labels of `reference_samples(n, seed)`'s points (needs `label_column`)."""
        if self.label_column is None:
            raise ValueError("data.label_column: reference labels need the dataset's label column; set it")
        self.setup()
        pool = self._val_idx if len(self._val_idx) >= n else self._train_idx
        pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
        rows = _Rows(self._source, pick, self._convert)
        return torch.stack([torch.as_tensor(rows[i][1]) for i in range(n)]).long()


def _data_of(row):
    """A row's data, without its label."""
    return row[0] if isinstance(row, tuple) else row
