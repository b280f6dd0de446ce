"""Medusa-like heads, in one place: small networks on the frozen target's features.

A head sees the target's features at an anchor state (x_m, t_m) (one pass of the target, computed
anyway by the verification), the drafted state x_j at step j = m + offset and its timestep, and
returns a correction to the anchor's x0 estimate:  x0_Q(x_j) = x0_target(x_m) + head(...).
One head serves every offset (it is conditioned on the offset). The output layer starts at zero, so
an untrained head drafts exactly like the Free Drafter freezing x0; training can only add to that.

- Network: `MLPHead` (vector data), `ConvHead` (images), and `medusa_x0`, how a head's inputs are built
  and its correction used, shared by training and sampling.
- Training: `HeadDistillation` (configs/drafter/*_medusa.yaml) rolls the target's own chain (the sampler
  it is trained for: any family) `max_offset` steps forward from an anchor and fits the heads' x0 at each
  later state to the target's, with the delta^2 weight of each step (`x0_delta_sq_weight`); with
  `pool_offsets`, also on anchor/state pairs up to hundreds of steps apart on the target's own trajectories
  (the long windows of a 1000-step sampler; the heads then need `long_offsets`).
- Sampling: `MedusaDrafter` (its checkpoint is read by `checkpoints.load_drafter(path, "head")`).

Both heads: `forward(features, inputs, t, offset)` with `inputs` the stacked per-state tensors
(B, num_inputs * C, ...) shaped like the state with `num_inputs` times the channels, t (B,) the network
times of x_j (what the target's net is given: DDPM train timesteps; EDM and flow matching the schedule's
`network_inputs` time), offset (B,) >= 1; attributes `feature_dim`, `sample_shape`, `max_offset`.
"""
from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.nn import functional as F

from ..diffusion import Chain, Schedule, one_step_acceptance, step_mean
from ..nets.embedding import TimestepEmbedding
from ..nets.mlp import ResidualBlock
from ..nets.unet import ResBlock, group_norm
from .base import DraftContext, Verification, overrides
from .checkpoints import load_drafter, recorded_chain, recorded_schedule
from .distillation import (
    FrozenTargetDistillation,
    LearnedDrafter,
    check_drafter_module,
    mismatch_loss,
    pool_pairs,
    target_rollout,
    time_bucket,
    x0_delta_sq,
)


# --- network ------------------------------------------------------------------------------------
#: per-state tensors a head receives, stacked along the channel axis: the drafted state x_j, the eps
#: it implies with the anchor's x0, the anchor's x0 and the anchor state x_m.
NUM_INPUTS = 4


class _Conditioning(nn.Module):
    """Timestep embedding of x_j plus a learned embedding of the offset (offsets above `max_offset`
    share the last one); with `long_offsets`, also a sinusoidal embedding of the offset itself, which tells
    every offset apart (the windows of hundreds of steps of a 1000-step sampler). Its last layer starts at
    zero, so it adds nothing until trained."""

    def __init__(self, time_embed_dim: int, max_offset: int, long_offsets: bool = False):
        super().__init__()
        if max_offset < 1:
            raise ValueError(f"head: max_offset must be >= 1, got {max_offset}")
        self.time = TimestepEmbedding(time_embed_dim, hidden=time_embed_dim)
        self.offset = nn.Embedding(max_offset + 1, time_embed_dim)
        self.max_offset = max_offset
        self.long = TimestepEmbedding(time_embed_dim, hidden=time_embed_dim) if long_offsets else None
        if self.long is not None:
            nn.init.zeros_(self.long.mlp[-1].weight)
            nn.init.zeros_(self.long.mlp[-1].bias)

    def forward(self, t: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        emb = self.time(t) + self.offset(offset.clamp(1, self.max_offset))
        return emb if self.long is None else emb + self.long(offset)


class _Head(nn.Module):
    """What both heads compute: the target's features and the drafted inputs, embedded and summed, then
    residual blocks conditioned on (t, offset). Subclasses build `cond`, `feat`, `inp`, `blocks`,
    `out_norm` and `out` for their data."""

    def forward(self, features, inputs, t, offset):
        emb = self.cond(t, offset)
        h = self.feat(features) + self.inp(inputs)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


class MLPHead(_Head):
    """Head for vector data: features (B, feature_dim) of an MLP target.

    Args:
        dim: data dimension.
        feature_dim: the target net's feature size (`target.net.feature_dim`, e.g. its `hidden`).
        hidden: width of the head.
        depth: residual blocks.
        time_embed_dim: size of the timestep / offset embedding.
        max_offset: largest offset with its own embedding (the sampler's window).
        long_offsets: also embed the offset sinusoidally, so that offsets above `max_offset` are told apart
            (heads trained with `HeadDistillation(pool_offsets=...)` for long windows).
    """

    def __init__(self, dim: int = 2, feature_dim: int = 128, hidden: int = 64, depth: int = 2,
                 time_embed_dim: int = 32, max_offset: int = 8, long_offsets: bool = False):
        super().__init__()
        self.dim, self.feature_dim, self.hidden, self.depth = dim, feature_dim, hidden, depth
        self.time_embed_dim, self.max_offset, self.long_offsets = time_embed_dim, max_offset, bool(long_offsets)
        self.sample_shape = (dim,)
        self.cond = _Conditioning(time_embed_dim, max_offset, long_offsets)
        self.feat = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden))
        self.inp = nn.Linear(NUM_INPUTS * dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, time_embed_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)


