"""The command line: `python train.py {fit,validate,test,evaluate} --config configs/...`.

A `LightningCLI` in subclass mode: the model and the data module are any LightningModule /
LightningDataModule named by `class_path` in the YAML, and the saved `config.yaml` of a run is
its record. `data.sample_shape` is linked into `model.init_args.sample_shape` after the data module
is built, so models learn the sample shape from the data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .callbacks import RunCheckpoint
from .evaluation.command import SpecDiffTrainer


class SpecDiffCLI(LightningCLI):
    """LightningCLI with this project's defaults: omegaconf interpolation, subclass mode, a
    `RunCheckpoint` that always keeps `last.ckpt` (for `fit --ckpt_path .../last.ckpt`), resuming
    into the run directory the checkpoint came from."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The verbs, each a method of the trainer class, with the method arguments the CLI fills in.

        To add a verb (e.g. `evaluate`): write it as a typed, documented method of a `Trainer`
        subclass (jsonargparse turns its signature and docstring into `--help`), pass that class as
        `trainer_class` in `main`, and add `commands["evaluate"] = {"model", "datamodule"}` here.
        """
        parent = LightningCLI.subcommands()
        commands = {name: parent[name] for name in ("fit", "validate", "test")}
        commands["evaluate"] = {"model", "datamodule"}  # SpecDiffTrainer.evaluate
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always present, so every run writes last.ckpt: at its final step, at the step reached when
        # interrupted (Ctrl-C) and when stopped by an exception; tune it with --checkpoint.* (e.g.
        # every_n_train_steps).
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.link_arguments("data.sample_shape", "model.init_args.sample_shape", apply_on="instantiate")

    # With --ckpt_path, Lightning replaces the configured model by the hyperparameters saved in the
    # checkpoint. A network or schedule that differs from the checkpoint's would silently be dropped:
    # refuse it instead, naming what differs.
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        self._configured_model = self._model_config()

    def before_instantiate_classes(self) -> None:
        configured, loaded = getattr(self, "_configured_model", None), self._model_config()
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and configured and loaded:
            conflicts = model_conflicts(configured, loaded)
            if conflicts:
                raise ValueError(
                    f"--ckpt_path {ckpt_path} holds a different model than the config: " + "; ".join(conflicts)
                    + ". A checkpoint's network and schedule cannot change: drop these settings, or start a new run."
                )

    def before_fit(self) -> None:
        """`fit --ckpt_path .../version_N/checkpoints/last.ckpt` continues in version_N (logs, checkpoints,
        config.yaml) instead of opening version_N+1; say where the run goes either way."""
        ckpt_path = self.config["fit"].get("ckpt_path")
        if not ckpt_path:
            return
        ckpt = Path(ckpt_path)
        logger = self.trainer.logger
        run_dir = ckpt.resolve().parent.parent
        same_run = (
            ckpt.parent.name == "checkpoints" and run_dir.name.startswith("version_")
            and logger is not None and getattr(logger, "_version", "set") is None  # version chosen by Lightning
            and Path(logger.root_dir).resolve() == run_dir.parent
        )
        if same_run:
            logger._version = int(run_dir.name[len("version_"):]) if run_dir.name[8:].isdigit() else run_dir.name
            rank_zero_info(f"Resuming {ckpt_path}: logs, checkpoints and config.yaml continue in {run_dir}")
        else:
            where = getattr(logger, "log_dir", None) or self.trainer.default_root_dir
            rank_zero_info(f"Resuming {ckpt_path}: this run writes to {where} (the checkpoint is not in a "
                           "version_N/checkpoints folder of this run's log directory)")

    def _model_config(self) -> dict | None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        model = config.get("model")
        return model.clone().as_dict() if model is not None else None


def model_conflicts(configured: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Where the configured model's class, `net` or `schedule` differ from those read from a
    checkpoint (a schedule left unset in the config takes the checkpoint's)."""
    from .models.checkpoints import config_mismatch

    configured, loaded = canonical_class_paths(configured), canonical_class_paths(loaded)
    if configured.get("class_path") != loaded.get("class_path"):
        return [f"model.class_path: {loaded.get('class_path')!r} in the checkpoint, {configured.get('class_path')!r} here"]
    mine, theirs = configured.get("init_args") or {}, loaded.get("init_args") or {}
    conflicts = []
    for key in ("net", "schedule"):
        if mine.get(key) is not None and theirs.get(key) is not None:
            conflicts += config_mismatch(theirs[key], mine[key], f"model.init_args.{key}")
    return conflicts


def canonical_class_paths(config: Any) -> Any:
    """The config with every `class_path` spelled where its class is defined
    ("specdiff_train.models.TargetDiffusion" -> "specdiff_train.models.target.TargetDiffusion")."""
    from .models.checkpoints import class_path, resolve_class

    if isinstance(config, dict):
        out = {k: canonical_class_paths(v) for k, v in config.items()}
        cls = resolve_class(out["class_path"]) if isinstance(out.get("class_path"), str) else None
        if cls is not None:
            out["class_path"] = class_path(cls)
        return out
    if isinstance(config, (list, tuple)):
        return [canonical_class_paths(v) for v in config]
    return config


def main(args: ArgsType = None, *, run: bool = True) -> SpecDiffCLI:
    """Build (and by default run) the CLI; `args` as on the command line, or None for `sys.argv`."""
    return SpecDiffCLI(
        model_class=None,
        datamodule_class=None,
        trainer_class=SpecDiffTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
