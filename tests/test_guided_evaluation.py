"""Evaluation of class-conditional targets with classifier-free guidance: label policies, rows per guidance
scale, label accuracy by the shipped digits classifier, the same labels for every sampler, one-line errors
before any sampling, the evaluate command and the callback's class-per-row pictures.

Tiny untrained conditional U-Nets (8 channels) keep each test to seconds; their samples are noise, so the
numbers are checked for presence and range, not for quality."""
import json

import pytest
import torch

from helpers import ROOT
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.evaluation.command import SpecDiffTrainer, classifier_for, matched_indices, resolve_drafters
from specdiff_train.evaluation.compare import Quality, compare_methods, method_grid, sample_labels
from specdiff_train.evaluation.reporting import class_rows, markdown_table
from specdiff_train.guidance import NULL_LABEL, class_grid_labels
from specdiff_train.models import TargetDiffusion
from specdiff_train.nets import UNet
from specdiff_train.testing import GaussianDataDenoiser


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine, two threads per tiny conv ran 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_target(p_uncond: float = 0.1, val_guidance_scale: float = 2.0) -> TargetDiffusion:
    torch.manual_seed(0)
    net = UNet(base_channels=8, num_res_blocks=1, attention_levels=[], num_classes=10)
    return TargetDiffusion(net=net, p_uncond=p_uncond, val_guidance_scale=val_guidance_scale).eval()


def grid(window: int = 4):
    return method_grid(resolve_drafters(["free-x0"]), ["block"], [window])


def unconditional():
    schedule = DDPMSchedule(1000)
    return schedule, GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)


def test_label_policies_and_default_scale():
    model = tiny_target()
    assert sample_labels(model, None, None, 20) == (class_grid_labels(20, 10), [2.0])  # default: classes, val scale
    assert sample_labels(model, "cycle", 3, 12)[0] == [i % 10 for i in range(12)]
    assert sample_labels(model, "none", [0, 1.5], 3) == ([NULL_LABEL] * 3, [0.0, 1.5])
    assert sample_labels(model, [3], 1.0, 4)[0] == [3, 3, 3, 3]
    assert sample_labels(model, [1, -1], 1.0, 5)[0] == [1, -1, 1, -1, 1]
    schedule, gaussian = unconditional()
    assert sample_labels(gaussian, None, None, 8) == (None, [None])
    assert sample_labels(gaussian, None, 1.0, 8) == (None, [None])  # scale 1 is plain sampling


@torch.no_grad()
def test_compare_methods_gives_rows_per_scale_with_label_accuracy():
    model = tiny_target()
    report = compare_methods(model, model.schedule, (1, 8, 8), grid(), num_steps=[10], seeds=range(20),
                             quality=Quality(num_permutations=100, classifier=classifier_for((1, 8, 8), 10)),
                             labels="cycle", guidance_scale=[1.0, 3.0], warmup=False)
    rows = report["results"]
    assert [(r["method"], r["guidance_scale"]) for r in rows] == [
        ("ancestral", 1.0), ("free-x0/block/w4", 1.0), ("ancestral", 3.0), ("free-x0/block/w4", 3.0)]
    for r in rows:
        assert 0.0 <= r["label_accuracy"] <= 1.0
    for r in rows[1::2]:
        assert 0.0 <= r["vs_ancestral"]["energy_p_value"] <= 1.0 and 0.0 <= r["vs_ancestral"]["mmd_p_value"] <= 1.0
        assert len(r["acceptance_by_time"]) == 10 and "acceptance_rate" in r
    config = report["config"]
    assert config["labels"] == "cycle" and config["guidance_scales"] == [1.0, 3.0]
    assert config["label_counts"] == {str(c): 2 for c in range(10)} and config["label_accuracy_by"] == "DigitsClassifier"
    table = markdown_table(report)
    assert "| guidance |" in table and table.splitlines()[0].endswith("| label accuracy |")
    assert "| 10 | free-x0/block/w4 | 3 |" in table


