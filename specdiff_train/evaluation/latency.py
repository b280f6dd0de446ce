"""Wall-clock of speculative windows against ancestral sampling, measured in one run (ratios only mean
something within one run on one machine): the batch-1 latency table of `make demo` and
`scripts/bench_windows.py`, and the large-batch throughput one.

Each call is timed whole (set-up included: what a user waits for), after one untimed warm-up call
per configuration; configurations are interleaved seed by seed (or repeat by repeat), so that a
machine's drift touches them all alike, and each reports the median over seeds or repeats.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from ..sampling import ancestral_sample
from ..speculative import speculative_sample

ANCESTRAL = "ancestral"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a GPU's queued work belongs to the call that queued it


def _timed(run: Callable) -> tuple[float, object]:
    """(seconds, stats) of a sampling call, without the time of calls that compiled a graph (compile=True)."""
    _sync()
    start = time.perf_counter()
    stats = run()
    _sync()
    return time.perf_counter() - start - stats.compile_s, stats


def _runs(model, shape, num_steps: int, make_drafter, windows, verifier: str, batch_size: int | None, compile):
    """{config: run(seeds) -> stats} for ancestral sampling and each window (`compile`: the samplers' option)."""
    schedule = model.schedule

    def ancestral(seeds):
        return ancestral_sample(model, schedule, shape, num_steps=num_steps, seeds=seeds, batch_size=batch_size,
                                return_stats=True, compile=compile).stats

    def speculative(window):
        return lambda seeds: speculative_sample(model, schedule, shape, num_steps=num_steps, seeds=seeds,
                                                drafter=make_drafter(), verifier=verifier, window=window,
                                                batch_size=batch_size, compile=compile).stats

    return {ANCESTRAL: ancestral} | {window: speculative(window) for window in windows}


def window_label(window) -> int | str:
    """An int or a name as given; a policy object by its name, marked as one object for every call."""
    return window if window is None or isinstance(window, (int, str)) else f"{window.describe()} (one policy, reused)"


def _row(config, times: list[float], stats: list, base: float) -> dict:
    calls = [s.target_calls_per_sample for s in stats]
    median = statistics.median(times)
    return dict(window=window_label(config), median_s=median, ratio=median / base, calls=sum(calls) / len(calls),
                samples=len(times))


def latency_by_window(model, make_drafter: Callable, *, num_steps: int, windows: Sequence, seeds: Sequence[int],
                      verifier: str = "block", compile=False) -> list[dict]:
    """Batch 1: each seed sampled alone with ancestral sampling and with every window (an int, "auto",
    "heuristic", or a policy object, which then keeps what it learned from call to call, the warm-up
    call included: a server's case), timed whole. Rows: window, median seconds per sample over the seeds,
    ratio to ancestral's median, calls per sample, and `vs_best_fixed`: the ratio to the fastest int window."""
    shape = tuple(model.sample_shape)
    runs = _runs(model, shape, num_steps, make_drafter, windows, verifier, batch_size=1, compile=compile)
    for run in runs.values():  # one-off costs (allocations, caches) of each path, before any timing
        run([10_000])
    times = {config: [] for config in runs}
    stats = {config: [] for config in runs}
    for seed in seeds:
        for config, run in runs.items():
            elapsed, st = _timed(lambda: run([seed]))
            times[config].append(elapsed)
            stats[config].append(st)
    base = statistics.median(times[ANCESTRAL])
    rows = [_row(config, times[config], stats[config], base) for config in runs]
    fixed = [r["median_s"] for r in rows if isinstance(r["window"], int)]
    for row in rows:
        row["vs_best_fixed"] = row["median_s"] / min(fixed) if fixed else float("nan")
    return rows


def throughput_by_drafter(model, drafters: dict[str, Callable], *, num_steps: int, batch_size: int, repeats: int,
                          windows: Sequence = ("auto",), verifier: str = "block", compile=False) -> list[dict]:
    """A large batch: seeds 0..batch_size-1 in one call, for ancestral sampling and every drafter x
    window, `repeats` times interleaved. Rows: drafter, window, median seconds, ratio to ancestral, calls."""
    shape = tuple(model.sample_shape)
    seeds = list(range(batch_size))
    runs = {}
    for name, make in drafters.items():
        for config, run in _runs(model, shape, num_steps, make, windows, verifier, batch_size, compile).items():
            runs[(ANCESTRAL, None) if config == ANCESTRAL else (name, config)] = run
    with torch.no_grad():
        for run in runs.values():
            run(seeds[: min(2, batch_size)])  # warm-up on a small batch: the shapes differ, the code paths not
    times = {key: [] for key in runs}
    stats = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            elapsed, st = _timed(lambda: run(seeds))
            times[key].append(elapsed)
            stats[key].append(st)
    base = statistics.median(times[ANCESTRAL, None])
    return [dict(drafter=key[0], **_row(key[1], times[key], stats[key], base)) for key in runs]
