"""Window policies: how many steps each chain drafts in its next round (ALGORITHMS.md section 10).

A policy sees only what is known before the round (each chain's steps left, whether its drafter is
ready, and, as an observer, every past round's record), never the round's own target outputs, so any
policy keeps the sampler exact. A window of 0 is a plain target step through the same round.
"""
from __future__ import annotations

import torch

MAX_WINDOW = 1 << 15  # positions of a round share a 16-bit field of the noise counter


class WindowPolicy:
    """Base class. The engine calls `start` once per sampling run, `join(slots)` when new chains take
    slots, `learn` with each round's outcome right after its verification, and `windows` with the live
    chains for their next round. A policy that defines `on_round_end(record)` also gets every round's
    full record as an observer (after the next windows are chosen)."""

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

    def __init__(self, window: int):
        self.window = self.longest = _check_window(window)

    def start(self, plan, capacity, device) -> int:
        self.longest = min(self.window, super().start(plan, capacity, device))  # none outlasts the stochastic steps
        return self.longest

    def windows(self, slots, steps, ready):
        return self.steps_left(steps).clamp(min=0, max=self.longest) * ready

    def describe(self) -> int:
        return self.window


class HeuristicWindow(WindowPolicy):
    """The schedule of Hugging Face transformers' assisted generation ("heuristic"), per chain: after
    a round whose drafts were all accepted the chain's window grows by 2, after any rejection it
    shrinks by 1 (never below 1). A baseline for adaptive windows (ALGORITHMS.md section 10).

    Args:
        initial: every chain's first window.
        max_window: the longest window (sizes the noise buffers).
    """

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


def as_window_policy(window) -> WindowPolicy:
    """A `WindowPolicy` from the `window` option: an int (a fixed window) or a policy."""
    return window if isinstance(window, WindowPolicy) else FixedWindow(window)
