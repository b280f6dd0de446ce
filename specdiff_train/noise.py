"""Counter-based per-sample randomness.

Every random number is a pure function of (seed, counter, stream, element index), computed with a
vectorised 32-bit integer hash in ordinary tensor ops. So each sample owns a reproducible stream
that does not depend on batch composition, and drawing noise for 1024 chains costs one batched op
instead of a Python loop over 1024 `torch.Generator`s.

`counter` is what advances along a chain (the step index for ancestral sampling, the round index
for speculative sampling); `stream` separates draws with different purposes at the same counter.
"""
from __future__ import annotations

import math
from enum import IntEnum

import torch

_MASK32 = 0xFFFFFFFF


class Stream(IntEnum):
    """Purposes of random draws; distinct streams never share numbers."""

    INIT = 1  # x_T
    STEP = 2  # ancestral step noise
    DRAFT = 3  # draft noise Z_i (speculative)
    ACCEPT = 4  # accept/reject uniforms
    CORRECTION = 5  # bonus / residual Gaussian
    RESIDUAL_U = 6  # scalar uniform of the residual inverse CDF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (split c into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixing 32-bit integer hash ("lowbias32"), on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seeds: torch.Tensor, counters: torch.Tensor | int, stream: int) -> torch.Tensor:
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    counters = torch.as_tensor(counters, dtype=torch.int64, device=seeds.device).expand_as(seeds)
    # Fold the high seed bits in so that seeds >= 2**32 stay distinct.
    key = hash32(seeds & _MASK32) ^ hash32((seeds >> 32) + 0x9E3779B9)
    key = hash32(key ^ (counters & _MASK32))
    key = hash32(key ^ hash32((counters >> 32) + 0x85EBCA6B))
    return hash32(key ^ (int(stream) * 0x27D4EB2F & _MASK32))


def _bits(seeds, counters, stream, numel: int, lane: int) -> torch.Tensor:
    """(B, numel) independent 32-bit words for each row."""
    keys = _row_keys(seeds, counters, stream)
    idx = torch.arange(numel, device=keys.device, dtype=torch.int64) * 2 + lane
    return hash32(keys[:, None] ^ hash32(idx)[None, :] + 0x632BE5AB)


def uniform(seeds, counters, stream: int, shape=(), *, dtype=torch.float64) -> torch.Tensor:
    """Uniforms in the open interval (0, 1), shape (B, *shape), one independent stream per row.

    53-bit resolution (two 32-bit words per number), so tiny acceptance probabilities are exact.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    hi = _bits(seeds, counters, stream, numel, 0) >> 5  # 27 bits
    lo = _bits(seeds, counters, stream, numel, 1) >> 6  # 26 bits
    u = (hi.double() * 67108864.0 + lo.double() + 0.5) / 9007199254740992.0
    return u.reshape(len(hi), *shape).to(dtype)


def gaussian(seeds, counters, stream: int, shape, *, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws, shape (B, *shape), via Box-Muller on counter-based uniforms.

    One 32-bit word per uniform (tails reach 6.6 sigma); the arithmetic runs in float32 unless
    float64 is asked for, which keeps this a small fraction of a network step at batch 1024.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    half = (numel + 1) // 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    words = _bits(seeds, counters, stream, 2 * half, 0).to(work)
    u = (words + 0.5) * 2.0**-32
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = (2.0 * math.pi) * u[:, half:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]
    return z.reshape(len(z), *shape).to(dtype)


def as_seed_tensor(seeds, device=None) -> torch.Tensor:
    """Validate a list of integer seeds and return it as an int64 tensor."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dim() != 1:
            raise ValueError("seeds: expected a 1-D integer tensor or a list of ints, one per sample")
        return seeds.to(device=device, dtype=torch.int64)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: got an empty list; pass one integer seed per sample")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError("seeds: expected a list of ints, one per sample")
    if any(s < 0 for s in seeds):
        raise ValueError("seeds: expected non-negative ints")
    return torch.tensor(seeds, dtype=torch.int64, device=device)
