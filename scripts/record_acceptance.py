"""Validate a drafter checkpoint and record its acceptance per fifth of diffusion time in the file.

Checkpoints written by training (`train.py fit`) record their last validation already
(`validation_acceptance`); this adds the record to checkpoints written before it existed, without changing
their weights. The hybrid drafter (`HybridDrafter.from_checkpoint`) chooses its drafter per step from it.

    python scripts/record_acceptance.py --config configs/drafter/digits_medusa.yaml --ckpt checkpoints/digits/medusa.ckpt
    python scripts/record_acceptance.py ... --limit-val-batches 16   # more validation rows
    python scripts/record_acceptance.py --config configs/drafter/digits_medusa.yaml \
        --ckpt checkpoints/digits/medusa_1000.ckpt --model.init_args.num_steps 1000   # what training overrode
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.cli import main as cli_main  # noqa: E402
from specdiff_train.config_io import read_checkpoint  # noqa: E402


def record_acceptance(config: str, ckpt: str, limit_val_batches: int | None = None, overrides=()) -> dict:
    """Validate `ckpt`'s drafter with `config`'s module and data (the checkpoint's weights loaded into it; `overrides`:
    more `train.py` options, as the drafter was trained with) and write the record into `ckpt`; returns the record."""
    args = ["--config", config, *overrides, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    if limit_val_batches is not None:
        args += ["--trainer.limit_val_batches", str(limit_val_batches)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI is given `args`, not this script's command line
    try:
        cli = cli_main(args, run=False)
    finally:
        sys.argv = argv
    checkpoint = read_checkpoint(ckpt)
    model, hparams = cli.model, checkpoint.get("hyper_parameters") or {}
    if hparams.get("_class_path", "").rsplit(".", 1)[-1] != type(model).__name__:
        raise SystemExit(f"--ckpt {ckpt} holds a {hparams.get('_class_path', 'checkpoint of no drafter')}, "
                         f"--config {config} trains a {type(model).__name__}: give the config the drafter was trained with")
    if int(hparams.get("num_steps", -1)) != model.plan.num_steps:
        raise SystemExit(f"--ckpt {ckpt} was trained for {hparams.get('num_steps')} steps, --config {config} for "
                         f"{model.plan.num_steps}: pass --config with the checkpoint's num_steps")
    model.load_state_dict(checkpoint["state_dict"])  # the drafter's weights (the frozen target is not in it)
    cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)
    record = getattr(model, "validation_acceptance", None)
    if record is None:
        raise SystemExit(f"--config {config}: validation ran no batch, so nothing was recorded; raise --limit-val-batches")
    checkpoint["validation_acceptance"] = record
    torch.save(checkpoint, ckpt)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the drafter's training config (configs/drafter/*.yaml)")
    parser.add_argument("--ckpt", required=True, help="the drafter checkpoint to validate and record into")
    parser.add_argument("--limit-val-batches", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)
    record = record_acceptance(args.config, args.ckpt, args.limit_val_batches, overrides)
    print(f"{args.ckpt}: acceptance per fifth of diffusion time (t/T 0-0.2 first, nearest the data), "
          f"{record['num_steps']} steps, {sum(record['rows'])} rows")
    for name in ("acceptance", "free_acceptance"):
        if record.get(name):
            print(f"  {name:16s} " + " ".join("-" if v is None else f"{v:.3f}" for v in record[name]))


if __name__ == "__main__":
    main()
