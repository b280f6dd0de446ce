"""Drafters propose the mean of the draft kernel Q step by step (the std is always the target's).

To add a drafter, subclass `Drafter` and implement `propose`; override `start_round`, `observe`,
`ready`, `join` or `check_compatible` when the drafter needs them. Options go in `__init__` so the
drafter can be built from YAML by `class_path`. Per-chain state lives in tensors indexed by the
chain's *slot* (0 <= slot < capacity); a slot is reused by a new chain after `join`.

Exactness never depends on the drafter: any proposal that is a function of the past is corrected
by the verifier. A better drafter only makes rounds longer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..diffusion import DDPMSchedule, SamplingPlan


@dataclass
class DraftContext:
    """What the sampler gives a drafter before sampling.

    `target(x, k, slots, return_features=False)` calls the target network on states x at step
    indices k for the chains in `slots`; every call is counted as a sequential target call for
    those chains, so use it only when the drafter really needs the target.
    """

    target: Callable[..., torch.Tensor]
    schedule: DDPMSchedule
    plan: SamplingPlan
    sample_shape: tuple[int, ...]
    capacity: int
    device: torch.device
    dtype: torch.dtype


@dataclass
class Verification:
    """What one verification pass computed, padded to the round's longest window.

    states (C, L+1, *shape): X_0..X_L; steps (C,): step index of X_0; outputs (C, L+1, *shape): the
    target's outputs at evaluated rows (zeros elsewhere); features: the target's features when the
    drafter asked for them (else None); evaluated (C, L+1) bool; accepted (C,): tau.
    """

    states: torch.Tensor
    steps: torch.Tensor
    outputs: torch.Tensor
    features: torch.Tensor | None
    evaluated: torch.Tensor
    accepted: torch.Tensor


class Drafter:
    """Base class of drafters."""

    #: set True to receive the target's features (`return_features=True`) in `observe`.
    wants_features: bool = False

    def bind(self, context: DraftContext) -> None:
        """Called once per sampling run, before any chain joins."""
        self.context = context
        self.check_compatible(context.schedule, context.sample_shape)

    @property
    def schedule(self) -> DDPMSchedule:
        return self.context.schedule

    @property
    def plan(self) -> SamplingPlan:
        return self.context.plan

    def check_compatible(self, schedule: DDPMSchedule, sample_shape: tuple[int, ...]) -> None:
        """Raise a clear ValueError if this drafter cannot draft for this target (learned drafters)."""

    def join(self, slots: torch.Tensor) -> None:
        """New chains occupy `slots`; forget whatever the previous occupants left there."""

    def ready(self, slots: torch.Tensor) -> torch.Tensor:
        """Which chains can draft this round; the others take one plain target step."""
        return torch.ones(len(slots), dtype=torch.bool, device=slots.device)

    def start_round(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> None:
        """A window starts at states x, step indices k, for chains in `slots` that will draft."""

    def propose(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean of Q for step k (per row) from drafted states x: a tensor shaped like x."""
        raise NotImplementedError

    def observe(self, slots: torch.Tensor, verification: Verification) -> None:
        """The verification pass of this round, for chains in `slots` (all live chains)."""

    def describe(self) -> str:
        return type(self).__name__


FREEZE_CHOICES = ("eps", "x0", "increment")


class FrozenOutputDrafter(Drafter):
    """Shared machinery: freeze one target output and re-apply the step formula at each drafted
    state and its own step. `freeze` picks what stays fixed: the eps prediction, the x0 prediction,
    or the mean increment mu_P - x."""

    def __init__(self, freeze: str = "eps"):
        if freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze: expected one of {FREEZE_CHOICES}, got {freeze!r}")
        self.freeze = freeze

    def bind(self, context: DraftContext) -> None:
        super().bind(context)
        self.frozen = torch.zeros(context.capacity, *context.sample_shape, device=context.device, dtype=context.dtype)
        self.has_frozen = torch.zeros(context.capacity, dtype=torch.bool, device=context.device)

    def join(self, slots: torch.Tensor) -> None:
        self.has_frozen[slots] = False

    def freeze_output(self, slots, output, x, k) -> None:
        """Store the frozen quantity implied by the target's `output` at states x, steps k."""
        t = self.plan.t(k)
        if self.freeze == "eps":
            value = self.schedule.to_eps(output, x, t)
        elif self.freeze == "x0":
            value = self.schedule.denoised(output, x, t)
        else:
            value = self.plan.transition(x, k, output)[0] - x
        self.frozen[slots] = value.to(self.frozen.dtype)
        self.has_frozen[slots] = True

    def propose(self, slots, x, k):
        value = self.frozen[slots]
        if self.freeze == "increment":
            return x + value
        if self.freeze == "eps":
            t = self.plan.t(k)
            x0 = self.schedule.to_x0(value, x, t, prediction="eps")
            if self.schedule.clip_denoised:
                x0 = x0.clamp(-self.schedule.clip_range, self.schedule.clip_range)
        else:
            x0 = value
        return self.plan.transition_from_x0(x, k, x0)[0]

    def describe(self) -> str:
        return f"{type(self).__name__}(freeze={self.freeze})"


class FrozenTargetDrafter(FrozenOutputDrafter):
    """Training-free: call the target at the window start and freeze its output for the window.

    The first draft is the target's own step (accepted), but each window costs one extra
    sequential target call.

    Args:
        freeze: "eps", "x0" or "increment" (the mean increment mu_P(n, Y_n) - Y_n).
    """

    def start_round(self, slots, x, k):
        self.freeze_output(slots, self.context.target(x, k, slots), x, k)


class FreeDrafter(FrozenOutputDrafter):
    """Training-free, delayed (self-speculative): freeze the target output that the previous
    verification already computed at the last committed state (one step stale). No extra
    sequential call per window; a chain's first round is one plain target step (its warm-up).

    Args:
        freeze: "eps", "x0" or "increment".
    """

    def ready(self, slots):
        return self.has_frozen[slots]

    def observe(self, slots, verification):
        tau = verification.accepted
        rows = torch.arange(len(slots), device=tau.device)
        usable = verification.evaluated[rows, tau]
        if usable.any():
            idx = rows[usable]
            t_rows = tau[usable]
            self.freeze_output(
                slots[idx],
                verification.outputs[idx, t_rows],
                verification.states[idx, t_rows],
                verification.steps[idx] + t_rows,
            )


def training_free_drafters() -> dict[str, Callable[[], Drafter]]:
    """Short names ("free-eps", "frozen-x0", ...) -> factories of the training-free drafters."""
    kinds = (("frozen", FrozenTargetDrafter), ("free", FreeDrafter))
    return {f"{name}-{freeze}": partial(cls, freeze=freeze) for name, cls in kinds for freeze in FREEZE_CHOICES}
