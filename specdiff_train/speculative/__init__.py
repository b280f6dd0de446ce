"""Exact speculative sampling for diffusion models."""
from .drafters import DraftContext, Drafter, FreeDrafter, FrozenOutputDrafter, FrozenTargetDrafter, Verification
from .learned import DraftNetworkDrafter, LearnedDrafter, MedusaDrafter, relative_draft_cost
from .sampler import SpeculativeResult, speculative_sample

__all__ = [
    "DraftContext",
    "Drafter",
    "DraftNetworkDrafter",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDrafter",
    "LearnedDrafter",
    "MedusaDrafter",
    "SpeculativeResult",
    "Verification",
    "relative_draft_cost",
    "speculative_sample",
]
