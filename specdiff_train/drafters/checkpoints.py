"""The checkpoint format of the learned drafters, shared by both kinds and by the sampling engine.

A drafter checkpoint (written by `DraftDistillation` / `HeadDistillation`, full or slim) records its
trained module under one hyperparameter key ("net" or "head") as `{"class_path", "init_args"}`, the
target it was trained against (`target_ckpt`, the weights' `target_fingerprint`), the schedule (`schedule`:
its init args, `schedule_class`: its class path; DDPM when absent), the sampler chain it was trained for
(`chain`: `{"class_path", "init_args"}`; the schedule's default chain when absent) and the sample shape.
Here: reading it (`load_drafter`, `recorded_schedule`, `recorded_chain`), writing the slim copy we ship
(`export_slim_drafter`), and checking that a drafter belongs to the target in use (`drafter_target_warning`,
`check_drafter_target`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config_io import build_module, class_path, read_checkpoint, resolve_class, state_dict_mismatch, target_fingerprint
from .. import chains
from ..diffusion import Chain, DDPMSchedule, Schedule, as_chain
from ..models.checkpoints import load_target, schedule_from_config


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


# --- the schedule and chain a drafter was trained for ----------------------------------------------------
def chain_record(chain: Chain) -> dict:
    """A chain as plain data, `{"class_path", "init_args"}` (what `recorded_chain` and `chains.as_chain` read);
    the shipped families under the name users write, `specdiff_train.chains.<Name>`."""
    cls = type(chain)
    path = f"{chains.__name__}.{cls.__name__}" if getattr(chains, cls.__name__, None) is cls else class_path(chain)
    return {"class_path": path, "init_args": dict(chain.config())}


def recorded_schedule(hparams: dict, where: str = "drafter checkpoint") -> Schedule:
    """The target schedule a drafter checkpoint records: `schedule` holds its init args and `schedule_class`
    its class path (checkpoints written before other families existed: DDPM); a `{"class_path",
    "init_args"}` record is read too."""
    record = hparams["schedule"]
    if isinstance(record, dict) and "class_path" in record:
        return schedule_from_config(record, where)
    path = hparams.get("schedule_class")
    if not path:
        return DDPMSchedule(**record)
    return schedule_from_config({"class_path": path, "init_args": record}, where)


def recorded_chain(hparams: dict, schedule: Schedule, where: str = "drafter checkpoint") -> Chain:
    """The sampler chain a drafter checkpoint was trained for (older checkpoints, which record none: the
    schedule's default chain). Only classes of this package or already imported are built."""
    record = hparams.get("chain")
    if record is None:
        return schedule.default_chain()
    cls = resolve_class(str(record.get("class_path", "")), trusted_only=True) if isinstance(record, dict) else None
    if not (isinstance(cls, type) and issubclass(cls, Chain)):
        raise ValueError(f"{where}: hyper_parameters['chain'] is {record!r}, not a specdiff_train chain "
                         "({class_path, init_args} of specdiff_train.chains.*)")
    return as_chain(record)


# --- reading and writing ----------------------------------------------------------------------------------
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


def recorded_acceptance(ckpt_path: str | Path) -> dict | None:
    """The acceptance per fifth of diffusion time that a drafter checkpoint records from its last validation
    (`distillation.acceptance_record`), or None for checkpoints written before it was recorded."""
    return read_checkpoint(ckpt_path).get("validation_acceptance")


def export_slim_drafter(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """A small copy of a drafter checkpoint: the drafter's weights and the hyperparameters (no optimizer
    or loop state), for shipping in `checkpoints/`."""
    ckpt = read_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters", {})
    key = next((k for k in ("net", "head") if isinstance(hparams.get(k), dict)), None)
    if key is None or "target_ckpt" not in hparams:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} is not a drafter checkpoint (DraftDistillation / HeadDistillation)")
    slim = {
        "hyper_parameters": dict(hparams),
        "state_dict": {k: v.contiguous().clone() for k, v in ckpt["state_dict"].items() if k.startswith(f"{key}.")},
        "global_step": ckpt.get("global_step"),
        "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
    }
    if ckpt.get("validation_acceptance") is not None:
        slim["validation_acceptance"] = ckpt["validation_acceptance"]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)
    return out
