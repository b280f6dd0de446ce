"""Learned drafters used at sampling time."""
from __future__ import annotations

import torch

from ..diffusion import DDPMSchedule
from .drafters import Drafter


class DraftNetworkDrafter(Drafter):
    """A small draft network with the target's schedule: Q's mean is the ancestral step computed
    from the draft net's prediction at each drafted state. One draft call per drafted step.

    Args:
        checkpoint: a checkpoint written by `DraftDistillation` (configs/drafter/*_draftnet.yaml).
    """

    def __init__(self, checkpoint: str):
        from ..models.drafter import load_draft_network

        self.checkpoint = checkpoint
        self.net, self.target_schedule, self.sample_shape, _ = load_draft_network(checkpoint)

    @classmethod
    def from_net(cls, net: torch.nn.Module, schedule: DDPMSchedule, sample_shape) -> "DraftNetworkDrafter":
        drafter = cls.__new__(cls)
        drafter.checkpoint, drafter.net = None, net.eval()
        drafter.target_schedule, drafter.sample_shape = schedule, tuple(sample_shape)
        return drafter

    def check_compatible(self, schedule: DDPMSchedule, sample_shape) -> None:
        problems = self.target_schedule.mismatch(schedule)
        if tuple(sample_shape) != self.sample_shape:
            problems.append(f"sample_shape: {self.sample_shape} != {tuple(sample_shape)}")
        if problems:
            raise ValueError(f"drafter {self.describe()} was trained for another target: " + "; ".join(problems)
                             + ". Distil a draft network from this target's checkpoint.")

    def bind(self, context) -> None:
        super().bind(context)
        self.net.to(device=context.device, dtype=context.dtype)

    @torch.no_grad()
    def propose(self, slots, x, k):
        return self.plan.transition(x, k, self.net(x, self.plan.t(k)))[0]

    def describe(self) -> str:
        return "draftnet"
