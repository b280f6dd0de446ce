"""The target diffusion model: a LightningModule that trains a denoiser with the DDPM loss.

It only wires things together: the maths lives in `diffusion.py`, sampling in `sampling.py`,
pictures in `plotting.py`. EMA is Lightning's `EMAWeightAveraging` callback (configured in YAML):
it swaps the EMA weights in for validation, so the validation loss and the sample plots use them,
and checkpoints keep both (`state_dict` = EMA, `current_model_state` = raw).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .. import plotting
from ..config_io import (
    INSTANTIATOR,
    build_module,
    callable_config,
    class_path,
    config_mismatch,
    module_config,
    plain,
    resolve_class,
    state_dict_mismatch,
)
from ..diffusion import DDPMSchedule, Schedule
from ..guidance import NULL_LABEL, class_grid_labels
from ..optim import follow_run_length
from ..sampling import ancestral_sample

LOSS_WEIGHTINGS = ("none", "min_snr")


try:  # private to Lightning: without it, configs are recovered from the objects instead
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover
    _given_hyperparameters = None


def _cli_config(cls: type) -> dict | None:
    """The config LightningCLI is instantiating `cls` from, or None (built from Python, or nested in
    the construction of another CLI-built module, e.g. a drafter loading its target)."""
    given = _given_hyperparameters.get() if _given_hyperparameters is not None else None
    if isinstance(given, Mapping) and resolve_class(str(given.get("_class_path", ""))) is cls:
        return dict(given)
    return None


@contextmanager
def _foreign_cli_config_hidden(hide: bool):
    """Keep `save_hyperparameters` from taking the CLI config of another module being built."""
    token = _given_hyperparameters.set(None) if hide and _given_hyperparameters is not None else None
    try:
        yield
    finally:
        if token is not None:
            _given_hyperparameters.reset(token)


def split_batch(batch, num_classes: int, check_range: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data, labels or None) of a batch for a target with `num_classes` (0: unconditional, labels ignored).
    Our data modules yield tensors, or (data, labels) with a label column; TensorDataset-style loaders
    yield 1-tuples. One-line errors when a conditional target gets no labels or labels out of range."""
    data, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
    if num_classes == 0:
        return data, None
    if labels is None:
        raise ValueError(f"data.label_column: the target is conditional (num_classes={num_classes}) but the batches "
                         "carry no labels; set data.label_column (e.g. label), or use an unconditional target")
    if check_range:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"data.label_column: labels from {low} to {high} do not fit the net's "
                             f"num_classes={num_classes}; set the net's num_classes to the dataset's classes")
    return data, labels.long()


