"""DDPM maths as small pure functions (noise schedules, parametrisations, respacing) and the chain
interface every sampler family implements (ALGORITHMS.md section 8).

A sampler is a `Chain`: for a schedule and a number of steps it gives per-step tables, the time fed to
the network, and the step's Gaussian N(coef_x0 * D + coef_xt * x, std^2 I), D the denoised estimate that
the schedule's parametrisation makes of the network's output. `SamplingPlan` holds those tables; the
samplers, verifiers and drafters read only the plan, so a family is one `Chain` subclass:
`DDPMAncestral` and `DDIM` here, `edm.EulerAncestral` and `flow.FlowEulerMaruyama` beside.

The ancestral step equals diffusers' `DDPMScheduler(variance_type="fixed_small",
timestep_spacing="leading")`, and a `DDIM` step `DDIMScheduler.step(eta=...)`, for the same schedule and
model output (tested in float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch

from .guidance import call_network

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


def positive_number(value, field: str) -> float:
    """`value` as a float if it is a finite number > 0; else a one-line ValueError naming `field`."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{field}: expected a number > 0, got {value!r}")
    return float(value)


def eta_setting(eta, deterministic: str) -> float:
    """A chain's `eta` as a float in [0, 1] (0: the `deterministic` sampler, which speculation refuses)."""
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"chain.eta: expected a number in [0, 1] ((0, 1] to speculate; 0 is {deterministic}), got {eta!r}")
    return float(eta)


class ConfiguredByArguments:
    """Equality, hashing and repr from `config()` (the constructor arguments): schedules and chains are values,
    used as keys of the plan cache and compared with checkpoints' records."""

    def config(self) -> dict:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.config().items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"


class Schedule(ConfiguredByArguments):
    """Base of the training parametrisations (DDPM here, `edm.EDMSchedule`, `flow.FlowSchedule`): how data is
    noised at a schedule time t, what the network learns, and how its output becomes the denoised estimate.

    Subclasses give `kind`, `config`, `signal_noise` (x_t = alpha(t) x0 + sigma(t) eps), `x0_coefficients`,
    `sample_timesteps`, `training_target`, `time_fraction` and `default_chain`; the conversions below
    follow from them. Options are constructor arguments kept as attributes (`config`), so a schedule is
    built from YAML by `class_path` and recorded in checkpoints.
    """

    kind = ""  # the family a `Chain` checks (`Chain.schedule_kind`)
    prediction = "x0"
    clip_denoised = False
    clip_range = 1.0
    scales_network_states = False  # whether `network_inputs` rescales the states (EDM's c_in), not only the time

    def mismatch(self, other) -> list[str]:
        """Where two schedules (of any family) differ: their class, else their fields (empty when equal)."""
        if type(self) is not type(other):
            return [f"schedule: {type(self).__name__} != {type(other).__name__}"]
        mine, theirs = self.config(), other.config()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def plan(self, num_steps: int, chain: "Chain | None" = None) -> "SamplingPlan":
        """The sampler `chain` (default: `default_chain()`) with `num_steps` steps."""
        return cached_plan(self, num_steps, chain)

    def default_chain(self) -> "Chain":
        raise NotImplementedError

    def network_inputs(self, x: torch.Tensor, t: torch.Tensor):
        """What the network is called with at states x and schedule times t (default: both as they are)."""
        return x, t

    def network_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The target's prediction from the network's raw output (default: the output itself)."""
        return output

    def predict(self, net, x: torch.Tensor, t: torch.Tensor, labels=None, return_features: bool = False):
        """The prediction of `net` wrapped in this schedule's conditioning (`network_inputs` / `network_output`):
        what a target, or a draft net standing in for one, outputs at states x and schedule times t (with the
        net's features after it when `return_features`; labels as `guidance.call_network` takes them)."""
        net_x, net_t = self.network_inputs(x, t)
        out = call_network(net, net_x, net_t, labels, return_features)
        if return_features:
            return self.network_output(out[0], x, t), out[1]
        return self.network_output(out, x, t)

    def loss_weights(self, t: torch.Tensor, weighting: str) -> torch.Tensor | None:
        if weighting != "none":
            raise ValueError(f"model.loss_weighting: {weighting!r} is for DDPM schedules; use none with "
                             f"{type(self).__name__} (its loss is already weighted)")
        return None

    def signal_noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) float64 with x_t = alpha x0 + sigma eps at schedule times t."""
        raise NotImplementedError

    def x0_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(from_x, from_output) float64 with x0_hat = from_x * x + from_output * output at schedule times t."""
        raise NotImplementedError

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean data: x_t = alpha(t) x0 + sigma(t) noise."""
        alpha, sigma = self.signal_noise(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str | None = None):
        """The x0 estimate implied by the prediction (or an "eps" / "x0" value; no clipping)."""
        if prediction == "x0":
            return output
        if prediction == "eps":
            alpha, sigma = self.signal_noise(t)
            return (x_t - _expand(sigma, x_t) * output) / _expand(alpha, x_t)
        from_x, from_out = self.x0_coefficients(t)
        return _expand(from_x, x_t) * x_t + _expand(from_out, x_t) * output

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str | None = None):
        """The eps estimate implied by the prediction (or an "eps" / "x0" value)."""
        if prediction == "eps":
            return output
        alpha, sigma = self.signal_noise(t)
        return (x_t - _expand(alpha, x_t) * self.to_x0(output, x_t, t, prediction)) / _expand(sigma, x_t)

    def denoised(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate used by the sampler (clipped when clip_denoised)."""
        return self.clip(self.to_x0(output, x_t, t))

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        """An x0 estimate as the sampler uses it: clamped to +-clip_range when clip_denoised, else unchanged."""
        return x0.clamp(-self.clip_range, self.clip_range) if self.clip_denoised else x0


