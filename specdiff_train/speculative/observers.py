"""Observers of the speculative rounds: anything with `on_round_end(record)` (a `engine.RoundRecord`).

Pass your own with `speculative_sample(..., callbacks=[...])`; they run after the built-in ones (the
per-step transition counts behind the statistics and the progress bar), in the order given:

    class AcceptedPerRound:
        def __init__(self):
            self.accepted = []

        def on_round_end(self, record):
            self.accepted.append(record.accepted.sum())   # a tensor: no host read in the loop

A record's tensors are per live chain in the order of `record.slots`; `record.host` holds the
round's host read (plain Python numbers). Keep observers to whole-tensor work: a `.item()` in
`on_round_end` is a host sync every round.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


class TransitionCounts:
    """Per step, how many transitions were drafted and accepted (acceptance per diffusion time).

    A round only appends (step, window, tau) of its chains (one operation); the counts are made from
    the log every `fold_every` rounds and at the end."""

    def __init__(self, num_steps: int, device, fold_every: int = 256):
        self.num_steps, self.fold_every = num_steps, fold_every
        self.counts = torch.zeros(num_steps, 2, dtype=torch.int64, device=device)  # (drafted, accepted)
        self.entries: list[torch.Tensor] = []

    def on_round_end(self, record) -> None:
        self.entries.append(torch.stack([record.steps, record.lengths, record.accepted], 1))
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

    def per_step(self) -> tuple[list[int], list[int]]:
        """(drafted, accepted) transitions at each step of the plan."""
        self.fold()
        drafted, accepted = self.counts.unbind(1)
        return drafted.tolist(), accepted.tolist()


class ProgressBar:
    """A tqdm bar over committed steps (reads only the round's host read)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="step")

    def on_round_end(self, record) -> None:
        self.bar.update(record.host.advanced)

    def close(self) -> None:
        self.bar.close()
