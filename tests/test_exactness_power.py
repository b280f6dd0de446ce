"""Exactness tests with power at every step of the chain (issue 10, items 1-2).

The output of the closed-form chain of test_speculative_exactness.py (data variance 0.05, 20 steps)
forgets its early states: it depends on the state after step 0 with a gain of ~0.001 and on the
state after step 10 with ~0.03. A wrong rule confined to the early steps (or to the last stochastic
step, whose std is ~0.01) leaves the output law almost unchanged. Here the sampler runs with a
`TransitionRecorder` verifier that sees every transition of every chain, and each step is tested:
the state after step k against its closed-form marginal, and the standardised increment
(Y_{k+1} - mu_P(k, Y_k)) / s_k against N(0, I). Each known-wrong rule is shown to be detected.

The verifier-level tests check block verification on a window whose FIRST draft is already biased,
against the target's own ancestral path law (computed without the verifier's formulas), and the
weighted residual with w < 1 inside `verify_block` against an independent inverse CDF.
"""
from functools import lru_cache, partial

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.speculative import speculative_sample
from specdiff_train.speculative.costs import CostModel
from specdiff_train.speculative.windows import CostAwareWindow, HeuristicWindow, WindowPolicy
from specdiff_train.speculative.verify import verify_block, verify_tokenwise, weighted_residual_correction
from specdiff_train.testing import (
    GaussianDataDenoiser,
    TransitionRecorder,
    closed_form_marginals,
    marginal_test,
    path_test,
    reflection_instead_of_residual,
    sample_residual,
)

from test_speculative_exactness import BiasedDrafter

NUM_SAMPLES = 10_000
NUM_STEPS = 20
DATA_MEAN, DATA_VAR = torch.tensor([1.5, -1.0]), 0.05
WINDOW = 4


@lru_cache(maxsize=1)
def _chain():
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    plan = schedule.plan(NUM_STEPS)
    means, variances = closed_form_marginals(schedule, NUM_STEPS, DATA_MEAN, DATA_VAR)
    return schedule, model, plan, means, variances


