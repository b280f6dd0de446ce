"""Configs and checkpoint files, below every model: what any layer may read or record.

- Recording what rebuilds an object as plain data (`{"class_path", "init_args"}`: `class_path`, `plain`,
  `module_config`, `callable_config`) and building it again (`build_module`, `resolve_class`), old class
  paths of moved classes included (`MOVED_CLASS_PATHS`).
- Comparing a checkpoint with a model (`state_dict_mismatch`, `config_mismatch`).
- Reading a checkpoint file with clear errors (`read_checkpoint`, `describe_checkpoint`).
- The fingerprint of a model's weights (`target_fingerprint`), which drafters record.

It imports nothing of this package, so `errors.py`, `data/`, `models/` and the CLI can all use it;
loading targets is in `models/checkpoints.py`, loading drafters in `drafters/checkpoints.py`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

_PLAIN = (bool, int, float, str, type(None))
# Lightning's trusted instantiator: `TargetDiffusion.load_from_checkpoint` and `--ckpt_path` use it to
# rebuild nested `class_path` configs (the net, the optimizer) from the hyperparameters.
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


# --- recording what rebuilds an object --------------------------------------------------------
def class_path(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def plain(value: Any) -> Any:
    """`value` as YAML/`weights_only`-safe data (tuples become lists); raises TypeError otherwise."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: plain(v) for k, v in value.items()}
    raise TypeError(f"not plain data: {type(value).__name__}")


def _is_plain(value: Any) -> bool:
    try:
        plain(value)
    except TypeError:
        return False
    return True


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def module_config(module: torch.nn.Module) -> dict | None:
    """`{"class_path", "init_args"}` that rebuilds `module`, or None when that cannot be recovered.

    A constructor argument is recovered from an attribute of the same name; one that is not stored
    takes its default. The guess is checked by building the class again and comparing parameter
    names and shapes. Nets instantiated by the CLI (or passed to `TargetDiffusion` as a config dict)
    are recorded exactly and never go through this guess.
    """
    cls = type(module)
    init_args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(module, name) and _is_plain(getattr(module, name)):
            init_args[name] = plain(getattr(module, name))
        elif param.default is not param.empty and _is_plain(param.default):
            init_args[name] = plain(param.default)
        else:
            return None
    config = {"class_path": class_path(cls), "init_args": init_args}
    try:
        rebuilt = build_module(config)
    except Exception:  # noqa: BLE001 - any failure means the guess is wrong
        return None
    return config if _shapes(rebuilt) == _shapes(module) else None


def callable_config(fn) -> dict | None:
    """`{"class_path", "init_args"}` for an optimizer / LR scheduler callable given in Python
    (a class, or a `functools.partial` of one with keyword arguments); None otherwise."""
    if isinstance(fn, type):
        return {"class_path": class_path(fn), "init_args": {}}
    if isinstance(fn, functools.partial) and isinstance(fn.func, type) and not fn.args and _is_plain(fn.keywords):
        return {"class_path": class_path(fn.func), "init_args": plain(fn.keywords)}
    return None


def build_module(config: Mapping) -> torch.nn.Module:
    """Instantiate `{"class_path", "init_args"}` (nested configs included, moved class paths read as
    their new ones) with jsonargparse."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--module", type=torch.nn.Module)
    cfg = parser.parse_object({"module": with_current_class_paths(config)})
    return parser.instantiate_classes(cfg).module


# --- comparing a checkpoint with a model --------------------------------------------------------
def state_dict_mismatch(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences in names and shapes between two state dicts (empty when they fit)."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing from the checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"not in this model: {_few(unexpected)}")
    for k in expected:
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(found[k].shape)} in the checkpoint, {tuple(expected[k].shape)} here")
    return problems


def config_mismatch(found: Any, expected: Any, prefix: str) -> list[str]:
    """Leaves where two nested configs differ, as 'prefix.key: found != expected'."""
    if isinstance(found, Mapping) and isinstance(expected, Mapping):
        out = []
        for k in sorted(set(found) | set(expected), key=str):
            out += config_mismatch(found.get(k, "<unset>"), expected.get(k, "<unset>"), f"{prefix}.{k}")
        return out
    return [] if found == expected else [f"{prefix}: {found!r} in the checkpoint, {expected!r} here"]


def _few(names: list[str], n: int = 5) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# --- reading checkpoint files ------------------------------------------------------------------
def read_checkpoint(ckpt_path: str | Path, map_location="cpu") -> dict:
    """`torch.load` with clear errors for a missing file or one that is not a plain-data checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (looked for {path.resolve()})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {str(path)!r} holds Python objects that are not plain data, so it was not loaded "
            f"(torch.load weights_only=True refused it: {str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).split(". ")[0].strip() or type(err).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} could not be read as a torch file: it is damaged, truncated (an interrupted "
            f"copy or save) or not a checkpoint (torch: {first}). Copy it again, or use another checkpoint (a "
            "run's checkpoints/ folder keeps last.ckpt and the latest epoch=...-step=....ckpt)."
        ) from err
    return ckpt