def test_every_sampler_gets_the_same_labels_and_scale(monkeypatch):
    """Ancestral, its exactness reference (other seeds, same labels index for index), the methods and
    every warm-up sample with the same labels and scale."""
    import specdiff_train.evaluation.compare as compare

    calls = []

    def recording(real, kind):
        def run(*args, seeds, labels, guidance_scale, **kwargs):
            calls.append((kind, list(seeds), list(labels), guidance_scale))
            return real(*args, seeds=seeds, labels=labels, guidance_scale=guidance_scale, **kwargs)
        return run

    monkeypatch.setattr(compare, "ancestral_sample", recording(compare.ancestral_sample, "ancestral"))
    monkeypatch.setattr(compare, "speculative_sample", recording(compare.speculative_sample, "speculative"))
    model = tiny_target()
    with torch.no_grad():
        compare_methods(model, model.schedule, (1, 8, 8), grid(), num_steps=[3], seeds=range(5, 17), batch_size=6,
                        quality=Quality(num_permutations=100), labels=[2, 7, -1], guidance_scale=2.5)
    expected = dict(zip(range(5, 17), [2, 7, -1] * 4)) | dict(zip(range(17, 29), [2, 7, -1] * 4))
    kinds = [kind for kind, *_ in calls]
    assert kinds == ["ancestral", "ancestral", "ancestral", "speculative", "speculative"]  # warm-ups included
    assert calls[2][1] == list(range(17, 29))  # the exactness reference: disjoint seeds
    for _, seeds, labels, scale in calls:
        assert labels == [expected[s] for s in seeds] and scale == 2.5


BAD_OPTIONS = {
    "unknown policy": (dict(labels="random"), "labels: unknown label policy 'random'"),
    "not a class": (dict(labels=[3, 10]), "labels: 10 is not a class of this target"),
    "empty list": (dict(labels=[]), "labels: expected a policy name"),
    "negative scale": (dict(guidance_scale=-1.0), "guidance_scale: expected a number >= 0"),
    "one negative scale": (dict(guidance_scale=[2.0, -0.5]), "guidance_scale: expected a number >= 0"),
    "no scales": (dict(guidance_scale=[]), "guidance_scale: got an empty list"),
    "unguidable target": (dict(guidance_scale=2.0, p_uncond=0.0), "guidance_scale: the target was trained without"),
    "unconditional labels": (dict(labels="cycle", target="unconditional"), "labels: the target is unconditional"),
    "unconditional scale": (dict(guidance_scale=2.0, target="unconditional"), "guidance_scale: 2.0 needs a conditional"),
}


def _bad_case(case):
    options = dict(BAD_OPTIONS[case][0])
    target, p_uncond = options.pop("target", "conditional"), options.pop("p_uncond", 0.1)
    model = unconditional()[1] if target == "unconditional" else tiny_target(p_uncond=p_uncond)
    return model, options, BAD_OPTIONS[case][1]


