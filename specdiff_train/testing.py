"""Test support: a closed-form diffusion for testing exactness (ALGORITHMS.md sections 7 and 8), and the
reference and deliberately wrong corrections that the coupling and verifier tests compare with.

With data ~ N(m, v I) the denoised estimate E[x0 | x_t] = m + alpha v / (alpha^2 v + sigma^2) (x_t - alpha m)
is affine in x_t for any schedule ((alpha, sigma) = `schedule.signal_noise(t)`: DDPM, EDM, flow matching), so
every chain of section 8 (DDPM ancestral, DDIM, Euler-ancestral, flow Euler-Maruyama) is linear-Gaussian and
its marginal after any number of steps is known exactly (`closed_form_marginals(..., chain=...)`). Use it to
check that a new drafter or verifier leaves the sampler's law unchanged. `GuidedGaussianDenoiser` is the same for a
class-conditional target with classifier-free guidance (section 9): one Gaussian per class and one for the
null label, so the guided chain is linear-Gaussian too (`guided_closed_form_marginals`).

This module sits above `speculative/` (it imports its couplings); the package itself never imports it.
"""
from __future__ import annotations

import torch
from scipy import stats

from .diffusion import DDPMSchedule
from .speculative.coupling import (
    log_residual_mass,
    log_residual_tail,
    reflect,
    sample_weighted_residual,
    scaled_mean_difference,
)


class GaussianDataDenoiser(torch.nn.Module):
    """The exact predictor for data ~ N(mean, var I) of any schedule (DDPM eps / x0 / v, EDM's denoised
    estimate, flow matching's velocity), as a network would be called: `model(x, t)` at the schedule's times,
    optionally `model(x, t, return_features=True)` (features = x_t and the output)."""

    def __init__(self, schedule, mean: torch.Tensor, var: float):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.var = float(var)
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype anchor

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False):
        out = gaussian_prediction(self.schedule, x, t, self.mean, self.var)
        if return_features:
            return out, torch.cat([x, out], dim=1)
        return out


def gaussian_prediction(schedule, x: torch.Tensor, t: torch.Tensor, mean, var) -> torch.Tensor:
    """The exact prediction (of the schedule's type: what a network trained with `schedule` outputs) at states
    x (B, ...) and schedule times t (B,) for data ~ N(mean, var I); `mean` and `var` broadcast against x (per
    row, per coordinate, or shared). Any schedule: the denoised estimate D = E[x0 | x] (`gaussian_denoised`)
    turned into the output (D - from_x x) / from_out, (from_x, from_out) = `schedule.x0_coefficients(t)`
    (EDM: D itself; flow matching: the velocity (x - D) / t)."""
    if isinstance(schedule, DDPMSchedule):  # in x's dtype, as this module always computed it (same samples)
        abar = schedule.alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * var + 1 - abar)
        if schedule.prediction == "eps":
            return eps
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return x0 if schedule.prediction == "x0" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    denoised = gaussian_denoised(schedule, x, t, mean, var)  # float64
    from_x, from_out = (_rows(c, x) for c in schedule.x0_coefficients(t))
    return ((denoised - from_x * x) / from_out).to(x.dtype)


def gaussian_denoised(schedule, x: torch.Tensor, t: torch.Tensor, mean, var) -> torch.Tensor:
    """E[x0 | x_t = x] (float64) for data ~ N(mean, var I) under any schedule, x_t = alpha x0 + sigma eps:
    mean + alpha var / (alpha^2 var + sigma^2) (x - alpha mean), (alpha, sigma) = `schedule.signal_noise(t)`."""
    alpha, sigma = (_rows(c, x) for c in schedule.signal_noise(t))
    mean, var = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (mean, var))
    return mean + alpha * var / (alpha**2 * var + sigma**2) * (x.double() - alpha * mean)


