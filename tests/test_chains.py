"""The sampler families of `specdiff_train.chains` (ALGORITHMS.md section 8): each step against a reference
implementation (diffusers' `DDIMScheduler` and `EulerAncestralDiscreteScheduler`, in float64), the Karras sigmas,
the chains' marginals against the forward process on Gaussian data (no sampling: the exact linear-chain
marginals of `testing.py`), the plain sampler against those closed forms, and the one-line errors.

Where our Euler-ancestral sampler and diffusers' `EulerAncestralDiscreteScheduler` differ (docs may quote this):
the STEP is the same. From sigma to sigma' both take x + (sigma_down - sigma) (x - D) / sigma plus sigma_up
times fresh noise, with sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) and sigma_down =
sqrt(sigma'^2 - sigma_up^2), and both end with a deterministic step to sigma = 0 that returns D; given the same
state, denoised estimate and noise they agree to float64 rounding at every step (tested below at diffusers' own
sigmas and at ours). What differs is around the step. diffusers serves DDPM-trained eps (or v) networks: its
sigmas are the DDPM ones, sqrt((1 - abar_t) / abar_t) at "linspace" (or "leading"/"trailing") train timesteps, the
network is called at the train timestep with the input scaled by 1 / sqrt(sigma^2 + 1) (`scale_model_input`,
the VE state mapped back to the DDPM one), D = x - sigma eps, the chain starts at std `init_noise_sigma`, it has no
eta (always 1: k-diffusion's `sample_euler_ancestral` has it, with sigma_up = min(sigma', eta * ...), which
`euler_ancestral_split` follows) and it rounds the state to float32 before each step. Ours serves EDM-trained
targets (`EDMSchedule`): the target outputs D itself (preconditioning inside the target), the sigmas are
Karras et al.'s (rho = 7, from sigma_max to sigma_min, then 0; the same values as diffusers'
`EulerDiscreteScheduler._convert_to_karras`), the chain starts at sigma_max z, and everything stays in float64
tables. With a Gaussian N(m, v) data law the chain's start N(0, sigma_max^2) misses the forward marginal
N(m, v + sigma_max^2) by |m| / sigma_max in standardised mean (1.9e-2 here); the ancestral noise forgets it
(eta = 1: 5e-5 at the output), the ODE (eta = 0) keeps it.
"""
import math

import pytest
import torch

from helpers import widen_scheduler_tables
from specdiff_train.chains import (
    DDIM,
    DDPMAncestral,
    DDPMSchedule,
    EDMSchedule,
    EulerAncestral,
    FlowEulerMaruyama,
    FlowSchedule,
    as_chain,
    check_stochastic,
)
from specdiff_train.edm import euler_ancestral_split, karras_sigmas
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FreeDrafter, speculative_sample
from specdiff_train.testing import (
    GaussianDataDenoiser,
    closed_form_marginal,
    closed_form_marginals,
    denoiser_affine_maps,
    forward_marginals,
    gaussian_denoised,
    linear_plan_marginals,
    marginal_test,
)

PRED_NAMES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DATA_MEAN, DATA_VAR = torch.tensor([1.5, -1.0]), 0.05


def one_line_error(excinfo, *fields):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for field in fields:
        assert field in message, message


# --- DDIM against diffusers ----------------------------------------------------------------------------------
def ddim_reference(schedule: DDPMSchedule, num_steps: int):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=schedule.num_train_steps,
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(schedule.beta_schedule, schedule.beta_schedule),
        beta_start=schedule.beta_start, beta_end=schedule.beta_end, prediction_type=PRED_NAMES[schedule.prediction],
        clip_sample=schedule.clip_denoised, clip_sample_range=schedule.clip_range, set_alpha_to_one=True,
        steps_offset=0, timestep_spacing="leading",
    )
    sched.set_timesteps(num_steps)
    widen_scheduler_tables(sched)  # compare in float64
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("num_steps,beta_schedule,clip", [(50, "linear", False), (7, "cosine", True),
                                                          (20, "scaled_linear", True)])
