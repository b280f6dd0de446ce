"""What a round costs on this device, for the cost-aware window policy (ALGORITHMS.md section 10).

A round with C live chains and longest window L evaluates C (L + 1) rows in one target call, drafts L
steps and verifies; a round with L = 0 is a plain target step on C rows. Two sources give the time of
each window 0..L_max:

    CostModel(target_rows=(1, 8, 64), target_s=(1e-3, 2e-3, 9e-3), draft_step_s=5e-5, round_s=4e-4)
        explicit: reproducible runs and tests (the windows then depend only on the chains' past)
    MeasuredRoundTimes()
        measured as the sampler runs: the wall-clock of each round, between two host reads, by window

Both answer `round_times(chains, longest) -> [seconds of a round with window 0, 1, ..., longest]`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended beyond the last point with the last segment's slope
    (a single point: proportional) and flat below the first."""
    if x <= xs[0]:
        return ys[0] if len(xs) > 1 or x == xs[0] else ys[0] * x / xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    return ys[-1] + (ys[-1] - ys[-2]) * (x - xs[-1]) / (xs[-1] - xs[-2])


def _check_positive(value, field: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"cost_model.{field}: expected a finite number of seconds {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CostModel:
    """Seconds a round takes on one device, from its parts.

    Args:
        target_rows: row counts at which the target call was timed, strictly increasing.
        target_s: the call's time at those rows (positive, non-decreasing); between them the time is
            interpolated linearly, beyond the last extended with the last segment's slope.
        draft_step_s: the drafter's time per drafted step of a round (>= 0).
        round_s: a drafting round's time besides the target call and the drafting: noise, verification,
            commit and the host read (>= 0). A plain round (window 0) pays only its target call.
    """

    target_rows: tuple[int, ...]
    target_s: tuple[float, ...]
    draft_step_s: float = 0.0
    round_s: float = 0.0

    def __post_init__(self):
        rows, secs = tuple(self.target_rows), tuple(self.target_s)
        if not rows or len(rows) != len(secs):
            raise ValueError(f"cost_model: target_rows and target_s must be non-empty and of one length, got "
                             f"{len(rows)} and {len(secs)}")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rows) or \
                any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"cost_model.target_rows: expected strictly increasing ints >= 1, got {rows}")
        secs = tuple(_check_positive(s, "target_s") for s in secs)
        if any(b < a for a, b in zip(secs, secs[1:])):
            raise ValueError(f"cost_model.target_s: a call on more rows cannot take less time; got {secs} "
                             f"for rows {rows} (times must be non-decreasing)")
        object.__setattr__(self, "target_rows", rows)
        object.__setattr__(self, "target_s", secs)
        object.__setattr__(self, "draft_step_s", _check_positive(self.draft_step_s, "draft_step_s", allow_zero=True))
        object.__setattr__(self, "round_s", _check_positive(self.round_s, "round_s", allow_zero=True))

    @classmethod
    def flat(cls, seconds: float = 1e-3) -> "CostModel":
        """Rows cost nothing, as on a launch-bound GPU at a small batch: every window costs one call."""
        return cls((1, 2), (seconds, seconds))

    @classmethod
    def per_row(cls, seconds: float = 1e-3) -> "CostModel":
        """Time proportional to rows, as on a compute-bound device: L drafts cost L more calls."""
        return cls((1,), (seconds,))

    @classmethod
    def from_dict(cls, values) -> "CostModel":
        """From a mapping (YAML): {target_rows: [...], target_s: [...], draft_step_s: ..., round_s: ...}."""
        if isinstance(values, CostModel):
            return values
        if not isinstance(values, dict):
            raise ValueError(f"cost_model: expected a CostModel or a mapping with target_rows and target_s, got "
                             f"{type(values).__name__}")
        unknown = set(values) - {"target_rows", "target_s", "draft_step_s", "round_s"}
        if unknown or not {"target_rows", "target_s"} <= set(values):
            raise ValueError(f"cost_model: expected keys target_rows, target_s (and optionally draft_step_s, "
                             f"round_s), got {sorted(values)}")
        return cls(tuple(values["target_rows"]), tuple(values["target_s"]), values.get("draft_step_s", 0.0),
                   values.get("round_s", 0.0))

    def target_time(self, rows: int) -> float:
        return _interpolate(self.target_rows, self.target_s, rows)

    def round_times(self, chains: int, longest: int) -> list[float]:
        """Seconds of a round of `chains` chains with window 0, 1, ..., `longest`."""
        return [self.target_time(chains)] + [
            self.target_time(chains * (L + 1)) + self.round_s + L * self.draft_step_s for L in range(1, longest + 1)
        ]


class MeasuredRoundTimes:
    """Round times measured as the sampler runs, by window: the wall-clock from the end of one round
    to the end of the next (each round ends with its host read, so on a GPU the time is the device's).

    A window's time is the fastest of its rounds (timing noise only adds time). Untimed windows are
    estimated from the timed ones: linearly between them; a plain step (window 0) before it is timed,
    in proportion to the rows of the shortest timed window (optimistic, so that it gets tried); beyond
    the longest timed window W, up to 2 W only, with the slope of the two longest timed; below the
    shortest timed drafting window w, down to w / 2 only, once the plain step is timed (untimed windows
    are tried one doubling or halving at a time, where the times say they may pay). Rounds are timed at whatever
    number of chains is live: only rounds of the full batch are timed, and their times are kept while
    chains finish.
    """

    def __init__(self):
        self.fastest: dict[int, float] = {}
        self._last: float | None = None

    def start(self) -> None:
        """A new run: its first round is not timed (it pays for the run's set-up and first calls)."""
        self._last = None

    def observe(self, window: int, full: bool = True) -> bool:
        """A round with longest window `window` just ended; whether that window's time changed. Only
        rounds of a `full` batch count (the tail of a run, with fewer live chains, is faster; the caller
        also passes False for a round whose time was mostly compilation)."""
        now, last = time.perf_counter(), self._last
        self._last = now
        if last is None or not full or now - last >= self.fastest.get(window, math.inf):
            return False
        self.fastest[window] = now - last
        return True

    @property
    def drafting_timed(self) -> bool:
        return any(w > 0 for w in self.fastest)

    def round_times(self, chains: int, longest: int) -> list[float]:
        drafting = sorted(w for w in self.fastest if w > 0)
        if not drafting:
            raise ValueError("MeasuredRoundTimes: no drafting round has been timed yet")
        plain = self.fastest.get(0, self.fastest[drafting[0]] / (drafting[0] + 1))
        windows, secs = [0, *drafting], [plain, *(self.fastest[w] for w in drafting)]
        low, high = drafting[0] // 2, 2 * drafting[-1]  # one halving, one doubling beyond the timed
        low = low if 0 in self.fastest else drafting[0]  # no halving on the plain step's guessed time
        return [math.inf if 0 < L < low or L > high else
                _interpolate(windows, secs, L) if L <= drafting[-1] else max(_interpolate(windows, secs, L), secs[-1])
                for L in range(longest + 1)]
