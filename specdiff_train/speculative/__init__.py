"""Exact speculative sampling for diffusion models. The drafters live in `specdiff_train.drafters`; their
public names are re-exported here, where sampling code imports them."""
from ..drafters import (
    DraftContext,
    Drafter,
    DraftNetworkDrafter,
    FreeDrafter,
    FrozenOutputDrafter,
    FrozenTargetDrafter,
    HybridDrafter,
    LearnedDrafter,
    MedusaDrafter,
    Verification,
    relative_draft_cost,
)
from .costs import CostModel
from .engine import RoundRecord
from .sampler import SpeculativeResult, speculative_sample
from .verifiers import Verifier, parse_verifier
from .windows import CostAwareWindow, FixedWindow, HeuristicWindow, WindowPolicy

__all__ = [
    "CostAwareWindow",
    "CostModel",
    "DraftContext",
    "Drafter",
    "DraftNetworkDrafter",
    "FixedWindow",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDrafter",
    "HeuristicWindow",
    "HybridDrafter",
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
