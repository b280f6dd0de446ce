"""Exactness of classifier-free guided sampling at every step of the chain (ALGORITHMS.md sections 7 and 9).

`GuidedGaussianDenoiser` gives each class c the exact predictor for data ~ N(m_c, v I) and the null label
the exact one for the classes' pooled Gaussian, so the guided prediction uncond + s (cond - uncond) is
linear in x_t and the guided ancestral chain is linear-Gaussian: `guided_closed_form_marginals` gives the
law of the state after every step, for every label (checked here against a plain simulation first).

Speculative sampling must be exact with respect to the *guided* ancestral sampler, whatever the verifier
and drafter. The chains (10^4, labels 0, 1, 2 and None mixed, every seed in its own slot) are watched by a
`PathObserver`: at each step the states, standardised by their own label's closed-form marginal, and the
standardised increments (Y_{k+1} - mu_P(k, Y_k)) / s_k must be N(0, I) (mean, variance and KS, pooled, and
mean and variance per label). Every drafter's first draft is pushed one std off, so that both the accept
and the correction branch are taken at every step. The known-wrong rules are shown to fail: the guidance
formula cond + s (cond - uncond), a correction drawn around the unguided conditional means, and correct
guided samples held against the unguided chain's marginals.

The fast suite runs 5 of the 54 verifier x drafter x scale runs (each verifier at scale 3, one run at
scale 0 and one at scale 1, five drafters); `-m slow` runs the whole grid (3 verifiers x 6 training-free
drafters x scales 0, 1, 3) and every verifier under the wrong-correction rule.
"""
from functools import lru_cache
from unittest import mock

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.drafters import training_free_drafters
from specdiff_train.guidance import NULL_LABEL, call_network, guided_output
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import engine, speculative_sample
from specdiff_train.speculative.coupling import reflect, sample_weighted_residual, scaled_mean_difference
from specdiff_train.speculative.verify import (
    COMPACT_MIN_CHAINS,
    verify_block,
    verify_tokenwise,
    weighted_residual_correction,
)
from specdiff_train.testing import (
    GuidedGaussianDenoiser,
    PathObserver,
    guided_closed_form_marginals,
    marginal_test,
    path_test_by_slot,
)

NUM_SAMPLES = 10_000
WRONG_RULE_SAMPLES = 2_500  # enough for the known-wrong rules: KS p-values below 1e-90 at the worst step
NUM_STEPS = 20
WINDOW = 4
CLASS_MEANS = torch.tensor([[1.5, -1.0], [-1.0, 0.5], [0.25, 1.25]])
CLASS_VAR = 0.05
NULL_MEAN = CLASS_MEANS.mean(0)  # the null branch: the pooled Gaussian of the three classes
NULL_VAR = CLASS_VAR + CLASS_MEANS.var(0, unbiased=False)
LABELS = [(0, 1, 2, None)[i % 4] for i in range(NUM_SAMPLES)]  # None: an unconditional sample
GROUPS = torch.tensor([NULL_LABEL if label is None else label for label in LABELS])
SCALES = (0.0, 1.0, 3.0)
VERIFIERS = ("block", "tokenwise-reflection", "tokenwise-residual")
# One run per verifier at scale 3 and one per other scale in the fast suite (each drafter kind once).
FAST = {("block", "frozen-eps", 3.0), ("tokenwise-reflection", "free-x0", 3.0),
        ("tokenwise-residual", "free-increment", 3.0), ("block", "free-eps", 0.0),
        ("tokenwise-reflection", "frozen-x0", 1.0)}


class FirstDraftBiased:
    """Mixin for a training-free drafter: the first draft of every window pushed one std off along the first
    axis (for the frozen-target drafters it would otherwise be the target's own step, always accepted)."""

    def propose_step(self, slots, x, step):
        mean = super().propose_step(slots, x, step)
        if step.index > 0:
            return mean
        mean = mean.clone()
        mean[:, 0] += self.plan.std_at(step.k).to(mean.dtype)
        return mean

    def describe(self) -> str:
        return "first-draft-biased " + super().describe()


