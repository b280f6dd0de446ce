"""A closed-form diffusion for testing exactness (ALGORITHMS.md section 7).

With data ~ N(m, v I) the optimal eps predictor is linear in x_t, so the DDPM ancestral chain is
linear-Gaussian and its marginal after any number of steps is known exactly. Use it to check that
a new drafter or verifier leaves the sampler's law unchanged.
"""
from __future__ import annotations

import torch
from scipy import stats

from .diffusion import DDPMSchedule


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


def closed_form_marginal(schedule: DDPMSchedule, num_steps: int, mean: torch.Tensor, var: float):
    """Per-coordinate (mean, variance) of the ancestral sampler's output for data ~ N(mean, var I),
    starting from x_T ~ N(0, I). Requires clip_denoised=False (clipping makes the chain non-linear)."""
    if schedule.clip_denoised:
        raise ValueError("closed_form_marginal: clip_denoised must be False for a linear-Gaussian chain")
    plan = schedule.plan(num_steps)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    mu, variance = torch.zeros_like(mean), torch.ones_like(mean)
    for k in range(num_steps):
        abar = schedule.alphas_cumprod[int(plan.timesteps[k])]
        gain = (1 - abar).sqrt() / (abar * var + 1 - abar)  # eps_hat = gain (x - sqrt(abar) m)
        x0_slope = (1 - (1 - abar).sqrt() * gain) / abar.sqrt()
        x0_offset = (1 - abar).sqrt() * gain * mean
        slope = plan.coef_x0[k] * x0_slope + plan.coef_xt[k]
        mu = slope * mu + plan.coef_x0[k] * x0_offset
        variance = slope**2 * variance + plan.std[k] ** 2
    return mu, variance


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
