"""Exactness of speculative sampling for every sampler family of ALGORITHMS.md section 8, at every step.

With data ~ N(m, v I) the denoised estimate is affine in the state for every schedule (`testing.gaussian_denoised`),
so DDIM with eta (DDPM-trained target), Euler-ancestral on Karras sigmas (EDM target, starting at sigma_max z) and
flow-matching Euler-Maruyama with churn are all linear-Gaussian chains whose marginal after each step is known
(`testing.closed_form_marginals(..., chain=...)`; checked against the plain sampler and against the forward process
in test_chains.py). As in test_exactness_power.py and test_guidance_exactness.py, a `PathObserver` watches every
transition of 10^4 chains (20 steps, window 4, every seed in its own slot): at each step the states against the
closed-form marginal and the standardised increments (Y_{k+1} - mu_P(k, Y_k)) / s_k against N(0, I) (mean,
variance and KS). The drafter's first draft is pushed one std off along the first axis, so that the accept and the
correction branches are both taken at every step. Every verifier x every training-free drafter x family; the
thresholds are those of test_guidance_exactness.py (as many runs). The fast suite's run of each family has 10^4
chains, as the other exactness tests; the slow grid's other runs 5000 (`GRID_SAMPLES`, to keep the file near a
minute of CPU: at 10^4 the grid alone takes ~130 s), which still resolves a KS distance of ~0.035 at p = 1e-5 at
every step.

The known-wrong rule: a verifier handed another plan's per-step std (DDPM ancestral's in an EDM Euler-ancestral
chain, DDIM(eta=1)'s in a DDIM(eta=0.5) chain), the drafts still drawn with the right one, is detected (KS p-values
below 1e-12 at 2500 chains); the same wrapper handed the plan's own std is exact (a control for the wrapper).

The fast suite runs one verifier x drafter per family (each verifier, five of the six drafters); `-m slow` the
whole grid (5 families x 3 verifiers x 6 drafters) and the wrong rule under every verifier.
"""
from functools import partial

import pytest
import torch

from specdiff_train.chains import DDIM, DDPMAncestral, DDPMSchedule, EDMSchedule, EulerAncestral, FlowEulerMaruyama, \
    FlowSchedule
from specdiff_train.drafters import training_free_drafters
from specdiff_train.speculative import speculative_sample
from specdiff_train.speculative.verify import verify_block, verify_tokenwise
from specdiff_train.testing import GaussianDataDenoiser, PathObserver, closed_form_marginals, path_test

from test_guidance_exactness import biased_drafter

NUM_SAMPLES = 10_000
GRID_SAMPLES = 5_000  # the slow grid's other 85 runs: ~1.5 s of CPU each at 10^4 chains would be ~130 s in all
WRONG_RULE_SAMPLES = 2_500
NUM_STEPS = 20
WINDOW = 4
DATA_MEAN, DATA_VAR = torch.tensor([1.5, -1.0]), 0.05
FAMILIES = {
    "ddim-1": (DDPMSchedule(1000), DDIM(1.0)),
    "ddim-0.5": (DDPMSchedule(1000, prediction="x0"), DDIM(0.5)),
    "euler-ancestral-1": (EDMSchedule(), EulerAncestral(1.0)),
    "euler-ancestral-0.5": (EDMSchedule(), EulerAncestral(0.5)),
    "flow-em-1": (FlowSchedule(), FlowEulerMaruyama(1.0)),
}
VERIFIERS = {"block": verify_block, "tokenwise-reflection": partial(verify_tokenwise, correction="reflection"),
             "tokenwise-residual": partial(verify_tokenwise, correction="residual")}
DRAFTERS = tuple(training_free_drafters())
FAST = {("ddim-1", "block", "frozen-eps"), ("ddim-0.5", "tokenwise-reflection", "free-x0"),
        ("euler-ancestral-1", "tokenwise-residual", "free-increment"),
        ("euler-ancestral-0.5", "tokenwise-reflection", "frozen-increment"), ("flow-em-1", "block", "free-eps")}


def family(name: str):
    """(schedule, chain, closed-form target model, plan, (means, variances) after every step)."""
    schedule, chain = FAMILIES[name]
    return (schedule, chain, GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR), schedule.plan(NUM_STEPS, chain),
            closed_form_marginals(schedule, NUM_STEPS, DATA_MEAN, DATA_VAR, chain=chain))


def run(name: str, verifier, drafter: str, num_samples: int = NUM_SAMPLES):
    """Speculative sampling of the family's chain, every transition watched: (result, path report, observer)."""
    schedule, chain, model, plan, (means, variances) = family(name)
    observer = PathObserver(plan)
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(num_samples),
                                drafter=biased_drafter(drafter), window=WINDOW, verifier=verifier, callbacks=[observer],
                                chain=chain)
    return result, path_test(observer, means, variances), observer


