"""The hybrid drafter (drafters/hybrid.py) and the validation acceptance per fifth that drafter checkpoints record.

Exactness: per step against the closed-form chain of test_exactness_power.py, with a hybrid whose parts differ
(a drafter pushed one std off and the Free Drafter, alternating by fifth), and the known-wrong unweighted
residual detected with the same hybrid. With every fifth on one part the hybrid gives that part's samples bit
for bit. Training records the acceptance per fifth in the checkpoint (the slim export keeps it), and the
hybrid's default choice is read from it.
"""
import sys
from functools import lru_cache

import pytest
import torch
from lightning.pytorch import Trainer

from helpers import ROOT, TinyDataModule
from specdiff_train.drafters import HeadDistillation, MLPHead, export_slim_drafter
from specdiff_train.drafters.checkpoints import recorded_acceptance
from specdiff_train.drafters.distillation import (
    NUM_BUCKETS,
    acceptance_by_fifth,
    acceptance_prior,
    acceptance_record,
    time_bucket,
)
from specdiff_train.drafters.hybrid import choice_from_record
from specdiff_train.models import load_target
from specdiff_train.speculative import CostAwareWindow, FreeDrafter, HybridDrafter, MedusaDrafter, speculative_sample
from specdiff_train.speculative.verify import verify_block
from specdiff_train.testing import TransitionRecorder, marginal_test, path_test

from test_exactness_power import NUM_SAMPLES, NUM_STEPS, RULES, WINDOW, _chain, assert_path_exact
from test_speculative_exactness import BiasedDrafter

TOY_MEDUSA = ROOT / "checkpoints" / "toy2d" / "medusa.ckpt"
ALTERNATING = [0, 1, 1, 0, 1]  # per fifth, nearest the data first: 1 the biased drafter, 0 the Free Drafter


def _hybrid_path_run(verify):
    schedule, model, plan, means, variances = _chain()
    recorder = TransitionRecorder(verify, plan, None)
    drafter = HybridDrafter(BiasedDrafter(), FreeDrafter("x0"), choice=ALTERNATING)
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES), drafter=drafter,
                                window=WINDOW, verifier=recorder, batch_size=2500)
    return result, path_test(recorder, means, variances), marginal_test(result.samples, means[-1], variances[-1])


def test_every_step_of_a_hybrid_is_exact():
    result, report, output = _hybrid_path_run(verify_block)
    assert_path_exact(report)
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output
    # both parts drafted: the biased fifths accept less than the Free Drafter's
    drafted, accepted = (torch.tensor(result.stats[key], dtype=torch.float64)
                         for key in ("drafted_per_step", "accepted_per_step"))
    plan = _chain()[2]
    biased = torch.tensor(ALTERNATING, dtype=torch.bool)[time_bucket(plan, torch.arange(NUM_STEPS))]
    rate = lambda mask: accepted[mask].sum() / drafted[mask].sum()  # noqa: E731
    assert rate(biased) < rate(~biased) - 0.1, (rate(biased), rate(~biased))


def test_a_wrong_rule_is_detected_with_a_hybrid():
    _, report, _ = _hybrid_path_run(RULES["unweighted-residual"][0])
    assert min(report["ks_p"], report["inc_ks_p"]) < 1e-6, report


@lru_cache(maxsize=1)
def _toy_target():
    return load_target(ROOT / "checkpoints" / "toy2d" / "target.ckpt").eval()


def _sample(drafter, **kw):
    target = _toy_target()
    return speculative_sample(target, target.schedule, target.sample_shape, num_steps=40, seeds=range(64),
                              batch_size=32, drafter=drafter, **(dict(window=4) | kw))


@pytest.mark.parametrize("choice,alone", [([1] * 5, lambda: MedusaDrafter(str(TOY_MEDUSA))),
                                          ([0] * 5, lambda: FreeDrafter("x0"))])
def test_a_hybrid_on_one_part_gives_that_parts_samples(choice, alone):
    hybrid = _sample(HybridDrafter(str(TOY_MEDUSA), "free-x0", choice=choice))
    single = _sample(alone())
    assert torch.equal(hybrid.samples, single.samples)
    assert hybrid.stats.target_calls_per_sample == single.stats.target_calls_per_sample


def test_a_compiled_hybrid_gives_the_eager_samples():
    make = lambda: HybridDrafter(str(TOY_MEDUSA), "free-x0", choice=[1, 1, 0, 0, 1])  # noqa: E731
    eager, compiled = _sample(make()), _sample(make(), compile=True)
    torch.testing.assert_close(compiled.samples, eager.samples, atol=1e-4, rtol=1e-4)
    assert compiled.stats.target_calls_per_sample == eager.stats.target_calls_per_sample


# --- the record and the choice ---------------------------------------------------------------------------------
def test_acceptance_record_per_fifth():
    plan = _chain()[2]
    k = torch.arange(NUM_STEPS).repeat(3)
    sums = acceptance_by_fifth(plan, k, torch.full((len(k),), 0.5, dtype=torch.float64))
    free = acceptance_by_fifth(plan, k, torch.full((len(k),), 0.25, dtype=torch.float64))
    record = acceptance_record(sums + sums, free, plan, global_step=7)
    assert record["acceptance"] == [0.5] * NUM_BUCKETS and record["free_acceptance"] == [0.25] * NUM_BUCKETS
    assert sum(record["rows"]) == 2 * len(k) and record["num_steps"] == NUM_STEPS and record["global_step"] == 7
    assert record["time_fractions"][0] == [0.0, 0.2]
    # each row's value its own diffusion time: a fifth's mean lies inside that fifth (index 0 nearest the data)
    by_time = acceptance_record(acceptance_by_fifth(plan, k, plan.time_fraction[k].double()), None, plan, 0)
    for (low, high), mean in zip(by_time["time_fractions"], by_time["acceptance"]):
        assert low <= mean < high, by_time


