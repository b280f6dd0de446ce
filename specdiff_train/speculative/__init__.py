"""Exact speculative sampling for diffusion models."""
from .drafters import DraftContext, Drafter, FreeDrafter, FrozenOutputDrafter, FrozenTargetDrafter, Verification
from .learned import DraftNetworkDrafter
from .sampler import SpeculativeResult, speculative_sample

__all__ = [
    "DraftContext",
    "Drafter",
    "DraftNetworkDrafter",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDrafter",
    "SpeculativeResult",
    "Verification",
    "speculative_sample",
]