def test_ddim_step_matches_diffusers(eta, prediction, num_steps, beta_schedule, clip):
    """Every step, the same model output, state and noise: our plan's N(mean, std^2) drawn with noise z equals
    `DDIMScheduler.step(..., eta=eta, variance_noise=z, use_clipped_model_output=True)` (clipping: the eps of the
    clipped x0 estimate, which is what our table form computes with or without clipping)."""
    schedule = DDPMSchedule(1000, beta_schedule=beta_schedule, prediction=prediction, clip_denoised=clip)
    plan = schedule.plan(num_steps, DDIM(eta))
    ref = ddim_reference(schedule, num_steps)
    torch.testing.assert_close(plan.timesteps, torch.as_tensor(ref.timesteps, dtype=torch.int64))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_steps, 3, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(num_steps, 3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(num_steps, 3, 4, generator=gen, dtype=torch.float64)
    mean, std = plan.transition(x, torch.arange(num_steps), out)
    ours = mean + std.reshape(-1, 1, 1) * z
    clipped = 0
    for i in range(num_steps):
        t = int(plan.timesteps[i])
        step = ref.step(out[i:i + 1], t, x[i:i + 1], eta=eta, variance_noise=z[i:i + 1], use_clipped_model_output=True)
        torch.testing.assert_close(ours[i:i + 1], step.prev_sample, rtol=1e-9, atol=1e-10)
        clipped += int((step.pred_original_sample.abs() >= schedule.clip_range).any()) if clip else 0
    if clip:
        assert clipped > num_steps // 2  # the clipped branch really ran
    assert (std[:-1] > 0).all() == (eta > 0) and std[-1] == 0  # the last step (to t = -1) adds no noise


@pytest.mark.parametrize("num_train_steps,num_steps,beta_schedule", [(1000, 1000, "linear"), (200, 200, "cosine"),
                                                                     (1000, 20, "linear"), (1000, 7, "scaled_linear")])
def test_ddim_eta_one_is_ddpm_ancestral(num_train_steps, num_steps, beta_schedule):
    """DDIM(eta=1) is the DDPM posterior step q(x_t' | x_t, x0_hat): the same tables as `DDPMAncestral` with every
    train step, and with respaced steps too (the respaced beta 1 - abar_t / abar_t')."""
    schedule = DDPMSchedule(num_train_steps, beta_schedule=beta_schedule)
    ddim, ddpm = schedule.plan(num_steps, DDIM(1.0)), schedule.plan(num_steps, DDPMAncestral())
    assert ddpm.chain == schedule.default_chain() and ddim.chain != ddpm.chain
    torch.testing.assert_close(ddim.timesteps, ddpm.timesteps, rtol=0, atol=0)
    for name in ("coef_x0", "coef_xt", "std"):
        torch.testing.assert_close(getattr(ddim, name), getattr(ddpm, name), rtol=1e-9, atol=1e-12, msg=name)


# --- Euler ancestral and Karras sigmas against diffusers -----------------------------------------------------
def euler_ancestral_reference(monkeypatch, num_steps: int, sigmas: torch.Tensor | None = None):
    """diffusers' `EulerAncestralDiscreteScheduler` for an eps network, its sigmas widened to float64 (or replaced
    by `sigmas`, then 0), and a function step(i, x, eps, z) -> its prev_sample with the noise z."""
    pytest.importorskip("diffusers")
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

    sched = EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
    sched.set_timesteps(num_steps)
    sched.sigmas = sched.sigmas.double() if sigmas is None else torch.cat([sigmas.double(), sigmas.new_zeros(1)])
    drawn = {}
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: drawn["z"])

    def step(i, x, eps, z):
        drawn["z"] = z
        sched._step_index, sched.is_scale_input_called = i, True
        return sched.step(eps, sched.timesteps[i], x).prev_sample

    return sched, step


