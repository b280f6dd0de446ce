"""Sinusoidal timestep embedding shared by the denoisers."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) integer or float timesteps -> (B, dim) sin/cos features (Vaswani et al., DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a small MLP; `out_dim` is the embedding size it returns."""

    def __init__(self, dim: int, hidden: int | None = None):
        """
        Args:
            dim: number of sinusoidal features.
            hidden: width (and output size) of the MLP; default 4 * dim, as in DDPM.
        """
        super().__init__()
        hidden = hidden or 4 * dim
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.out_dim = hidden

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))
