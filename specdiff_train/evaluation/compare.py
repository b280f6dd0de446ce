"""Speculative methods against ancestral sampling on the same seeds: costs, quality, exactness.

Pure PyTorch (no Lightning): the evaluate command, the demo and the benchmark-like reports call
`compare_methods`; the result is a plain dict ready for JSON (see `reporting.py`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..guidance import NULL_LABEL, check_guidance, class_grid_labels, label_values, num_classes_of
from ..sampling import ancestral_sample
from ..sampling_stats import SamplingStats
from ..speculative import Drafter, speculative_sample
from ..speculative.verifiers import Verifier, parse_verifier
from ..speculative.costs import CostModel
from ..speculative.windows import WindowPolicy, as_window_policy
from .chain_options import chain_options, resolve_chains
from .metrics import two_sample_report

NUM_TIME_BUCKETS = 10
WARMUP_STEPS = 10  # sampling steps of the untimed warm-up run of each method

# The method grid that `evaluate` and the `SpeculativeEvaluation` callback use unless told otherwise.
DEFAULT_DRAFTERS = ("free-x0", "free-eps", "frozen-eps")
DEFAULT_VERIFIERS = ("block", "tokenwise")
DEFAULT_WINDOWS = (3, 8)

# The fields of a method's report row taken from its `SamplingStats` (ALGORITHMS.md section 6).
REPORTED_STATS = ("target_calls_per_sample", "speedup", "acceptance_rate", "mean_accepted_per_round",
                  "mean_steps_per_round", "rounds", "target_rows", "draft_calls", "drafted_steps", "wall_clock_s",
                  "compile_s")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sharded(run: Callable, seeds: list[int]):
    """Run `run(seed_shard) -> (samples, stats)` on this rank's seeds (seeds[rank::world]) and gather
    every rank's part (all_gather_object: every rank calls it). Returns the samples in seed order and
    the merged `SamplingStats`. A sample depends only on its seed, so the result equals the
    single-process one."""
    rank, world = _world()
    samples, stats = run(seeds[rank::world])
    if world == 1:
        return samples, stats
    parts = [None] * world
    torch.distributed.all_gather_object(parts, (samples.cpu(), stats))
    full = torch.empty(len(seeds), *samples.shape[1:], dtype=samples.dtype)
    for r, (part, _) in enumerate(parts):
        full[r::world] = part
    return full.to(samples.device), SamplingStats.merge([st for _, st in parts])


@dataclass
class Method:
    """One speculative configuration: a drafter (made fresh per run) x verifier x window.

    `verifier` is a name of the registry ("block", "tokenwise", "tokenwise-residual", ...), a
    `Verifier` or a verify function; `correction` is token-wise's (see `verifiers.parse_verifier`).
    `window` is an int (a fixed window), "auto" (the cost-aware policy), "heuristic" or a
    `WindowPolicy` (copied for each run); `cost_model` (a `costs.CostModel` or its mapping) is auto's
    only (default: round times measured as it runs)."""

    drafter: Callable[[], Drafter]
    verifier: str | Callable = "block"
    window: int | str | WindowPolicy = 8
    correction: str | None = None
    label: str = ""
    cost_model: CostModel | dict | None = None

    def __post_init__(self):
        try:
            self.rule: Verifier = parse_verifier(self.verifier, self.correction)
            self.policy()  # refuses a bad window or cost model before any sampling
        except ValueError as err:
            raise ValueError(f"method {self.label or '?'}: {err}") from None

    def policy(self, default_cost_model: CostModel | dict | None = None) -> WindowPolicy:
        """A fresh window policy for one run: policies learn as they run (auto keeps its pass counts
        and round times across runs of one plan), so no two runs, warm-up included, share one.
        `default_cost_model` serves an auto window that has no cost model of its own."""
        if isinstance(self.window, WindowPolicy) and self.cost_model is None:
            return copy.deepcopy(self.window)  # as given, before any run
        cost_model = self.cost_model
        if cost_model is None and self.window == "auto":
            cost_model = default_cost_model
        return as_window_policy(self.window, cost_model)

    @property
    def window_name(self) -> int | str:
        """The window as reports show it: the int of a fixed window, else the policy's name ("auto")."""
        return self.window.describe() if isinstance(self.window, WindowPolicy) else self.window

    @property
    def name(self) -> str:
        window = self.window_name
        return f"{self.label}/{self.rule.name}/" + (f"w{window}" if isinstance(window, int) else str(window))