def random_step_inputs(num_steps: int, seed: int = 0):
    """States (float32 values: diffusers rounds the state to float32), denoised estimates and noise, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = (10 * torch.randn(num_steps, 3, 4, generator=gen)).double()
    return x, torch.randn(num_steps, 3, 4, generator=gen, dtype=torch.float64), torch.randn(
        num_steps, 3, 4, generator=gen, dtype=torch.float64)


def test_euler_ancestral_split_matches_diffusers_at_its_own_sigmas(monkeypatch):
    """At diffusers' sigma pairs (DDPM sigmas at linspace timesteps, the last pair to 0), the step from the
    coefficients of `euler_ancestral_split(eta=1)` equals `EulerAncestralDiscreteScheduler.step` given the same state,
    denoised estimate (diffusers reads it from an eps network: D = x - sigma eps) and noise."""
    num_steps = 25
    sched, step = euler_ancestral_reference(monkeypatch, num_steps)
    sigmas = sched.sigmas.double()
    x, denoised, z = random_step_inputs(num_steps)
    for i in range(num_steps):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        down, up = euler_ancestral_split(sigma, nxt, 1.0)
        ours = (1 - down / sigma) * denoised[i] + down / sigma * x[i] + up * z[i]
        ref = step(i, x[i:i + 1], (x[i:i + 1] - denoised[i:i + 1]) / sigma, z[i:i + 1])
        torch.testing.assert_close(ours.unsqueeze(0), ref, rtol=1e-9, atol=1e-9)
    assert sigmas[-1] == 0 and torch.equal(euler_ancestral_split(sigmas[-2], sigmas[-1], 1.0)[1], sigmas[-1])


@pytest.mark.parametrize("num_steps", [2, 18])
def test_euler_ancestral_plan_matches_diffusers_at_karras_sigmas(monkeypatch, num_steps):
    """Our `EulerAncestral(eta=1)` plan on an `EDMSchedule`, every step (the last one to sigma = 0 included), equals
    diffusers' step run on the plan's own sigmas."""
    schedule = EDMSchedule(sigma_min=0.02, sigma_max=40.0)
    plan = schedule.plan(num_steps, EulerAncestral(1.0))
    torch.testing.assert_close(plan.timesteps, karras_sigmas(num_steps, 0.02, 40.0), rtol=0, atol=0)
    _, step = euler_ancestral_reference(monkeypatch, num_steps, plan.timesteps)
    x, denoised, z = random_step_inputs(num_steps, seed=1)
    mean, std = plan.transition(x, torch.arange(num_steps), denoised)  # EDM targets output D
    ours = mean + std.reshape(-1, 1, 1) * z
    for i in range(num_steps):
        sigma = plan.timesteps[i]
        ref = step(i, x[i:i + 1], (x[i:i + 1] - denoised[i:i + 1]) / sigma, z[i:i + 1])
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mean[-1], denoised[-1], rtol=0, atol=0)  # the last step returns D
    assert std[-1] == 0 and plan.initial_std == 40.0


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_euler_ancestral_split_is_k_diffusions_ancestral_step(eta):
    """k-diffusion's `get_ancestral_step(sigma_from, sigma_to, eta)`, written out: sigma_up = min(sigma_to, eta
    sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)), sigma_down = sqrt(sigma_to^2 - sigma_up^2)."""
    sigmas = torch.cat([karras_sigmas(30, 0.002, 80.0), torch.zeros(1, dtype=torch.float64)])
    for sigma_from, sigma_to in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        down = (sigma_to**2 - up**2) ** 0.5
        ours_down, ours_up = euler_ancestral_split(*torch.tensor([sigma_from, sigma_to], dtype=torch.float64), eta)
        assert math.isclose(ours_up.item(), up, rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(ours_down.item(), down, rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(ours_up.item() ** 2 + ours_down.item() ** 2, sigma_to**2, rel_tol=1e-12, abs_tol=1e-300)
    plan = EDMSchedule().plan(30, EulerAncestral(eta))
    torch.testing.assert_close(plan.coef_x0 + plan.coef_xt, torch.ones(30, dtype=torch.float64))  # D = x: no move


@pytest.mark.parametrize("num_steps,sigma_min,sigma_max,rho", [(18, 0.002, 80.0, 7.0), (5, 0.1, 10.0, 7.0),
                                                               (40, 0.03, 14.6, 3.0)])
def test_karras_sigmas_formula_and_diffusers(num_steps, sigma_min, sigma_max, rho):
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    i = torch.arange(num_steps, dtype=torch.float64)
    formula = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    torch.testing.assert_close(sigmas, formula, rtol=1e-13, atol=0)
    assert math.isclose(sigmas[0].item(), sigma_max, rel_tol=1e-13)
    assert math.isclose(sigmas[-1].item(), sigma_min, rel_tol=1e-13)
    assert (sigmas.diff() < 0).all()
    if rho == 7.0:  # diffusers hard-codes rho = 7
        diffusers = pytest.importorskip("diffusers")
        euler = diffusers.EulerDiscreteScheduler()
        if not hasattr(euler, "_convert_to_karras"):
            pytest.skip("this diffusers has no EulerDiscreteScheduler._convert_to_karras")
        ref = euler._convert_to_karras(torch.tensor([sigma_max, sigma_min], dtype=torch.float64), num_steps)
        torch.testing.assert_close(sigmas, torch.as_tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)


# --- flow matching: the table against the SDE's Euler-Maruyama step ----------------------------------------
@pytest.mark.parametrize("churn", [0.0, 0.5, 1.0])
def test_flow_euler_maruyama_step_is_the_sde_step(churn):
    """From t to t - h: mean x - h v - (g^2 h / 2t) E[eps | x] with v = (x - D) / t, E[eps | x] = (x - (1 - t) D) / t
    and g^2 = 2 churn t, std g sqrt(h); the last step (to t = 0) is the plain Euler step, which returns D."""
    num_steps = 10
    schedule = FlowSchedule()
    plan = schedule.plan(num_steps, FlowEulerMaruyama(churn))
    gen = torch.Generator().manual_seed(2)
    x, denoised = (torch.randn(num_steps, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    t, h = plan.timesteps.unsqueeze(-1), 1.0 / num_steps
    torch.testing.assert_close(plan.timesteps, 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps)
    v, eps = (x - denoised) / t, (x - (1 - t) * denoised) / t
    g2 = 2 * churn * t
    mean, std = plan.transition(x, torch.arange(num_steps), (x - denoised) / t)  # the target outputs v
    torch.testing.assert_close(mean[:-1], (x - h * v - g2 * h / (2 * t) * eps)[:-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std[:-1], (g2 * h).sqrt().squeeze(-1)[:-1], rtol=1e-12, atol=0)
    torch.testing.assert_close(mean[-1], denoised[-1], rtol=1e-12, atol=1e-12)
    assert std[-1] == 0 and plan.initial_std == 1.0


# --- the Gaussian closed form of any schedule ------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [DDPMSchedule(1000, prediction="v"), EDMSchedule(), FlowSchedule()],
                         ids=["ddpm-v", "edm", "flow"])
def test_gaussian_prediction_is_the_posterior_mean_in_the_schedules_parametrisation(schedule):
    """`GaussianDataDenoiser` outputs what the schedule's network would (EDM: D; flow: the velocity (x - D) / t), and
    D is E[x0 | x_t]: regressing x0 on forward-noised x_t (10^5 draws) gives the same slope and intercept."""
    gen = torch.Generator().manual_seed(3)
    n = 100_000
    t_value = {"ddpm": 400, "edm": 0.4, "flow": 0.6}[schedule.kind]
    t = torch.full((n,), t_value, dtype=torch.int64 if schedule.kind == "ddpm" else torch.float64)
    x0 = DATA_MEAN + DATA_VAR**0.5 * torch.randn(n, 2, generator=gen)
    xt = schedule.q_sample(x0.double(), t, torch.randn(n, 2, generator=gen, dtype=torch.float64))
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    out = model(xt, t)
    denoised = gaussian_denoised(schedule, xt, t, DATA_MEAN, DATA_VAR)
    torch.testing.assert_close(schedule.to_x0(out, xt, t), denoised, rtol=1e-9, atol=1e-9)
    for j in range(2):  # least squares x0 ~ a x_t + b against the closed form's slope and intercept
        design = torch.stack([xt[:, j], torch.ones(n, dtype=torch.float64)], 1)
        fit = torch.linalg.lstsq(design, x0[:, j:j + 1].double()).solution.squeeze(1)
        slope = (denoised[1, j] - denoised[0, j]) / (xt[1, j] - xt[0, j])
        torch.testing.assert_close(fit, torch.stack([slope, denoised[0, j] - slope * xt[0, j]]), rtol=0, atol=0.02)


@pytest.mark.parametrize("schedule", [DDPMSchedule(1000), DDPMSchedule(1000, prediction="x0"),
                                      DDPMSchedule(1000, prediction="v"), EDMSchedule(), FlowSchedule()],
                         ids=["ddpm-eps", "ddpm-x0", "ddpm-v", "edm", "flow"])
@pytest.mark.parametrize("weights", [(1.0,), (-2.0, 3.0), (0.7, 0.6)])
def test_closed_form_denoiser_map_is_that_of_the_combined_outputs(schedule, weights):
    """`denoiser_affine_maps` (what the closed forms propagate) against the sampler's view: the schedule's x0 of the
    combined network outputs sum_i w_i out_i (guidance: weights 1 - s and s; any weights, any parametrisation)."""
    means, variances = [DATA_MEAN, -DATA_MEAN, DATA_MEAN.flip(0)], [DATA_VAR, 0.3, 1.2]
    components = [(w, means[i].double(), torch.tensor(variances[i], dtype=torch.float64))
                  for i, w in enumerate(weights)]
    times = schedule.plan(20).timesteps
    slopes, offsets = denoiser_affine_maps(schedule, times, components)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k in range(20):
        t = times[k:k + 1].expand(6)
        out = sum(w * GaussianDataDenoiser(schedule, m, v)(x, t) for w, m, v in components)
        torch.testing.assert_close(schedule.to_x0(out, x, t), slopes[k] * x + offsets[k], rtol=1e-9, atol=1e-9)


FAMILIES = {
    "ddpm": (DDPMSchedule(1000), DDPMAncestral()),
    "ddim-1": (DDPMSchedule(1000), DDIM(1.0)),
    "ddim-0.5": (DDPMSchedule(1000, prediction="x0"), DDIM(0.5)),
    "euler-ancestral-1": (EDMSchedule(), EulerAncestral(1.0)),
    "euler-ancestral-0.5": (EDMSchedule(), EulerAncestral(0.5)),
    "flow-em-1": (FlowSchedule(), FlowEulerMaruyama(1.0)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_sampler_has_the_closed_form_law(family):
    """`ancestral_sample` with each chain (10^4 seeds, 20 steps) against `closed_form_marginal(..., chain=)`, which
    starts from the plan's initial std (EDM: sigma_max = 80)."""
    schedule, chain = FAMILIES[family]
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    samples = ancestral_sample(model, schedule, (2,), num_steps=20, seeds=range(10_000), chain=chain)
    mean, var = closed_form_marginal(schedule, 20, DATA_MEAN, DATA_VAR, chain=chain)
    report = marginal_test(samples, mean, var)
    assert report["mean_z"] < 4.5 and report["var_z"] < 4.5 and report["ks_p"] > 1e-4, report


