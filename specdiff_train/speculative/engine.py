"""The speculative round as an engine: a pool of chains, a round of named steps, one host read.

    pool = SlotPool(...)                     # chains in slots: admit / refill / retire
    record = engine.run_round()              # draft -> evaluate -> verify -> host read -> commit
    observer.on_round_end(record)            # progress, statistics, research instrumentation

Each round, every live chain drafts up to its window (from a `WindowPolicy`) with the drafter, the
target evaluates all chains' drafted states in ONE batched call (rows = chains x window states, each
at its own timestep), and the verifier keeps a prefix and draws one more state from the target's
law. Between host reads a round is whole-tensor work with static shapes, padded to the round's
longest window; the host reads one small tensor per round (`read_host`: whether a chain finished,
the next round's longest window, the steps advanced, whether a correction is needed). Large rounds
also read which rows to evaluate (`COMPACT_MIN_ROWS`) and which chains to correct
(`verify.COMPACT_MIN_CHAINS`). All randomness is keyed by (seed, round of that chain, position)
(`noise.RoundNoise`), so a sample's noise depends only on its seed. See docs/performance.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..diffusion import StepCoefficients, denoise, step_mean
from ..guidance import NULL_LABEL, guided_output
from ..noise import RoundNoise
from ..sampling import initial_noise
from .._aranges import arange
from ..drafters.base import DraftContext, Drafter, DraftStep, DraftWindow, Verification
from .verify import RoundOutcome

COMPACT_MIN_ROWS = 64  # from this many padded rows a round evaluates only the rows it needs (one host read)


class CountingTarget:
    """Calls the target network (guided, for a conditional target: `guidance.guided_output`) and counts
    batched calls, rows and per-chain sequential calls.

    `per_slot` counts the calls a drafter makes for the chains that draft this round (`drafting`);
    each round's verification call is one more per chain, counted by the chain's rounds. `labels` is
    each slot's label (None: an unconditional target); rows and counts are states, whatever guidance
    adds inside the call."""

    def __init__(self, model, tables, all_slots: torch.Tensor, model_dtype, dtype, labels=None,
                 guidance_scale: float = 1.0):
        self.model, self.tables, self.all_slots = model, tables, all_slots
        self.model_dtype, self.dtype = model_dtype, dtype  # the network's inputs; the states and outputs
        self.labels, self.guidance_scale = labels, guidance_scale  # labels: the pool's, updated in place
        self.per_slot = torch.zeros(len(all_slots), dtype=torch.int64, device=all_slots.device)
        self._drafting: torch.Tensor | None = None
        self.batches = self.rows = 0
        self.traced_rows: tuple[int, ...] = ()  # calls inside a compiled round, counted after it (`count_traced`)

    @contextmanager
    def drafting(self, lengths: torch.Tensor):
        """While the drafter starts its round, its target calls count where a chain drafts (lengths > 0)."""
        self._drafting = lengths
        try:
            yield
        finally:
            self._drafting = None

    def __call__(self, x, k, slots, return_features: bool = False):
        add = 1 if self._drafting is None else self._drafting > 0
        if slots is self.all_slots:
            self.per_slot += add
        else:
            self.per_slot[slots] += add
        return self.evaluate(x, self.tables.timesteps[k], return_features, self.slot_labels(slots))

    def slot_labels(self, slots: torch.Tensor) -> torch.Tensor | None:
        """The labels of the chains in `slots` (None for an unconditional target)."""
        if self.labels is None:
            return None
        return self.labels if slots is self.all_slots else self.labels[slots]

    def evaluate(self, x, t, return_features: bool = False, labels=None):
        """The network's (guided) outputs on rows x at timesteps t with their labels (None: unconditional)."""
        if torch.compiler.is_compiling():  # a Python counter in a graph would be a constant: counted after the call
            self.traced_rows = self.traced_rows + (len(x),)
        else:
            self.batches += 1
            self.rows += len(x)
        x = x.to(self.model_dtype)
        try:
            return guided_output(self.model, x, t, labels, self.guidance_scale, return_features, dtype=self.dtype)
        except TypeError as err:
            if not return_features or "return_features" not in str(err):
                raise
            raise TypeError(
                "the drafter needs the target's features, but the model does not accept "
                "`return_features=True`; use a target network that exposes its features"
            ) from err

    def count_traced(self) -> None:
        """Count the calls a compiled round made (its graph replays them without running this code)."""
        self.batches += len(self.traced_rows)
        self.rows += sum(self.traced_rows)
        self.traced_rows = ()


