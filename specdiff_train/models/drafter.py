"""Training a small draft network by distillation from a frozen target (ALGORITHMS.md section 5).

The draft network has the target's schedule and parametrisation. Distillation regresses its eps on
the frozen target's eps at forward-noised data, weighted so that the loss IS the squared mismatch
delta^2 of the sampler's transition: minimising it maximises the acceptance 2 Phi(-delta/2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from ..diffusion import DDPMSchedule, SamplingPlan
from .checkpoints import build_module, module_config, read_checkpoint

MODES = ("distill", "data")


def delta_sq_weight(plan: SamplingPlan, k: torch.Tensor) -> torch.Tensor:
    """w_k with delta^2 = w_k |eps_P - eps_Q|^2 for the step k of `plan` (eps prediction, no clipping):
    the means differ by coef_x0 * sqrt(1 - abar) / sqrt(abar) * (eps_P - eps_Q), divided by std."""
    abar = plan.schedule.alphas_cumprod[plan.timesteps[k.cpu()]]
    weight = plan.coef_x0[k.cpu()] ** 2 * (1 - abar) / (abar * plan.std[k.cpu()] ** 2)
    return weight.to(k.device)


def _frozen_target(target_ckpt: str):
    from .checkpoints import load_target

    if not Path(target_ckpt).exists():
        raise FileNotFoundError(
            f"model.init_args.target_ckpt: no file at {target_ckpt}; train a target first, e.g. "
            "`python train.py fit --config configs/target/toy2d.yaml`, or use checkpoints/toy2d/target.ckpt"
        )
    return load_target(target_ckpt)  # EMA weights, eval mode, requires_grad False


class DraftDistillation(LightningModule):
    """Trains a draft network against a frozen target checkpoint; only the draft net is optimised
    and saved (the checkpoint records target_ckpt, the schedule and the net's class_path/init_args).

    Args:
        net: the draft network (same input/output contract as the target's net, much smaller).
        target_ckpt: the target checkpoint (frozen, EMA weights).
        num_steps: the sampler the drafter is for (respaced steps); training timesteps are its steps.
        mode: "distill" (regress on the target's output, delta-matching weight) or "data" (plain
            diffusion loss on the data).
        optimizer: builds the optimizer from the draft net's parameters.
        sample_shape: linked from the data by the CLI; must equal the target's.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        target_ckpt: str,
        num_steps: int = 100,
        mode: str = "distill",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        sample_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.init_args.mode: expected one of {MODES}, got {mode!r}")
        target = _frozen_target(target_ckpt)
        if target.schedule.prediction != "eps" or target.schedule.clip_denoised:
            raise ValueError("DraftDistillation: the delta-matching loss is written for eps prediction without "
                             "clipping; the target uses " + repr(target.schedule))
        if sample_shape is not None and tuple(sample_shape) != tuple(target.sample_shape):
            raise ValueError(f"data.sample_shape {tuple(sample_shape)} differs from the target's "
                             f"{tuple(target.sample_shape)}: use the target's dataset")
        self._target = [target]  # a list: kept out of the state dict, the optimizer and .parameters()
        self.net = net
        self.schedule: DDPMSchedule = target.schedule
        self.plan = self.schedule.plan(num_steps)
        self.mode, self.optimizer = mode, optimizer
        self.sample_shape = tuple(target.sample_shape)
        self.save_hyperparameters(dict(
            net=module_config(net), target_ckpt=str(target_ckpt), num_steps=num_steps, mode=mode,
            schedule=self.schedule.config(), sample_shape=list(self.sample_shape),
        ))

    @property
    def target(self):
        return self._target[0]

    def on_fit_start(self) -> None:
        self.target.to(self.device)

    def on_validation_start(self) -> None:
        self.target.to(self.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def _losses(self, x0: torch.Tensor, seed: int | None = None):
        gen = torch.Generator(device=x0.device).manual_seed(seed) if seed is not None else None
        k = torch.randint(0, self.plan.num_stochastic_steps, (len(x0),), device=x0.device, generator=gen)
        t = self.plan.t(k)
        noise = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        eps_draft = self.net(x_t, t)
        with torch.no_grad():
            eps_target = self.target(x_t, t)
        sq = (eps_target - eps_draft).pow(2).flatten(1).sum(1)
        delta_sq = delta_sq_weight(self.plan, k).to(sq.dtype) * sq  # the transition's mismatch, per sample
        if self.mode == "distill":
            loss = delta_sq.mean()
        else:
            loss = (noise - eps_draft).pow(2).mean()
        return loss, delta_sq.detach(), k

    def training_step(self, batch, batch_idx: int):
        loss, delta_sq, _ = self._losses(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"drafter loss is {loss.item()} at step {self.global_step}: lower the learning rate")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/delta", delta_sq.sqrt().mean())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, delta_sq, k = self._losses(batch, seed=batch_idx)
        delta = delta_sq.sqrt()
        acceptance = 2 * torch.special.ndtr(-delta.double() / 2)
        self.log("val/delta", delta.mean(), sync_dist=True)
        self.log("val/acceptance", acceptance.mean(), sync_dist=True)
        bucket = (1 - (k.double() + 0.5) / self.plan.num_steps).mul(5).floor().clamp(max=4).long()  # t/T fifths
        for b in range(5):
            mask = bucket == b
            if mask.any():
                self.log(f"val/acceptance_t{b / 5:.1f}", acceptance[mask].mean(), sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer(self.net.parameters())


def load_draft_network(ckpt_path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, DDPMSchedule, tuple, int]:
    """(net in eval mode, its schedule, sample_shape, num_steps) from a DraftDistillation checkpoint."""
    ckpt = read_checkpoint(ckpt_path, map_location)
    hparams: dict[str, Any] = ckpt.get("hyper_parameters", {})
    if "target_ckpt" not in hparams or not hparams.get("net"):
        raise ValueError(f"checkpoint {ckpt_path} is not a draft-network checkpoint (no drafter hyperparameters); "
                         "train one with `python train.py fit --config configs/drafter/toy2d_draftnet.yaml`")
    net = build_module(hparams["net"])
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    return net, DDPMSchedule(**hparams["schedule"]), tuple(hparams["sample_shape"]), int(hparams["num_steps"])
