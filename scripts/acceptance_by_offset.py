"""Where a drafter loses its calls: one-step acceptance per fifth of the chain and per offset from the window's
anchor, on the target's own chains, and the target calls per sample a fixed window would take at that
acceptance (`specdiff_train.drafters.diagnostics`; docs/drafters.md, "Where the calls go").

Drafters: `free-x0`, the learned kinds beside the target (`medusa`, `draftnet`, or `medusa=PATH`), and the
references `stale-time` (a full target call at the drafted state with the anchor's time) and
`other-target=PATH` (another target checkpoint of the same schedule, at the drafted state and time: a drafter as
large as the target, trained apart from it; a conditional one drafts with its null label). `--what-if` adds, per
drafter, the modelled calls if its acceptance were 1 in the fifth nearest the data, in the other four, or at every
step but the last two; and, for the last steps, how closely a draft's x0 must match the target's to be accepted.
`--pairs N` measures instead N random anchor/state pairs of the target's trajectories with log-uniform offsets
up to the whole chain (what long windows draft), by offset range.

    python scripts/acceptance_by_offset.py --target checkpoints/digits --drafters free-x0 medusa stale-time --what-if
    python scripts/acceptance_by_offset.py --target checkpoints/digits --num-steps 1000 \\
        --drafters free-x0 medusa=checkpoints/digits/medusa_1000.ckpt --max-offset 64 --windows 16 32 64
    python scripts/acceptance_by_offset.py --target checkpoints/digits --num-steps 1000 --chains 64 --pairs 4096 \\
        --drafters free-x0 medusa=checkpoints/digits/medusa_1000.ckpt medusa=checkpoints/digits/medusa_1000_long.ckpt
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.drafters.diagnostics import (  # noqa: E402
    draft_network_rule,
    expected_calls,
    free_x0_rule,
    heads_rule,
    other_target_rule,
    pair_acceptance,
    rollout_acceptance,
    stale_time_rule,
    x0_tolerance,
)
from specdiff_train.drafters.distillation import NUM_BUCKETS, frozen_target, time_bucket  # noqa: E402
from specdiff_train.drafters.shipped import LEARNED_KINDS  # noqa: E402
from specdiff_train.guidance import num_classes_of  # noqa: E402

RULES = ("free-x0", "stale-time", "other-target", *LEARNED_KINDS)


def make_rule(spec: str, target_dir: Path, target, plan, guidance_scale: float):
    """A draft rule from `name` or `kind=PATH`."""
    name, _, path = spec.partition("=")
    if name not in RULES:
        raise SystemExit(f"--drafters: unknown drafter {name!r}; expected one of {', '.join(RULES)} (learned: KIND=PATH)")
    if name == "free-x0":
        return free_x0_rule
    if name == "stale-time":
        return stale_time_rule(target, plan, guidance_scale)
    if name == "other-target":
        if not path or not Path(path).exists():
            raise SystemExit(f"--drafters: other-target needs a target checkpoint, other-target=PATH; got {spec!r}")
        try:
            return other_target_rule(frozen_target(path), plan)
        except ValueError as err:
            raise SystemExit(f"--drafters: {spec}: {err}") from None
    path = Path(path) if path else target_dir / f"{name}.ckpt"
    if not path.is_file():
        raise SystemExit(f"--drafters: no {name} checkpoint at {path}; train one (configs/drafter/) or pass {name}=PATH")
    drafter = LEARNED_KINDS[name](str(path))
    drafter.check_num_steps(plan)  # warns if it was distilled for another step count
    module = drafter.module.eval()
    return heads_rule(module, plan) if name == "medusa" else draft_network_rule(module, plan)


def by_fifth(buckets: torch.Tensor, table: torch.Tensor) -> list[float]:
    """Mean acceptance per fifth of diffusion time (nearest the data first) over the table's offsets; `buckets`:
    each row's fifth (`time_bucket`)."""
    return [table[buckets == b].nanmean().item() for b in range(NUM_BUCKETS)]


def fmt(values, digits=3) -> str:
    return " ".join("-" if math.isnan(v) else f"{v:.{digits}f}" for v in values)


def offset_ranges(largest: int) -> list[tuple[int, int]]:
    """Offset ranges 1-8, 9-32, 33-128, ... (x4), the last ending at `largest`."""
    ranges, low, high = [], 1, 8
    while low <= largest:
        ranges.append((low, min(high, largest)))
        low, high = high + 1, 4 * high
    return ranges