def test_choice_from_a_record_and_bad_input():
    record = dict(acceptance=[0.9, 0.8, 0.95, None, 0.5], free_acceptance=[0.5, 0.85, 0.95, 0.9, 0.4])
    assert choice_from_record(record, "x.ckpt") == [1, 0, 0, 0, 1]  # ties and empty fifths: the free fallback
    with pytest.raises(ValueError, match="record_acceptance.py"):
        choice_from_record(None, "x.ckpt")
    with pytest.raises(ValueError, match="choice="):
        choice_from_record(dict(acceptance=[0.9] * 5, free_acceptance=None), "x.ckpt")
    with pytest.raises(ValueError, match="choice: expected 5 entries"):
        HybridDrafter(FreeDrafter("eps"), "free-x0", choice=[1, 0])
    with pytest.raises(ValueError, match="fallback: expected"):
        HybridDrafter(FreeDrafter("eps"), "free-nothing", choice=[1] * 5)
    with pytest.raises(ValueError, match="not a draft-network checkpoint"):
        HybridDrafter(str(ROOT / "checkpoints" / "toy2d" / "target.ckpt"))


def test_training_records_acceptance_per_fifth_and_the_hybrid_reads_it(tmp_path):
    """The Lightning loop on the toy2d target: the checkpoint holds the last validation's acceptance per fifth
    (Medusa heads: also the Free Drafter's on the same states), the slim export keeps it, and a hybrid without a
    choice takes it from there."""
    torch.manual_seed(0)
    head = MLPHead(feature_dim=128, hidden=8, depth=1, time_embed_dim=8, max_offset=3)
    module = HeadDistillation(head, str(ROOT / "checkpoints" / "toy2d" / "target.ckpt"), num_steps=20)
    trainer = Trainer(max_steps=4, limit_val_batches=2, val_check_interval=4, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, TinyDataModule(num_samples=256, batch_size=64))
    slim = export_slim_drafter(next(tmp_path.rglob("*.ckpt")), tmp_path / "slim.ckpt")
    record = recorded_acceptance(slim)
    assert record is not None and record["num_steps"] == 20 and record["global_step"] == 4
    assert len(record["acceptance"]) == NUM_BUCKETS and sum(record["rows"]) > 0
    assert all(0 <= a <= 1 for a in record["acceptance"] + record["free_acceptance"] if a is not None)
    hybrid = HybridDrafter(str(slim))
    assert hybrid.choice == choice_from_record(record, str(slim))


def test_record_acceptance_script_adds_the_record_without_changing_weights(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    from record_acceptance import record_acceptance

    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "medusa.ckpt"
    ckpt.write_bytes(TOY_MEDUSA.read_bytes())
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    record = record_acceptance("configs/drafter/toy2d_medusa.yaml", str(ckpt), limit_val_batches=1)
    after = torch.load(ckpt, weights_only=True)
    assert after["validation_acceptance"] == record and record["num_steps"] == 100
    assert all(torch.equal(before[k], after["state_dict"][k]) for k in before)


def test_the_record_is_a_prior_for_adaptive_windows():
    """Each step gets its fifth's recorded acceptance (clamped into (0, 1)), and `auto` samples with it."""
    record = recorded_acceptance(TOY_MEDUSA)
    target = _toy_target()
    plan = target.schedule.plan(40)
    prior = acceptance_prior(record, plan)
    assert len(prior) == 40 and prior[0] == min(record["acceptance"][-1], 0.99)  # step 0: the fifth nearest noise
    assert prior[-1] == record["acceptance"][0] and all(0 < p < 1 for p in prior)
    result = _sample(FreeDrafter("x0"), window=CostAwareWindow(max_window=4, prior=prior))
    assert result.stats.target_calls_per_sample < 40


def test_bench_draft_cost_prints_the_table(capsys):
    """scripts/bench_draft_cost.py end to end (1 timed call each): a row per drafter, CIFAR-sized heads first."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_draft_cost import main

    main(["--repeats", "1", "--targets", "toy2d"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| CIFAR-size U-Net") and {line.split(" | ")[1] for line in lines[2:]} == {"draftnet", "medusa"}


def test_a_hybrid_from_an_evaluate_config():
    """As the docs' YAML gives it: `class_path` with the learned checkpoint only (choice from its record), or a choice."""
    from specdiff_train.evaluation.command import resolve_drafters

    config = {"class_path": "specdiff_train.speculative.HybridDrafter", "init_args": {"learned": str(TOY_MEDUSA)}}
    (label,) = resolve_drafters([config])
    assert label == "hybrid(medusa|FreeDrafter(freeze=x0):LLLFF)"  # the heads in the three fifths nearest the data
    config["init_args"]["choice"] = [0, 0, 0, 0, 1]
    assert list(resolve_drafters([config])) == ["hybrid(medusa|FreeDrafter(freeze=x0):FFFFL)"]