def _arrival_times(schedule, plan):
    """The schedule time each step arrives at (EDM: the next sigma, 0 after the last; flow: t - 1/N)."""
    t = plan.timesteps
    if schedule.kind == "edm":
        return torch.cat([t[1:], t.new_zeros(1)])
    return t - 1.0 / plan.num_steps


def _discretisation_error(schedule, chain, num_steps, from_forward_marginal: bool):
    """Worst over steps and coordinates of |mean - mean*| / std* and |std / std* - 1|, the chain's exact marginals
    against the forward process's at the times the steps arrive at (from the sampler's start N(0, initial_std^2),
    or from the forward marginal at the first time)."""
    plan = schedule.plan(num_steps, chain)
    components = [(1.0, DATA_MEAN.double(), torch.tensor(DATA_VAR, dtype=torch.float64))]
    initial = None
    if from_forward_marginal:
        start_mean, start_var = forward_marginals(schedule, plan.timesteps[:1], DATA_MEAN, DATA_VAR)
        initial = (start_mean[0], start_var[0])
    means, variances = linear_plan_marginals(plan, *denoiser_affine_maps(schedule, plan.timesteps, components), (2,),
                                             initial)
    ref_mean, ref_var = forward_marginals(schedule, _arrival_times(schedule, plan), DATA_MEAN, DATA_VAR)
    mean_error = ((means - ref_mean).abs() / ref_var.sqrt()).max().item()
    std_error = (variances.sqrt() / ref_var.sqrt() - 1).abs().max().item()
    return mean_error, std_error