def describe_checkpoint(ckpt: Any) -> str:
    """What a loaded checkpoint holds, in a few words, for error messages."""
    if not isinstance(ckpt, Mapping):
        return f"a {type(ckpt).__name__}"
    hparams = ckpt.get("hyper_parameters")
    if isinstance(hparams, Mapping) and "_class_path" in hparams:
        return hparams["_class_path"].rsplit(".", 1)[-1] + f" ({hparams['_class_path']})"
    if "state_dict" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return "a bare state dict (no hyperparameters)"
        return f"a dict with keys {_few(sorted(map(str, ckpt)))}"
    return "a Lightning checkpoint without the hyperparameters of a target model"


# --- class paths that moved ---------------------------------------------------------------------------
# Where classes were before the drafters got their own package (issue 16): old class path -> new one.
# Users' configs and the hyperparameters recorded in checkpoints (the shipped ones included) still name
# the old homes; `resolve_class`, `build_module` and the CLI's --ckpt_path read them through this table.
_DRAFTERS = "specdiff_train.drafters"
MOVED_CLASS_PATHS = {
    "specdiff_train.models.DraftDistillation": f"{_DRAFTERS}.draftnet.DraftDistillation",
    "specdiff_train.models.HeadDistillation": f"{_DRAFTERS}.medusa.HeadDistillation",
    **{f"specdiff_train.models.drafter.{name}": f"{_DRAFTERS}.{home}.{name}" for name, home in (
        ("FrozenTargetDistillation", "distillation"), ("DraftDistillation", "draftnet"),
        ("HeadDistillation", "medusa"))},
    **{f"specdiff_train.nets.heads.{name}": f"{_DRAFTERS}.medusa.{name}" for name in ("MLPHead", "ConvHead")},
    **{f"specdiff_train.speculative.learned.{name}": f"{_DRAFTERS}.{home}.{name}" for name, home in (
        ("LearnedDrafter", "distillation"), ("DraftNetworkDrafter", "draftnet"), ("MedusaDrafter", "medusa"))},
    **{f"specdiff_train.speculative.drafters.{name}": f"{_DRAFTERS}.{home}.{name}" for name, home in (
        ("Drafter", "base"), ("FrozenOutputDrafter", "training_free"), ("FrozenTargetDrafter", "training_free"),
        ("FreeDrafter", "training_free"))},
}


def current_class_path(path: str) -> str:
    """`path`, or where its class is now when it moved (`MOVED_CLASS_PATHS`)."""
    return MOVED_CLASS_PATHS.get(path, path)


def with_current_class_paths(config: Any) -> Any:
    """A copy of a config (nested dicts and lists) with every moved `class_path` / `_class_path` updated."""
    if isinstance(config, Mapping):
        return {k: current_class_path(v) if k in ("class_path", "_class_path") and isinstance(v, str)
                else with_current_class_paths(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(with_current_class_paths(v) for v in config)
    return config


def resolve_class(path: str, *, trusted_only: bool = False) -> type | None:
    """The class named by a dotted `path` (None if there is none; a moved class by its old path too).
    With `trusted_only`, only from modules already imported or from this package: a checkpoint must not
    make us import arbitrary code."""
    module, _, name = current_class_path(path).rpartition(".")
    if trusted_only and module not in sys.modules and not module.startswith("specdiff_train"):
        return None
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


# --- the fingerprint of a model's weights ---------------------------------------------------------------
def target_fingerprint(target: torch.nn.Module) -> str:
    """16 hex digits of sha256 over the target's weights (`state_dict`: names, shapes, values; floating
    tensors as float32), so a full checkpoint and its slim export have the same fingerprint, and a
    target from another step or run has another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(target.state_dict().items()):
        t = tensor.detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
