"""LightningModules: the target diffusion model, draft-network distillation, and checkpoint loading."""
from .checkpoints import export_slim_checkpoint, load_target
from .drafter import DraftDistillation, load_draft_network
from .target import TargetDiffusion

__all__ = ["DraftDistillation", "TargetDiffusion", "export_slim_checkpoint", "load_draft_network", "load_target"]
