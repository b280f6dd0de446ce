"""What the two learned drafter kinds (`draftnet.py`, `medusa.py`) share (ALGORITHMS.md section 5).

- The maths of distillation: the delta^2 weights of a step (`x0_delta_sq_weight`, `delta_sq_weight`) and the
  delta^2 of two x0 estimates (`x0_delta_sq`);
  a draft network's per-row delta^2 (`draft_delta_sq`), the loss from delta^2 (`mismatch_loss`), and the
  target's own chains to train on (`target_trajectories`, `target_rollout`, and `pool_pairs`: anchor/state
  pairs far apart on those trajectories, the heads' long offsets).
- Training: `frozen_target` and the LightningModule base `FrozenTargetDistillation`: it loads the target
  (EMA weights, eval mode, frozen, kept out of the state dict and the optimizer), draws the states to
  train on (forward-noised data, optionally the target's sampling trajectories), and logs the mismatch
  delta and the acceptance 2 Phi(-delta/2) per diffusion time at validation.
- Sampling: `LearnedDrafter`, the base of the drafters built from a trained module, which refuses a
  target with another schedule or sample shape, and a sampler chain of another family than the one it was
  trained for (another setting of the same family is warned about).

Every sampler family (ALGORITHMS.md section 8) is served: the drafter is trained for `schedule.plan(num_steps,
chain)`, and its loss is that chain's own delta^2 = |coef_x0 (x0_P - x0_Q)|^2 / std^2 (on eps for DDPM eps
prediction, the same value).

The maths is in the small functions at the top; the modules only wire them together.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from ..chains import check_stochastic
from ..config_io import class_path, module_config, read_checkpoint, target_fingerprint
from ..diffusion import Chain, DDPMSchedule, SamplingPlan, Schedule, as_chain, one_step_acceptance
from ..guidance import NULL_LABEL, check_guidance, guided_output, num_classes_of
from ..models.checkpoints import load_target
from ..models.diffusers_target import is_pipeline_source
from ..models.target import TargetDiffusion, split_batch
from .base import DraftContext, Drafter
from .checkpoints import chain_record

OBJECTIVES = ("delta_sq", "tv", "log_acceptance")
NUM_BUCKETS = 5  # validation reports per fifth of diffusion time


def _same_steps(plan: SamplingPlan, chain) -> bool:
    """Whether `chain` gives `plan`'s step tables (another spelling of the same sampler, e.g. DDIM(eta=1))."""
    try:
        other = plan.schedule.plan(plan.num_steps, chain)
    except ValueError:
        return False
    return all(torch.allclose(getattr(plan, name), getattr(other, name), rtol=1e-12, atol=0)
               for name in ("coef_x0", "coef_xt", "std")) and torch.equal(plan.timesteps, other.timesteps)


# --- the maths ----------------------------------------------------------------------------------
def x0_delta_sq_weight(plan: SamplingPlan, k: torch.Tensor) -> torch.Tensor:
    """w_k with delta^2 = w_k |x0_P - x0_Q|^2 for step k of `plan` (any prediction type, no clipping):
    the two means differ by coef_x0 (x0_P - x0_Q), and delta is that difference over the step's std."""
    kc = k.cpu()
    return (plan.coef_x0[kc] ** 2 / plan.std[kc] ** 2).to(k.device)


def x0_delta_sq(plan: SamplingPlan, k: torch.Tensor, x0_p: torch.Tensor, x0_q: torch.Tensor) -> torch.Tensor:
    """Per row, delta^2 of step k between two x0 estimates at the same states: `x0_delta_sq_weight` times
    |x0_P - x0_Q|^2, in the estimates' dtype."""
    sq = (x0_p - x0_q).pow(2).flatten(1).sum(1)
    return x0_delta_sq_weight(plan, k).to(sq.dtype) * sq


