"""Plain DDPM ancestral sampling: the baseline that speculative sampling must reproduce exactly."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .diffusion import DDPMSchedule
from .noise import Stream, as_seed_tensor, gaussian

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_device_dtype(model, device=None, dtype=None):
    """The device/dtype to sample on: explicit arguments win, else the model's first parameter."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    return device, dtype


def initial_noise(seeds: torch.Tensor, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """x_T for each seed; shared by ancestral and speculative sampling so that both start alike."""
    return gaussian(seeds, 0, Stream.INIT, shape, dtype=dtype)


@torch.no_grad()
def ancestral_sample(
    model: Denoiser,
    schedule: DDPMSchedule,
    shape: Sequence[int],
    *,
    num_steps: int,
    seeds: Sequence[int],
    batch_size: int | None = None,
    device=None,
    dtype=None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw one sample per seed with the DDPM ancestral sampler.

    Args:
        model: `model(x, t)` maps states (B, *shape) and integer train timesteps (B,) to the
            prediction of `schedule.prediction` type.
        schedule: the noise schedule the model was trained with.
        shape: one sample's shape, e.g. (2,) or (1, 8, 8).
        num_steps: number of (respaced) sampling steps, at most `schedule.num_train_steps`.
        seeds: one int per sample; a sample depends only on its seed.
        batch_size: evaluate at most this many chains at once (default: all).
        device, dtype: where to sample (default: the model's).
        progress: show a progress bar.

    Returns:
        Tensor (len(seeds), *shape), rows in the order of `seeds`.
    """
    plan = schedule.plan(num_steps)
    device, dtype = model_device_dtype(model, device, dtype)
    seeds_t = as_seed_tensor(seeds)
    batch_size = batch_size or len(seeds_t)
    outputs = []
    bar = tqdm(total=len(seeds_t) * plan.num_steps, disable=not progress, desc="ancestral", unit="step")
    for chunk in seeds_t.split(batch_size):
        x = initial_noise(chunk, shape).to(device=device, dtype=dtype)
        for k in range(plan.num_steps):
            steps = torch.full((len(chunk),), k, dtype=torch.int64, device=device)
            output = model(x, plan.t(steps))
            mean, std = plan.transition(x, steps, output)
            if plan.std[k] > 0:
                noise = gaussian(chunk, k, Stream.STEP, shape).to(device=device, dtype=dtype)
                x = mean + std[0].to(dtype) * noise
            else:
                x = mean
            bar.update(len(chunk))
        outputs.append(x)
    bar.close()
    return torch.cat(outputs)
