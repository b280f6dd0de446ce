"""A residual MLP denoiser for low-dimensional data."""
from __future__ import annotations

import torch
from torch import nn

from .embedding import LabelEmbedding, TimestepEmbedding, add_label_embedding, check_num_classes


class ResidualBlock(nn.Module):
    """Pre-norm residual block; the timestep embedding is added between its two layers."""

    def __init__(self, hidden: int, emb_dim: int):
        """Args: the block's width and the size of the timestep embedding."""
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(nn.functional.silu(y))


class MLPDenoiser(nn.Module):
    """MLP with residual blocks; the timestep embedding is added in every block.

    Args:
        dim: data dimension.
        hidden: width of the hidden layers (also the feature size exposed to drafter heads).
        depth: number of residual blocks.
        time_embed_dim: size of the sinusoidal timestep features.
        num_train_steps: diffusion steps the timesteps come from (kept for the record; the
            embedding takes raw integer timesteps).
        num_classes: classes of a conditional model (0: unconditional); a label embedding (with a null
            class for classifier-free guidance) is added to the timestep embedding.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, time_embed_dim: int = 128,
                 num_train_steps: int = 1000, num_classes: int = 0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLPDenoiser: dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        # constructor arguments kept as attributes: checkpoints rebuild the net from them
        self.dim, self.hidden, self.depth, self.time_embed_dim = dim, hidden, depth, time_embed_dim
        self.sample_shape = (dim,)
        self.feature_dim = hidden
        self.num_train_steps = num_train_steps
        self.num_classes = check_num_classes(num_classes, "MLPDenoiser")
        self.time_embed = TimestepEmbedding(time_embed_dim, hidden=time_embed_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, self.time_embed.out_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        self.label_embed = LabelEmbedding(num_classes, self.time_embed.out_dim) if num_classes else None  # built last

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        """Prediction at states x (B, dim), train timesteps t (B,) and, for a conditional net, labels (B,)
        (`NULL_LABEL` or None: unconditional rows); with `return_features`, (prediction, features)."""
        emb = add_label_embedding(self, self.time_embed(t), labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        features = nn.functional.silu(self.out_norm(h))
        out = self.out(features)
        return (out, features) if return_features else out
