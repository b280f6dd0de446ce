"""Test support: a closed-form diffusion for testing exactness (ALGORITHMS.md section 7), and the
reference and deliberately wrong corrections that the coupling and verifier tests compare with.

With data ~ N(m, v I) the optimal eps predictor is linear in x_t, so the DDPM ancestral chain is
linear-Gaussian and its marginal after any number of steps is known exactly. Use it to check that
a new drafter or verifier leaves the sampler's law unchanged.

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
    """The exact eps / x0 / v predictor for data ~ N(mean, var I), as a network would be called:
    `model(x, t)`, optionally `model(x, t, return_features=True)` (features = x_t and the output)."""

    def __init__(self, schedule: DDPMSchedule, mean: torch.Tensor, var: float):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.var = float(var)
        self._dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # device / dtype anchor

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False):
        abar = self.schedule.alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / (abar * self.var + 1 - abar)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        out = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.schedule.prediction]
        if return_features:
            return out, torch.cat([x, out], dim=1)
        return out


def closed_form_marginals(schedule: DDPMSchedule, num_steps: int, mean: torch.Tensor, var: float):
    """Per-coordinate (mean, variance) of the ancestral chain's state after each step, for data
    ~ N(mean, var I) and x_T ~ N(0, I): two (num_steps, *mean.shape) float64 tensors, row k the state
    after step k (row num_steps - 1 the output). Requires clip_denoised=False."""
    if schedule.clip_denoised:
        raise ValueError("closed_form_marginal: clip_denoised must be False for a linear-Gaussian chain")
    plan = schedule.plan(num_steps)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    mu, variance = torch.zeros_like(mean), torch.ones_like(mean)
    means, variances = [], []
    for k in range(num_steps):
        abar = schedule.alphas_cumprod[int(plan.timesteps[k])]
        gain = (1 - abar).sqrt() / (abar * var + 1 - abar)  # eps_hat = gain (x - sqrt(abar) m)
        x0_slope = (1 - (1 - abar).sqrt() * gain) / abar.sqrt()
        x0_offset = (1 - abar).sqrt() * gain * mean
        slope = plan.coef_x0[k] * x0_slope + plan.coef_xt[k]
        mu = slope * mu + plan.coef_x0[k] * x0_offset
        variance = slope**2 * variance + plan.std[k] ** 2
        means.append(mu)
        variances.append(variance)
    return torch.stack(means), torch.stack(variances)


def closed_form_marginal(schedule: DDPMSchedule, num_steps: int, mean: torch.Tensor, var: float):
    """Per-coordinate (mean, variance) of the ancestral sampler's output for data ~ N(mean, var I),
    starting from x_T ~ N(0, I). Requires clip_denoised=False (clipping makes the chain non-linear)."""
    means, variances = closed_form_marginals(schedule, num_steps, mean, var)
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


def record_transitions(recorder, states, target_means, stds, tau, advanced, next_state, n) -> None:
    """Append a round's transitions to `recorder.steps / after / z`: states (C, L+1, d), target means
    (C, L+1, d), stds (C, L+1), tau and steps advanced (C,), the committed states (C, d), steps n (C,)."""
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


class PathObserver:
    """`TransitionRecorder`'s record made from the rounds' records (pass it in `callbacks`) instead of by
    wrapping the verifier: it sees rounds whose verification runs inside a compiled graph, and plain rounds."""

    def __init__(self, plan):
        self.plan = plan
        self.steps, self.after, self.z = [], [], []

    def on_round_end(self, record) -> None:
        v = record.verification
        C, L1 = v.states.shape[:2]
        steps = (record.steps.unsqueeze(1) + torch.arange(L1, device=record.steps.device)).clamp(
            max=self.plan.num_steps - 1)
        stds = self.plan.std.to(steps.device)[steps]
        record_transitions(self, v.states.reshape(C, L1, -1), v.means.reshape(C, L1, -1), stds, record.accepted,
                           record.advanced, record.next_state.reshape(C, -1), record.steps)

    by_step = TransitionRecorder.by_step


def path_test(recorder: TransitionRecorder, means: torch.Tensor, variances: torch.Tensor) -> dict:
    """`marginal_test` of every step's recorded states against the closed-form marginals (`means`,
    `variances` from `closed_form_marginals`) and of every stochastic step's standardised increments
    against N(0, I). Returns the worst statistics over steps and the step where each is attained."""
    steps, after, z = recorder.by_step()
    worst = dict(mean_z=(0.0, None), var_z=(0.0, None), ks_p=(1.0, None), inc_mean_z=(0.0, None),
                 inc_var_z=(0.0, None), inc_ks_p=(1.0, None))
    counts = []
    for k in range(len(means)):
        rows = steps == k
        counts.append(int(rows.sum()))
        checks = {"": marginal_test(after[rows], means[k], variances[k])}
        if not torch.isnan(z[rows]).any():
            zero = torch.zeros(z.shape[1], dtype=torch.float64)
            checks["inc_"] = marginal_test(z[rows], zero, torch.ones_like(zero))
        for prefix, report in checks.items():
            for key, value in report.items():
                name = prefix + key
                if (value < worst[name][0]) if key == "ks_p" else (value > worst[name][0]):
                    worst[name] = (value, k)
    out = {key: value for key, (value, _) in worst.items()}
    out.update({f"{key}_step": step for key, (_, step) in worst.items()})
    out["samples_per_step"] = (min(counts), max(counts))
    return out


def marginal_test(samples: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> dict:
    """Compare samples (n, d) with independent N(mean_j, variance_j) coordinates.

    Returns z-scores of the sample mean and variance (worst coordinate) and the smallest KS
    p-value over coordinates and a random projection.
    """
    x = samples.double().reshape(len(samples), -1)
    n = len(x)
    z = (x - mean) / variance.sqrt()
    mean_z = (z.mean(0) * n**0.5).abs().max().item()
    var_z = ((z.var(0) - 1) / (2 / (n - 1)) ** 0.5).abs().max().item()
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
