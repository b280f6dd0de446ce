"""Loading targets and drafters from their checkpoints, and checking that they belong together.

A `TargetDiffusion` checkpoint is self-describing: its `hyper_parameters` hold plain data only
(`net` and `schedule` as `{"class_path", "init_args"}`, the optimizer config, `sample_shape`, ...;
recorded with `specdiff_train.config_io`), so `load_target(path)` rebuilds the module without the
YAML it was trained from, and `torch.load(..., weights_only=True)` can read it.

With Lightning's `EMAWeightAveraging`, a checkpoint's `state_dict` holds the EMA weights and
`current_model_state` the raw ones; `load_target` returns the EMA weights by default.

Drafter checkpoints (written by `models/drafter.py`) are read here too (`load_drafter`,
`load_draft_network`), with the check that a drafter was trained against the target in use
(`check_drafter_target`): the sampling side (`specdiff_train.speculative`) uses them without
importing the training modules. This module sits above `models/target.py` (it builds targets);
what target.py itself needs (configs, class paths, reading files) is below both, in `config_io.py`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config_io import (
    build_module,
    describe_checkpoint,
    read_checkpoint,
    resolve_class,
    state_dict_mismatch,
    target_fingerprint,
)
from ..diffusion import DDPMSchedule
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
        schedule = DDPMSchedule(**schedule.get("init_args", {}))
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


# --- which target a drafter belongs to -----------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[2]


def _recorded_target(hparams: dict) -> tuple[str | None, str]:
    """(the fingerprint of the target a drafter was trained against, where it comes from)."""
    if hparams.get("target_fingerprint"):
        return hparams["target_fingerprint"], "recorded when the drafter was trained"
    # Checkpoints written before fingerprints were recorded: the recorded target file, as it is now.
    recorded = str(hparams.get("target_ckpt") or "")
    for path in (Path(recorded), REPO_ROOT / recorded):
        if recorded and path.is_file():
            return target_fingerprint(load_target(path)), f"of {recorded} as it is now (the drafter predates recorded fingerprints)"
    return None, f"its target file {recorded or '(none recorded)'} is gone"


def drafter_target_warning(drafter_ckpt: str | Path, target: torch.nn.Module) -> str | None:
    """A warning when the drafter checkpoint was trained against another target than `target` (its
    weights' fingerprint differs from the recorded one), or when that cannot be checked; None when they match."""
    hparams = read_checkpoint(drafter_ckpt).get("hyper_parameters") or {}
    recorded, source = _recorded_target(hparams)
    info = getattr(target, "checkpoint_info", None) or {}
    used = f"{info.get('path', 'the target in use')}" + (f" (step {info['global_step']})" if info.get("global_step") is not None else "")
    if recorded is None:
        return (f"drafter {drafter_ckpt}: cannot check that it was trained against {used}: it records no weight "
                f"fingerprint and {source}. If it was trained against another target, acceptance will be lower "
                "than it was trained to give (sampling stays exact).")
    actual = target_fingerprint(target)
    if recorded == actual:
        return None
    step = f" at step {hparams['target_step']}" if hparams.get("target_step") is not None else ""
    if info.get("path") and str(info["path"]) == str(hparams.get("target_ckpt")):
        step += " (that file now holds other weights: a later save of the run overwrote it?)"
    kind = "medusa" if isinstance(hparams.get("head"), dict) else "draftnet"
    return (
        f"drafter {drafter_ckpt} was trained against another target: {hparams.get('target_ckpt')}{step} (weights "
        f"{recorded}, {source}), but is used with {used} (weights {actual}). Sampling stays exact, but acceptance "
        "and speed-up will be lower than the drafter was trained to give. Train it for this target: `python "
        f"train.py fit --config configs/drafter/<target>_{kind}.yaml --model.init_args.target_ckpt <this target's checkpoint>`."
    )


def check_drafter_target(drafter: Any, target: torch.nn.Module) -> str | None:
    """`drafter_target_warning` for a drafter object that loaded a checkpoint (`.checkpoint`, as the learned
    drafters); emits it as a warning (rank zero) and returns it. Drafters without a checkpoint: None."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    ckpt = getattr(drafter, "checkpoint", None)
    if not ckpt:
        return None
    message = drafter_target_warning(ckpt, target)
    if message:
        rank_zero_warn(message)
    return message


# --- loading drafters at sampling time -------------------------------------------------------------------
def load_drafter(ckpt_path: str | Path, module_key: str, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """(the trained module in eval mode, frozen; the checkpoint's hyperparameters) from a checkpoint of
    `DraftDistillation` (module_key "net") or `HeadDistillation` ("head"), full or slim."""
    ckpt = read_checkpoint(ckpt_path, map_location)
    hparams: dict[str, Any] = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    kinds = {"net": ("draft-network", "toy2d_draftnet"), "head": ("drafter-heads", "toy2d_medusa")}
    what, config = kinds[module_key]
    if "target_ckpt" not in hparams or not isinstance(hparams.get(module_key), dict):
        found = hparams.get("_class_path") or ("a drafter of another kind" if "target_ckpt" in hparams
                                               else "no drafter hyperparameters")
        raise ValueError(f"checkpoint {str(ckpt_path)!r} is not a {what} checkpoint ({found}); train one with "
                         f"`python train.py fit --config configs/drafter/{config}.yaml`")
    module = build_module(hparams[module_key])
    prefix = f"{module_key}."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    problems = state_dict_mismatch(state, module.state_dict())
    if problems:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} does not fit the {module_key} it records: " + "; ".join(problems))
    module.load_state_dict(state)
    module.eval().requires_grad_(False)
    return module, hparams


def load_draft_network(ckpt_path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, DDPMSchedule, tuple, int]:
    """(net in eval mode, its schedule, sample_shape, num_steps) from a DraftDistillation checkpoint."""
    net, hparams = load_drafter(ckpt_path, "net", map_location)
    return net, DDPMSchedule(**hparams["schedule"]), tuple(hparams["sample_shape"]), int(hparams["num_steps"])
