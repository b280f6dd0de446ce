"""A callback that measures speculative sampling against ancestral sampling during `fit`."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging

from ..compiling import compile_mode
from ..guidance import num_classes_of
from .chain_options import chain_options, chain_tag, resolve_chains
from .command import classifier_for, reference_data, resolve_drafters
from .compare import (DEFAULT_DRAFTERS, Quality, check_label_options, check_permutations, compare_methods, method_grid,
                      sample_labels)
from .reporting import write_report


def ema_model(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The EMA copy kept by Lightning's weight-averaging callback, else the module itself.
    Reading the copy needs no weight swap, so this works whatever the order of the callbacks."""
    for callback in trainer.callbacks:
        averaged = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if averaged is not None:
            return averaged.module
    return pl_module


def flat_metrics(report: dict) -> dict[str, float]:
    """Logger-ready numbers: spec/<method>/<num_steps>steps[/guidance<scale>][/<chain>]/<metric> (the chain, its
    repr without spaces, only in a report of several chains; the ancestral rows: label accuracy only, for a
    conditional target with a classifier)."""
    metrics = {}
    several_chains = len(report["config"].get("chains", [])) > 1
    for r in report["results"]:
        prefix = f"spec/{r['method']}/{r['num_steps']}steps"
        if r.get("guidance_scale") is not None:  # a conditional target: one set of numbers per scale
            prefix += f"/guidance{r['guidance_scale']:g}"
        if several_chains:
            prefix += f"/{chain_tag(r['chain'])}"
        if "label_accuracy" in r:
            metrics[f"{prefix}/label_accuracy"] = float(r["label_accuracy"])
        if r["method"] == "ancestral":
            continue
        for key in ("target_calls_per_sample", "speedup", "acceptance_rate", "mean_accepted_per_round",
                    "wall_clock_ratio"):
            metrics[f"{prefix}/{key}"] = float(r[key])
        metrics[f"{prefix}/exactness_p"] = float(min(r["vs_ancestral"]["energy_p_value"], r["vs_ancestral"]["mmd_p_value"]))
        for b, value in enumerate(r["acceptance_by_time"]):
            if value is not None:
                metrics[f"{prefix}/acceptance_t{b / len(r['acceptance_by_time']):.1f}"] = float(value)
        for key, value in r.get("vs_data", {}).items():
            if key in ("energy_distance", "fid", "kid_mean"):
                metrics[f"{prefix}/data_{key}"] = float(value)
    return metrics