def _rows(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row float64 coefficients (B,) shaped (B, 1, ..., 1) to broadcast over states like x."""
    return coef.to(x.device, torch.float64).reshape(-1, *([1] * (x.dim() - 1)))


class GuidedGaussianDenoiser(torch.nn.Module):
    """A closed-form conditional target for classifier-free guidance (ALGORITHMS.md section 9), called as a
    conditional network: `model(x, t, labels=labels)` (labels (B,) int64, -1 the null label; None: every row
    null), optionally `return_features=True` (features = x_t and the output).

    Rows with label c get the exact predictor for data ~ N(class_means[c], var I), rows with the null label the
    exact predictor for N(null_mean, null_var I) (e.g. the pooled moments of the classes). Both are linear in
    x_t, so the guided prediction uncond + s (cond - uncond) is too, and the guided chain (any schedule and
    chain) is linear-Gaussian: `guided_closed_form_marginals` gives its law at every step. `var` and `null_var`
    are floats or per-coordinate tensors (shaped like a sample, or broadcastable to it)."""

    p_uncond = 0.1  # trained with label dropout: the null branch may be used (`guidance.check_guidance`)

    def __init__(self, schedule, class_means: torch.Tensor, var, null_mean: torch.Tensor, null_var):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("class_means", torch.as_tensor(class_means, dtype=torch.float32))
        self.num_classes = len(self.class_means)
        self.register_buffer("var", torch.as_tensor(var, dtype=torch.float32))
        self.register_buffer("null_mean", torch.as_tensor(null_mean, dtype=torch.float32))
        self.register_buffer("null_var", torch.as_tensor(null_var, dtype=torch.float32))
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype anchor

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        if labels is None:
            labels = torch.full((len(x),), -1, dtype=torch.int64, device=x.device)
        null = (labels < 0).reshape(-1, *([1] * (x.dim() - 1)))
        mean = torch.where(null, self.null_mean, self.class_means[labels.clamp(min=0)])
        var = torch.where(null, self.null_var, self.var)
        out = gaussian_prediction(self.schedule, x, t, mean.to(x.dtype), var.to(x.dtype))
        if return_features:
            return out, torch.cat([x, out], dim=1)
        return out


def closed_form_marginals(schedule, num_steps: int, mean: torch.Tensor, var: float, chain=None):
    """Per-coordinate (mean, variance) of the state after each step of the sampler `chain` (default: the
    schedule's) for data ~ N(mean, var I), starting from the plan's initial Gaussian (x ~ N(0, initial_std^2 I):
    1 for DDPM and flow matching, sigma_max for EDM): two (num_steps, *mean.shape) float64 tensors, row k the
    state after step k (row num_steps - 1 the output). Requires clip_denoised=False."""
    return linear_chain_marginals(schedule, num_steps, [(1.0, mean, var)], chain=chain)


def guided_closed_form_marginals(schedule, num_steps: int, class_mean: torch.Tensor, var,
                                 null_mean: torch.Tensor, null_var, scale: float, chain=None):
    """`closed_form_marginals` of the classifier-free guided chain of `GuidedGaussianDenoiser` for one label:
    the guided output is out_u + scale (out_c - out_u), out_c the exact predictor for data ~ N(class_mean, var I)
    and out_u the one for N(null_mean, null_var I). An unconditional (null) row's chain is this one with
    class_mean = null_mean, var = null_var (any scale). Requires clip_denoised=False."""
    scale = float(scale)
    return linear_chain_marginals(schedule, num_steps, [(1.0 - scale, null_mean, null_var), (scale, class_mean, var)],
                                  chain=chain)


def linear_chain_marginals(schedule, num_steps: int, components, chain=None):
    """Per-coordinate (mean, variance) after each step of the chain `chain` (default: the schedule's) whose
    network output is the affine combination sum_i w_i out_i of exact Gaussian predictors (`gaussian_prediction`
    for data ~ N(m_i, v_i I)); `components` is [(w_i, m_i, v_i)] (the weights need not sum to 1). The chain
    starts at N(0, initial_std^2 I) (`SamplingPlan.initial_std`); float64 (num_steps, *shape), shape that of the
    broadcast means and variances."""
    if schedule.clip_denoised:
        raise ValueError("closed_form_marginal: clip_denoised must be False for a linear-Gaussian chain")
    plan = schedule.plan(num_steps, chain)
    components = [(float(w), torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64))
                  for w, m, v in components]
    shape = torch.broadcast_shapes(*(t.shape for _, m, v in components for t in (m, v)))
    slopes, offsets = denoiser_affine_maps(schedule, plan.timesteps, components)
    return linear_plan_marginals(plan, slopes, offsets, shape)


def denoiser_affine_maps(schedule, times: torch.Tensor, components):
    """(slope, offset) per time, float64 (len(times), *shape), of the denoised estimate D = slope x + offset that
    the schedule's parametrisation makes of the combined output sum_i w_i out_i of exact Gaussian predictors
    (`components` [(w_i, m_i, v_i)] of float64 tensors): with out_i = (D_i - from_x x) / from_out,
    D = (1 - sum_i w_i) from_x x + sum_i w_i D_i, and D_i = m_i + g_i (x - alpha m_i), g_i = alpha v_i /
    (alpha^2 v_i + sigma^2). DDPM with eps prediction or weights summing to 1 (guidance): in eps space, as
    `linear_chain_marginals` always computed it (the same map: an affine combination of the D_i)."""
    slopes, offsets = [], []
    total = sum(w for w, _, _ in components)
    eps_space = isinstance(schedule, DDPMSchedule) and (schedule.prediction == "eps" or total == 1.0)
    for k in range(len(times)):
        t = times[k:k + 1]
        if eps_space:
            abar = schedule.alphas_cumprod[int(t)]
            gains = [(w * (1 - abar).sqrt() / (abar * v + 1 - abar), m) for w, m, v in components]
            gain = sum(g for g, _ in gains)  # eps_hat = gain x - sqrt(abar) sum_i gain_i m_i
            slope = (1 - (1 - abar).sqrt() * gain) / abar.sqrt()
            offset = (1 - abar).sqrt() * sum(g * m for g, m in gains)
        else:
            (alpha,), (sigma,) = schedule.signal_noise(t)
            (from_x,), _ = schedule.x0_coefficients(t)
            slope = (1 - total) * from_x
            offset = 0.0
            for w, m, v in components:
                g = alpha * v / (alpha**2 * v + sigma**2)
                slope, offset = slope + w * g, offset + w * (1 - alpha * g) * m
        slopes.append(torch.as_tensor(slope, dtype=torch.float64))
        offsets.append(torch.as_tensor(offset, dtype=torch.float64))
    return slopes, offsets


def linear_plan_marginals(plan, slopes, offsets, shape=(), initial=None):
    """Per-coordinate (mean, variance) after each step of `plan` when the denoised estimate at step k is
    D = slopes[k] x + offsets[k] (float64 tensors broadcastable to `shape`): the chain x' = (coef_x0 slope + coef_xt)
    x + coef_x0 offset + std z propagated exactly from x ~ N(0, initial_std^2 I), the sampler's start (or from
    `initial` = (mean, variance), e.g. the forward marginal at the first time). (num_steps, *shape) float64."""
    if initial is None:
        initial = (0.0, plan.initial_std**2)
    mu, variance = (torch.as_tensor(v, dtype=torch.float64).expand(shape).clone() for v in initial)
    means, variances = [], []
    for k in range(plan.num_steps):
        slope = plan.coef_x0[k] * slopes[k] + plan.coef_xt[k]
        mu = slope * mu + plan.coef_x0[k] * offsets[k]
        variance = slope**2 * variance + plan.std[k] ** 2
        means.append(mu.expand(shape))
        variances.append(variance.expand(shape))
    return torch.stack(means), torch.stack(variances)


def forward_marginals(schedule, t: torch.Tensor, mean, var):
    """Per-coordinate (mean, variance), float64 (len(t), *shape), of the forward-noised data x_t = alpha x0 +
    sigma eps, x0 ~ N(mean, var I), at schedule times t: (alpha m, alpha^2 v + sigma^2). What an exact sampler's
    state at time t has; a discretised chain only up to its discretisation error."""
    alpha, sigma = schedule.signal_noise(torch.as_tensor(t))
    mean, var = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(var, dtype=torch.float64)
    shape = torch.broadcast_shapes(mean.shape, var.shape)
    a, s = (c.reshape(-1, *([1] * len(shape))) for c in (alpha.double(), sigma.double()))
    return (a * mean).expand(-1, *shape), (a**2 * var + s**2).expand(-1, *shape)


def closed_form_marginal(schedule, num_steps: int, mean: torch.Tensor, var: float, chain=None):
    """Per-coordinate (mean, variance) of the sampler's output for data ~ N(mean, var I), from the chain's
    initial Gaussian. Requires clip_denoised=False (clipping makes the chain non-linear)."""
    means, variances = closed_form_marginals(schedule, num_steps, mean, var, chain=chain)
    return means[-1], variances[-1]


class TransitionRecorder:
    """A verify function (signature of `verify.verify_block`) that runs `verify` and records every
    transition the chains take in the round, so that a test sees the whole path, not only the output.

    The reverse chain forgets its early states (with data variance 0.05 the output depends on the
    state after step 0 with a gain of ~0.001), so output-only tests have no power at early steps. Every
    chain passes every step once, in exactly one round: X_j -> X_{j+1} for j < tau, then X_tau -> the
    round's next state. Per step k this records the state after step k and, for stochastic steps, the
    standardised increment z = (Y_{k+1} - mu_P(k, Y_k)) / s_k, which must be N(0, I) for an exact
    sampler. The step index is read from the round's stds (strictly decreasing along the plan).

    `perturb(args) -> args` (optional) rewrites the verifier's inputs before `verify` sees them, for
    wrong rules that change the drafts; the recorded transitions are those of the rewritten inputs.
    """

    __name__ = "recorded"

    def __init__(self, verify, plan, perturb=None):
        self.verify, self.plan, self.perturb = verify, plan, perturb
        self.steps, self.after, self.z = [], [], []

    def _step_index(self, stds: torch.Tensor) -> torch.Tensor:
        table = self.plan.std.to(stds.device, torch.float64)
        if len(table.unique()) != len(table):
            raise ValueError("TransitionRecorder: the plan's step stds are not distinct; steps cannot be told apart")
        k = (stds[:, :1].double() - table).abs().argmin(dim=1)
        if not torch.equal(table[k], stds[:, 0].double()):
            raise ValueError("TransitionRecorder: a round's std is not one of the plan's (another plan?)")
        return k

    def __call__(self, noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi,
                 residual_u, **kwargs):
        args = dict(noise=noise, states=states, draft_means=draft_means, target_means=target_means, stds=stds,
                    lengths=lengths, has_next=has_next, accept_u=accept_u, xi=xi, residual_u=residual_u)
        if self.perturb is not None:
            args = self.perturb(args)
        result = self.verify(**args, **kwargs)
        next_state = result.settle(True)
        record_transitions(self, args["states"], args["target_means"], args["stds"], result.accepted, result.advanced,
                           next_state, self._step_index(args["stds"]))
        return type(result)(accepted=result.accepted, next_state=next_state, advanced=result.advanced)

    def by_step(self):
        """(steps (M,), states after the step (M, d), z (M, d), NaN at deterministic steps)."""
        return torch.cat(self.steps), torch.cat(self.after), torch.cat(self.z)


def record_transitions(recorder, states, target_means, stds, tau, advanced, next_state, n, slots=None) -> None:
    """Append a round's transitions to `recorder.steps / after / z`: states (C, L+1, d), target means
    (C, L+1, d), stds (C, L+1), tau and steps advanced (C,), the committed states (C, d), steps n (C,);
    with `slots` (C,), each transition's slot to `recorder.slots` as well."""
    L = states.shape[1] - 1
    for j in range(L + 1):
        rows = (j < advanced).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        if j < L:
            after = torch.where((j < tau[rows]).unsqueeze(-1), states[rows, j + 1], next_state[rows])
        else:
            after = next_state[rows]
        s = stds[rows, j].double().unsqueeze(-1)
        z = (after.double() - target_means[rows, j].double()) / s.clamp(min=1e-300)
        recorder.steps.append((n[rows] + j).cpu())
        recorder.after.append(after.double().cpu())
        recorder.z.append(torch.where(s > 0, z, torch.nan).cpu())
        if slots is not None:
            recorder.slots.append(slots[rows].cpu())


class PathObserver:
    """`TransitionRecorder`'s record made from the rounds' records (pass it in `callbacks`) instead of by
    wrapping the verifier: it sees rounds whose verification runs inside a compiled graph, and plain rounds.
    It also records each transition's slot (`slots_by_step`), for chains whose laws differ (`path_test_by_slot`)."""

    def __init__(self, plan):
        self.plan = plan
        self.steps, self.after, self.z, self.slots = [], [], [], []

    def on_round_end(self, record) -> None:
        v = record.verification
        C, L1 = v.states.shape[:2]
        steps = (record.steps.unsqueeze(1) + torch.arange(L1, device=record.steps.device)).clamp(
            max=self.plan.num_steps - 1)
        stds = self.plan.std.to(steps.device)[steps]
        record_transitions(self, v.states.reshape(C, L1, -1), v.means.reshape(C, L1, -1), stds, record.accepted,
                           record.advanced, record.next_state.reshape(C, -1), record.steps, record.slots)

    by_step = TransitionRecorder.by_step

    def slots_by_step(self) -> torch.Tensor:
        """(M,) the slot of each transition of `by_step` (with every seed in its own slot, the seed's index)."""
        return torch.cat(self.slots)


def path_test(recorder: TransitionRecorder, means: torch.Tensor, variances: torch.Tensor) -> dict:
    """`marginal_test` of every step's recorded states against the closed-form marginals (`means`,
    `variances` from `closed_form_marginals`) and of every stochastic step's standardised increments
    against N(0, I). Returns the worst statistics over steps and the step where each is attained."""
    steps, after, z = recorder.by_step()
    worst = dict(mean_z=(0.0, None), var_z=(0.0, None), ks_p=(1.0, None), inc_mean_z=(0.0, None),
                 inc_var_z=(0.0, None), inc_ks_p=(1.0, None))
    # each step's rows in record order, from one stable sort (not a mask per step: long paths are ~10^6 rows)
    order = torch.argsort(steps, stable=True)
    counts = torch.bincount(steps, minlength=len(means))[:len(means)].tolist()
    after_by_step, z_by_step = after[order].split(counts), z[order].split(counts)
    for k in range(len(means)):
        checks = {"": marginal_test(after_by_step[k], means[k], variances[k])}
        if not torch.isnan(z_by_step[k]).all():  # deterministic steps: all NaN; a NaN elsewhere fails the test
            zero = torch.zeros(z.shape[1], dtype=torch.float64)
            checks["inc_"] = marginal_test(z_by_step[k], zero, torch.ones_like(zero))
        for prefix, report in checks.items():
            for key, value in report.items():
                name = prefix + key
                if (value < worst[name][0]) if key == "ks_p" else (value > worst[name][0]):
                    worst[name] = (value, k)
    out = {key: value for key, (value, _) in worst.items()}
    out.update({f"{key}_step": step for key, (_, step) in worst.items()})
    out["samples_per_step"] = (min(counts), max(counts))
    return out


class _Path:
    """A path record (`by_step`) made of given tensors."""

    def __init__(self, steps, after, z):
        self._record = (steps, after, z)

    def by_step(self):
        return self._record


def path_test_by_slot(observer: PathObserver, means: torch.Tensor, variances: torch.Tensor, groups=None) -> dict:
    """`path_test` for chains whose marginals differ (e.g. one law per class label): `means`, `variances`
    (num_steps, num_slots, *shape) give each slot's closed-form marginals. Every recorded state is standardised
    by its slot's marginal and the pooled standardised states of each step are tested against N(0, I) (the
    increments are standardised already). With `groups` (num_slots,) (e.g. the labels), also the worst z-scores
    of the standardised mean and variance per step, group and coordinate (`group_mean_z`, `group_var_z`)."""
    steps, after, z = observer.by_step()
    slots = observer.slots_by_step()
    num_steps = len(means)
    mean = means.double().reshape(num_steps, means.shape[1], -1)[steps, slots]
    sd = variances.double().reshape(num_steps, variances.shape[1], -1)[steps, slots].sqrt()
    standard = (after - mean) / sd
    d = standard.shape[1]
    zeros = torch.zeros(num_steps, d, dtype=torch.float64)
    report = path_test(_Path(steps, standard, z), zeros, torch.ones_like(zeros))
    if groups is not None:
        report.update(_group_z_scores(steps, standard, torch.as_tensor(groups)[slots], num_steps))
    return report


def _group_z_scores(steps: torch.Tensor, standard: torch.Tensor, group_of: torch.Tensor, num_steps: int) -> dict:
    """The worst z-scores of the mean and variance of standardised states (M, d) over (step, group, coordinate)."""
    names, index = torch.unique(group_of, return_inverse=True)
    key = steps * len(names) + index
    cells = num_steps * len(names)
    n = torch.bincount(key, minlength=cells).double().unsqueeze(1)
    total = standard.new_zeros(cells, standard.shape[1]).index_add_(0, key, standard)
    squares = standard.new_zeros(cells, standard.shape[1]).index_add_(0, key, standard * standard)
    seen = n.squeeze(1) > 1
    n, total, squares = n[seen], total[seen], squares[seen]
    mean = total / n
    var = (squares - n * mean * mean) / (n - 1)
    return dict(group_mean_z=(mean * n.sqrt()).abs().max().item(),
                group_var_z=((var - 1) / (2 / (n - 1)).sqrt()).abs().max().item())


def marginal_test(samples: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> dict:
    """Compare samples (n, d) with independent N(mean_j, variance_j) coordinates.

    Returns z-scores of the sample mean and variance (worst coordinate) and the smallest KS
    p-value over coordinates and a random projection. Samples with a NaN or an infinity fail every
    statistic (z-scores inf, p-value 0): a sampler that loses its states must not pass.
    """
    x = samples.double().reshape(len(samples), -1)
    n = len(x)
    if not torch.isfinite(x).all():
        return dict(mean_z=float("inf"), var_z=float("inf"), ks_p=0.0)
    z = (x - mean) / variance.sqrt()
    columns_first = z.T  # reductions along contiguous memory (a reduction over dim 0 of (n, 2) is ~100x slower)
    mean_z = (columns_first.mean(1) * n**0.5).abs().max().item()
    var_z = ((columns_first.var(1) - 1) / (2 / (n - 1)) ** 0.5).abs().max().item()
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    columns = [z[:, j] for j in range(z.shape[1])] + [z @ direction]
    ks = min(stats.kstest(c.numpy(), "norm").pvalue for c in columns)
    return dict(mean_z=mean_z, var_z=var_z, ks_p=float(ks))


# --- corrections the coupling and verifier tests compare with -------------------------------------
def residual_projection_bisection(
    log_w: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, iterations: int = 1100
) -> torch.Tensor:
    """Reference for `speculative.coupling.residual_projection`: bracket expansion and plain bisection to float64
    resolution (slow, with host reads; for tests)."""
    log_w, delta, u = (v.double() for v in torch.broadcast_tensors(log_w, delta, u))
    c = delta / 2 - log_w / delta
    target = torch.log(u) + log_residual_mass(log_w, delta)
    lo, width = c.clone(), torch.ones_like(c)
    while True:
        too_low = log_residual_tail(lo + width, log_w, delta) > target
        if not too_low.any():
            break
        width = torch.where(too_low, 2 * width, width)
    hi = lo + width
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if bool(((mid == lo) | (mid == hi)).all()):
            break
        above = log_residual_tail(mid, log_w, delta) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def sample_residual(mu_p, mu_q, std, xi, u) -> torch.Tensor:
    """Fresh draw from the unweighted residual (P - Q)_+ / TV: the alternative to reflection."""
    return sample_weighted_residual(mu_p, mu_q, std, torch.zeros_like(std, dtype=torch.float64), xi, u)


def reflection_instead_of_residual(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    """A WRONG block correction (reflect the rejected draft), kept only so that tests show it is
    detected: the draft after tau does not have the residual's law given tau."""
    return reflect(draft_noise, scaled_mean_difference(mu_p, mu_q, std), mu_p, std)