class SlotPool:
    """The chains in the sampler's slots: per-slot state on the device, the live slots and the queue
    of waiting seeds on the host, and the finished samples with their per-sample counters."""

    def __init__(self, seeds: torch.Tensor, capacity: int, shape, dtype, labels: torch.Tensor | None = None,
                 initial_std: float = 1.0):
        device = seeds.device
        self.initial_std = initial_std  # the chain's starting std (EDM: sigma_max)
        self.seeds, self.shape, self.dtype = seeds, tuple(shape), dtype
        self.seed_labels = labels  # (len(seeds),) a conditional target's label per seed, or None
        # per slot, written in place at admission (the target and compiled graphs hold this tensor)
        self.labels = None if labels is None else torch.full((capacity,), NULL_LABEL, dtype=torch.int64, device=device)
        self.all_slots = torch.arange(capacity, device=device)
        self.state = torch.zeros(capacity, *shape, device=device, dtype=dtype)
        self.step = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rounds = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.owner = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # index into seeds
        self.samples = torch.zeros(len(seeds), *shape, device=device, dtype=dtype)
        self.calls_per_sample = torch.zeros(len(seeds), dtype=torch.int64, device=device)
        self.rounds_per_sample = torch.zeros(len(seeds), dtype=torch.int64, device=device)
        self.live: list[int] = []
        self._queue = iter(range(len(seeds)))

    def live_slots(self) -> torch.Tensor:
        """Index of the live slots: `all_slots` itself when every slot is live (no gathers then)."""
        if len(self.live) == len(self.all_slots):
            return self.all_slots
        return torch.tensor(sorted(self.live), device=self.all_slots.device)

    def pick(self, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return values if slots is self.all_slots else values[slots]

    def admit(self, free: list[int]):
        """Start waiting seeds in the `free` slots, in queue order. Returns (slots, seed indices, slot
        list) of the chains admitted, or None when the queue is empty."""
        taken = list(zip(free, self._queue))
        if not taken:
            return None
        slot_list = [s for s, _ in taken]
        device = self.all_slots.device
        slots, seed_idx = torch.tensor(slot_list, device=device), torch.tensor([i for _, i in taken], device=device)
        # a new tensor, not a write into the old: the last round's record may hold the old one (`next_state`)
        noise = initial_noise(self.seeds[seed_idx], self.shape, self.initial_std).to(dtype=self.dtype)
        self.state = self.state.index_copy(0, slots, noise)
        self.step[slots], self.rounds[slots], self.owner[slots] = 0, 0, seed_idx
        if self.labels is not None:
            self.labels.index_copy_(0, slots, self.seed_labels[seed_idx])
        self.live.extend(slot_list)
        return slots, seed_idx, slot_list

    def commit(self, slots, next_state, next_step) -> None:
        if slots is self.all_slots:  # new tensors, not copies: the round's record keeps the old steps
            self.state, self.step = next_state.to(self.state.dtype), next_step
            self.rounds.add_(1)
        else:
            self.state[slots] = next_state.to(self.state.dtype)
            self.step[slots] = next_step
            self.rounds[slots] += 1

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


def window_of(tables, n: torch.Tensor, L: int, sample_dims: int) -> DraftWindow:
    """Step indices of X_0..X_L for every chain (clamped: padding rows hold valid indices) and their
    timesteps and coefficients, gathered once for the round."""
    last = len(tables.timesteps) - 1
    steps = (n.unsqueeze(1) + arange(0, L + 1, n.device)).clamp(max=last)
    return DraftWindow(steps, tables.timesteps[steps], tables.coefficients[steps], sample_dims)


def draft(drafter: Drafter, slots, x, window: DraftWindow, noise, shape):
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


def evaluate(target: CountingTarget, window: DraftWindow, states, evaluated, wants_features: bool, schedule, slots):
    """The ONE batched target call of the round on rows X_0..X_L of every chain, and the target's x0
    estimate and step mean at each row. Large padded batches evaluate only the `evaluated` rows."""
    C, L1 = states.shape[:2]
    shape = states.shape[2:]
    flat = states.reshape(C * L1, *shape)
    flat_t = window.timesteps.reshape(-1)
    labels = target.slot_labels(slots)
    labels = None if labels is None else labels.repeat_interleave(L1)  # each chain's label on its L+1 rows
    if C * L1 >= COMPACT_MIN_ROWS and not torch.compiler.is_compiling():  # compiled: static shapes
        needed = evaluated.reshape(-1).nonzero().squeeze(1)  # the round's second host read, large batches only
        out = target.evaluate(flat[needed], flat_t[needed], wants_features, None if labels is None else labels[needed])
        out, features = out if wants_features else (out, None)
        out = flat.new_zeros(C * L1, *out.shape[1:]).index_copy_(0, needed, out.to(flat.dtype))
        if features is not None:
            features = features.new_zeros(C * L1, *features.shape[1:]).index_copy_(0, needed, features)
    else:
        out = target.evaluate(flat, flat_t, wants_features, labels)
        out, features = out if wants_features else (out, None)
    x0, means = denoised_and_mean(window.coefficients, flat, out, schedule)
    unflat = lambda v: None if v is None else v.reshape(C, L1, *v.shape[1:])  # noqa: E731
    return unflat(out), unflat(features), unflat(x0), unflat(means)


def denoised_and_mean(coefficients, x, out, schedule):
    """The target's x0 estimate and step mean at states x (rows, *shape) from its outputs, with each
    row's transition coefficients (any shape holding rows x 5 values, in row order)."""
    coef = StepCoefficients(*coefficients.reshape(len(x), 5, *([1] * (x.dim() - 1))).unbind(1))
    x0 = denoise(coef, x, out, schedule)
    return x0, step_mean(coef, x, x0)


def evaluate_plain(target: CountingTarget, tables, x, n, wants_features: bool, schedule, slots):
    """A plain round's target call on the chains' states X (C, *shape) in `slots` at steps n, and the
    target's x0 estimate, step mean and step std there: (outputs, features or None, x0, mean, std)."""
    out = target.evaluate(x, tables.timesteps[n], wants_features, target.slot_labels(slots))
    out, features = out if wants_features else (out, None)
    x0, mean = denoised_and_mean(tables.coefficients[n], x, out, schedule)
    return out, features, x0, mean, tables.std[n]


@dataclass(frozen=True)
class HostRead:
    """The one host read of a round, and what the host decides from it."""

    any_finished: bool  # retire chains (and admit waiting seeds)
    next_window: int  # the next round's longest window
    advanced: int  # steps committed by all chains this round
    needs_correction: bool  # a chain stopped short: draw the deferred corrections


def host_flags(finished, lengths, advanced, needs_correction) -> torch.Tensor:
    """What the host reads after a round, in one small tensor (`read_flags`)."""
    flags = [finished.sum(), lengths.max(), advanced.sum()]
    if needs_correction is not None:
        flags.append(needs_correction.sum())
    return torch.stack(flags)


def read_flags(flags: torch.Tensor) -> HostRead:
    """One device-to-host copy of the round's flags (`host_flags`)."""
    any_finished, next_window, total, *needs = flags.tolist()
    return HostRead(bool(any_finished), int(next_window), int(total), bool(needs and needs[0]))


def read_host(finished, lengths, advanced, needs_correction) -> HostRead:
    """One device-to-host copy of four counts."""
    return read_flags(host_flags(finished, lengths, advanced, needs_correction))


@dataclass
class RoundRecord:
    """What one round did, for observers (`on_round_end`). Tensors are per live chain (C,), in the
    order of `slots`; `verification` is what the drafter saw (states, outputs, accepted, ...)."""

    index: int  # the sampler's round counter, from 0
    slots: torch.Tensor
    steps: torch.Tensor  # step index of each chain at the start of the round
    lengths: torch.Tensor  # each chain's window (0: a plain target step)
    window: int  # the round's longest window (its padded width; 0: every chain took a plain target step)
    accepted: torch.Tensor  # tau: drafts committed
    advanced: torch.Tensor  # steps committed (tau, plus the bonus / correction step if one followed)
    finished: torch.Tensor  # bool: the chain reached its last step
    verification: Verification
    host: HostRead
    next_state: torch.Tensor | None = None  # (C, *shape) the states the round committed
    compiled: bool = False  # the round compiled a graph (its wall-clock is mostly compilation)


@dataclass
class RoundSetup:
    """What the engine needs besides the model: the plan's tables, the sample shape and the options."""

    schedule: object
    plan: object
    tables: object
    shape: tuple[int, ...]
    model_dtype: torch.dtype
    dtype: torch.dtype
    noise_buffer: int
    refill: bool
    labels: torch.Tensor | None = None  # a conditional target's label per seed (`sampling.conditioning`)
    guidance_scale: float = 1.0


@dataclass
class RoundNoiseDraw:
    """The noise of one round for every live chain, cut to the round's longest window L."""

    draft: torch.Tensor  # (C, L, *shape) Z_1..Z_L
    xi: torch.Tensor  # (C, numel) the bonus / correction Gaussian
    accept: torch.Tensor  # (C, L) accept uniforms
    residual: torch.Tensor  # (C,) the residual's uniform


class RoundEngine:
    """Runs speculative rounds over a `SlotPool` until every seed has its sample.

    Args:
        model: the target network, `model(x, t)`.
        seeds: int64 tensor of seeds, one per sample, on the sampling device.
        capacity: slots (chains evaluated together).
        drafter, verifier, policy: a `Drafter`, a `verifiers.Verifier`, a `windows.WindowPolicy`.
        setup: the plan's tables, the sample shape and the options (`RoundSetup`).
    """

    def __init__(self, model, seeds: torch.Tensor, capacity: int, drafter: Drafter, verifier, policy,
                 setup: RoundSetup):
        self.setup, self.drafter, self.verifier, self.policy = setup, drafter, verifier, policy
        self.pool = SlotPool(seeds, capacity, setup.shape, setup.dtype, setup.labels, setup.plan.initial_std)
        self.target = CountingTarget(model, setup.tables, self.pool.all_slots, setup.model_dtype, setup.dtype,
                                     self.pool.labels, setup.guidance_scale)
        drafter.bind(DraftContext(self.target, setup.schedule, setup.plan, setup.shape, capacity, seeds.device,
                                  setup.dtype, all_slots=self.pool.all_slots, labels=self.pool.labels,
                                  guidance_scale=setup.guidance_scale))
        numel = int(torch.Size(setup.shape).numel())
        self._longest_window = policy.start(setup.plan, capacity, seeds.device)
        noise_window = getattr(policy, "noise_window", lambda: self._longest_window)()
        self.noise = RoundNoise(capacity, noise_window, numel, seeds.device, max_elements=setup.noise_buffer)
        self._step_noise: RoundNoise | None = None  # made at the first plain round that needs it
        self.rounds = self.draft_calls = 0
        self._live_changed = True  # then the live slots, their windows and the longest are recomputed
        self._slots = self._lengths = None
        self._longest = 0
        self._last_plain = False
        self.compiled = None  # a `compiled.CompiledRounds`, set by the sampler with compile=True
        self._admit(list(range(capacity)))

    def _admit(self, free: list[int]) -> None:
        admitted = self.pool.admit(free)
        if admitted is not None:
            slots, seed_idx, slot_list = admitted
            self.target.per_slot[slots] = 0
            for noise in (self.noise, self._step_noise):
                noise is None or noise.admit(slots, self.pool.seeds[seed_idx], slot_list)
            self.drafter.join(slots)
            self.policy.join(slots)

    def _windows(self, slots: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Each chain's window for its next round (0: a plain target step)."""
        return self.policy.windows(slots, steps, self.drafter.ready(slots).to(steps.device))

    def _noise_buffer(self, slots, L: int) -> RoundNoise:
        """The buffer this round draws from, its expired slots filled first (`noise.RoundNoise`): the
        full window's, or in a plain round after a plain round, when the full window's draws ran out,
        the bonus Gaussian's alone."""
        if L > self.noise.window:
            self._widen_noise(L)
        live, buffer = self.pool.live, self.noise
        expired = buffer.expired(self.rounds, live)
        plain_again, self._last_plain = self._last_plain and L == 0, L == 0
        if expired and plain_again:  # plain rounds in a row: drafting may not come back soon
            buffer = self._plain_noise()
            expired = buffer.expired(self.rounds, live)
        if expired:
            fill = slots if len(expired) == len(live) else torch.tensor(expired, device=slots.device)
            buffer.fill(fill, self.pool.rounds[fill], self.rounds, expired)
        return buffer

    def _widen_noise(self, L: int) -> None:
        """A round drafts more steps than the noise buffer holds (a policy that began with short windows,
        `noise_window`): a wider buffer, at least twice as wide, drawn afresh. Draws are keyed, so the
        numbers are those the narrower buffer would have given; only the hashing of unused drafts differs."""
        self.noise = self._noise_like(min(self._longest_window, max(L, 2 * self.noise.window)))

    def _plain_noise(self) -> RoundNoise:
        """Plain rounds need only the bonus Gaussian: drawn apart once the full window's draws have run
        out, so that a policy taking plain steps does not hash drafts it never makes."""
        if self._step_noise is None:
            self._step_noise = self._noise_like(0)
        return self._step_noise

    def _noise_like(self, window: int) -> RoundNoise:
        """An empty noise buffer for `window` drafts per round, for the chains in the slots now."""
        noise = RoundNoise(len(self.pool.all_slots), window, self.noise.numel, self.noise.seed_keys.device,
                           max_elements=self.setup.noise_buffer)
        noise.seed_keys.copy_(self.noise.seed_keys)
        return noise

    def _round_noise(self, slots, chain_rounds, L: int) -> RoundNoiseDraw:
        noise = self._noise_buffer(slots, L)
        draft_noise, xi, accept_u, residual_u = noise.draw(slots, chain_rounds, slots is self.pool.all_slots)
        if L < noise.window:  # the end of the chains: a shorter window
            draft_noise, accept_u = draft_noise[:, :L], accept_u[:, :L]
        draft_noise = draft_noise.to(self.setup.dtype).reshape(len(slots), L, *self.setup.shape)
        return RoundNoiseDraw(draft_noise, xi.to(self.setup.dtype), accept_u, residual_u)

    def _draft(self, slots, x, n, window: DraftWindow, lengths, noise):
        if window.length > 0:  # else every chain takes a plain target step (warm-up, or the chain's last step)
            with self.target.drafting(lengths):
                self.drafter.start_round(slots, x, n)
        return draft(self.drafter, slots, x, window, noise, self.setup.shape)

    def _rows_to_evaluate(self, n, lengths, L: int):
        """(evaluated (C, L+1): rows in the chain's window that a step follows, has_next (C,): a step
        follows X_{L'})."""
        room = (self.setup.plan.num_steps - 1) - n  # steps that follow X_0
        evaluated = arange(0, L + 1, n.device) <= torch.minimum(lengths, room).unsqueeze(1)
        return evaluated, lengths <= room

    def _verify(self, noise: RoundNoiseDraw, window, states, draft_means, target_means, lengths, has_next):
        C, L1 = states.shape[:2]
        dim = noise.xi.shape[-1]
        return self.verifier(
            noise.draft.reshape(C, L1 - 1, dim), states.reshape(C, L1, dim), draft_means.reshape(C, L1 - 1, dim),
            target_means.reshape(C, L1, dim), self.setup.tables.std[window.steps], lengths, has_next,
            noise.accept, noise.xi, noise.residual,
        )

    def run_round(self) -> RoundRecord:
        """draft -> evaluate -> verify -> the host read -> commit (and retire / admit). A round in which
        no chain drafts is a plain target step (`_plain_round`) when the verifier allows it."""
        if self.compiled is not None:
            return self._run_compiled_round()
        pool = self.pool
        if self._live_changed:  # the live slots, their windows and the longest window (a host read)
            self._live_changed = False
            self._slots = pool.live_slots()
            self._lengths = self._windows(self._slots, pool.pick(pool.step, self._slots))
            self._longest = int(self._lengths.max())
        slots, lengths, L = self._slots, self._lengths, self._longest
        x, n, chain_rounds = (pool.pick(t, slots) for t in (pool.state, pool.step, pool.rounds))
        noise = self._round_noise(slots, chain_rounds, L)
        self.draft_calls += L
        if L == 0 and self.verifier.plain_steps:
            result, verification = self._plain_round(slots, x, n, noise.xi)
        else:
            result, verification = self._speculative_round(slots, x, n, lengths, L, noise)
        self.drafter.observe(slots, verification)
        return self._end_round(slots, n, lengths, L, result, verification)

    def _speculative_round(self, slots, x, n, lengths, L: int, noise: RoundNoiseDraw):
        window, states, draft_means = self._drafts(slots, x, n, lengths, L, noise)
        return self._check_drafts(slots, n, lengths, noise, window, states, draft_means)

    def _drafts(self, slots, x, n, lengths, L: int, noise: RoundNoiseDraw):
        """The round's window and the chains' drafts: (window, states (C, L+1, *shape), draft means)."""
        window = window_of(self.setup.tables, n, L, len(self.setup.shape))
        return (window, *self._draft(slots, x, n, window, lengths, noise.draft))

    def _check_drafts(self, slots, n, lengths, noise: RoundNoiseDraw, window, states, draft_means):
        """The target call on the drafts and their verification: (outcome, what the drafter sees)."""
        evaluated, has_next = self._rows_to_evaluate(n, lengths, window.length)
        out, features, x0, target_means = evaluate(self.target, window, states, evaluated, self.drafter.wants_features,
                                                   self.setup.schedule, slots)
        result = self._verify(noise, window, states, draft_means, target_means, lengths, has_next)
        return result, Verification(states=states, steps=n, outputs=out, features=features, evaluated=evaluated,
                                    accepted=result.accepted, denoised=x0, means=target_means)

    def _plain_round(self, slots, x, n, xi):
        """Every chain (in `slots`) takes one ancestral step: the target call on the chains' states and
        X' = mu_P(X) + s xi, the same numbers the verifiers give a window of 0 (its bonus step),
        without their drafting and verification work."""
        C = len(x)
        out, features, x0, mean, std = evaluate_plain(self.target, self.setup.tables, x, n,
                                                      self.drafter.wants_features, self.setup.schedule, slots)
        next_state = torch.addcmul(mean.reshape(C, -1), std.to(xi.dtype).unsqueeze(-1), xi)
        ones, zeros = torch.ones(C, 1, dtype=torch.bool, device=n.device), n * 0
        result = RoundOutcome(accepted=zeros, next_state=next_state, advanced=zeros + 1)
        unsqueeze = lambda v: None if v is None else v.unsqueeze(1)  # noqa: E731
        return result, Verification(states=x.unsqueeze(1), steps=n, outputs=out.unsqueeze(1),
                                    features=unsqueeze(features), evaluated=ones, accepted=zeros,
                                    denoised=x0.unsqueeze(1), means=mean.unsqueeze(1))

    def _end_round(self, slots, n, lengths, L: int, result, verification) -> RoundRecord:
        """Learn, choose the next windows, the host read, commit, retire."""
        pool, setup = self.pool, self.setup
        new_step = n + result.advanced
        finished = new_step >= setup.plan.num_steps
        self.policy.learn(slots, n, lengths, result.accepted)  # before it chooses the next windows
        self._lengths = self._windows(slots, new_step)
        host = read_host(finished, self._lengths, result.advanced, result.needs_correction)
        self._longest = host.next_window
        committed = result.settle(host.needs_correction).reshape(len(slots), *setup.shape)
        pool.commit(slots, committed, new_step)
        record = RoundRecord(self.rounds, slots, n, lengths, L, result.accepted, result.advanced, finished,
                             verification, host, next_state=committed)
        self.rounds += 1
        if host.any_finished:
            self._retire(slots[finished])
        return record

    def _retire(self, done: torch.Tensor) -> None:
        free = self.pool.retire(done, self.target.per_slot)
        if self.setup.refill or not self.pool.live:
            self._admit(free if self.setup.refill else list(range(len(self.pool.all_slots))))
        self._live_changed = True

    # --- compiled rounds (`compiled.py`): every slot, padded windows, one graph per shape -----------------
    def _run_compiled_round(self) -> RoundRecord:
        pool, policy, capacity = self.pool, self.policy, len(self.pool.all_slots)
        if self._live_changed:
            self._live_changed = False
            self._slots = pool.live_slots()
            self._live = torch.zeros(capacity, dtype=torch.bool, device=self._slots.device).index_fill_(
                0, self._slots, True)
            self._lengths = self._scatter(self._windows(self._slots, pool.pick(pool.step, self._slots)))
            self._longest = int(self._lengths.max())
        slots, live, lengths, L = self._slots, self._live, self._lengths, self._longest
        width = policy.padded_width(L, self._longest_window)
        noise = self._noise_buffer(slots, width)
        n = pool.step
        out = self.compiled.run(pool.state, n, lengths, live, pool.rounds, (noise.gaussians, noise.uniforms,
                                noise.first_round), width, L == 0 and self.verifier.plain_steps)
        compiled_now = self.compiled.clock.compiled_last
        if "flags" not in out:  # the policy learns and chooses eagerly, on the live chains
            pick = lambda v: pool.pick(v, slots)  # noqa: E731
            policy.learn(slots, pick(n), pick(lengths), pick(out["accepted"]))
            out["next_lengths"] = self._scatter(self._windows(slots, pick(out["new_step"])))
            out["flags"] = host_flags(out["finished"], out["next_lengths"], out["advanced"], out["needs_correction"])
        host = read_flags(out["flags"])
        self.draft_calls += L
        self._lengths, self._longest = out["next_lengths"], host.next_window
        pool.state, pool.step, pool.rounds = out["next_state"], out["new_step"], out["rounds"]
        record = self._compiled_record(slots, n, lengths, L, out, host, compiled_now)
        self.rounds += 1
        if host.any_finished:
            self._retire(pool.all_slots[out["finished"]])
        return record

    def _scatter(self, lengths: torch.Tensor) -> torch.Tensor:
        """Windows of the live chains -> windows of every slot (0 where no chain is live)."""
        if self._slots is self.pool.all_slots:
            return lengths
        return torch.zeros(len(self.pool.all_slots), dtype=lengths.dtype, device=lengths.device).index_copy_(
            0, self._slots, lengths)

    def _compiled_record(self, slots, n, lengths, L: int, out, host, compiled_now: bool) -> RoundRecord:
        """The round's record on the live chains (a compiled round computed every slot)."""
        pick = lambda v: None if v is None else self.pool.pick(v, slots)  # noqa: E731
        v = out["verification"]
        verification = Verification(states=pick(v.states), steps=pick(v.steps), outputs=pick(v.outputs),
                                    features=pick(v.features), evaluated=pick(v.evaluated), accepted=pick(v.accepted),
                                    denoised=pick(v.denoised), means=pick(v.means))
        return RoundRecord(self.rounds, slots, pick(n), pick(lengths), L, pick(out["accepted"]), pick(out["advanced"]),
                           pick(out["finished"]), verification, host, next_state=pick(out["next_state"]),
                           compiled=compiled_now)
