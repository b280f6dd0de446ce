"""Sinusoidal timestep embedding and class-label embedding, shared by the denoisers."""
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




def check_num_classes(num_classes, net: str) -> int:
    """`num_classes` of a denoiser: an int >= 0 (0: unconditional)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"{net}: num_classes must be an int >= 0 (0: unconditional), got {num_classes!r}")
    return num_classes


class LabelEmbedding(nn.Module):
    """A learned vector per class plus one for the null class, added to the timestep embedding.

    Labels are ints in [0, num_classes), or `NULL_LABEL` (-1) for "no label": the row the model was
    trained on with label dropout (`TargetDiffusion.p_uncond`), which classifier-free guidance needs.
    """

    def __init__(self, num_classes: int, dim: int):
        """Args: the number of classes and the embedding size (the timestep embedding's `out_dim`)."""
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)  # the last row is the null class
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None:
            index = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            index = torch.where(labels < 0, self.num_classes, labels).long()  # range checked where labels enter
        return self.table(index)


def add_label_embedding(net: nn.Module, emb: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The timestep embedding plus the label's, for a net with `label_embed` (None when unconditional)."""
    if net.label_embed is None:
        if labels is not None:
            raise ValueError(f"labels: {type(net).__name__} is unconditional (num_classes=0); sample it without "
                             "labels, or train a conditional target (net num_classes > 0)")
        return emb
    return emb + net.label_embed(labels, len(emb), emb.device)
