"""Exact speculative sampling for diffusion models."""
from .drafters import DraftContext, Drafter, FreeDrafter, FrozenOutputDrafter, FrozenTargetDrafter, Verification
from .engine import RoundRecord
from .learned import DraftNetworkDrafter, LearnedDrafter, MedusaDrafter, relative_draft_cost
from .sampler import SpeculativeResult, speculative_sample
from .verifiers import Verifier, parse_verifier
from .windows import FixedWindow, WindowPolicy

__all__ = [
    "DraftContext",
    "Drafter",
    "DraftNetworkDrafter",
    "FixedWindow",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDrafter",
    "LearnedDrafter",
    "MedusaDrafter",
    "RoundRecord",
    "SpeculativeResult",
    "Verification",
    "Verifier",
    "WindowPolicy",
    "parse_verifier",
    "relative_draft_cost",
    "speculative_sample",
]