@pytest.mark.parametrize("schedule,chain", [(EDMSchedule(), EulerAncestral(1.0)), (EDMSchedule(), EulerAncestral(0.5)),
                                            (FlowSchedule(), FlowEulerMaruyama(1.0)),
                                            (FlowSchedule(), FlowEulerMaruyama(0.5))],
                         ids=["euler-ancestral-1", "euler-ancestral-0.5", "flow-em-1", "flow-em-0.5"])
def test_chain_marginals_approach_the_forward_process_as_steps_shrink(schedule, chain):
    """Section 8's check of each family on Gaussian data, exactly (no sampling): after every step the state is
    N(m, v + sigma'^2) (EDM) or N((1 - t') m, (1 - t')^2 v + t'^2) (flow) up to discretisation error, which
    shrinks about tenfold from 20 to 200 steps (first order). Started from the forward marginal, the mean is exact
    (D keeps it); from the sampler's start N(0, initial_std^2) EDM's mean also carries the prior mismatch
    |m| / sigma_max, which the chain never reduces below at its worst step."""
    errors = {n: _discretisation_error(schedule, chain, n, True) for n in (20, 200)}
    assert errors[20][0] < 1e-12 and errors[200][0] < 1e-12, errors
    assert errors[200][1] < errors[20][1] / 5 and errors[200][1] < 0.05, errors
    assert errors[20][1] > 0.01, errors  # the coarse chain is visibly off: the comparison has power
    mean_error, std_error = _discretisation_error(schedule, chain, 200, False)
    prior_mismatch = (DATA_MEAN.abs() / chain.initial_std(schedule)).max().item() if schedule.kind == "edm" else 0.0
    assert mean_error <= prior_mismatch * (1 + 1e-9) + 1e-12, (mean_error, prior_mismatch)
    assert std_error < 0.05