def biased_drafter(name: str):
    drafter = training_free_drafters()[name]()
    return type(f"FirstDraftBiased{type(drafter).__name__}", (FirstDraftBiased, type(drafter)), {})(drafter.freeze)


DRAFTERS = tuple(training_free_drafters())


@lru_cache(maxsize=None)
def _chain(prediction: str = "eps"):
    schedule = DDPMSchedule(1000, prediction=prediction)
    return schedule, GuidedGaussianDenoiser(schedule, CLASS_MEANS, CLASS_VAR, NULL_MEAN, NULL_VAR)


def label_marginals(scale: float, label, prediction: str = "eps"):
    """Closed-form (means, variances) (NUM_STEPS, 2) of the guided chain of one label (None: unconditional)."""
    schedule, _ = _chain(prediction)
    if label is None or label == NULL_LABEL:
        return guided_closed_form_marginals(schedule, NUM_STEPS, NULL_MEAN, NULL_VAR, NULL_MEAN, NULL_VAR, scale)
    return guided_closed_form_marginals(schedule, NUM_STEPS, CLASS_MEANS[label], CLASS_VAR, NULL_MEAN, NULL_VAR, scale)


@lru_cache(maxsize=None)
def slot_marginals(scale: float, labels=tuple(LABELS)):
    """(means, variances) (NUM_STEPS, len(labels), 2): each chain's closed-form marginals, by its label."""
    table = {label: label_marginals(scale, label) for label in set(labels)}
    return (torch.stack([table[label][0] for label in labels], 1),
            torch.stack([table[label][1] for label in labels], 1))


def assert_path_exact(report):
    assert report["samples_per_step"] == (NUM_SAMPLES, NUM_SAMPLES), report  # every chain, every step, once
    for key in ("mean_z", "var_z", "inc_mean_z", "inc_var_z", "group_mean_z", "group_var_z"):
        assert report[key] < 5.0, report
    assert report["ks_p"] > 1e-5 and report["inc_ks_p"] > 1e-5, report


def worst_p(report) -> float:
    return min(report["ks_p"], report["inc_ks_p"])


# --- the closed form, against plain simulation ----------------------------------------------------------
@pytest.mark.parametrize("scale", SCALES)
def test_guided_closed_form_matches_a_plain_simulation_at_every_step(scale):
    """A hand-written guided chain (float64 states, `guided_output` and the plan's transition, torch.randn),
    10^4 chains with mixed labels: every step's states against the closed form."""
    schedule, model = _chain()
    plan, n = schedule.plan(NUM_STEPS), NUM_SAMPLES
    labels = tuple(LABELS)
    label_t = torch.tensor([NULL_LABEL if label is None else label for label in labels])
    observer, generator = PathObserver(plan), torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    for k in range(NUM_STEPS):
        steps = torch.full((n,), k)
        mean, std = plan.transition(x, steps, guided_output(model, x.float(), plan.t(steps), label_t, scale).double())
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = mean + std.double().unsqueeze(-1) * z if plan.std[k] > 0 else mean
        observer.steps.append(steps), observer.after.append(x), observer.slots.append(torch.arange(n))
        observer.z.append(z if plan.std[k] > 0 else torch.full_like(z, torch.nan))
    report = path_test_by_slot(observer, *slot_marginals(scale, labels), groups=label_t)
    assert report["samples_per_step"] == (n, n)
    for key in ("mean_z", "var_z", "group_mean_z", "group_var_z"):
        assert report[key] < 5.0, report
    assert report["ks_p"] > 1e-5, report


@pytest.mark.parametrize("prediction,scale", [("eps", 0.0), ("eps", 1.0), ("eps", 3.0), ("x0", 3.0), ("v", 3.0)])
def test_guided_ancestral_sampler_has_the_closed_form_law(prediction, scale):
    """`ancestral_sample` with labels and guidance, per label (2 x 10^4 seeds). Guiding in eps, x0 or v space
    is the same affine combination, so the three parametrisations have the same guided chain."""
    schedule, model = _chain(prediction)
    labels = LABELS * 2
    samples = ancestral_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(len(labels)), labels=labels,
                               guidance_scale=scale)
    groups = torch.tensor([NULL_LABEL if label is None else label for label in labels])
    for label in (0, 1, 2, None):
        means, variances = label_marginals(scale, label, prediction)
        report = marginal_test(samples[groups == (NULL_LABEL if label is None else label)], means[-1], variances[-1])
        assert report["mean_z"] < 4.5 and report["var_z"] < 4.5 and report["ks_p"] > 1e-4, (label, report)


