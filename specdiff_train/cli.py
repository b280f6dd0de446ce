"""The command line: `python train.py {fit,validate,test,evaluate} --config configs/...`.

A `LightningCLI` in subclass mode: the model and the data module are any LightningModule /
LightningDataModule named by `class_path` in the YAML, and the saved `config.yaml` of a run is
its record. `data.sample_shape` is linked into `model.init_args.sample_shape` after the data module
is built, so models learn the sample shape from the data.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .callbacks import RunCheckpoint
from .config_io import resolve_class, with_current_class_paths
from .errors import TRACEBACK_ENV, explain_parse_error, show_tracebacks, user_message
from .evaluation.command import SpecDiffTrainer

LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


class SpecDiffParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors are a few lines naming the field, the bad value and a
    suggestion (`specdiff_train.errors.explain_parse_error`), not a page of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or show_tracebacks():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: the command line or a config was refused (`{prog} --help` lists every option; "
                         f"{TRACEBACK_ENV}=1 shows the parser's full message)\n")
        sys.stderr.write(f"error: {explain_parse_error(message, parser)}\n")
        self.exit(2)


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
        super().parse_arguments(parser, with_pipeline_model(args))
        self._configured_model = self._model_config()

    def _parse_ckpt_path(self) -> None:
        """As Lightning's (the checkpoint's hyperparameters replace the configured model), after checking
        the file: a missing or unreadable file is named, and a checkpoint of another kind of model (a
        drafter given to a target config, a target given to a drafter config) gets advice for that case."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_ALIASES:
            return
        if pipeline_ckpt_path(str(ckpt_path), subcommand):  # a diffusers pipeline: the model is a DiffusersTarget
            model = {"class_path": DIFFUSERS_TARGET, "init_args": {"pretrained": str(ckpt_path)}}
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
            return
        ckpt = checked_checkpoint(ckpt_path, getattr(self, "_configured_model", None), subcommand)
        hparams = with_current_class_paths(dict(ckpt.get("hyper_parameters") or {}))  # classes that moved since
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:  # a drafter module (`record_hparams`): its constructor's arguments only
            path = hparams.pop("_class_path")
            hparams = {"class_path": path, "init_args": constructor_args(path, hparams)}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

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


def constructor_args(path: str, hparams: dict) -> dict:
    """The hyperparameters that are arguments of the class at `path`: a drafter's checkpoint also records what
    describes its run (the target's fingerprint, schedule, sample shape, ...), which its constructor does not
    take; those it does not record (the optimizer) keep their configured values."""
    cls = resolve_class(path, trusted_only=True)
    if cls is None:
        return hparams
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in names}


DRAFTER_KINDS = {  # hyperparameter key of the trained module -> (what it is, the drafter class that uses it)
    "net": ("a draft-network checkpoint", "specdiff_train.speculative.DraftNetworkDrafter"),
    "head": ("a Medusa-heads checkpoint", "specdiff_train.speculative.MedusaDrafter"),
}


DIFFUSERS_TARGET = "specdiff_train.models.DiffusersTarget"