def delta_sq_weight(plan: SamplingPlan, k: torch.Tensor) -> torch.Tensor:
    """w_k with delta^2 = w_k |eps_P - eps_Q|^2 for step k of `plan` (a DDPM schedule, eps prediction, no
    clipping; any DDPM chain): x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), so the x0 weight times (1 - abar) / abar.

    With the sampler's posterior variance s^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) this is
    beta_t / (alpha_t (1 - abar_{t-1})) (beta_t, alpha_t the respaced ones; ALGORITHMS.md section 5), not
    beta_t / (alpha_t (1 - abar_t)), the weight for s^2 = beta_t (up to 2x off near t = 0); the tests
    check it against the transition itself."""
    if not isinstance(plan.schedule, DDPMSchedule):
        raise ValueError(f"delta_sq_weight: the eps weight is for DDPM schedules, not {type(plan.schedule).__name__}; "
                         "use x0_delta_sq_weight (every family)")
    abar = plan.schedule.alphas_cumprod[plan.timesteps[k.cpu()]].to(k.device)
    return x0_delta_sq_weight(plan, k) * (1 - abar) / abar


def draft_delta_sq(plan: SamplingPlan, k: torch.Tensor, x: torch.Tensor, target_output: torch.Tensor,
                   draft_output: torch.Tensor) -> torch.Tensor:
    """delta^2 of step k's transition between the target's and a draft network's outputs at the same
    states x, per row, for any prediction type, the distillation loss of draft networks.

    DDPM eps prediction without clipping compares eps (`delta_sq_weight`: no cancellation of x / sqrt(abar) at
    high noise). Otherwise (every other family and prediction) x0 is compared (`x0_delta_sq_weight`: the
    chain's own |coef_x0 (x0_P - x0_Q)|^2 / std^2): the target's as the sampler uses it
    (clipped when the schedule clips), the draft's unclipped, so the loss has gradients where the draft
    leaves the range; clipping is 1-Lipschitz and the target's x0 lies in the range, so the value bounds
    the transition's delta^2 from above and equals it wherever the draft's x0 is in the range."""
    schedule = plan.schedule
    if isinstance(schedule, DDPMSchedule) and schedule.prediction == "eps" and not schedule.clip_denoised:
        sq = (target_output - draft_output).pow(2).flatten(1).sum(1)
        return delta_sq_weight(plan, k).to(sq.dtype) * sq
    t = plan.t(k)
    return x0_delta_sq(plan, k, schedule.denoised(target_output, x, t), schedule.to_x0(draft_output, x, t))


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"model.init_args.objective: expected one of {OBJECTIVES}, got {objective!r}")
    return objective


def mismatch_loss(delta_sq: torch.Tensor, objective: str) -> torch.Tensor:
    """The training loss from per-sample delta^2.

    "delta_sq": mean delta^2 (ALGORITHMS.md section 5). Near the data (small t) the sampler's steps
    have tiny std and delta^2 of any small drafter is huge (tens to thousands): those steps, where no
    drafter gets accepted, then dominate the loss.
    "tv": mean rejection probability 1 - 2 Phi(-delta/2) = erf(delta / (2 sqrt 2)), the quantity that
    acceptance actually depends on: its gradient fades for hopeless steps and goes to the improvable ones.
    "log_acceptance": mean -log(2 Phi(-delta/2)): a window's drafts are all accepted with the product of their
    acceptances, so the sum of their -log is what a run of accepted drafts depends on. Like "tv" for small
    delta (~ delta / sqrt(2 pi)), like delta^2 / 8 for large: the steps near the data keep their gradient.
    On the digits heads it did worse than "tv" (docs/drafters.md): the hopeless last steps take the capacity.
    """
    if check_objective(objective) == "delta_sq":
        return delta_sq.mean()
    delta = (delta_sq + 1e-12).sqrt()
    if objective == "log_acceptance":
        return -(torch.special.log_ndtr(-delta / 2) + math.log(2.0)).mean()
    return torch.erf(delta / (2 * 2**0.5)).mean()  # erf, not 1 - 2 Phi: no cancellation for small delta


def time_bucket(plan: SamplingPlan, k: torch.Tensor) -> torch.Tensor:
    """Bucket 0..NUM_BUCKETS-1 of the diffusion time of step k (`plan.time_fraction`; DDPM: t/T; 0: near data,
    4: near noise)."""
    frac = plan.time_fraction[k.cpu()].to(k.device)
    return frac.mul(NUM_BUCKETS).floor().clamp(0, NUM_BUCKETS - 1).long()