class ConvHead(_Head):
    """Head for images: feature maps (B, feature_dim, H, W) of a U-Net target (its last decoder
    level, full resolution); a few small ResBlocks at that resolution.

    Args:
        in_channels: image channels.
        image_size: height = width.
        feature_dim: the target U-Net's feature channels (`target.net.feature_dim` = its base_channels).
        hidden: channels of the head.
        depth: ResBlocks.
        time_embed_dim: size of the timestep / offset embedding.
        max_offset: largest offset with its own embedding (the sampler's window).
        long_offsets: also embed the offset sinusoidally, so that offsets above `max_offset` are told apart
            (heads trained with `HeadDistillation(pool_offsets=...)` for long windows).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, feature_dim: int = 32, hidden: int = 32,
                 depth: int = 2, time_embed_dim: int = 32, max_offset: int = 8, long_offsets: bool = False):
        super().__init__()
        self.in_channels, self.image_size, self.feature_dim = in_channels, image_size, feature_dim
        self.hidden, self.depth, self.time_embed_dim, self.max_offset = hidden, depth, time_embed_dim, max_offset
        self.long_offsets = bool(long_offsets)
        self.sample_shape = (in_channels, image_size, image_size)
        self.cond = _Conditioning(time_embed_dim, max_offset, long_offsets)
        self.feat = nn.Sequential(group_norm(feature_dim), nn.Conv2d(feature_dim, hidden, 1))
        self.inp = nn.Conv2d(NUM_INPUTS * in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(hidden, hidden, time_embed_dim, 0.0) for _ in range(depth))
        self.out_norm = group_norm(hidden)
        self.out = nn.Conv2d(hidden, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)


def medusa_x0(head, schedule: Schedule, features, anchor_state, anchor_x0, x, t, offset,
              anchor_t: torch.Tensor | None = None) -> torch.Tensor:
    """The heads' x0 estimate at drafted states x (schedule times t, `offset` steps after the anchor):
    the anchor's x0 plus the head's correction. The head also sees the eps that the anchor's x0
    implies at (x, t), i.e. what the Free Drafter (x0) would use.

    The states and times are given to the head as the target's net gets them (`schedule.network_inputs`:
    EDM scales states by c_in and embeds log sigma, flow matching scales t; DDPM passes them as they are),
    the anchor state at its own time `anchor_t` (needed only where the schedule scales states)."""
    eps_free = schedule.to_eps(anchor_x0, x, t, prediction="x0")
    x_in, t_in = schedule.network_inputs(x, t)
    anchor_in = anchor_state if anchor_t is None else schedule.network_inputs(anchor_state, anchor_t)[0]
    inputs = torch.cat([x_in, eps_free, anchor_x0, anchor_in], dim=1)
    return anchor_x0 + head(features, inputs, t_in, offset)


# --- training -----------------------------------------------------------------------------------
class HeadDistillation(FrozenTargetDistillation):
    """Trains Medusa-like heads (`MLPHead` / `ConvHead` above) by self-distillation against the
    frozen target: features at an anchor (x_m, t_m), then the target's own chain (the plan's sampler) for
    `head.max_offset` steps; at each later state x_{m+j} the heads' x0 is fitted to the target's
    with the step's delta^2 weight. Validation also logs the Free Drafter's (x0) acceptance on the
    same states (`val/free_acceptance`: what an untrained head gives) and the acceptance per offset.

    Args:
        head: the heads (`MLPHead` / `ConvHead`), sized for the target's features.
        target_ckpt: the target checkpoint (frozen, EMA weights).
        num_steps: the sampler the heads are for (respaced steps): offsets count its steps.
        chain: the sampler chain the heads are for (None: the schedule's default; `FrozenTargetDistillation`).
        objective: "delta_sq" (mean delta^2), "tv" (mean rejection probability) or "log_acceptance" (mean -log
            acceptance); see `mismatch_loss`.
        trajectory_fraction: share of anchors taken from the target's own sampling trajectories
            instead of forward-noised data.
        trajectory_chains: chains in the pool of target trajectories.
        trajectory_refresh: training steps between two new pools.
        optimizer: builds the optimizer from the heads' parameters.
        sample_shape: linked from the data by the CLI; must equal the target's.
        guidance_scale: a conditional target's guidance scale the heads are for (`FrozenTargetDistillation`).
        draft_rollout_fraction: share of each training batch whose rollout follows the heads' own drafts after
            its first step (the states a speculative round drafts from; `target_rollout(draft_x0=...)`) instead
            of the target's chain; validation always rolls the target's chain.
        pool_offsets: largest offset of the long-offset pairs (0: none). Each batch then also has, per row, an
            anchor and a state `j` steps later on the same target trajectory of the pool (`pool_pairs`: j
            log-uniform in [1, pool_offsets]); the rollout reaches `head.max_offset` steps only, while the sampler's
            windows at 1000 steps draft hundreds. Needs `head.long_offsets` when above `head.max_offset`.
            Validation logs these pairs' acceptance apart (`val/long_acceptance`, `val/long_free_acceptance`, and
            `_t0.0` for the fifth nearest the data); the per-fifth record stays that of the rollout.
        pool_pairs_per_row: long-offset pairs per batch row (each costs two target rows, the anchor and the state;
            the rollout costs `max_offset + 1`).
    """

    module_key = "head"

    def __init__(
        self,
        head: torch.nn.Module,
        target_ckpt: str,
        num_steps: int = 100,
        objective: str = "delta_sq",
        trajectory_fraction: float = 0.0,
        trajectory_chains: int = 256,
        trajectory_refresh: int = 1000,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        sample_shape: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        chain: Chain | dict | None = None,
        draft_rollout_fraction: float = 0.0,
        pool_offsets: int = 0,
        pool_pairs_per_row: int = 1,
    ):
        super().__init__(target_ckpt, num_steps, objective, trajectory_fraction, trajectory_chains,
                         trajectory_refresh, optimizer, sample_shape, guidance_scale, chain)
        if not 0.0 <= draft_rollout_fraction <= 1.0:
            raise ValueError(f"model.init_args.draft_rollout_fraction: expected a value in [0, 1], got {draft_rollout_fraction}")
        self.draft_rollout_fraction = float(draft_rollout_fraction)
        if pool_offsets < 0:
            raise ValueError(f"model.init_args.pool_offsets: expected an int >= 0 (0: no long-offset pairs), got {pool_offsets}")
        if pool_offsets > head.max_offset and not getattr(head, "long_offsets", False):
            raise ValueError(
                f"model.init_args.pool_offsets: {pool_offsets} is above the head's max_offset {head.max_offset}, and "
                "the head gives every offset above that one embedding; set --model.init_args.head.init_args.long_offsets true")
        if pool_pairs_per_row < 1:
            raise ValueError(f"model.init_args.pool_pairs_per_row: expected an int >= 1, got {pool_pairs_per_row}")
        self.pool_offsets, self.pool_pairs_per_row = int(pool_offsets), int(pool_pairs_per_row)
        check_drafter_module(head, self.target, "head", "Size the head for the target's data.")
        feature_dim = getattr(self.target.net, "feature_dim", None)
        if getattr(head, "feature_dim", None) != feature_dim:
            raise ValueError(
                f"model.init_args.head.init_args.feature_dim: the head takes features of size "
                f"{getattr(head, 'feature_dim', None)}, the target's net ({type(self.target.net).__name__}) gives "
                f"{feature_dim}; set --model.init_args.head.init_args.feature_dim {feature_dim}"
            )
        if self.plan.num_stochastic_steps < 2:
            raise ValueError(f"model.init_args.num_steps: heads need at least 2 stochastic steps, got {num_steps}")
        self.head = head
        self.record_hparams(max_offset=int(head.max_offset), draft_rollout_fraction=self.draft_rollout_fraction,
                            pool_offsets=self.pool_offsets, pool_pairs_per_row=self.pool_pairs_per_row)

    def losses(self, x0, gen, labels=None):
        plan, S, K = self.plan, self.plan.num_stochastic_steps, int(self.head.max_offset)
        x_m, m, _, labels = self.start_states(x0, gen, S - 1, labels=labels)  # a draftable step after the anchor
        with torch.no_grad():  # the target as the sampler calls it: guided outputs, the conditional rows' features
            out_m, features = self.target_output(x_m, plan.t(m), labels, return_features=True)
            anchor_x0 = self.schedule.denoised(out_m, x_m, plan.t(m))
            drafted = torch.arange(len(x0), device=x0.device) < round(self.draft_rollout_fraction * len(x0))
            own = None
            if self.training and bool(drafted.any()):
                anchor_t = plan.t(m)
                own = lambda x, k, offset: medusa_x0(  # noqa: E731  the heads' x0 at the path's state, `offset` after m
                    self.head, self.schedule, features, x_m, anchor_x0, x, plan.t(k), torch.full_like(m, offset),
                    anchor_t)
            states, steps, outputs = target_rollout(self.target_with(labels), plan, x_m, m, out_m, K, gen,
                                                    draft_x0=own, drafted=drafted)
        offsets = torch.arange(1, K + 1, device=x0.device).repeat_interleave(len(x0))
        x, k, out = torch.cat(states), torch.cat(steps), torch.cat(outputs)
        keep = k < S  # drafted steps only (not past the chain's last stochastic step)
        rep = lambda v: v.repeat(K, *([1] * (v.dim() - 1)))[keep]  # noqa: E731
        x, k, out, offsets = x[keep], k[keep], out[keep], offsets[keep]
        anchor_state, anchor_x0, anchor_t = rep(x_m), rep(anchor_x0), rep(plan.t(m))
        t = plan.t(k)
        x0_head = medusa_x0(self.head, self.schedule, rep(features), anchor_state, anchor_x0, x, t, offsets, anchor_t)
        x0_target = self.schedule.denoised(out, x, t)  # as the sampler uses it (clipped when the schedule clips)
        delta_sq = x0_delta_sq(plan, k, x0_target, x0_head)
        extra = {}
        if not self.training:
            extra["free_delta_sq"] = x0_delta_sq(plan, k, x0_target, anchor_x0)  # per row
            acc = one_step_acceptance(delta_sq.detach().sqrt())
            for j in range(1, K + 1):
                if (offsets == j).any():
                    extra[f"acceptance_k{j}"] = acc[offsets == j].mean().float()
        if self.pool_offsets:
            long_sq, long_k, free_sq = self.long_offset_losses(x0, gen)
            if self.training:
                delta_sq, k = torch.cat([delta_sq, long_sq]), torch.cat([k, long_k])
            else:
                extra.update(long_offset_logs(self.plan, long_k, long_sq, free_sq))
        return mismatch_loss(delta_sq, self.objective), delta_sq.detach(), k, extra

    def long_offset_losses(self, like: torch.Tensor, gen: torch.Generator):
        """Per-row weighted delta^2 of the heads (and of the Free Drafter (x0)) on `pool_pairs_per_row * len(like)`
        anchor/state pairs of the trajectory pool (`pool_pairs`), with the drafted steps."""
        pool, plan = self.trajectory_pool(like), self.plan
        rows = self.pool_pairs_per_row * len(like)
        chain, m, offset = (v.to(like.device) for v in pool_pairs(pool.shape[0], pool.shape[1], rows,
                                                                   self.pool_offsets, gen))
        k = m + offset
        labels = None if self._pool_labels is None else self._pool_labels[chain]
        x_m, x = pool[m, chain].to(like.dtype), pool[k, chain].to(like.dtype)
        with torch.no_grad():
            out_m, features = self.target_output(x_m, plan.t(m), labels, return_features=True)
            anchor_x0 = self.schedule.denoised(out_m, x_m, plan.t(m))
            x0_target = self.schedule.denoised(self.target_output(x, plan.t(k), labels), x, plan.t(k))
        x0_head = medusa_x0(self.head, self.schedule, features, x_m, anchor_x0, x, plan.t(k), offset, plan.t(m))
        return x0_delta_sq(plan, k, x0_target, x0_head), k, x0_delta_sq(plan, k, x0_target, anchor_x0)


def long_offset_logs(plan, k: torch.Tensor, delta_sq: torch.Tensor, free_sq: torch.Tensor) -> dict:
    """Validation logs of the long-offset pairs: the heads' and the Free Drafter's (x0) mean acceptance, overall
    and in the fifth nearest the data (where the pairs have rows)."""
    logs = {}
    nearest = time_bucket(plan, k) == 0
    for name, sq in (("long_acceptance", delta_sq), ("long_free_acceptance", free_sq)):
        acc = one_step_acceptance(sq.detach().double().sqrt())
        logs[name] = acc.mean().float()
        if nearest.any():
            logs[f"{name}_t0.0"] = acc[nearest].mean().float()
    return logs


# --- sampling -----------------------------------------------------------------------------------
class MedusaDrafter(LearnedDrafter):
    """Medusa-like heads (`MLPHead` / `ConvHead` above) on the frozen target's features.

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
        schedule = recorded_schedule(hparams, self.checkpoint)
        self._set(head, schedule, hparams["sample_shape"], hparams, recorded_chain(hparams, schedule, self.checkpoint))

    @classmethod
    def from_head(cls, head: torch.nn.Module, schedule: Schedule, sample_shape,
                  chain: Chain | dict | None = None) -> "MedusaDrafter":
        """A drafter around in-memory heads (tests, notebooks), for the sampler `chain` (None: the schedule's
        default)."""
        drafter = cls.__new__(cls)
        drafter._set(head, schedule, sample_shape, chain=chain)
        return drafter

    round_state = ("features", "anchor_state", "anchor_x0", "anchor_step", "has_anchor")

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

    def _anchor_time(self, anchor_step: torch.Tensor) -> torch.Tensor | None:
        """The anchors' schedule times, where the schedule scales the states it gives its net (EDM); else None."""
        return self.plan.t(anchor_step) if self.schedule.scales_network_states else None

    @torch.no_grad()
    def propose(self, slots, x, k):
        anchor = (self.features[slots], self.anchor_state[slots], self.anchor_x0[slots], self.anchor_step[slots])
        return self._propose((*anchor, self._anchor_time(anchor[3])), x, k, self.plan.t(k), None)

    @torch.no_grad()
    def propose_step(self, slots, x, step):
        if overrides(self, "propose", MedusaDrafter):
            return self.propose(slots, x, step.k)
        if step.index == 0:  # the anchors stay fixed through the window: gather them once
            anchor = tuple(self.gather(b, slots) for b in
                           (self.features, self.anchor_state, self.anchor_x0, self.anchor_step))
            self._window_anchor = (*anchor, self._anchor_time(anchor[3]))
        return self._propose(self._window_anchor, x, step.k, step.t, step.coefficients)

    def _propose(self, anchor, x, k, t, coef):
        features, anchor_state, anchor_x0, anchor_step, anchor_t = anchor
        x0 = self.schedule.clip(
            medusa_x0(self.module, self.schedule, features, anchor_state, anchor_x0, x, t, k - anchor_step, anchor_t))
        if coef is None:
            return self.plan.transition_from_x0(x, k, x0)[0]
        return step_mean(coef, x, x0)

    def describe(self) -> str:
        return "medusa"
