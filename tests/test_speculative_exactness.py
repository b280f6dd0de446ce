"""Whole-chain exactness of speculative sampling on a closed-form chain (ALGORITHMS.md 7).

Data ~ N(m, v I) gives an exact eps predictor, so the law of the sampler's output is known. Every
verifier x drafter x window must reproduce it; wrong rules must be caught. Seeds are fixed, so each
test is deterministic; thresholds are Bonferroni-safe for a correct rule and far below what the
known wrong rules produce.
"""
from functools import partial

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FreeDrafter, FrozenTargetDrafter, speculative_sample
from specdiff_train.drafters import training_free_drafters
from specdiff_train.speculative.verify import verify_block, verify_tokenwise
from specdiff_train.testing import (
    GaussianDataDenoiser,
    closed_form_marginal,
    marginal_test,
    reflection_instead_of_residual,
    sample_residual,
)

NUM_SAMPLES = 10_000
NUM_STEPS = 20
DATA_MEAN, DATA_VAR = torch.tensor([1.5, -1.0]), 0.05

VERIFIERS = {
    "block": dict(verifier="block"),
    "tokenwise-reflection": dict(verifier="tokenwise", correction="reflection"),
    "tokenwise-residual": dict(verifier="tokenwise", correction="residual"),
}
class BiasedDrafter(FrozenTargetDrafter):
    """The frozen-target draft pushed one std off along the first axis: rejections with small
    weights w are common, so a wrong correction shows in the output law."""

    def propose(self, slots, x, k):
        mean = super().propose(slots, x, k).clone()
        mean[:, 0] += self.plan.std_at(k).to(mean.dtype)
        return mean


DRAFTERS = training_free_drafters() | {"biased": BiasedDrafter}


@pytest.fixture(scope="module")
def chain():
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    mean, var = closed_form_marginal(schedule, NUM_STEPS, DATA_MEAN, DATA_VAR)
    return schedule, model, mean.expand(2), var.expand(2)


def assert_exact(samples, mean, var):
    report = marginal_test(samples, mean, var)
    assert report["mean_z"] < 4.5, report
    assert report["var_z"] < 4.5, report
    assert report["ks_p"] > 1e-4, report
    return report


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("drafter", list(DRAFTERS))
@pytest.mark.parametrize("verifier", list(VERIFIERS))
def test_speculative_sampling_is_exact(chain, verifier, drafter, window):
    schedule, model, mean, var = chain
    result = speculative_sample(
        model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES), drafter=DRAFTERS[drafter](),
        window=window, batch_size=2500, **VERIFIERS[verifier],
    )
    assert_exact(result.samples, mean, var)
    stats = result.stats
    if drafter.startswith("frozen") and window == 1:
        # the only draft is the target's own step (up to float rounding between batch sizes)
        assert stats["acceptance_rate"] > 0.999
    else:
        assert 0 < stats["acceptance_rate"] < 0.99  # accept and reject branches both exercised
    # window 8 over 20 steps: windows are cut at the end of the chain
    assert stats["mean_steps_per_round"] <= window + 1
    assert sum(stats["drafted_per_step"][NUM_STEPS - 1:]) == 0  # the deterministic last step is never drafted


def test_plain_ancestral_law_matches_closed_form(chain):
    schedule, model, mean, var = chain
    assert_exact(ancestral_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES)), mean, var)


@pytest.mark.parametrize("drafter", ["free-x0", "frozen-eps", "biased"])
@pytest.mark.parametrize("verifier", list(VERIFIERS))
def test_exact_when_noise_is_refilled_every_round(chain, verifier, drafter):
    """The default buffer holds 64 rounds, more than these chains need, so the runs above never refill;
    here every chain refills every round and chains are admitted mid-run (10^4 seeds through 2500 slots)."""
    schedule, model, mean, var = chain
    one_round = 2500 * (3 + 1) * 2  # slots x (window + 1) x sample size
    result = speculative_sample(
        model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES), drafter=DRAFTERS[drafter](), window=3,
        batch_size=2500, noise_buffer=one_round, **VERIFIERS[verifier],
    )
    assert result.stats["rounds_per_sample"] > 6  # several refills per chain
    assert_exact(result.samples, mean, var)


def test_plain_ancestral_law_with_noise_drawn_one_step_at_a_time(chain):
    schedule, model, mean, var = chain
    samples = ancestral_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES), batch_size=2500,
                               noise_buffer=1)
    assert_exact(samples, mean, var)


def _biased_run(chain, verifier):
    schedule, model, mean, var = chain
    result = speculative_sample(
        model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(2 * NUM_SAMPLES),
        drafter=BiasedDrafter(), window=8, verifier=verifier,
    )
    return marginal_test(result.samples, mean, var)


def test_detector_passes_the_exact_block_rule_in_the_same_setting(chain):
    report = _biased_run(chain, "block")
    assert report["ks_p"] > 1e-4 and report["mean_z"] < 4.5, report


