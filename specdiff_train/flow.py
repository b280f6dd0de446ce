"""Flow matching / rectified flow (ALGORITHMS.md section 8): x_t = (1 - t) x0 + t eps, t from 1 (noise)
to 0 (data), the network predicting the velocity v = eps - x0, sampled by the Euler-Maruyama step of the
reverse SDE with a churn setting.

With D = x0_hat: v = (x - D) / t and E[eps | x] = (x - (1 - t) D) / t. For any g(t) >= 0 the SDE
dx = [v + (g^2 / 2t) E[eps | x]] dt + g dW, run from t = 1 down to 0, has the ODE's marginals; its
Euler-Maruyama step from t to t - h is N(x - h v - (g^2 h / 2t) E[eps | x], g^2 h I), affine in x and D.
"""
from __future__ import annotations

import math

import torch

from .diffusion import Chain, Schedule, positive_number

T_SAMPLINGS = ("uniform", "logit_normal")
TIME_SCALE = 1000.0  # the network is called with 1000 t: our nets embed DDPM-like timesteps


class FlowSchedule(Schedule):
    """Rectified-flow training: the velocity loss |v_theta(x_t, t) - (eps - x0)|^2.

    Args:
        t_sampling: training times: "uniform" on [0, 1], or "logit_normal" (sigmoid of N(logit_mean,
            logit_std^2), as Stable Diffusion 3), which trains the middle of the path more.
        logit_mean, logit_std: of the logit-normal times.
        clip_denoised, clip_range: clip x0_hat to [-clip_range, clip_range] before each sampling step.
    """

    kind = "flow"
    prediction = "velocity"

    def __init__(self, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 clip_denoised: bool = False, clip_range: float = 1.0):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"schedule.t_sampling: expected one of {T_SAMPLINGS}, got {t_sampling!r}")
        self.t_sampling, self.logit_mean = t_sampling, float(logit_mean)
        self.logit_std = positive_number(logit_std, "schedule.logit_std")
        self.clip_denoised, self.clip_range = bool(clip_denoised), positive_number(clip_range, "schedule.clip_range")

    def config(self) -> dict:
        return dict(t_sampling=self.t_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                    clip_denoised=self.clip_denoised, clip_range=self.clip_range)

    def default_chain(self) -> Chain:
        return FlowEulerMaruyama()

    def network_inputs(self, x: torch.Tensor, t: torch.Tensor):
        return x, (TIME_SCALE * t.double()).float()

    def sample_timesteps(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(batch_size, generator=generator).to(device)
        n = torch.randn(batch_size, generator=generator).to(device)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def signal_noise(self, t: torch.Tensor):
        t = t.double()
        return 1 - t, t

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def x0_coefficients(self, t: torch.Tensor):
        t = t.double()
        return torch.ones_like(t), -t  # x0 = x - t v

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.double()


def flow_times(num_steps: int) -> torch.Tensor:
    """Uniform times 1, 1 - 1/N, ..., 1/N (float64): step k goes from times[k] to times[k] - 1/N."""
    return 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps


class FlowEulerMaruyama(Chain):
    """Euler-Maruyama on the reverse SDE of a flow-matching target, on uniform times, with
    g(t)^2 = 2 churn t: from t to t - h, mean x - h v - churn h E[eps | x], std sqrt(2 churn t h).
    The last step (to t = 0) is the deterministic Euler step, which returns D.

    Args:
        churn: >= 0. 0 is the probability-flow ODE's Euler sampler (deterministic: speculative sampling
            refuses it). Larger values inject more noise and correct more of it through the score;
            the step stays stable while churn h < 1 - h/t, so keep churn <= about 1 at a few tens of steps.
    """

    schedule_kind = "flow"

    def __init__(self, churn: float = 1.0):
        if not (isinstance(churn, (int, float)) and math.isfinite(churn) and churn >= 0):
            raise ValueError(f"chain.churn: expected a number >= 0 (0: the deterministic ODE sampler), got {churn!r}")
        self.churn = float(churn)

    def config(self) -> dict:
        return {"churn": self.churn}

    def stochastic_setting(self) -> str:
        return "churn > 0"

    def step_tables(self, schedule: FlowSchedule, num_steps: int) -> dict[str, torch.Tensor]:
        t = flow_times(num_steps)
        h = 1.0 / num_steps
        last = torch.arange(num_steps) == num_steps - 1
        # mean = x - (h / t)(x - D) - churn h (x - (1 - t) D) / t
        coef_xt = 1 - h / t - self.churn * h / t
        coef_x0 = h / t + self.churn * h * (1 - t) / t
        std = (2 * self.churn * t * h).sqrt()
        return dict(times=t, coef_x0=torch.where(last, torch.ones_like(t), coef_x0),
                    coef_xt=torch.where(last, torch.zeros_like(t), coef_xt),
                    std=torch.where(last, torch.zeros_like(t), std))
