"""Adaptive windows (issue 17): the cost model, the measured round times, the cost-aware policy behind
`window="auto"`, and plain rounds (window 0) through the engine.

Exactness of the adaptive policies at every step of the closed-form chain is in
test_exactness_power.py; the noise plain rounds draw is checked key by key in test_noise_refills.py.
"""
import math
from functools import partial

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.speculative import FreeDrafter, FrozenTargetDrafter, speculative_sample
from specdiff_train.speculative.costs import CostModel, MeasuredRoundTimes
from specdiff_train.speculative.verifiers import Verifier
from specdiff_train.speculative.verify import verify_block
from specdiff_train.speculative.windows import CostAwareWindow, WindowPolicy, as_window_policy
from specdiff_train.testing import GaussianDataDenoiser

NUM_STEPS = 50
SEEDS = list(range(48))
FIXED = (1, 2, 3, 4, 6, 8, 12, 16)  # the fixed windows of the goals


@pytest.fixture(scope="module")
def chain():
    schedule = DDPMSchedule(1000)
    return schedule, GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)


class Windows:
    """Observer: each round's longest window."""

    def __init__(self):
        self.windows = []

    def on_round_end(self, record):
        self.windows.append(record.window)


def _sample(chain, window, batch_size=16, seeds=SEEDS, **kwargs):
    schedule, model = chain
    seen = Windows()
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=seeds, drafter=FreeDrafter("eps"),
                                window=window, batch_size=batch_size, callbacks=[seen], **kwargs)
    return result, seen.windows


# --- the cost model ------------------------------------------------------------------------------

def test_cost_model_interpolates_the_target_call_and_adds_the_round_parts():
    model = CostModel(target_rows=(1, 4, 8), target_s=(1.0, 1.0, 3.0), draft_step_s=0.25, round_s=0.5)
    assert model.target_time(2) == 1.0 and model.target_time(6) == 2.0  # flat, then linear
    assert model.target_time(12) == 5.0  # beyond the last point: the last segment's slope
    # 2 chains: window 0 is a plain call on 2 rows; window L evaluates 2 (L + 1) rows, drafts L steps
    assert model.round_times(2, 3) == [1.0, 1.0 + 0.5 + 0.25, 2.0 + 0.5 + 0.5, 3.0 + 0.5 + 0.75]
    assert CostModel.per_row(2.0).round_times(3, 2) == [6.0, 12.0, 18.0]  # one point: time in proportion to rows
    assert CostModel.flat(2.0).round_times(64, 2) == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("values, message", [
    (dict(target_rows=(1, 2), target_s=(2.0, 1.0)), "cost_model.target_s: a call on more rows cannot take less"),
    (dict(target_rows=(1, 2), target_s=(0.0, 1.0)), r"cost_model.target_s: expected a finite number of seconds > 0"),
    (dict(target_rows=(2, 2), target_s=(1.0, 1.0)), "cost_model.target_rows: expected strictly increasing"),
    (dict(target_rows=(0,), target_s=(1.0,)), "cost_model.target_rows"),
    (dict(target_rows=(1,), target_s=(1.0, 2.0)), "cost_model: target_rows and target_s"),
    (dict(target_rows=(1,), target_s=(1.0,), round_s=-1.0), r"cost_model.round_s: .* >= 0"),
    (dict(target_rows=(1,), target_s=(math.nan,)), "cost_model.target_s"),
    (dict(target_rows=(1,), target_s=(1.0,), speed=3), "cost_model: expected keys"),
    ([1, 2], "cost_model: expected a CostModel or a mapping"),
])
def test_bad_cost_models_are_refused_with_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        CostModel.from_dict(values)


def test_window_options_are_validated():
    with pytest.raises(ValueError, match="window: unknown policy 'fast'"):
        as_window_policy("fast")
    with pytest.raises(ValueError, match="window: expected an int >= 1"):
        as_window_policy(0)
    with pytest.raises(ValueError, match="max_window: expected an int >= 1"):
        CostAwareWindow(max_window=0)
    with pytest.raises(ValueError, match="cost_model: only window='auto'"):
        as_window_policy(8, cost_model=CostModel.flat())
    with pytest.raises(ValueError, match="prior: expected a pass probability in"):
        CostAwareWindow(prior=1.0)
    with pytest.raises(ValueError, match="prior_weight"):
        CostAwareWindow(prior_weight=0)
    assert isinstance(as_window_policy("auto", {"target_rows": [1], "target_s": [1.0]}), CostAwareWindow)
    assert as_window_policy("heuristic").describe() == "heuristic(4-16)"


