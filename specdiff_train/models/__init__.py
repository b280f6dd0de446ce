"""LightningModules: the target diffusion model (ours, or a diffusers DDPM pipeline), drafter training (draft networks, heads), and checkpoint loading.

The drafter-training modules (`DraftDistillation`, `HeadDistillation`, `export_slim_drafter`) are
imported on first use, so that the sampling side, which reads checkpoints through
`specdiff_train.models.checkpoints`, never imports `specdiff_train.models.drafter`.
"""
from .checkpoints import check_drafter_target, export_slim_checkpoint, load_draft_network, load_drafter, load_target
from .diffusers_target import DiffusersTarget
from .target import TargetDiffusion

_DRAFTER_TRAINING = ("DraftDistillation", "HeadDistillation", "export_slim_drafter")


def __getattr__(name: str):
    if name in _DRAFTER_TRAINING:
        from . import drafter

        return getattr(drafter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_DRAFTER_TRAINING))


__all__ = [
    "DiffusersTarget",
    "DraftDistillation",
    "HeadDistillation",
    "TargetDiffusion",
    "check_drafter_target",
    "export_slim_checkpoint",
    "export_slim_drafter",
    "load_draft_network",
    "load_drafter",
    "load_target",
]
