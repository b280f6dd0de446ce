"""`python train.py evaluate`: speculative inference against ancestral sampling, as a report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..compiling import compile_mode
from ..guidance import NULL_LABEL, num_classes_of
from ..speculative import Drafter
from ..drafters import training_free_drafters
from .compare import (DEFAULT_DRAFTERS, Quality, check_permutations, compare_methods, method_grid, sample_labels,
                      window_options)
from .chain_options import chain_options, chain_tag, resolve_chains
from .reporting import chain_note, markdown_table, write_report


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


def sample_key(row: dict, with_chain: bool = False) -> str:
    """A row's key in samples.pt: method@num_steps, @s<scale> for a guided (conditional) target, and
    @<chain> (its repr without spaces) `with_chain` (a report of several chains)."""
    key = f"{row['method']}@{row['num_steps']}"
    key = key if row.get("guidance_scale") is None else f"{key}@s{row['guidance_scale']:g}"
    return f"{key}@{chain_tag(row['chain'])}" if with_chain and row.get("chain") else key


def classifier_for(sample_shape, num_classes: int, extractor=None):
    """`features.label_classifier` (the label-accuracy classifier, or None), imported only for a conditional
    image target (torchmetrics is not loaded otherwise)."""
    if num_classes <= 0 or len(sample_shape) != 3:
        return None
    from .features import label_classifier

    return label_classifier(sample_shape, num_classes, extractor)


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


def _check_options(model, *, num_samples, num_permutations, alpha, windows, cost_model, compile, labels,
                   guidance_scale, chain, num_steps, **_) -> None:
    """Bad options are refused before any sampling (and before DDP starts the ranks)."""
    chains = chain_options(chain, "evaluate.chain")
    schedule = getattr(model, "schedule", None)
    if schedule is not None:  # the chains fit the target's schedule and can be speculated at every num_steps
        resolve_chains(chains, schedule, num_steps or DEFAULT_NUM_STEPS, "evaluate.chain")
    check_permutations(num_permutations, alpha)
    window_options(windows, cost_model)
    compile_mode(compile, "cpu")
    sample_labels(model, labels, guidance_scale, num_samples)


DEFAULT_NUM_STEPS = [100]
WHOLE_DATA = "data of all classes, in the data's proportions"


def reference_data(datamodule, labels: list[int] | None, num_samples: int, seed: int = 0) -> dict:
    """The data that the samples' quality (FID/KID, energy distance) is measured against, as `Quality`'s
    fields: `reference` (None without data), and for labelled samples `reference_note` (what it is) and
    `reference_labels` (the strata of the data tests, when the labels match). Unconditional targets get
    `num_samples` data points. Conditional samples get data of the same label mix, point for point (a point
    of the sample's class; any point for a null label), from a pool of 4x (else 2x) as many data points;
    when the pool is too small or unlabelled, all classes in the data's proportions, and the note says so."""
    if datamodule is None or not hasattr(datamodule, "reference_samples"):
        return dict(reference=None)
    if labels is None:
        return dict(reference=datamodule.reference_samples(num_samples, seed=seed))
    if all(label == NULL_LABEL for label in labels):
        return dict(reference=datamodule.reference_samples(num_samples, seed=seed), reference_labels=labels,
                    reference_note=WHOLE_DATA + " (the samples are unconditional)")
    if getattr(datamodule, "label_column", None) is not None and hasattr(datamodule, "reference_labels"):
        for factor in (4, 2):
            try:
                pool = datamodule.reference_samples(factor * num_samples, seed=seed)
            except ValueError:  # fewer data points than the pool
                continue
            pick = matched_indices(datamodule.reference_labels(factor * num_samples, seed=seed).tolist(), labels)
            if pick is not None:
                return dict(reference=pool[pick], reference_labels=labels,
                            reference_note="data of the samples' label mix (a data point of each sample's class)")
            break
    return dict(reference=datamodule.reference_samples(num_samples, seed=seed),
                reference_note=WHOLE_DATA + ", not the samples' label mix (too few labelled data points of some class)")


def matched_indices(pool_labels: list[int], labels: list[int]) -> list[int] | None:
    """Indices into a pool of labelled data points, one per label and all distinct: the next unused point
    of that class, or for `NULL_LABEL` the next unused point of any class; None if a class runs out."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(pool_labels):
        by_class.setdefault(label, []).append(index)
    pick = []
    for label in labels:
        if label != NULL_LABEL and not by_class.get(label):
            return None
        pick.append(None if label == NULL_LABEL else by_class[label].pop(0))
    rest = iter(sorted(set(range(len(pool_labels))) - set(pick)))
    return [next(rest) if index is None else index for index in pick]


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
        labels: str | list[int] | None = None,
        guidance_scale: float | list[float] | None = None,
        chain: str | dict | list | None = None,
    ) -> dict:
        """Compare speculative sampling (every drafter x verifier x window) with ancestral sampling: writes
        report.json, report.md and PNG plots to `out_dir` and prints the table. With `--trainer.devices N
        --trainer.strategy ddp` the seeds are split over N processes and gathered.

        Args:
            model: the target (from the config; its weights come from `ckpt_path`).
            datamodule: the data, for quality against reference samples (optional).
            ckpt_path: target checkpoint to evaluate (EMA weights are used), or a diffusers DDPMPipeline
                folder or hub id (the model is then that pipeline's `DiffusersTarget`; no target config needed).
            drafters: training-free drafter names (free-eps, free-x0, free-increment, frozen-eps, frozen-x0,
                frozen-increment) or drafters by class_path (default: free-x0, free-eps, frozen-eps).
            verifiers: "block", "tokenwise" (reflection) and/or "tokenwise-residual" (default: block, tokenwise).
            windows: drafted steps per round (default: 3, 8): ints, 'auto' (cost-aware: the window, 0 to 16, that
                commits the most steps per second) or 'heuristic' (+2 after a fully accepted round, -1 otherwise).
            num_steps: sampling steps to evaluate at (default: 100).
            num_samples: samples per method (seeds seed .. seed + num_samples - 1, shared by all methods).
            batch_size: chains sampled together.
            seed: first seed.
            out_dir: where the report goes (default: <trainer.default_root_dir>/evaluate).
            alpha: exactness check level: flags a method whose p-value against ancestral samples falls below it.
            num_permutations: two-sample test permutations P; refused unless 1/(1 + P) < alpha (P >= 100 at 0.01).
            feature_net: feature network for image metrics (default: the shipped digits network, for 1x8x8 images).
            save_samples: also write samples.pt ({method: samples} per num_steps) beside the report.
            cost_model: for reproducible 'auto' windows, round times instead of measured ones (`costs.CostModel`):
                {target_rows: [...], target_s: [...] (seconds of a target call at those rows), draft_step_s, round_s}.
            compile: compiled rounds and steps (True or a torch.compile mode; docs/performance.md).
            labels: a conditional target's labels: 'classes' (default: classes in order), 'cycle' (sample i: class
                i % num_classes), 'none' (unconditional) or a list of ints repeated over the samples.
            guidance_scale: a conditional target's guidance scale or a list (rows per scale; default: val_guidance_scale).
            chain: the sampler of the baseline and every method (default: the target's; the report names it): a name
                (ddpm, ddim, edm, flow; ddim:eta=0.5, flow:churn=0.5), a {class_path, init_args} config, or a list.
        """
        options = {k: v for k, v in locals().items() if k not in ("self", "model", "datamodule")}  # the parameters
        _check_options(model, **options)
        if self.strategy.launcher is not None:  # DDP: start the other ranks as fit does
            return self.strategy.launcher.launch(self._evaluate, model, datamodule, trainer=self, **options)
        return self._evaluate(model, datamodule, **options)

    def _evaluate(self, model, datamodule, *, ckpt_path, drafters, verifiers, windows, num_steps, num_samples,
                  batch_size, seed, out_dir, alpha, num_permutations, feature_net, save_samples, cost_model,
                  compile, labels, guidance_scale, chain) -> dict:
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
        extractor = image_feature_extractor(shape, feature_net)
        reference = reference_data(datamodule, sample_labels(model, labels, guidance_scale, num_samples)[0],
                                   num_samples, seed)
        quality = Quality(feature_extractor=extractor, num_permutations=num_permutations, seed=seed, **reference,
                          classifier=classifier_for(shape, num_classes_of(model), extractor))
        num_steps = num_steps or DEFAULT_NUM_STEPS
        report = compare_methods(
            model, model.schedule, shape, methods, num_steps=num_steps, seeds=range(seed, seed + num_samples),
            batch_size=batch_size, quality=quality, alpha=alpha, progress=_progress_enabled(), log=rank_zero_info,
            compile=compile, labels=labels, guidance_scale=guidance_scale, chain=chain,  # checked in _check_options
        )
        report["config"]["ckpt_path"] = ckpt_path
        report["warnings"] = notes
        if self.is_global_zero:
            out = Path(out_dir or Path(self.default_root_dir) / "evaluate")
            paths = write_report(report, out)
            if save_samples:
                several = len(report["config"]["chains"]) > 1
                torch.save({sample_key(r, several): r["_samples"].cpu() for r in report["results"]}, out / "samples.pt")
            if chain_note(report):
                print(chain_note(report) + "\n")
            print(markdown_table(report))
            for note in notes:
                print(f"\nWARNING: {note}")
            print(f"\nreport: {paths['markdown']} (numbers in {paths['json'].name}, plots beside them)")
        self.strategy.barrier()
        return report
