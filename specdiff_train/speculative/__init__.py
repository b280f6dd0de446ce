"""Exact speculative sampling for diffusion models."""
from .drafters import DraftContext, Drafter, FreeDrafter, FrozenOutputDrafter, FrozenTargetDrafter, Verification
from .sampler import SpeculativeResult, speculative_sample

__all__ = [
    "DraftContext",
    "Drafter",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDrafter",
    "SpeculativeResult",
    "Verification",
    "speculative_sample",
]