def test_a_prior_profile_must_have_one_value_per_step(chain):
    with pytest.raises(ValueError, match="prior: 3 values for a plan of 50 steps"):
        _sample(chain, CostAwareWindow(prior=[0.5, 0.6, 0.7], cost_model=CostModel.flat()))


# --- measured round times ------------------------------------------------------------------------

def test_measured_round_times_interpolate_and_explore_one_doubling_or_halving_at_a_time():
    times = MeasuredRoundTimes()
    times.fastest = {4: 5.0}  # one drafting window timed: a plain step is estimated at 5 / (4 + 1) rows
    est = times.round_times(1, 16)
    assert est[0] == 1.0 and est[2] == math.inf and est[4] == 5.0  # no halving before the plain step is timed
    assert est[8] == 5.0 + 4 * 1.0 and est[9] == math.inf  # beyond 2 x 4: not yet
    times.fastest = {0: 2.0, 2: 3.0, 8: 3.6}
    est = times.round_times(1, 16)
    assert est[1] == 2.5 and est[5] == pytest.approx(3.3) and est[16] == pytest.approx(3.6 + 8 * 0.1)
    times.fastest = {0: 1.0, 8: 9.0}  # below the shortest timed window: one halving at a time
    est = times.round_times(1, 16)
    assert est[3] == math.inf and est[4] == 5.0 and est[0] == 1.0
    with pytest.raises(ValueError, match="no drafting round"):
        MeasuredRoundTimes().round_times(1, 4)


def test_only_full_batch_rounds_after_the_first_are_timed():
    times = MeasuredRoundTimes()
    times.start()
    assert not times.observe(3)  # the run's first round: its set-up is not a round's cost
    assert times.observe(3) and 3 in times.fastest
    assert not times.observe(5, full=False) and 5 not in times.fastest  # the tail of a run: fewer chains
    assert times.observe(5)


# --- the cost-aware policy -----------------------------------------------------------------------

def test_with_rows_free_auto_needs_no_more_calls_than_the_best_fixed_window(chain):
    """The launch-bound extreme (the issue's deterministic goal): every window costs one call, so auto
    drafts the longest window, 16, in every round: the very samples and calls of `window=16`, the window
    of the set {1, ..., 16} whose committed steps per round are the largest in law. Measured here, the
    longer fixed windows differ by sampling noise only (< 1% of their calls)."""
    runs = {w: _sample(chain, w)[0] for w in FIXED}
    auto, windows = _sample(chain, "auto", cost_model=CostModel.flat())
    assert auto.stats.window == "auto" and max(windows) == 16
    assert torch.equal(auto.samples, runs[16].samples)
    calls = {w: r.stats.target_calls_per_sample for w, r in runs.items()}
    assert auto.stats.target_calls_per_sample == calls[16] <= 1.01 * min(calls.values()), calls


def test_when_rows_cost_their_share_auto_takes_plain_steps(chain):
    """The compute-bound extreme: a round of window L costs L + 1 plain steps and commits fewer than
    L + 1 steps unless every draft passes, so auto falls back to plain target steps from the start."""
    result, windows = _sample(chain, "auto", cost_model=CostModel.per_row(1e-3))
    assert set(windows) == {0}
    assert result.stats.target_calls_per_sample == NUM_STEPS and result.stats.drafted_steps == 0


def test_auto_adapts_its_window_along_the_chain_and_is_reproducible_with_a_cost_model(chain):
    """A cost model between the extremes: the window follows the pass rates along the chain (long
    where drafts pass, short or plain near the data), and with the model given the run is repeatable."""
    model = CostModel(target_rows=(16, 64, 272), target_s=(1.0, 1.2, 4.0), draft_step_s=0.02, round_s=0.1)
    first, windows = _sample(chain, "auto", cost_model=model)
    again, _ = _sample(chain, "auto", cost_model=model)
    assert torch.equal(first.samples, again.samples)
    assert len(set(windows)) >= 3, windows
    fixed = {w: _sample(chain, w)[0] for w in FIXED}
    round_time = lambda stats, window: model.round_times(16, window)[window]  # noqa: E731
    cost = {w: r.stats.rounds * round_time(r.stats, w) for w, r in fixed.items()}
    best = min(cost, key=cost.get)
    auto_cost = sum(model.round_times(16, w)[w] for w in windows)  # modelled time of the rounds auto ran
    assert auto_cost <= 1.02 * cost[best], (auto_cost, cost)


