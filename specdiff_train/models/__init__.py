"""LightningModules of the target diffusion model (ours, or a diffusers DDPM pipeline) and loading targets
from checkpoints.

Drafter training and loading moved to `specdiff_train.drafters` (a layer above, which this package must
not import); the old names here answer with where they are now.
"""
from .checkpoints import export_slim_checkpoint, load_target
from .diffusers_target import DiffusersTarget
from .target import TargetDiffusion

# Names this package exported before the drafters got their own package (issue 16): old name -> new home.
MOVED_TO_DRAFTERS = ("DraftDistillation", "HeadDistillation", "export_slim_drafter", "check_drafter_target",
                     "load_draft_network", "load_drafter")


def __getattr__(name: str):
    if name in MOVED_TO_DRAFTERS:  # an ImportError: `from ... import` would hide an AttributeError's text
        raise ImportError(f"specdiff_train.models.{name} moved to specdiff_train.drafters.{name}: "
                             f"use `from specdiff_train.drafters import {name}`", name=name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffusersTarget",
    "TargetDiffusion",
    "export_slim_checkpoint",
    "load_target",
]
