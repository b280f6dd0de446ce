"""Loading targets from their checkpoints.

A `TargetDiffusion` checkpoint is self-describing: its `hyper_parameters` hold plain data only
(`net` and `schedule` as `{"class_path", "init_args"}`, the optimizer config, `sample_shape`, ...;
recorded with `specdiff_train.config_io`), so `load_target(path)` rebuilds the module without the
YAML it was trained from, and `torch.load(..., weights_only=True)` can read it.

With Lightning's `EMAWeightAveraging`, a checkpoint's `state_dict` holds the EMA weights and
`current_model_state` the raw ones; `load_target` returns the EMA weights by default.

Drafter checkpoints are read by `specdiff_train.drafters.checkpoints`, a layer above. This module sits
above `models/target.py` (it builds targets); what target.py itself needs (configs, class paths,
reading files) is below both, in `config_io.py`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config_io import (
    describe_checkpoint,
    read_checkpoint,
    resolve_class,
    state_dict_mismatch,
)
from ..diffusion import Schedule
from .diffusers_target import is_pipeline_source, load_pipeline_target
from .target import TargetDiffusion


# --- loading ------------------------------------------------------------------------------------
def target_class(ckpt: Any, where: str):
    """The `TargetDiffusion` (sub)class recorded in a checkpoint; ValueError when it holds something else."""
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    cls = None
    if isinstance(hparams, Mapping) and "state_dict" in ckpt and "net" in hparams:
        cls = resolve_class(hparams["_class_path"], trusted_only=True) if "_class_path" in hparams else TargetDiffusion
    if cls is None or not issubclass(cls, TargetDiffusion):
        raise ValueError(f"checkpoint {where!r} holds {describe_checkpoint(ckpt)}, expected a target diffusion checkpoint "
                         f"(a {TargetDiffusion.__name__} saved by Lightning or by export_slim_checkpoint)")
    return cls


def schedule_from_config(config: Mapping, where: str = "checkpoint") -> Schedule:
    """The schedule recorded as {"class_path", "init_args"} (DDPM, EDM or flow matching; DDPM if unnamed)."""
    cls = resolve_class(str(config.get("class_path") or "specdiff_train.diffusion.DDPMSchedule"))
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise ValueError(f"{where}: hyper_parameters['schedule'] names {config.get('class_path')!r}, which is not a "
                         "specdiff_train schedule (DDPMSchedule, edm.EDMSchedule, flow.FlowSchedule)")
    return cls(**dict(config.get("init_args") or {}))


def build_target(hparams: Mapping, cls=None, where: str = "checkpoint") -> TargetDiffusion:
    """A fresh `TargetDiffusion` (or subclass) built from a checkpoint's hyperparameters."""
    cls = cls or TargetDiffusion
    if not isinstance(hparams.get("net"), Mapping):
        raise ValueError(
            f"{where} does not record how to build its network (hyper_parameters['net'] is "
            f"{type(hparams.get('net')).__name__}); it was trained with a net whose constructor arguments could "
            "not be recovered. Train through the CLI, or pass `net` as {'class_path': ..., 'init_args': {...}}."
        )
    schedule = hparams.get("schedule")
    if isinstance(schedule, Mapping):
        schedule = schedule_from_config(schedule, where)
    accepted = inspect.signature(cls.__init__).parameters
    skip = {"net", "schedule", "optimizer", "lr_scheduler"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted and k not in skip}
    return cls(net=dict(hparams["net"]), schedule=schedule, **kwargs)


def load_target(ckpt_path: str | Path, map_location="cpu", *, ema: bool = True) -> TargetDiffusion:
    """Load a target diffusion model from a full Lightning checkpoint or a slim one, or a diffusers
    DDPM pipeline (`models/diffusers_target.py`, needs `pip install -e ".[diffusers]"`).

    Args:
        ckpt_path: a `.ckpt` written by training (`last.ckpt`, ...) or by `export_slim_checkpoint`; or a
            folder written by `DDPMPipeline.save_pretrained`, or a hub id (`google/ddpm-cifar10-32`):
            a `DiffusersTarget` (`ema` does not apply).
        map_location: where to put the weights.
        ema: return the EMA weights when the checkpoint has them (the default); False returns the raw
            training weights (only full checkpoints trained with `EMAWeightAveraging` keep both).

    Returns:
        The module in eval mode with `requires_grad=False`; `model(x, t)` is the sampler contract, and
        `model.checkpoint_info` says which weights were loaded.
    """
    if is_pipeline_source(ckpt_path):  # a diffusers DDPMPipeline folder or hub id (imports diffusers only then)
        return load_pipeline_target(ckpt_path, map_location)
    where = str(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, map_location)
    cls = target_class(ckpt, where)
    model = build_target(ckpt["hyper_parameters"], cls, f"checkpoint {where!r}")
    has_raw = "current_model_state" in ckpt
    has_ema = has_raw or bool(ckpt.get("specdiff_slim", {}).get("ema", False))
    state = ckpt["state_dict"] if (ema or not has_raw) else ckpt["current_model_state"]
    problems = state_dict_mismatch(state, model.state_dict())
    if problems:
        raise ValueError(f"checkpoint {where!r} does not fit the network it records: " + "; ".join(problems))
    model.load_state_dict(state)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval().requires_grad_(False)
    model.checkpoint_info = {
        "path": where,
        "weights": "ema" if (has_ema and (ema or not has_raw)) else "raw",
        "global_step": ckpt.get("global_step"),
        "epoch": ckpt.get("epoch"),
    }
    return model


def export_slim_checkpoint(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write a small checkpoint with the hyperparameters and the EMA weights only (no optimizer,
    loop or callback state), for shipping in `checkpoints/`. `load_target` reads it."""
    where = str(ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    target_class(ckpt, where)
    slim = {
        "state_dict": {k: v.contiguous().clone() for k, v in ckpt["state_dict"].items()},
        "hyper_parameters": dict(ckpt["hyper_parameters"]),
        "hparams_name": ckpt.get("hparams_name", "kwargs"),
        "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "specdiff_slim": {"ema": "current_model_state" in ckpt or ckpt.get("specdiff_slim", {}).get("ema", False)},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)
    return out
