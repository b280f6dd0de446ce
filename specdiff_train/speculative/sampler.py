"""The batched speculative sampler: many chains, each at its own step, one target call a round.

Each round, every live chain drafts up to `window` steps with the drafter, the target evaluates all
chains' drafted states in ONE batched call (rows = chains x window states, each at its own
timestep), and the verifier keeps a prefix and draws one more state from the target's law. Chains
that finish leave; waiting seeds take their slots so the batch stays full. All randomness is keyed
by (seed, round of that chain, position), so a sample's noise depends only on its seed (the sample is
bit-identical across batch sizes when the network's outputs do not depend on the batch; equal in law always).

A round is a fixed set of whole-tensor operations with static shapes, padded to the round's longest
window: draft (`_draft`), evaluate (`_evaluate`), verify, commit (`_commit`). The host reads one
small tensor per round (whether a chain finished, the next round's window, the steps advanced);
everything else (noise, book-keeping, the residual's root-find) stays on the device. See
docs/performance.md for where a round's time goes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion import DDPMSchedule, StepCoefficients, denoise, step_mean
from ..noise import (
    NOISE_BUFFER_ELEMENTS,
    Stream,
    as_seed_tensor,
    check_noise_buffer,
    gaussian_from_words,
    gaussian_salts,
    row_keys,
    seed_keys,
    uniform_from_words,
    uniform_salts,
    words,
)
from ..sampling import Denoiser, initial_noise, model_device_dtype, state_dtype
from ._aranges import arange
from .drafters import DraftContext, Drafter, DraftStep, DraftWindow, Verification
from .verify import verify_block, verify_tokenwise

VERIFIER_NAMES = ("block", "tokenwise")
CORRECTIONS = ("reflection", "residual")
_MAX_WINDOW = 1 << 15  # positions in a round share a 16-bit field of the noise counter
MAX_ROUNDS_AHEAD = 64
COMPACT_MIN_ROWS = 64  # from this many padded rows a round evaluates only the rows it needs (one host read)


@dataclass
class SpeculativeResult:
    samples: torch.Tensor  # (len(seeds), *shape), in the order of the seeds
    stats: dict = field(default_factory=dict)


class _CountingTarget:
    """Calls the target network and counts batched calls, rows and per-chain sequential calls.

    `per_slot` counts the calls a drafter makes, for the chains in `slots` that draft this round
    (`count_mask`, set by the sampler); each round's verification call is one more per chain, counted
    by the chain's rounds."""

    def __init__(self, model: Denoiser, tables, capacity: int, device, model_dtype, dtype):
        self.model, self.tables = model, tables
        self.model_dtype, self.dtype = model_dtype, dtype  # the network's inputs; the states and outputs
        self.per_slot = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.all_slots: torch.Tensor | None = None
        self.count_mask: torch.Tensor | None = None
        self.batches = 0
        self.rows = 0

    def count(self, slots: torch.Tensor, mask: torch.Tensor | None) -> None:
        add = 1 if mask is None else mask
        if slots is self.all_slots:
            self.per_slot += add
        else:
            self.per_slot[slots] += add

    def __call__(self, x, k, slots, return_features: bool = False):
        self.count(slots, None if self.count_mask is None else self.count_mask > 0)  # where it drafts
        return self.evaluate(x, self.tables.timesteps[k], return_features)

    def evaluate(self, x, t, return_features: bool = False):
        self.batches += 1
        self.rows += len(x)
        x = x.to(self.model_dtype)
        if not return_features:
            return self.model(x, t).to(self.dtype)
        try:
            out, features = self.model(x, t, return_features=True)
        except TypeError as err:
            raise TypeError(
                "the drafter needs the target's features, but the model does not accept "
                "`return_features=True`; use a target network that exposes its features"
            ) from err
        return out.to(self.dtype), features.to(self.dtype)