def acceptance_by_fifth(plan: SamplingPlan, k: torch.Tensor, acceptance: torch.Tensor) -> torch.Tensor:
    """(2, NUM_BUCKETS) float64: per fifth of diffusion time (`time_bucket`), the sum of `acceptance` over the
    rows drafted at steps k and their count (summed over validation batches and ranks, then divided)."""
    bucket = time_bucket(plan, k)
    sums = torch.zeros(2, NUM_BUCKETS, dtype=torch.float64, device=acceptance.device)
    sums[0].index_add_(0, bucket, acceptance.double())
    sums[1].index_add_(0, bucket, torch.ones_like(acceptance, dtype=torch.float64))
    return sums


def acceptance_record(sums: torch.Tensor, free_sums: torch.Tensor | None, plan: SamplingPlan, global_step: int) -> dict:
    """What a drafter checkpoint records of its last validation (`validation_acceptance`): the one-step
    acceptance 2 Phi(-delta/2) per fifth of diffusion time, index 0 nearest the data (the `val/acceptance_t0.0`
    .. `t0.8` logs), of the drafter and, where its validation measures it, of the Free Drafter (x0) on the same
    states; with the rows behind each fifth (a fifth without rows is None), the step count and the training step."""
    def means(s):
        return [None if n == 0 else float(a / n) for a, n in zip(s[0].tolist(), s[1].tolist())]

    return dict(time_fractions=[[b / NUM_BUCKETS, (b + 1) / NUM_BUCKETS] for b in range(NUM_BUCKETS)],
                acceptance=means(sums), free_acceptance=None if free_sums is None else means(free_sums),
                rows=[int(n) for n in sums[1].tolist()], num_steps=int(plan.num_steps), global_step=int(global_step))


def acceptance_prior(record: dict, plan: SamplingPlan, default: float = 0.8) -> list[float]:
    """A per-step prior for `CostAwareWindow(prior=...)` from a checkpoint's `validation_acceptance`: each step
    of `plan` gets its fifth's recorded acceptance (`default` where a fifth had no rows), kept inside
    [0.01, 0.99] (the policy needs a pass probability strictly between 0 and 1)."""
    by_fifth = [default if a is None else min(max(float(a), 0.01), 0.99) for a in record["acceptance"]]
    return [by_fifth[b] for b in time_bucket(plan, torch.arange(plan.num_steps)).tolist()]


