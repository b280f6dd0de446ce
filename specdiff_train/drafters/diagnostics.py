"""Where a drafter loses its calls: one-step acceptance by step and by offset from the anchor, on the target's
own chains, and the calls a fixed window would take at that acceptance (docs/drafters.md, "Where the calls go").

- `Anchor` (what a drafter knows when its window starts) and draft rules `rule(anchor, x, k, offset) -> x0`:
  `free_x0_rule` (the Free Drafter freezing x0), `heads_rule` (Medusa heads), `draft_network_rule`, and the
  reference `stale_time_rule` (a full target call at the drafted state, with the anchor's time: what a drafter
  that knew the state perfectly but not the time would draft; a reference, not a bound), and the reference
  `other_target_rule` (another target network of the same schedule at the drafted state and time: what a
  drafter as large as the target, trained apart from it, is accepted at).
- `rollout_acceptance`: per rule, a (stochastic steps, max_offset) table of mean one-step acceptance 2 Phi(-delta / 2)
  of step k drafted `offset` steps after its anchor, the anchors on the target's sampling trajectories and the
  drafted states on the target's own chain from there (as the drafters' validation measures it).
- `pair_acceptance`: the same one-step acceptance on random anchor/state pairs of the target's trajectories with
  log-uniform offsets up to the whole chain (`distillation.pool_pairs`): what long windows draft.
- `x0_tolerance`: the RMS error per coordinate of a drafted x0 at which a step's acceptance falls to a given value:
  what a drafter must match of the target's x0 there (nearest the data, a small fraction of the data's own grain).
- `expected_calls`: sequential target calls per sample of a fixed-window round at a given table, in a model
  where each drafted step is accepted independently (token-wise verification; block verification took 4-15%
  fewer calls on digits). tests/test_diagnostics.py holds it to the sampler; docs/drafters.md compares it with
  the sampler's calls on digits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..diffusion import SamplingPlan, one_step_acceptance
from ..guidance import NULL_LABEL, call_network, guided_output, num_classes_of
from .distillation import pool_pairs, target_rollout, target_trajectories, x0_delta_sq, x0_delta_sq_weight
from .draftnet import draft_output
from .medusa import medusa_x0


@dataclass
class Anchor:
    """A window's anchor: the last committed state (one target call there), as a drafter observes it."""

    state: torch.Tensor
    step: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    features: torch.Tensor | None
    labels: torch.Tensor | None = None


#: rule(anchor, x, k, offset) -> the draft's x0 at states x, step indices k (B,), `offset` steps after the anchor
#: (an int, or a (B,) int64 tensor: one offset per row)
DraftRule = Callable[[Anchor, torch.Tensor, torch.Tensor, int | torch.Tensor], torch.Tensor]


def free_x0_rule(anchor: Anchor, x, k, offset) -> torch.Tensor:
    """The Free Drafter (x0): the anchor's x0, frozen through the window."""
    return anchor.x0


def heads_rule(head: torch.nn.Module, plan: SamplingPlan) -> DraftRule:
    """Medusa heads (`medusa.medusa_x0`) on the anchor's features."""
    schedule = plan.schedule

    def rule(anchor, x, k, offset):
        anchor_t = anchor.t if schedule.scales_network_states else None
        offsets = offset if torch.is_tensor(offset) else torch.full_like(k, offset)
        return medusa_x0(head, schedule, anchor.features, anchor.state, anchor.x0, x, plan.t(k), offsets, anchor_t)

    return rule


def draft_network_rule(net: torch.nn.Module, plan: SamplingPlan) -> DraftRule:
    """A draft network's own x0 at the drafted state (it ignores the anchor)."""
    schedule = plan.schedule

    def rule(anchor, x, k, offset):
        t = plan.t(k)
        return schedule.to_x0(draft_output(net, x, t, anchor.labels, schedule), x, t)

    return rule


def stale_time_rule(target, plan: SamplingPlan, guidance_scale: float = 1.0) -> DraftRule:
    """Reference: the target's x0 at the drafted state but at the anchor's time (a full target call per drafted
    step). Far from the data it is near 1 (digits: 0.96-0.99); nearest the data 0.64: there the stale time
    costs most."""
    schedule = plan.schedule

    def rule(anchor, x, k, offset):
        return schedule.denoised(guided_output(target, x, anchor.t, anchor.labels, guidance_scale), x, anchor.t)

    return rule