def early_step_reflection(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    """WRONG: a reflection instead of the weighted residual wherever the step std exceeds 0.5 (the
    first 12 of 20 steps), the exact correction elsewhere."""
    exact = weighted_residual_correction(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known)
    wrong = reflection_instead_of_residual(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known)
    return torch.where((std > 0.5).unsqueeze(-1), wrong.to(exact.dtype), exact)


def unweighted_residual(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    """WRONG: the residual (P - Q)_+ without the weight w_tau."""
    return sample_residual(mu_p, mu_q, std, xi, u)


def scaled_last_step_draft(factor: float):
    """Rewrites a round's inputs so that the draft at the last stochastic step is X = mu_Q + factor s Z
    while verification keeps assuming Q = N(mu_Q, s^2): the accept test evaluates log P/Q at the real
    X with std s, and the next row's target mean is recomputed at the real X. factor = 1 is the exact
    rule (a control for the rewriting itself); factor = 2 is the known-wrong doubled draft std."""
    schedule, model, plan, *_ = _chain()
    last = plan.num_stochastic_steps - 1
    table = plan.std.double()

    def perturb(args):
        n = (args["stds"][:, :1].double() - table).abs().argmin(dim=1)
        noise, states, target_means = (args[k].clone() for k in ("noise", "states", "target_means"))
        for i in range(1, noise.shape[1] + 1):  # X_i is drafted for step n + i - 1
            rows = ((n + i - 1 == last) & (i <= args["lengths"])).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            noise[rows, i - 1] = factor * noise[rows, i - 1]
            s = args["stds"][rows, i - 1].to(states.dtype).unsqueeze(-1)
            x = args["draft_means"][rows, i - 1] + s * noise[rows, i - 1]
            states[rows, i] = x
            k = torch.full((len(rows),), last + 1)
            with torch.no_grad():
                mean, _ = plan.transition(x, k, model(x, plan.t(k)))
            target_means[rows, i] = mean.to(target_means.dtype)
        return args | dict(noise=noise, states=states, target_means=target_means)

    return perturb


def window_chosen_after_verification(noise, states, draft_means, target_means, stds, lengths, has_next, accept_u,
                                     xi, residual_u, **kwargs):
    """WRONG: the window chosen from the round's own verification (a policy that peeks at the target's
    outputs of the round it chooses for): each chain's window is cut to the drafts that pass, so no
    round ever corrects; the step after the last passing draft is a plain target step instead."""
    passed = verify_block(noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi,
                          residual_u).accepted
    step_follows = (passed < lengths) | has_next
    return verify_block(noise, states, draft_means, target_means, stds, passed, step_follows, accept_u, xi, residual_u,
                        **kwargs)


RULES = {
    "block": (verify_block, None),
    "tokenwise-reflection": (partial(verify_tokenwise, correction="reflection"), None),
    "block-last-step-rewritten-x1": (verify_block, 1.0),
    "early-step-reflection": (partial(verify_block, correction=early_step_reflection), None),
    "unweighted-residual": (partial(verify_block, correction=unweighted_residual), None),
    "doubled-last-step-draft-std": (verify_block, 2.0),
    "window-chosen-after-verification": (window_chosen_after_verification, None),
}


class ErraticWindow(WindowPolicy):
    """Windows drawn at random for every chain and round, 0 (a plain target step) to `longest`, from a
    generator that only the past has advanced: erratic, but never a function of the round it chooses for."""

    def __init__(self, longest: int):
        self.longest = longest

    def start(self, plan, capacity, device):
        super().start(plan, capacity, device)
        self.generator = torch.Generator().manual_seed(7)
        return self.longest

    def windows(self, slots, steps, ready):
        drawn = torch.randint(0, self.longest + 1, (len(slots),), generator=self.generator)
        return torch.minimum(drawn, self.steps_left(steps).clamp(min=0)) * ready


# The cost-aware policy with a cost model that makes its windows move between 0 and 4 along the run
# (2500 chains: 2 on ~half the rounds, 1 on a third, 3 or 4 on the rest, a plain step once).
AUTO_COSTS = CostModel(target_rows=(2500, 5000, 12500), target_s=(1.0, 1.1, 1.8), round_s=0.1)
POLICIES = {None: lambda: WINDOW, "heuristic": lambda: HeuristicWindow(initial=2, max_window=WINDOW),
            "erratic": lambda: ErraticWindow(WINDOW),
            "auto": lambda: CostAwareWindow(max_window=WINDOW, cost_model=AUTO_COSTS)}


@lru_cache(maxsize=None)
def _run(rule: str, rounds_of_noise: int | None = None, policy: str | None = None):
    """`rounds_of_noise`: refill every chain's noise after that many rounds (default: the sampler's buffer,
    64 rounds ahead here, which these chains never exhaust). `policy`: a window policy of `POLICIES`
    (default: the fixed window WINDOW)."""
    schedule, model, plan, means, variances = _chain()
    verify, factor = RULES[rule]
    recorder = TransitionRecorder(verify, plan, None if factor is None else scaled_last_step_draft(factor))
    buffer = {} if rounds_of_noise is None else dict(noise_buffer=rounds_of_noise * 2500 * (WINDOW + 1) * 2)
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES),
                                drafter=BiasedDrafter(), window=POLICIES[policy](), verifier=recorder,
                                batch_size=2500, **buffer)
    report = path_test(recorder, means, variances)
    output = marginal_test(result.samples, means[-1], variances[-1])
    return recorder, result, report, output


def assert_path_exact(report):
    assert report["samples_per_step"] == (NUM_SAMPLES, NUM_SAMPLES), report  # every chain, every step, once
    for key in ("mean_z", "var_z", "inc_mean_z", "inc_var_z"):
        assert report[key] < 4.5, report
    assert report["ks_p"] > 1e-4 and report["inc_ks_p"] > 1e-4, report


