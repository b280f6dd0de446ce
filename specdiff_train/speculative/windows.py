"""Window policies: how many steps each chain drafts in its next round (ALGORITHMS.md section 10).

A policy sees only what is known before the round (each chain's steps left, whether its drafter is
ready, and, as an observer, every past round's record), never the round's own target outputs, so any
policy keeps the sampler exact. A window of 0 is a plain target step through the same round.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .._aranges import arange
from .costs import CostModel, MeasuredRoundTimes

MAX_WINDOW = 1 << 15  # positions of a round share a 16-bit field of the noise counter


class WindowPolicy:
    """Base class. The engine calls `start` once per sampling run, `join(slots)` when new chains take
    slots, `learn` with each round's outcome right after its verification, and `windows` with the live
    chains for their next round. A policy that defines `on_round_end(record)` also gets every round's
    full record as an observer (after the next windows are chosen).

    `capturable`: `learn` and `windows` are whole-tensor code whose Python state does not change during
    a run, so that a compiled round (`compiled.py`) captures them in its graph; otherwise they run eagerly
    between compiled rounds."""

    capturable = False
    round_state: tuple[str, ...] = ()  # as `Drafter.round_state`: the tensors a captured `learn` modifies

    def start(self, plan, capacity: int, device) -> int:
        """Set up for a run of `plan` with `capacity` slots; return the longest window the policy will
        ask for (it sizes the noise buffers). Subclasses call this first (it sets `steps_left`'s count)."""
        self.stochastic_steps = plan.num_stochastic_steps
        return plan.num_stochastic_steps

    def join(self, slots: torch.Tensor) -> None:
        """New chains occupy `slots`: forget what the previous occupants left there."""

    def learn(self, slots: torch.Tensor, steps: torch.Tensor, lengths: torch.Tensor, accepted: torch.Tensor) -> None:
        """A round's outcome per chain: its step at the start, its window, the drafts accepted."""

    def windows(self, slots: torch.Tensor, steps: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
        """Each live chain's window (C,) int64 for its next round: at most its stochastic steps left
        (`steps_left(steps)`), 0 where the drafter is not `ready` (a bool (C,) tensor)."""
        raise NotImplementedError

    def steps_left(self, steps: torch.Tensor) -> torch.Tensor:
        return self.stochastic_steps - steps

    def describe(self) -> int | str:
        return type(self).__name__

    def padded_width(self, window: int, longest: int) -> int:
        """The width a compiled round pads a round's longest window to (few widths, few graphs): the
        next power of two, at most `longest` (the longest window of the run); 0 stays 0 (a plain step)."""
        return window if window == 0 else min(longest, 1 << (window - 1).bit_length())


def _check_window(window, field: str = "window") -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{field}: expected an int >= 1 (drafted steps per round), got {window!r}")
    if window >= MAX_WINDOW:
        raise ValueError(f"{field}: at most {MAX_WINDOW - 1}, got {window}")
    return window


class FixedWindow(WindowPolicy):
    """The same window for every chain and round, shortened at the end of the chain.

    Args:
        window: drafted steps per round (>= 1).
    """

    capturable = True

    def __init__(self, window: int):
        self.window = self.longest = _check_window(window)

    def start(self, plan, capacity, device) -> int:
        self.longest = min(self.window, super().start(plan, capacity, device))  # none outlasts the stochastic steps
        return self.longest

    def windows(self, slots, steps, ready):
        return self.steps_left(steps).clamp(min=0, max=self.longest) * ready

    def describe(self) -> int:
        return self.window

    def padded_width(self, window: int, longest: int) -> int:
        return window and longest  # one graph: the windows shortened at the chains' ends are padded


class HeuristicWindow(WindowPolicy):
    """The schedule of Hugging Face transformers' assisted generation ("heuristic"), per chain: after
    a round whose drafts were all accepted the chain's window grows by 2, after any rejection it
    shrinks by 1 (never below 1). A baseline for adaptive windows (ALGORITHMS.md section 10).

    Args:
        initial: every chain's first window.
        max_window: the longest window (sizes the noise buffers).
    """

    capturable = True
    round_state = ("window",)

    def __init__(self, initial: int = 4, max_window: int = 16):
        self.initial = _check_window(initial, "initial")
        self.max_window = _check_window(max_window, "max_window")
        if initial > max_window:
            raise ValueError(f"initial: {initial} exceeds max_window={max_window}")

    def start(self, plan, capacity, device) -> int:
        self.longest = min(self.max_window, super().start(plan, capacity, device))
        self.window = torch.full((capacity,), min(self.initial, self.longest), dtype=torch.int64, device=device)
        return self.longest

    def join(self, slots):
        self.window[slots] = min(self.initial, self.longest)

    def windows(self, slots, steps, ready):
        return torch.minimum(self.steps_left(steps).clamp(min=0), self.window[slots]) * ready

    def learn(self, slots, steps, lengths, accepted) -> None:
        window = self.window[slots]
        grown = torch.where(accepted == lengths, window + 2, window - 1).clamp(min=1, max=self.longest)
        self.window[slots] = torch.where(lengths > 0, grown, window)  # plain target steps teach nothing

    def describe(self) -> str:
        return f"heuristic({self.initial}-{self.max_window})"


class CostAwareWindow(WindowPolicy):
    """`window="auto"`: before each round, the window that maximises the steps all live chains are
    expected to commit per second of the round (ALGORITHMS.md section 10). One window for the batch
    (each chain's shortened at its end); 0 is a plain target step, chosen where drafting does not pay.

    Expected steps of a chain at step n with window L: 1 + sum_{i<L} prod_{j<=i} a(n + j), where a(s)
    is the probability that a draft of transition s passes, estimated from this run's rounds: drafts
    passed / drafts tried at step s by all chains (a draft after the first rejection was not tried),
    shrunk towards the chain's recent pass rate (which starts at `prior`), or towards `prior` itself
    when it gives one value per step. Block verification commits at least that in expectation.

    The seconds of each window come from `cost_model`, or are measured as the sampler runs
    (`costs.MeasuredRoundTimes`): until a drafting round is timed, the window fills about `FIRST_ROWS`
    rows (7 at batch 1, 3 at batch 2, 1 from batch 4), and a plain step follows it while it is timed
    (the round after it is chosen before its time is known); then untimed windows are estimated from the
    timed ones (a plain step optimistically, so that it gets tried; longer windows one doubling at a
    time, where the times' slope says they may pay), and every `RETIME_EVERY`-th round takes the
    runner-up if it is within `RETIME_GAP` of the best, so that a near tie decided by one slow round is
    timed again. A policy object given to several runs of the same plan keeps what it learned (pass
    counts and round times); `window="auto"` starts afresh each run.

    The window depends only on rounds already verified (and, when measured, their wall-clock), never
    on the round it is chosen for, so sampling stays exact (in law). With an explicit `cost_model` a
    run is reproducible: the same seeds and options give the same samples.

    Args:
        max_window: the longest window (>= 1).
        cost_model: a `costs.CostModel` (or its mapping), or None to measure round times.
        prior: a draft's pass probability before any is observed, in (0, 1): one number or one per step
            of the plan (e.g. a validation profile).
        prior_weight: how many observed drafts the prior is worth (> 0).
    """

    FIRST_ROWS = 8  # measured costs: the first drafting round's window fills about this many rows
    FORGET = 0.15  # the weight of a chain's latest draft in its recent pass rate
    RETIME_EVERY = 10  # measured costs: every 10th round takes the runner-up window if it is a near tie
    RETIME_GAP = 0.1  # ... within 10% of the best's steps per second

    def __init__(self, max_window: int = 16, cost_model: CostModel | dict | None = None,
                 prior: float | Sequence[float] = 0.8, prior_weight: float = 2.0):
        self.max_window = _check_window(max_window, "max_window")
        self.cost_model = None if cost_model is None else CostModel.from_dict(cost_model)
        self.prior = _check_prior(prior)
        if not (isinstance(prior_weight, (int, float)) and math.isfinite(prior_weight) and prior_weight > 0):
            raise ValueError(f"prior_weight: expected a number > 0 (observed drafts the prior is worth), "
                             f"got {prior_weight!r}")
        self.prior_weight = float(prior_weight)

    def start(self, plan, capacity, device) -> int:
        self.longest = min(self.max_window, super().start(plan, capacity, device))
        self.capacity = capacity
        key = (plan.num_steps, plan.num_stochastic_steps, capacity, torch.device(device))
        if getattr(self, "_key", None) == key:  # the same plan again: continue from what was learned
            self._measured is None or self._measured.start()
            return self.longest
        self._key, N, dtype = key, plan.num_steps, torch.float64
        prior = torch.as_tensor(self.prior, dtype=dtype)
        if prior.ndim and len(prior) != N:
            raise ValueError(f"prior: {len(prior)} values for a plan of {N} steps; give one per step or one number")
        self.prior_t = prior.to(device)
        self.passed, self.tried = torch.zeros(N, dtype=dtype, device=device), torch.zeros(N, dtype=dtype, device=device)
        self.recent = torch.zeros(capacity, dtype=dtype, device=device)  # each chain's recent pass rate
        self._in_chain = arange(0, self.longest, device) < (plan.num_stochastic_steps - arange(0, N, device)).unsqueeze(1)
        self._measured = MeasuredRoundTimes() if self.cost_model is None else None
        self._measured is None or self._measured.start()
        self._costs: dict[int, torch.Tensor] = {}
        self._plain_pending, self._device, self._rounds, self._next_plain = False, device, 0, False
        self._drafting_pending = False  # measured: a first drafting round is on its way, not yet timed
        self.join(arange(0, capacity, device))
        return self.longest

    def join(self, slots) -> None:
        """A new chain's recent pass rate starts at the prior (at step 0 for a per-step prior)."""
        self.recent[slots] = (self.prior_t if self.prior_t.ndim == 0 else self.prior_t[0]).to(self.recent.dtype)

    def learn(self, slots, steps, lengths, accepted) -> None:
        """Count the drafts tried and passed at each step (all chains), and update each chain's recent
        pass rate: an average over its drafts in step order with weight FORGET on the latest, so that a
        chain entering steps where drafts fail (near the data) shortens its windows within a round or two."""
        self._rounds += 1
        if self._next_plain:  # a plain round drafts nothing: nothing to count
            return
        offsets = arange(0, self.longest, steps.device)
        tried_count = torch.minimum(accepted + 1, lengths)  # drafts up to the first rejection
        tried, passed = offsets < tried_count.unsqueeze(1), offsets < accepted.unsqueeze(1)
        at = (steps.unsqueeze(1) + offsets).clamp(max=len(self.tried) - 1).reshape(-1)
        self.tried.index_add_(0, at, tried.reshape(-1).to(self.tried.dtype))
        self.passed.index_add_(0, at, passed.reshape(-1).to(self.passed.dtype))
        keep = 1 - self.FORGET  # tau passes, then the failure if any: the failure is the latest draft
        after_passes = keep ** (tried_count - accepted).to(self.recent.dtype)
        recent = keep ** tried_count.to(self.recent.dtype) * self.recent[slots] + after_passes * (1 - keep ** accepted)
        self.recent[slots] = recent

    def expected_steps(self, slots, steps) -> torch.Tensor:
        """(C, longest + 1): the steps each chain is expected to commit with window 0..longest."""
        steps = steps.clamp(max=len(self.tried) - 1)  # a chain that just finished is retired before the round
        at = (steps.unsqueeze(1) + arange(0, self.longest, steps.device)).clamp(max=len(self.tried) - 1)
        prior = self.prior_t[at] if self.prior_t.ndim else self.recent[slots].unsqueeze(1)
        rate = (self.passed[at] + self.prior_weight * prior) / (self.tried[at] + self.prior_weight)
        reach = torch.cumprod(rate, 1) * self._in_chain[steps]  # P(draft i of the window passes)
        return torch.nn.functional.pad(reach.cumsum(1), (1, 0)) + 1

    def on_round_end(self, record) -> None:
        # The next round is plain when the host read says so and no chain finished (then the windows
        # would be chosen again for the new set of chains).
        self._next_plain = record.host.next_window == 0 and not record.host.any_finished
        measured = self._measured
        if measured is None:
            return
        # A round that compiled a graph (compile=True) timed the compiler, not the round.
        if measured.observe(record.window, len(record.slots) == self.capacity and not record.compiled):
            self._costs.clear()  # rebuilt from the new times at the next choice
        self._drafting_pending = record.host.next_window > 0 and not measured.drafting_timed
        pending = record.host.next_window == 0 and 0 not in measured.fastest  # a plain round chosen, not yet timed
        if pending != self._plain_pending:
            self._plain_pending = pending
            self._costs.clear()

    def _round_costs(self, chains: int) -> torch.Tensor:
        if chains not in self._costs:
            if self.cost_model is not None:
                secs = self.cost_model.round_times(chains, self.longest)
            else:  # a plain round once chosen is not chosen again until its time is known
                secs = self._measured.round_times(chains, self.longest)
                secs[0] = math.inf if self._plain_pending else secs[0]
            secs = torch.tensor(secs, dtype=torch.float64)
            if self._device is not None and torch.device(self._device).type == "cuda":
                secs = secs.pin_memory().to(self._device, non_blocking=True)  # no stream sync
            self._costs[chains] = secs.to(self._device)
        return self._costs[chains]

    def noise_window(self) -> int:
        """The engine's first noise buffer holds this many drafts per round (it widens as windows grow):
        measured, the first window; a large batch that mostly takes plain steps or short windows then
        does not hash the noise of 16 drafts per chain and round."""
        return self._first_window() if self.cost_model is None else self.longest

    def _first_window(self) -> int:
        return min(max(1, self.FIRST_ROWS // self.capacity - 1), self.longest)

    def windows(self, slots, steps, ready):
        left = self.steps_left(steps).clamp(min=0)
        if self._measured is not None and not self._measured.drafting_timed:  # nothing timed yet
            first = 0 if self._drafting_pending else self._first_window()  # a plain step meanwhile
            return left.clamp(max=first) * ready
        rate = self.expected_steps(slots, steps).sum(0) / self._round_costs(len(slots))  # steps per second
        if self._measured is not None and self._rounds % self.RETIME_EVERY == self.RETIME_EVERY - 1:
            return torch.minimum(left, self._near_runner_up(rate)) * ready
        return torch.minimum(left, rate.argmax()) * ready

    def _near_runner_up(self, rate: torch.Tensor) -> torch.Tensor:
        """The second-best window if it is within RETIME_GAP of the best (a near tie, which a stale time
        could decide), else the best: re-timing a window that is far behind would only cost time."""
        top, index = rate.topk(2)
        return torch.where(top[1] >= (1 - self.RETIME_GAP) * top[0], index[1], index[0])

    def describe(self) -> str:
        return "auto" if self.max_window == 16 else f"auto({self.max_window})"


def _check_prior(prior):
    values = [prior] if isinstance(prior, (int, float)) else list(prior)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values):
        raise ValueError(f"prior: expected a pass probability in (0, 1), or one per step, got {prior!r}")
    return prior if isinstance(prior, (int, float)) else tuple(float(v) for v in values)


WINDOW_POLICIES = {"auto": CostAwareWindow, "heuristic": HeuristicWindow}


def as_window_policy(window, cost_model=None) -> WindowPolicy:
    """A `WindowPolicy` from the `window` option: an int (a fixed window), "auto" (`CostAwareWindow`,
    with `cost_model` if given), "heuristic" (`HeuristicWindow`) or a policy."""
    if cost_model is not None and window != "auto":
        raise ValueError(f"cost_model: only window='auto' uses a cost model (window={window!r}); drop cost_model "
                         "or set window='auto'")
    if isinstance(window, WindowPolicy):
        return window
    if isinstance(window, str):
        if window not in WINDOW_POLICIES:
            raise ValueError(f"window: unknown policy {window!r}; use an int >= 1 (a fixed window), one of "
                             f"{sorted(WINDOW_POLICIES)} or a WindowPolicy")
        return CostAwareWindow(cost_model=cost_model) if window == "auto" else WINDOW_POLICIES[window]()
    return FixedWindow(window)