def window_option(value) -> int | str | WindowPolicy:
    """A window as YAML or a command line gives it: a string of digits ("8") is the int; anything else
    is kept (an int, "auto", "heuristic" or a policy; `Method` checks it)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _cost_model_dict(cost_model) -> dict | None:
    """A cost model for the report (JSON), checked: a one-line ValueError naming the bad field."""
    return None if cost_model is None else dataclasses.asdict(CostModel.from_dict(cost_model))


def _check_cost_model_used(cost_model, windows) -> None:
    """A cost model given for a grid without an auto window would be ignored: refuse it instead."""
    if cost_model is not None and "auto" not in windows:
        raise ValueError(f"cost_model: only window 'auto' uses a cost model, and the windows {list(windows)} have "
                         "none; add 'auto' to the windows or drop cost_model")


def min_permutations(alpha: float) -> int:
    """The fewest permutations P whose smallest possible p-value, 1 / (1 + P), falls below `alpha`:
    with fewer, no method can ever be flagged at that level."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: the exactness check level must be in (0, 1), got {alpha}")
    count = max(1, math.floor(1 / alpha) - 2)
    while 1 / (1 + count) >= alpha:
        count += 1
    return count


def check_permutations(num_permutations: int, alpha: float, field: str = "num_permutations") -> None:
    """Refuse a permutation count that cannot reach `alpha` (ValueError naming `field`, the value and the minimum)."""
    need = min_permutations(alpha)
    if num_permutations < need:
        smallest = 1 / (1 + max(num_permutations, 0))
        raise ValueError(
            f"{field}: {num_permutations} permutations cannot flag a biased method at alpha={alpha} (the smallest "
            f"p-value is 1/(1 + {num_permutations}) = {smallest:.3g}, not below alpha); use at least {need}"
        )


def exactness_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds for the ancestral reference of the exactness test: as many as `seeds`, all above them, so
    the reference shares no x_T (or noise) with the samples it is compared with."""
    start = max(seeds) + 1
    return list(range(start, start + len(seeds)))


# How a conditional target's samples get their labels (`sample_labels`); a list of ints is the other choice.
LABEL_POLICIES = {
    "classes": "classes in order, as many samples of each (one class per row of the sample pictures)",
    "cycle": "sample i gets class i % num_classes",
    "none": "every sample unconditional (the null label)",
}
_ANY_LABELS = torch.zeros(1, dtype=torch.int64)  # a labelled target, for the scale checks that need no model


def check_label_options(labels, guidance_scale) -> list[float] | None:
    """The checks of `labels` and `guidance_scale` that need no target (a callback makes them before it
    has one): a known policy name or a non-empty list, scales that are numbers >= 0. Returns the scales
    as a list (None when not given)."""
    if isinstance(labels, str) and labels not in LABEL_POLICIES:
        raise ValueError(f"labels: unknown label policy {labels!r}; use one of {sorted(LABEL_POLICIES)} or a list of "
                         "class ints (repeated over the samples; -1: unconditional)")
    if labels is not None and not isinstance(labels, str) and (not isinstance(labels, (list, tuple)) or not labels):
        raise ValueError(f"labels: expected a policy name {sorted(LABEL_POLICIES)} or a non-empty list of class "
                         f"ints, got {labels!r}")
    if guidance_scale is None:
        return None
    scales = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
    if not scales:
        raise ValueError("guidance_scale: got an empty list; give one scale or more (1: plain conditional)")
    return [check_guidance(None, _ANY_LABELS, scale) for scale in scales]


def sample_labels(model, labels, guidance_scale, num_samples: int) -> tuple[list[int] | None, list[float | None]]:
    """A conditional target's labels (one per sample, `NULL_LABEL` for unconditional ones) and guidance
    scales, checked against the target before any sampling; (None, [None]) for an unconditional target,
    which takes neither (labels, or a scale other than 1, are refused in one line).

    `labels`: a policy of `LABEL_POLICIES` (default "classes") or a list of ints repeated over the samples
    ([3]: every sample a 3). `guidance_scale`: a number or a list (default: the target's `val_guidance_scale`,
    else 1)."""
    scales = check_label_options(labels, guidance_scale)
    num_classes = num_classes_of(model)
    if num_classes == 0:
        label_values(labels, num_samples, model)  # refuses labels for an unconditional target
        for scale in scales or []:
            check_guidance(model, None, scale)  # refuses a scale other than 1
        return None, [None]
    if labels is None or labels == "classes":
        values = class_grid_labels(num_samples, num_classes)
    elif labels == "cycle":
        values = [i % num_classes for i in range(num_samples)]
    elif labels == "none":
        values = [NULL_LABEL] * num_samples
    else:
        values = [labels[i % len(labels)] for i in range(num_samples)]
    values = label_values(values, num_samples, model)  # each a class of this target, or -1
    scales = scales or [float(getattr(model, "val_guidance_scale", 1.0))]
    return values, [check_guidance(model, values, scale) for scale in scales]


def _label_of(seeds: list[int], labels: list[int] | None) -> dict[int, int] | None:
    """Each seed's label, for the methods' seeds and (index for index) the exactness reference's."""
    if labels is None:
        return None
    return dict(zip(seeds, labels)) | dict(zip(exactness_seeds(seeds), labels))