def test_closed_form_chain_forgets_its_early_states():
    """Why the path is tested (schedule maths, no sampler): the output's sensitivity to the state after
    step k, in closed form."""
    schedule, *_ = _chain()
    plan = schedule.plan(NUM_STEPS)
    abar = schedule.alphas_cumprod[plan.timesteps]
    gain = (1 - abar).sqrt() / (abar * DATA_VAR + 1 - abar)
    slope = plan.coef_x0 * (1 - (1 - abar).sqrt() * gain) / abar.sqrt() + plan.coef_xt
    to_output = torch.flip(torch.cumprod(torch.flip(slope, [0]), 0), [0])  # product of slopes k..N-1
    assert to_output[1] < 0.002 and to_output[11] < 0.05  # after step 0, after step 10
    assert plan.std[plan.num_stochastic_steps - 1] < 0.02  # the last stochastic step barely moves the output


@pytest.mark.parametrize("rule", [
    "block",
    "block-last-step-rewritten-x1",
    pytest.param("tokenwise-reflection", marks=pytest.mark.slow),  # keeps the fast suite's added time ~50 s
])
def test_every_step_of_the_path_is_exact(rule):
    recorder, result, report, output = _run(rule)
    assert_path_exact(report)
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output
    assert 0.1 < result.stats["acceptance_rate"] < 0.9  # both branches, at every step
    # the recorder sees the chains' real path: its last states are the samples
    steps, after, _ = recorder.by_step()
    final = after[steps == NUM_STEPS - 1]
    assert torch.equal(final[:, 0].sort().values, result.samples[:, 0].double().sort().values)


@pytest.mark.parametrize("rule,rounds_of_noise", [
    ("block", 1),
    ("block", 3),
    pytest.param("tokenwise-reflection", 1, marks=pytest.mark.slow),
])
def test_every_step_of_the_path_is_exact_when_noise_is_refilled(rule, rounds_of_noise):
    """Chains admitted mid-run (10^4 seeds through 2500 slots) that refill their noise every round, or
    every third round (then rounds read their noise at every offset of the buffer)."""
    recorder, result, report, output = _run(rule, rounds_of_noise)
    assert_path_exact(report)
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output


@pytest.mark.parametrize("policy", ["auto", "heuristic", "erratic"])
def test_every_step_of_the_path_is_exact_with_adaptive_windows(policy):
    """A chain's window may depend on anything before its round (ALGORITHMS.md section 10): the
    cost-aware policy (windows from past pass rates), the transformers-style heuristic and windows
    drawn at random keep every step's law."""
    recorder, result, report, output = _run("block", None, policy)
    assert_path_exact(report)
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output
    assert result.stats.window == POLICIES[policy]().describe()
    assert result.stats.rounds != _run("block")[1].stats.rounds  # the windows really differed from the fixed ones


def test_output_test_alone_misses_a_wrong_rule_confined_to_early_steps():
    """The sampler run behind the previous test's numbers: a reflection instead of the weighted residual at
    the first 12 steps leaves the output law within the output test's thresholds; only the path catches it."""
    recorder, result, report, output = _run("early-step-reflection")
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output
    assert min(report["ks_p"], report["inc_ks_p"]) < 1e-6, report


@pytest.mark.parametrize("rule,where", [
    ("early-step-reflection", range(0, 12)),  # std > 0.5 at steps 0..11
    ("unweighted-residual", range(0, NUM_STEPS)),
    ("doubled-last-step-draft-std", [NUM_STEPS - 2]),
    ("window-chosen-after-verification", range(0, NUM_STEPS)),
])
def test_known_wrong_rules_are_detected_on_the_path(rule, where):
    recorder, result, report, output = _run(rule)
    assert report["samples_per_step"] == (NUM_SAMPLES, NUM_SAMPLES)
    worst = min(report["ks_p"], report["inc_ks_p"])
    assert worst < 1e-6, report
    step = report["ks_p_step"] if report["ks_p"] < report["inc_ks_p"] else report["inc_ks_p_step"]
    assert step in where, report
