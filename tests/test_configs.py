"""Every YAML under configs/ parses and instantiates (model, data module, trainer), without
training and without downloading: hub data modules are built but never set up.

Each folder of configs/ says how its files are checked in `CHECKS`; a new folder (drafter, eval)
gets an entry there, or this test fails and says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from helpers import ROOT
from specdiff_train.cli import main

CONFIGS = ROOT / "configs"
TARGETS = sorted((CONFIGS / "target").glob("*.yaml"))
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def instantiate(*args: str):
    """Parse and build a full config with the CLI, without running anything."""
    return main([*map(str, args), *QUIET, *hub_pipeline_overrides(args)], run=False)


_PIPELINES: dict[tuple, Path] = {}


def hub_pipeline_overrides(args) -> list[str]:
    """Configs whose target is a diffusers pipeline on the hub (google/ddpm-cifar10-32) are built offline
    around a tiny random pipeline of the same sample shape (its UNet gives 8 feature channels)."""
    import atexit
    import shutil
    import tempfile

    for arg in args:
        config = yaml.safe_load(Path(arg).read_text()) if str(arg).endswith(".yaml") else None
        init = ((config or {}).get("model") or {}).get("init_args") or {}
        key = "pretrained" if "pretrained" in init else "target_ckpt"
        if init.get(key) != "google/ddpm-cifar10-32":
            continue
        pytest.importorskip("diffusers")
        from helpers import save_tiny_pipeline

        if (3, 32) not in _PIPELINES:
            folder = tempfile.mkdtemp()
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _PIPELINES[(3, 32)] = save_tiny_pipeline(Path(folder) / "tiny", in_channels=3, sample_size=32)
        extra = ["--model.init_args.head.init_args.feature_dim", "8"] if "head" in init else []
        return [f"--model.init_args.{key}", str(_PIPELINES[(3, 32)]), *extra]
    return []


def check_target(path: Path) -> None:
    cli = instantiate("--config", path)
    model, data = cli.model, cli.datamodule
    assert tuple(model.sample_shape) == tuple(data.sample_shape)
    assert tuple(model.net.sample_shape) == tuple(data.sample_shape)
    out = model(torch.zeros(2, *model.sample_shape), torch.tensor([0, 999]))
    assert out.shape == (2, *model.sample_shape)
    assert cli.trainer.default_root_dir.startswith("runs") or "runs/" in cli.trainer.default_root_dir


def check_trainer_preset(path: Path) -> None:
    preset = yaml.safe_load(path.read_text())["trainer"]
    overrides = []
    if preset.get("accelerator") == "gpu" and not torch.cuda.is_available():
        # Built on CPU here; the GPU keys themselves are checked as parsed values.
        overrides = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    cli = instantiate("--config", path, "--config", CONFIGS / "target" / "toy2d.yaml", *overrides)
    if not overrides:
        assert cli.trainer.num_devices == preset.get("devices", 1)
    assert cli.config.trainer.accelerator == (preset["accelerator"] if not overrides else "cpu")


def check_eval(path: Path) -> None:
    """An evaluate config parses together with the target config of the same name, and its
    methods resolve (drafter names, verifiers, windows)."""
    from helpers import run_train
    from specdiff_train.evaluation.command import resolve_drafters
    from specdiff_train.evaluation.compare import method_grid

    options = yaml.safe_load(path.read_text())
    methods = method_grid(resolve_drafters(options["drafters"]), options["verifiers"], options["windows"])
    assert methods
    target = CONFIGS / "target" / path.name
    proc = run_train("evaluate", "--config", target, "--config", path, "--print_config")
    assert yaml.safe_load(proc.stdout)["num_steps"] == options["num_steps"]


def check_drafter(path: Path) -> None:
    """A drafter config builds its training module around the (shipped) frozen target."""
    cli = instantiate("--config", path)
    model, data = cli.model, cli.datamodule
    assert tuple(model.sample_shape) == tuple(data.sample_shape)
    assert not any(p.requires_grad for p in model.target.parameters())
    assert all(id(p) not in {id(q) for q in model.target.parameters()} for p in model.parameters())
    # One training loss on a few data points (draft networks and heads alike): no pool states among them, and the
    # long-offset pairs (heads with pool_offsets) from a pool of two chains.
    model.trajectory_fraction, model.trajectory_chains = 0.0, 2
    loss, delta_sq, steps, _ = model.losses(torch.zeros(4, *model.sample_shape), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad
    assert delta_sq.shape == steps.shape and len(steps) >= 4


# folder under configs/ -> how to check one of its files
CHECKS: dict[str, Callable[[Path], None]] = {
    "target": check_target,
    "trainer": check_trainer_preset,
    "eval": check_eval,
    "drafter": check_drafter,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_instantiates(path):
    folder = path.relative_to(CONFIGS).parts[0]
    assert folder in CHECKS, f"{path}: no check for configs/{folder}/ yet: add one to CHECKS in tests/test_configs.py"
    CHECKS[folder](path)


def test_there_are_configs():
    names = {p.stem for p in TARGETS}
    assert {"toy2d", "digits", "mnist", "cifar10", "ddpm_cifar10"} <= names
    assert {"cpu", "ddp_cpu", "gpu"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_compose_with_targets_in_any_order(preset):
    """Trainer presets set hardware only and target configs never do, so `--config` order does not matter."""
    preset_keys = set(yaml.safe_load(preset.read_text())["trainer"])
    for target in TARGETS:
        target_keys = set(yaml.safe_load(target.read_text()).get("trainer", {}))
        assert not preset_keys & target_keys, f"{preset.name} and {target.name} both set {preset_keys & target_keys}"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_config_fixes_the_run_length_at_load_time(path):
    """A `${trainer.*}` interpolation is resolved when the file loads, before command-line overrides, and
    a fixed LR horizon (T_max, total_steps) ignores them: schedules must follow the run's real length."""
    from specdiff_train.optim import FIXED_HORIZONS

    text = path.read_text()
    assert "${trainer." not in text, f"{path}: interpolates a trainer value (resolved before --trainer overrides)"
    scheduler = (yaml.safe_load(text).get("model") or {}).get("init_args", {}).get("lr_scheduler") or {}
    name = str(scheduler.get("class_path", "")).rsplit(".", 1)[-1]
    assert name not in FIXED_HORIZONS, f"{path}: {name} has a fixed horizon; use specdiff_train.optim.CosineToEndLR"