def window_options(windows: Sequence | None, cost_model: CostModel | dict | None = None) -> list:
    """A grid's windows (default `DEFAULT_WINDOWS`) as `window_option`s, each checked with the cost model
    it would get: a bad window or cost model fails once, naming its field, not once per method."""
    windows = [window_option(window) for window in (windows or DEFAULT_WINDOWS)]
    _check_cost_model_used(cost_model, windows)
    for window in windows:
        as_window_policy(window, cost_model if window == "auto" else None)
    return windows


def method_grid(drafters: dict[str, Callable[[], Drafter]], verifiers: Sequence[str] | None = None,
                windows: Sequence[int | str] | None = None,
                cost_model: CostModel | dict | None = None) -> list[Method]:
    """The cross product drafter x verifier x window (defaults: `DEFAULT_VERIFIERS`, `DEFAULT_WINDOWS`).
    A window is an int, "auto" or "heuristic" (`window_option`); `cost_model` goes to every auto method."""
    windows = window_options(windows, cost_model)
    return [Method(make, verifier, window, label=label, cost_model=cost_model if window == "auto" else None)
            for label, make in drafters.items() for verifier in (verifiers or DEFAULT_VERIFIERS) for window in windows]


def time_buckets(drafted: Sequence[int], accepted: Sequence[int], num_steps: int, buckets: int = NUM_TIME_BUCKETS,
                 fractions: Sequence[float] | None = None):
    """Acceptance per diffusion-time bucket: bucket b covers t/T in [b/B, (b+1)/B); step k of an
    N-step sampler sits at `fractions[k]` (a plan's `time_fraction`: DDPM t/T, EDM log sigma, flow t), or
    without them at t/T = 1 - (k + 0.5) / N. None where nothing was drafted."""
    drafted_b, accepted_b = [0] * buckets, [0] * buckets
    for k in range(num_steps):
        fraction = fractions[k] if fractions is not None else 1 - (k + 0.5) / num_steps
        b = min(max(int(fraction * buckets), 0), buckets - 1)
        drafted_b[b] += drafted[k]
        accepted_b[b] += accepted[k]
    return [a / d if d else None for a, d in zip(accepted_b, drafted_b)]


