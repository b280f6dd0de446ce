"""The drafter contract: the `Drafter` base class and the hook types the sampling engine passes it
(`DraftContext`, `DraftWindow`, `DraftStep`, `Verification`). Every drafter kind builds on this module.

Drafters propose the mean of the draft kernel Q step by step (the std is always the target's).

To add a drafter, subclass `Drafter` and implement `propose`; override `start_round`, `observe`,
`ready`, `join` or `check_compatible` when the drafter needs them. Options go in `__init__` so the
drafter can be built from YAML by `class_path`. Per-chain state lives in tensors indexed by the
chain's *slot* (0 <= slot < capacity); a slot is reused by a new chain after `join`.

A round has static shapes (no host read): `start_round`, `propose` and `observe` see every live
chain, padded to the round's window. Rows past a chain's own window (the end of its chain, or a
chain that is not `ready`) are padding: whatever is proposed there is never used, but it must not
raise. Keep the hooks to whole-tensor operations (no `nonzero`, boolean-mask indexing or `.item()`):
each host read stalls a GPU round.

Exactness never depends on the drafter: any proposal that is a function of the past is corrected
by the verifier. A better drafter only makes rounds longer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._aranges import arange
from ..diffusion import SamplingPlan, Schedule, StepCoefficients


@dataclass
class DraftContext:
    """What the sampler gives a drafter before sampling.

    `target(x, k, slots, return_features=False)` calls the target network on states x at step
    indices k for the chains in `slots`; every call is counted as a sequential target call for
    those chains (where they draft this round), so use it only when the drafter really needs the target.
    `all_slots` is the index tensor the sampler passes when every slot is live (`slots is
    context.all_slots`): then per-slot buffers can be used whole, without a gather. For a conditional
    target, `labels` (capacity,) is each slot's label (`guidance.NULL_LABEL`: unconditional; updated in
    place as chains join) and `guidance_scale` the sampler's scale; the target calls are guided.
    """

    target: Callable[..., torch.Tensor]
    schedule: Schedule
    plan: SamplingPlan
    sample_shape: tuple[int, ...]
    capacity: int
    device: torch.device
    dtype: torch.dtype
    all_slots: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    guidance_scale: float = 1.0


class DraftWindow:
    """This round's window for every chain: step indices `steps` (C, L+1) of X_0..X_L (clamped to
    the plan's last step, so padding rows hold valid indices), schedule times `timesteps` and the
    transition coefficients (C, L+1, 5) gathered once, for drafters and the verification alike.
    Per-position views are made on first use, once per round."""

    def __init__(self, steps, timesteps, coefficients, sample_dims: int):
        self.steps, self.timesteps, self.coefficients = steps, timesteps, coefficients
        self._sample_dims = sample_dims
        self._fields = self._columns = self._steps = self._timesteps = None

    @property
    def length(self) -> int:
        return self.steps.shape[1] - 1

    def fields(self) -> torch.Tensor:
        """(5, L+1, C, 1, ..., 1): the coefficient table reordered by field and position."""
        if self._fields is None:
            C, L1, F = self.coefficients.shape
            self._fields = self.coefficients.permute(2, 1, 0).reshape(F, L1, C, *([1] * self._sample_dims))
        return self._fields

    def step_coefficients(self, i: int) -> StepCoefficients:
        """Coefficients of position i (step steps[:, i]), each (C, 1, ..., 1)."""
        if self._columns is None:
            self._columns = [field.unbind(0) for field in self.fields().unbind(0)]
        return StepCoefficients(*(field[i] for field in self._columns))

    def step_indices(self, i: int) -> torch.Tensor:
        if self._steps is None:
            self._steps = self.steps.unbind(1)
        return self._steps[i]

    def step_timesteps(self, i: int) -> torch.Tensor:
        if self._timesteps is None:
            self._timesteps = self.timesteps.unbind(1)
        return self._timesteps[i]


@dataclass
class DraftStep:
    """Position `index` of the window: step indices `k` (C,), schedule times `t` (C,), coefficients."""

    index: int
    window: DraftWindow

    @property
    def k(self) -> torch.Tensor:
        return self.window.step_indices(self.index)

    @property
    def t(self) -> torch.Tensor:
        return self.window.step_timesteps(self.index)

    @property
    def coefficients(self) -> StepCoefficients:
        return self.window.step_coefficients(self.index)


@dataclass
class Verification:
    """What one verification pass computed, padded to the round's longest window.

    states (C, L+1, *shape): X_0..X_L; steps (C,): step index of X_0; outputs (C, L+1, *shape): the
    target's outputs (padding rows hold outputs at padding states); features: the target's features
    when the drafter asked for them (else None); evaluated (C, L+1) bool: rows that belong to the
    chain (not padding); accepted (C,): tau. denoised / means (C, L+1, *shape): the target's x0
    estimate and step mean at each row, when the sampler computed them (else None).
    """

    states: torch.Tensor
    steps: torch.Tensor
    outputs: torch.Tensor
    features: torch.Tensor | None
    evaluated: torch.Tensor
    accepted: torch.Tensor
    denoised: torch.Tensor | None = None
    means: torch.Tensor | None = None

    def at_accepted(self, values: torch.Tensor) -> torch.Tensor:
        """values[c, tau[c]] for a (C, L+1, ...) tensor: what was computed at the last committed draft."""
        return values[arange(0, len(self.accepted), self.accepted.device), self.accepted]


class Drafter:
    """Base class of drafters."""

    #: set True to receive the target's features (`return_features=True`) in `observe`.
    wants_features: bool = False
    #: names of the per-slot tensor attributes that `start_round` / `observe` modify (with `update`). A
    #: compiled round works on copies of them and writes them back after its graph: a CUDA graph is not
    #: recorded for a graph that modifies its inputs. A drafter that leaves one out samples the same, uncaptured.
    round_state: tuple[str, ...] = ()

    def bind(self, context: DraftContext) -> None:
        """Called once per sampling run, before any chain joins."""
        self.context = context
        self.check_compatible(context.schedule, context.sample_shape)

    @property
    def schedule(self) -> Schedule:
        return self.context.schedule

    @property
    def plan(self) -> SamplingPlan:
        return self.context.plan

    def check_compatible(self, schedule: Schedule, sample_shape: tuple[int, ...]) -> None:
        """Raise a clear ValueError if this drafter cannot draft for this target (learned drafters)."""

    def join(self, slots: torch.Tensor) -> None:
        """New chains occupy `slots`; forget whatever the previous occupants left there."""

    def ready(self, slots: torch.Tensor) -> torch.Tensor:
        """Which chains can draft this round; the others take one plain target step."""
        return torch.ones(len(slots), dtype=torch.bool, device=slots.device)

    def start_round(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> None:
        """A window starts at states x, step indices k, for the live chains in `slots`."""

    def propose(self, slots: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean of Q for step k (per row) from drafted states x: a tensor shaped like x."""
        raise NotImplementedError

    def propose_step(self, slots: torch.Tensor, x: torch.Tensor, step: DraftStep) -> torch.Tensor:
        """What the sampler calls: `propose(slots, x, step.k)` unless a drafter overrides it to use the
        coefficients and timesteps the window already gathered (`step.coefficients`, `step.t`)."""
        return self.propose(slots, x, step.k)

    def observe(self, slots: torch.Tensor, verification: Verification) -> None:
        """The verification pass of this round, for chains in `slots` (all live chains)."""

    def describe(self) -> str:
        return type(self).__name__

    # --- helpers for per-slot buffers ----------------------------------------------------------
    def slot_labels(self, slots: torch.Tensor) -> torch.Tensor | None:
        """The labels of the chains in `slots` (None for an unconditional target)."""
        labels = getattr(self.context, "labels", None)
        return None if labels is None else self.gather(labels, slots)

    def gather(self, buffer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """buffer[slots], without an operation when every slot is live."""
        return buffer if slots is getattr(self.context, "all_slots", None) else buffer[slots]

    def update(self, buffer: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, where=None) -> None:
        """buffer[slots] = values (only rows where `where`, a (len(slots),) bool mask, if given)."""
        if where is not None:
            values = torch.where(where.reshape(-1, *([1] * (values.dim() - 1))), values.to(buffer.dtype),
                                 self.gather(buffer, slots))
        if slots is getattr(self.context, "all_slots", None):
            buffer.copy_(values)
        else:
            buffer[slots] = values.to(buffer.dtype)


def overrides(drafter: Drafter, method: str, base: type) -> bool:
    """Whether a subclass of `base` redefines `method`: then a fast path written for `base` must
    defer to it (a subclass that overrides `propose` gets its `propose` called)."""
    return getattr(type(drafter), method) is not getattr(base, method)