def test_guidance_moves_the_closed_form_law():
    """The scales give different chains (else the tests below could not tell them apart): at scale 3 the
    output of class 0 is pushed past the class mean and its variance shrinks well below the class's."""
    m0, v0 = label_marginals(0.0, 0)
    m1, v1 = label_marginals(1.0, 0)
    m3, v3 = label_marginals(3.0, 0)
    torch.testing.assert_close(m0, label_marginals(0.0, None)[0])  # scale 0: the unconditional chain
    torch.testing.assert_close(m1[-1], CLASS_MEANS[0].double(), atol=1e-3, rtol=0)
    assert (m3[-1] - CLASS_MEANS[0]).abs().min() > 0.05 and (v3[-1] < v1[-1] / 10).all()
    assert not torch.allclose(v0, v1) and not torch.allclose(m1, m3)


# --- speculative sampling, exact at every step -------------------------------------------------------------
@lru_cache(maxsize=4)  # a run's path record is ~10 MB; the fast suite reuses the last few
def _run(verifier, drafter: str, scale: float, rule: str | None = None, num_samples: int = NUM_SAMPLES):
    """`num_samples` chains (every seed in its own slot), window 4, the drafter's first draft biased; `rule`: a
    known-wrong variant ("wrong-formula", "unguided-correction"). Returns (result, path report against the guided
    closed form, observer)."""
    schedule, model = _chain()
    labels, groups = LABELS[:num_samples], GROUPS[:num_samples]
    observer = PathObserver(schedule.plan(NUM_STEPS))
    callbacks, patch = [observer], mock.patch.object(engine, "guided_output", wraps=engine.guided_output)
    if rule == "wrong-formula":
        patch = mock.patch.object(engine, "guided_output", side_effect=wrong_formula_guided_output)
    elif rule == "unguided-correction":
        verifier = UnguidedCorrection(model, schedule.plan(NUM_STEPS), groups, verifier)
        callbacks.append(verifier)
    with patch as guided:
        result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(num_samples),
                                    drafter=biased_drafter(drafter), window=WINDOW, verifier=verifier, labels=labels,
                                    guidance_scale=scale, callbacks=callbacks)
    assert guided.call_count > 0  # the engine's guided call is the one this test replaced (or watched)
    return result, path_test_by_slot(observer, *slot_marginals(scale, tuple(labels)), groups=groups), observer


def _grid():
    for scale in SCALES:
        for verifier in VERIFIERS:
            for drafter in DRAFTERS:
                marks = () if (verifier, drafter, scale) in FAST else (pytest.mark.slow,)
                yield pytest.param(verifier, drafter, scale, marks=marks, id=f"{verifier}-{drafter}-s{scale:g}")


@pytest.mark.parametrize("verifier,drafter,scale", list(_grid()))
def test_guided_speculative_sampling_is_exact_at_every_step(verifier, drafter, scale):
    result, report, observer = _run(verifier, drafter, scale)
    assert_path_exact(report)
    assert 0.05 < result.stats["acceptance_rate"] < 0.95, result.stats  # both branches, the first draft biased
    steps, after, _ = observer.by_step()  # the observer saw the chains' real paths, seed i in slot i
    slots, last = observer.slots_by_step(), steps == NUM_STEPS - 1
    assert torch.equal(after[last], result.samples[slots[last]].double())


