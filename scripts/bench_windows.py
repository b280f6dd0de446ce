"""Adaptive windows against fixed ones (issue 17's goals), wall-clock ratios measured in one run.

1. Batch 1 (latency): digits, Free Drafter (x0), block verification, each seed sampled alone; ancestral
   sampling, every fixed window of {1, 2, 3, 4, 6, 8, 12, 16}, `auto` (a fresh policy per call) and one
   `CostAwareWindow` object reused from call to call (what it learned carries over); median over the seeds.
2. Large batches (throughput): batch 64 and 128, 100 steps, every drafter of the demo; ancestral
   sampling against `auto` (and the demo's fixed window 8); median over the repeats.

    python scripts/bench_windows.py                                   # both, 1 thread (~10 minutes)
    python scripts/bench_windows.py --num-steps 100 --batches         # batch 1 at 100 steps only
    python scripts/bench_windows.py --markdown runs/windows.md        # also write the tables
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.evaluation.latency import latency_by_window, throughput_by_drafter  # noqa: E402
from specdiff_train.models import load_target  # noqa: E402
from specdiff_train.speculative import FreeDrafter, MedusaDrafter  # noqa: E402
from specdiff_train.speculative.windows import CostAwareWindow  # noqa: E402

FIXED = [1, 2, 3, 4, 6, 8, 12, 16]
DIGITS = ROOT / "checkpoints" / "digits"
DEMO_DRAFTERS = {  # the digits drafters of configs/eval/digits.yaml
    "free-x0": lambda: FreeDrafter("x0"),
    "free-eps": lambda: FreeDrafter("eps"),
    "medusa": lambda: MedusaDrafter(str(DIGITS / "medusa.ckpt")),
}


def _window(value) -> str:
    return f"w{value}" if isinstance(value, int) else str(value)


def latency_table(rows: list[dict], num_steps: int, seeds: int) -> str:
    lines = [f"Batch 1, digits, {num_steps} steps, Free Drafter (x0), block, median of {seeds} seeds",
             "", "| window | target calls/sample | ms/sample | x ancestral | x best fixed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_window(r['window'])} | {r['calls']:.1f} | {1e3 * r['median_s']:.1f} | {r['ratio']:.2f} "
                     f"| {r['vs_best_fixed']:.2f} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict], batch: int, num_steps: int, repeats: int) -> str:
    lines = [f"Batch {batch}, digits, {num_steps} steps, block, median of {repeats} repeats", "",
             "| drafter | window | target calls/sample | s/batch | x ancestral |", "|---|---|---|---|---|"]
    for r in rows:
        window = "" if r["window"] is None else _window(r["window"])
        lines.append(f"| {r['drafter']} | {window} | {r['calls']:.1f} | {r['median_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-steps", nargs="*", type=int, default=[100, 1000], help="batch-1 step counts")
    parser.add_argument("--seeds", type=int, default=5, help="seeds at batch 1 (the median is reported)")
    parser.add_argument("--batches", nargs="*", type=int, default=[64, 128], help="large batches (100 steps)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats at each large batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (make bench-gpu)")
    parser.add_argument("--compile", action="store_true", help="compile=True: compiled rounds and steps "
                        "(compilation is left out of the times)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target(DIGITS / "target.ckpt").eval().to(args.device)
    name = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)")
    header = (f"device: {name}, torch {torch.__version__}; "
              f"`python scripts/bench_windows.py {shlex.join(argv or sys.argv[1:])}`")
    print(header, flush=True)
    tables = [header]
    for num_steps in args.num_steps:
        windows = [*FIXED, "auto", CostAwareWindow()]  # the object: one policy for every call
        rows = latency_by_window(target, DEMO_DRAFTERS["free-x0"], num_steps=num_steps, windows=windows,
                                 seeds=range(args.seeds), compile=args.compile)
        tables.append(latency_table(rows, num_steps, args.seeds))
        print("\n" + tables[-1], flush=True)
    for batch in args.batches:
        rows = throughput_by_drafter(target, DEMO_DRAFTERS, num_steps=100, batch_size=batch, repeats=args.repeats,
                                     windows=(8, "auto"), compile=args.compile)
        tables.append(throughput_table(rows, batch, 100, args.repeats))
        print("\n" + tables[-1], flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