@dataclass
class Quality:
    """How samples are compared: low-dimensional data directly, images in a feature space. With a
    `classifier` (image -> class logits), conditional samples also get their `label_accuracy`."""

    reference: torch.Tensor | None = None  # data samples
    feature_extractor: torch.nn.Module | None = None  # images: FID/KID and tests in its space
    num_permutations: int = 1000
    seed: int = 0
    classifier: torch.nn.Module | None = None  # conditional image targets: label accuracy
    reference_note: str | None = None  # what the reference is (conditional targets: which label mix)
    reference_labels: list[int] | None = None  # the reference's strata when it matches the samples' labels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2 or self.feature_extractor is None:
            return x.reshape(len(x), -1)
        from .features import extract_features

        return extract_features(x, self.feature_extractor)

    def against(self, samples_feats: torch.Tensor, other_feats: torch.Tensor, images: torch.Tensor | None = None,
                other_images: torch.Tensor | None = None, strata: tuple | None = None) -> dict:
        """Two-sample tests (relabelling within `strata`, (samples', other's) labels, when given), and FID/KID
        for images with a feature network."""
        report = two_sample_report(samples_feats, other_feats, num_permutations=self.num_permutations, seed=self.seed,
                                   strata=strata)
        keep = ("energy_distance", "energy_p_value", "mmd", "mmd_p_value", "max_abs_mean_diff", "max_abs_std_diff")
        out = {k: report[k] for k in keep}
        if images is not None and self.feature_extractor is not None and images.dim() == 4:
            from .features import fid_kid

            out.update({k: v for k, v in fid_kid(samples_feats, other_feats, None, 50, self.seed).items()
                        if k in ("fid", "kid_mean", "kid_std")})
        return out

    def label_accuracy(self, samples: torch.Tensor, labels: list[int] | None) -> float | None:
        """The share of labelled (non-null) samples that the classifier puts in their class (None: no
        classifier, no labels, or only null labels)."""
        if self.classifier is None or labels is None:
            return None
        from .features import label_accuracy

        return label_accuracy(samples, labels, self.classifier)


def compare_methods(
    model,
    schedule,
    shape: Sequence[int],
    methods: Sequence[Method],
    *,
    num_steps: Sequence[int],
    seeds: Sequence[int],
    batch_size: int | None = None,
    quality: Quality | None = None,
    alpha: float = 0.01,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    warmup: bool = True,
    cost_model: CostModel | dict | None = None,
    compile: bool | str = False,
    labels: str | Sequence[int] | None = None,
    guidance_scale: float | Sequence[float] | None = None,
    chain=None,
) -> dict:
    """Run ancestral sampling and every method on the same seeds, for each num_steps; the exactness
    test compares each method with ancestral samples from other seeds (`exactness_seeds`).

    Under torch.distributed (e.g. Lightning DDP), each rank samples seeds[rank::world] and the parts are gathered
    on every rank, so every rank returns the same full report. Returns a dict: `config`, and `results`, a list
    with one entry per (num_steps, method) holding the costs (sequential target calls per sample, speedup,
    acceptance overall and per diffusion-time bucket, mean accepted per round, target rows, draft calls,
    wall-clock and its ratio to ancestral), the quality against the data, and the exactness check (permutation
    p-values; `exact_ok` is False when a p-value falls below `alpha`). That check's reference is a second,
    untimed ancestral run on seeds disjoint from the methods' (`exactness_seeds`): samples sharing x_T with the
    method's would be coupled to them and make the test conservative. A permutation count that cannot reach
    `alpha` is refused (`check_permutations`). Samples are kept under the private key `_samples` for plots.

    With `warmup` (the default), every method first runs untimed on one batch of this rank's seeds for
    `min(num_steps, WARMUP_STEPS)` steps, at the timed run's batch shapes: the first call of a code path pays
    one-off costs (imports, kernel and allocator set-up) that would otherwise be charged to whichever
    method runs first (in a fresh process, ancestral sampling took 20x its warm time).

    `cost_model` (a `costs.CostModel` or its mapping) serves every auto window without one of its own (the
    config's `cost_models`: None where round times are measured). Every run, warm-up included, gets a fresh
    window policy (`Method.policy`). `compile` (True or a mode): compiled sampling, compilation in `compile_s`.
    A conditional target samples with `labels` and each `guidance_scale` (`sample_labels`): rows per scale,
    the same labels for every sampler and the exactness reference. `chain` (`chain_options.py`: a `Chain`, its
    config, a name such as "ddim:eta=0.5", None for the schedule's default, or a list: rows per chain) is the
    sampler of the baseline, its reference and every method alike; rows and `config["chains"]` name it."""
    seeds, quality, chains = _checked(seeds, quality, alpha, cost_model, methods, chain, schedule, num_steps)
    label_list, scales = sample_labels(model, labels, guidance_scale, len(seeds))
    run = _Runs(model, schedule, tuple(shape), seeds, batch_size, progress, warmup, cost_model, compile,
                _label_of(seeds, label_list))
    reference_feats = quality.features(quality.reference) if quality.reference is not None else None
    results = [row for sampler in chains for scale in scales for steps in num_steps
               for row in _rows(run, steps, scale, methods, quality, reference_feats, alpha, log, sampler, chains)]
    config = _config(schedule, shape, methods, seeds, num_steps, batch_size, alpha, quality, warmup, cost_model,
                     compile, chains)
    if label_list is None:
        return dict(config=config, results=results)
    config.update(_label_config(labels, label_list, scales, quality))
    return dict(config=config, results=results, _labels=label_list)  # _labels: pictures, one class per row