def pairs_table(plan, steps: torch.Tensor, offsets: torch.Tensor, accepted: dict[str, torch.Tensor]) -> list[str]:
    """Markdown rows: per offset range, the pairs and each drafter's mean acceptance in the fifth nearest the data
    and over all fifths."""
    names = " / ".join(accepted)
    lines = [f"| offset j | pairs | fifth nearest the data: {names} | all fifths: {names} |", "|---|---|---|---|"]
    nearest = time_bucket(plan, steps) == 0
    for low, high in offset_ranges(int(offsets.max())):
        rows = (offsets >= low) & (offsets <= high)
        near = " / ".join(f"{a[rows & nearest].mean().item():.3f}" for a in accepted.values())
        every = " / ".join(f"{a[rows].mean().item():.3f}" for a in accepted.values())
        lines.append(f"| {low}-{high} | {int(rows.sum())} ({int((rows & nearest).sum())}) | {near} | {every} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="checkpoints/digits", help="folder with target.ckpt (and drafter checkpoints)")
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--drafters", nargs="+", default=["free-x0", "medusa", "stale-time"])
    parser.add_argument("--chains", type=int, default=48, help="target trajectories whose every step is an anchor")
    parser.add_argument("--max-offset", type=int, default=None, help="default: 8 (--pairs: the whole chain)")
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--by-offset", action="store_true", help="print each drafter's fifth x offset table")
    parser.add_argument("--what-if", action="store_true", help="modelled calls with acceptance 1 in some fifths")
    parser.add_argument("--last-steps", type=int, default=8, help="--what-if: steps nearest the data in the tolerance table")
    parser.add_argument("--pairs", type=int, default=0, help="instead: this many anchor/state pairs with offsets "
                        "up to --max-offset (default here: the whole chain), by offset range")
    parser.add_argument("--save", help="write the tables ({drafter: (steps, offsets) tensor}) to this file (torch.save)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target_dir = Path(args.target)
    target = frozen_target(str(target_dir / "target.ckpt"))
    plan = target.schedule.plan(args.num_steps)
    rules = {spec: make_rule(spec, target_dir, target, plan, args.guidance_scale) for spec in args.drafters}
    classes = num_classes_of(target)
    labels = torch.arange(args.chains) % classes if classes else None  # conditional: chains cycle through the classes
    start = time.perf_counter()
    if args.pairs:
        try:
            steps, offsets, accepted = pair_acceptance(target, plan, rules, num_chains=args.chains,
                                                       num_pairs=args.pairs, max_offset=args.max_offset,
                                                       generator=torch.Generator().manual_seed(args.seed))
        except ValueError as err:
            raise SystemExit(f"--pairs: {err}") from None
        if args.save:
            torch.save({"steps": steps, "offsets": offsets, "acceptance": accepted}, args.save)
        print(f"{target_dir}, {args.num_steps} steps ({plan.num_stochastic_steps} stochastic), {args.pairs} "
              f"anchor/state pairs of {args.chains} target trajectories (seed {args.seed}), offsets 1-"
              f"{int(offsets.max())} log-uniform; CPU ({platform.machine()}), {torch.get_num_threads()} thread(s), "
              f"{time.perf_counter() - start:.0f} s\n")
        print("One-step acceptance, mean per offset range; pairs: all (those in the fifth nearest the data).\n")
        print("\n".join(pairs_table(plan, steps, offsets, accepted)))
        return
    args.max_offset = 8 if args.max_offset is None else args.max_offset
    tables = rollout_acceptance(target, plan, rules, num_chains=args.chains, max_offset=args.max_offset,
                                generator=torch.Generator().manual_seed(args.seed), labels=labels,
                                guidance_scale=args.guidance_scale)
    if args.save:
        torch.save(tables, args.save)
    print(f"{target_dir}, {args.num_steps} steps ({plan.num_stochastic_steps} stochastic), {args.chains} target "
          f"trajectories (seed {args.seed}), offsets 1-{args.max_offset}; CPU ({platform.machine()}), "
          f"{torch.get_num_threads()} thread(s), {time.perf_counter() - start:.0f} s\n")
    print("Calls: token-wise model, independent acceptance per step; offsets past the table take its last column.\n")
    buckets = time_bucket(plan, torch.arange(plan.num_stochastic_steps))  # each table row's fifth
    header = " | ".join(f"calls w{w}" for w in args.windows)
    print(f"| drafter | acceptance per fifth (nearest the data first) | {header} |")
    print("|---|---|" + "---|" * len(args.windows))
    for name, table in tables.items():
        calls = " | ".join(f"{expected_calls(table, w):.1f}" for w in args.windows)
        print(f"| {name} | {fmt(by_fifth(buckets, table))} | {calls} |")
    if args.by_offset:
        for name, table in tables.items():
            print(f"\n{name}: acceptance per fifth (rows, nearest the data first) and offset (columns 1-{args.max_offset})")
            for b in range(NUM_BUCKETS):
                print(f"  {b}: {fmt(table[buckets == b].nanmean(0).tolist())}")
    if args.what_if:
        print(f"\n| drafter | what if | {header} |")
        print("|---|---|" + "---|" * len(args.windows))
        steps = torch.arange(plan.num_stochastic_steps)
        for name, table in tables.items():
            for what, perfect in (("acceptance 1 in the fifth nearest the data", buckets == 0),
                                  ("acceptance 1 in the other four fifths", buckets != 0),
                                  ("acceptance 1 at every step but the last two", steps < len(steps) - 2)):
                ideal = table.clone()
                ideal[perfect] = 1.0
                calls = " | ".join(f"{expected_calls(ideal, w):.1f}" for w in args.windows)
                print(f"| {name} | {what} | {calls} |")
        last = steps[-args.last_steps:]
        dim = math.prod(target.sample_shape)
        names = " | ".join(tables)
        print(f"\nThe last {len(last)} stochastic steps: the draft x0's RMS error per coordinate (of {dim}) at which "
              "a step's acceptance is 0.9 or 0.5, and each drafter's acceptance (mean over offsets)\n")
        print(f"| step | t | std of the step | x0 error for 0.9 | for 0.5 | {names} |")
        print("|---|---|---|---|---|" + "---|" * len(tables))
        tol_9, tol_5 = x0_tolerance(plan, last, 0.9, dim), x0_tolerance(plan, last, 0.5, dim)
        for i, k in enumerate(last.tolist()):
            accepted = " | ".join(f"{table[k].nanmean().item():.3f}" for table in tables.values())
            print(f"| {k} | {int(plan.t(last[i:i + 1]))} | {plan.std[k].item():.4f} | {tol_9[i].item():.4f} | "
                  f"{tol_5[i].item():.4f} | {accepted} |")


if __name__ == "__main__":
    main()
