"""Deterministic ODE solvers through diffusers' schedulers, over our DDPM-trained targets.

What users would pick instead of speculative sampling: fewer steps of a fast solver. `solver_sample`
runs diffusers' `DDIMScheduler` (eta = 0) or `DPMSolverMultistepScheduler` (DPM-Solver++(2M)) on the
betas and parametrisation of a `DDPMSchedule`, from the same initial noise per seed as
`ancestral_sample`, so samplers compared on the same seeds start alike.

- "ddim": `DDIMScheduler(timestep_spacing="leading", set_alpha_to_one=True)`, as our `DDIM(eta=0)` chain
  (equal step for step, tested), with the schedule's clipping.
- "dpm-solver++": diffusers' defaults for DPM-Solver++(2M): second order, "linspace" timesteps,
  first-order last step. It has no x0 clipping (diffusers offers dynamic thresholding only), so it runs
  unclipped on a clipping schedule, with a warning.

diffusers is an optional dependency (`pip install -e ".[diffusers]"`).
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from ..diffusion import DDPMSchedule
from ..models.diffusers_target import BETA_SCHEDULES, PREDICTIONS
from ..sampling import check_sample_shape, conditioning, initial_noise, model_device_dtype, state_dtype

SOLVERS = ("ddim", "dpm-solver++")
# Our schedule's names -> diffusers' (the inverse of what loading a diffusers pipeline maps).
_PREDICTION_TYPES = {ours: theirs for theirs, ours in PREDICTIONS.items()}
_BETA_SCHEDULES = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
INSTALL_HINT = 'the solvers run through diffusers: pip install -e ".[diffusers]"'


def check_solver(solver: str, schedule) -> None:
    """One-line ValueError for an unknown solver or a schedule diffusers' DDPM-family solvers cannot run."""
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if not isinstance(schedule, DDPMSchedule):
        raise ValueError(f"solver {solver!r}: diffusers' solvers run DDPM-trained targets; this target's schedule is "
                         f"{type(schedule).__name__} (sample it with its own chains, specdiff_train.chains)")


def diffusers_scheduler(solver: str, schedule: DDPMSchedule, num_steps: int):
    """A fresh diffusers scheduler (it keeps per-run state) for `schedule`, set to `num_steps` steps."""
    check_solver(solver, schedule)
    if not isinstance(num_steps, int) or not 1 <= num_steps <= schedule.num_train_steps:
        raise ValueError(f"num_steps: expected an int in [1, {schedule.num_train_steps}] for {solver!r}, "
                         f"got {num_steps!r}")
    try:
        import diffusers
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    common = dict(num_train_timesteps=schedule.num_train_steps, beta_start=schedule.beta_start,
                  beta_end=schedule.beta_end, beta_schedule=_BETA_SCHEDULES[schedule.beta_schedule],
                  prediction_type=_PREDICTION_TYPES[schedule.prediction])
    if solver == "ddim":
        scheduler = diffusers.DDIMScheduler(**common, clip_sample=schedule.clip_denoised,
                                            clip_sample_range=schedule.clip_range, set_alpha_to_one=True,
                                            steps_offset=0, timestep_spacing="leading")
    else:
        if schedule.clip_denoised:
            warnings.warn("dpm-solver++ does not clip its x0 estimates (diffusers offers dynamic thresholding "
                          "only); this clipping schedule's target runs unclipped", stacklevel=3)
        scheduler = diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _solve(model, scheduler, solver: str, x: torch.Tensor, model_dtype) -> torch.Tensor:
    step_kwargs = dict(eta=0.0) if solver == "ddim" else {}
    for t in scheduler.timesteps:
        times = t.to(x.device).expand(len(x))
        output = model(scheduler.scale_model_input(x, t).to(model_dtype), times).to(x.dtype)
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def solver_sample(model, schedule: DDPMSchedule, shape: Sequence[int], *, solver: str, num_steps: int,
                  seeds: Sequence[int], batch_size: int | None = None, device=None, dtype=None,
                  return_time: bool = False):
    """One sample per seed from a deterministic solver of the probability-flow ODE.

    Args:
        model: `model(x, t)` with DDPM train timesteps t (B,), predicting `schedule.prediction`.
        schedule: the target's `DDPMSchedule`.
        shape: one sample's shape.
        solver: "ddim" (eta = 0) or "dpm-solver++" (2M).
        num_steps: solver steps = sequential target calls per sample.
        seeds: one int per sample; the initial noise is `ancestral_sample`'s for the same seed.
        batch_size: at most this many samples at once (default: all).
        device, dtype: as for `ancestral_sample`.
        return_time: also return the wall-clock seconds of the sampling.

    Returns:
        Tensor (len(seeds), *shape) in the order of seeds; with `return_time`, (samples, seconds).
    """
    check_solver(solver, schedule)
    shape = check_sample_shape(model, shape)
    device, model_dtype = model_device_dtype(model, device, dtype)
    dtype = state_dtype(model_dtype)
    seeds_t = conditioning(model, seeds, None, 1.0, device)[0]
    start = time.perf_counter()
    parts = []
    for chunk in seeds_t.split(batch_size or max(len(seeds_t), 1)):
        scheduler = diffusers_scheduler(solver, schedule, num_steps)
        x = initial_noise(chunk, shape).to(dtype=dtype) * scheduler.init_noise_sigma
        parts.append(_solve(model, scheduler, solver, x, model_dtype))
    samples = torch.cat(parts)
    return (samples, time.perf_counter() - start) if return_time else samples