def _checked(seeds, quality, alpha, cost_model, methods, chain, schedule, num_steps):
    """`compare_methods`' options checked before any sampling: (the seeds as a list, the quality, the chains)."""
    seeds, quality = list(seeds), quality or Quality()
    if len(seeds) < 2:
        raise ValueError(f"num_samples: the two-sample tests need at least 2 samples, got {len(seeds)}")
    check_permutations(quality.num_permutations, alpha)
    _check_cost_model_used(cost_model, [m.window for m in methods])
    return seeds, quality, resolve_chains(chain_options(chain), schedule, num_steps, speculative=bool(methods))


def _config(schedule, shape, methods, seeds, num_steps, batch_size, alpha, quality, warmup, cost_model,
            compile, chains=()) -> dict:
    """The report's `config`: the run's settings (the chains by repr, and as configs that rebuild them)."""
    cost_models = {m.name: _cost_model_dict(m.cost_model if m.cost_model is not None else cost_model)
                   for m in methods if m.window == "auto"}
    return dict(num_steps=list(num_steps), num_samples=len(seeds), world_size=_world()[1], first_seed=seeds[0],
                exactness_first_seed=exactness_seeds(seeds)[0], batch_size=batch_size,
                alpha=alpha, methods=[m.name for m in methods], sample_shape=list(shape),
                schedule=schedule.config(), num_permutations=quality.num_permutations,
                warmup_steps=WARMUP_STEPS if warmup else 0, cost_models=cost_models, compile=compile,
                chains=[repr(c) for c in chains],
                chain_configs=[dict(class_path=f"{type(c).__module__}.{type(c).__qualname__}", init_args=c.config())
                               for c in chains])


def _label_config(policy, label_list: list[int], scales: list[float], quality: Quality) -> dict:
    """A conditional target's part of `config`: the label policy (or the list given), the samples per
    label ("-1": unconditional), the guidance scales and what the quality numbers compare with."""
    counts = {str(label): label_list.count(label) for label in sorted(set(label_list))}
    return dict(labels=policy if isinstance(policy, str) else ("classes" if policy is None else list(policy)),
                label_counts=counts, guidance_scales=scales,
                label_accuracy_by=None if quality.classifier is None else type(quality.classifier).__name__,
                reference=quality.reference_note)


def _rows(run: "_Runs", steps: int, scale: float | None, methods, quality: Quality, reference_feats, alpha: float,
          log, chain=None, chains=()) -> list[dict]:
    """The report rows of one step count, guidance scale (None: an unconditional target) and chain: ancestral
    sampling, then every method, all with that chain."""
    base, base_stats = run.ancestral(steps, scale, chain=chain)
    # The exactness reference: ancestral samples from other seeds (untimed; split over ranks alike).
    exact_ref, _ = run.ancestral(steps, scale, exactness_seeds(run.seeds), timed=False, chain=chain)
    exact_ref_feats = quality.features(exact_ref)
    # The row's settings besides the method and num_steps: a conditional target's guidance scale, and the chain.
    setting = ({} if scale is None else {"guidance_scale": scale}) | {"chain": repr(chain)}
    entry = dict(method="ancestral", num_steps=steps, **setting, target_calls_per_sample=float(steps), speedup=1.0,
                 wall_clock_s=base_stats.wall_clock_s, compile_s=base_stats.compile_s, wall_clock_ratio=1.0,
                 _samples=base)
    rows = [_with_quality(entry, base, quality, reference_feats, run.labels())]
    tag = ("" if scale is None else f", guidance {scale:g}") + (f", {chain!r}" if len(chains) > 1 else "")
    if log:
        log(f"ancestral, {steps} steps{tag}: {base_stats.wall_clock_s:.2f}s")
    for method in methods:
        samples, stats = run.method(method, steps, scale, chain)
        # Both sides carry the same labels, index for index: relabel within classes (an exact test).
        strata = None if run.label_of is None else (run.labels(), run.labels())
        exactness = quality.against(quality.features(samples), exact_ref_feats, samples, exact_ref, strata)
        entry = dict(
            method=method.name, num_steps=steps, **setting, drafter=stats.drafter, verifier=stats.verifier,
            window=method.window_name, **{key: stats[key] for key in REPORTED_STATS},
            wall_clock_ratio=stats.wall_clock_s / base_stats.wall_clock_s,
            acceptance_by_time=time_buckets(stats.drafted_per_step, stats.accepted_per_step, steps,
                                            fractions=run.schedule.plan(steps, chain).time_fraction.tolist()),
            vs_ancestral=exactness, exact_ok=min(exactness["energy_p_value"], exactness["mmd_p_value"]) >= alpha,
            _samples=samples,
        )
        rows.append(_with_quality(entry, samples, quality, reference_feats, run.labels()))
        if log:
            log(f"{method.name}, {steps} steps{tag}: {stats.target_calls_per_sample:.1f} calls/sample, "
                f"{stats.wall_clock_s:.2f}s")
    return rows