def assert_path_exact(report, num_samples: int = NUM_SAMPLES):
    assert report["samples_per_step"] == (num_samples, num_samples), report  # every chain, every step, once
    for key in ("mean_z", "var_z", "inc_mean_z", "inc_var_z"):
        assert report[key] < 5.0, report
    assert report["ks_p"] > 1e-5 and report["inc_ks_p"] > 1e-5, report


def worst_p(report) -> float:
    return min(report["ks_p"], report["inc_ks_p"])


def _grid():
    for name in FAMILIES:
        for verifier in VERIFIERS:
            for drafter in DRAFTERS:
                key = (name, verifier, drafter)
                marks = [] if key in FAST else [pytest.mark.slow]
                yield pytest.param(*key, marks=marks, id="-".join(key))


@pytest.mark.parametrize("name,verifier,drafter", list(_grid()))
def test_speculative_sampling_of_every_chain_is_exact_at_every_step(name, verifier, drafter):
    num_samples = NUM_SAMPLES if (name, verifier, drafter) in FAST else GRID_SAMPLES
    result, report, observer = run(name, verifier, drafter, num_samples)
    assert_path_exact(report, num_samples)
    assert 0.05 < result.stats["acceptance_rate"] < 0.95, result.stats  # both branches, the first draft biased
    steps, after, _ = observer.by_step()  # the observer saw the chains' real paths, seed i in slot i
    slots, last = observer.slots_by_step(), steps == NUM_STEPS - 1
    assert torch.equal(after[last], result.samples[slots[last]].double())


# --- the known-wrong rule: another plan's std --------------------------------------------------------------------
class OtherPlanStd:
    """A verifier (the signature of `verify.verify_block`) that runs `verify` with each row's std taken from
    `other` (a plan of as many steps) at the same step, while the engine drew the drafts and computed the means with
    the right plan's. WRONG unless `other` is the plan itself (the control). The step of each chain is read from its
    round's first std (the plan's stds are distinct: checked)."""

    __name__ = "other-plan-std"

    def __init__(self, plan, other, verify):
        assert other.num_steps == plan.num_steps and len(plan.std.unique()) == plan.num_steps
        self.plan, self.other, self.verify = plan, other, verify
        self.calls = 0

    def __call__(self, noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
                 **kwargs):
        table = self.plan.std.to(stds.device, torch.float64)
        n = (stds[:, :1].double() - table).abs().argmin(dim=1)
        assert torch.equal(table[n], stds[:, 0].double())  # the engine's stds are the plan's
        k = (n.unsqueeze(1) + torch.arange(stds.shape[1], device=n.device)).clamp(max=self.plan.num_steps - 1)
        assert torch.equal(table[k], stds.double())
        other = self.other.std.to(stds.device, stds.dtype)[k]
        self.calls += 1
        return self.verify(noise, states, draft_means, target_means, other, lengths, has_next, accept_u, xi, residual_u,
                           **kwargs)


WRONG_STDS = {  # family -> the plan whose stds the wrong verifier is handed
    "euler-ancestral-1": lambda: DDPMSchedule(1000).plan(NUM_STEPS, DDPMAncestral()),
    "ddim-0.5": lambda: DDPMSchedule(1000, prediction="x0").plan(NUM_STEPS, DDIM(1.0)),
}


@pytest.mark.parametrize("name,verifier", [
    ("euler-ancestral-1", "block"),
    pytest.param("euler-ancestral-1", "tokenwise-reflection", marks=pytest.mark.slow),
    pytest.param("euler-ancestral-1", "tokenwise-residual", marks=pytest.mark.slow),
    ("ddim-0.5", "block"),
    pytest.param("ddim-0.5", "tokenwise-reflection", marks=pytest.mark.slow),
])
def test_a_verifier_with_another_plans_std_is_detected(name, verifier):
    """DDPM's per-step std in an EDM chain (or DDIM(eta=1)'s in an eta = 0.5 chain): wrong at every stochastic step."""
    plan = family(name)[3]
    wrong = OtherPlanStd(plan, WRONG_STDS[name](), VERIFIERS[verifier])
    result, report, _ = run(name, wrong, "frozen-eps", WRONG_RULE_SAMPLES)
    assert wrong.calls > 0 and report["samples_per_step"] == (WRONG_RULE_SAMPLES, WRONG_RULE_SAMPLES)
    assert worst_p(report) < 1e-12, report
    assert max(report["inc_var_z"], report["inc_mean_z"]) > 10, report


def test_the_std_rewriting_alone_changes_nothing():
    """Control for `OtherPlanStd`: handed the plan's own stds it is the exact block verifier (10^4 chains, EDM)."""
    plan = family("euler-ancestral-1")[3]
    control = OtherPlanStd(plan, plan, verify_block)
    result, report, _ = run("euler-ancestral-1", control, "frozen-eps")
    assert control.calls > 0
    assert_path_exact(report)
    assert 0.05 < result.stats["acceptance_rate"] < 0.95
