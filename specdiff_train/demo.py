"""`make demo`: speculative inference against ancestral sampling on the shipped checkpoints.

Runs the evaluate job on the toy2d and digits targets in checkpoints/ and prints the tables, then the
digits target's batch-1 latency by window, and which window setting to pick (about three minutes on
a 2-core CPU). Reports land in runs/demo/<target>/.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOBS = [
    # target, evaluate options
    ("toy2d", ["--num_samples", "1000", "--batch_size", "1000"]),
    ("digits", ["--num_samples", "128", "--batch_size", "128"]),
    ("digits_cond", ["--num_samples", "128", "--batch_size", "128"]),  # guided (configs/eval/digits_cond.yaml)
]
TITLES = {"digits_cond": "class-conditional digits, guided"}
LATENCY_WINDOWS = [3, 8, "auto"]  # batch 1, digits, 100 steps, Free Drafter (x0), block
LATENCY_SEEDS = 5


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from specdiff_train.cli import main as cli

    os.chdir(ROOT)
    for name, options in JOBS:
        ckpt = ROOT / "checkpoints" / name / "target.ckpt"
        if not ckpt.exists():
            sys.exit(f"demo: {ckpt} is missing; train it with `python train.py fit --config configs/target/{name}.yaml`")
        print(f"\n## {TITLES.get(name, name)}: speculative sampling against ancestral sampling (shipped checkpoint "
              f"{ckpt.relative_to(ROOT)})\n", flush=True)
        cli([
            "evaluate", "--config", f"configs/target/{name}.yaml", "--config", f"configs/eval/{name}.yaml",
            "--ckpt_path", str(ckpt), "--trainer.default_root_dir", f"runs/demo/{name}",
            "--trainer.logger", "false", *options,
        ])
    latency = batch_one_latency()
    print(recommendation(json.loads((ROOT / "runs/demo/digits/evaluate/report.json").read_text()), latency))


def batch_one_latency() -> list[dict]:
    """Wall-clock per sample at batch 1 by window (digits, 100 steps), printed as a table."""
    import torch

    from specdiff_train.evaluation.latency import latency_by_window
    from specdiff_train.models import load_target
    from specdiff_train.speculative import FreeDrafter

    print(f"\n## digits at batch 1: latency by window (100 steps, Free Drafter (x0), block, median of "
          f"{LATENCY_SEEDS} seeds, each sampled alone, {torch.get_num_threads()} threads)\n", flush=True)
    model = load_target(ROOT / "checkpoints/digits/target.ckpt").eval()
    rows = latency_by_window(model, lambda: FreeDrafter("x0"), num_steps=100, windows=LATENCY_WINDOWS,
                             seeds=range(LATENCY_SEEDS))
    print("| window | target calls/sample | ms/sample | wall-clock (x ancestral) |\n|---|---|---|---|")
    for r in rows:
        window = f"w{r['window']}" if isinstance(r["window"], int) else r["window"]
        print(f"| {window} | {r['calls']:.1f} | {1e3 * r['median_s']:.1f} | {r['ratio']:.2f} |")
    return rows


def recommendation(report: dict, latency: list[dict]) -> str:
    """Which window to pick, from this run's numbers: auto's ratio to ancestral time at batch 128 and
    at batch 1, beside the best fixed window's at each."""
    batch = [r for r in report["results"] if r["method"] != "ancestral" and "/block/" in r["method"]]
    best_batch = min((r for r in batch if isinstance(r["window"], int)), key=lambda r: r["wall_clock_ratio"])
    auto_batch = min((r for r in batch if r["window"] == "auto"), key=lambda r: r["wall_clock_ratio"])
    single = {r["window"]: r for r in latency}
    best_single = min((r for r in latency if isinstance(r["window"], int)), key=lambda r: r["ratio"])
    return (
        "\n## Which window to pick\n\n"
        f"`window=\"auto\"` (cost-aware: each round, the window that commits the most steps per second on this "
        f"device, 0 being a plain target step). In this run, batch {report['config']['batch_size']}: "
        f"{auto_batch['method']} took {auto_batch['wall_clock_ratio']:.2f}x ancestral time, the best fixed window "
        f"({best_batch['method']}) {best_batch['wall_clock_ratio']:.2f}x; batch 1: auto "
        f"{single['auto']['ratio']:.2f}x, the best fixed window (w{best_single['window']}) {best_single['ratio']:.2f}x. "
        "A fixed window is right only for the device and batch it was tuned on; these are wall-clock ratios "
        "of one run on this machine (docs/speculative.md, window policies)."
    )


if __name__ == "__main__":
    main()