def test_block_with_reflection_instead_of_weighted_residual_is_detected(chain):
    report = _biased_run(chain, partial(verify_block, correction=reflection_instead_of_residual))
    assert report["ks_p"] < 1e-6, report


def test_block_with_unweighted_residual_is_detected(chain):
    def unweighted(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
        return sample_residual(mu_p, mu_q, std, xi, u)

    report = _biased_run(chain, partial(verify_block, correction=unweighted))
    assert report["ks_p"] < 1e-6, report


def test_block_commits_at_least_as_many_steps_as_tokenwise(chain):
    schedule, model, *_ = chain
    for make in (FreeDrafter, FrozenTargetDrafter):
        runs = {
            name: speculative_sample(model, schedule, (2,), num_steps=100, seeds=range(4000), drafter=make(),
                                     window=8, **kwargs).stats
            for name, kwargs in VERIFIERS.items() if name != "tokenwise-residual"
        }
        block, token = runs["block"], runs["tokenwise-reflection"]
        assert block["mean_steps_per_round"] >= token["mean_steps_per_round"]
        assert block["target_calls_per_sample"] <= token["target_calls_per_sample"]


def test_samples_depend_only_on_their_seed(chain):
    schedule, model, *_ = chain
    kwargs = dict(num_steps=NUM_STEPS, drafter=FreeDrafter(), window=4)
    full = speculative_sample(model, schedule, (2,), seeds=list(range(64)), **kwargs).samples
    refilled = speculative_sample(model, schedule, (2,), seeds=list(range(64)), batch_size=5, **kwargs).samples
    chunked = speculative_sample(model, schedule, (2,), seeds=list(range(64)), batch_size=7, refill=False,
                                 **kwargs).samples
    alone = speculative_sample(model, schedule, (2,), seeds=[17], **kwargs).samples
    assert torch.equal(full, refilled) and torch.equal(full, chunked)
    assert torch.equal(full[17:18], alone)


def test_speculative_sampling_costs_fewer_sequential_calls(chain):
    schedule, model, *_ = chain
    stats = speculative_sample(model, schedule, (2,), num_steps=100, seeds=range(500), drafter=FreeDrafter(),
                               window=8).stats
    assert stats["target_calls_per_sample"] < 50  # at least 2x fewer than ancestral (100)
    assert stats["speedup"] == pytest.approx(100 / stats["target_calls_per_sample"])
    assert len(stats["accepted_per_step"]) == 100


class WrongShapeDrafter(FreeDrafter):
    def propose(self, slots, x, k):
        return super().propose(slots, x, k)[:, :1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), "window"),
        (dict(window=2.5), "window"),
        (dict(verifier="greedy"), "verifier"),
        (dict(correction="mirror", verifier="tokenwise"), "correction"),
        (dict(correction="residual", verifier="block"), "applies to verifier='tokenwise' only"),
        (dict(num_steps=1), r"no stochastic step.*speculative sampling needs noise: use num_steps >= 2"),
        (dict(drafter=object()), "drafter"),
        (dict(drafter=WrongShapeDrafter()), "shape"),
    ],
)
def test_bad_input_gets_a_clear_error(chain, kwargs, match):
    schedule, model, *_ = chain
    args = dict(num_steps=10, seeds=[0, 1], drafter=FreeDrafter(), window=3) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        speculative_sample(model, schedule, (2,), **args)


def test_drafter_options_are_validated():
    with pytest.raises(ValueError, match="freeze"):
        FreeDrafter(freeze="score")


class BFloat16Denoiser(torch.nn.Module):
    """The closed-form denoiser as a bfloat16 network: bf16 weights (the sampler then feeds it bf16
    inputs) and a bf16 output."""

    def __init__(self, base):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16), requires_grad=False)
        self.base = base

    def forward(self, x, t):
        assert x.dtype == torch.bfloat16, "the network is called in its own dtype"
        return (self.base(x.float(), t) * self.scale.float()).to(torch.bfloat16)


@pytest.mark.parametrize("verifier", list(VERIFIERS))
def test_half_precision_target_keeps_float32_states_and_the_target_law(chain, verifier):
    """Only the network's inputs and outputs are rounded: drafts, verification and samples stay float32,
    and speculative sampling has the law of ancestral sampling with the same bf16 network (other seeds)."""
    from scipy import stats

    schedule, model, *_ = chain
    half = BFloat16Denoiser(model)
    spec = speculative_sample(half, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES), window=8,
                              drafter=FreeDrafter("x0"), batch_size=2500, **VERIFIERS[verifier]).samples
    reference = ancestral_sample(half, schedule, (2,), num_steps=NUM_STEPS, batch_size=2500,
                                 seeds=range(10 * NUM_SAMPLES, 11 * NUM_SAMPLES))
    assert spec.dtype == reference.dtype == torch.float32
    for j in range(2):
        assert stats.ks_2samp(spec[:, j].numpy(), reference[:, j].numpy()).pvalue > 1e-4
        z = (spec[:, j].mean() - reference[:, j].mean()) / (spec[:, j].var() / NUM_SAMPLES * 2).sqrt()
        assert abs(z) < 4.5