class SpeculativeEvaluation(Callback):
    """Every `every_n_epochs` epochs and at the end of `fit`, sample a fixed list of seeds with
    ancestral sampling and each speculative method (EMA weights when EMA is on), log the costs,
    acceptance (overall and per diffusion-time bucket), exactness p-values and quality to the
    logger, and write the report and plots under `<log_dir>/speculative/`.

    Under DDP every rank samples its share of the seeds (seeds[rank::world]) and the parts are
    gathered on all ranks, so the numbers equal the single-process ones; rank 0 logs and writes.

    Args:
        drafters: training-free drafter names or Drafter objects (default, as `evaluate`: free-x0,
            free-eps, frozen-eps).
        verifiers: "block", "tokenwise", "tokenwise-residual" (default, as `evaluate`: block, tokenwise).
        windows: drafted steps per round (default, as `evaluate`: 3, 8): each an int, 'auto' (cost-aware:
            chooses each round's window, 0 to 16, that commits the most steps per second on this device;
            round times measured as it runs) or 'heuristic' (+2 after a fully accepted round, -1 otherwise).
        num_steps: sampling steps (default: 50).
        num_samples: seeds 0..num_samples-1 (fixed across epochs, so numbers are comparable).
        batch_size: chains sampled together (default: all).
        every_n_epochs: evaluation period in epochs (0: only at the end of fit).
        num_permutations: permutations of the exactness test; at least the count whose smallest p-value
            1/(1 + num_permutations) is below alpha (100 for alpha 0.01), else refused.
        alpha: exactness check level (a method whose p-value against ancestral samples from other seeds
            falls below it is flagged, `exact_ok` False).
        cost_model: for reproducible 'auto' windows, the round times instead of measuring them:
            {target_rows: [...], target_s: [...], draft_step_s: ..., round_s: ...} (`costs.CostModel`).
        compile: sample with compiled rounds and steps (True, or a torch.compile mode; docs/performance.md).
            The first evaluation compiles the graphs (reported as compile_s, apart from the wall-clock);
            later ones reuse them while the network and the shapes stay the same (weights are graph inputs).
        labels: a conditional target's labels, as `evaluate`'s: 'classes' (default: classes in order; the
            sample pictures show one class per row), 'cycle', 'none' or a list of ints. Unconditional: leave unset.
        guidance_scale: a conditional target's guidance scale, or a list (default: its val_guidance_scale).
            Conditional 1x8x8 targets with 10 classes also get the shipped digits classifier's label accuracy.
        chain: the sampler family of the ancestral baseline and every method, as `evaluate`'s (default: the
            target schedule's): {class_path: specdiff_train.chains.DDIM, init_args: {eta: 0.5}}, a name such as
            ddim:eta=0.5, edm or flow:churn=0.5, a `specdiff_train.chains` chain, or a list (logged per chain).
            Checked against the target's schedule when fit starts.
    """

    def __init__(
        self,
        drafters: list | None = None,
        verifiers: list[str] | None = None,
        windows: list[int | str] | None = None,
        num_steps: list[int] | None = None,
        num_samples: int = 256,
        batch_size: int | None = None,
        every_n_epochs: int = 1,
        num_permutations: int = 100,
        alpha: float = 0.01,
        cost_model: dict | None = None,
        compile: bool | str = False,
        labels: str | list[int] | None = None,
        guidance_scale: float | list[float] | None = None,
        chain: str | dict | list | None = None,
    ):
        if num_samples < 2:
            raise ValueError(f"SpeculativeEvaluation.num_samples: the two-sample tests need >= 2, got {num_samples}")
        if every_n_epochs < 0:
            raise ValueError(f"SpeculativeEvaluation.every_n_epochs: expected >= 0, got {every_n_epochs}")
        check_permutations(num_permutations, alpha, "SpeculativeEvaluation.num_permutations")
        self.alpha, self.compile = alpha, compile
        compile_mode(compile, "cpu")  # a bad mode: refused when the callback is made
        # Methods keep the window options: each evaluation makes fresh policies (`Method.policy`).
        self.methods = method_grid(resolve_drafters(drafters or DEFAULT_DRAFTERS), verifiers, windows, cost_model)
        self.num_steps = num_steps or [50]
        self.num_samples, self.batch_size = num_samples, batch_size
        self.every_n_epochs, self.num_permutations = every_n_epochs, num_permutations
        check_label_options(labels, guidance_scale)  # the rest once the target is known (`setup`)
        self.labels, self.guidance_scale = labels, guidance_scale
        self.chains = chain_options(chain, "SpeculativeEvaluation.chain")  # checked against the target in `setup`
        self.last_report: dict | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Labels, scales and chains that this target cannot take are refused before training starts.
        sample_labels(pl_module, self.labels, self.guidance_scale, self.num_samples)
        resolve_chains(self.chains, pl_module.schedule, self.num_steps, "SpeculativeEvaluation.chain")

    def _quality(self, trainer: Trainer, model: LightningModule, labels: list[int] | None) -> Quality:
        """Raw-sample tests against the data (of the samples' label mix), and label accuracy where the
        shipped digits classifier fits the target (loaded once)."""
        reference = reference_data(getattr(trainer, "datamodule", None), labels, self.num_samples)
        if not hasattr(self, "_classifier"):
            self._classifier = classifier_for(tuple(model.sample_shape), num_classes_of(model))
        return Quality(num_permutations=self.num_permutations, classifier=self._classifier, **reference)

    def _evaluate(self, trainer: Trainer, model: LightningModule, tag: str) -> None:
        if trainer.sanity_checking:
            return
        labels = sample_labels(model, self.labels, self.guidance_scale, self.num_samples)[0]
        quality = self._quality(trainer, model, labels)
        was_training = model.training
        model.eval()
        try:
            report = compare_methods(model, model.schedule, tuple(model.sample_shape), self.methods,
                                     num_steps=self.num_steps, seeds=range(self.num_samples),
                                     batch_size=self.batch_size, quality=quality, alpha=self.alpha,
                                     compile=self.compile, labels=self.labels, guidance_scale=self.guidance_scale,
                                     chain=self.chains)
        finally:
            model.train(was_training)
        self.last_report = report
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask for it
        if trainer.is_global_zero:  # loggers and files: rank 0 only (every rank holds the full report)
            if trainer.logger is not None:
                trainer.logger.log_metrics(flat_metrics(report), step=trainer.global_step)
            write_report(report, Path(log_dir or trainer.default_root_dir) / "speculative" / tag)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            with torch.no_grad():
                self._evaluate(trainer, ema_model(trainer, pl_module), f"epoch={epoch:03d}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After fit, Lightning's EMA callback has copied the averaged weights into the module.
        with torch.no_grad():
            self._evaluate(trainer, pl_module, "final")