def other_target_rule(other, plan: SamplingPlan) -> DraftRule:
    """Reference: another target network's x0 at the drafted state and time (a full call of that network per
    drafted step). A conditional one drafts an unconditional target with its null label, a conditional target
    with the anchor's labels (unguided). It must share the plan's schedule (the same x0 of the same output)."""
    schedule = plan.schedule
    if other.schedule != schedule:
        raise ValueError(f"other target: its schedule {other.schedule} differs from the target's {schedule}; "
                         "compare targets trained with the same schedule")
    conditional = bool(num_classes_of(other))

    def rule(anchor, x, k, offset):
        t = plan.t(k)
        labels = anchor.labels
        if conditional and labels is None:
            labels = torch.full((len(x),), NULL_LABEL, dtype=torch.long, device=x.device)
        return schedule.denoised(call_network(other, x, t, labels if conditional else None), x, t)

    return rule


def draft_acceptance(plan: SamplingPlan, k: torch.Tensor, x0_target: torch.Tensor, x0_draft: torch.Tensor) -> torch.Tensor:
    """(B,) float64 one-step acceptance 2 Phi(-delta / 2) of step k drafted with x0 `x0_draft` (clipped where the
    sampler clips, as the drafters clip their proposals) against the target's `x0_target`."""
    x0_draft = plan.schedule.clip(x0_draft)
    return one_step_acceptance(x0_delta_sq(plan, k, x0_target.double(), x0_draft.double()).sqrt())


