"""What a sampling run cost (ALGORITHMS.md section 6), as one typed record.

`speculative_sample` returns a `SamplingStats` in `result.stats`, and so does `ancestral_sample` with
`return_stats=True`; `SamplingStats.merge` combines the parts of several ranks or batches. The
evaluate report, the sampling callback and the benchmarks read these fields (`as_dict()` gives them
with the derived ones, the same keys the JSON and CSV reports carry). `stats["key"]` also works.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class SamplingStats:
    """Counters of one sampling run; the derived rates are properties.

    Per-sample fields are means over the run's samples; totals are sums; `drafted_per_step` and
    `accepted_per_step` count drafted and accepted transitions at each step of the plan (acceptance
    per diffusion time). Ancestral sampling has one target call and one round per step, nothing drafted.
    """

    num_samples: int
    num_steps: int
    verifier: str
    window: int | str
    drafter: str
    target_calls_per_sample: float  # sequential target calls a chain went through (ancestral: num_steps)
    rounds: int  # batched rounds (verification calls)
    rounds_per_sample: float
    target_batches: int  # target calls of any kind (drafter calls included)
    target_rows: int  # states the target evaluated (padding rows included)
    draft_calls: int  # drafter proposals (one per drafted position of a round)
    drafted_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    wall_clock_s: float = math.nan  # sampling, without `compile_s`
    compile_s: float = 0.0  # compiled sampling: the calls that compiled a graph (warm-up)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def speedup(self) -> float:
        """Fewer sequential target calls than ancestral sampling: num_steps / calls per sample."""
        return self.num_steps / self.target_calls_per_sample

    @property
    def drafted_steps(self) -> int:
        return sum(self.drafted_per_step)

    @property
    def accepted_steps(self) -> int:
        return sum(self.accepted_per_step)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_steps / self.drafted_steps if self.drafted_steps else math.nan

    @property
    def chain_rounds(self) -> float:
        """Rounds summed over chains."""
        return self.rounds_per_sample * self.num_samples

    @property
    def mean_accepted_per_round(self) -> float:
        return self.accepted_steps / self.chain_rounds

    @property
    def mean_steps_per_round(self) -> float:
        """Steps a chain commits per round (every chain commits num_steps in all)."""
        return self.num_steps * self.num_samples / self.chain_rounds

    DERIVED = ("speedup", "drafted_steps", "acceptance_rate", "mean_accepted_per_round", "mean_steps_per_round")

    def as_dict(self) -> dict:
        """Every field and derived rate, as plain Python values (JSON-ready)."""
        return dataclasses.asdict(self) | {name: getattr(self, name) for name in self.DERIVED}

    def __getitem__(self, key: str):
        if key not in self.DERIVED and key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def ancestral(cls, num_samples: int, num_steps: int, batches: int, wall_clock_s: float) -> "SamplingStats":
        """Ancestral sampling's costs: one target call and one round per step, nothing drafted."""
        return cls(num_samples=num_samples, num_steps=num_steps, verifier="none", window=0, drafter="none",
                   target_calls_per_sample=float(num_steps), rounds=num_steps * batches, rounds_per_sample=float(num_steps),
                   target_batches=num_steps * batches, target_rows=num_steps * num_samples, draft_calls=0,
                   drafted_per_step=[0] * num_steps, accepted_per_step=[0] * num_steps, wall_clock_s=wall_clock_s)

    @classmethod
    def merge(cls, parts: list["SamplingStats"]) -> "SamplingStats":
        """Combine the stats of several ranks or batches of one method: per-sample means weighted by
        sample counts, totals summed, per-step counts summed, rounds and wall-clock the slowest part's."""
        if len(parts) == 1:
            return parts[0]
        n = sum(p.num_samples for p in parts)
        weighted = lambda name: sum(p.num_samples * getattr(p, name) for p in parts) / n  # noqa: E731
        per_step = lambda name: [sum(col) for col in zip(*(getattr(p, name) for p in parts))]  # noqa: E731
        return dataclasses.replace(
            parts[0], num_samples=n, target_calls_per_sample=weighted("target_calls_per_sample"),
            rounds_per_sample=weighted("rounds_per_sample"), rounds=max(p.rounds for p in parts),
            target_batches=max(p.target_batches for p in parts), target_rows=sum(p.target_rows for p in parts),
            draft_calls=max(p.draft_calls for p in parts), drafted_per_step=per_step("drafted_per_step"),
            accepted_per_step=per_step("accepted_per_step"), wall_clock_s=max(p.wall_clock_s for p in parts),
            compile_s=max(p.compile_s for p in parts),
        )


@dataclass
class SamplingResult:
    """What a sampler returns: samples (len(seeds), *shape) in the order of the seeds, and their stats."""

    samples: "torch.Tensor"
    stats: SamplingStats