def test_closed_form_marginals_start_at_the_plans_initial_std():
    """EDM starts at sigma_max z: the closed form after the first step follows from N(0, 80^2), not N(0, 1)."""
    schedule, chain = EDMSchedule(), EulerAncestral(1.0)
    plan = schedule.plan(20, chain)
    means, variances = closed_form_marginals(schedule, 20, DATA_MEAN, DATA_VAR, chain=chain)
    sigma = plan.timesteps[0]
    gain = DATA_VAR / (DATA_VAR + sigma**2)  # D = m + gain (x - m)
    slope = plan.coef_x0[0] * gain + plan.coef_xt[0]
    torch.testing.assert_close(variances[0], (slope**2 * 80.0**2 + plan.std[0] ** 2).expand(2))
    torch.testing.assert_close(means[0], plan.coef_x0[0] * (1 - gain) * DATA_MEAN.double())
    with pytest.raises(ValueError, match="clip_denoised"):
        closed_form_marginals(EDMSchedule(clip_denoised=True), 20, DATA_MEAN, DATA_VAR)


# --- bad input: one-line errors naming the field ---------------------------------------------------------
@pytest.mark.parametrize("build,field", [
    (lambda: DDIM(eta=1.5), "chain.eta"),
    (lambda: DDIM(eta=-0.1), "chain.eta"),
    (lambda: EulerAncestral(eta=2), "chain.eta"),
    (lambda: EulerAncestral(sigma_min=1, sigma_max=0.5), "chain.sigma_min/sigma_max"),
    (lambda: EulerAncestral(rho=0), "chain.rho"),
    (lambda: EDMSchedule(sigma_min=80, sigma_max=1), "schedule.sigma_min/sigma_max"),
    (lambda: EDMSchedule(sigma_data=-1), "schedule.sigma_data"),
    (lambda: FlowEulerMaruyama(churn=-1), "chain.churn"),
    (lambda: FlowEulerMaruyama(churn=float("inf")), "chain.churn"),
    (lambda: FlowSchedule(t_sampling="cosine"), "schedule.t_sampling"),
    (lambda: EDMSchedule(sigma_max=1.0).plan(10, EulerAncestral(sigma_min=2.0)), "chain.sigma_min/sigma_max"),
])
def test_bad_settings_are_refused_naming_the_field(build, field):
    with pytest.raises(ValueError) as excinfo:
        build()
    one_line_error(excinfo, field)


