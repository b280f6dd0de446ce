"""The batched speculative sampler: many chains, each at its own step, one target call a round.

Each round, every live chain drafts up to `window` steps with the drafter, the target evaluates all
chains' drafted states in ONE batched call (rows = chains x window states, each at its own
timestep), and the verifier keeps a prefix and draws one more state from the target's law. Chains
that finish leave; waiting seeds take their slots so the batch stays full. All randomness is keyed
by (seed, round of that chain, position), so a sample depends only on its seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion import DDPMSchedule
from ..noise import Stream, as_seed_tensor, gaussian, uniform
from ..sampling import Denoiser, initial_noise, model_device_dtype
from .drafters import DraftContext, Drafter, Verification
from .verify import verify_block, verify_tokenwise

VERIFIER_NAMES = ("block", "tokenwise")
CORRECTIONS = ("reflection", "residual")
_MAX_WINDOW = 1 << 15  # positions in a round share a 16-bit field of the noise counter


@dataclass
class SpeculativeResult:
    samples: torch.Tensor  # (len(seeds), *shape), in the order of the seeds
    stats: dict = field(default_factory=dict)


class _CountingTarget:
    """Calls the target network and counts batched calls, rows and per-chain sequential calls."""

    def __init__(self, model: Denoiser, plan, capacity: int, device):
        self.model, self.plan = model, plan
        self.per_slot = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.batches = 0
        self.rows = 0

    def __call__(self, x, k, slots, return_features: bool = False):
        self.batches += 1
        self.rows += len(x)
        self.per_slot[torch.unique(slots)] += 1
        t = self.plan.t(k)
        if not return_features:
            return self.model(x, t)
        try:
            return self.model(x, t, return_features=True)
        except TypeError as err:
            raise TypeError(
                "the drafter needs the target's features, but the model does not accept "
                "`return_features=True`; use a target network that exposes its features"
            ) from err


def _check_arguments(schedule, plan, drafter, verifier, window, correction):
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter: expected a specdiff_train.speculative.Drafter, got {type(drafter).__name__}")
    if not callable(verifier) and verifier not in VERIFIER_NAMES:
        raise ValueError(f"verifier: expected one of {VERIFIER_NAMES} or a verify function, got {verifier!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1 (drafted steps per round), got {window!r}")
    if window >= _MAX_WINDOW:
        raise ValueError(f"window: at most {_MAX_WINDOW - 1}, got {window}")
    if plan.num_stochastic_steps == 0:
        raise ValueError(
            "speculative sampling needs a stochastic sampler: every step of this sampler has zero variance "
            f"(num_steps={plan.num_steps}), so draft and target kernels are point masses and nothing can be "
            "accepted; use the DDPM ancestral sampler with num_steps >= 2"
        )
    drafter_schedule = getattr(drafter, "target_schedule", None)
    if drafter_schedule is not None and drafter_schedule != schedule:
        raise ValueError(
            f"drafter {drafter.describe()} was built for another schedule than the target's: "
            + "; ".join(drafter_schedule.mismatch(schedule))
        )


def _scatter_rows(values: torch.Tensor, index: tuple, size: tuple) -> torch.Tensor:
    out = values.new_zeros(size + tuple(values.shape[1:]))
    out[index] = values
    return out


@torch.no_grad()
def speculative_sample(
    model: Denoiser,
    schedule: DDPMSchedule,
    shape: Sequence[int],
    *,
    num_steps: int,
    seeds: Sequence[int],
    drafter: Drafter,
    verifier: str = "block",
    window: int = 8,
    correction: str = "reflection",
    batch_size: int | None = None,
    refill: bool = True,
    device=None,
    dtype=None,
    progress: bool = False,
) -> SpeculativeResult:
    """Exact speculative sampling of the DDPM ancestral sampler.

    The samples have exactly the law of `ancestral_sample(model, schedule, shape, num_steps=...)`.

    Args:
        model: the target, `model(x, t) -> prediction` (and `return_features=True` if the drafter
            asks for features).
        schedule: the target's schedule.
        shape: one sample's shape.
        num_steps: sampling steps (respaced), as for `ancestral_sample`.
        seeds: one int per sample; a sample depends only on its seed.
        drafter: a `Drafter` (e.g. `FreeDrafter()`, `FrozenTargetDrafter(freeze="eps")`).
        verifier: "block" (block verification, weighted residual) or "tokenwise"; or a function
            with the signature of `verify.verify_block` (for research on verification rules).
        window: drafted steps per round (>= 1); shrinks at the end of the chain.
        correction: token-wise only: "reflection" (maximal coupling) or "residual" (fresh draw
            from (P - Q)_+).
        batch_size: chains evaluated together (default: all seeds).
        refill: when a chain finishes, start the next waiting seed in its slot (keeps the batch
            full); False runs the seeds in successive batches.
        device, dtype: where to sample (default: the model's).
        progress: show a progress bar over committed steps.

    Returns:
        `SpeculativeResult(samples, stats)`; `stats` holds the cost counters (ALGORITHMS.md 6).
    """
    plan = schedule.plan(num_steps)
    _check_arguments(schedule, plan, drafter, verifier, window, correction)
    device, dtype = model_device_dtype(model, device, dtype)
    seeds_t = as_seed_tensor(seeds, device=device)
    shape = tuple(int(s) for s in shape)
    num_seeds, N, S, dim = len(seeds_t), plan.num_steps, plan.num_stochastic_steps, math.prod(shape)
    capacity = min(batch_size or num_seeds, num_seeds)
    if callable(verifier):
        verify, verifier_name = verifier, getattr(verifier, "__name__", "custom")
    elif verifier == "block":
        verify, verifier_name = verify_block, "block"
    else:
        verify, verifier_name = partial(verify_tokenwise, correction=correction), f"tokenwise-{correction}"

    target = _CountingTarget(model, plan, capacity, device)
    drafter.bind(DraftContext(target, schedule, plan, shape, capacity, device, dtype))

    state = torch.zeros(capacity, *shape, device=device, dtype=dtype)
    step = torch.zeros(capacity, dtype=torch.int64, device=device)
    rounds = torch.zeros(capacity, dtype=torch.int64, device=device)
    owner = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # index into seeds
    samples = torch.zeros(num_seeds, *shape, device=device, dtype=dtype)
    calls_per_sample = torch.zeros(num_seeds, dtype=torch.int64)
    rounds_per_sample = torch.zeros(num_seeds, dtype=torch.int64)
    drafted_at = torch.zeros(N, dtype=torch.int64, device=device)
    accepted_at = torch.zeros(N, dtype=torch.int64, device=device)
    totals = dict(draft_calls=0, draft_rows=0, accepted=0, advanced=0, chain_rounds=0, rounds=0)
    queue = iter(range(num_seeds))

    def admit(slots: torch.Tensor) -> None:
        taken = [(int(s), i) for s, i in zip(slots.tolist(), queue)]
        if not taken:
            return
        slot_idx = torch.tensor([s for s, _ in taken], device=device)
        seed_idx = torch.tensor([i for _, i in taken], device=device)
        state[slot_idx] = initial_noise(seeds_t[seed_idx], shape).to(device=device, dtype=dtype)
        step[slot_idx], rounds[slot_idx], owner[slot_idx] = 0, 0, seed_idx
        target.per_slot[slot_idx] = 0
        drafter.join(slot_idx)

    admit(torch.arange(capacity, device=device))
    bar = tqdm(total=num_seeds * N, disable=not progress, desc=f"speculative {verifier_name}", unit="step")
    start = time.perf_counter()
    while True:
        live = (owner >= 0).nonzero().squeeze(1)
        if len(live) == 0:
            break
        C = len(live)
        x, n, chain_seeds = state[live], step[live], seeds_t[owner[live]]
        counters = rounds[live] << 16
        lengths = (S - n).clamp(min=0, max=window)
        lengths = torch.where(drafter.ready(live).to(device), lengths, torch.zeros_like(lengths))
        L = int(lengths.max())
        drafting = lengths > 0
        if drafting.any():
            drafter.start_round(live[drafting], x[drafting], n[drafting])

        # Draft: X_i = mu_Q(n+i-1, X_{i-1}) + s Z_i, sequentially, only where i <= L'.
        states = torch.zeros(C, L + 1, *shape, device=device, dtype=dtype)
        states[:, 0] = x
        draft_means = torch.zeros(C, L, *shape, device=device, dtype=dtype)
        positions = torch.arange(1, L + 1, device=device)
        noise = gaussian(  # all the round's draft noise in one call: counter = round << 16 | position
            chain_seeds.repeat_interleave(L), (counters[:, None] + positions).reshape(-1), Stream.DRAFT, shape
        ).to(device=device, dtype=dtype).reshape(C, L, *shape)
        for i in range(1, L + 1):
            act = (lengths >= i).nonzero().squeeze(1)
            k = n[act] + i - 1
            mean_q = drafter.propose(live[act], states[act, i - 1], k)
            if tuple(mean_q.shape) != (len(act),) + shape:
                raise ValueError(
                    f"drafter {drafter.describe()} proposed means of shape {tuple(mean_q.shape)} for states of "
                    f"shape {(len(act),) + shape}; a drafter must propose one mean per state, shaped like the state"
                )
            s = plan.std_at(k).to(device=device, dtype=dtype).reshape(-1, *([1] * len(shape)))
            states[act, i] = mean_q.to(dtype) + s * noise[act, i - 1]
            draft_means[act, i - 1] = mean_q.to(dtype)
            totals["draft_calls"] += 1
            totals["draft_rows"] += len(act)

        # Verify: ONE target call on rows X_0..X_{L'} (X_{L'} only if a step follows it).
        j = torch.arange(L + 1, device=device)[None, :]
        evaluated = (j <= lengths[:, None]) & (n[:, None] + j < N)
        ci, ji = evaluated.nonzero(as_tuple=True)
        k_rows = n[ci] + ji
        out = target(states[ci, ji], k_rows, live, return_features=drafter.wants_features)
        out, features = out if drafter.wants_features else (out, None)
        mean_p, std_rows = plan.transition(states[ci, ji], k_rows, out)
        target_means = _scatter_rows(mean_p, (ci, ji), (C, L + 1))
        stds = _scatter_rows(std_rows.to(device=device, dtype=torch.float64), (ci, ji), (C, L + 1))
        has_next = n + lengths < N

        result = verify(
            noise.reshape(C, L, dim),
            states.reshape(C, L + 1, dim),
            draft_means.reshape(C, L, dim),
            target_means.reshape(C, L + 1, dim),
            stds,
            lengths,
            has_next,
            uniform(chain_seeds, counters, Stream.ACCEPT, (L,)).to(device),
            gaussian(chain_seeds, counters, Stream.CORRECTION, (dim,)).to(device=device, dtype=dtype),
            uniform(chain_seeds, counters, Stream.RESIDUAL_U).to(device),
        )
        tau, advanced = result.accepted, result.advanced
        drafter.observe(
            live,
            Verification(
                states=states,
                steps=n,
                outputs=_scatter_rows(out, (ci, ji), (C, L + 1)),
                features=None if features is None else _scatter_rows(features, (ci, ji), (C, L + 1)),
                evaluated=evaluated,
                accepted=tau,
            ),
        )

        # Book-keeping: per-step acceptance (step index of each drafted transition).
        pos = torch.arange(L, device=device)[None, :]
        drafted_steps = (n[:, None] + pos)[pos < lengths[:, None]]
        accepted_steps = (n[:, None] + pos)[pos < tau[:, None]]
        drafted_at += torch.bincount(drafted_steps, minlength=N)[:N]
        accepted_at += torch.bincount(accepted_steps, minlength=N)[:N]
        totals["accepted"] += int(tau.sum())
        totals["advanced"] += int(advanced.sum())
        totals["chain_rounds"] += C
        totals["rounds"] += 1

        state[live] = result.next_state.reshape(C, *shape).to(dtype)
        step[live] = n + advanced
        rounds[live] += 1
        bar.update(int(advanced.sum()))

        done = live[step[live] >= N]
        if len(done):
            idx = owner[done]
            samples[idx] = state[done]
            calls_per_sample[idx.cpu()] = target.per_slot[done].cpu()
            rounds_per_sample[idx.cpu()] = rounds[done].cpu()
            owner[done] = -1
            if refill or not (owner >= 0).any():
                admit(done if refill else torch.arange(capacity, device=device))
    bar.close()
    elapsed = time.perf_counter() - start

    drafted = int(drafted_at.sum())
    stats = dict(
        num_samples=num_seeds,
        num_steps=N,
        verifier=verifier_name,
        window=window,
        drafter=drafter.describe(),
        target_calls_per_sample=calls_per_sample.double().mean().item(),
        speedup=N / calls_per_sample.double().mean().item(),
        rounds=totals["rounds"],
        rounds_per_sample=rounds_per_sample.double().mean().item(),
        target_batches=target.batches,
        target_rows=target.rows,
        draft_calls=totals["draft_calls"],
        draft_rows=totals["draft_rows"],
        drafted_steps=drafted,
        acceptance_rate=totals["accepted"] / drafted if drafted else float("nan"),
        mean_accepted_per_round=totals["accepted"] / totals["chain_rounds"],
        mean_steps_per_round=totals["advanced"] / totals["chain_rounds"],
        drafted_per_step=drafted_at.tolist(),
        accepted_per_step=accepted_at.tolist(),
        wall_clock_s=elapsed,
    )
    return SpeculativeResult(samples=samples, stats=stats)
