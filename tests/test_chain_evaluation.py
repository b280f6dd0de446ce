"""The evaluation's `chain` option (evaluation/chain_options.py): `compare_methods`, `evaluate`, the
`SpeculativeEvaluation` callback and scripts/benchmark.py sample the ancestral baseline, its exactness reference
and every speculative method with the same chain of any family, name it in the report, and refuse a bad value
in one line that names the field. Tiny untrained MLP targets: only the plumbing is tested here (exactness of
each family's sampler is tested where the chains are)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import ROOT, TinyDataModule, run_train
from specdiff_train.chains import DDIM, EDMSchedule, EulerAncestral, FlowEulerMaruyama, FlowSchedule
from specdiff_train.evaluation.chain_options import chain_options
from specdiff_train.evaluation.command import SpecDiffTrainer, _check_options, sample_key
from specdiff_train.evaluation.compare import Quality, compare_methods, method_grid
from specdiff_train.evaluation.reporting import chain_note, markdown_table, write_report
from specdiff_train.evaluation.sampling_callback import SpeculativeEvaluation, flat_metrics
from specdiff_train.models import TargetDiffusion
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FreeDrafter, speculative_sample

SCHEDULES = {"edm": lambda: EDMSchedule(sigma_data=1.0), "flow": FlowSchedule, "ddpm": lambda: None}


def tiny_target(family: str) -> TargetDiffusion:
    torch.manual_seed(0)
    net = {"class_path": "specdiff_train.nets.MLPDenoiser", "init_args": {"dim": 2, "hidden": 16, "depth": 1,
                                                                         "time_embed_dim": 16}}
    return TargetDiffusion(net, schedule=SCHEDULES[family](), val_num_samples=0).eval()


def grid():
    return method_grid({"free-x0": lambda: FreeDrafter("x0")}, ["block"], [4])


def compare(model, chain, **kw):
    options = dict(num_steps=[8], seeds=range(24), quality=Quality(num_permutations=100), warmup=False) | kw
    return compare_methods(model, model.schedule, (2,), grid(), chain=chain, **options)


@pytest.mark.parametrize("family, chain, expected", [
    ("edm", EulerAncestral(eta=0.5), EulerAncestral(eta=0.5)),  # a Chain
    ("flow", {"class_path": "specdiff_train.chains.FlowEulerMaruyama", "init_args": {"churn": 0.5}},  # from YAML
     FlowEulerMaruyama(churn=0.5)),
    ("edm", None, EulerAncestral()),  # the schedule's default, named too
    ("flow", "flow:churn=2", FlowEulerMaruyama(churn=2.0)),  # a name with options
])
def test_one_chain_for_the_baseline_and_every_method_named_in_the_report(family, chain, expected, tmp_path,
                                                                         monkeypatch):
    import specdiff_train.evaluation.compare as compare_module

    chains_used = []

    def recording(real):
        def run(*args, chain=None, **kwargs):
            chains_used.append(chain)
            return real(*args, chain=chain, **kwargs)
        return run

    monkeypatch.setattr(compare_module, "ancestral_sample", recording(compare_module.ancestral_sample))
    monkeypatch.setattr(compare_module, "speculative_sample", recording(compare_module.speculative_sample))
    report = compare(tiny_target(family), chain, warmup=True)
    assert len(chains_used) == 5 and all(c == expected for c in chains_used)  # warm-ups, baseline, reference, method
    assert report["config"]["chains"] == [repr(expected)]
    assert report["config"]["chain_configs"][0]["init_args"] == expected.config()
    assert [r["chain"] for r in report["results"]] == [repr(expected)] * 2
    assert chain_note(report).endswith(f"`{expected!r}`")
    assert "| chain |" not in markdown_table(report)  # one chain: named once, above the table
    write_report(report, tmp_path)
    assert f"`{expected!r}`" in (tmp_path / "report.md").read_text()
    assert all(r["chain"] == repr(expected) for r in json.loads((tmp_path / "report.json").read_text())["results"])


def test_a_list_of_chains_gives_rows_per_chain():
    report = compare(tiny_target("flow"), ["flow:churn=0.5", None])
    names = [repr(FlowEulerMaruyama(churn=0.5)), repr(FlowEulerMaruyama())]
    assert report["config"]["chains"] == names
    assert [(r["method"], r["chain"]) for r in report["results"]] == [
        ("ancestral", names[0]), ("free-x0/block/w4", names[0]), ("ancestral", names[1]), ("free-x0/block/w4", names[1])]
    table = markdown_table(report)
    assert table.splitlines()[0].startswith("| steps | method | chain |") and f"| {names[1]} |" in table
    assert chain_note(report) == ""
    assert "spec/free-x0/block/w4/8steps/FlowEulerMaruyama(churn=0.5)/speedup" in flat_metrics(report)
    assert sample_key(report["results"][3], True) == "free-x0/block/w4@8@FlowEulerMaruyama(churn=1.0)"


def test_acceptance_by_time_follows_the_chain_s_own_times():
    """Each row's acceptance curve puts step k at its plan's `time_fraction` (EDM: log sigma), not at k / N."""
    from specdiff_train.evaluation.compare import time_buckets

    assert time_buckets([1, 1, 1], [1, 0, 1], 3, buckets=2, fractions=[0.9, 0.8, 0.1]) == [1.0, 0.5]
    assert time_buckets([1, 1, 1], [1, 0, 1], 3, buckets=2) == [1.0, 0.5]  # without them: 1 - (k + 0.5) / N
    model = tiny_target("edm")
    report = compare(model, "edm", num_steps=[20])
    fractions = model.schedule.plan(20, EulerAncestral()).time_fraction.tolist()
    drafted = {min(int(f * 10), 9) for f in fractions[1:-1]}  # steps 1..18 (Karras sigmas: none below 0.1)
    curve = report["results"][1]["acceptance_by_time"]
    assert {b for b, v in enumerate(curve) if v is not None} <= drafted and curve[0] is None  # k / N: step 18 in 0


BAD_CHAINS = [  # (target family, chain value, what the one-line error says after the field)
    ("edm", "dpm", r": unknown chain 'dpm'; use ddpm, ddim, edm"),
    ("edm", 3, r": expected a specdiff_train.chains chain .* got 3"),
    ("edm", {"class_path": "torch.nn.Linear"}, r": expected a specdiff_train.chains chain"),
    ("flow", {"class_path": "specdiff_train.chains.FlowEulerMaruyama", "init_args": {"chrn": 1}},
     r": FlowEulerMaruyama cannot be built from init_args \{'chrn': 1\}: .*unexpected keyword argument 'chrn'"),
    ("edm", "edm:eta=2", r"\.eta: expected a number"),
    ("edm", "ddim", r": DDIM\(eta=1.0\) samples targets trained with a 'ddpm' schedule, but the target's schedule is "
                    r"EDMSchedule"),
    ("flow", DDIM(eta=0.5), r": DDIM\(eta=0.5\) samples targets trained with a 'ddpm' schedule"),
    ("edm", "edm:eta=0", r": EulerAncestral\(eta=0.0.*has no stochastic step"),
    ("flow", ["flow", None], r": FlowEulerMaruyama\(churn=1.0\) is given twice"),
    ("flow", [], r": expected a chain or a non-empty list of chains"),
]


@pytest.mark.parametrize("family, value, message", BAD_CHAINS, ids=lambda v: repr(v)[:40])
def test_a_bad_chain_is_refused_in_one_line_naming_the_field(family, value, message):
    model = tiny_target(family)
    for field, refuse in (
        ("chain", lambda: compare(model, value)),
        ("evaluate.chain", lambda: _check_options(model, num_samples=24, num_permutations=100, alpha=0.01,
                                                  windows=[4], cost_model=None, compile=False, labels=None,
                                                  guidance_scale=None, chain=value, num_steps=[8])),
    ):
        with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + message) as caught:
            refuse()
        assert "\n" not in str(caught.value)


def test_the_callback_refuses_a_bad_chain_when_made_and_one_for_another_family_when_fit_starts(tmp_path):
    with pytest.raises(ValueError, match=r"^SpeculativeEvaluation\.chain: unknown chain 'dpm'"):
        SpeculativeEvaluation(chain="dpm")
    callback = SpeculativeEvaluation(chain="ddim:eta=0.5", num_steps=[8], num_samples=8, num_permutations=100)
    with pytest.raises(ValueError, match=r"^SpeculativeEvaluation\.chain: DDIM\(eta=0.5\) samples targets trained "
                                         r"with a 'ddpm' schedule, but the target's schedule is FlowSchedule"):
        _tiny_fit(tiny_target("flow"), callback, tmp_path)


def _tiny_fit(model, callback, root):
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", max_steps=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=[callback])
    trainer.fit(model, datamodule=TinyDataModule(num_samples=64, batch_size=32))


def test_the_callback_evaluates_every_chain_of_a_list(tmp_path):
    callback = SpeculativeEvaluation(drafters=["free-x0"], verifiers=["block"], windows=[4], num_steps=[6],
                                     num_samples=16, every_n_epochs=0, num_permutations=100,
                                     chain=[{"class_path": "specdiff_train.chains.EulerAncestral",
                                             "init_args": {"eta": 0.5}}, "edm"])
    _tiny_fit(tiny_target("edm"), callback, tmp_path)
    names = [repr(EulerAncestral(eta=0.5)), repr(EulerAncestral())]
    assert callback.last_report["config"]["chains"] == names
    assert {r["chain"] for r in callback.last_report["results"]} == set(names)
    assert next(tmp_path.rglob("speculative/final/report.json"))


def test_evaluate_samples_names_and_saves_each_chain(tmp_path, capsys):
    """The evaluate verb from Python (the CLI's path after parsing): the chain (a name with options) reaches
    every sampler, the printed report names it, samples.pt keys carry it when there are several."""
    trainer = SpecDiffTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              default_root_dir=tmp_path)
    kw = dict(drafters=["free-x0"], verifiers=["block"], windows=[4], num_steps=[8], num_samples=24,
              num_permutations=100, save_samples=True)
    report = trainer.evaluate(tiny_target("edm"), chain="edm:eta=0.5", out_dir=tmp_path / "one", **kw)
    name = repr(EulerAncestral(eta=0.5))
    assert report["config"]["chains"] == [name]
    assert f"`{name}`" in capsys.readouterr().out
    assert set(torch.load(tmp_path / "one" / "samples.pt")) == {"ancestral@8", "free-x0/block/w4@8"}
    report = trainer.evaluate(tiny_target("edm"), chain=["edm", "edm:eta=0.5"], out_dir=tmp_path / "two", **kw)
    assert f"| {name} |" in capsys.readouterr().out  # the chain column
    assert "free-x0/block/w4@8@" + name.replace(" ", "") in torch.load(tmp_path / "two" / "samples.pt")


def test_evaluate_command_line_refuses_a_chain_of_another_family_in_one_line():
    proc = run_train("evaluate", "--config", "configs/target/toy2d.yaml", "--ckpt_path",
                     ROOT / "checkpoints" / "toy2d" / "target.ckpt", "--trainer.logger", "false",
                     "--chain", "flow:churn=0.5", check=False)
    assert proc.returncode != 0
    line = next(line for line in proc.stderr.splitlines() if "evaluate.chain" in line)
    assert "evaluate.chain: FlowEulerMaruyama(churn=0.5) samples targets trained with a 'flow' schedule" in line
    assert "Traceback" not in proc.stderr


def test_compiled_sampling_of_an_edm_chain_gives_the_eager_samples():
    """compile=True with an EDM chain: the compiled ancestral step and round (the target's preconditioning
    inside the graphs) give the eager samples and calls (inductor on the CPU). Kept to seconds as
    test_compiled.py keeps its tests: a tiny net, one batch shape (4 seeds, no batch_size), a short chain."""
    model, chain = tiny_target("edm"), EulerAncestral(eta=0.5)
    kw = dict(num_steps=12, seeds=range(4), chain=chain)
    eager = ancestral_sample(model, model.schedule, (2,), **kw)
    compiled = ancestral_sample(model, model.schedule, (2,), compile=True, return_stats=True, **kw)
    torch.testing.assert_close(compiled.samples, eager, atol=1e-5, rtol=1e-5)
    assert compiled.stats.compile_s > 0
    kw |= dict(window=4)
    eager = speculative_sample(model, model.schedule, (2,), drafter=FreeDrafter("x0"), **kw)
    compiled = speculative_sample(model, model.schedule, (2,), drafter=FreeDrafter("x0"), compile=True, **kw)
    torch.testing.assert_close(compiled.samples, eager.samples, atol=1e-4, rtol=1e-4)
    for key in ("target_calls_per_sample", "rounds", "drafted_per_step", "accepted_per_step"):
        assert compiled.stats[key] == eager.stats[key], key


def _benchmark_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(model, folder):
    folder.mkdir()
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, folder / "target.ckpt")
    return str(folder / "target.ckpt")


def test_benchmark_script_takes_any_target_checkpoint_and_chain(tmp_path, capsys):
    """--target: checkpoints anywhere, named by their folder; --chain: each target runs the chains of its family
    (the baseline and every method alike; the others are skipped, and said so), and a chain for none is refused."""
    flow, ddpm = _save(tiny_target("flow"), tmp_path / "tiny_flow"), _save(tiny_target("ddpm"), tmp_path / "tiny_ddpm")
    benchmark = _benchmark_script()
    assert chain_options("flow:churn=0.5") == [benchmark.chain_arg("flow:churn=0.5")]
    common = ["--num-steps", "6", "--windows", "2", "--drafters", "free-x0", "--batch", "4", "--single", "1"]
    with pytest.raises(SystemExit):
        benchmark.main(["--target", flow, "--chain", "ddim", *common])
    assert "--chain DDIM(eta=1.0) samples 'ddpm'-trained targets; none of the targets is" in capsys.readouterr().err
    benchmark.main(["--target", flow, ddpm, "--chain", "flow:churn=0.5", "ddim:eta=0.5", *common,
                    "--out", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert "[tiny_flow] skipping --chain DDIM(eta=0.5)" in out and "[tiny_ddpm] skipping --chain FlowEulerMaruyama" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    methods = ["ancestral", "free-x0/block/w2", "free-x0/tokenwise/w2"]
    assert [(r["target"], r["method"]) for r in rows] == (
        [("tiny_flow FlowEulerMaruyama(churn=0.5)", m) for m in methods] + [("tiny_ddpm DDIM(eta=0.5)", m) for m in methods])
    assert "| tiny_flow FlowEulerMaruyama(churn=0.5) | 6 | free-x0/block/w2 |" in out
    benchmark.main(["--target", ddpm, *common])  # the DDPM default chain: the tables as they always were
    assert "| tiny_ddpm | 6 | free-x0/block/w2 |" in capsys.readouterr().out