@pytest.mark.parametrize("schedule,chain,kinds", [
    (DDPMSchedule(100), EulerAncestral(), ("'edm'", "DDPMSchedule", "DDIM", "DDPMAncestral")),
    (EDMSchedule(), DDIM(1.0), ("'ddpm'", "EDMSchedule", "EulerAncestral")),
    (FlowSchedule(), DDPMAncestral(), ("'ddpm'", "FlowSchedule", "FlowEulerMaruyama")),
    (DDPMSchedule(100), FlowEulerMaruyama(), ("'flow'", "DDPMSchedule")),
])
def test_a_chain_for_another_parametrisation_is_refused(schedule, chain, kinds):
    with pytest.raises(ValueError) as excinfo:
        schedule.plan(10, chain)
    one_line_error(excinfo, "chain", *kinds)
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    with pytest.raises(ValueError) as excinfo:
        ancestral_sample(model, schedule, (2,), num_steps=10, seeds=[0], chain=chain)
    one_line_error(excinfo, "chain")


@pytest.mark.parametrize("schedule,chain,setting", [
    (DDPMSchedule(100), DDIM(0.0), "eta"),
    (EDMSchedule(), EulerAncestral(eta=0.0), "eta"),
    (FlowSchedule(), FlowEulerMaruyama(churn=0.0), "churn"),
])
def test_speculative_sampling_refuses_a_deterministic_chain(schedule, chain, setting):
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    with pytest.raises(ValueError) as excinfo:
        speculative_sample(model, schedule, (2,), num_steps=10, seeds=range(4), drafter=FreeDrafter(), chain=chain)
    one_line_error(excinfo, "chain", "needs noise", setting)
    ancestral_sample(model, schedule, (2,), num_steps=10, seeds=range(4), chain=chain)  # plain sampling runs it


def test_a_single_step_chain_cannot_be_speculated():
    """One step is the deterministic last step of every family: refused, and the message says why."""
    for schedule, chain in [(DDPMSchedule(100), DDIM(1.0)), (EDMSchedule(), EulerAncestral()),
                            (FlowSchedule(), FlowEulerMaruyama())]:
        with pytest.raises(ValueError) as excinfo:
            check_stochastic(schedule.plan(1, chain))
        one_line_error(excinfo, "needs noise", "num_steps >= 2")


def test_min_snr_weighting_is_refused_outside_ddpm():
    from specdiff_train.models.target import TargetDiffusion

    from helpers import TinyDenoiser

    for schedule in (EDMSchedule(), FlowSchedule()):
        with pytest.raises(ValueError) as excinfo:
            TargetDiffusion(TinyDenoiser(), schedule=schedule, loss_weighting="min_snr")
        one_line_error(excinfo, "model.loss_weighting", type(schedule).__name__)
    TargetDiffusion(TinyDenoiser(), schedule=DDPMSchedule(1000), loss_weighting="min_snr")
    TargetDiffusion(TinyDenoiser(), schedule=EDMSchedule(), loss_weighting="none")


