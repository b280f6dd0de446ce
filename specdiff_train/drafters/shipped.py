"""Learned drafters stored beside their target, as the shipped ones are: `<target dir>/<kind>.ckpt`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from .distillation import LearnedDrafter
from .draftnet import DraftNetworkDrafter
from .medusa import MedusaDrafter

LEARNED_KINDS = {"draftnet": DraftNetworkDrafter, "medusa": MedusaDrafter}


def learned_drafters_beside(target_dir: str | Path, kinds: Iterable[str]) -> dict[str, Callable[[], LearnedDrafter]]:
    """Factories of the learned drafters of `kinds` (names in `LEARNED_KINDS`) whose checkpoints sit in
    `target_dir` (draftnet.ckpt, medusa.ckpt); kinds without a checkpoint there are left out."""
    target_dir = Path(target_dir)
    return {kind: (lambda cls=LEARNED_KINDS[kind], path=str(target_dir / f"{kind}.ckpt"): cls(path))
            for kind in kinds if (target_dir / f"{kind}.ckpt").exists()}
