"""Benchmark speculative sampling against ancestral sampling on trained targets.

For each target and num_steps, runs ancestral sampling and every drafter x verifier x window on
the same seeds and prints a markdown table: sequential target calls per sample, speedup over
ancestral (= num_steps / calls), acceptance, mean accepted drafts per round, and wall-clock
relative to ancestral at batch 1 and at a large batch, measured in the same run, and what a round
costs besides the networks at batch 1: aten operators and host syncs per round (per step for
ancestral; `specdiff_train.overhead`). Draft cost is
counted: draft calls per sample (sequential drafted states of a chain), one draft call's wall-clock
relative to one target call at batch 1 (`relative_draft_cost`), and the cost per sample in target-call
units, calls + draft calls x that ratio.

    python scripts/benchmark.py                                  # toy2d and digits, 100 and 1000 steps
    python scripts/benchmark.py --targets toy2d --num-steps 100 --windows 3 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.models import load_target  # noqa: E402
from specdiff_train.overhead import ancestral_overhead, speculative_overhead  # noqa: E402
from specdiff_train.sampling import ancestral_sample  # noqa: E402
from specdiff_train.speculative import (  # noqa: E402
    DraftNetworkDrafter,
    MedusaDrafter,
    relative_draft_cost,
    speculative_sample,
)
from specdiff_train.speculative.drafters import training_free_drafters  # noqa: E402

TRAINING_FREE = training_free_drafters()
VERIFIERS = {"block": dict(verifier="block"), "tokenwise": dict(verifier="tokenwise")}


LEARNED = {"draftnet": DraftNetworkDrafter, "medusa": MedusaDrafter}


def learned_drafters(target_dir: Path, names) -> dict:
    """Learned drafters whose checkpoints sit beside the target (draftnet.ckpt, medusa.ckpt)."""
    return {name: (lambda cls=LEARNED[name], path=target_dir / f"{name}.ckpt": cls(str(path)))
            for name in names if (target_dir / f"{name}.ckpt").exists()}


def timed(fn, warmup: bool = False):
    if warmup:  # first calls pay one-off costs (allocations, caches): keep them out of the ratio
        fn()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_target(name: str, args) -> list[dict]:
    target_dir = ROOT / "checkpoints" / name
    target = load_target(target_dir / "target.ckpt")
    shape, schedule = tuple(target.sample_shape), target.schedule
    drafters = {k: TRAINING_FREE[k] for k in args.drafters}
    drafters.update(learned_drafters(target_dir, args.learned))
    rows = []
    for num_steps in args.num_steps:
        seeds = list(range(args.batch))
        single = list(range(10_000, 10_000 + args.single))
        sample = lambda s, **kw: ancestral_sample(target, schedule, shape, num_steps=num_steps, seeds=s, **kw)
        _, base_batch = timed(lambda: sample(seeds), warmup=True)
        base_single = sum(timed(lambda s=s: sample([s]))[1] for s in single)
        step_counts = ancestral_overhead(target, schedule, shape, num_steps=num_steps, seeds=single[:1])
        rows.append(dict(target=name, num_steps=num_steps, method="ancestral", calls=float(num_steps), speedup=1.0,
                         acceptance=float("nan"), accepted_per_round=float("nan"), draft_calls=0.0, draft_cost=0.0,
                         cost=float(num_steps), wall_b1=1.0, wall_batch=1.0, ops=step_counts["ops_per_step"],
                         syncs=step_counts["syncs_per_step"]))
        print(f"[{name} N={num_steps}] ancestral: batch-{args.batch} {base_batch:.2f}s, "
              f"batch-1 x{args.single} {base_single:.2f}s", flush=True)
        for drafter_name, make in drafters.items():
            draft_cost = relative_draft_cost(make(), target, schedule, shape, num_steps=num_steps, batch_size=1,
                                             repeats=50)["relative"]
            for verifier_name, verifier in VERIFIERS.items():
                for window in args.windows:
                    spec = lambda s, **kw: speculative_sample(
                        target, schedule, shape, num_steps=num_steps, seeds=s, drafter=make(), window=window,
                        **verifier, **kw)
                    timed(lambda: spec(single[:1]))  # warm-up
                    result, batch_time = timed(lambda: spec(seeds))
                    single_time = sum(timed(lambda s=s: spec([s]))[1] for s in single)
                    stats = result.stats
                    counts = speculative_overhead(target, schedule, shape, num_steps=num_steps, drafter=make(),
                                                  window=window, seeds=single[:1], **verifier)
                    draft_calls = stats["draft_rows"] / stats["num_samples"]  # one row per chain and draft call
                    row = dict(
                        target=name, num_steps=num_steps, method=f"{drafter_name}/{verifier_name}/w{window}",
                        calls=stats["target_calls_per_sample"], speedup=stats["speedup"],
                        acceptance=stats["acceptance_rate"], accepted_per_round=stats["mean_accepted_per_round"],
                        draft_calls=draft_calls, draft_cost=draft_cost,
                        cost=stats["target_calls_per_sample"] + draft_calls * draft_cost,
                        wall_b1=single_time / base_single, wall_batch=batch_time / base_batch,
                        ops=counts["ops_per_round"], syncs=counts["syncs_per_round"],
                    )
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


HEADER = ("| target | steps | method | target calls/sample | speedup | acceptance | accepted/round "
          "| draft calls/sample | draft call (x target call) | cost/sample (target calls) "
          "| wall-clock b=1 (x ancestral) | wall-clock b={batch} (x ancestral) "
          "| ops/round b=1 (per step for ancestral) | host syncs/round b=1 |")


def format_row(r: dict) -> str:
    return (f"| {r['target']} | {r['num_steps']} | {r['method']} | {r['calls']:.1f} | {r['speedup']:.2f}x "
            f"| {r['acceptance']:.3f} | {r['accepted_per_round']:.2f} | {r['draft_calls']:.1f} | {r['draft_cost']:.2f} "
            f"| {r['cost']:.1f} | {r['wall_b1']:.2f} | {r['wall_batch']:.2f} | {r['ops']:.0f} | {r['syncs']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["toy2d", "digits"])
    parser.add_argument("--num-steps", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--drafters", nargs="+", default=["frozen-eps", "free-eps", "free-x0"], choices=sorted(TRAINING_FREE))
    parser.add_argument("--learned", nargs="*", default=sorted(LEARNED), choices=sorted(LEARNED),
                        help="learned drafters to add where checkpoints/<target>/<name>.ckpt exists")
    parser.add_argument("--windows", nargs="+", type=int, default=[1, 3, 8])
    parser.add_argument("--batch", type=int, default=256, help="large batch for throughput and the statistics")
    parser.add_argument("--single", type=int, default=3, help="seeds run one by one for batch-1 latency")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = []
    for name in args.targets:
        rows += run_target(name, args)
    print()
    print(f"device: {torch.device('cpu')} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(HEADER.format(batch=args.batch))
    print("|" + "---|" * 14)
    for row in rows:
        print(format_row(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
