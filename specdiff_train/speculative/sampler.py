"""`speculative_sample`: exact speculative sampling of an ancestral sampler (any `Chain`), many chains at once.

The loop is short: build the engine (a pool of chains, the drafter, the verifier, the window
policy), run rounds until every seed has its sample, and tell the observers after each round. What
a round does is in `engine.py` (draft -> evaluate -> verify -> host read -> commit); verifiers by
name in `verifiers.py`; window policies in `windows.py`; observers in `observers.py`.
"""
from __future__ import annotations

import time
import weakref
from typing import Sequence

import torch

from ..chains import check_stochastic
from ..compiling import compile_mode
from ..diffusion import Schedule
from ..noise import NOISE_BUFFER_ELEMENTS, check_noise_buffer
from ..sampling import Denoiser, check_sample_shape, conditioning, model_device_dtype, state_dtype
from ..sampling_stats import SamplingResult, SamplingStats
from ..drafters.base import Drafter
from .compiled import CompiledRounds
from .engine import RoundEngine, RoundSetup
from .observers import ProgressBar, TransitionCounts
from .verifiers import parse_verifier
from .windows import as_window_policy


SpeculativeResult = SamplingResult  # the name this result had before ancestral sampling returned stats too


def _check_arguments(plan, drafter) -> None:
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter: expected a specdiff_train.speculative.Drafter, got {type(drafter).__name__}")
    check_stochastic(plan)  # draft and target kernels of a deterministic step are point masses
    # A drafter built for another schedule or shape is refused by its own `check_compatible` (in `bind`).


_CHECKED_TARGETS: "weakref.WeakKeyDictionary[Drafter, set[int]]" = weakref.WeakKeyDictionary()


def _check_trained_for(drafter: Drafter, model) -> None:
    """Warn (once per drafter and target) when a learned drafter's checkpoint records another target:
    sampling stays exact, but the acceptance is not what the drafter was trained to give."""
    checked = _CHECKED_TARGETS.setdefault(drafter, set())
    if getattr(drafter, "checkpoint", None) and isinstance(model, torch.nn.Module) and id(model) not in checked:
        from ..drafters.checkpoints import check_drafter_target

        check_drafter_target(drafter, model)
        checked.add(id(model))


def _stats(engine: RoundEngine, counts: TransitionCounts, verifier: str, window, elapsed: float) -> SamplingStats:
    pool, plan = engine.pool, engine.setup.plan
    compile_s = 0.0 if engine.compiled is None else engine.compiled.clock.compile_s
    drafted, accepted = counts.per_step()
    return SamplingStats(
        num_samples=len(pool.seeds), num_steps=plan.num_steps, verifier=verifier, window=window,
        drafter=engine.drafter.describe(), target_calls_per_sample=pool.calls_per_sample.double().mean().item(),
        rounds=engine.rounds, rounds_per_sample=pool.rounds_per_sample.double().mean().item(),
        target_batches=engine.target.batches, target_rows=engine.target.rows, draft_calls=engine.draft_calls,
        drafted_per_step=drafted, accepted_per_step=accepted, wall_clock_s=elapsed - compile_s, compile_s=compile_s,
    )