def test_as_chain_from_config():
    assert as_chain({"class_path": "specdiff_train.chains.DDIM", "init_args": {"eta": 0.5}}) == DDIM(0.5)
    assert as_chain({"class_path": "specdiff_train.edm.EulerAncestral"}) == EulerAncestral()
    assert as_chain({"class_path": "specdiff_train.chains.FlowEulerMaruyama", "init_args": {"churn": 0.25}}) == \
        FlowEulerMaruyama(0.25)
    chain = DDIM(0.3)
    assert as_chain(chain) is chain
    plan = DDPMSchedule(100).plan(10, {"class_path": "specdiff_train.chains.DDIM", "init_args": {"eta": 0.3}})
    assert plan.chain == chain and plan is DDPMSchedule(100).plan(10, chain)  # one cached plan per (schedule, chain)
    for bad in [{"class_path": "torch.nn.Linear", "init_args": {}}, {"class_path": "specdiff_train.chains.NoSuchChain"},
                {"init_args": {"eta": 0.5}}, "DDIM", None]:
        with pytest.raises(ValueError) as excinfo:
            as_chain(bad)
        one_line_error(excinfo, "chain")
    with pytest.raises(ValueError) as excinfo:  # the chain's own check of its arguments
        as_chain({"class_path": "specdiff_train.chains.DDIM", "init_args": {"eta": 3}})
    one_line_error(excinfo, "chain.eta")


# --- the targets' conditioning and losses, written out (EDM Table 1; rectified flow) ------------------------
def _tiny_target(schedule):
    from specdiff_train.models import TargetDiffusion
    from specdiff_train.nets import MLPDenoiser

    torch.manual_seed(0)
    return TargetDiffusion(MLPDenoiser(dim=2, hidden=16, depth=1, time_embed_dim=8), schedule=schedule).eval()


@torch.no_grad()
def test_an_edm_target_is_its_net_preconditioned():
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd /
    sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (times 1000 for our nets);
    features come from the same call."""
    sd = 0.7
    target = _tiny_target(EDMSchedule(sigma_data=sd))
    x, sigma = torch.randn(5, 2), torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    s = sigma.float()[:, None]
    F, features = target.net(x / (s**2 + sd**2).sqrt(), 250 * sigma.log().float(), return_features=True)
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * F
    torch.testing.assert_close(target(x, sigma), expected, rtol=1e-5, atol=1e-6)
    out, feats = target(x, sigma, return_features=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, features, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_training_losses_are_edm_s_and_rectified_flow_s():
    """EDM: lambda(sigma) |D - x0|^2 with lambda = 1 / c_out^2, i.e. the unit loss on F against
    (x0 - c_skip x) / c_out at x = x0 + sigma n. Flow: |v - (n - x0)|^2 at x = (1 - t) x0 + t n, with the net
    called at 1000 t."""
    sd = 0.5
    edm = _tiny_target(EDMSchedule(sigma_data=sd))
    x0, n = torch.randn(6, 2), torch.randn(6, 2)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
    s = sigma[:, None]
    x = x0 + s * n
    F = edm.net(x / (s**2 + sd**2).sqrt(), 250 * sigma.log())
    F_target = (x0 - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(edm.diffusion_loss(x0, sigma, n), (F - F_target).pow(2).mean(), rtol=1e-4, atol=1e-6)
    flow = _tiny_target(FlowSchedule())
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    v = flow.net((1 - t[:, None]) * x0 + t[:, None] * n, 1000 * t)
    torch.testing.assert_close(flow.diffusion_loss(x0, t, n), (v - (n - x0)).pow(2).mean(), rtol=1e-5, atol=1e-6)
