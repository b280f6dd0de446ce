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

# Noise values a sampler draws ahead in one batched hash (bounds the memory of the buffer and of the
# hash's temporaries). Smaller buffers refill more often and give the same numbers.
NOISE_BUFFER_ELEMENTS = 1 << 22


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


def _hash32_unmasked(x: torch.Tensor) -> torch.Tensor:
    """hash32 of values already in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixing 32-bit integer hash ("lowbias32"), on int64 tensors holding values < 2**32."""
    return _hash32_unmasked(x & _MASK32)


def _hash32_int(x: int) -> int:
    """hash32 of one Python int (for constants, so that they cost no tensor op)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


_COUNTER_HI_SALT = 0x85EBCA6B
_HASHED_ZERO_COUNTER_HI = _hash32_int(_COUNTER_HI_SALT)  # hash32((counter >> 32) + salt) for counters < 2**32
_ELEMENT_SALT = 0x632BE5AB


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """The part of a row key that depends on the seed alone (int64, values < 2**32).

    Computed once per chain, it makes every later draw of that chain cheaper (`row_keys`)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    # Fold the high seed bits in so that seeds >= 2**32 stay distinct.
    return hash32(seeds & _MASK32) ^ hash32((seeds >> 32) + 0x9E3779B9)


def row_keys(seed_key: torch.Tensor, counters, stream, *, small_counters: bool = False) -> torch.Tensor:
    """Keys of the rows (seed, counter, stream), given `seed_keys(seed)`; broadcasts its arguments.

    `stream` may be an int or a tensor (one stream per row). `small_counters=True` promises that every
    counter is below 2**32, which skips the hashing of the counters' (zero) high bits."""
    counters = torch.as_tensor(counters, dtype=torch.int64, device=seed_key.device)
    key = _hash32_unmasked(seed_key ^ (counters & _MASK32))
    if small_counters:
        key = _hash32_unmasked(key ^ _HASHED_ZERO_COUNTER_HI)
    else:
        key = _hash32_unmasked(key ^ hash32((counters >> 32) + _COUNTER_HI_SALT))
    salt = stream * 0x27D4EB2F & _MASK32 if isinstance(stream, torch.Tensor) else int(stream) * 0x27D4EB2F & _MASK32
    return _hash32_unmasked(key ^ salt)


def _row_keys(seeds: torch.Tensor, counters: torch.Tensor | int, stream: int) -> torch.Tensor:
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    counters = torch.as_tensor(counters, dtype=torch.int64, device=seeds.device).expand_as(seeds)
    return row_keys(seed_keys(seeds), counters, stream)


def element_salts(positions: torch.Tensor) -> torch.Tensor:
    """What element `positions` mix into a row key (precompute it once for a fixed layout)."""
    return (hash32(positions) + _ELEMENT_SALT) & _MASK32


def words(keys: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """(*keys.shape, len(salts)) independent 32-bit words: one per row key and element."""
    return _hash32_unmasked(keys.unsqueeze(-1) ^ salts)


def gaussian_salts(numel: int, device=None) -> torch.Tensor:
    """Element salts of a `numel`-dimensional standard normal draw (for `words` -> `gaussian_from_words`)."""
    half = (numel + 1) // 2
    return element_salts(torch.arange(2 * half, device=device, dtype=torch.int64) * 2)


def uniform_salts(numel: int, device=None) -> torch.Tensor:
    """Element salts of `numel` uniforms (for `words` -> `uniform_from_words`): both words of each number."""
    return element_salts(torch.arange(2 * numel, device=device, dtype=torch.int64))


def uniform_from_words(w: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Uniforms in (0, 1) from word pairs (..., 2 n) laid out as (hi, lo) per number: 53 bits each."""
    hi, lo = w.unflatten(-1, (-1, 2)).unbind(-1)
    u = ((hi >> 5).double() * 67108864.0 + (lo >> 6).double() + 0.5) / 9007199254740992.0
    return u.to(dtype)


def gaussian_from_words(w: torch.Tensor, numel: int, dtype=torch.float32) -> torch.Tensor:
    """Standard normals (..., numel) from 2 * ceil(numel / 2) words, by Box-Muller."""
    half = (numel + 1) // 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = (w.to(work) + 0.5) * 2.0**-32
    u_radius, u_angle = u.split(half, dim=-1)
    radius = torch.sqrt(-2.0 * torch.log(u_radius))
    angle = (2.0 * math.pi) * u_angle
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return (z if numel == 2 * half else z[..., :numel]).to(dtype)


def uniform(seeds, counters, stream: int, shape=(), *, dtype=torch.float64) -> torch.Tensor:
    """Uniforms in the open interval (0, 1), shape (B, *shape), one independent stream per row.

    53-bit resolution (two 32-bit words per number), so tiny acceptance probabilities are exact.
    """
    shape = tuple(shape)
    keys = _row_keys(seeds, counters, stream)
    u = uniform_from_words(words(keys, uniform_salts(math.prod(shape), keys.device)), dtype)
    return u.reshape(len(keys), *shape)


def gaussian(seeds, counters, stream: int, shape, *, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws, shape (B, *shape), via Box-Muller on counter-based uniforms.

    One 32-bit word per uniform (tails reach 6.6 sigma); the arithmetic runs in float32 unless
    float64 is asked for, which keeps this a small fraction of a network step at batch 1024.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    keys = _row_keys(seeds, counters, stream)
    z = gaussian_from_words(words(keys, gaussian_salts(numel, keys.device)), numel, dtype)
    return z.reshape(len(keys), *shape)


def check_noise_buffer(noise_buffer) -> int:
    """Validate a sampler's `noise_buffer` (noise values drawn ahead at once)."""
    if isinstance(noise_buffer, bool) or not isinstance(noise_buffer, int) or noise_buffer < 1:
        raise ValueError(f"noise_buffer: expected an int >= 1 (noise values drawn ahead at once), got {noise_buffer!r}")
    return noise_buffer


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
