"""Medusa-like drafter heads: small networks on the frozen target's features.

A head sees the target's features at an anchor state (x_m, t_m) (one pass of the target, computed
anyway by the verification), the drafted state x_j at step j = m + offset and its timestep, and
returns a correction to the anchor's x0 estimate:  x0_Q(x_j) = x0_target(x_m) + head(...).
One head serves every offset (it is conditioned on the offset). The output layer starts at zero, so
an untrained head drafts exactly like the Free Drafter freezing x0; training can only add to that.
How the inputs are built and the correction used: `medusa_x0` below (used by the drafter's training,
`specdiff_train.models.drafter`, and at sampling time, `specdiff_train.speculative.learned`).

Both heads: `forward(features, inputs, t, offset)` with `inputs` the stacked per-state tensors
(B, num_inputs * C, ...) shaped like the state with `num_inputs` times the channels, t (B,) train
timesteps of x_j, offset (B,) >= 1; attributes `feature_dim`, `sample_shape`, `max_offset`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import TimestepEmbedding
from .mlp import ResidualBlock
from .unet import ResBlock, group_norm

if TYPE_CHECKING:
    from ..diffusion import DDPMSchedule

#: per-state tensors a head receives, stacked along the channel axis: the drafted state x_j, the eps
#: it implies with the anchor's x0, the anchor's x0 and the anchor state x_m.
NUM_INPUTS = 4


class _Conditioning(nn.Module):
    """Timestep embedding of x_j plus a learned embedding of the offset (offsets above `max_offset`
    share the last one)."""

    def __init__(self, time_embed_dim: int, max_offset: int):
        super().__init__()
        if max_offset < 1:
            raise ValueError(f"head: max_offset must be >= 1, got {max_offset}")
        self.time = TimestepEmbedding(time_embed_dim, hidden=time_embed_dim)
        self.offset = nn.Embedding(max_offset + 1, time_embed_dim)
        self.max_offset = max_offset

    def forward(self, t: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self.time(t) + self.offset(offset.clamp(1, self.max_offset))


class MLPHead(nn.Module):
    """Head for vector data: features (B, feature_dim) of an MLP target.

    Args:
        dim: data dimension.
        feature_dim: the target net's feature size (`target.net.feature_dim`, e.g. its `hidden`).
        hidden: width of the head.
        depth: residual blocks.
        time_embed_dim: size of the timestep / offset embedding.
        max_offset: largest offset with its own embedding (the sampler's window).
    """

    def __init__(self, dim: int = 2, feature_dim: int = 128, hidden: int = 64, depth: int = 2,
                 time_embed_dim: int = 32, max_offset: int = 8):
        super().__init__()
        self.dim, self.feature_dim, self.hidden, self.depth = dim, feature_dim, hidden, depth
        self.time_embed_dim, self.max_offset = time_embed_dim, max_offset
        self.sample_shape = (dim,)
        self.cond = _Conditioning(time_embed_dim, max_offset)
        self.feat = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden))
        self.inp = nn.Linear(NUM_INPUTS * dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, time_embed_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features, inputs, t, offset):
        emb = self.cond(t, offset)
        h = self.feat(features) + self.inp(inputs)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


class ConvHead(nn.Module):
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
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, feature_dim: int = 32, hidden: int = 32,
                 depth: int = 2, time_embed_dim: int = 32, max_offset: int = 8):
        super().__init__()
        self.in_channels, self.image_size, self.feature_dim = in_channels, image_size, feature_dim
        self.hidden, self.depth, self.time_embed_dim, self.max_offset = hidden, depth, time_embed_dim, max_offset
        self.sample_shape = (in_channels, image_size, image_size)
        self.cond = _Conditioning(time_embed_dim, max_offset)
        self.feat = nn.Sequential(group_norm(feature_dim), nn.Conv2d(feature_dim, hidden, 1))
        self.inp = nn.Conv2d(NUM_INPUTS * in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(hidden, hidden, time_embed_dim, 0.0) for _ in range(depth))
        self.out_norm = group_norm(hidden)
        self.out = nn.Conv2d(hidden, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features, inputs, t, offset):
        emb = self.cond(t, offset)
        h = self.feat(features) + self.inp(inputs)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


def medusa_x0(head, schedule: "DDPMSchedule", features, anchor_state, anchor_x0, x, t, offset) -> torch.Tensor:
    """The heads' x0 estimate at drafted states x (train timesteps t, `offset` steps after the anchor):
    the anchor's x0 plus the head's correction. The head also sees the eps that the anchor's x0
    implies at (x, t), i.e. what the Free Drafter (x0) would use."""
    eps_free = schedule.to_eps(anchor_x0, x, t, prediction="x0")
    inputs = torch.cat([x, eps_free, anchor_x0, anchor_state], dim=1)
    return anchor_x0 + head(features, inputs, t, offset)