@torch.no_grad()
def speculative_sample(model: Denoiser, schedule: Schedule, shape: Sequence[int], *, num_steps: int,
                       seeds: Sequence[int], drafter: Drafter, verifier="block", window=8, correction: str | None = None,
                       batch_size: int | None = None, refill: bool = True, device=None, dtype=None,
                       progress: bool = False, noise_buffer: int = NOISE_BUFFER_ELEMENTS,
                       callbacks: Sequence = (), cost_model=None, compile=False, labels=None,
                       guidance_scale: float = 1.0, chain=None) -> SamplingResult:
    """Exact speculative sampling: the samples have exactly the law of `ancestral_sample(model, schedule,
    shape, num_steps=..., chain=...)` for the same model, schedule and chain.

    Args:
        model: the target, `model(x, t) -> prediction` (and `return_features=True` if the drafter
            asks for features).
        schedule, shape, num_steps, seeds, batch_size, device, dtype, progress, noise_buffer: as for
            `ancestral_sample`; `batch_size` chains are evaluated together (default: all seeds), and
            a sample's noise depends only on its seed.
        drafter: a `Drafter` (e.g. `FreeDrafter()`, `FrozenTargetDrafter(freeze="eps")`).
        verifier: "block" (block verification, weighted residual), "tokenwise" (or "tokenwise-reflection",
            "tokenwise-residual"), a `verifiers.Verifier`, or a function with the signature of
            `verify.verify_block` (for research on verification rules).
        window: drafted steps per round: an int >= 1 (shortened at the end of the chain); "auto", the
            cost-aware policy (`windows.CostAwareWindow`: each round the window, 0 to 16, that commits
            the most steps per second on this device, 0 being a plain target step); "heuristic"
            (+2 after a fully accepted round, -1 otherwise); or a `windows.WindowPolicy`.
        cost_model: with window="auto", a `costs.CostModel` (or its mapping) giving each window's round
            time, for reproducible runs; default: round times measured as the sampler runs (the
            measuring rounds are real rounds, counted in the wall-clock).
        correction: token-wise only: "reflection" (maximal coupling, the default) or "residual"
            (fresh draw from (P - Q)_+); refused with any other verifier.
        refill: start the next waiting seed in a finished chain's slot (False: successive batches).
        callbacks: observers with `on_round_end(record)` (`observers.py`), called after each round.
        compile: capture each round's whole tensor program (drafting, the target call, verification,
            the drafter's and the window policy's updates) with `torch.compile(fullgraph=True)`, one graph
            per window width (`compiled.py`): True ("reduce-overhead", i.e. CUDA graphs, on a GPU;
            inductor's default elsewhere), or a torch.compile mode. The time of calls that compiled is
            `stats.compile_s`, apart from `stats.wall_clock_s`; graphs are reused by later calls with the
            same model, drafter and shapes. Samples equal the eager ones to float tolerance.
        labels, guidance_scale: as for `ancestral_sample`; exact with respect to the guided ancestral sampler
            (two network rows per evaluated state in the same call when 0 < s != 1; drafters see guided outputs).
        chain: as for `ancestral_sample`, with a stochastic step (docs/chains.md); trailing zero-noise steps are plain.

    Returns:
        `SamplingResult(samples, stats)`: samples (len(seeds), *shape) in the order of the seeds, and a
        `SamplingStats` (ALGORITHMS.md section 6). States, drafts and verification stay in float32 or
        better whatever the network computes in (`sampling.state_dtype`).
    """
    plan = schedule.plan(num_steps, chain)
    verifier, policy = parse_verifier(verifier, correction), as_window_policy(window, cost_model)
    _check_arguments(plan, drafter)
    shape = check_sample_shape(model, shape)
    check_noise_buffer(noise_buffer)
    device, model_dtype = model_device_dtype(model, device, dtype)
    seeds_t, labels_t, scale = conditioning(model, seeds, labels, guidance_scale, device)
    _check_trained_for(drafter, model)
    dtype, mode = state_dtype(model_dtype), compile_mode(compile, device)
    setup = RoundSetup(schedule, plan, plan.tables(device, dtype), shape, model_dtype, dtype, noise_buffer, refill,
                       labels_t, scale)
    engine = RoundEngine(model, seeds_t, min(batch_size or len(seeds_t), len(seeds_t)), drafter, verifier, policy, setup)
    if mode is not None:
        engine.compiled = CompiledRounds(engine, mode)
    return _run(engine, policy, callbacks, progress)


def _run(engine: RoundEngine, policy, callbacks, progress: bool) -> SamplingResult:
    """Rounds until every seed has its sample; the observers see each round's record."""
    plan, verifier = engine.setup.plan, engine.verifier
    counts = TransitionCounts(plan.num_steps, engine.pool.all_slots.device)
    bar = ProgressBar(len(engine.pool.seeds) * plan.num_steps, f"speculative {verifier.name}", progress)
    observers = [o.on_round_end for o in (counts, bar, policy, *callbacks) if hasattr(o, "on_round_end")]
    start = time.perf_counter()
    while engine.pool.live:
        record = engine.run_round()
        for on_round_end in observers:
            on_round_end(record)
    elapsed = time.perf_counter() - start
    bar.close()
    return SamplingResult(engine.pool.samples, _stats(engine, counts, verifier.name, policy.describe(), elapsed))
