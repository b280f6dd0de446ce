"""EDM (Karras et al. 2022): preconditioned denoisers trained on log-normal sigmas, sampled by the
ancestral Euler step on a Karras sigma schedule (ALGORITHMS.md section 8).

States are in the variance-exploding form x = x0 + sigma z. The target's prediction is the denoised
estimate D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), F the network; the loss is EDM's
lambda(sigma) |D - x0|^2 with lambda = 1 / c_out^2. The Euler-ancestral step from sigma to sigma' is
N(x + (sigma_down - sigma) (x - D) / sigma, sigma_up^2 I): affine in x and D, so a `Chain` table.
"""
from __future__ import annotations

import math

import torch

from .diffusion import Chain, Schedule, eta_setting, positive_number

# EDM's c_noise is ln(sigma) / 4; our nets embed DDPM-like timesteps (0..1000) sinusoidally, so it is
# scaled by 1000: ln(sigma) spans about -6.2..4.4, hence about -1550..1100 network time units.
NOISE_EMBEDDING_SCALE = 1000.0 / 4


class EDMSchedule(Schedule):
    """EDM's preconditioning and training noise levels.

    Args:
        sigma_data: std of the data (0.5 for images in [-1, 1]).
        sigma_min, sigma_max: the sampler's default sigma range (`EulerAncestral` takes them unless given).
        p_mean, p_std: training sigmas are exp(N(p_mean, p_std^2)).
        clip_denoised, clip_range: clip D to [-clip_range, clip_range] before each sampling step.
    """

    kind = "edm"
    prediction = "x0"  # the target outputs D; the network inside it predicts F
    scales_network_states = True  # the net sees c_in x

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2, clip_denoised: bool = False, clip_range: float = 1.0):
        self.sigma_data = positive_number(sigma_data, "schedule.sigma_data")
        self.sigma_min = positive_number(sigma_min, "schedule.sigma_min")
        self.sigma_max = positive_number(sigma_max, "schedule.sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"schedule.sigma_min/sigma_max: expected sigma_min < sigma_max, got {sigma_min} >= "
                             f"{sigma_max}")
        self.p_mean, self.p_std = float(p_mean), positive_number(p_std, "schedule.p_std")
        self.clip_denoised, self.clip_range = bool(clip_denoised), positive_number(clip_range, "schedule.clip_range")

    def config(self) -> dict:
        return dict(sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max, p_mean=self.p_mean,
                    p_std=self.p_std, clip_denoised=self.clip_denoised, clip_range=self.clip_range)

    def default_chain(self) -> Chain:
        return EulerAncestral()

    # --- preconditioning (EDM Table 1) ------------------------------------------------------------
    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in) float64 at noise levels sigma."""
        sigma, sd2 = sigma.double(), self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt()

    # The two halves of the target call, computed in the states' dtype with few operators (every target call
    # pays them): with r = 1 / sqrt(sigma^2 + sigma_data^2), c_in = r, c_skip = sigma_data^2 r^2, c_out = sigma sigma_data r.
    def _rsqrt_total(self, t: torch.Tensor, like: torch.Tensor):
        sigma = t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
        return sigma, torch.rsqrt(sigma * sigma + self.sigma_data**2)

    def network_inputs(self, x: torch.Tensor, t: torch.Tensor):
        sigma, r = self._rsqrt_total(t, x)
        return x * r, sigma.reshape(-1).log() * NOISE_EMBEDDING_SCALE

    def network_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma, r = self._rsqrt_total(t, x)
        return torch.addcmul(x * (r * r * self.sigma_data**2), output.to(x.dtype), sigma * r * self.sigma_data)

    # --- training -------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        """Training sigmas, log-normal: exp(p_mean + p_std n)."""
        n = torch.randn(batch_size, generator=generator).to(device)
        return (self.p_mean + self.p_std * n).exp()

    def signal_noise(self, t: torch.Tensor):
        t = t.double()
        return torch.ones_like(t), t

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0

    def loss_weights(self, t: torch.Tensor, weighting: str) -> torch.Tensor | None:
        """EDM's lambda(sigma) = 1 / c_out^2, which makes the loss on D the unit-weighted loss on F."""
        super().loss_weights(t, weighting)
        return (1 / self.preconditioning(t)[1] ** 2).float()

    def x0_coefficients(self, t: torch.Tensor):
        t = t.double()
        return torch.zeros_like(t), torch.ones_like(t)

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """log sigma scaled to [0, 1] over [sigma_min, sigma_max]."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return ((t.double().log() - lo) / (hi - lo)).clamp(0, 1)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s noise levels, float64 (num_steps,), from sigma_max down to sigma_min (then 0, not included)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def euler_ancestral_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float):
    """(sigma_down, sigma_up) of the ancestral Euler step from sigma to sigma_next (k-diffusion,
    diffusers' `EulerAncestralDiscreteScheduler` at eta = 1): sigma_up^2 + sigma_down^2 = sigma_next^2."""
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0).sqrt())
    return (sigma_next**2 - up**2).clamp(min=0).sqrt(), up


class EulerAncestral(Chain):
    """The ancestral Euler sampler on a Karras sigma schedule, for EDM-trained targets: from sigma to
    sigma', mean x + (sigma_down - sigma) (x - D) / sigma, std sigma_up; the last step (to 0) is
    deterministic (it returns D).

    Args:
        eta: the share of each step's noise that is fresh, in [0, 1]: 1 is the ancestral sampler, 0 the
            deterministic Euler ODE sampler (speculative sampling refuses it: it needs noise).
        rho: the Karras schedule's exponent (7).
        sigma_min, sigma_max: the schedule's ends (default: the target's `EDMSchedule`'s).
    """

    schedule_kind = "edm"

    def __init__(self, eta: float = 1.0, rho: float = 7.0, sigma_min: float | None = None,
                 sigma_max: float | None = None):
        self.eta, self.rho = eta_setting(eta, "the deterministic Euler sampler"), positive_number(rho, "chain.rho")
        self.sigma_min = None if sigma_min is None else positive_number(sigma_min, "chain.sigma_min")
        self.sigma_max = None if sigma_max is None else positive_number(sigma_max, "chain.sigma_max")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"chain.sigma_min/sigma_max: expected sigma_min < sigma_max, got {sigma_min} >= {sigma_max}")

    def config(self) -> dict:
        return dict(eta=self.eta, rho=self.rho, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def stochastic_setting(self) -> str:
        return "eta in (0, 1]"

    def sigma_range(self, schedule: EDMSchedule) -> tuple[float, float]:
        lo = self.sigma_min if self.sigma_min is not None else schedule.sigma_min
        hi = self.sigma_max if self.sigma_max is not None else schedule.sigma_max
        if lo >= hi:
            raise ValueError(f"chain.sigma_min/sigma_max: sigma_min {lo} >= sigma_max {hi} (with the schedule's "
                             "defaults); give both so that sigma_min < sigma_max")
        return lo, hi

    def initial_std(self, schedule: EDMSchedule) -> float:
        return self.sigma_range(schedule)[1]

    def step_tables(self, schedule: EDMSchedule, num_steps: int) -> dict[str, torch.Tensor]:
        sigmas = karras_sigmas(num_steps, *self.sigma_range(schedule), self.rho)
        nxt = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
        down, up = euler_ancestral_split(sigmas, nxt, self.eta)
        ratio = down / sigmas
        return dict(times=sigmas, coef_x0=1 - ratio, coef_xt=ratio, std=up)
