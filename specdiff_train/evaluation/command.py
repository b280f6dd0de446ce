"""`python train.py evaluate`: speculative inference against ancestral sampling, as a report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..compiling import compile_mode
from ..speculative import Drafter
from ..drafters import training_free_drafters
from .compare import DEFAULT_DRAFTERS, Quality, check_permutations, compare_methods, method_grid, window_options
from .reporting import markdown_table, write_report


def resolve_drafters(drafters: list) -> dict:
    """Drafter factories by label: short names of the training-free drafters, or Drafter objects
    (from `class_path` in YAML; `bind` resets their state at each run)."""
    known = training_free_drafters()
    out = {}
    for item in drafters:
        if isinstance(item, dict) and "class_path" in item:  # a config read from YAML by hand
            from jsonargparse import ArgumentParser

            parser = ArgumentParser(exit_on_error=False)
            parser.add_argument("--drafter", type=Drafter)
            item = parser.instantiate_classes(parser.parse_object({"drafter": item})).drafter
        if isinstance(item, Drafter):
            out[item.describe()] = lambda item=item: item
        elif item in known:
            out[item] = known[item]
        else:
            raise ValueError(
                f"drafters: unknown drafter {item!r}; use one of {sorted(known)} or a Drafter given by class_path"
            )
    return out


def image_feature_extractor(sample_shape: tuple[int, ...], feature_net: str | None = None):
    """The feature network for image metrics on samples of `sample_shape` (C, H, W), or None (no image
    metrics): `feature_net` when given, else the shipped digits network when it takes that shape."""
    if len(sample_shape) != 3:
        return None
    from .features import DIGITS_FEATURES, load_feature_extractor  # torchmetrics: only when images are evaluated

    if feature_net:
        return load_feature_extractor(feature_net)
    if not DIGITS_FEATURES.exists():
        return None
    extractor = load_feature_extractor(DIGITS_FEATURES)
    return extractor if extractor.input_shape == tuple(sample_shape) else None


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and not os.environ.get("TQDM_DISABLE")


def _check_options(num_permutations, alpha, windows, cost_model, compile) -> None:
    """Bad options are refused before any sampling (and before DDP starts the ranks)."""
    check_permutations(num_permutations, alpha)
    window_options(windows, cost_model)
    compile_mode(compile, "cpu")


class SpecDiffTrainer(Trainer):
    """Lightning's Trainer plus the `evaluate` verb."""

    def evaluate(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        drafters: list[str | Drafter] | None = None,
        verifiers: list[str] | None = None,
        windows: list[int | str] | None = None,
        num_steps: list[int] | None = None,
        num_samples: int = 1000,
        batch_size: int | None = 256,
        seed: int = 0,
        out_dir: str | None = None,
        alpha: float = 0.01,
        num_permutations: int = 1000,
        feature_net: str | None = None,
        save_samples: bool = False,
        cost_model: dict | None = None,
        compile: bool | str = False,
    ) -> dict:
        """Compare speculative sampling (every drafter x verifier x window) with ancestral sampling.

        Writes report.json, report.md and PNG plots to `out_dir` and prints the table.

        Args:
            model: the target (from the config; its weights come from `ckpt_path`).
            datamodule: the data, for quality against reference samples (optional).
            ckpt_path: target checkpoint to evaluate (EMA weights are used), or a diffusers DDPMPipeline
                folder or hub id (the model is then that pipeline's `DiffusersTarget`; no target config needed).
            drafters: training-free drafter names (free-eps, free-x0, free-increment, frozen-eps,
                frozen-x0, frozen-increment) or drafters by class_path (default: free-x0, free-eps, frozen-eps).
            verifiers: "block", "tokenwise" (reflection) and/or "tokenwise-residual" (default: block, tokenwise).
            windows: drafted steps per round (default: 3, 8): each an int, 'auto' (cost-aware: each round the
                window, 0 to 16, that commits the most steps per second, from round times measured as it runs)
                or 'heuristic' (+2 after a fully accepted round, -1 otherwise).
            num_steps: sampling steps to evaluate at (default: 100).
            num_samples: samples per method (seeds seed .. seed + num_samples - 1, shared by all methods).
            batch_size: chains sampled together.
            seed: first seed.
            out_dir: where the report goes (default: <trainer.default_root_dir>/evaluate).
            alpha: exactness check level: a method whose p-value against ancestral samples (drawn from
                seeds disjoint from the methods', above them) falls below it is flagged.
            num_permutations: permutations of the two-sample tests; at least the count whose smallest
                p-value 1/(1 + num_permutations) is below alpha (100 for alpha 0.01), else refused.
            feature_net: feature network for image metrics (default: the shipped digits network, for images
                of its input shape 1x8x8; other image shapes get no FID/KID without one).
            save_samples: also write samples.pt ({method: samples} per num_steps) beside the report.
            cost_model: for reproducible 'auto' windows, round times instead of measured ones (`costs.CostModel`):
                {target_rows: [...], target_s: [...] (seconds of a target call at those rows), draft_step_s, round_s}.
            compile: compiled rounds and steps (True or a torch.compile mode; docs/performance.md).

        With `--trainer.devices N --trainer.strategy ddp` the seeds are split over N processes and gathered.
        """
        options = {name: value for name, value in locals().items()  # the parameters: nothing else is defined yet
                   if name not in ("self", "model", "datamodule")}
        _check_options(num_permutations, alpha, windows, cost_model, compile)
        if self.strategy.launcher is not None:  # DDP: start the other ranks as fit does
            return self.strategy.launcher.launch(self._evaluate, model, datamodule, trainer=self, **options)
        return self._evaluate(model, datamodule, **options)

    def _evaluate(self, model, datamodule, *, ckpt_path, drafters, verifiers, windows, num_steps, num_samples,
                  batch_size, seed, out_dir, alpha, num_permutations, feature_net, save_samples, cost_model,
                  compile) -> dict:
        from ..models import load_target
        from ..drafters.checkpoints import check_drafter_target

        if self.world_size > 1:
            self.strategy.setup_environment()  # the process group; each rank then samples its seeds
        if datamodule is not None and hasattr(datamodule, "prepare_data") and self.is_global_zero:
            datamodule.prepare_data()  # dataset caches are written once
        self.strategy.barrier()
        if ckpt_path is not None and str(ckpt_path) != getattr(model, "pretrained", None):  # a pipeline: loaded already
            model = load_target(ckpt_path)
        model = model.to(self.strategy.root_device).eval()
        shape = tuple(model.sample_shape)
        resolved = resolve_drafters(drafters or DEFAULT_DRAFTERS)
        # Learned drafters are compared with the target they are used with (weight fingerprints).
        notes = [note for make in resolved.values() if (note := check_drafter_target(make(), model))]
        methods = method_grid(resolved, verifiers, windows, cost_model)
        reference, extractor = None, image_feature_extractor(shape, feature_net)
        if datamodule is not None and hasattr(datamodule, "reference_samples"):
            reference = datamodule.reference_samples(num_samples, seed=seed)
        report = compare_methods(
            model, model.schedule, shape, methods, num_steps=num_steps or [100], seeds=range(seed, seed + num_samples),
            batch_size=batch_size, quality=Quality(reference, extractor, num_permutations, seed), alpha=alpha,
            progress=_progress_enabled(), log=rank_zero_info, compile=compile,
        )
        report["config"]["ckpt_path"] = ckpt_path
        report["warnings"] = notes
        if self.is_global_zero:
            out = Path(out_dir or Path(self.default_root_dir) / "evaluate")
            paths = write_report(report, out)
            if save_samples:
                torch.save({f"{r['method']}@{r['num_steps']}": r["_samples"].cpu() for r in report["results"]},
                           out / "samples.pt")
            print(markdown_table(report))
            for note in notes:
                print(f"\nWARNING: {note}")
            print(f"\nreport: {paths['markdown']} (numbers in {paths['json'].name}, plots beside them)")
        self.strategy.barrier()
        return report
