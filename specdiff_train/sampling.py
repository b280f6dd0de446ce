"""Plain ancestral sampling of any chain (DDPM, DDIM, EDM, flow matching): the baseline that speculative
sampling must reproduce exactly."""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .compiling import CompileClock, compile_graphs, compile_mode, uses_cuda_graphs
from .diffusion import DDPMSchedule, StepCoefficients, denoise, step_mean
from .guidance import check_guidance, guided_output, label_values
from .noise import NOISE_BUFFER_ELEMENTS, Stream, as_seed_tensor, check_noise_buffer, gaussian, step_noise_blocks
from .sampling_stats import SamplingResult, SamplingStats

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_device_dtype(model, device=None, dtype=None):
    """The device and the network's input dtype: explicit arguments win, else the model's first parameter."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    return device, dtype


def check_sample_shape(model, shape: Sequence[int]) -> tuple[int, ...]:
    """`shape` as a tuple of ints; a clear error when the target declares another `sample_shape`."""
    shape = tuple(int(s) for s in shape)
    expected = getattr(model, "sample_shape", None)
    if expected is not None and tuple(int(s) for s in expected) != shape:
        raise ValueError(f"shape: {shape} differs from the target's sample_shape {tuple(expected)}; "
                         "pass shape=model.sample_shape")
    return shape


def state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the chain's states: float32 or better whatever the network computes in.

    With a half-precision network (half weights or autocast) only the network's inputs and outputs
    are rounded; the states, the drafts and the verification stay in float32, so a stored draft is
    exactly mu_Q + s z, the value the accept test assumes."""
    return torch.promote_types(model_dtype, torch.float32)


def conditioning(model, seeds, labels, guidance_scale, device):
    """The samplers' seeds, labels and guidance scale, checked: (seeds (N,), labels (N,) or None, scale)."""
    seeds_t = as_seed_tensor(seeds, device=device)
    values = label_values(labels, len(seeds_t), model)  # checked on the host (no device read)
    scale = check_guidance(model, values, guidance_scale)
    return seeds_t, None if values is None else torch.tensor(values, dtype=torch.int64, device=device), scale


