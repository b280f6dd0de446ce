"""Learned drafters used at sampling time: a distilled draft network, and Medusa-like heads on the
target's features. Both load (via `specdiff_train.models.checkpoints`) the checkpoints written by `specdiff_train.models.drafter`
(configs/drafter/*.yaml) without the YAML, and refuse a target with another schedule or shape.
`relative_draft_cost` measures what one draft call costs next to one target call.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..diffusion import DDPMSchedule, denoise, step_mean
from ..models.checkpoints import load_draft_network, load_drafter
from ..nets.heads import medusa_x0
from ..sampling import model_device_dtype
from .drafters import DraftContext, Drafter, Verification, overrides


class LearnedDrafter(Drafter):
    """A drafter with a trained module: it knows the schedule and sample shape it was trained for
    (`target_schedule`, `sample_shape`) and refuses any other target."""

    module: torch.nn.Module
    target_schedule: DDPMSchedule
    sample_shape: tuple[int, ...]
    checkpoint: str | None = None

    def _set(self, module: torch.nn.Module, schedule: DDPMSchedule, sample_shape) -> None:
        self.module = module.eval().requires_grad_(False)
        self.target_schedule, self.sample_shape = schedule, tuple(int(s) for s in sample_shape)

    def check_compatible(self, schedule: DDPMSchedule, sample_shape) -> None:
        problems = self.target_schedule.mismatch(schedule)
        if tuple(sample_shape) != self.sample_shape:
            problems.append(f"sample_shape: {self.sample_shape} != {tuple(sample_shape)}")
        if problems:
            where = f" ({self.checkpoint})" if self.checkpoint else ""
            raise ValueError(
                f"drafter {self.describe()}{where} was trained for another target: " + "; ".join(problems)
                + ". Train one from this target's checkpoint (configs/drafter/*.yaml with --model.init_args.target_ckpt)."
            )

    def bind(self, context: DraftContext) -> None:
        super().bind(context)
        self.module.to(device=context.device, dtype=context.dtype)


class DraftNetworkDrafter(LearnedDrafter):
    """A small draft network with the target's schedule: Q's mean is the ancestral step computed
    from the draft net's prediction at each drafted state. One draft call per drafted step.

    Args:
        checkpoint: a checkpoint written by `DraftDistillation` (configs/drafter/*_draftnet.yaml).
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = str(checkpoint)
        net, schedule, shape, _ = load_draft_network(checkpoint)
        self._set(net, schedule, shape)

    @classmethod
    def from_net(cls, net: torch.nn.Module, schedule: DDPMSchedule, sample_shape) -> "DraftNetworkDrafter":
        """A drafter around an in-memory net (tests, notebooks)."""
        drafter = cls.__new__(cls)
        drafter._set(net, schedule, sample_shape)
        return drafter

    @property
    def net(self) -> torch.nn.Module:
        return self.module

    @torch.no_grad()
    def propose(self, slots, x, k):
        return self.plan.transition(x, k, self.module(x, self.plan.t(k)))[0]

    @torch.no_grad()
    def propose_step(self, slots, x, step):
        if overrides(self, "propose", DraftNetworkDrafter):
            return self.propose(slots, x, step.k)
        coef = step.coefficients  # gathered once for the round's window
        return step_mean(coef, x, denoise(coef, x, self.module(x, step.t), self.schedule))

    def describe(self) -> str:
        return "draftnet"


class MedusaDrafter(LearnedDrafter):
    """Medusa-like heads on the frozen target's features (`nets/heads.py`).

    Like the Free Drafter it anchors each window at the last committed state of the previous round
    (row tau of the verification, one step stale), so it costs no extra sequential target call: the
    sampler passes the target's features from the verification pass (`wants_features`). At drafted
    state x_j, offset j - m from the anchor step m, Q's x0 is the anchor's x0 plus the heads'
    correction. A chain's first round is one plain target step (its warm-up); offsets beyond the
    heads' `max_offset` reuse the last offset's embedding.

    Args:
        checkpoint: a checkpoint written by `HeadDistillation` (configs/drafter/*_medusa.yaml).
    """

    wants_features = True

    def __init__(self, checkpoint: str):
        self.checkpoint = str(checkpoint)
        head, hparams = load_drafter(checkpoint, "head")
        self._set(head, DDPMSchedule(**hparams["schedule"]), hparams["sample_shape"])

    @classmethod
    def from_head(cls, head: torch.nn.Module, schedule: DDPMSchedule, sample_shape) -> "MedusaDrafter":
        """A drafter around in-memory heads (tests, notebooks)."""
        drafter = cls.__new__(cls)
        drafter._set(head, schedule, sample_shape)
        return drafter

    def bind(self, context: DraftContext) -> None:
        super().bind(context)
        shape, cap, dev, dtype = context.sample_shape, context.capacity, context.device, context.dtype
        self.anchor_state = torch.zeros(cap, *shape, device=dev, dtype=dtype)
        self.anchor_x0 = torch.zeros(cap, *shape, device=dev, dtype=dtype)
        self.anchor_step = torch.zeros(cap, dtype=torch.int64, device=dev)
        self.has_anchor = torch.zeros(cap, dtype=torch.bool, device=dev)
        self.features: torch.Tensor | None = None  # (capacity, *feature_shape), allocated at the first observe

    def join(self, slots):
        self.has_anchor[slots] = False

    def ready(self, slots):
        return self.gather(self.has_anchor, slots)

    def observe(self, slots, verification: Verification) -> None:
        v = verification
        if v.features is None:
            raise ValueError("MedusaDrafter needs the target's features; the sampler did not pass them")
        usable = v.at_accepted(v.evaluated)  # chains whose row tau was evaluated get a new anchor
        features = v.at_accepted(v.features)
        if self.features is None:
            self._check_features(features)
            self.features = features.new_zeros(self.context.capacity, *features.shape[1:])
        x, k = v.at_accepted(v.states), v.steps + v.accepted
        x0 = v.at_accepted(v.denoised) if v.denoised is not None else self.schedule.denoised(
            v.at_accepted(v.outputs), x, self.plan.t(k))
        self.update(self.features, slots, features, usable)
        self.update(self.anchor_state, slots, x, usable)
        self.update(self.anchor_x0, slots, x0, usable)
        self.update(self.anchor_step, slots, k, usable)
        self.update(self.has_anchor, slots, usable | self.gather(self.has_anchor, slots))

    def _check_features(self, features: torch.Tensor) -> None:
        expected = getattr(self.module, "feature_dim", None)
        if expected is not None and (features.dim() < 2 or features.shape[1] != expected):
            raise ValueError(
                f"drafter {self.describe()}: the target's features have shape {tuple(features.shape[1:])}, the heads "
                f"were trained on features with {expected} channels; heads only fit the target they were trained on"
                + (f" ({self.checkpoint})" if self.checkpoint else "")
            )

    @torch.no_grad()
    def propose(self, slots, x, k):
        anchor = (self.features[slots], self.anchor_state[slots], self.anchor_x0[slots], self.anchor_step[slots])
        return self._propose(anchor, x, k, self.plan.t(k), None)

    @torch.no_grad()
    def propose_step(self, slots, x, step):
        if overrides(self, "propose", MedusaDrafter):
            return self.propose(slots, x, step.k)
        if step.index == 0:  # the anchors stay fixed through the window: gather them once
            self._window_anchor = tuple(self.gather(b, slots) for b in
                                        (self.features, self.anchor_state, self.anchor_x0, self.anchor_step))
        return self._propose(self._window_anchor, x, step.k, step.t, step.coefficients)

    def _propose(self, anchor, x, k, t, coef):
        features, anchor_state, anchor_x0, anchor_step = anchor
        x0 = medusa_x0(self.module, self.schedule, features, anchor_state, anchor_x0, x, t, k - anchor_step)
        if self.schedule.clip_denoised:
            x0 = x0.clamp(-self.schedule.clip_range, self.schedule.clip_range)
        if coef is None:
            return self.plan.transition_from_x0(x, k, x0)[0]
        return step_mean(coef, x, x0)

    def describe(self) -> str:
        return "medusa"


@torch.no_grad()
def relative_draft_cost(drafter: Drafter, target, schedule: DDPMSchedule, sample_shape, *, num_steps: int = 100,
                        batch_size: int = 64, repeats: int = 20, seed: int = 0) -> dict:
    """Wall-clock of one draft call (`drafter.propose` on `batch_size` states) next to one target call
    on the same batch, median of `repeats` after a warm-up, on the target's device.

    The drafter is bound and fed one verification (one target pass, features included if it wants
    them) at mid-chain states, as in sampling. Returns {"draft_s", "target_s", "relative"}.
    """
    plan = schedule.plan(num_steps)
    device, dtype = model_device_dtype(target)
    shape = tuple(int(s) for s in sample_shape)

    def call_target(x, k, slots=None, return_features=False):
        t = plan.t(k)
        return target(x, t, return_features=True) if return_features else target(x, t)

    drafter.bind(DraftContext(call_target, schedule, plan, shape, batch_size, device, dtype))
    slots = torch.arange(batch_size, device=device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *shape, generator=gen).to(device=device, dtype=dtype)
    k = torch.full((batch_size,), plan.num_stochastic_steps // 2, dtype=torch.int64, device=device)
    drafter.join(slots)
    out = call_target(x, k, return_features=drafter.wants_features)
    out, features = out if drafter.wants_features else (out, None)
    drafter.observe(slots, Verification(
        states=x[:, None], steps=k, outputs=out[:, None], features=None if features is None else features[:, None],
        evaluated=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
        accepted=torch.zeros(batch_size, dtype=torch.int64, device=device),
    ))
    x_next, k_next = plan.transition(x, k, out)[0], k + 1
    drafter.start_round(slots, x_next, k_next)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    draft_s = median_time(lambda: drafter.propose(slots, x_next, k_next))
    target_s = median_time(lambda: call_target(x_next, k_next))
    return dict(draft_s=draft_s, target_s=target_s, relative=draft_s / target_s)