class _RoundNoise:
    """Every random number a chain's rounds need, drawn for many rounds ahead in one batched hash.

    Per slot and round r of its chain: the draft noise Z_1..Z_W (counter r << 16 | position, stream
    DRAFT), the bonus / correction Gaussian (counter r << 16, CORRECTION), the accept uniforms (ACCEPT)
    and the residual's uniform (RESIDUAL_U): the same numbers as drawing them round by round, so the
    noise layout is independent of how far ahead it is drawn.
    """

    def __init__(self, capacity: int, window: int, numel: int, device, max_elements: int = NOISE_BUFFER_ELEMENTS):
        self.window, self.numel = window, numel
        self.ahead = max(1, min(MAX_ROUNDS_AHEAD, max_elements // (capacity * (window + 1) * numel)))
        self.gaussians = torch.zeros(capacity, self.ahead, window + 1, numel, device=device)
        self.uniforms = torch.zeros(capacity, self.ahead, window + 1, dtype=torch.float64, device=device)
        self.first_round = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.seed_keys = torch.zeros(capacity, dtype=torch.int64, device=device)
        positions = torch.arange(window + 1, device=device)
        self._gauss_positions = torch.where(positions < window, positions + 1, 0)  # Z_1..Z_W, then xi
        self._gauss_streams = torch.where(positions < window, int(Stream.DRAFT), int(Stream.CORRECTION))
        self._unif_streams = torch.tensor([int(Stream.ACCEPT), int(Stream.RESIDUAL_U)], device=device)
        self._gauss_salts = gaussian_salts(numel, device)
        self._unif_salts = uniform_salts(window, device)
        self.expires: dict[int, int] = {}  # slot -> the sampler round at which its draws run out

    def admit(self, slots: torch.Tensor, seeds: torch.Tensor) -> None:
        self.seed_keys[slots] = seed_keys(seeds)

    def fill(self, slots: torch.Tensor, chain_rounds: torch.Tensor, sampler_round: int, slot_list) -> None:
        """Draw rounds chain_rounds .. + ahead - 1 for `slots`."""
        keys = self.seed_keys[slots]
        rounds = chain_rounds.unsqueeze(1) + torch.arange(self.ahead, device=keys.device)  # (S, R)
        base = (rounds << 16).unsqueeze(-1)
        g_keys = row_keys(keys[:, None, None], base | self._gauss_positions, self._gauss_streams, small_counters=True)
        u_keys = row_keys(keys[:, None, None], base, self._unif_streams, small_counters=True)
        self.gaussians[slots] = gaussian_from_words(words(g_keys, self._gauss_salts), self.numel)
        accept, residual = uniform_from_words(words(u_keys, self._unif_salts)).unbind(-2)
        self.uniforms[slots] = torch.cat([accept, residual[..., :1]], dim=-1)  # W accept uniforms, 1 residual
        self.first_round[slots] = chain_rounds
        for slot in slot_list:
            self.expires[slot] = sampler_round + self.ahead

    def draw(self, rows: torch.Tensor, chain_rounds: torch.Tensor, all_rows: bool):
        """(draft noise (C, W, numel), xi (C, numel), accept uniforms (C, W), residual uniforms (C,))."""
        offset = chain_rounds - (self.first_round if all_rows else self.first_round[rows])
        g = self.gaussians[rows, offset]
        u = self.uniforms[rows, offset]
        return g[:, : self.window], g[:, self.window], u[:, : self.window], u[:, self.window]


def _check_arguments(schedule, plan, drafter, verifier, window, correction):
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter: expected a specdiff_train.speculative.Drafter, got {type(drafter).__name__}")
    if not callable(verifier) and verifier not in VERIFIER_NAMES:
        raise ValueError(f"verifier: expected one of {VERIFIER_NAMES} or a verify function, got {verifier!r}")
    if correction is not None and verifier != "tokenwise":
        raise ValueError(
            f"correction: {correction!r} applies to verifier='tokenwise' only; block verification always corrects "
            "with a fresh draw from the weighted residual (w P - Q)_+ (a custom verifier takes its own): drop `correction`"
        )
    if correction is not None and correction not in CORRECTIONS:
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


def _check_trained_for(drafter: Drafter, model) -> None:
    """Warn (once per drafter and target) when a learned drafter's checkpoint records another target:
    sampling stays exact, but the acceptance is not what the drafter was trained to give."""
    checked = drafter.__dict__.setdefault("_checked_targets", set())
    if getattr(drafter, "checkpoint", None) and isinstance(model, torch.nn.Module) and id(model) not in checked:
        from ..models.checkpoints import check_drafter_target

        check_drafter_target(drafter, model)
        checked.add(id(model))


def _window(tables, n: torch.Tensor, L: int, sample_dims: int) -> DraftWindow:
    """Step indices of X_0..X_L for every chain (clamped: padding rows hold valid indices) and their
    timesteps and coefficients, gathered once for the round."""
    last = len(tables.timesteps) - 1
    steps = (n.unsqueeze(1) + arange(0, L + 1, n.device)).clamp(max=last)
    return DraftWindow(steps, tables.timesteps[steps], tables.coefficients[steps], sample_dims)


def _draft(drafter: Drafter, slots, x, window: DraftWindow, noise, shape):
    """X_i = mu_Q(n+i-1, X_{i-1}) + s Z_i for i = 1..L, for every chain (padding past a chain's window).
    Returns states (C, L+1, *shape) and draft means (C, L, *shape)."""
    states, means = [x], []
    noise = noise.unbind(1)
    for i in range(window.length):
        step = DraftStep(i, window)
        mean = drafter.propose_step(slots, states[-1], step)
        if tuple(mean.shape) != tuple(x.shape):
            raise ValueError(
                f"drafter {drafter.describe()} proposed means of shape {tuple(mean.shape)} for states of "
                f"shape {tuple(x.shape)}; a drafter must propose one mean per state, shaped like the state"
            )
        mean = mean.to(x.dtype)
        states.append(torch.addcmul(mean, step.coefficients.std, noise[i]))
        means.append(mean)
    draft_means = torch.stack(means, 1) if means else x.new_zeros(len(x), 0, *shape)
    return torch.stack(states, 1), draft_means


def _evaluate(target: _CountingTarget, window: DraftWindow, states, evaluated, wants_features: bool, schedule):
    """The ONE batched target call of the round on rows X_0..X_L of every chain, and the target's x0
    estimate and step mean at each row. Large padded batches evaluate only the `evaluated` rows."""
    C, L1 = states.shape[:2]
    shape = states.shape[2:]
    rows = states.reshape(C * L1, *shape)
    t_rows = window.timesteps.reshape(-1)
    if C * L1 >= COMPACT_MIN_ROWS:
        needed = evaluated.reshape(-1).nonzero().squeeze(1)  # the round's second host read, large batches only
        out = target.evaluate(rows[needed], t_rows[needed], wants_features)
        out, features = out if wants_features else (out, None)
        out = rows.new_zeros(C * L1, *out.shape[1:]).index_copy_(0, needed, out.to(rows.dtype))
        if features is not None:
            features = features.new_zeros(C * L1, *features.shape[1:]).index_copy_(0, needed, features)
    else:
        out = target.evaluate(rows, t_rows, wants_features)
        out, features = out if wants_features else (out, None)
    coef = StepCoefficients(*window.coefficients.reshape(C * L1, 5, *([1] * len(shape))).unbind(1))
    x0 = denoise(coef, rows, out, schedule)
    means = step_mean(coef, rows, x0)
    unflat = lambda v: None if v is None else v.reshape(C, L1, *v.shape[1:])  # noqa: E731
    return unflat(out), unflat(features), unflat(x0), unflat(means)


class _Chains:
    """The chains in the sampler's slots: per-slot state on the device, the live slots on the host,
    and the finished samples with their per-sample counters."""

    def __init__(self, capacity: int, num_seeds: int, shape, device, dtype):
        self.all_slots = torch.arange(capacity, device=device)
        self.state = torch.zeros(capacity, *shape, device=device, dtype=dtype)
        self.step = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rounds = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.owner = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # index into seeds
        self.samples = torch.zeros(num_seeds, *shape, device=device, dtype=dtype)
        self.calls_per_sample = torch.zeros(num_seeds, dtype=torch.int64, device=device)
        self.rounds_per_sample = torch.zeros(num_seeds, dtype=torch.int64, device=device)
        self.live: list[int] = []

    def rows(self) -> torch.Tensor:
        """Index of the live slots: `all_slots` itself when every slot is live (no gathers then)."""
        if len(self.live) == len(self.all_slots):
            return self.all_slots
        return torch.tensor(sorted(self.live), device=self.all_slots.device)

    def pick(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return values if rows is self.all_slots else values[rows]

    def admit(self, slots, seed_idx, x_T, slot_list) -> None:
        self.state[slots] = x_T
        self.step[slots], self.rounds[slots], self.owner[slots] = 0, 0, seed_idx
        self.live.extend(slot_list)

    def commit(self, rows, next_state, next_step) -> None:
        if rows is self.all_slots:
            self.state.copy_(next_state)
            self.step.copy_(next_step)
            self.rounds.add_(1)
        else:
            self.state[rows] = next_state.to(self.state.dtype)
            self.step[rows] = next_step
            self.rounds[rows] += 1

    def retire(self, done: torch.Tensor, calls_per_slot: torch.Tensor) -> list[int]:
        """Store the finished chains' samples and counters; free their slots."""
        idx = self.owner[done]
        self.samples[idx] = self.state[done]
        self.calls_per_sample[idx] = self.rounds[done] + calls_per_slot[done]  # verification + drafter calls
        self.rounds_per_sample[idx] = self.rounds[done]
        self.owner[done] = -1
        done_list = done.tolist()
        finished = set(done_list)
        self.live[:] = [s for s in self.live if s not in finished]
        return done_list


class _TransitionLog:
    """Per step, how many transitions were drafted and accepted (acceptance per diffusion time).

    A round only appends (step, window, tau) of its chains (one operation); the counts are made from
    the log every `fold_every` rounds and at the end."""

    def __init__(self, num_steps: int, device, fold_every: int = 256):
        self.num_steps, self.fold_every = num_steps, fold_every
        self.counts = torch.zeros(num_steps, 2, dtype=torch.int64, device=device)  # (drafted, accepted)
        self.entries: list[torch.Tensor] = []

    def append(self, steps, lengths, tau) -> None:
        self.entries.append(torch.stack([steps, lengths, tau], 1))
        if len(self.entries) >= self.fold_every:
            self.fold()

    def fold(self) -> None:
        if not self.entries:
            return
        steps, lengths, tau = torch.cat(self.entries).unbind(1)
        self.entries.clear()
        L = int(lengths.max()) if len(lengths) else 0
        offsets = torch.arange(L, device=steps.device)
        at = (steps.unsqueeze(1) + offsets).clamp(max=self.num_steps - 1)  # step of each drafted transition
        drafted_accepted = offsets.unsqueeze(1) < torch.stack([lengths, tau], 1).unsqueeze(1)  # (R, L, 2)
        self.counts.index_add_(0, at.reshape(-1), drafted_accepted.reshape(-1, 2).long())


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
    correction: str | None = None,
    batch_size: int | None = None,
    refill: bool = True,
    device=None,
    dtype=None,
    progress: bool = False,
    noise_buffer: int = NOISE_BUFFER_ELEMENTS,
) -> SpeculativeResult:
    """Exact speculative sampling of the DDPM ancestral sampler.

    The samples have exactly the law of `ancestral_sample(model, schedule, shape, num_steps=...)`.

    Args:
        model: the target, `model(x, t) -> prediction` (and `return_features=True` if the drafter
            asks for features).
        schedule: the target's schedule.
        shape: one sample's shape.
        num_steps: sampling steps (respaced), as for `ancestral_sample`.
        seeds: one int per sample; a sample's noise depends only on its seed.
        drafter: a `Drafter` (e.g. `FreeDrafter()`, `FrozenTargetDrafter(freeze="eps")`).
        verifier: "block" (block verification, weighted residual) or "tokenwise"; or a function
            with the signature of `verify.verify_block` (for research on verification rules).
        window: drafted steps per round (>= 1); shrinks at the end of the chain.
        correction: token-wise only: "reflection" (maximal coupling, the default) or "residual"
            (fresh draw from (P - Q)_+); refused with any other verifier.
        batch_size: chains evaluated together (default: all seeds).
        refill: when a chain finishes, start the next waiting seed in its slot (keeps the batch
            full); False runs the seeds in successive batches.
        device, dtype: where to sample and the network's input dtype (default: the model's); states,
            drafts and the verification stay in float32 or better (`sampling.state_dtype`).
        progress: show a progress bar over committed steps.
        noise_buffer: noise values drawn ahead per refill (a memory bound: at most `MAX_ROUNDS_AHEAD`
            rounds, at least one); any size gives the same samples.

    Returns:
        `SpeculativeResult(samples, stats)`; `stats` holds the cost counters (ALGORITHMS.md 6).
    """
    plan = schedule.plan(num_steps)
    _check_arguments(schedule, plan, drafter, verifier, window, correction)
    check_noise_buffer(noise_buffer)
    device, model_dtype = model_device_dtype(model, device, dtype)
    dtype = state_dtype(model_dtype)  # states, drafts and verification: float32 or better
    seeds_t = as_seed_tensor(seeds, device=device)
    shape = tuple(int(s) for s in shape)
    num_seeds, N, S, dim = len(seeds_t), plan.num_steps, plan.num_stochastic_steps, math.prod(shape)
    capacity = min(batch_size or num_seeds, num_seeds)
    if callable(verifier):
        verify, verifier_name = verifier, getattr(verifier, "__name__", "custom")
    elif verifier == "block":  # built-in verifiers leave the correction until a chain needs one
        verify, verifier_name = partial(verify_block, defer_correction=True), "block"
    else:
        correction = correction or "reflection"
        verify = partial(verify_tokenwise, correction=correction, defer_correction=True)
        verifier_name = f"tokenwise-{correction}"
    W = min(window, S)  # no window is ever longer than the stochastic steps

    _check_trained_for(drafter, model)
    tables = plan.tables(device, dtype)
    target = _CountingTarget(model, tables, capacity, device, model_dtype, dtype)
    chains = _Chains(capacity, num_seeds, shape, device, dtype)
    target.all_slots = chains.all_slots
    drafter.bind(DraftContext(target, schedule, plan, shape, capacity, device, dtype, all_slots=chains.all_slots))
    noise = _RoundNoise(capacity, W, dim, device, max_elements=noise_buffer)
    transitions = _TransitionLog(N, device)
    totals = dict(draft_calls=0, chain_rounds=0, rounds=0, advanced=0)
    queue = iter(range(num_seeds))

    def admit(slot_list: list[int]) -> None:
        taken = list(zip(slot_list, queue))
        if taken:
            slots = torch.tensor([s for s, _ in taken], device=device)
            seed_idx = torch.tensor([i for _, i in taken], device=device)
            chains.admit(slots, seed_idx, initial_noise(seeds_t[seed_idx], shape).to(dtype=dtype), [s for s, _ in taken])
            target.per_slot[slots] = 0
            noise.admit(slots, seeds_t[seed_idx])
            noise.fill(slots, chains.rounds[slots], totals["rounds"], [s for s, _ in taken])
            drafter.join(slots)

    def next_lengths(rows, n):
        """Each chain's window for its next round (0: a plain target step)."""
        return (S - n).clamp(min=0, max=W) * drafter.ready(rows).to(device)

    admit(list(range(capacity)))
    bar = tqdm(total=num_seeds * N, disable=not progress, desc=f"speculative {verifier_name}", unit="step")
    start = time.perf_counter()
    lengths = None
    while chains.live:
        if lengths is None:  # the set of live chains changed: recompute the windows (a host read)
            rows = chains.rows()
            lengths = next_lengths(rows, chains.pick(chains.step, rows))
            L = int(lengths.max())
        if totals["rounds"] >= min(noise.expires[s] for s in chains.live):
            noise.fill(rows, chains.pick(chains.rounds, rows), totals["rounds"], chains.live)
        x, n, chain_rounds = (chains.pick(t, rows) for t in (chains.state, chains.step, chains.rounds))
        C = len(chains.live)

        # Draft
        draft_noise, xi, accept_u, residual_u = noise.draw(rows, chain_rounds, rows is chains.all_slots)
        if L < W:  # the end of the chains: a shorter window
            draft_noise, accept_u = draft_noise[:, :L], accept_u[:, :L]
        draft_noise, xi = draft_noise.to(dtype).reshape(C, L, *shape), xi.to(dtype)
        win = _window(tables, n, L, len(shape))
        if L > 0:  # else every chain takes a plain target step (warm-up, or the chain's last step)
            target.count_mask = lengths  # a target call the drafter makes counts where it drafts (lengths > 0)
            drafter.start_round(rows, x, n)
            target.count_mask = None
        states, draft_means = _draft(drafter, rows, x, win, draft_noise, shape)
        totals["draft_calls"] += L

        # Evaluate: ONE target call on rows X_0..X_L (X_{L'} only if a step follows it).
        j = arange(0, L + 1, device)
        room = (N - 1) - n  # steps that follow X_0
        has_next = lengths <= room  # a step follows X_{L'}
        evaluated = j <= torch.minimum(lengths, room).unsqueeze(1)  # in the window, and a step follows
        out, features, x0, target_means = _evaluate(target, win, states, evaluated, drafter.wants_features, schedule)

        # Verify
        result = verify(
            draft_noise.reshape(C, L, dim), states.reshape(C, L + 1, dim), draft_means.reshape(C, L, dim),
            target_means.reshape(C, L + 1, dim), tables.std[win.steps], lengths, has_next,
            accept_u, xi, residual_u,
        )
        drafter.observe(rows, Verification(states=states, steps=n, outputs=out, features=features, evaluated=evaluated,
                                           accepted=result.accepted, denoised=x0, means=target_means))

        # The round's one host read: did a chain stop short (then the correction is drawn), did a chain
        # finish, the next round's window, steps advanced.
        transitions.append(n, lengths, result.accepted)
        new_step = n + result.advanced
        finished = new_step >= N
        lengths = next_lengths(rows, new_step)
        flags = [finished.sum(), lengths.max(), result.advanced.sum()]
        if result.needs_correction is not None:
            flags.append(result.needs_correction.sum())
        any_finished, L, advanced, *needs = torch.stack(flags).tolist()

        # Commit
        chains.commit(rows, result.settle(bool(needs and needs[0])).reshape(C, *shape), new_step)
        totals["chain_rounds"] += C
        totals["rounds"] += 1
        totals["advanced"] += advanced
        bar.update(advanced)
        if any_finished:
            done = chains.retire(rows[finished], target.per_slot)
            if refill or not chains.live:
                admit(done if refill else list(range(capacity)))
            lengths = None
    bar.close()
    elapsed = time.perf_counter() - start
    samples, calls_per_sample, rounds_per_sample = chains.samples, chains.calls_per_sample, chains.rounds_per_sample

    transitions.fold()
    drafted_at, accepted_at = transitions.counts.unbind(1)
    drafted, accepted = transitions.counts.sum(0).tolist()
    calls = calls_per_sample.double().mean().item()
    stats = dict(
        num_samples=num_seeds,
        num_steps=N,
        verifier=verifier_name,
        window=window,
        drafter=drafter.describe(),
        target_calls_per_sample=calls,
        speedup=N / calls,
        rounds=totals["rounds"],
        rounds_per_sample=rounds_per_sample.double().mean().item(),
        target_batches=target.batches,
        target_rows=target.rows,
        draft_calls=totals["draft_calls"],
        draft_rows=drafted,
        drafted_steps=drafted,
        acceptance_rate=accepted / drafted if drafted else float("nan"),
        mean_accepted_per_round=accepted / totals["chain_rounds"],
        mean_steps_per_round=totals["advanced"] / totals["chain_rounds"],
        drafted_per_step=drafted_at.tolist(),
        accepted_per_step=accepted_at.tolist(),
        wall_clock_s=elapsed,
    )
    return SpeculativeResult(samples=samples, stats=stats)