@torch.no_grad()
def target_trajectories(target, plan: SamplingPlan, num_chains: int, shape, generator: torch.Generator,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """States of the target's own chains (the plan's sampler, from `plan.initial_std` noise),
    (num_stochastic_steps, num_chains, *shape): row k holds the states the sampler drafts from at step k."""
    x = (plan.initial_std * torch.randn(num_chains, *shape, generator=generator, dtype=dtype)).to(device)
    states = []
    for k in range(plan.num_stochastic_steps):
        states.append(x)
        steps = torch.full((num_chains,), k, dtype=torch.int64, device=x.device)
        mean, std = plan.transition(x, steps, target(x, plan.t(steps)))
        x = mean + std[0].to(x.dtype) * torch.randn(x.shape, generator=generator, dtype=dtype).to(x.device)
    return torch.stack(states)


def pool_pairs(num_stochastic_steps: int, num_chains: int, num_rows: int, max_offset: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chain, anchor step m, offset j), (num_rows,) int64 each, of anchor/state pairs on a pool of target
    trajectories (`target_trajectories`): the anchor is the pool's state at step m, the drafted state the same
    chain's state at step m + j <= num_stochastic_steps - 1 (a step the sampler drafts). Offsets are log-uniform
    in [1, min(max_offset, num_stochastic_steps - 1)] (a long window's drafts are rejected early more often than
    not, so short offsets matter as much as long ones), anchors uniform over the steps that leave room for j."""
    largest = min(int(max_offset), num_stochastic_steps - 1)
    if largest < 1:
        raise ValueError(f"pool_pairs: need max_offset >= 1 and at least 2 stochastic steps, got {max_offset} "
                         f"and {num_stochastic_steps}")
    u = torch.rand(num_rows, generator=generator, dtype=torch.float64)
    offset = torch.exp(u * math.log(largest + 1)).floor().long().clamp(1, largest)
    room = (num_stochastic_steps - offset).double()  # anchors m in [0, S - 1 - j]
    anchor = (torch.rand(num_rows, generator=generator, dtype=torch.float64) * room).floor().long()
    chain = torch.randint(0, num_chains, (num_rows,), generator=generator)
    return chain, anchor, offset


@torch.no_grad()
def target_rollout(target, plan: SamplingPlan, x: torch.Tensor, k: torch.Tensor, output: torch.Tensor,
                   num_steps: int, generator: torch.Generator, draft_x0=None, drafted: torch.Tensor | None = None):
    """Continue the target's chains (the plan's sampler) from states x at steps k (with the target's `output`
    there) for `num_steps` steps: lists of the later states, their steps and the target's outputs.
    Rows whose chain has ended keep their last step index (mask them with `steps < N`).

    With `draft_x0(x, k, offset) -> x0` and a (B,) bool mask `drafted`, those rows follow the drafter's own
    steps after the first (the path a speculative round drafts: its first state is the target's step from the
    anchor, the later ones the drafter's means plus the step noise); the target's outputs are still evaluated
    at every state, for the loss."""
    last = plan.num_steps - 1
    states, steps, outputs = [], [], []
    for offset in range(num_steps):
        mean, std = plan.transition(x, k.clamp(max=last), output)
        if draft_x0 is not None and offset > 0:
            x0 = plan.schedule.clip(draft_x0(x, k.clamp(max=last), offset))  # as the drafter's proposals are clipped
            own = plan.transition_from_x0(x, k.clamp(max=last), x0)[0]
            mean = torch.where(drafted.reshape(-1, *([1] * (x.dim() - 1))), own.to(mean.dtype), mean)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = mean + std.to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * noise
        k = k + 1
        output = target(x, plan.t(k.clamp(max=last)))
        states.append(x), steps.append(k), outputs.append(output)
    return states, steps, outputs


# --- the shared module --------------------------------------------------------------------------
def frozen_target(target_ckpt: str) -> TargetDiffusion:
    """The target from `target_ckpt` (a checkpoint file: EMA weights; or a diffusers DDPM pipeline folder
    or hub id), eval mode, requires_grad False."""
    if is_pipeline_source(target_ckpt):
        return load_target(target_ckpt)
    if not Path(target_ckpt).is_file():
        raise FileNotFoundError(
            f"model.init_args.target_ckpt: no file at {target_ckpt}; train a target first, e.g. "
            "`python train.py fit --config configs/target/toy2d.yaml` (then pass its last.ckpt), "
            "or use the shipped checkpoints/toy2d/target.ckpt (or a diffusers DDPMPipeline folder or hub id)"
        )
    hparams = read_checkpoint(target_ckpt).get("hyper_parameters") or {}
    if "target_ckpt" in hparams:
        raise ValueError(
            f"model.init_args.target_ckpt: {target_ckpt} is a drafter checkpoint (trained against "
            f"{hparams['target_ckpt']}), not a target; pass the target's checkpoint, e.g. checkpoints/toy2d/target.ckpt"
        )
    return load_target(target_ckpt)


def training_chain(chain, schedule: Schedule) -> Chain:
    """The sampler chain a drafter is trained for: `chain` (a `Chain` or its {class_path, init_args} config)
    or, when None, the schedule's default chain; errors name `model.init_args.chain`."""
    try:
        return as_chain(chain) if chain is not None else schedule.default_chain()
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.init_args.{err}") from None


def chain_flag(chain: Chain) -> str:
    """A chain as the YAML flow mapping of `--model.init_args.chain` (one line)."""
    record = chain_record(chain)
    args = ", ".join(f"{k}: {json.dumps(v)}" for k, v in record["init_args"].items())
    return f"{{class_path: {record['class_path']}, init_args: {{{args}}}}}"


def _check_training_guidance(target, guidance_scale) -> float:
    """The guidance scale a drafter is trained for: 1 for an unconditional target; for a conditional one
    the samplers' rules (`guidance.check_guidance`), named as the drafter's field."""
    labels = torch.zeros(1, dtype=torch.int64) if num_classes_of(target) else None
    try:
        return check_guidance(target, labels, guidance_scale)
    except ValueError as err:
        raise ValueError(f"model.init_args.{err}") from None


def check_drafter_module(module: torch.nn.Module, target: TargetDiffusion, what: str, fix: str) -> None:
    """A drafter net or head must have the target's sample shape and train steps (those compared only when
    both the module and the target's schedule have some: EDM and flow schedules have none); ValueError
    naming the field."""
    problems = []
    shape = getattr(module, "sample_shape", None)
    if shape is not None and tuple(shape) != tuple(target.sample_shape):
        problems.append(f"sample_shape {tuple(shape)} != the target's {tuple(target.sample_shape)}")
    steps, target_steps = getattr(module, "num_train_steps", None), getattr(target.schedule, "num_train_steps", None)
    if steps is not None and target_steps is not None and steps != target_steps:
        problems.append(f"num_train_steps {steps} != the target's {target_steps}")
    if problems:
        raise ValueError(f"model.init_args.{what} does not fit the target: " + "; ".join(problems) + f". {fix}")


class FrozenTargetDistillation(LightningModule):
    """Base of the drafter-training modules. Subclasses set `self.<module_key>` (the only trained and
    saved module) and implement `losses(x0, generator) -> (loss, delta_sq, steps, extra_logs)`.

    Args:
        target_ckpt: the target checkpoint (frozen, EMA weights), or a diffusers DDPMPipeline folder or
            hub id (recorded as given, with the weights' fingerprint).
        num_steps: the sampler the drafter is for (respaced steps); training uses its steps.
        objective: "delta_sq" (mean delta^2), "tv" (mean rejection probability) or "log_acceptance" (mean -log
            acceptance); see `mismatch_loss`.
        trajectory_fraction: share of each batch whose states come from the target's own sampling
            trajectories instead of forward-noised data (0 = data only).
        trajectory_chains: chains in the pool of target trajectories.
        trajectory_refresh: training steps between two new pools.
        optimizer: builds the optimizer from the drafter's parameters (the target is never in it).
        sample_shape: linked from the data by the CLI; must equal the target's.
        guidance_scale: for a conditional target, the classifier-free guidance scale the drafter is trained
            for (recorded in the checkpoint): the frozen target's outputs are the guided ones, on the
            data's labels with the target's own label dropout (so unconditional samples are drafted too).
        chain: the sampler the drafter is for (`specdiff_train.chains`, e.g. `DDIM(eta=0.5)`, or its
            {class_path, init_args} config, as in YAML); None: the target schedule's default chain
            (DDPM: ancestral). Training uses `schedule.plan(num_steps, chain)`; the checkpoint records it,
            and sampling with a chain of another family is refused (another setting is warned about).

    A conditional target needs the data's labels (`data.label_column`); the trajectory pool's chains
    cycle through the classes.
    """

    module_key = "net"

    def __init__(self, target_ckpt: str, num_steps: int = 100, objective: str = "delta_sq",
                 trajectory_fraction: float = 0.0, trajectory_chains: int = 256, trajectory_refresh: int = 1000,
                 optimizer: OptimizerCallable = torch.optim.AdamW, sample_shape: tuple[int, ...] | None = None,
                 guidance_scale: float = 1.0, chain: Chain | dict | None = None):
        super().__init__()
        check_objective(objective)
        if not 0.0 <= trajectory_fraction <= 1.0:
            raise ValueError(f"model.init_args.trajectory_fraction: expected a value in [0, 1], got {trajectory_fraction}")
        target = frozen_target(target_ckpt)
        if sample_shape is not None and tuple(sample_shape) != tuple(target.sample_shape):
            raise ValueError(f"data.sample_shape {tuple(sample_shape)} differs from the target's "
                             f"{tuple(target.sample_shape)}: use the target's dataset")
        self._target = [target]  # a list: kept out of the state dict, the optimizer and .parameters()
        self.num_classes = num_classes_of(target)
        self.guidance_scale = _check_training_guidance(target, guidance_scale)
        self.schedule: Schedule = target.schedule
        chain = training_chain(chain, self.schedule)
        try:
            self.plan = self.schedule.plan(num_steps, chain)
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        try:
            check_stochastic(self.plan)  # a drafter of a deterministic chain could never be verified
        except ValueError as err:
            raise ValueError(f"model.init_args.{err}") from None
        self.sample_shape = tuple(target.sample_shape)
        self.target_ckpt, self.optimizer, self.objective = str(target_ckpt), optimizer, objective
        self.trajectory_fraction, self.trajectory_chains = float(trajectory_fraction), int(trajectory_chains)
        self.trajectory_refresh = int(trajectory_refresh)
        self._pool: torch.Tensor | None = None
        self._pool_labels: torch.Tensor | None = None
        self._pool_step = -1

    def record_hparams(self, **extra: Any) -> None:
        """Plain-data hyperparameters that rebuild the drafter without the YAML (see `load_drafter`)."""
        module = getattr(self, self.module_key)
        config = module_config(module)
        if config is None:
            raise ValueError(f"model.init_args.{self.module_key}: cannot record how to rebuild "
                             f"{type(module).__name__} (keep its constructor arguments as attributes of the same name)")
        self.save_hyperparameters(dict(
            _class_path=class_path(self), **{self.module_key: config}, target_ckpt=self.target_ckpt,
            target_fingerprint=target_fingerprint(self.target),
            target_step=(getattr(self.target, "checkpoint_info", None) or {}).get("global_step"),
            num_steps=self.plan.num_steps, objective=self.objective, trajectory_fraction=self.trajectory_fraction,
            schedule=self.schedule.config(), schedule_class=class_path(self.schedule),
            chain=chain_record(self.plan.chain), sample_shape=list(self.sample_shape), num_classes=self.num_classes,
            guidance_scale=self.guidance_scale, **extra,
        ))

    @property
    def target(self) -> TargetDiffusion:
        return self._target[0]

    def on_fit_start(self) -> None:
        self.target.to(self.device)

    def on_validation_start(self) -> None:
        self.target.to(self.device)

    def target_output(self, x: torch.Tensor, t: torch.Tensor, labels=None, return_features: bool = False):
        """The frozen target's (guided, for a conditional target) outputs, as the sampler computes them."""
        return guided_output(self.target, x, t, labels, self.guidance_scale, return_features)

    def target_with(self, labels):
        """`target(x, t)` with the rows' labels bound: what the trajectory functions call."""
        return lambda x, t: self.target_output(x, t, labels)

    # --- training states ------------------------------------------------------------------------
    def start_states(self, x0: torch.Tensor, gen: torch.Generator, num_steps: int, use_pool: bool = True,
                     labels: torch.Tensor | None = None):
        """(states, steps k, noise, labels): steps uniform in [0, num_steps); states forward-noised from x0
        (noise returned for the data loss), a `trajectory_fraction` of them (with their labels) from
        target trajectories."""
        k = torch.randint(0, num_steps, (len(x0),), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        x = self.schedule.q_sample(x0, self.plan.t(k), noise)
        n_traj = round(self.trajectory_fraction * len(x0)) if use_pool else 0
        if n_traj:
            pool = self.trajectory_pool(x0)
            chain = torch.randint(0, pool.shape[1], (n_traj,), generator=gen).to(x0.device)
            x[:n_traj] = pool[k[:n_traj], chain].to(x.dtype)
            if labels is not None:
                labels = labels.clone()
                labels[:n_traj] = self._pool_labels[chain]
        return x, k, noise, labels

    def trajectory_pool(self, like: torch.Tensor) -> torch.Tensor:
        """The current pool of target trajectories; renewed every `trajectory_refresh` training steps.
        A conditional target's chains cycle through the classes (`_pool_labels`)."""
        stale = self._pool is None or (self.training and self.global_step - self._pool_step >= self.trajectory_refresh)
        if stale:
            gen = torch.Generator().manual_seed(1_000_003 * self.global_rank + self.global_step)
            chains = self.trajectory_chains
            self._pool_labels = (torch.arange(chains, device=like.device) % self.num_classes
                                 if self.num_classes else None)
            self._pool = target_trajectories(self.target_with(self._pool_labels), self.plan, chains, self.sample_shape,
                                             gen, device=like.device, dtype=like.dtype)
            self._pool_step = self.global_step
        return self._pool

    # --- loop -----------------------------------------------------------------------------------
    def _data(self, batch, gen: torch.Generator | None = None):
        """(data, labels or None): the target's own batch reading; a conditional target's labels are
        dropped to the null label at the target's `p_uncond` rate (drawn from `gen`)."""
        x0, labels = split_batch(batch, self.num_classes, check_range=not self.training)
        p_uncond = float(getattr(self.target, "p_uncond", 0) or 0)
        if labels is not None and p_uncond > 0 and gen is not None:
            drop = (torch.rand(labels.shape, generator=gen) < p_uncond).to(labels.device)
            labels = labels.masked_fill(drop, NULL_LABEL)
        return x0, labels

    def losses(self, x0: torch.Tensor, gen: torch.Generator, labels: torch.Tensor | None = None):
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int):
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))  # follows seed_everything
        x0, labels = self._data(batch, gen)
        loss, delta_sq, _, _ = self.losses(x0, gen, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"drafter loss is {loss.item()} at step {self.global_step}: lower the learning rate "
                                     "(model.init_args.optimizer.init_args.lr)")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        self.log("train/delta", delta_sq.sqrt().mean(), batch_size=len(x0))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, torch.Tensor] = {}

    def validation_step(self, batch, batch_idx: int) -> None:
        gen = torch.Generator().manual_seed(batch_idx)  # the same states and noise at every validation
        x0, labels = self._data(batch, gen)
        _, delta_sq, k, extra = self.losses(x0, gen, labels)
        self.log_mismatch("val", delta_sq, k)
        # a kind whose validation also has the Free Drafter's (x0) delta^2 on the same states returns it per row
        free_sq = extra.pop("free_delta_sq", None)
        per_row = {"acceptance": delta_sq}
        if free_sq is not None:
            per_row["free_acceptance"] = free_sq
            extra["free_acceptance"] = one_step_acceptance(free_sq.double().sqrt()).mean().float()
        for name, sq in per_row.items():
            sums = acceptance_by_fifth(self.plan, k, one_step_acceptance(sq.double().sqrt()))
            self._val_sums[name] = self._val_sums[name] + sums if name in self._val_sums else sums
        for name, value in extra.items():
            self.log(f"val/{name}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Keep this validation's acceptance per fifth for the checkpoint (`on_save_checkpoint`); the sanity
        check's two batches are not a validation."""
        sums = getattr(self, "_val_sums", {})
        if self.trainer.sanity_checking or "acceptance" not in sums:
            return
        reduce = lambda s: self.trainer.strategy.reduce(s, reduce_op="sum")  # noqa: E731  (all ranks' rows)
        free = sums.get("free_acceptance")
        self.validation_acceptance = acceptance_record(reduce(sums["acceptance"]), None if free is None else reduce(free),
                                                       self.plan, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record = getattr(self, "validation_acceptance", None)
        if record is not None:
            checkpoint["validation_acceptance"] = record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run keeps the last validation's record until it validates again."""
        if checkpoint.get("validation_acceptance") is not None:
            self.validation_acceptance = checkpoint["validation_acceptance"]

    def log_mismatch(self, prefix: str, delta_sq: torch.Tensor, k: torch.Tensor) -> None:
        """Mean delta and acceptance, overall and per fifth of diffusion time (t0.0 = near the data)."""
        delta = delta_sq.double().sqrt()
        acc = one_step_acceptance(delta)
        self.log(f"{prefix}/delta", delta.mean().float(), sync_dist=True, batch_size=len(delta))
        self.log(f"{prefix}/acceptance", acc.mean().float(), sync_dist=True, batch_size=len(delta))
        bucket = time_bucket(self.plan, k)
        for b in range(NUM_BUCKETS):
            mask = bucket == b
            if mask.any():  # buckets without rows are not logged (a fixed seed makes that rare and stable)
                self.log(f"{prefix}/delta_t{b / NUM_BUCKETS:.1f}", delta[mask].mean().float(), sync_dist=True)
                self.log(f"{prefix}/acceptance_t{b / NUM_BUCKETS:.1f}", acc[mask].mean().float(), sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer(getattr(self, self.module_key).parameters())


# --- sampling ---------------------------------------------------------------------------------------
class LearnedDrafter(Drafter):
    """A drafter with a trained module: it knows the schedule, sample shape and sampler chain it was trained
    for (`target_schedule`, `sample_shape`, `trained_chain`) and refuses any other target, and a sampling
    chain of another class (family); the same class with other settings (DDIM eta) stays exact and is warned
    about. A drafter trained for a conditional target records the guidance scale it was distilled at
    (`trained_guidance_scale`); sampling at another scale stays exact and is warned about (the drafts fit the
    other scale's chain less well)."""

    module: torch.nn.Module
    target_schedule: Schedule
    sample_shape: tuple[int, ...]
    trained_chain: Chain
    checkpoint: str | None = None
    trained_guidance_scale: float | None = None  # None: trained for an unconditional target
    trained_num_steps: int | None = None  # the sampler's step count it was distilled for (None: not recorded)

    def _set(self, module: torch.nn.Module, schedule: Schedule, sample_shape, hparams: dict | None = None,
             chain: Chain | dict | None = None) -> None:
        """`chain`: the chain the module was trained for (None: the schedule's default, as checkpoints that
        record none)."""
        self.module = module.eval().requires_grad_(False)
        self.target_schedule, self.sample_shape = schedule, tuple(int(s) for s in sample_shape)
        self.trained_chain = as_chain(chain) if chain is not None else schedule.default_chain()
        if (hparams or {}).get("num_classes"):
            self.trained_guidance_scale = float(hparams.get("guidance_scale", 1.0))
        steps = (hparams or {}).get("num_steps")
        self.trained_num_steps = None if steps is None else int(steps)

    def _where(self) -> str:
        return f" ({self.checkpoint})" if self.checkpoint else ""

    def check_chain(self, plan: SamplingPlan) -> None:
        """A one-line ValueError when sampling uses a chain of another class than the drafter was trained for;
        a warning when only its settings differ (samples stay exact, acceptance is lower)."""
        trained, used = self.trained_chain, plan.chain
        if used == trained or _same_steps(plan, trained):  # e.g. DDIM(eta=1) and DDPM ancestral: the same tables
            return
        if type(used) is not type(trained):
            raise ValueError(
                f"chain: drafter {self.describe()}{self._where()} was trained for the chain {trained!r}, but sampling "
                f"uses {used!r}; sample with chain={trained!r}, or train the drafter for this chain "
                f"(--model.init_args.chain '{chain_flag(used)}')")
        warnings.warn(f"chain: drafter {self.describe()}{self._where()} was trained for {trained!r}, sampling uses "
                          f"{used!r}: samples stay exact, acceptance is lower; train it with --model.init_args.chain "
                          f"'{chain_flag(used)}'", stacklevel=4)

    def check_num_steps(self, plan: SamplingPlan) -> None:
        """A warning when sampling uses another step count than the drafter was distilled for: its offsets and
        steps are other steps then (samples stay exact, acceptance is lower)."""
        trained = self.trained_num_steps
        if trained is not None and plan.num_steps != trained:
            warnings.warn(f"num_steps: drafter {self.describe()}{self._where()} was trained for the {trained}-step "
                          f"sampler, sampling uses {plan.num_steps} steps: samples stay exact, acceptance is lower; "
                          f"train it with --model.init_args.num_steps {plan.num_steps}", stacklevel=4)

    def check_compatible(self, schedule: Schedule, sample_shape) -> None:
        problems = self.target_schedule.mismatch(schedule)
        if tuple(sample_shape) != self.sample_shape:
            problems.append(f"sample_shape: {self.sample_shape} != {tuple(sample_shape)}")
        if problems:
            raise ValueError(
                f"drafter {self.describe()}{self._where()} was trained for another target: " + "; ".join(problems)
                + ". Train one from this target's checkpoint (configs/drafter/*.yaml with --model.init_args.target_ckpt)."
            )

    def bind(self, context: DraftContext) -> None:
        super().bind(context)  # refuses another target (`check_compatible`) before the chain is compared
        self.check_chain(context.plan)
        self.check_num_steps(context.plan)
        self.module.to(device=context.device, dtype=context.dtype)
        trained = self.trained_guidance_scale
        if trained is not None and context.labels is not None and trained != context.guidance_scale:
            warnings.warn(f"drafter {self.describe()}{f' ({self.checkpoint})' if self.checkpoint else ''} was trained "
                          f"for guidance scale {trained:g}, sampling uses {context.guidance_scale:g}: samples stay exact, "
                          "acceptance is lower; train it with --model.init_args.guidance_scale "
                          f"{context.guidance_scale:g}", stacklevel=3)
