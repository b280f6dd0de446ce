"""The quality-cost frontier: sample quality against sequential target calls, for every sampler a user
could pick, on the same seeds (docs/frontier.md).

Points: ancestral sampling respaced to N steps; deterministic solvers (DDIM eta = 0, DPM-Solver++(2M),
through diffusers, `solvers.py`); exact speculative sampling of the N-step ancestral chain with a
drafter x window (block verification by default). Per point: sequential target calls per sample,
batch-1 wall-clock relative to 100-step ancestral sampling measured in the same run, and each metric
with a bootstrap 95% interval (`bootstrap.py`) against two references: held-out data, and the
1000-step ancestral sampler's samples from other seeds (the law speculative sampling reproduces).

Pure PyTorch; `scripts/frontier.py` is the command line.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..sampling import ancestral_sample
from ..speculative import speculative_sample
from ..speculative.verifiers import parse_verifier
from ..speculative.windows import as_window_policy
from .solvers import SOLVERS, check_solver, solver_sample
from .bootstrap import METRICS, NUM_RESAMPLES, metric_replicates, paired_difference, shifted_percentile_interval

FAMILIES = ("ancestral", *SOLVERS, "speculative")
ANCESTRAL_STEPS = (10, 20, 50, 100, 200, 1000)
SOLVER_STEPS = (5, 10, 20, 50, 100)
SPECULATIVE_STEPS = (100, 1000)
REFERENCE_STEPS = 1000  # the reference sampler: ancestral sampling at this many steps, other seeds
BASELINE_STEPS = 100  # wall-clock ratios are to ancestral sampling at this many steps (batch 1)
REFERENCE_SEED_OFFSET = 1_000_000  # the reference sampler's seeds: offset + 0, 1, ... (disjoint from the points')
VECTOR_METRICS = ("energy", "mmd")
IMAGE_METRICS = ("fid", "kid")
RECORD_FIELDS = ("target", "method", "family", "num_steps", "calls_per_sample", "wall_clock_ratio", "metric",
                 "reference", "value", "ci_low", "ci_high", "num_samples")


@dataclass(frozen=True)
class FrontierPoint:
    """One sampler at one step count. `drafter` / `window` / `verifier`: speculative points only."""

    family: str
    num_steps: int
    drafter: str | None = None
    window: int | str | None = None
    verifier: str = "block"

    @property
    def method(self) -> str:
        if self.family != "speculative":
            return self.family
        window = f"w{self.window}" if isinstance(self.window, int) else str(self.window)
        return f"speculative {self.drafter}/{self.verifier}/{window}"


def check_families(families: Sequence[str]) -> list[str]:
    unknown = [name for name in families if name not in FAMILIES]
    if unknown:
        raise ValueError(f"methods: unknown method {unknown[0]!r}; expected some of {FAMILIES}")
    return list(families)


def check_steps(field_name: str, steps: Sequence[int], limit: int) -> list[int]:
    """Step counts as ints in [1, limit]; one-line ValueError naming the option otherwise."""
    out = []
    for value in steps:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{field_name}: every step count must be an int in [1, {limit}], got {value!r}")
        out.append(value)
    return out


def check_metrics(metrics: Sequence[str], sample_shape: Sequence[int], target: str = "target") -> list[str]:
    """The metrics, each fitting the samples: FID / KID need images (C, H, W) and a feature network."""
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"metrics: unknown metric {metric!r}; expected some of {sorted(METRICS)}")
        if METRICS[metric][1] and len(sample_shape) != 3:
            raise ValueError(f"metrics: {metric} needs image samples (C, H, W), and {target}'s samples have shape "
                             f"{tuple(sample_shape)}; use {' or '.join(VECTOR_METRICS)}")
    return list(metrics)


def default_metrics(sample_shape: Sequence[int]) -> list[str]:
    """FID and KID for images, energy distance and MMD for anything else."""
    return list(IMAGE_METRICS if len(sample_shape) == 3 else VECTOR_METRICS)


def frontier_points(families: Sequence[str], *, drafters: Sequence[str] = ("free-x0",), windows: Sequence = (8,),
                    verifier: str = "block", ancestral_steps: Sequence[int] = ANCESTRAL_STEPS,
                    solver_steps: Sequence[int] = SOLVER_STEPS, speculative_steps: Sequence[int] = SPECULATIVE_STEPS,
                    num_train_steps: int = 1000, drafter_steps: dict[str, Sequence[int]] | None = None
                    ) -> list[FrontierPoint]:
    """Every point of the frontier, checked (one-line errors naming the option). `drafter_steps` limits a drafter
    to the speculative step counts it was trained for (a learned drafter's checkpoint records one)."""
    families = check_families(families)
    steps = {"ancestral": check_steps("ancestral_steps", ancestral_steps, num_train_steps),
             "solver": check_steps("solver_steps", solver_steps, num_train_steps),
             "speculative": check_steps("speculative_steps", speculative_steps, num_train_steps)}
    if "speculative" in families and any(n < 2 for n in steps["speculative"]):
        raise ValueError("speculative_steps: speculative sampling needs at least 2 steps (the last step is noiseless)")
    if "speculative" in families and not (drafters and windows):
        raise ValueError("drafters / windows: speculative points need at least one drafter and one window")
    if "speculative" in families:
        for window in windows:
            as_window_policy(window)  # "window: unknown policy ..." before any sampling
        parse_verifier(verifier)
    points = []
    for family in families:
        if family == "ancestral":
            points += [FrontierPoint("ancestral", n) for n in steps["ancestral"]]
        elif family in SOLVERS:
            points += [FrontierPoint(family, n) for n in steps["solver"]]
        else:
            only = drafter_steps or {}
            points += [FrontierPoint("speculative", n, drafter, window, verifier)
                       for n in steps["speculative"] for drafter in drafters for window in windows
                       if drafter not in only or n in only[drafter]]
    return points


@dataclass
class Sampled:
    """A point's samples and what they cost."""

    samples: torch.Tensor
    calls_per_sample: float
    extra: dict = field(default_factory=dict)


def sample_point(model, point: FrontierPoint, seeds: Sequence[int], make_drafter: Callable | None = None,
                 batch_size: int | None = None) -> Sampled:
    """Draw one sample per seed with the point's sampler."""
    shape = model.sample_shape
    if point.family == "ancestral":
        samples = ancestral_sample(model, model.schedule, shape, num_steps=point.num_steps, seeds=seeds,
                                   batch_size=batch_size)
        return Sampled(samples, float(point.num_steps))
    if point.family in SOLVERS:
        samples = solver_sample(model, model.schedule, shape, solver=point.family, num_steps=point.num_steps,
                                seeds=seeds, batch_size=batch_size)
        return Sampled(samples, float(point.num_steps))
    result = speculative_sample(model, model.schedule, shape, num_steps=point.num_steps, seeds=seeds,
                                drafter=make_drafter(), verifier=point.verifier, window=point.window,
                                batch_size=batch_size)
    stats = result.stats
    return Sampled(result.samples, stats.target_calls_per_sample,
                   dict(acceptance_rate=stats.acceptance_rate, draft_calls_per_sample=stats.draft_calls / len(seeds)))


def batch_one_seconds(model, point: FrontierPoint, seeds: Sequence[int], make_drafter: Callable | None = None) -> float:
    """Median wall-clock seconds per sample, each seed sampled alone (after one untimed warm-up sample)."""
    times = []
    for k, seed in enumerate([seeds[0], *seeds]):
        start = time.perf_counter()
        sample_point(model, point, [seed], make_drafter)
        if k:  # the first run pays one-off costs (allocations, caches)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def quality(samples: dict[str, torch.Tensor], references: dict[str, dict[str, torch.Tensor]], metrics: Sequence[str],
            num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> list[dict]:
    """{metric, reference, value, ci_low, ci_high, num_reference, replicates} for each metric x reference. The
    samples and each reference come in each metric's space (metric -> tensor: features for image metrics);
    `replicates` (a tensor) is what `with_paired_differences` pairs, and is not for the JSON."""
    rows = []
    for metric in metrics:
        for name, reference in references.items():
            y = reference[metric]
            replicates = metric_replicates(metric, samples[metric], y, num_resamples, seed)
            value, low, high = shifted_percentile_interval(replicates)
            rows.append(dict(metric=metric, reference=name, value=value, ci_low=low, ci_high=high,
                             num_reference=len(y), replicates=replicates))
    return rows


def with_paired_differences(records: list[dict]) -> list[dict]:
    """The records without their replicates, and with `diff`, `diff_low`, `diff_high`: the metric minus the
    1000-step ancestral point's on the same resamples (same seeds, same reference), a paired 95% interval;
    None when the run has no such point."""
    anchors = {(r["metric"], r["reference"]): r["replicates"] for r in records
               if r["family"] == "ancestral" and r["num_steps"] == REFERENCE_STEPS}
    out = []
    for record in records:
        anchor = anchors.get((record["metric"], record["reference"]))
        diff = (None,) * 3 if anchor is None else paired_difference(record["replicates"], anchor)
        plain = {k: v for k, v in record.items() if k != "replicates"}
        out.append({**plain, **dict(zip(("diff", "diff_low", "diff_high"), diff))})
    return out


def run_frontier(model, target: str, points: Sequence[FrontierPoint], *, data: torch.Tensor, num_samples: int,
                 metrics: Sequence[str], drafter_factories: dict[str, Callable] | None = None,
                 feature_extractor=None, timing_seeds: int = 3, batch_size: int | None = None,
                 num_resamples: int = NUM_RESAMPLES, log: Callable[[str], None] = print) -> list[dict]:
    """Every point of one target: its records (`RECORD_FIELDS` and acceptance / draft calls for speculative
    points), in point order.

    Args:
        model: an unconditional target with `sample_shape` and `schedule`.
        target: its name in the records.
        points: `frontier_points(...)`.
        data: held-out data points (M, *sample_shape), the first reference.
        num_samples: samples per point (seeds 0..num_samples-1) and of the reference sampler (other seeds).
        metrics: `check_metrics`-ed names.
        drafter_factories: drafter name -> factory, for the speculative points.
        feature_extractor: images -> features, for FID / KID.
        timing_seeds: seeds timed alone at batch 1 per point (median), 0 to skip timing.
        batch_size: chains sampled together (default: all).
        num_resamples: bootstrap resamples per interval.
        log: progress lines.
    """
    factories = drafter_factories or {}
    metrics = _checked_run(model, target, points, metrics, feature_extractor, factories)

    def in_metric_spaces(x: torch.Tensor) -> dict:
        """metric -> x in its space; the image features are extracted once for FID and KID alike."""
        if not any(METRICS[m][1] for m in metrics):
            return dict.fromkeys(metrics, x)
        from .features import extract_features
        features = extract_features(x, feature_extractor)
        return {m: features if METRICS[m][1] else x for m in metrics}

    seeds = list(range(num_samples))
    log(f"[{target}] reference: ancestral sampling, {REFERENCE_STEPS} steps, {num_samples} other seeds")
    reference_samples = sample_point(model, FrontierPoint("ancestral", REFERENCE_STEPS),
                                     [REFERENCE_SEED_OFFSET + s for s in seeds], batch_size=batch_size).samples
    references = {"data": in_metric_spaces(data), f"ancestral_{REFERENCE_STEPS}": in_metric_spaces(reference_samples)}
    baseline = (batch_one_seconds(model, FrontierPoint("ancestral", BASELINE_STEPS), seeds[:timing_seeds])
                if timing_seeds else None)
    records = []
    for point in points:
        start = time.perf_counter()
        make = factories.get(point.drafter) if point.family == "speculative" else None
        sampled = sample_point(model, point, seeds, make, batch_size)
        ratio = (batch_one_seconds(model, point, seeds[:timing_seeds], make) / baseline) if timing_seeds else None
        base = dict(target=target, method=point.method, family=point.family, num_steps=point.num_steps,
                    calls_per_sample=sampled.calls_per_sample, wall_clock_ratio=ratio, num_samples=num_samples,
                    drafter=point.drafter, window=point.window, verifier=point.verifier if point.drafter else None,
                    **sampled.extra)
        rows = quality(in_metric_spaces(sampled.samples), references, metrics, num_resamples)
        records += [{**base, **row} for row in rows]
        shown = ", ".join(f"{r['metric']} {r['value']:.4g}" for r in rows if r["reference"] == "data")
        log(f"[{target}] {point.method} N={point.num_steps}: {sampled.calls_per_sample:.1f} calls/sample, "
            f"{shown} ({time.perf_counter() - start:.0f} s)")
    return with_paired_differences(records)


def _checked_run(model, target: str, points, metrics, feature_extractor, factories: dict) -> list[str]:
    """`run_frontier`'s inputs checked before any sampling (one-line errors): its metrics."""
    if getattr(model, "num_classes", 0):
        raise ValueError(f"{target}: the frontier samples unconditional targets; this one is class-conditional")
    metrics = check_metrics(metrics, model.sample_shape, target)
    for solver in dict.fromkeys(p.family for p in points if p.family in SOLVERS):
        check_solver(solver, model.schedule)  # e.g. an EDM target: refused before any sampling
    if any(METRICS[m][1] for m in metrics) and feature_extractor is None:
        raise ValueError(f"metrics: FID / KID on {target} need a feature network for images of shape "
                         f"{tuple(model.sample_shape)}; pass one (--feature-net) or use {' or '.join(VECTOR_METRICS)}")
    missing = sorted({p.drafter for p in points if p.family == "speculative"} - set(factories))
    if missing:
        raise ValueError(f"drafters: no drafter named {missing[0]!r} for {target}; known: {sorted(factories)}")
    return metrics


# --- reporting ------------------------------------------------------------------------------------
def _interval(row: dict) -> str:
    return f"{row['value']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"


def _ordered_metrics(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["metric"] for r in records))