class TargetDiffusion(LightningModule):
    """A denoiser trained with its schedule's loss (DDPM: the simple MSE loss; EDM; flow matching).

    Args:
        net: the denoiser, `net(x, t)` -> prediction shaped like x (and `net(x, t, return_features=True)`
            -> (prediction, features)). From Python it may also be a config dict
            `{"class_path": ..., "init_args": {...}}`, which is then instantiated.
        schedule: the training parametrisation (default: `DDPMSchedule()`: 1000 linear steps, eps):
            `DDPMSchedule`, `edm.EDMSchedule` (EDM preconditioning and loss) or `flow.FlowSchedule`
            (rectified-flow velocity loss); sampled by the chains that fit it (`chains.py`).
        optimizer: builds the optimizer from the parameters (default AdamW).
        lr_scheduler: builds an LR scheduler from the optimizer; stepped every optimizer step.
            `specdiff_train.optim.CosineToEndLR` decays over the run's length (trainer.max_steps as
            finally set); a fixed horizon (CosineAnnealingLR's T_max) that differs from it is warned about.
        sample_shape: one sample's shape; linked from `data.sample_shape` by the CLI, else taken from
            `net.sample_shape`.
        val_num_steps: sampling steps of the validation sample plot.
        val_num_samples: samples in the validation plot (0 turns the plot off).
        val_seed: first seed of the validation samples (seeds val_seed .. val_seed + val_num_samples - 1),
            and the seed of the validation-loss noise, so both are comparable across epochs.
        loss_weighting: "none" (plain MSE on the prediction) or "min_snr" (Min-SNR-5 weighting).
        p_uncond: for a conditional net (`net.num_classes > 0`), the probability that a training label is
            replaced by the null label (label dropout), which trains the unconditional prediction that
            classifier-free guidance needs; 0 trains a conditional model that cannot be guided.
        val_guidance_scale: guidance scale of a conditional model's validation samples (one class per
            row of the grid).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        schedule: Schedule | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        sample_shape: tuple[int, ...] | None = None,
        val_num_steps: int = 100,
        val_num_samples: int = 512,
        val_seed: int = 0,
        loss_weighting: str = "none",
        p_uncond: float = 0.1,
        val_guidance_scale: float = 1.0,
    ):
        super().__init__()
        if not 0 <= p_uncond < 1:
            raise ValueError(f"model.p_uncond: expected a probability in [0, 1), got {p_uncond!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if isinstance(net, Mapping):
            net_record, net = plain(net), build_module(net)
        else:
            net_record = None
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"model.net: expected a torch.nn.Module, got {type(net).__name__}")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"model.schedule: expected a DDPMSchedule, edm.EDMSchedule or flow.FlowSchedule, got "
                            f"{type(schedule).__name__}")
        self.net = net
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        if loss_weighting != "none":
            self.schedule.loss_weights(torch.zeros(1, dtype=torch.long), loss_weighting)  # refused outside DDPM
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.sample_shape = self._check_sample_shape(sample_shape, net)
        self.val_num_steps = val_num_steps
        self.val_num_samples = val_num_samples
        self.val_seed = val_seed
        self.loss_weighting = loss_weighting
        self.p_uncond, self.val_guidance_scale = float(p_uncond), float(val_guidance_scale)
        self._record_hparams(net_record)
        self._reference: torch.Tensor | None = None
        self._labels_checked = False
        self._loaded_at: tuple[int, int] | None = None  # (epoch, global_step) of a loaded checkpoint

    # --- hyperparameters: plain data that rebuild this module (see config_io.py) ----------
    def _record_hparams(self, net_record: dict | None) -> None:
        # Under the CLI, Lightning hands `save_hyperparameters` the parsed config (plain data, with the
        # net's class_path/init_args); from Python it collects the init arguments. Objects are then
        # replaced by their configs, so checkpoints load with `weights_only=True` and rebuild alone.
        cli_config = _cli_config(type(self))
        with _foreign_cli_config_hidden(cli_config is None):
            self.save_hyperparameters(ignore=["net", "schedule", "optimizer", "lr_scheduler"])

        def given(key: str) -> dict | None:
            value = (cli_config or {}).get(key)
            return plain(value) if isinstance(value, Mapping) and "class_path" in value else None

        record: dict[str, Any] = {
            "_class_path": class_path(self),
            "_instantiator": INSTANTIATOR,
            "net": net_record or given("net") or module_config(self.net),
            "schedule": {"class_path": class_path(self.schedule), "init_args": self.schedule.config()},
            "optimizer": given("optimizer") or callable_config(self.optimizer),
            "lr_scheduler": given("lr_scheduler") or callable_config(self.lr_scheduler),
            "sample_shape": list(self.sample_shape) if self.sample_shape is not None else None,
        }
        if record["net"] is None:
            rank_zero_warn(
                f"TargetDiffusion: cannot record how to rebuild {type(self.net).__name__} (its constructor arguments "
                "are not attributes of the same name); checkpoints will need the net given again. Pass `net` as "
                "{'class_path': ..., 'init_args': {...}} or train through the CLI to record it."
            )
        if self.lr_scheduler is not None and record["lr_scheduler"] is None:
            record.pop("lr_scheduler")  # a lambda: not recordable, and not needed to sample
        if record["optimizer"] is None:
            record.pop("optimizer")
        self.save_hyperparameters(record)

    @staticmethod
    def _check_sample_shape(sample_shape, net) -> tuple[int, ...] | None:
        net_shape = getattr(net, "sample_shape", None)
        shape = sample_shape if sample_shape is not None else net_shape
        if shape is None:
            return None
        shape = tuple(int(s) for s in shape)
        if net_shape is not None and tuple(net_shape) != shape:
            raise ValueError(
                f"model.sample_shape: the data gives samples of shape {shape} but the net "
                f"{type(net).__name__} expects {tuple(net_shape)}; set the net's size/channels to match the data"
            )
        return shape

    def __deepcopy__(self, memo: dict) -> "TargetDiffusion":
        # EMAWeightAveraging deep-copies the module. The optimizer / scheduler factories are stateless
        # and, when built by the CLI, hold jsonargparse's instantiator, hence the CLI and its trainer
        # (thread locks under DDP): share them instead of copying them.
        for factory in (self.optimizer, self.lr_scheduler):
            memo[id(factory)] = factory
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))  # __getstate__ drops the trainer
        return clone

    # --- the denoiser contract ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes of a conditional target (0: unconditional): the net's."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        """The prediction at states x (B, *shape), schedule times t (B,) (DDPM: train timesteps; EDM: sigma;
        flow matching: t in [0, 1]) and, for a conditional target, labels (B,) (`guidance.NULL_LABEL` or None:
        unconditional rows). The schedule's preconditioning wraps the network (EDM: D = c_skip x + c_out F)."""
        return self.schedule.predict(self.net, x, t, labels, return_features)

    # --- training -----------------------------------------------------------------------------------
    def diffusion_loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels=None) -> torch.Tensor:
        x_t = self.schedule.q_sample(x0, t, noise)
        target = self.schedule.training_target(x0, noise, t)
        per_sample = (self(x_t, t, labels=labels) - target).pow(2).flatten(1).mean(dim=1)
        weight = self.schedule.loss_weights(t, self.loss_weighting)
        return per_sample.mean() if weight is None else (weight * per_sample).mean()

    def _data(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, labels or None) of a batch (`split_batch`); the labels' range is checked on the first batch."""
        data, labels = split_batch(batch, self.num_classes, check_range=not self._labels_checked)
        self._labels_checked = True
        return data, labels

    def _drop_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Label dropout: each label becomes the null label with probability p_uncond."""
        if labels is None or self.p_uncond == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
        return labels.masked_fill(drop, NULL_LABEL)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0, labels = self._data(batch)
        t = self.schedule.sample_timesteps(x0.shape[0], device=x0.device)
        loss = self.diffusion_loss(x0, t, torch.randn_like(x0), self._drop_labels(labels))
        self._stop_if_not_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=x0.shape[0])
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            # Decided on all ranks together, so no DDP rank is left waiting in backward's all-reduce.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(
                f"train/loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}): training "
                "diverged. Lower the learning rate (model.init_args.optimizer.init_args.lr), or check the data for "
                "NaN/inf values."
            )

    def _eval_loss(self, batch, batch_idx: int) -> tuple[torch.Tensor, int]:
        x0, labels = self._data(batch)
        # Fixed noise and timesteps per batch: the validation loss is comparable across epochs.
        gen = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx * 101 + self.global_rank)
        t = self.schedule.sample_timesteps(x0.shape[0], generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(device=x0.device, dtype=x0.dtype)
        return self.diffusion_loss(x0, t, noise, labels), x0.shape[0]  # conditional loss: no label dropout

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, n = self._eval_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, n = self._eval_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        # Schedules follow the run's real length (after command-line overrides): CosineToEndLR takes it,
        # a fixed horizon that differs from it is reported.
        run_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        problem = follow_run_length(scheduler, run_steps)
        if problem:
            rank_zero_warn(problem)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config = {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"}
        else:
            config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": config}

    # --- validation samples -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # Lightning runs callbacks' hooks before the module's: EMAWeightAveraging has swapped the EMA
        # weights in at this point, and swaps them out again in its on_validation_epoch_end, before
        # the module's hook would run. So the samples are drawn here, with the EMA weights.
        trainer = self.trainer
        if trainer.sanity_checking or trainer.fast_dev_run or self.val_num_samples <= 0:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"  # a collective: all ranks
        if trainer.is_global_zero:
            self.plot_samples(out_dir)

    def validation_labels(self, num_samples: int | None = None) -> list[int] | None:
        """The validation samples' labels: classes in order (`guidance.class_grid_labels`), or None."""
        n = num_samples or self.val_num_samples
        return class_grid_labels(n, self.num_classes) if self.num_classes > 0 else None

    def draw_samples(self, num_samples: int | None = None, num_steps: int | None = None) -> torch.Tensor:
        """Validation samples with the current weights (EMA during validation), seeds from `val_seed`; a
        conditional target's are `validation_labels`, guided by `val_guidance_scale`."""
        if self.sample_shape is None:
            raise ValueError("model.sample_shape is unknown: give it, or use a net or data module that knows it")
        n = num_samples or self.val_num_samples
        seeds = list(range(self.val_seed, self.val_seed + n))
        labels = self.validation_labels(n)
        return ancestral_sample(self, self.schedule, self.sample_shape, num_steps=num_steps or self.val_num_steps,
                                seeds=seeds, labels=labels, guidance_scale=1.0 if labels is None else self.val_guidance_scale)

    def plot_samples(self, out_dir: str | Path) -> Path:
        """Draw the validation samples, write `out_dir/epoch=NNN-step=NNNNNN.png`, log it as an image."""
        samples = self.draw_samples().float().cpu()
        # Outside fit (validate/test --ckpt_path) the trainer's counters are 0: name the checkpoint's.
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        epoch, step = (self.current_epoch, self.global_step) if fitting or not self._loaded_at else self._loaded_at
        path = Path(out_dir) / f"epoch={epoch:03d}-step={step:06d}.png"
        title = (f"{type(self.net).__name__}: {len(samples)} samples, {self.val_num_steps} steps, "
                 f"epoch {epoch}, step {step}")
        labels = self.validation_labels(len(samples))
        if labels is not None:
            title += f", guidance {self.val_guidance_scale:g}, " + ("one class per row" if samples.dim() == 4 else "colour: class")
        image = plotting.plot_samples(samples, path, title, reference=self._reference_samples(len(samples)),
                                      labels=labels)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("val/samples", image, self.global_step, dataformats="HWC")
        return path

    def _reference_samples(self, n: int) -> torch.Tensor | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.sample_shape != (2,) or not hasattr(datamodule, "reference_samples"):
            return None
        if self._reference is None or len(self._reference) != n:
            self._reference = datamodule.reference_samples(n, seed=self.val_seed).float().cpu()
        return self._reference

    # --- checkpoints --------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another network or schedule with a message naming what differs
        (instead of torch's long `load_state_dict` error)."""
        self._loaded_at = (int(checkpoint.get("epoch") or 0), int(checkpoint.get("global_step") or 0))
        where = getattr(self._trainer, "ckpt_path", None) or "being loaded"
        hparams = checkpoint.get("hyper_parameters") or {}
        problems = state_dict_mismatch(checkpoint.get("state_dict", {}), self.state_dict())
        saved_schedule = hparams.get("schedule")
        if isinstance(saved_schedule, Mapping) and saved_schedule.get("class_path") not in (None, class_path(self.schedule)):
            problems.append(f"schedule: {saved_schedule.get('class_path')} != {class_path(self.schedule)}")
        elif isinstance(saved_schedule, Mapping):
            problems += config_mismatch(saved_schedule.get("init_args", {}), self.schedule.config(), "schedule")
        if not problems:
            return
        net_diff = []
        if isinstance(hparams.get("net"), Mapping) and isinstance(self.hparams.get("net"), Mapping):
            net_diff = config_mismatch(hparams["net"], self.hparams["net"], "net")
        raise ValueError(
            f"checkpoint {where!r} does not fit this model: " + "; ".join(net_diff + problems)
        )