def _one_line(err, expected):
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message, message


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_label_options_fail_in_one_line_before_any_sampling(case, monkeypatch, tmp_path):
    import specdiff_train.evaluation.compare as compare
    from specdiff_train.evaluation import SpeculativeEvaluation

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing the options")

    monkeypatch.setattr(compare, "ancestral_sample", no_sampling)
    monkeypatch.setattr(compare, "speculative_sample", no_sampling)
    model, options, expected = _bad_case(case)
    schedule = model.schedule
    shape = (2,) if isinstance(model, GaussianDataDenoiser) else (1, 8, 8)
    with pytest.raises(ValueError) as err:
        compare_methods(model, schedule, shape, grid(), num_steps=[5], seeds=range(8),
                        quality=Quality(num_permutations=100), **options)
    _one_line(err, expected)
    trainer = SpecDiffTrainer(logger=False, accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        trainer.evaluate(model, num_permutations=100, num_samples=8, out_dir=str(tmp_path), **options)
    _one_line(err, expected)
    with pytest.raises(ValueError) as err:  # the callback: at construction, or once it knows the target
        callback = SpeculativeEvaluation(num_samples=8, num_permutations=100, **options)
        callback.setup(trainer, model, "fit")
    _one_line(err, expected)


def test_class_rows_put_one_class_per_row():
    images = torch.arange(256.0).reshape(256, 1, 1, 1).expand(256, 1, 8, 8)
    samples, labels = class_rows(images, [i % 10 for i in range(256)])  # cycle: 25 or 26 of each class
    assert labels == [c for c in range(10) for _ in range(16)]  # at most 16 a row
    assert samples[:16, 0, 0, 0].tolist() == [10.0 * i for i in range(16)]  # class 0: samples 0, 10, 20, ...
    samples, labels = class_rows(images[:20], [-1, 3] * 10)
    assert labels == [-1] * 10 + [3] * 10
    assert class_rows(images, [-1] * 256)[1] is None and class_rows(images, None)[1] is None
    assert matched_indices([0, 1, 1, 0, 2], [1, -1, 0, 1]) == [1, 3, 0, 2]  # -1: the first unused point
    assert matched_indices([0, 1], [1, 1]) is None


def digits_data():
    from specdiff_train.data import DiffusionDataModule

    return DiffusionDataModule(dataset="digits", label_column="label", batch_size=32, cache_dir=str(ROOT / "data"))


def test_evaluate_command_reports_guided_rows_and_label_accuracy(tmp_path):
    trainer = SpecDiffTrainer(logger=False, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False)
    out = tmp_path / "report"
    report = trainer.evaluate(tiny_target(), digits_data(), drafters=["free-x0"], verifiers=["block"], windows=[4],
                              num_steps=[8], num_samples=20, batch_size=20, num_permutations=100, out_dir=str(out),
                              guidance_scale=[1.0, 2.0], save_samples=True)
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["labels"] == "classes" and saved["config"]["guidance_scales"] == [1.0, 2.0]
    assert saved["config"]["reference"].startswith("data of the samples' label mix")
    assert [(r["method"], r["guidance_scale"]) for r in saved["results"]] == [
        (m, s) for s in (1.0, 2.0) for m in ("ancestral", "free-x0/block/w4")]
    for r in saved["results"]:
        assert 0.0 <= r["label_accuracy"] <= 1.0 and "fid" in r["vs_data"]
    assert "| label accuracy |" in (out / "report.md").read_text()
    assert "Quality (FID / energy distance) against: data of the samples' label mix" in (out / "report.md").read_text()
    assert set(torch.load(out / "samples.pt")) == {f"{m}@8@s{s}" for m in ("ancestral", "free-x0/block/w4")
                                                    for s in ("1", "2")}
    assert (out / "samples_ancestral.png").stat().st_size > 0 and report["_labels"] == class_grid_labels(20, 10)


def test_callback_in_a_tiny_conditional_fit_draws_one_class_per_row(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from specdiff_train.evaluation import SpeculativeEvaluation
    from specdiff_train.evaluation import reporting
    from specdiff_train.evaluation.sampling_callback import flat_metrics

    pictures = []
    real = reporting.plotting.plot_samples
    monkeypatch.setattr(reporting.plotting, "plot_samples",
                        lambda samples, **kw: pictures.append((len(samples), kw)) or real(samples, **kw))
    callback = SpeculativeEvaluation(drafters=["free-x0"], verifiers=["block"], windows=[4], num_steps=[6],
                                     num_samples=20, every_n_epochs=0, num_permutations=100, guidance_scale=2.0)
    model = tiny_target()
    model.val_num_samples = 0
    trainer = Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                      callbacks=[callback])
    trainer.fit(model, datamodule=digits_data())
    final = next(tmp_path.rglob("speculative/final"))
    assert (final / "samples_ancestral.png").stat().st_size > 0 and (final / "samples_best.png").exists()
    assert pictures and all(n == 20 and kw["labels"] == class_grid_labels(20, 10) for n, kw in pictures)
    assert "one class per row" in pictures[0][1]["title"] and "guidance 2" in pictures[0][1]["title"]
    report = callback.last_report
    assert all(r["guidance_scale"] == 2.0 and 0 <= r["label_accuracy"] <= 1 for r in report["results"])
    assert report["config"]["reference"].startswith("data of the samples' label mix")
    metrics = flat_metrics(report)
    assert "spec/free-x0/block/w4/6steps/guidance2/label_accuracy" in metrics
    assert "spec/ancestral/6steps/guidance2/label_accuracy" in metrics


def test_stratified_relabellings_keep_each_class_count():
    from specdiff_train.evaluation.metrics import stratified_permutation_labels

    strata = torch.tensor([0, 0, 1, 1, 1, -1, 0, 0, 1, 1, 1, -1])  # x: the first 6, y: the last 6, same classes
    labels = stratified_permutation_labels(strata, 6, 200, seed=0)
    assert labels.shape == (12, 200)
    for value, count in ((0, 2), (1, 3), (-1, 1)):
        assert (labels[strata == value].sum(0) == count).all()
    assert len({tuple(col.tolist()) for col in labels.T}) > 20  # and they do relabel


class ClassGaussians(torch.nn.Module):
    """A closed-form conditional target: label c -> the exact eps predictor for data ~ N(means[c], var I),
    the null label -> the one for N(0, null_var I); trained with label dropout, so guidance may be used."""

    p_uncond = 0.1

    def __init__(self, schedule, means, var=0.05, null_var=4.0):
        super().__init__()
        self.schedule, self.var, self.null_var = schedule, var, null_var
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.num_classes = len(self.means)

    def forward(self, x, t, labels=None):
        labels = torch.full((len(x),), NULL_LABEL) if labels is None else labels
        null = (labels < 0)[:, None]
        mean = torch.where(null, torch.zeros_like(x), self.means[labels.clamp(min=0)])
        var = torch.where(null, torch.full_like(x, self.null_var), torch.full_like(x, self.var))
        abar = self.schedule.alphas_cumprod.to(x.dtype)[t][:, None]
        return (1 - abar).sqrt() * (x - abar.sqrt() * mean) / (abar * var + 1 - abar)


def test_guided_exactness_check_passes_an_exact_sampler_and_flags_a_biased_one():
    """With the same labels on both sides (classes in order), the test relabels within classes: an
    exact guided sampler keeps a p-value above the margin, one that accepts every draft is flagged. (Pooled
    relabellings unbalance the classes: they gave this exact sampler p = 1.000, as they did the four exact
    methods of configs/eval/digits_cond.yaml, so a milder bias would have gone unseen.)"""
    from test_evaluation import MARGIN, never_rejects, smallest_p
    from specdiff_train.speculative import FreeDrafter

    schedule = DDPMSchedule(1000)
    model = ClassGaussians(schedule, [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    methods = [method_grid({"free-x0": lambda: FreeDrafter("x0")}, ["block"], [8])[0],
               method_grid({"free-x0": lambda: FreeDrafter("x0")}, [never_rejects], [8])[0]]
    report = compare_methods(model, schedule, (2,), methods, num_steps=[20], seeds=range(400),
                             quality=Quality(num_permutations=1000), alpha=0.01, guidance_scale=2.0, warmup=False)
    exact, biased = report["results"][1:]
    assert exact["guidance_scale"] == biased["guidance_scale"] == 2.0
    assert exact["exact_ok"] and smallest_p(exact) > MARGIN * 0.01, exact["vs_ancestral"]
    assert not biased["exact_ok"] and smallest_p(biased) <= MARGIN * 0.01, biased["vs_ancestral"]