class DDPMSchedule(Schedule):
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

    kind = "ddpm"

    def default_chain(self) -> "Chain":
        """The sampler used when none is named: DDPM ancestral sampling."""
        return DDPMAncestral()

    def loss_weights(self, t: torch.Tensor, weighting: str) -> torch.Tensor | None:
        """Per-sample loss weights; "min_snr" is Min-SNR-5 (Hang et al. 2023) expressed for the schedule's
        prediction type, so every type optimises the same x0-space objective."""
        if weighting == "none":
            return None
        abar = self.alphas_cumprod.to(t.device)[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=MIN_SNR_GAMMA)
        weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]
        return weight.float()

    def signal_noise(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def x0_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(from_x, from_output) float64 with x0_hat = from_x * x + from_output * output at train timesteps t."""
        abar = self.alphas_cumprod.to(t.device)[t]
        if self.prediction == "eps":
            return 1 / abar.sqrt(), -(1 - abar).sqrt() / abar.sqrt()
        if self.prediction == "x0":
            return torch.zeros_like(abar), torch.ones_like(abar)
        return abar.sqrt(), -(1 - abar).sqrt()

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Diffusion time in [0, 1) of train timesteps t (0: data), for reports per fifth of the chain."""
        return t.double() / self.num_train_steps

    # --- training (`q_sample`, `to_x0` and `to_eps` as DDPM has always computed them) --------------
    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(self.alphas_cumprod.to(t.device)[t], like)

    def sample_timesteps(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        """Training timesteps, uniform over 0..T-1."""
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

    def delta_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight on |eps_P - eps_Q|^2 that equals delta^2 of the one-step transition (ALGORITHMS 5):
        beta_t / (alpha_t (1 - abar_t)) for the full-resolution (num_train_steps) sampler."""
        beta = self.betas.to(t.device)[t]
        abar = self.alphas_cumprod.to(t.device)[t]
        return beta / ((1 - beta) * (1 - abar))


MIN_SNR_GAMMA = 5.0


_PLAN_CACHE: dict = {}


def cached_plan(schedule, num_steps: int, chain: "Chain | None" = None) -> "SamplingPlan":
    """The plan of `chain` (default: the schedule's) for `schedule` and `num_steps`, built once per process."""
    chain = as_chain(chain) if chain is not None else schedule.default_chain()
    key = (schedule, num_steps, chain)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = SamplingPlan(schedule, num_steps, chain)
    return _PLAN_CACHE[key]


class Chain(ConfiguredByArguments):
    """A sampler family (ALGORITHMS.md section 8): per-step tables for a schedule and a step count.

    Step k maps a state at schedule time `times[k]` (what the network is called with) to the next:
    N(coef_x0[k] * D + coef_xt[k] * x, std[k]^2 I), D the schedule's denoised estimate. A subclass sets
    `schedule_kind` (the `kind` of the schedules it samples) and implements `step_tables`; its options
    are constructor arguments stored as attributes of the same name (`config`), so it is built from
    YAML by `class_path` and recorded in checkpoints. A step with std 0 is taken as a plain target step
    by speculative sampling; a chain with no stochastic step cannot be speculated (`SamplingPlan`).
    """

    schedule_kind: str = ""

    def config(self) -> dict:
        """The constructor arguments (plain data)."""
        return {}

    def step_tables(self, schedule, num_steps: int) -> dict[str, torch.Tensor]:
        """{"times", "coef_x0", "coef_xt", "std"}: (num_steps,) float64 tables (times may be int64)."""
        raise NotImplementedError

    def initial_std(self, schedule) -> float:
        """Std of the Gaussian the chain starts from (x = initial_std * z)."""
        return 1.0

    def stochastic_setting(self) -> str:
        """The option that makes steps stochastic, for the error when none is (e.g. "eta")."""
        return "the chain's noise setting"

    def check_schedule(self, schedule) -> None:
        """A one-line error when the target's training parametrisation is not the one this chain samples."""
        kind = getattr(schedule, "kind", None)
        if kind != self.schedule_kind:
            fits = ", ".join(sorted(c.__name__ for c in chain_families() if c.schedule_kind == kind)) or "none"
            raise ValueError(
                f"chain: {self!r} samples targets trained with a {self.schedule_kind!r} schedule, but the target's "
                f"schedule is {type(schedule).__name__} ({kind!r}); use a chain for it ({fits}) or a target "
                f"trained for this chain")


def chain_families() -> list[type]:
    """Every `Chain` subclass defined so far (the shipped ones are imported by `chains.py`)."""
    found, todo = [], [Chain]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def as_chain(chain) -> Chain:
    """A `Chain` from itself or from a config {"class_path": ..., "init_args": {...}} (a one-line error otherwise)."""
    if isinstance(chain, Chain):
        return chain
    if isinstance(chain, dict) and "class_path" in chain:
        from .config_io import resolve_class

        cls = resolve_class(str(chain["class_path"]))
        if isinstance(cls, type) and issubclass(cls, Chain):
            init_args = chain.get("init_args") or {}
            try:
                return cls(**dict(init_args))
            except (TypeError, ValueError) as err:  # an unknown option, init_args not a mapping, a bad value
                raise ValueError(f"chain: {cls.__name__} cannot be built from init_args {init_args!r}: {err}") from None
    raise ValueError(f"chain: expected a specdiff_train.chains chain (e.g. DDIM(eta=1.0)) or its "
                     f"{{class_path, init_args}} config, got {chain!r}")


def _respaced_timesteps(schedule: "DDPMSchedule", num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """("leading" timesteps, previous timesteps; -1 means clean data), as diffusers' DDPM and DDIM schedulers."""
    T = schedule.num_train_steps
    if not isinstance(num_steps, int) or not (1 <= num_steps <= T):
        raise ValueError(f"num_steps: expected an int in [1, num_train_steps={T}], got {num_steps!r}")
    ratio = T // num_steps
    timesteps = torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * ratio
    return timesteps, timesteps - ratio


def _abar_pair(schedule: "DDPMSchedule", num_steps: int):
    timesteps, prev = _respaced_timesteps(schedule, num_steps)
    abar_all = schedule.alphas_cumprod
    abar_t = abar_all[timesteps]
    abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.ones_like(abar_t))
    return timesteps, abar_t, abar_prev


class DDPMAncestral(Chain):
    """DDPM ancestral sampling, respaced: the posterior q(x_t' | x_t, x0_hat) with variance beta_tilde
    (diffusers' `DDPMScheduler`, "fixed_small"); the last step (to t = -1) adds no noise."""

    schedule_kind = "ddpm"

    def step_tables(self, schedule, num_steps: int) -> dict[str, torch.Tensor]:
        timesteps, abar_t, abar_prev = _abar_pair(schedule, num_steps)
        beta_t = 1 - abar_t / abar_prev  # the respaced beta
        coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
        coef_xt = (1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)
        variance = (1 - abar_prev) / (1 - abar_t) * beta_t
        # diffusers clamps at 1e-20 and adds no noise at t = 0.
        std = torch.where(timesteps > 0, variance.clamp(min=1e-20).sqrt(), torch.zeros_like(variance))
        return dict(times=timesteps, coef_x0=coef_x0, coef_xt=coef_xt, std=std)


class DDIM(Chain):
    """DDIM with eta on a DDPM-trained target (Song et al. 2021; diffusers' `DDIMScheduler.step(eta=...)`):
    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'), mean sqrt(abar') x0_hat +
    sqrt(1 - abar' - sigma^2) eps_hat with eps_hat = (x - sqrt(abar) x0_hat) / sqrt(1 - abar), the eps
    of the (clipped) x0 estimate (diffusers' `use_clipped_model_output=True`; the same without clipping).

    Args:
        eta: in [0, 1]. 1 with every train step is DDPM ancestral sampling (in law); 0 is the
            deterministic DDIM sampler, which speculative sampling refuses (it needs noise).
    """

    schedule_kind = "ddpm"

    def __init__(self, eta: float = 1.0):
        self.eta = eta_setting(eta, "deterministic DDIM")

    def config(self) -> dict:
        return {"eta": self.eta}

    def stochastic_setting(self) -> str:
        return "eta in (0, 1]"

    def step_tables(self, schedule, num_steps: int) -> dict[str, torch.Tensor]:
        timesteps, abar_t, abar_prev = _abar_pair(schedule, num_steps)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
        direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
        coef_xt = direction / (1 - abar_t).sqrt()
        coef_x0 = abar_prev.sqrt() - coef_xt * abar_t.sqrt()
        return dict(times=timesteps, coef_x0=coef_x0, coef_xt=coef_xt, std=sigma)


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The sampler `chain` of `schedule` with `num_steps` steps (build it with `schedule.plan`).

    Step k (0-based) maps a state at schedule time `timesteps[k]` (DDPM: the train timestep; EDM:
    sigma; flow matching: t) to the next: N(coef_x0[k] * x0_hat + coef_xt[k] * x, std[k]^2 I).
    All tables float64 (DDPM timesteps int64).
    """

    schedule: object
    num_steps: int
    chain: Chain = None

    def __post_init__(self):
        chain = self.chain if self.chain is not None else self.schedule.default_chain()
        chain.check_schedule(self.schedule)
        object.__setattr__(self, "chain", chain)
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps: expected an int >= 1, got {self.num_steps!r}")
        self._tables  # built now: a bad step count or setting is reported where the plan is asked for

    @cached_property
    def _tables(self) -> dict[str, torch.Tensor]:
        tables = self.chain.step_tables(self.schedule, self.num_steps)
        bad = [name for name in ("coef_x0", "coef_xt", "std") if not torch.isfinite(tables[name]).all()]
        if bad:
            raise ValueError(f"chain: {self.chain!r} gives non-finite {', '.join(bad)} with num_steps={self.num_steps}; "
                             "check the chain's settings")
        return tables

    @property
    def timesteps(self) -> torch.Tensor:
        return self._tables["times"]

    @cached_property
    def prev_timesteps(self) -> torch.Tensor:
        """DDPM-family chains: the train timestep each step goes to (-1: clean data)."""
        return _respaced_timesteps(self.schedule, self.num_steps)[1]

    @cached_property
    def initial_std(self) -> float:
        """Std of the chains' starting Gaussian (1 for DDPM and flow matching, sigma_max for EDM)."""
        return float(self.chain.initial_std(self.schedule))

    @cached_property
    def time_fraction(self) -> torch.Tensor:
        """(num_steps,) float64 diffusion time in [0, 1] of each step (0: data), for reports per fifth."""
        return self.schedule.time_fraction(self.timesteps)

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
        """Steps with positive std; trailing deterministic steps (the last step of DDPM, DDIM, EDM and flow
        chains) are never drafted: speculative sampling takes them as plain target steps."""
        stochastic = (self.std > 0).tolist()
        n = 0
        while n < len(stochastic) and stochastic[n]:
            n += 1
        if any(stochastic[n:]):
            raise ValueError(f"chain: {self.chain!r} has a deterministic step before a stochastic one; speculative "
                             "sampling takes only trailing deterministic steps as plain steps")
        return n

    @cached_property
    def step_coefficients(self) -> torch.Tensor:
        """(num_steps, 5) float64: per step, (x0_from_x, x0_from_output, coef_x0, coef_xt, std) such that
        x0_hat = x0_from_x * x + x0_from_output * output (then clipped if the schedule clips), the step's
        mean is coef_x0 * x0_hat + coef_xt * x and its std is std. One gather of this table serves every row."""
        from_x, from_out = self.schedule.x0_coefficients(self.timesteps)
        return torch.stack([from_x, from_out, self.coef_x0, self.coef_xt, self.std], dim=1)

    @cached_property
    def eps_conversions(self) -> torch.Tensor:
        """(num_steps, 5) float64: per step, (x0_from_x, x0_from_eps, eps_from_x, eps_from_output, no_signal) with
        x0 = x0_from_x * x + x0_from_eps * eps (x = alpha x0 + sigma eps) and the schedule's eps estimate
        eps = eps_from_x * x + eps_from_output * output: what drafters that freeze eps gather when the
        target predicts something else. no_signal is 1 where alpha = 0 (flow matching's t = 1: eps gives no
        x0; the x0 columns are 0 there)."""
        alpha, sigma = self.schedule.signal_noise(self.timesteps)
        alpha, sigma = alpha.double(), sigma.double()
        no_signal = alpha == 0
        safe = torch.where(no_signal, torch.ones_like(alpha), alpha)
        from_x, from_out = self.schedule.x0_coefficients(self.timesteps)
        zero = torch.zeros_like(alpha)
        return torch.stack([torch.where(no_signal, zero, 1 / safe), torch.where(no_signal, zero, -sigma / safe),
                            (1 - alpha * from_x) / sigma, -alpha * from_out / sigma, no_signal.double()], dim=1)

    @cached_property
    def no_signal_steps(self) -> tuple[int, ...]:
        """The steps at a time where eps gives no x0 (`eps_conversions`; flow matching: step 0), once per plan."""
        return tuple(int(k) for k in self.eps_conversions[:, 4].nonzero().flatten().tolist())

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
    def eps_conversions(self) -> torch.Tensor:
        """The plan's `eps_conversions` on this device in the coefficients' dtype (built on first use)."""
        return self.plan.eps_conversions.to(device=self.coefficients.device, dtype=self.coefficients.dtype)

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
    return schedule.clip(x0)


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