def test_measured_auto_runs_and_keeps_what_it_learned_for_the_next_run(chain):
    policy = CostAwareWindow(max_window=8)
    result, windows = _sample(chain, policy, batch_size=4, seeds=SEEDS[:8])
    assert result.stats.window == "auto(8)" and torch.isfinite(result.samples).all()
    assert windows[0] == 0 and max(windows) <= 8  # the Free Drafter's first round is a plain step
    learned = policy.tried.sum().item()
    timed = dict(policy._measured.fastest)
    assert learned > 0 and timed
    _, windows = _sample(chain, policy, batch_size=4, seeds=SEEDS[8:16])
    assert policy.tried.sum().item() >= learned  # the counts were kept, not reset
    assert set(timed) <= set(policy._measured.fastest)  # and so were the round times


def test_a_fresh_auto_starts_with_a_window_that_fills_about_8_rows_then_times_a_plain_step(chain):
    for batch_size, first in ((1, 7), (2, 3), (16, 1)):
        seen = []

        class FirstWindows(CostAwareWindow):
            def windows(self, slots, steps, ready):
                out = super().windows(slots, steps, torch.ones_like(ready))
                seen.append(int(out.max()))
                return out

        schedule, model = chain
        speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS[:batch_size],
                           drafter=FreeDrafter("eps"), window=FirstWindows(), batch_size=batch_size)
        assert seen[:3] == [first, first, 0], (batch_size, seen[:4])  # the round after the first is chosen blind


# --- plain rounds ---------------------------------------------------------------------------------

class PlainSpells(WindowPolicy):
    """Three plain rounds, then two rounds with window `window`, and so on (for every chain)."""

    def __init__(self, window: int = 3):
        self.window = window

    def start(self, plan, capacity, device):
        super().start(plan, capacity, device)
        self.rounds = 0
        return self.window

    def learn(self, slots, steps, lengths, accepted):
        self.rounds += 1

    def windows(self, slots, steps, ready):
        drafting = self.rounds % 5 >= 3
        return self.steps_left(steps).clamp(min=0, max=self.window * drafting) * ready


@pytest.mark.parametrize("drafter", [lambda: FreeDrafter("x0"), lambda: FrozenTargetDrafter("eps")])
@pytest.mark.parametrize("noise_buffer", [None, 2 * 4 * 7])  # default; one round of the full window per fill
def test_plain_rounds_give_the_verifiers_window_0_result_bit_for_bit(chain, drafter, noise_buffer):
    """A plain round skips the verifier: the same numbers as the verifier's window-0 round (a custom
    verifier sees every round), with drafting spells and plain spells, refills of both noise buffers."""
    schedule, model = chain
    options = dict(num_steps=NUM_STEPS, seeds=SEEDS[:20], window=PlainSpells(), batch_size=7)
    if noise_buffer:
        options["noise_buffer"] = noise_buffer
    fast = speculative_sample(model, schedule, (2,), drafter=drafter(), **options)
    every_round = Verifier("block", partial(verify_block, defer_correction=True))  # plain_steps=False
    slow = speculative_sample(model, schedule, (2,), drafter=drafter(), verifier=every_round, **options)
    assert torch.equal(fast.samples, slow.samples)
    assert fast.stats.target_calls_per_sample == slow.stats.target_calls_per_sample
    assert fast.stats.accepted_per_step == slow.stats.accepted_per_step
    assert 0 < fast.stats.drafted_steps < NUM_STEPS * 20  # both kinds of rounds ran


# --- the latency tables of `make demo` and scripts/bench_windows.py -------------------------------

def test_latency_and_throughput_tables_time_every_window_against_ancestral():
    from helpers import ROOT
    from specdiff_train.evaluation.latency import latency_by_window, throughput_by_drafter
    from specdiff_train.models import load_target

    model = load_target(ROOT / "checkpoints" / "toy2d" / "target.ckpt")
    shared = CostAwareWindow(max_window=4)
    rows = latency_by_window(model, lambda: FreeDrafter("x0"), num_steps=20, windows=[2, 4, "auto", shared],
                             seeds=range(3))
    assert [r["window"] for r in rows] == ["ancestral", 2, 4, "auto", "auto(4) (one policy, reused)"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["calls"] == 20 and all(r["samples"] == 3 for r in rows)
    assert min(r["vs_best_fixed"] for r in rows[1:3]) == 1.0
    assert shared.tried.sum() > 0  # the object was used by every call (and kept what it learned)
    rows = throughput_by_drafter(model, {"free-x0": lambda: FreeDrafter("x0")}, num_steps=20, batch_size=8,
                                 repeats=2, windows=(3, "auto"))
    assert [(r["drafter"], r["window"]) for r in rows] == [("ancestral", None), ("free-x0", 3), ("free-x0", "auto")]
    assert rows[1]["calls"] < 20 and all(r["median_s"] > 0 for r in rows)