def test_guided_speculative_samples_are_told_from_the_unguided_chain():
    """Correct guided samples (scale 3) held against the closed form of the unguided (scale 1) chain."""
    _, report, observer = _run("block", "frozen-eps", 3.0)
    assert_path_exact(report)  # the same run passes against its own law
    unguided = path_test_by_slot(observer, *slot_marginals(1.0), groups=GROUPS)
    assert worst_p(unguided) < 1e-12 and unguided["group_mean_z"] > 10, unguided


# --- known-wrong rules ---------------------------------------------------------------------------------------
def wrong_formula_guided_output(model, x, t, labels, scale, return_features=False, dtype=None):
    """WRONG: cond + s (cond - uncond) (another scale convention: the chain of scale s + 1), from the one call
    on the 2B rows that the right formula makes."""
    assert not return_features and labels is not None and scale not in (0.0, 1.0)
    out = call_network(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)]))
    cond, uncond = out.to(dtype or out.dtype).chunk(2)
    return cond + scale * (cond - uncond)


class UnguidedCorrection:
    """WRONG: a verifier (a function with the signature of `verify.verify_block`) whose accept tests and bonus
    steps use the guided target means the engine hands it, but whose correction is drawn around the UNguided
    conditional means mu_c (the target called with the chain's label alone) at the same state.

    `check=True` (a control for the rewriting): the correction keeps the engine's means, and mu_c must equal
    them where a chain is corrected (run it at scale 1, where the guided mean is mu_c).

    It is also an observer: with every seed in its own slot and no refills, the chains of the next round are
    this round's that did not finish, which gives each chain's label."""

    __name__ = "unguided-correction"

    def __init__(self, model, plan, labels: torch.Tensor, verifier: str, check: bool = False):
        self.model, self.plan, self.labels, self.verifier, self.check = model, plan, labels, verifier, check
        self.slots = torch.arange(len(labels))
        self.corrected = 0

    def on_round_end(self, record) -> None:
        assert torch.equal(record.slots, self.slots)
        self.slots = record.slots[~record.finished]

    def conditional_means(self, states, stds):
        """mu_c at every state (C, L+1, d), at its step (read from the round's stds, strictly decreasing)."""
        C, L1, d = states.shape
        n = (stds[:, :1].double() - self.plan.std.double()).abs().argmin(dim=1)
        k = (n.unsqueeze(1) + torch.arange(L1)).clamp(max=self.plan.num_steps - 1).reshape(-1)
        x = states.reshape(C * L1, d)
        out = self.model(x, self.plan.t(k), labels=self.labels[self.slots].repeat_interleave(L1))
        return self.plan.transition(x, k, out)[0].reshape(C, L1, d).to(states.dtype)

    def means_for_correction(self, args, rows, row):
        """The means the correction is drawn around at the corrected rows (mu_c; the engine's when checking)."""
        mu_c = self.conditional_means(args["states"], args["stds"])[rows, row]
        self.corrected += len(rows)
        if not self.check:
            return mu_c
        torch.testing.assert_close(mu_c, args["target_means"][rows, row], rtol=1e-5, atol=1e-5)
        return args["target_means"][rows, row]

    def __call__(self, noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
                 **kwargs):
        args = dict(noise=noise, states=states, draft_means=draft_means, target_means=target_means, stds=stds,
                    lengths=lengths, has_next=has_next, accept_u=accept_u, xi=xi, residual_u=residual_u)
        assert len(states) == len(self.slots)
        if self.verifier == "block":
            return self._block(args)
        outcome = verify_tokenwise(**args, correction=self.verifier.removeprefix("tokenwise-"))
        tau, rows = outcome.accepted, (outcome.accepted < lengths).nonzero().squeeze(1)
        next_state = outcome.settle(True).clone()
        if len(rows):
            at = lambda v: v[rows, tau[rows]]  # noqa: E731  (the first rejected draft)
            right = self._tokenwise_correction(args, rows, at, at(target_means))
            torch.testing.assert_close(right, next_state[rows])  # the rewriting reproduces the exact rule
            wrong = self._tokenwise_correction(args, rows, at, self.means_for_correction(args, rows, tau[rows]))
            next_state[rows] = wrong.to(next_state.dtype)
        return type(outcome)(accepted=tau, next_state=next_state, advanced=outcome.advanced)

    def _tokenwise_correction(self, args, rows, at, mu_p):
        mu_q, s = at(args["draft_means"]), at(args["stds"])
        if self.verifier == "tokenwise-reflection":
            return reflect(at(args["noise"]), scaled_mean_difference(mu_p, mu_q, s), mu_p, s)
        return sample_weighted_residual(mu_p, mu_q, s, torch.zeros_like(s), args["xi"][rows], args["residual_u"][rows])

    def _block(self, args):
        """verify_block with its injected correction handed mu_c at X_tau instead of the guided mean (the
        correction is deferred until tau is known, which gives the rows verify_block hands it)."""
        lengths, L = args["lengths"], args["accept_u"].shape[1]

        def correction(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
            tau = outcome.accepted
            rows = torch.arange(len(tau))  # the rows verify_block corrects: all, or where one is needed
            if len(tau) >= COMPACT_MIN_CHAINS:
                rows = (tau < lengths).nonzero().squeeze(1)
            row = tau.clamp(max=L - 1)[rows]
            assert torch.equal(mu_p, args["target_means"][rows, row])
            mu = self.means_for_correction(args, rows, row)
            known = known if self.check else {}  # d, delta, log_mass belong to the guided mean
            return weighted_residual_correction(mu, mu_q, std, log_w, xi, u, draft_noise, **known)

        outcome = verify_block(**args, correction=correction, defer_correction=True)
        return type(outcome)(accepted=outcome.accepted, next_state=outcome.settle(True), advanced=outcome.advanced)


@pytest.mark.parametrize("drafter", ["frozen-eps", pytest.param("free-x0", marks=pytest.mark.slow)])
def test_the_wrong_guidance_formula_is_detected(drafter):
    """cond + s (cond - uncond) in the engine's target call (drafts, verification and drafter alike)."""
    result, report, _ = _run("block", drafter, 3.0, "wrong-formula", WRONG_RULE_SAMPLES)
    assert worst_p(report) < 1e-12 and report["group_var_z"] > 100, report
    assert 0.05 < result.stats["acceptance_rate"] < 0.95


@pytest.mark.parametrize("verifier", ["block", pytest.param("tokenwise-reflection", marks=pytest.mark.slow),
                                      pytest.param("tokenwise-residual", marks=pytest.mark.slow)])
def test_a_correction_around_the_unguided_means_is_detected(verifier):
    """The verifier must see the guided means the target step uses, in its correction too."""
    result, report, observer = _run(verifier, "frozen-eps", 3.0, "unguided-correction", WRONG_RULE_SAMPLES)
    assert worst_p(report) < 1e-12 and report["inc_mean_z"] > 10, report  # the corrections' steps are wrong
    assert report["samples_per_step"] == (WRONG_RULE_SAMPLES, WRONG_RULE_SAMPLES)


@pytest.mark.parametrize("verifier", ["block", *(pytest.param(v, marks=pytest.mark.slow) for v in VERIFIERS[1:])])
def test_the_correction_rewriting_alone_changes_nothing(verifier):
    """Control for the wrong-rule wrapper (400 chains, scale 1 with labels, where the guided mean is mu_c): its
    conditional means equal the engine's where chains are corrected, and in `check` mode it gives the samples
    of the built-in verifier."""
    schedule, model = _chain()
    plan, n = schedule.plan(NUM_STEPS), 400
    wrapper = UnguidedCorrection(model, plan, GROUPS[:n], verifier, check=True)
    kw = dict(num_steps=NUM_STEPS, seeds=range(n), drafter=biased_drafter("frozen-eps"), window=WINDOW,
              labels=LABELS[:n], guidance_scale=1.0)
    wrapped = speculative_sample(model, schedule, (2,), verifier=wrapper, callbacks=[wrapper], **kw)
    plain = speculative_sample(model, schedule, (2,), verifier=verifier, **kw)
    assert wrapper.corrected > 100  # the rewriting ran (a correction at one chain and step in ~5)
    torch.testing.assert_close(wrapped.samples, plain.samples, rtol=1e-5, atol=1e-5)
