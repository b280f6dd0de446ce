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
from typing import Sequence

import torch

from ._aranges import arange

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


# --- noise drawn ahead ----------------------------------------------------------------------------
# Both samplers draw their noise for many counters in one batched hash and hand it out one counter at
# a time: ancestral sampling in lock-step blocks of steps (`step_noise_blocks`), speculative sampling
# per slot, since its chains advance at their own pace (`RoundNoise`). Any buffer size gives the
# numbers `gaussian` / `uniform` give for the same keys (tests/test_noise_refills.py).

def keyed_gaussians(seed_key: torch.Tensor, counters, stream, salts: torch.Tensor, numel: int) -> torch.Tensor:
    """`gaussian`'s numbers for the broadcast rows (seed_key, counters, stream), counters < 2**32:
    shape (*rows, numel). `salts` is `gaussian_salts(numel)`, made once per layout."""
    return gaussian_from_words(words(row_keys(seed_key, counters, stream, small_counters=True), salts), numel)


def step_noise_blocks(seeds: torch.Tensor, shape: Sequence[int], num_steps: int, stream: int = Stream.STEP,
                      max_elements: int = NOISE_BUFFER_ELEMENTS):
    """Yield the per-step noise `gaussian(seeds, k, stream, shape)` for k = 0, 1, ..., drawing many
    steps in one batched hash (the same numbers, a few operators per step instead of ~150)."""
    numel = math.prod(shape)
    keys, salts = seed_keys(seeds), gaussian_salts(numel, seeds.device)
    block = max(1, min(num_steps, max_elements // max(1, len(seeds) * numel)))
    for first in range(0, num_steps, block):
        steps = torch.arange(first, min(first + block, num_steps), device=seeds.device)
        z = keyed_gaussians(keys[:, None], steps, stream, salts, numel)
        yield from z.reshape(len(seeds), len(steps), *shape).unbind(1)


MAX_ROUNDS_AHEAD = 64
FIRST_FILL_SHARE = 8  # a buffer's first fill draws at most this share of `max_elements`, then doubles


class RoundNoise:
    """Every random number a speculative chain's rounds need, drawn for several rounds ahead per slot.

    Per slot and round r of its chain: the draft noise Z_1..Z_W (counter r << 16 | position, stream
    DRAFT), the bonus / correction Gaussian (counter r << 16, CORRECTION), the accept uniforms (ACCEPT)
    and the residual's uniform (RESIDUAL_U): the same numbers as drawing them round by round, so the
    noise layout is independent of how far ahead it is drawn. `max_elements` bounds the buffer: it
    holds between 1 and `MAX_ROUNDS_AHEAD` rounds of every slot.
    """

    def __init__(self, capacity: int, window: int, numel: int, device, max_elements: int = NOISE_BUFFER_ELEMENTS):
        self.window, self.numel = window, numel
        per_round = capacity * (window + 1) * numel  # values drawn per round of every slot
        self.ahead = max(1, min(MAX_ROUNDS_AHEAD, max_elements // per_round))
        self._fill_rounds = max(1, min(self.ahead, max_elements // FIRST_FILL_SHARE // per_round))
        self.gaussians = torch.zeros(capacity, self.ahead, window + 1, numel, device=device)
        self.uniforms = torch.zeros(capacity, self.ahead, window + 1, dtype=torch.float64, device=device)
        self.first_round = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.seed_keys = torch.zeros(capacity, dtype=torch.int64, device=device)
        positions = torch.arange(window + 1, device=device)
        self._gauss_positions = torch.where(positions < window, positions + 1, 0)  # Z_1..Z_W, then xi
        self._gauss_streams = torch.where(positions < window, int(Stream.DRAFT), int(Stream.CORRECTION))
        self._unif_streams = torch.tensor([int(Stream.ACCEPT), int(Stream.RESIDUAL_U)], device=device)
        self._gauss_salts = gaussian_salts(numel, device)
        self._unif_salts = uniform_salts(max(window, 1), device)  # window 0: the residual's uniform alone
        self.expires: dict[int, int] = {}  # slot -> the sampler round at which its draws run out

    def admit(self, slots: torch.Tensor, seeds: torch.Tensor, slot_list) -> None:
        """New chains in `slots`: their draws are made at their first round that needs them (`expired`)."""
        self.seed_keys[slots] = seed_keys(seeds)
        for slot in slot_list:
            self.expires.pop(slot, None)

    def fill(self, slots: torch.Tensor, chain_rounds: torch.Tensor, sampler_round: int, slot_list) -> None:
        """Draw rounds chain_rounds .. + R - 1 for `slots`. R starts at 1/`FIRST_FILL_SHARE` of the buffer
        (all of it for small batches) and doubles at each fill up to `ahead`: a large batch that stops
        drafting soon after starting hashes little that it never uses."""
        ahead, self._fill_rounds = self._fill_rounds, min(self.ahead, 2 * self._fill_rounds)
        keys = self.seed_keys[slots]
        rounds = chain_rounds.unsqueeze(1) + arange(0, ahead, keys.device)  # (S, R)
        base = (rounds << 16).unsqueeze(-1)
        self.gaussians[slots, :ahead] = keyed_gaussians(keys[:, None, None], base | self._gauss_positions,
                                                        self._gauss_streams, self._gauss_salts, self.numel)
        u_keys = row_keys(keys[:, None, None], base, self._unif_streams, small_counters=True)
        accept, residual = uniform_from_words(words(u_keys, self._unif_salts)).unbind(-2)
        # W accept uniforms, then 1 residual uniform
        self.uniforms[slots, :ahead] = torch.cat([accept[..., : self.window], residual[..., :1]], dim=-1)
        self.first_round[slots] = chain_rounds
        for slot in slot_list:
            self.expires[slot] = sampler_round + ahead

    def expired(self, sampler_round: int, live) -> list[int]:
        """The slots of `live` whose draws do not reach `sampler_round` (to `fill` before it)."""
        return [s for s in live if self.expires.get(s, -1) <= sampler_round]

    def draw(self, rows: torch.Tensor, chain_rounds: torch.Tensor, all_rows: bool):
        """(draft noise (C, W, numel), xi (C, numel), accept uniforms (C, W), residual uniforms (C,))."""
        offset = chain_rounds - (self.first_round if all_rows else self.first_round[rows])
        g = self.gaussians[rows, offset]
        u = self.uniforms[rows, offset]
        return g[:, : self.window], g[:, self.window], u[:, : self.window], u[:, self.window]


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
