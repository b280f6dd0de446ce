"""Learning-rate schedules whose length is the run's length.

A schedule with a fixed horizon (torch's `CosineAnnealingLR(T_max=...)`) is only right for the run
it was written for: `--trainer.max_steps 10000` with `T_max: 3000` sends the learning rate back up
after step 3000, and `max_steps -1` makes it oscillate. An omegaconf interpolation
(`T_max: ${trainer.max_steps}`) does not help, since it is resolved when the file loads, before any
command-line override. `CosineToEndLR` takes its horizon from the trainer instead
(`trainer.estimated_stepping_batches`, set by `TargetDiffusion.configure_optimizers`), and
`follow_run_length` warns about the fixed horizons of torch's schedulers when they differ from the run.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

# torch schedulers with a fixed horizon: class name -> the attribute holding it
FIXED_HORIZONS = {"CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps", "PolynomialLR": "total_iters"}


class CosineToEndLR(LRScheduler):
    """Optional linear warm-up, then cosine decay from the base learning rate to `eta_min` at the
    last optimizer step of the run.

    Args:
        optimizer: the optimizer (given by the LightningModule).
        eta_min: learning rate at the end of the run.
        warmup_steps: optimizer steps of linear warm-up from base_lr / warmup_steps to base_lr.
        total_steps: the horizon in optimizer steps; None (the default) takes the run's length, the
            trainer's `estimated_stepping_batches` (from `trainer.max_steps`, or `max_epochs`), as
            resolved after command-line overrides. Stepping past the horizon keeps `eta_min`.
        last_epoch: as torch's schedulers (-1: start from the beginning).

    The horizon is not saved in the scheduler's state: a run resumed with another `trainer.max_steps`
    decays over the new length (the learning rate follows the longer cosine from the resumed step).
    """

    _config = ("eta_min", "warmup_steps", "total_steps", "horizon")

    def __init__(self, optimizer: torch.optim.Optimizer, eta_min: float = 0.0, warmup_steps: int = 0,
                 total_steps: int | None = None, last_epoch: int = -1):
        if eta_min < 0:
            raise ValueError(f"lr_scheduler.eta_min: expected >= 0, got {eta_min}")
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps: expected >= 0, got {warmup_steps}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"lr_scheduler.total_steps: expected >= 1 or null (the run's length), got {total_steps}")
        self.eta_min, self.warmup_steps, self.total_steps = float(eta_min), int(warmup_steps), total_steps
        self.horizon: int | None = total_steps
        super().__init__(optimizer, last_epoch)

    def follow_run(self, run_steps: float) -> int:
        """Take the run's length (optimizer steps) as the horizon unless `total_steps` was given; returns it."""
        if self.total_steps is None:
            if not math.isfinite(run_steps) or run_steps < 1:
                raise ValueError(
                    "model.init_args.lr_scheduler: CosineToEndLR decays over the run's length, but this run has none "
                    f"(trainer.estimated_stepping_batches = {run_steps}: max_steps -1 and max_epochs -1?). Set "
                    "--trainer.max_steps N (or max_epochs), or give lr_scheduler.init_args.total_steps."
                )
            self.horizon = int(run_steps)
        return int(self.horizon)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at optimizer step `step` (0-based), for eta_min = 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.horizon is None:
            if step == self.warmup_steps:
                return 1.0
            raise RuntimeError("CosineToEndLR stepped before it knew the run's length: call follow_run(total_steps) "
                               "first (TargetDiffusion.configure_optimizers does), or give total_steps")
        span = max(1, self.horizon - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        if self.last_epoch < self.warmup_steps:
            return [base * f for base in self.base_lrs]
        return [self.eta_min + (base - self.eta_min) * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        # The options come from the config, the horizon from the run: neither is restored on resume.
        return {k: v for k, v in super().state_dict().items() if k not in self._config}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._config})


def follow_run_length(scheduler: Any, run_steps: float | None) -> str | None:
    """Give a `CosineToEndLR` the run's length; for torch schedulers with a fixed horizon, return a
    warning when it differs from the run's length (None when all is well or nothing can be said)."""
    if isinstance(scheduler, CosineToEndLR):
        scheduler.follow_run(run_steps if run_steps is not None else float("inf"))
        return None
    name = type(scheduler).__name__
    attr = FIXED_HORIZONS.get(name)
    if attr is None or run_steps is None:
        return None
    fixed = getattr(scheduler, attr, None)
    if fixed is None:
        return None
    fix = ("Use class_path specdiff_train.optim.CosineToEndLR (it decays over the run's length, however "
           f"trainer.max_steps is set), or set lr_scheduler.init_args.{attr} to the run's length.")
    if not math.isfinite(run_steps):
        return (f"model.init_args.lr_scheduler: {name} has {attr}={fixed}, but this run has no fixed length "
                f"(trainer.max_steps -1): past step {fixed} the learning rate no longer follows a planned decay. {fix}")
    run = int(run_steps)
    if run < int(fixed):
        what = f"stops at step {run}, before reaching its final value (at step {fixed})"
    elif run > int(fixed):
        what = {"CosineAnnealingLR": f"rises again after step {fixed}",
                "OneCycleLR": f"runs out after step {fixed} (torch then raises an error)"}.get(
            name, f"stays at its final value from step {fixed} on")
    else:
        return None
    return (f"model.init_args.lr_scheduler: {name} has {attr}={fixed}, but this run takes {run} optimizer steps "
            f"(trainer.max_steps / max_epochs): the learning rate {what}. {fix}")
