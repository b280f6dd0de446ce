"""Drafters: one module per drafter kind, holding its network, training module, sampling adapter and
checkpoint format together.

- `base.py`: the `Drafter` contract and the hook types the sampling engine passes it.
- `training_free.py`: drafters that freeze a target output (`FrozenTargetDrafter`, `FreeDrafter`).
- `distillation.py`: what the learned kinds share (delta^2 maths, the frozen target, the training base
  `FrozenTargetDistillation`, the sampling base `LearnedDrafter`); `checkpoints.py`: their checkpoint
  format and the drafter/target check; `cost.py`: a draft call's cost next to a target call.
- `draftnet.py`: the distilled draft network (`DraftDistillation`, `DraftNetworkDrafter`, `load_draft_network`).
- `medusa.py`: Medusa-like heads (`MLPHead`, `ConvHead`, `HeadDistillation`, `MedusaDrafter`).
- `hybrid.py`: `HybridDrafter`, per step the learned drafter or the Free Drafter, chosen from the validation
  acceptance its checkpoint records.

This layer sits between `models/` (targets) and `speculative/` (the sampling engine, which re-exports
the drafters as `specdiff_train.speculative.*`).
"""
from .base import DraftContext, Drafter, DraftStep, DraftWindow, Verification
from .checkpoints import check_drafter_target, drafter_target_warning, export_slim_drafter, load_drafter
from .cost import relative_draft_cost
from .distillation import FrozenTargetDistillation, LearnedDrafter, frozen_target
from .draftnet import DraftDistillation, DraftNetworkDrafter, load_draft_network
from .hybrid import HybridDrafter
from .medusa import ConvHead, HeadDistillation, MedusaDrafter, MLPHead
from .training_free import FreeDrafter, FrozenOutputDrafter, FrozenTargetDrafter, training_free_drafters

__all__ = [
    "ConvHead",
    "DraftContext",
    "DraftDistillation",
    "DraftNetworkDrafter",
    "DraftStep",
    "DraftWindow",
    "Drafter",
    "FreeDrafter",
    "FrozenOutputDrafter",
    "FrozenTargetDistillation",
    "FrozenTargetDrafter",
    "HeadDistillation",
    "HybridDrafter",
    "LearnedDrafter",
    "MLPHead",
    "MedusaDrafter",
    "Verification",
    "check_drafter_target",
    "drafter_target_warning",
    "export_slim_drafter",
    "frozen_target",
    "load_draft_network",
    "load_drafter",
    "relative_draft_cost",
    "training_free_drafters",
]