def _references(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["reference"] for r in records))


def points_of(records: list[dict]) -> dict[tuple[str, int], dict[tuple[str, str], dict]]:
    """(method, num_steps) -> (metric, reference) -> record, in record order."""
    out: dict = {}
    for r in records:
        out.setdefault((r["method"], r["num_steps"]), {})[(r["metric"], r["reference"])] = r
    return out


def _difference(row: dict) -> str:
    return "-" if row.get("diff") is None else f"{row['diff']:+.3g} [{row['diff_low']:+.3g}, {row['diff_high']:+.3g}]"


def frontier_table(records: list[dict]) -> str:
    """One markdown table of one target's records: a row per point; per metric its value to the data, its paired
    difference to the 1000-step ancestral point's, and its value to the 1000-step sampler's samples (other seeds)."""
    metrics = _ordered_metrics(records)
    reference = f"ancestral_{REFERENCE_STEPS}"
    titles = ([f"{m} to data" for m in metrics] + [f"{m} minus ancestral {REFERENCE_STEPS}'s (paired)" for m in metrics]
              + [f"{m} to ancestral-{REFERENCE_STEPS} samples" for m in metrics])
    lines = ["| method | N | calls/sample | batch-1 time (x ancestral 100) | " + " | ".join(titles) + " |",
             "|" + "---|" * (4 + len(titles))]
    for (method, steps), row in points_of(records).items():
        first = next(iter(row.values()))
        ratio = first["wall_clock_ratio"]
        cells = ([_interval(row[m, "data"]) if (m, "data") in row else "-" for m in metrics]
                 + [_difference(row[m, "data"]) if (m, "data") in row else "-" for m in metrics]
                 + [_interval(row[m, reference]) if (m, reference) in row else "-" for m in metrics])
        lines.append(f"| {method} | {steps} | {first['calls_per_sample']:.1f} | "
                     + ("-" if ratio is None else f"{ratio:.2f}") + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detectable_loss(row: dict) -> bool:
    """Worse than the 1000-step ancestral sampler, detectably: the paired difference's interval lies above 0."""
    return row["diff_low"] > 0.0


def _family_sentence(family: str, rows: list[dict]) -> str:
    """Where a family's loss against the 1000-step sampler stops being detectable (rows sorted by N)."""
    lossy = [r for r in rows if detectable_loss(r)]
    if not lossy:
        return (f"  - {family}: no loss detectable at any N run, down to N={rows[0]['num_steps']} (paired difference "
                f"{_difference(rows[0])}).")
    last = lossy[-1]
    above = [r for r in rows if r["num_steps"] > last["num_steps"]]
    text = (f"  - {family}: a loss is detectable up to N={last['num_steps']} (paired difference {_difference(last)})"
            + ("" if len(lossy) == len([r for r in rows if r["num_steps"] <= last["num_steps"]])
               else ", not at every N below it"))
    if not above:
        return text + ", the largest N run: it does not reach 1000-step quality here."
    return text + (f"; none from N={above[0]['num_steps']} ({above[0]['calls_per_sample']:.0f} calls) on "
                   f"(paired difference {_difference(above[0])}).")


def reach_summary(records: list[dict], reference: str = "data") -> list[str]:
    """Plain sentences from the numbers, per metric: the 1000-step ancestral quality; whether each speculative
    1000-step point differs from it detectably (paired interval excluding 0) and at how many calls; for each
    other sampler, up to which N a loss against it is detectable at this sample size."""
    points = points_of(records)
    lines = []
    for metric in _ordered_metrics(records):
        anchor = points.get(("ancestral", REFERENCE_STEPS), {}).get((metric, reference))
        if anchor is None:
            continue
        lines.append(f"- **{metric}** to the {reference}: ancestral sampling at {REFERENCE_STEPS} steps gives "
                     f"{_interval(anchor)}.")
        for (method, steps), row in points.items():
            r = row.get((metric, reference))
            if r and r["family"] == "speculative" and steps == REFERENCE_STEPS:
                same = "no difference detectable" if r["diff_low"] <= 0.0 <= r["diff_high"] else "a detectable difference"
                lines.append(f"  - {method} at {REFERENCE_STEPS} steps: {same} (paired difference {_difference(r)}), "
                             f"at {r['calls_per_sample']:.1f} calls/sample ({REFERENCE_STEPS / r['calls_per_sample']:.1f}x "
                             "fewer).")
        for family in dict.fromkeys(r["family"] for r in records if r["family"] != "speculative"):
            rows = sorted((row[metric, reference] for (method, steps), row in points.items()
                           if method == family and (metric, reference) in row
                           and not (family == "ancestral" and steps == REFERENCE_STEPS)),
                          key=lambda r: r["num_steps"])
            if rows:
                lines.append(_family_sentence(family, rows))
    return lines


def frontier_plot(records: list[dict], path: str | Path | None = None):
    """Quality against sequential calls (log x), one line per method, 95% intervals drawn: a row of panels per
    target x reference, a column per metric. Saved to `path` (PNG) when given; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [(t, ref) for t in dict.fromkeys(r["target"] for r in records)
            for ref in _references([r for r in records if r["target"] == t])]
    num_cols = max(len(_ordered_metrics([r for r in records if r["target"] == t])) for t, _ in rows)
    fig, axes = plt.subplots(len(rows), num_cols, figsize=(5.2 * num_cols, 3.6 * len(rows)), squeeze=False)
    for i, (target, reference) in enumerate(rows):
        mine = [r for r in records if r["target"] == target and r["reference"] == reference]
        for j, metric in enumerate(_ordered_metrics(mine)):
            ax = axes[i][j]
            anchor = [r for r in mine if r["metric"] == metric and r["family"] == "ancestral"
                      and r["num_steps"] == REFERENCE_STEPS]
            if anchor:
                ax.axhspan(anchor[0]["ci_low"], anchor[0]["ci_high"], color="0.85", zorder=0,
                           label=f"ancestral {REFERENCE_STEPS} steps, 95%")
            for method in dict.fromkeys(r["method"] for r in mine):
                line = sorted((r for r in mine if r["method"] == method and r["metric"] == metric),
                              key=lambda r: r["calls_per_sample"])
                x = [r["calls_per_sample"] for r in line]
                y = [r["value"] for r in line]
                err = [[r["value"] - r["ci_low"] for r in line], [r["ci_high"] - r["value"] for r in line]]
                ax.errorbar(x, y, yerr=err, marker="o", ms=3.5, capsize=2.5, lw=1.2, label=method)
            ax.set_xscale("log")
            ax.set_xlabel("sequential target calls per sample")
            ax.set_ylabel(metric)
            ax.set_title(f"{target}: {metric} to {reference.replace('_', '-')}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        axes[i][0].legend(fontsize=7)
        for j in range(len(_ordered_metrics(mine)), num_cols):
            axes[i][j].axis("off")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
