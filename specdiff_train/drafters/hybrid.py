"""A hybrid drafter: per step, the drafter that accepts better there.

The Free Drafter (x0) accepts about as well as learned drafters far from the data and costs nothing; a learned
drafter earns its cost nearer the data. `HybridDrafter` runs both and drafts each step with one of them,
chosen per fifth of diffusion time from the validation acceptance recorded in the learned drafter's checkpoint
(`validation_acceptance`, written by training or by `scripts/record_acceptance.py`), or from a given choice.

Exactness: a draft's mean may be any function of what the drafter saw before the round and of the drafted
state, step and offset (ALGORITHMS.md section 1). The choice is a fixed table of the step index, set when
sampling starts and never changed by what a chain drew, so each drafted step's mean is one drafter's mean:
a valid proposal, verified as any other (tests: `tests/test_hybrid.py`, per step against the closed form).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config_io import read_checkpoint
from .base import DraftContext, Drafter, DraftStep, Verification
from .checkpoints import recorded_acceptance
from .distillation import NUM_BUCKETS, time_bucket
from .draftnet import DraftNetworkDrafter
from .medusa import MedusaDrafter
from .training_free import training_free_drafters

#: what the choice per fifth means (index 0: the fifth of diffusion time nearest the data, as the record)
LEARNED, FALLBACK = 1, 0


def choice_from_record(record: dict | None, where: str) -> list[int]:
    """Per fifth of diffusion time (index 0 nearest the data): LEARNED where the learned drafter's validation
    acceptance is higher than the Free Drafter's (x0) on the same states, else FALLBACK (it costs nothing)."""
    if record is None:
        raise ValueError(f"learned: {where} records no validation acceptance (written before it was recorded); "
                         "record it with `python scripts/record_acceptance.py --config <its training config> "
                         f"--ckpt {where}`, or pass choice=[...] (one of 0 = fallback, 1 = learned per fifth)")
    learned, free = record.get("acceptance"), record.get("free_acceptance")
    if free is None:
        raise ValueError(f"learned: {where}'s validation does not measure the Free Drafter on the same states "
                         "(only Medusa heads' validation does); pass choice=[...] (0 = fallback, 1 = learned per fifth)")
    return [LEARNED if a is not None and f is not None and a > f else FALLBACK for a, f in zip(learned, free)]


def check_choice(choice: Sequence[int]) -> list[int]:
    choice = [int(c) for c in choice]
    if len(choice) != NUM_BUCKETS or any(c not in (FALLBACK, LEARNED) for c in choice):
        raise ValueError(f"choice: expected {NUM_BUCKETS} entries of 0 (fallback) or 1 (learned), one per fifth of "
                         f"diffusion time nearest the data first, got {choice!r}")
    return choice


def _learned_drafter(learned: str | Drafter) -> Drafter:
    """A learned drafter from its checkpoint (Medusa heads or a draft network, told apart by what it records)."""
    if isinstance(learned, Drafter):
        return learned
    hparams = read_checkpoint(learned).get("hyper_parameters") or {}
    if isinstance(hparams.get("head"), dict):
        return MedusaDrafter(learned)
    if isinstance(hparams.get("net"), dict):
        return DraftNetworkDrafter(learned)
    raise ValueError(f"learned: {learned!r} is not a learned drafter checkpoint ({hparams.get('_class_path', 'no drafter')}); "
                     "give a Medusa-heads or draft-network checkpoint (configs/drafter/*.yaml)")


def _fallback_drafter(fallback: str | Drafter) -> Drafter:
    if isinstance(fallback, Drafter):
        return fallback
    kinds = training_free_drafters()
    if fallback not in kinds:
        raise ValueError(f"fallback: expected a drafter or one of {sorted(kinds)}, got {fallback!r}")
    return kinds[fallback]()


class HybridDrafter(Drafter):
    """Drafts each step with the learned drafter or the training-free fallback, chosen per fifth of diffusion time.

    Args:
        learned: a learned drafter's checkpoint (Medusa heads or a draft network) or a drafter object.
        fallback: the other drafter: a training-free name ("free-x0", the default) or a drafter object.
        choice: per fifth of diffusion time, nearest the data first, 1 (learned) or 0 (fallback); default: from
            the validation acceptance recorded in the learned drafter's checkpoint (`choice_from_record`).

    Both drafters see every round (`join`, `start_round`, `observe`) and propose every drafted step; a chain
    drafts once both are ready. Draft cost: both drafters' calls.
    """

    def __init__(self, learned: str | Drafter, fallback: str | Drafter = "free-x0", choice: Sequence[int] | None = None):
        self.learned, self.fallback = _learned_drafter(learned), _fallback_drafter(fallback)
        where = getattr(self.learned, "checkpoint", None) or self.learned.describe()
        if choice is None:
            ckpt = getattr(self.learned, "checkpoint", None)
            choice = choice_from_record(recorded_acceptance(ckpt) if ckpt else None, where)
        self.choice = check_choice(choice)
        self.parts = (self.learned, self.fallback)
        self.wants_features = any(part.wants_features for part in self.parts)

    def bind(self, context: DraftContext) -> None:
        super().bind(context)
        for part in self.parts:
            part.bind(context)
        steps = torch.arange(context.plan.num_steps)
        by_fifth = torch.tensor(self.choice, dtype=torch.bool)
        self.use_learned = by_fifth[time_bucket(context.plan, steps)].to(context.device)  # (num_steps,): the step's choice

    def check_compatible(self, schedule, sample_shape) -> None:
        for part in self.parts:
            part.check_compatible(schedule, sample_shape)

    def join(self, slots: torch.Tensor) -> None:
        for part in self.parts:
            part.join(slots)

    def ready(self, slots: torch.Tensor) -> torch.Tensor:
        return self.learned.ready(slots) & self.fallback.ready(slots)

    def start_round(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> None:
        for part in self.parts:
            part.start_round(slots, x, k)

    def _pick(self, k: torch.Tensor, learned: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Per row, the learned drafter's mean where step k's fifth chose it, else the fallback's."""
        use = self.use_learned[k.clamp(max=len(self.use_learned) - 1)]
        return torch.where(use.reshape(-1, *([1] * (learned.dim() - 1))), learned, fallback)

    def propose_step(self, slots: torch.Tensor, x: torch.Tensor, step: DraftStep) -> torch.Tensor:
        return self._pick(step.k, *(part.propose_step(slots, x, step) for part in self.parts))

    def propose(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self._pick(k, *(part.propose(slots, x, k) for part in self.parts))

    def observe(self, slots: torch.Tensor, verification: Verification) -> None:
        for part in self.parts:
            part.observe(slots, verification)

    def describe(self) -> str:
        fifths = "".join("L" if c == LEARNED else "F" for c in self.choice)
        return f"hybrid({self.learned.describe()}|{self.fallback.describe()}:{fifths})"
