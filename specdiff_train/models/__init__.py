"""LightningModules: the target diffusion model, drafter training (draft networks, heads), and checkpoint loading."""
from .checkpoints import export_slim_checkpoint, load_target
from .drafter import DraftDistillation, HeadDistillation, export_slim_drafter, load_draft_network, load_drafter
from .target import TargetDiffusion

__all__ = [
    "DraftDistillation",
    "HeadDistillation",
    "TargetDiffusion",
    "export_slim_checkpoint",
    "export_slim_drafter",
    "load_draft_network",
    "load_drafter",
    "load_target",
]
