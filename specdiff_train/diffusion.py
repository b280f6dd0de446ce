"""DDPM maths as small pure functions: noise schedules, parametrisations, respacing, and the
ancestral step as a Gaussian transition N(mean, std^2 I) for a batch of states each at its own step.

The ancestral step equals diffusers' `DDPMScheduler(variance_type="fixed_small",
timestep_spacing="leading")` for the same schedule and model output (tested in float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

PREDICTIONS = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")


def linear_betas(num_train_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Computed in float32 and widened, exactly as diffusers does, so both schedules coincide.
    return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float32).double()


def scaled_linear_betas(num_train_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear in sqrt(beta) (diffusers' "scaled_linear", latent diffusion's schedule), in float32 as diffusers."""
    return (torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float32) ** 2).double()


def cosine_betas(num_train_steps: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_steps) / alpha_bar(i / num_train_steps), max_beta)
        for i in range(num_train_steps)
    ]
    return torch.tensor(betas, dtype=torch.float32).double()


def _expand(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients (B,) -> (B, 1, ..., 1) in x's dtype, for broadcasting over a state."""
    return coef.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class DDPMSchedule:
    """A DDPM noise schedule and its parametrisation.

    Args:
        num_train_steps: number of training diffusion steps T; timesteps are 0..T-1.
        beta_schedule: "linear" (beta_start..beta_end), "scaled_linear" (sqrt(beta) linear from
            sqrt(beta_start) to sqrt(beta_end)) or "cosine" (diffusers' "squaredcos_cap_v2").
        prediction: what the network predicts: "eps", "x0" or "v".
        clip_denoised: clip the x0 estimate to [-clip_range, clip_range] before each step.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        clip_range: bound used when clip_denoised is true (data scaled to [-1, 1] -> 1.0).
    """

    def __init__(
        self,
        num_train_steps: int = 1000,
        beta_schedule: str = "linear",
        prediction: str = "eps",
        clip_denoised: bool = False,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_range: float = 1.0,
    ):
        if not isinstance(num_train_steps, int) or num_train_steps < 2:
            raise ValueError(f"schedule.num_train_steps: expected an int >= 2, got {num_train_steps!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule.beta_schedule: expected one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"schedule.prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        if beta_schedule in ("linear", "scaled_linear") and not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"schedule.beta_start/beta_end: expected 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        if clip_range <= 0:
            raise ValueError(f"schedule.clip_range: expected > 0, got {clip_range}")
        self.num_train_steps = num_train_steps
        self.beta_schedule = beta_schedule
        self.prediction = prediction
        self.clip_denoised = bool(clip_denoised)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.clip_range = float(clip_range)
        if beta_schedule == "linear":
            betas = linear_betas(num_train_steps, beta_start, beta_end)
        elif beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(num_train_steps, beta_start, beta_end)
        else:
            betas = cosine_betas(num_train_steps)
        self.betas = betas  # float64, (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64, (T,)

    # --- identity -------------------------------------------------------------------------------
    def config(self) -> dict:
        return dict(
            num_train_steps=self.num_train_steps,
            beta_schedule=self.beta_schedule,
            prediction=self.prediction,
            clip_denoised=self.clip_denoised,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            clip_range=self.clip_range,
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, DDPMSchedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"DDPMSchedule({args})"

    def mismatch(self, other: "DDPMSchedule") -> list[str]:
        """Names of the fields where two schedules differ (empty when they are the same)."""
        mine, theirs = self.config(), other.config()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    # --- training -------------------------------------------------------------------------------
    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(self.alphas_cumprod.to(t.device)[t], like)

    def sample_timesteps(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        return torch.randint(0, self.num_train_steps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean data: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at (x_t, t) for this schedule's prediction type."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    # --- parametrisation conversions ------------------------------------------------------------
    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str | None = None):
        """The x0 estimate implied by a network output of the given prediction type (no clipping)."""
        prediction = prediction or self.prediction
        abar = self._abar(t, x_t)
        if prediction == "eps":
            return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
        if prediction == "x0":
            return output
        return abar.sqrt() * x_t - (1 - abar).sqrt() * output

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str | None = None):
        """The eps estimate implied by a network output of the given prediction type."""
        prediction = prediction or self.prediction
        abar = self._abar(t, x_t)
        if prediction == "eps":
            return output
        if prediction == "x0":
            return (x_t - abar.sqrt() * output) / (1 - abar).sqrt()
        return (1 - abar).sqrt() * x_t + abar.sqrt() * output

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate used by the sampler (clipped when clip_denoised)."""
        x0 = self.to_x0(output, x_t, t)
        return x0.clamp(-self.clip_range, self.clip_range) if self.clip_denoised else x0

    # --- sampling -------------------------------------------------------------------------------
    def plan(self, num_steps: int) -> "SamplingPlan":
        """The respaced ancestral sampler with `num_steps` steps ("leading" spacing, as diffusers)."""
        return _cached_plan(self, num_steps)

    def delta_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight on |eps_P - eps_Q|^2 that equals delta^2 of the one-step transition (ALGORITHMS 5):
        beta_t / (alpha_t (1 - abar_t)) for the full-resolution (num_train_steps) sampler."""
        beta = self.betas.to(t.device)[t]
        abar = self.alphas_cumprod.to(t.device)[t]
        return beta / ((1 - beta) * (1 - abar))


_PLAN_CACHE: dict = {}


def _cached_plan(schedule: DDPMSchedule, num_steps: int) -> "SamplingPlan":
    key = (schedule, num_steps)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = SamplingPlan(schedule, num_steps)
    return _PLAN_CACHE[key]


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The ancestral sampler of `schedule` with `num_steps` steps.

    Step k (0-based) maps a state at train timestep `timesteps[k]` to one at `prev_timesteps[k]`
    (-1 means clean data): N(coef_x0[k] * x0_hat + coef_xt[k] * x, std[k]^2 I). All tables float64.
    """

    schedule: DDPMSchedule
    num_steps: int

    def __post_init__(self):
        T = self.schedule.num_train_steps
        if not isinstance(self.num_steps, int) or not (1 <= self.num_steps <= T):
            raise ValueError(f"num_steps: expected an int in [1, num_train_steps={T}], got {self.num_steps!r}")

    @cached_property
    def timesteps(self) -> torch.Tensor:
        ratio = self.schedule.num_train_steps // self.num_steps
        return (torch.arange(self.num_steps - 1, -1, -1, dtype=torch.int64) * ratio)

    @cached_property
    def prev_timesteps(self) -> torch.Tensor:
        ratio = self.schedule.num_train_steps // self.num_steps
        return self.timesteps - ratio

    @cached_property
    def _tables(self) -> dict[str, torch.Tensor]:
        abar_all = self.schedule.alphas_cumprod
        abar_t = abar_all[self.timesteps]
        prev = self.prev_timesteps
        abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.ones_like(abar_t))
        beta_t = 1 - abar_t / abar_prev  # the respaced beta
        alpha_t = 1 - beta_t
        coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
        coef_xt = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
        variance = (1 - abar_prev) / (1 - abar_t) * beta_t
        # diffusers clamps at 1e-20 and adds no noise at t = 0.
        std = torch.where(self.timesteps > 0, variance.clamp(min=1e-20).sqrt(), torch.zeros_like(variance))
        return dict(coef_x0=coef_x0, coef_xt=coef_xt, std=std, beta=beta_t, alpha=alpha_t, abar=abar_t)

    @property
    def std(self) -> torch.Tensor:
        return self._tables["std"]

    @property
    def coef_x0(self) -> torch.Tensor:
        return self._tables["coef_x0"]

    @property
    def coef_xt(self) -> torch.Tensor:
        return self._tables["coef_xt"]

    @cached_property
    def num_stochastic_steps(self) -> int:
        """Steps with positive std; a trailing deterministic step (t=0 in DDPM) is never drafted."""
        stochastic = (self.std > 0).tolist()
        n = 0
        while n < len(stochastic) and stochastic[n]:
            n += 1
        if any(stochastic[n:]):
            raise ValueError("sampling plan: a deterministic step precedes a stochastic one")
        return n

    @cached_property
    def step_coefficients(self) -> torch.Tensor:
        """(num_steps, 5) float64: per step, (x0_from_x, x0_from_output, coef_x0, coef_xt, std) such that
        x0_hat = x0_from_x * x + x0_from_output * output (then clipped if the schedule clips), the step's
        mean is coef_x0 * x0_hat + coef_xt * x and its std is std. One gather of this table serves every row."""
        abar = self._tables["abar"]
        prediction = self.schedule.prediction
        if prediction == "eps":
            from_x, from_out = 1 / abar.sqrt(), -(1 - abar).sqrt() / abar.sqrt()
        elif prediction == "x0":
            from_x, from_out = torch.zeros_like(abar), torch.ones_like(abar)
        else:  # v
            from_x, from_out = abar.sqrt(), -(1 - abar).sqrt()
        return torch.stack([from_x, from_out, self.coef_x0, self.coef_xt, self.std], dim=1)

    def tables(self, device, dtype) -> "StepTables":
        """The step tables on `device` (coefficients in `dtype`), built once per (device, dtype)."""
        key = (torch.device(device), dtype)
        cache = self.__dict__.setdefault("_device_tables", {})
        if key not in cache:
            cache[key] = StepTables(
                plan=self,
                timesteps=self.timesteps.to(device),
                coefficients=self.step_coefficients.to(device=device, dtype=dtype),
                std=self.std.to(device),
            )
        return cache[key]

    def t(self, k: torch.Tensor) -> torch.Tensor:
        """Train timesteps for per-row step indices k."""
        return self.timesteps.to(k.device)[k]

    def std_at(self, k: torch.Tensor) -> torch.Tensor:
        return self.std.to(k.device)[k]

    def coefficients(self, k: torch.Tensor, like: torch.Tensor) -> "StepCoefficients":
        """Per-row coefficients of the steps k (B,), shaped to broadcast over states `like` (B, ...)."""
        table = self.tables(like.device, like.dtype).coefficients[k]
        return StepCoefficients(*table.reshape(len(k), 5, *([1] * (like.dim() - 1))).unbind(1))

    def transition_from_x0(self, x: torch.Tensor, k: torch.Tensor, x0: torch.Tensor):
        """(mean, std) of the step from states x (B, ...) at per-row step indices k (B,) given x0."""
        return step_mean(self.coefficients(k, x), x, x0), self.std_at(k)

    def transition(self, x: torch.Tensor, k: torch.Tensor, output: torch.Tensor):
        """(mean, std) of the ancestral step given the network output at (x, t(k))."""
        coef = self.coefficients(k, x)
        return step_mean(coef, x, denoise(coef, x, output, self.schedule)), self.std_at(k)


class StepCoefficients(NamedTuple):
    """Coefficients of ancestral steps: tensors broadcastable over the states, or Python floats
    (all rows at one step). See `SamplingPlan.step_coefficients`."""

    x0_from_x: torch.Tensor | float
    x0_from_output: torch.Tensor | float
    coef_x0: torch.Tensor | float
    coef_xt: torch.Tensor | float
    std: torch.Tensor | float


@dataclass(frozen=True, eq=False)
class StepTables:
    """A plan's tables on one device: what a sampling loop gathers from, so that no step copies a
    table to the device or recomputes a coefficient."""

    plan: SamplingPlan
    timesteps: torch.Tensor  # (N,) int64 train timesteps
    coefficients: torch.Tensor  # (N, 5) in the model's dtype, std last
    std: torch.Tensor  # (N,) float64

    @cached_property
    def scalar_coefficients(self) -> list[StepCoefficients]:
        """Python-float coefficients per step (every row at one step, as in ancestral sampling)."""
        return [StepCoefficients(*row) for row in self.plan.step_coefficients.tolist()]

    @cached_property
    def scalar_std(self) -> list[float]:
        return self.plan.std.tolist()


def denoise(coef: StepCoefficients, x: torch.Tensor, output: torch.Tensor, schedule: DDPMSchedule) -> torch.Tensor:
    """The sampler's x0 estimate from a network output (clipped when the schedule clips)."""
    if schedule.prediction == "x0":
        x0 = output
    else:
        x0 = torch.addcmul(coef.x0_from_x * x, coef.x0_from_output, output) if isinstance(
            coef.x0_from_output, torch.Tensor) else coef.x0_from_x * x + coef.x0_from_output * output
    return x0.clamp(-schedule.clip_range, schedule.clip_range) if schedule.clip_denoised else x0


def step_mean(coef: StepCoefficients, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean of the ancestral step from x given the x0 estimate: coef_x0 * x0 + coef_xt * x."""
    if isinstance(coef.coef_x0, torch.Tensor):
        return torch.addcmul(coef.coef_xt * x, coef.coef_x0, x0)
    return coef.coef_x0 * x0 + coef.coef_xt * x


def one_step_acceptance(delta: torch.Tensor) -> torch.Tensor:
    """Acceptance of one drafted step under the maximal coupling of N(mu_p, s^2 I) and N(mu_q, s^2 I),
    1 - TV(P, Q) = 2 Phi(-delta / 2), delta = |mu_p - mu_q| / s (float64). Here, below both the
    sampler's couplings (speculative/) and drafter training (drafters/distillation.py), which both use it."""
    return 2 * torch.special.ndtr(-delta.double() / 2)