@torch.no_grad()
def rollout_acceptance(target, plan: SamplingPlan, rules: dict[str, DraftRule], num_chains: int = 48,
                       max_offset: int = 8, generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Per rule, a (plan.num_stochastic_steps, max_offset) float64 table: mean one-step acceptance of step k drafted
    `offset` = column + 1 steps after its anchor (NaN where no anchor reaches: offsets past the chain's start
    or end). Anchors are every step of `num_chains` target trajectories (the plan's sampler); from each, the
    target's own chain runs `max_offset` steps, and each rule drafts every state of it. The draft's x0 is
    clipped where the sampler clips; delta is the chain's own |coef_x0 (x0_P - x0_Q)| / std."""
    if max_offset < 1:
        raise ValueError(f"max_offset: expected an int >= 1, got {max_offset}")
    if num_chains < 1:
        raise ValueError(f"num_chains: expected an int >= 1, got {num_chains}")
    schedule, S = plan.schedule, plan.num_stochastic_steps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(target.parameters()).device
    net = lambda x, t: guided_output(target, x, t, labels, guidance_scale)  # noqa: E731
    trajectories = target_trajectories(net, plan, num_chains, tuple(target.sample_shape), gen, device=device)
    # filled on the target's device (no host read per entry), returned on the CPU
    tables = {name: torch.full((S, max_offset), float("nan"), dtype=torch.float64, device=device) for name in rules}
    for m in range(S - 1):
        x_m = trajectories[m]
        k_m = torch.full((num_chains,), m, dtype=torch.int64, device=device)
        t_m = plan.t(k_m)
        out_m, features = guided_output(target, x_m, t_m, labels, guidance_scale, return_features=True)
        anchor = Anchor(x_m, k_m, t_m, schedule.denoised(out_m, x_m, t_m), features, labels)
        states, steps, outputs = target_rollout(net, plan, x_m, k_m, out_m, min(max_offset, S - 1 - m), gen)
        for offset, (x, k, out) in enumerate(zip(states, steps, outputs), start=1):
            t = plan.t(k)
            x0_target = schedule.denoised(out, x, t)
            for name, rule in rules.items():
                accepted = draft_acceptance(plan, k, x0_target, rule(anchor, x, k, offset))
                tables[name][m + offset, offset - 1] = accepted.mean()
    return {name: table.cpu() for name, table in tables.items()}


@torch.no_grad()
def pair_acceptance(target, plan: SamplingPlan, rules: dict[str, DraftRule], num_chains: int = 64,
                    num_pairs: int = 4096, max_offset: int | None = None, generator: torch.Generator | None = None,
                    batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One-step acceptance 2 Phi(-delta / 2) on `num_pairs` anchor/state pairs of `num_chains` target trajectories
    (`distillation.pool_pairs`: offsets log-uniform in [1, max_offset], default the whole chain; anchors uniform
    over the steps that leave room): the anchor is a trajectory's state at step m (one target call there, as a
    window's anchor), the drafted state the same trajectory's state at step m + j. Unconditional targets.

    Returns (drafted step k, offset j, {rule: acceptance}), each (num_pairs,) on the CPU (acceptance float64)."""
    if num_chains < 1 or num_pairs < 1:
        raise ValueError(f"num_chains, num_pairs: expected ints >= 1, got {num_chains}, {num_pairs}")
    if num_classes_of(target):
        raise ValueError("pair_acceptance: unconditional targets only; measure a conditional target with "
                         "rollout_acceptance (labels=...)")
    schedule, S = plan.schedule, plan.num_stochastic_steps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(target.parameters()).device
    trajectories = target_trajectories(target, plan, num_chains, tuple(target.sample_shape), gen, device=device)
    chain, anchor_step, offset = pool_pairs(S, num_chains, num_pairs, S - 1 if max_offset is None else max_offset, gen)
    chain, anchor_step, offset = chain.to(device), anchor_step.to(device), offset.to(device)
    accepted = {name: torch.empty(num_pairs, dtype=torch.float64, device=device) for name in rules}
    for rows in torch.arange(num_pairs, device=device).split(batch_size):
        c, m, j = chain[rows], anchor_step[rows], offset[rows]
        x_m, t_m = trajectories[m, c], plan.t(m)
        out_m, features = target(x_m, t_m, return_features=True)
        anchor = Anchor(x_m, m, t_m, schedule.denoised(out_m, x_m, t_m), features)
        x, k = trajectories[m + j, c], m + j
        t = plan.t(k)
        x0_target = schedule.denoised(target(x, t), x, t)
        for name, rule in rules.items():
            accepted[name][rows] = draft_acceptance(plan, k, x0_target, rule(anchor, x, k, j))
    return (anchor_step + offset).cpu(), offset.cpu(), {name: a.cpu() for name, a in accepted.items()}


def x0_tolerance(plan: SamplingPlan, k: torch.Tensor, acceptance: float, dim: int) -> torch.Tensor:
    """Per step k, the RMS error per coordinate (of `dim`) of a drafted x0, spread evenly over the coordinates, at
    which the step's one-step acceptance 2 Phi(-delta / 2) equals `acceptance`: delta = -2 Phi^-1(acceptance / 2),
    and delta^2 = w_k dim rms^2 (`x0_delta_sq_weight`; no clipping)."""
    if not 0 < acceptance < 1:
        raise ValueError(f"acceptance: expected a value in (0, 1), got {acceptance!r}")
    if dim < 1:
        raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
    delta = -2 * torch.special.ndtri(torch.tensor(acceptance / 2, dtype=torch.float64))
    return delta / (x0_delta_sq_weight(plan, k).double() * dim).sqrt()


def expected_calls(acceptance: torch.Tensor, window: int, final_step: bool = True) -> float:
    """Expected sequential target calls per sample with a fixed `window`, if stochastic step k drafted `offset`
    steps after its anchor were accepted independently with probability acceptance[k, offset - 1] (offsets past
    the table take its last column; NaN counts as 0). The rounds as the sampler runs them: the first is a plain
    target step (the drafter's warm-up); then from the state at step s (anchor: the last committed state, step
    s - 1) steps s .. s + w - 1 are drafted at offsets 1 .. w (w shortened to the steps left); the first
    rejection at position i advances the chain i + 1 steps (i drafts and the verifier's own step), w accepted
    drafts w + 1. `final_step`: the plan ends with a deterministic step after the table's (DDPM: std 0); it costs
    one more call unless the last round's drafts all reached it (then the verification evaluated its state)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    table = torch.nan_to_num(acceptance.double(), nan=0.0).clamp(0, 1).tolist()  # read element by element below
    S, last = len(table), len(table[0]) - 1
    remaining = [0.0] * (S + 1)  # remaining[s]: expected calls from the state at step s
    remaining[S] = 1.0 if final_step else 0.0  # reached by the verifier's own step: the final step's call
    for s in range(S - 1, 0, -1):
        length = min(window, S - s)
        calls, reach = 1.0, 1.0  # this round's call; probability that the first i drafts were accepted
        for i in range(length):
            accept = table[s + i][min(i, last)]
            calls += reach * (1 - accept) * remaining[s + i + 1]
            reach *= accept
        remaining[s] = calls + reach * (0.0 if s + length == S else remaining[s + length + 1])
    return 1.0 + remaining[1] if S > 1 else S + float(final_step)
