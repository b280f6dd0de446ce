"""A DDPM U-Net for images, with einops for the reshapes."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .embedding import LabelEmbedding, TimestepEmbedding, add_label_embedding, check_num_classes


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (at most 32, powers of two) that divide `channels`."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the (projected) timestep embedding added in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        """Args: input and output channels, timestep-embedding size, dropout before the second conv."""
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over pixels."""

    def __init__(self, channels: int, num_heads: int):
        """Args: channels of the feature map (divisible by num_heads) and the number of heads."""
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"UNet: num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n c) h w -> three b n (h w) c", three=3, n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b n (h w) c -> b (n c) h w", h=height, w=width))


def _check_levels(image_size: int, channel_mults: tuple[int, ...], attention_levels: tuple[int, ...]) -> None:
    """ValueError when the image does not halve evenly at every level, or an attention level is not a level."""
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"UNet: image_size={image_size} is not divisible by 2**(len(channel_mults)-1) = {factor} "
            f"(channel_mults={list(channel_mults)}); use fewer levels in channel_mults or resize the images "
            f"(data.image_size) to a multiple of {factor}"
        )
    if any(not 0 <= level < len(channel_mults) for level in attention_levels):
        raise ValueError(f"UNet: attention_levels {list(attention_levels)} must index channel_mults {list(channel_mults)}")


class UNet(nn.Module):
    """DDPM U-Net: ResBlocks with the timestep embedding, self-attention at chosen levels,
    skip connections, zero-initialised output convolution.

    Args:
        in_channels: image channels.
        image_size: height = width of the images; must be divisible by 2**(len(channel_mults) - 1).
        base_channels: channels at the first level (also the feature size exposed to drafter heads).
        channel_mults: channel multiplier per resolution level.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels with self-attention (the middle always has it).
        num_heads: attention heads.
        dropout: dropout inside ResBlocks.
        time_embed_dim: sinusoidal feature size (default: base_channels).
        num_classes: classes of a conditional model (0: unconditional); a label embedding (with a null
            class for classifier-free guidance) is added to the timestep embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (1,),
        num_heads: int = 4,
        dropout: float = 0.0,
        time_embed_dim: int | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        channel_mults, attention_levels = tuple(channel_mults), tuple(attention_levels)
        _check_levels(image_size, channel_mults, attention_levels)
        # constructor arguments kept as attributes: checkpoints rebuild the net from them
        self.in_channels, self.image_size, self.base_channels = in_channels, image_size, base_channels
        self.channel_mults, self.num_res_blocks, self.attention_levels = channel_mults, num_res_blocks, attention_levels
        self.num_heads, self.dropout, self.time_embed_dim = num_heads, dropout, time_embed_dim
        self.num_classes = check_num_classes(num_classes, "UNet")
        self.sample_shape = (in_channels, image_size, image_size)
        self.feature_dim = base_channels
        # Submodules are built in this order (time_embed, conv_in, down, mid, up, out) so that a seeded
        # construction draws the same initial weights, and keep their names: checkpoints load by them.
        self.time_embed = TimestepEmbedding(time_embed_dim or base_channels)
        emb_dim = self.time_embed.out_dim
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skips = self._down_path(emb_dim)
        ch = skips[-1]
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up, ch = self._up_path(emb_dim, skips)
        self.out_norm = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes else None  # built last: seeded
        # unconditional nets draw the same initial weights as before labels existed

    def _level_block(self, level: int, in_ch: int, out_ch: int, emb_dim: int) -> list[nn.Module]:
        """A ResBlock to `out_ch`, followed by self-attention at the attention levels."""
        layers = [ResBlock(in_ch, out_ch, emb_dim, self.dropout)]
        if level in self.attention_levels:
            layers.append(Attention(out_ch, self.num_heads))
        return layers

    def _down_path(self, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """(the blocks from conv_in down to the middle, the channels of each skip connection they leave)."""
        down = nn.ModuleList()
        skips = [self.base_channels]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                down.append(nn.ModuleList(self._level_block(level, skips[-1], self.base_channels * mult, emb_dim)))
                skips.append(self.base_channels * mult)
            if level < len(self.channel_mults) - 1:  # downsample
                down.append(nn.ModuleList([nn.Conv2d(skips[-1], skips[-1], 3, stride=2, padding=1)]))
                skips.append(skips[-1])
        return down, skips

    def _up_path(self, emb_dim: int, skips: list[int]) -> tuple[nn.ModuleList, int]:
        """(the blocks from the middle up to conv_out, each taking one skip connection; their output channels)."""
        up, skips, ch = nn.ModuleList(), list(skips), skips[-1]
        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for i in range(self.num_res_blocks + 1):
                layers = self._level_block(level, ch + skips.pop(), self.base_channels * mult, emb_dim)
                ch = self.base_channels * mult
                if level > 0 and i == self.num_res_blocks:  # upsample
                    layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
                up.append(nn.ModuleList(layers))
        return up, ch

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        """Prediction at states x (B, C, H, W), train timesteps t (B,) and, for a conditional net, labels
        (B,) (`NULL_LABEL` or None: unconditional rows); with `return_features`, (prediction, features)."""
        emb = add_label_embedding(self, self.time_embed(t), labels)
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
        features = h
        out = self.conv_out(F.silu(self.out_norm(features)))
        return (out, features) if return_features else out
