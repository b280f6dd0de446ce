"""LightningModules: the target diffusion model (and, later, drafters), and checkpoint loading."""
from .checkpoints import export_slim_checkpoint, load_target
from .target import TargetDiffusion

__all__ = ["TargetDiffusion", "load_target", "export_slim_checkpoint"]
