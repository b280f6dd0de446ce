"""Window policies: how many steps each chain drafts in its next round (ALGORITHMS.md section 10).

A policy sees only what is known before the round (each chain's steps left, whether its drafter is
ready, and, as an observer, every past round's record), never the round's own target outputs, so any
policy keeps the sampler exact. A window of 0 is a plain target step through the same round.
"""
from __future__ import annotations

import torch

MAX_WINDOW = 1 << 15  # positions of a round share a 16-bit field of the noise counter


class WindowPolicy:
    """Base class. `start(plan)` is called once per sampling run and returns the longest window the
    policy will ask for (it sizes the noise buffers); `windows` is called with the live chains before
    each round. A policy may also define `on_round_end(record)` to learn from past rounds."""

    def start(self, plan) -> int:
        raise NotImplementedError

    def windows(self, steps_left: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
        """Each chain's window (C,) int64, at most `steps_left` (stochastic steps it has left) and 0
        where the drafter is not `ready` (a bool (C,) tensor)."""
        raise NotImplementedError

    def describe(self) -> int | str:
        return type(self).__name__


class FixedWindow(WindowPolicy):
    """The same window for every chain and round, shortened at the end of the chain.

    Args:
        window: drafted steps per round (>= 1).
    """

    def __init__(self, window: int):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an int >= 1 (drafted steps per round), got {window!r}")
        if window >= MAX_WINDOW:
            raise ValueError(f"window: at most {MAX_WINDOW - 1}, got {window}")
        self.window = self.longest = window

    def start(self, plan) -> int:
        self.longest = min(self.window, plan.num_stochastic_steps)  # no window outlasts the stochastic steps
        return self.longest

    def windows(self, steps_left, ready):
        return steps_left.clamp(min=0, max=self.longest) * ready

    def describe(self) -> int:
        return self.window


def as_window_policy(window) -> WindowPolicy:
    """A `WindowPolicy` from the `window` option: an int (a fixed window) or a policy."""
    return window if isinstance(window, WindowPolicy) else FixedWindow(window)
