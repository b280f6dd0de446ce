"""The distilled draft network, in one place: a small denoiser with the target's schedule.

- Training: `DraftDistillation` (configs/drafter/*_draftnet.yaml) fits the draft net to a frozen target
  with the transition's own delta^2 as the loss (`draft_delta_sq`: on eps for a DDPM eps target without
  clipping, on x0 otherwise), so minimising it maximises the acceptance of each drafted step. Any
  denoiser of `specdiff_train.nets` serves as the network; it is wrapped in the schedule's preconditioning
  as the target's (`draft_output`: EDM's c_in / c_skip / c_out, flow matching's time scale).
- Checkpoint: `load_draft_network` reads what it saved (the net's class_path/init_args, the schedule, the
  chain, the sample shape), full or slim, without the YAML.
- Sampling: `DraftNetworkDrafter` drafts each step with the chain's step of the draft net's prediction.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable

from ..diffusion import Chain, DDPMSchedule, Schedule, denoise, step_mean
from ..guidance import num_classes_of
from .base import overrides
from .checkpoints import load_drafter, recorded_chain, recorded_schedule
from .distillation import FrozenTargetDistillation, LearnedDrafter, check_drafter_module, draft_delta_sq, mismatch_loss

MODES = ("distill", "data")


# --- training -----------------------------------------------------------------------------------
class DraftDistillation(FrozenTargetDistillation):
    """Trains a small draft network against a frozen target checkpoint; only the draft net is
    optimised and saved (the checkpoint records target_ckpt, the schedule and the net's
    class_path/init_args, so `DraftNetworkDrafter(checkpoint)` loads it without the YAML).

    Args:
        net: the draft network (same input/output contract as the target's net, much smaller).
        target_ckpt: the target checkpoint (frozen, EMA weights).
        num_steps: the sampler the drafter is for (respaced steps); training timesteps are its steps.
        mode: "distill" (regress on the target's output with the delta-matching weight) or "data"
            (plain eps diffusion loss on the data: DDPM eps targets only).
        objective: distill only: "delta_sq" (mean delta^2, ALGORITHMS.md 5), "tv" (mean rejection
            probability 1 - 2 Phi(-delta/2)) or "log_acceptance" (mean -log 2 Phi(-delta/2)); see `mismatch_loss`.
        trajectory_fraction: distill only: share of the batch taken from the target's own sampling
            trajectories instead of forward-noised data.
        trajectory_chains: chains in the pool of target trajectories.
        trajectory_refresh: training steps between two new pools.
        optimizer: builds the optimizer from the draft net's parameters.
        sample_shape: linked from the data by the CLI; must equal the target's.
        guidance_scale: a conditional target's guidance scale the net is distilled for
            (`FrozenTargetDistillation`). A conditional net (`num_classes` = the target's) sees the labels
            and predicts the guided output in one row; an unconditional net drafts without them.
        chain: the sampler chain the net is for (None: the schedule's default; `FrozenTargetDistillation`).
    """

    module_key = "net"

    def __init__(
        self,
        net: torch.nn.Module,
        target_ckpt: str,
        num_steps: int = 100,
        mode: str = "distill",
        objective: str = "delta_sq",
        trajectory_fraction: float = 0.0,
        trajectory_chains: int = 256,
        trajectory_refresh: int = 1000,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        chain: Chain | dict | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"model.init_args.mode: expected one of {MODES}, got {mode!r}")
        if mode == "data" and trajectory_fraction > 0:
            raise ValueError("model.init_args.trajectory_fraction: the data loss needs data; use mode: distill "
                             "to train on the target's trajectories")
        super().__init__(target_ckpt, num_steps, objective, trajectory_fraction, trajectory_chains,
                         trajectory_refresh, optimizer, sample_shape, guidance_scale, chain)
        if num_classes_of(net) not in (0, self.num_classes):
            raise ValueError(f"model.init_args.net.init_args.num_classes: {num_classes_of(net)} differs from the target's "
                             f"{self.num_classes}; use {self.num_classes} (or 0 for a draft net without labels)")
        if mode == "data" and not (isinstance(self.schedule, DDPMSchedule) and self.schedule.prediction == "eps"):
            what = (f"predicts {self.schedule.prediction!r}" if isinstance(self.schedule, DDPMSchedule)
                    else f"is trained with {type(self.schedule).__name__}")
            raise ValueError(f"model.init_args.mode: 'data' trains the draft net with the eps loss, but the target "
                             f"{what}; use mode: distill (any prediction type and schedule)")
        check_drafter_module(net, self.target, "net", "Size the draft net for the target's data and schedule.")
        self.net, self.mode = net, mode
        self.record_hparams(mode=mode)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return draft_output(self.net, x, t, labels, self.schedule)

    def losses(self, x0, gen, labels=None):
        x_t, k, noise, labels = self.start_states(x0, gen, self.plan.num_stochastic_steps,
                                                  use_pool=self.mode == "distill", labels=labels)
        t = self.plan.t(k)
        draft = self(x_t, t, labels)
        with torch.no_grad():
            target = self.target_output(x_t, t, labels)
        delta_sq = draft_delta_sq(self.plan, k, x_t, target, draft)  # the transition's mismatch, per sample
        loss = mismatch_loss(delta_sq, self.objective) if self.mode == "distill" else (noise - draft).pow(2).mean()
        return loss, delta_sq.detach(), k, {}


def draft_output(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels, schedule: Schedule) -> torch.Tensor:
    """The draft net's prediction at states x, schedule times t, in the target's parametrisation (the net wrapped
    in `schedule`'s conditioning as the target's net is: `Schedule.predict`). A conditional net (`num_classes`
    > 0) is given the rows' labels."""
    return schedule.predict(net, x, t, labels if num_classes_of(net) else None)


# --- checkpoint ---------------------------------------------------------------------------------
def load_draft_network(ckpt_path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, Schedule, tuple, int]:
    """(net in eval mode, its schedule, sample_shape, num_steps) from a DraftDistillation checkpoint (the chain
    it was trained for: `checkpoints.recorded_chain(hparams, schedule)`)."""
    net, hparams = load_drafter(ckpt_path, "net", map_location)
    return net, recorded_schedule(hparams, str(ckpt_path)), tuple(hparams["sample_shape"]), int(hparams["num_steps"])


# --- sampling -----------------------------------------------------------------------------------
class DraftNetworkDrafter(LearnedDrafter):
    """A small draft network with the target's schedule: Q's mean is the sampling chain's step computed
    from the draft net's prediction at each drafted state. One draft call per drafted step.

    Args:
        checkpoint: a checkpoint written by `DraftDistillation` (configs/drafter/*_draftnet.yaml).
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = str(checkpoint)
        net, hparams = load_drafter(checkpoint, "net")
        schedule = recorded_schedule(hparams, self.checkpoint)
        self._set(net, schedule, hparams["sample_shape"], hparams, recorded_chain(hparams, schedule, self.checkpoint))

    @classmethod
    def from_net(cls, net: torch.nn.Module, schedule: Schedule, sample_shape,
                 chain: Chain | dict | None = None) -> "DraftNetworkDrafter":
        """A drafter around an in-memory net (tests, notebooks), for the sampler `chain` (None: the schedule's
        default)."""
        drafter = cls.__new__(cls)
        drafter._set(net, schedule, sample_shape, chain=chain)
        return drafter

    @property
    def net(self) -> torch.nn.Module:
        return self.module

    @torch.no_grad()
    def propose(self, slots, x, k):
        output = draft_output(self.module, x, self.plan.t(k), self.slot_labels(slots), self.schedule)
        return self.plan.transition(x, k, output)[0]

    @torch.no_grad()
    def propose_step(self, slots, x, step):
        if overrides(self, "propose", DraftNetworkDrafter):
            return self.propose(slots, x, step.k)
        coef = step.coefficients  # gathered once for the round's window
        output = draft_output(self.module, x, step.t, self.slot_labels(slots), self.schedule)
        return step_mean(coef, x, denoise(coef, x, output, self.schedule))

    def describe(self) -> str:
        return "draftnet"