def _with_quality(entry: dict, samples: torch.Tensor, quality: Quality, reference_feats, labels=None) -> dict:
    """The entry, with its quality against the data when there is reference data, and its label accuracy
    when the samples are labelled and there is a classifier."""
    if reference_feats is not None:
        strata = None if labels is None or quality.reference_labels is None else (labels, quality.reference_labels)
        entry["vs_data"] = quality.against(quality.features(samples), reference_feats, samples, quality.reference,
                                           strata)
    accuracy = quality.label_accuracy(samples, labels)
    if accuracy is not None:
        entry["label_accuracy"] = accuracy
    return entry


@dataclass
class _Runs:
    """Runs ancestral sampling and the methods on this rank's seeds, after an untimed warm-up."""

    model: object
    schedule: object
    shape: tuple[int, ...]
    seeds: list[int]
    batch_size: int | None
    progress: bool
    warmup: bool
    cost_model: CostModel | dict | None = None  # auto methods without their own
    compile: bool | str = False  # the samplers' compile option
    label_of: dict[int, int] | None = None  # a conditional target's label of each seed (`_label_of`)

    def labels(self, seeds: Sequence[int] | None = None) -> list[int] | None:
        """The labels of `seeds` (default: the methods' seeds), None for an unconditional target."""
        return None if self.label_of is None else [self.label_of[s] for s in (self.seeds if seeds is None else seeds)]

    def _conditioning(self, shard, scale: float | None) -> dict:
        return dict(labels=self.labels(shard), guidance_scale=1.0 if scale is None else scale)

    def _warm(self, run: Callable, steps: int) -> None:
        if self.warmup:
            rank, world = _world()
            run(self.seeds[rank::world][: self.batch_size or len(self.seeds)], min(steps, WARMUP_STEPS), False)

    def ancestral(self, steps: int, scale: float | None = None, seeds: list[int] | None = None, timed: bool = True,
                  chain=None):
        def run(shard, num_steps=steps, progress=self.progress and timed):
            out = ancestral_sample(self.model, self.schedule, self.shape, num_steps=num_steps, seeds=shard,
                                   batch_size=self.batch_size, progress=progress, return_stats=True,
                                   compile=self.compile, chain=chain, **self._conditioning(shard, scale))
            return out.samples, out.stats

        if timed:
            self._warm(run, steps)
        return sharded(run, seeds or self.seeds)

    def method(self, method: Method, steps: int, scale: float | None = None, chain=None):
        def run(shard, num_steps=steps, progress=self.progress):
            out = speculative_sample(self.model, self.schedule, self.shape, num_steps=num_steps, seeds=shard,
                                     drafter=method.drafter(), verifier=method.rule,
                                     window=method.policy(self.cost_model), batch_size=self.batch_size,
                                     progress=progress, compile=self.compile, chain=chain,
                                     **self._conditioning(shard, scale))
            return out.samples, out.stats

        self._warm(run, steps)
        return sharded(run, self.seeds)