def with_pipeline_model(args: ArgsType) -> ArgsType:
    """`evaluate --ckpt_path <diffusers pipeline>` needs no target config: the model is that pipeline's
    `DiffusersTarget` (appended as `--model`, so it also replaces a model set by a config, as a checkpoint's
    hyperparameters do). Other command lines are returned unchanged."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if not argv or argv[0] != "evaluate":
        return args
    ckpt_path = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            ckpt_path = argv[i + 1]
        elif arg.startswith("--ckpt_path="):
            ckpt_path = arg.split("=", 1)[1]
    if ckpt_path is None or not pipeline_ckpt_path(ckpt_path, "evaluate"):
        return args
    return [*argv, f"--model={DIFFUSERS_TARGET}", f"--model.init_args.pretrained={ckpt_path}"]


def pipeline_ckpt_path(ckpt_path: str, subcommand: str) -> bool:
    """True when `--ckpt_path` names a diffusers pipeline (a folder or a hub id) given to `evaluate`; a
    ValueError for the other verbs (a pipeline is no training checkpoint)."""
    from .models.diffusers_target import is_pipeline_source

    if not is_pipeline_source(ckpt_path):
        return False
    if subcommand != "evaluate":
        if not Path(ckpt_path).is_dir():
            return False  # owner/name-like but missing: reported as a missing checkpoint file
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a diffusers pipeline (a folder or hub id), not a checkpoint written by "
            f"training, so `{subcommand}` cannot use it. Evaluate it with `python train.py evaluate --ckpt_path "
            f"{ckpt_path} --config configs/eval/ddpm_cifar10.yaml`, or train drafters for it with "
            f"--model.init_args.target_ckpt {ckpt_path}"
        )
    return True


def checked_checkpoint(ckpt_path: str, configured: dict | None, subcommand: str) -> dict:
    """The checkpoint behind `--ckpt_path`, or a ValueError / FileNotFoundError that names the file and
    says what to pass instead."""
    from .config_io import describe_checkpoint, read_checkpoint, resolve_class

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file (looked for {path.resolve()})")
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    mine = resolve_class(str((configured or {}).get("class_path", "")))
    theirs = resolve_class(str(hparams.get("_class_path", ""))) if isinstance(hparams, dict) else None
    if isinstance(hparams, dict) and "target_ckpt" in hparams and not (mine and theirs and issubclass(theirs, mine)):
        key = next((k for k in DRAFTER_KINDS if isinstance(hparams.get(k), dict)), "net")
        what, drafter = DRAFTER_KINDS[key]
        raise ValueError(
            f"--ckpt_path {ckpt_path} is {what} ({hparams.get('_class_path', '?').rsplit('.', 1)[-1]}, trained against "
            f"{hparams['target_ckpt']}), not a checkpoint of the config's model "
            f"({(configured or {}).get('class_path', '?')}). Give `{subcommand}` a target checkpoint: a run's "
            f"last.ckpt, or {hparams['target_ckpt']}. A drafter checkpoint is used by sampling: list it in an "
            f"evaluate config's drafters (class_path: {drafter}, init_args: {{checkpoint: {ckpt_path}}}); "
            "resuming its training takes its own config (configs/drafter/*.yaml)."
        )
    if mine is not None and theirs is not None and not issubclass(theirs, mine):
        fix = ""
        if hasattr(mine, "module_key") and "target_ckpt" not in (hparams or {}):  # a target given to a drafter config
            fix = f" To train a drafter against this target, pass it as --model.init_args.target_ckpt {ckpt_path}."
        raise ValueError(
            f"--ckpt_path {ckpt_path} holds {describe_checkpoint(ckpt)}, but the config builds {mine.__name__}: pass a "
            f"checkpoint written by training this config's model.{fix}"
        )
    if not isinstance(hparams, dict) or "state_dict" not in ckpt:
        raise ValueError(f"--ckpt_path {ckpt_path} holds {describe_checkpoint(ckpt)}, not a checkpoint written by "
                         "training (a Lightning checkpoint with hyperparameters, e.g. a run's last.ckpt)")
    if subcommand == "fit" and "optimizer_states" not in ckpt:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is a slim checkpoint (weights and hyperparameters only, no optimizer or loop "
            "state): it cannot resume training. Resume from the run's full checkpoint (lightning_logs/version_N/"
            "checkpoints/last.ckpt); slim checkpoints are for load_target, validate, test and evaluate."
        )
    return ckpt


def model_conflicts(configured: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Where the configured model's class, `net` or `schedule` differ from those read from a
    checkpoint (a schedule left unset in the config takes the checkpoint's)."""
    from .config_io import config_mismatch

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
    from .config_io import class_path, resolve_class

    if isinstance(config, dict):
        out = {k: canonical_class_paths(v) for k, v in config.items()}
        cls = resolve_class(out["class_path"]) if isinstance(out.get("class_path"), str) else None
        if cls is not None:
            out["class_path"] = class_path(cls)
        return out
    if isinstance(config, (list, tuple)):
        return [canonical_class_paths(v) for v in config]
    return config


def main(args: ArgsType = None, *, run: bool = True, short_errors: bool | None = None) -> SpecDiffCLI:
    """Build (and by default run) the CLI; `args` as on the command line, or None for `sys.argv`.

    With `short_errors` (the default when `args` is None, i.e. from `train.py`), a configuration, data or
    checkpoint error ends the command with its message as the last line (exit status 2) instead of a
    traceback; `SPECDIFF_TRACEBACK=1` keeps tracebacks. Other errors keep their traceback."""

    def build() -> SpecDiffCLI:
        return SpecDiffCLI(
            model_class=None,
            datamodule_class=None,
            trainer_class=SpecDiffTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=SpecDiffParser,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    if not (args is None if short_errors is None else short_errors) or show_tracebacks():
        return build()
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - only the errors meant for the user are shortened
        message = user_message(err)
        if message is None:
            raise
        sys.stderr.write(f"\ntrain.py: stopped ({TRACEBACK_ENV}=1 shows the traceback)\nerror: {message}\n")
        raise SystemExit(2) from None
