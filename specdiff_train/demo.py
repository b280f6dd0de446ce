"""`make demo`: speculative inference against ancestral sampling on the shipped checkpoints.

Runs the evaluate job on the toy2d and digits targets in checkpoints/ and prints the tables
(about two minutes on a 2-core CPU). Reports land in runs/demo/<target>/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOBS = [
    # target, evaluate options
    ("toy2d", ["--num_samples", "1000", "--batch_size", "1000"]),
    ("digits", ["--num_samples", "128", "--batch_size", "128"]),
]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from specdiff_train.cli import main as cli

    os.chdir(ROOT)
    for name, options in JOBS:
        ckpt = ROOT / "checkpoints" / name / "target.ckpt"
        if not ckpt.exists():
            sys.exit(f"demo: {ckpt} is missing; train it with `python train.py fit --config configs/target/{name}.yaml`")
        print(f"\n## {name}: speculative sampling against ancestral sampling (shipped checkpoint {ckpt.relative_to(ROOT)})\n",
              flush=True)
        cli([
            "evaluate", "--config", f"configs/target/{name}.yaml", "--config", f"configs/eval/{name}.yaml",
            "--ckpt_path", str(ckpt), "--trainer.default_root_dir", f"runs/demo/{name}",
            "--trainer.logger", "false", *options,
        ])


if __name__ == "__main__":
    main()