def initial_noise(seeds: torch.Tensor, shape: Sequence[int], std: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """x_T for each seed (std times a standard Gaussian; std is the chain's, e.g. sigma_max for EDM);
    shared by ancestral and speculative sampling so that both start alike."""
    z = gaussian(seeds, 0, Stream.INIT, shape, dtype=dtype)
    return z if std == 1.0 else z * std


def _ancestral_chain(model, schedule, plan, tables, chunk, shape, model_dtype, dtype, noise_buffer, bar, step=None,
                     labels=None, scale=1.0):
    """The ancestral chains of the seeds in `chunk` (with their `labels`, guided by `scale`), run together:
    their samples. `step`: a compiled `ancestral_step` (`compiling.py`), called with the step's coefficient
    row as a tensor."""
    # Everything a step needs is prepared here: a step is the network, ~8 operators and no host read.
    coefficients, stds = tables.scalar_coefficients, tables.scalar_std
    x = initial_noise(chunk, shape, plan.initial_std).to(dtype=dtype)
    timesteps = tables.timesteps[:, None].expand(plan.num_steps, len(chunk)).unbind(0)
    noise = step_noise_blocks(chunk, shape, plan.num_stochastic_steps, max_elements=noise_buffer)
    rows = tables.coefficients.unbind(0) if step is not None else None
    for k in range(plan.num_steps):
        if step is not None:
            x = step(model, schedule, model_dtype, x, timesteps[k], rows[k], next(noise) if stds[k] > 0 else None,
                     labels, scale)
        else:
            output = guided_output(model, x.to(model_dtype), timesteps[k], labels, scale, dtype=dtype)
            mean = step_mean(coefficients[k], x, denoise(coefficients[k], x, output, schedule))
            x = torch.add(mean, next(noise).to(dtype), alpha=stds[k]) if stds[k] > 0 else mean
        bar.update(len(chunk))
    return x


def ancestral_step(model, schedule, model_dtype, x, t, coefficients, noise, labels=None, scale=1.0):
    """One ancestral step with its coefficients as a (5,) tensor row (std last): what `compile=True`
    captures as one graph, the same for every step (noise None: the zero-variance last step)."""
    coef = StepCoefficients(*coefficients.unbind(0))
    output = guided_output(model, x.to(model_dtype), t, labels, scale, dtype=x.dtype)
    mean = step_mean(coef, x, denoise(coef, x, output, schedule))
    return mean if noise is None else torch.addcmul(mean, coef.std, noise.to(x.dtype))


@torch.no_grad()
def ancestral_sample(model: Denoiser, schedule: DDPMSchedule, shape: Sequence[int], *, num_steps: int,
                     seeds: Sequence[int], batch_size: int | None = None, device=None, dtype=None, progress: bool = False,
                     noise_buffer: int = NOISE_BUFFER_ELEMENTS, return_stats: bool = False, compile=False, labels=None,
                     guidance_scale: float = 1.0, chain=None):
    """Draw one sample per seed with the ancestral sampler of `chain` (guided, for a conditional target).

    Args:
        model: `model(x, t)` maps states (B, *shape) and schedule times (B,) (DDPM: integer train timesteps;
            EDM: sigma; flow matching: t) to the prediction of `schedule.prediction` type.
        schedule: the schedule the model was trained with (`DDPMSchedule`, `edm.EDMSchedule`, `flow.FlowSchedule`).
        shape: one sample's shape, e.g. (2,) or (1, 8, 8) (the target's `sample_shape` when it has one).
        num_steps: number of sampling steps (DDPM chains: respaced, at most `schedule.num_train_steps`).
        seeds: one int per sample; a sample's noise depends only on its seed (the sample itself also
            on how the network rounds in a batch: equal in law always, bit-identical for batch-invariant networks).
        batch_size: evaluate at most this many chains at once (default: all).
        device, dtype: where to sample and the network's input dtype (default: the model's); the
            chain's states are kept in float32 or better (`state_dtype`).
        progress: show a progress bar.
        noise_buffer: step noise values drawn ahead in one batched hash (a memory bound); any size
            gives the same samples.
        return_stats: also return the run's `SamplingStats` (calls, wall-clock).
        compile: capture a step (the network and the update) with `torch.compile(fullgraph=True)`: True
            ("reduce-overhead", CUDA graphs, on a GPU; inductor's default elsewhere) or a mode
            (`compiling.py`). The calls that compiled are `stats.compile_s`, apart from `wall_clock_s`.
        labels: for a conditional target, one class per seed (None or -1: an unconditional sample);
            None: every sample unconditional. A sample depends only on its seed and label.
        guidance_scale: classifier-free guidance s >= 0: the step uses `uncond + s (cond - uncond)`
            (`guidance.py`); 1 is the plain conditional model (one network row per state), 0 the
            unconditional one; other scales evaluate both rows in one call.

    Returns:
        Tensor (len(seeds), *shape), rows in the order of `seeds`; with `return_stats`,
        `SamplingResult(samples, stats)`.
    """
    plan = schedule.plan(num_steps, chain)
    check_noise_buffer(noise_buffer)
    shape = check_sample_shape(model, shape)
    device, model_dtype = model_device_dtype(model, device, dtype)
    dtype = state_dtype(model_dtype)
    seeds_t, labels_t, scale = conditioning(model, seeds, labels, guidance_scale, device)
    tables = plan.tables(device, dtype)
    clock, step = _step_function(compile_mode(compile, device))
    bar = tqdm(total=len(seeds_t) * plan.num_steps, disable=not progress, desc="ancestral", unit="step")
    start = time.perf_counter()
    chunks = seeds_t.split(batch_size or len(seeds_t))
    label_chunks = [None] * len(chunks) if labels_t is None else labels_t.split(batch_size or len(seeds_t))
    samples = torch.cat([_ancestral_chain(model, schedule, plan, tables, chunk, shape, model_dtype, dtype, noise_buffer,
                                          bar, step, chunk_labels, scale)
                         for chunk, chunk_labels in zip(chunks, label_chunks)])
    elapsed = time.perf_counter() - start
    bar.close()
    if not return_stats:
        return samples
    stats = SamplingStats.ancestral(len(seeds_t), plan.num_steps, len(chunks), elapsed - clock.compile_s)
    return SamplingResult(samples, dataclasses.replace(stats, compile_s=clock.compile_s))


_COMPILED_STEPS: dict[str, object] = {}


def _step_function(mode: str | None):
    """(a `CompileClock`, the compiled step timed by it, or None to step eagerly)."""
    clock = CompileClock()
    return clock, None if mode is None else partial(clock.call, _compiled_step(mode))


def _compiled_step(mode: str):
    """One compiled `ancestral_step` per mode for the process: dynamo keeps its graphs by shape and model."""
    if mode not in _COMPILED_STEPS:
        compiled = compile_graphs(ancestral_step, mode)
        if uses_cuda_graphs(mode):
            def compiled(*args, _graph=compiled):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been consumed
                x = _graph(*args)
                return x.clone() if x.is_cuda else x  # out of the CUDA graphs' pool before the next replay
        _COMPILED_STEPS[mode] = compiled
    return _COMPILED_STEPS[mode]
