"""The sampling engine's public seams: observers, window policies, verifiers by name, typed stats,
and the shape check both samplers make."""
import math

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.sampling import ancestral_sample
from specdiff_train.sampling_stats import SamplingStats
from specdiff_train.speculative import FreeDrafter, speculative_sample
from specdiff_train.speculative.verifiers import parse_verifier
from specdiff_train.speculative.windows import FixedWindow, WindowPolicy
from specdiff_train.testing import GaussianDataDenoiser

from helpers import TinyDenoiser

NUM_STEPS = 20
SEEDS = list(range(30))


@pytest.fixture(scope="module")
def chain():
    schedule = DDPMSchedule(1000)
    return schedule, GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)


class AcceptedPerRound:
    """The observer example of docs/speculative.md: keeps each round's accepted drafts as tensors."""

    def __init__(self):
        self.accepted, self.windows, self.host_steps = [], [], 0

    def on_round_end(self, record):
        self.accepted.append(record.accepted.sum())
        self.windows.append(record.lengths.sum())
        self.host_steps += record.host.advanced


def test_a_user_observer_sees_every_round(chain):
    schedule, model = chain
    observer = AcceptedPerRound()
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS, drafter=FreeDrafter(),
                                window=4, batch_size=7, callbacks=[observer])
    stats = result.stats
    assert len(observer.accepted) == stats.rounds
    assert int(sum(observer.accepted)) == stats.accepted_steps  # the same transitions the stats count
    assert int(sum(observer.windows)) == stats.drafted_steps
    assert observer.host_steps == NUM_STEPS * len(SEEDS)  # every chain commits every step once


class ShrinkingWindow(WindowPolicy):
    """A policy that drafts 4 steps in a chain's first rounds and 1 after any round that rejected."""

    def start(self, plan, capacity, device):
        super().start(plan, capacity, device)
        self.rejected = False
        return 4

    def windows(self, slots, steps, ready):
        return self.steps_left(steps).clamp(min=0, max=1 if self.rejected else 4) * ready

    def on_round_end(self, record):
        self.rejected = self.rejected or bool((record.accepted < record.lengths).any())


def test_a_window_policy_chooses_the_windows_and_observes_rounds(chain):
    schedule, model = chain
    policy = ShrinkingWindow()
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS, drafter=FreeDrafter(),
                                window=policy)
    fixed = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS, drafter=FreeDrafter(), window=4)
    assert policy.rejected and result.stats.window == "ShrinkingWindow"
    assert result.stats.rounds > fixed.stats.rounds  # windows of 1 after the first rejection


def test_window_policy_and_verifier_options_are_validated():
    for bad in (0, 2.5, True, 1 << 15):
        with pytest.raises(ValueError, match="window"):
            FixedWindow(bad)
    assert parse_verifier("tokenwise").name == "tokenwise-reflection"
    assert parse_verifier("tokenwise", "residual").name == parse_verifier("tokenwise-residual").name == "tokenwise-residual"
    assert parse_verifier("block").name == "block"
    with pytest.raises(ValueError, match="verifier: expected one of"):
        parse_verifier("tokenwise-mirror")
    with pytest.raises(ValueError, match="applies to verifier='tokenwise' only"):
        parse_verifier("tokenwise-residual", "reflection")
    with pytest.raises(ValueError, match="correction: expected one of"):
        parse_verifier("tokenwise", "mirror")


def test_named_verifiers_give_the_same_samples_as_their_options(chain):
    schedule, model = chain
    run = lambda **kw: speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS[:8],  # noqa: E731
                                          drafter=FreeDrafter(), window=3, **kw)
    by_name = run(verifier="tokenwise-residual")
    assert by_name.stats.verifier == "tokenwise-residual"
    assert torch.equal(by_name.samples, run(verifier="tokenwise", correction="residual").samples)


def test_stats_are_typed_merge_and_read_like_a_dict(chain):
    schedule, model = chain
    run = lambda seeds: speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=seeds,  # noqa: E731
                                           drafter=FreeDrafter(), window=4).stats
    whole, first, second = run(SEEDS), run(SEEDS[:10]), run(SEEDS[10:])
    merged = SamplingStats.merge([first, second])
    assert merged.num_samples == whole.num_samples
    assert merged.target_calls_per_sample == pytest.approx(whole.target_calls_per_sample)
    assert merged.drafted_per_step == whole.drafted_per_step and merged.accepted_per_step == whole.accepted_per_step
    assert merged.acceptance_rate == pytest.approx(whole.acceptance_rate)
    assert merged.speedup == pytest.approx(NUM_STEPS / whole.target_calls_per_sample)
    assert whole["speedup"] == whole.speedup and whole.as_dict()["mean_steps_per_round"] == whole.mean_steps_per_round
    with pytest.raises(KeyError):
        whole["no_such_field"]


def test_ancestral_sampling_returns_its_stats_on_request(chain):
    schedule, model = chain
    plain = ancestral_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS, batch_size=8)
    result = ancestral_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=SEEDS, batch_size=8, return_stats=True)
    assert torch.equal(plain, result.samples)
    stats = result.stats
    assert stats.target_calls_per_sample == NUM_STEPS and stats.speedup == 1.0 and stats.rounds == 4 * NUM_STEPS
    assert stats.drafted_steps == 0 and math.isnan(stats.acceptance_rate) and stats.wall_clock_s > 0


def test_a_shape_unlike_the_targets_is_one_clear_error():
    schedule = DDPMSchedule(100)
    model = TinyDenoiser()  # sample_shape (2,)
    for sample in (lambda: ancestral_sample(model, schedule, (3,), num_steps=5, seeds=[0]),
                   lambda: speculative_sample(model, schedule, (1, 2), num_steps=5, seeds=[0], drafter=FreeDrafter())):
        with pytest.raises(ValueError, match=r"shape: \(.*\) differs from the target's sample_shape \(2,\)"):
            sample()


def test_heuristic_window_grows_by_two_after_full_acceptance_and_shrinks_by_one_after_a_rejection():
    from specdiff_train.speculative.windows import HeuristicWindow

    policy = HeuristicWindow(initial=4, max_window=8)
    assert policy.start(DDPMSchedule(1000).plan(20), capacity=3, device="cpu") == 8
    slots, steps, ready = torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool)
    assert policy.windows(slots, steps, ready).tolist() == [4, 4, 4]
    # chain 0 accepted all 4, chain 1 rejected at the 2nd draft, chain 2 took a plain step (window 0)
    policy.learn(slots, steps, torch.tensor([4, 4, 0]), torch.tensor([4, 1, 0]))
    assert policy.windows(slots, steps, ready).tolist() == [6, 3, 4]
    for _ in range(3):  # capped at max_window; never below 1
        policy.learn(slots, steps, torch.tensor([6, 3, 4]), torch.tensor([6, 0, 0]))
    assert policy.window.tolist() == [8, 1, 1]
    late = torch.tensor([17, 0, 18])  # 2, 19 and 1 stochastic steps left
    assert policy.windows(slots, late, ready).tolist() == [2, 1, 1]
    assert policy.windows(slots, steps, torch.tensor([True, False, True])).tolist() == [8, 0, 1]
    policy.join(torch.tensor([0]))  # a new chain in slot 0 starts over
    assert policy.window.tolist() == [4, 1, 1]
    for bad in (dict(initial=0), dict(max_window=0), dict(initial=9, max_window=8)):
        with pytest.raises(ValueError, match="initial|max_window"):
            HeuristicWindow(**bad)
