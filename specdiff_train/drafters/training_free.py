"""The training-free drafters: freeze one target output (eps, x0 or the mean increment) and re-apply the
step formula along the window. `FrozenTargetDrafter` calls the target at each window start;
`FreeDrafter` reuses the previous verification's output (no extra sequential call).
`training_free_drafters()` names them ("free-x0", "frozen-eps", ...) for the command line and tests.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..diffusion import denoise, step_mean
from .base import DraftContext, Drafter, overrides


FREEZE_CHOICES = ("eps", "x0", "increment")
class FrozenOutputDrafter(Drafter):
    """Shared machinery: freeze one target output and re-apply the step formula at each drafted
    state and its own step. `freeze` picks what stays fixed: the eps prediction, the x0 prediction,
    or the mean increment mu_P - x.

    Any family: for a target that does not predict eps, eps and x0 are converted with the plan's per-step
    `StepTables.eps_conversions` (gathered once per window, like the step coefficients). Where a frozen eps cannot give x0
    (a step at a time with no signal, alpha = 0: flow matching's first step, t = 1), the x0 of the frozen
    output is used there (`frozen_x0`, kept only for such plans)."""

    drafts_first_step = True  # whether a window may start at step 0 (FreeDrafter: never)
    round_state = ("frozen", "has_frozen", "frozen_x0")

    def __init__(self, freeze: str = "eps"):
        if freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze: expected one of {FREEZE_CHOICES}, got {freeze!r}")
        self.freeze = freeze

    def bind(self, context: DraftContext) -> None:
        super().bind(context)
        self.frozen = torch.zeros(context.capacity, *context.sample_shape, device=context.device, dtype=context.dtype)
        self.has_frozen = torch.zeros(context.capacity, dtype=torch.bool, device=context.device)
        converts = self.freeze == "eps" and self.schedule.prediction != "eps"
        self.eps_table = self.plan.tables(context.device, context.dtype).eps_conversions if converts else None
        # A FreeDrafter's first round is a plain target step: it never drafts step 0.
        drafted_no_signal = any(k >= (0 if self.drafts_first_step else 1) for k in self.plan.no_signal_steps)
        self.frozen_x0 = torch.zeros_like(self.frozen) if converts and drafted_no_signal else None

    def _eps_columns(self, k: torch.Tensor, like: torch.Tensor):
        """`plan.eps_conversions` columns at steps k (C,), each (C, 1, ..., 1)."""
        return self.eps_table[k].reshape(len(k), 5, *([1] * (like.dim() - 1))).unbind(1)

    def _eps_x0(self, x, value, columns, frozen_x0):
        """x0 of a frozen eps `value` at states x (the frozen x0 where the step has no signal), clipped as the sampler clips."""
        x0 = torch.addcmul(columns[0] * x, columns[1], value)
        if frozen_x0 is not None:  # the x0 columns are 0 where the step has no signal (no_signal is 1 there)
            x0 = torch.addcmul(x0, columns[4], frozen_x0.to(x0.dtype))
        return self.schedule.clip(x0)

    def join(self, slots: torch.Tensor) -> None:
        self.has_frozen[slots] = False

    def _value_to_freeze(self, output, x, k, x0=None, mean=None) -> torch.Tensor:
        """The frozen quantity implied by the target's `output` at states x, steps k (the target's x0
        estimate `x0` and step `mean` there, when already computed)."""
        if self.freeze == "eps":
            if self.eps_table is None:
                return output
            columns = self._eps_columns(k, x)
            return torch.addcmul(columns[2] * x, columns[3], output)
        if self.freeze == "x0":
            return x0 if x0 is not None else self.schedule.denoised(output, x, self.plan.t(k))
        if mean is None:
            mean = self.plan.transition(x, k, output)[0]
        return mean - x

    def freeze_output(self, slots, output, x, k, where=None) -> None:
        """Store the frozen quantity implied by the target's `output` at states x, steps k
        (only for chains where `where`, if given)."""
        self.update(self.frozen, slots, self._value_to_freeze(output, x, k), where)
        self._freeze_x0(slots, output, x, k, where)
        self.update(self.has_frozen, slots, torch.ones_like(k, dtype=torch.bool), where)

    def _freeze_x0(self, slots, output, x, k, where=None, x0=None) -> None:
        """Keep the x0 of a frozen eps too, for the steps where eps gives no x0 (only for such plans)."""
        if self.frozen_x0 is not None:
            x0 = x0 if x0 is not None else denoise(self.plan.coefficients(k, x), x, output, self.schedule)
            self.update(self.frozen_x0, slots, x0, where)

    def propose(self, slots, x, k):
        value = self.frozen[slots]
        if self.freeze == "increment":
            return x + value
        if self.freeze == "eps" and self.eps_table is not None:
            x0 = self._eps_x0(x, value, self._eps_columns(k, x), None if self.frozen_x0 is None else self.frozen_x0[slots])
        elif self.freeze == "eps":
            x0 = self.schedule.clip(self.schedule.to_x0(value, x, self.plan.t(k), prediction="eps"))
        else:
            x0 = value
        return self.plan.transition_from_x0(x, k, x0)[0]

    def propose_step(self, slots, x, step):
        if overrides(self, "propose", FrozenOutputDrafter):
            return self.propose(slots, x, step.k)
        if step.index == 0:
            self._window_value = value = self.gather(self.frozen, slots)
            if self.freeze == "x0":  # coef_x0 * x0 for the whole window in one operation
                self._window_x0_terms = (step.window.fields()[2, :-1] * value).unbind(0)
            if self.eps_table is not None:  # the eps conversions of the whole window, gathered once
                C, L1 = step.window.steps.shape
                table = self.eps_table[step.window.steps].permute(2, 1, 0).reshape(5, L1, C, *([1] * (x.dim() - 1)))
                self._window_eps = list(zip(*(column.unbind(0) for column in table.unbind(0))))
                self._window_frozen_x0 = None if self.frozen_x0 is None else self.gather(self.frozen_x0, slots)
        value = self._window_value
        if self.freeze == "increment":
            return x + value
        coef = step.coefficients
        if self.freeze == "x0":
            return torch.addcmul(self._window_x0_terms[step.index], coef.coef_xt, x)
        if self.eps_table is not None:
            return step_mean(coef, x, self._eps_x0(x, value, self._window_eps[step.index], self._window_frozen_x0))
        return step_mean(coef, x, denoise(coef, x, value, self.schedule))

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

    drafts_first_step = False

    def ready(self, slots):
        return self.gather(self.has_frozen, slots)

    def observe(self, slots, verification):
        v = verification
        usable = v.at_accepted(v.evaluated)  # the row at tau was evaluated (not past the chain's end)
        if self.freeze == "x0" and v.denoised is not None:  # what the sampler already computed
            value = v.at_accepted(v.denoised)
        else:
            x, k = v.at_accepted(v.states), v.steps + v.accepted
            value = self._value_to_freeze(v.at_accepted(v.outputs), x, k,
                                          mean=None if v.means is None else v.at_accepted(v.means))
            if self.frozen_x0 is not None:
                self._freeze_x0(slots, v.at_accepted(v.outputs), x, k, usable,
                                None if v.denoised is None else v.at_accepted(v.denoised))
        self.update(self.frozen, slots, value, usable)
        self.update(self.has_frozen, slots, usable | self.gather(self.has_frozen, slots))


def training_free_drafters() -> dict[str, Callable[[], Drafter]]:
    """Short names ("free-eps", "frozen-x0", ...) -> factories of the training-free drafters."""
    kinds = (("frozen", FrozenTargetDrafter), ("free", FreeDrafter))
    return {f"{name}-{freeze}": partial(cls, freeze=freeze) for name, cls in kinds for freeze in FREEZE_CHOICES}
