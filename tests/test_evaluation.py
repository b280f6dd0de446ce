"""The evaluate command, its report, and the exactness check that must flag a biased sampler."""
import json
import time
from functools import partial

import pytest
import torch

from helpers import ROOT, run_train
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.evaluation.command import image_feature_extractor, resolve_drafters
from specdiff_train.evaluation.compare import DEFAULT_DRAFTERS, Method, Quality, compare_methods, method_grid, time_buckets
from specdiff_train.speculative import FreeDrafter
from specdiff_train.speculative.verify import verify_tokenwise
from specdiff_train.testing import GaussianDataDenoiser


def test_evaluate_command_writes_the_report(tmp_path):
    out = tmp_path / "report"
    proc = run_train(
        "evaluate", "--config", "configs/target/toy2d.yaml", "--config", "configs/eval/toy2d.yaml",
        "--ckpt_path", ROOT / "checkpoints" / "toy2d" / "target.ckpt", "--trainer.logger", "false",
        "--drafters", "[free-x0]", "--verifiers", "[block, tokenwise]", "--windows", "[4]", "--num_steps", "[50]",
        "--num_samples", "300", "--num_permutations", "100", "--out_dir", out,
    )
    assert "| 50 | free-x0/block/w4 |" in proc.stdout  # the table is printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["num_samples"] == 300 and report["config"]["num_steps"] == [50]
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"ancestral", "free-x0/block/w4", "free-x0/tokenwise-reflection/w4"}
    block = rows["free-x0/block/w4"]
    for key in ("target_calls_per_sample", "speedup", "acceptance_rate", "mean_accepted_per_round", "target_rows",
                "draft_calls", "wall_clock_ratio", "acceptance_by_time", "vs_ancestral", "vs_data", "exact_ok"):
        assert key in block, key
    assert block["target_calls_per_sample"] < 50 and block["exact_ok"]
    assert len(block["acceptance_by_time"]) == 10
    assert "energy_distance" in rows["ancestral"]["vs_data"]
    for name in ("report.md", "acceptance.png", "samples_ancestral.png", "samples_best.png"):
        assert (out / name).stat().st_size > 0


def _chain():
    schedule = DDPMSchedule(1000)
    return schedule, GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)


def never_rejects(noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u):
    """A deliberately biased sampler: every draft is accepted, whatever the target says."""
    return verify_tokenwise(noise, states, draft_means, target_means, stds, lengths, has_next,
                            torch.zeros_like(accept_u), xi, residual_u)


def smallest_p(row) -> float:
    return min(row["vs_ancestral"]["energy_p_value"], row["vs_ancestral"]["mmd_p_value"])


# A flagged sampler must sit well below alpha, not one permutation away from it: at most one relabelling of
# 1000 reaches its statistic (p <= 0.002 = alpha / 5). An exact sampler's p is uniform under the null (the
# calibration is tested in test_metrics.py); it is reported in the assertion messages and must stay above
# that margin, which a correct sampler misses with probability 0.002.
MARGIN = 0.2


@pytest.mark.parametrize("shape, expected", [
    ((1, 8, 8), (1, 8, 8)), ((1, 16, 16), None), ((3, 8, 8), None), ((2,), None),
])
def test_image_metrics_follow_the_target_shape(shape, expected):
    """The shipped digits feature network is used only for images of its own input shape: any other
    target shape is evaluated without image metrics (or with a feature network given for it)."""
    extractor = image_feature_extractor(shape)
    assert (extractor.input_shape if extractor is not None else None) == expected
    if len(shape) == 3:  # a feature network given explicitly is used for any image shape
        from specdiff_train.evaluation.features import DIGITS_FEATURES

        assert image_feature_extractor(shape, str(DIGITS_FEATURES)).input_shape == (1, 8, 8)


def test_exactness_check_flags_a_biased_sampler_and_passes_an_exact_one():
    schedule, model = _chain()
    methods = [Method(FreeDrafter, "block", 8, label="free-eps"),
               Method(FreeDrafter, never_rejects, 8, label="free-eps")]
    report = compare_methods(model, schedule, (2,), methods, num_steps=[20], seeds=range(2000),
                             quality=Quality(num_permutations=1000), alpha=0.01)
    exact, biased = report["results"][1], report["results"][2]
    assert biased["method"] == "free-eps/never_rejects/w8"
    assert exact["exact_ok"] and smallest_p(exact) > MARGIN * 0.01, exact["vs_ancestral"]
    assert not biased["exact_ok"] and smallest_p(biased) <= MARGIN * 0.01, biased["vs_ancestral"]


def test_method_and_drafter_errors_name_the_field():
    with pytest.raises(ValueError, match="drafters: unknown drafter 'fast'"):
        resolve_drafters(["fast"])
    with pytest.raises(ValueError, match="verifier"):
        method_grid(resolve_drafters(["free-eps"]), ["greedy"], [3])
    with pytest.raises(ValueError, match="window"):
        method_grid(resolve_drafters(["free-eps"]), ["block"], [0])
    schedule, model = _chain()
    with pytest.raises(ValueError, match="num_samples"):
        compare_methods(model, schedule, (2,), [], num_steps=[10], seeds=[0])


def test_acceptance_by_diffusion_time_buckets():
    # 10 steps, one per bucket, from t/T ~ 1 (first step) down to ~0 (last)
    buckets = time_buckets([2] * 10, [2, 1, 0, 0, 0, 0, 0, 0, 0, 0], 10)
    assert buckets[-1] == 1.0 and buckets[-2] == 0.5 and buckets[0] == 0.0
    assert time_buckets([0] * 4, [0] * 4, 4, buckets=2) == [None, None]


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_callback_in_a_tiny_fit_logs_and_writes_reports(tmp_path, devices):
    run_train(
        "fit", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        "--config", "configs/target/toy2d.yaml", "--trainer.default_root_dir", tmp_path,
        "--trainer.max_steps", "6", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "1",
        "--model.init_args.val_num_samples", "16", "--data.init_args.num_samples", "2000",
        "--trainer.callbacks+", "specdiff_train.evaluation.SpeculativeEvaluation",
        "--trainer.callbacks.init_args.num_samples", "64", "--trainer.callbacks.init_args.num_steps", "[20]",
        "--trainer.callbacks.init_args.every_n_epochs", "1", "--trainer.callbacks.init_args.num_permutations", "100",
    )
    reports = sorted(tmp_path.rglob("speculative/*/report.json"))
    tags = {p.parent.name for p in reports}
    assert "final" in tags and "epoch=001" in tags, tags
    final = json.loads(next(p for p in reports if p.parent.name == "final").read_text())
    # the callback's default grid is evaluate's
    default_grid = {m.name for m in method_grid(resolve_drafters(DEFAULT_DRAFTERS))}
    assert {r["method"] for r in final["results"]} == {"ancestral"} | default_grid
    assert "frozen-eps/tokenwise-reflection/w3" in default_grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "spec/free-x0/block/w8/20steps/target_calls_per_sample" in events.Tags()["scalars"]


@pytest.mark.slow
def test_two_processes_give_the_same_samples_and_report(tmp_path):
    common = ["evaluate", "--config", "configs/target/toy2d.yaml", "--ckpt_path",
              ROOT / "checkpoints" / "toy2d" / "target.ckpt", "--trainer.logger", "false", "--drafters", "[free-x0]",
              "--verifiers", "[block]", "--windows", "[4]", "--num_steps", "[30]", "--num_samples", "201",
              "--num_permutations", "100", "--save_samples", "true", "--trainer.accelerator", "cpu"]
    run_train(*common, "--out_dir", tmp_path / "one")
    run_train(*common, "--out_dir", tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one, two = (torch.load(tmp_path / d / "samples.pt") for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r2["config"]["world_size"] == 2
    for a, b in zip(r1["results"], r2["results"]):
        for key in ("target_calls_per_sample", "acceptance_rate", "mean_accepted_per_round", "vs_ancestral", "vs_data"):
            assert a.get(key) == pytest.approx(b.get(key)), key


class _ColdStart(torch.nn.Module):
    """A denoiser whose first call pays a one-off cost, as cold code does in a fresh process."""

    def __init__(self, model, delay: float):
        super().__init__()
        self.model, self.delay, self.calls = model, delay, 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.delay)
        return self.model(x, t, **kwargs)


@pytest.mark.parametrize("warmup", [True, False])
def test_methods_are_timed_after_a_warm_up(warmup):
    """With the warm-up (the default), a one-off cost of the first call is not charged to the first
    method timed, so the wall-clock ratios compare warm code; without it, it is."""
    schedule, model = _chain()
    cold = _ColdStart(model, delay=1.0)
    report = compare_methods(cold, schedule, (2,), method_grid(resolve_drafters(["free-x0"]), ["block"], [4]),
                             num_steps=[20], seeds=range(64), batch_size=64, warmup=warmup)
    ancestral = report["results"][0]
    assert (ancestral["wall_clock_s"] < 0.5) == warmup
    assert report["config"]["warmup_steps"] == (10 if warmup else 0)


def test_acceptance_plot_has_a_panel_per_drafter_and_legends_off_the_data(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from specdiff_train.evaluation.reporting import acceptance_plot

    results = [dict(method=f"{d}/{v}/w{w}", window=w, num_steps=100, acceptance_by_time=[0.5] * 10)
               for d in ("free-x0", "free-eps", "frozen-eps", "draftnet", "medusa")
               for v in ("block", "tokenwise-reflection") for w in (3, 8)]  # the shipped toy2d grid: 20 curves
    fig = acceptance_plot({"results": results}, tmp_path / "acceptance.png")
    assert (tmp_path / "acceptance.png").stat().st_size > 0
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes] == ["free-x0", "free-eps", "frozen-eps", "draftnet", "medusa"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in axes:
        styles = {(line.get_color(), line.get_linestyle()) for line in ax.lines}
        assert len(styles) == len(ax.lines) == 4  # every curve of a panel has its own colour x line style
        assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


SHIPPED_EVAL = sorted((ROOT / "configs" / "eval").glob("*.yaml"))


def _shipped_settings(path):
    import inspect

    import yaml

    from specdiff_train.evaluation.command import SpecDiffTrainer

    config = yaml.safe_load(path.read_text())
    defaults = {k: p.default for k, p in inspect.signature(SpecDiffTrainer.evaluate).parameters.items()}
    return {k: config.get(k, defaults[k]) for k in ("alpha", "num_permutations", "num_samples", "num_steps", "windows")}


@pytest.mark.parametrize("path", SHIPPED_EVAL, ids=lambda p: p.stem)
def test_shipped_eval_settings_flag_a_biased_sampler(path):
    """At each shipped config's alpha, permutation count, sample count, steps and windows, the exactness
    check flags a sampler that accepts every draft of the x0 Free Drafter with a p-value well below alpha,
    and reports the exact sampler's p (above the margin).

    Only biases this large are flagged with margin at these sample counts: accepting every draft of the
    eps Free Drafter with window 3 gives p ~ 0.03 on 1000 toy2d samples (docs/evaluation.md).

    An auto window drafts as much as the round times say pays: on this closed-form chain, whose network
    costs nothing, measured times favour plain steps and a biased verifier barely shows (p = 0.15 in one run
    at 256 samples); flat costs (every window one call) make it draft its longest windows, as on a launch-bound GPU."""
    s = _shipped_settings(path)
    assert s["num_permutations"] >= 1 / (MARGIN * s["alpha"]) - 1  # the floor 1/(1 + P) sits below the margin
    schedule, model = _chain()
    methods = [Method(partial(FreeDrafter, "x0"), verifier, w, label="free-x0") for w in s["windows"]
               for verifier in ("block", never_rejects)]
    report = compare_methods(model, schedule, (2,), methods, num_steps=s["num_steps"], seeds=range(s["num_samples"]),
                             quality=Quality(num_permutations=s["num_permutations"]), alpha=s["alpha"], warmup=False,
                             cost_model=FLAT_COSTS if "auto" in s["windows"] else None)
    rows = [r for r in report["results"] if r["method"] != "ancestral"]
    assert len(rows) == len(methods) * len(s["num_steps"])
    p_values = {row["method"]: smallest_p(row) for row in rows}
    for row in rows:
        biased = "never_rejects" in row["method"]
        assert row["exact_ok"] != biased, p_values
        assert (p_values[row["method"]] <= MARGIN * s["alpha"]) == biased, p_values


@pytest.mark.parametrize("alpha, minimum", [(0.01, 100), (0.05, 20), (0.1, 10), (0.3, 3)])
def test_a_permutation_count_that_cannot_reach_alpha_is_refused(alpha, minimum, tmp_path):
    from specdiff_train.evaluation import SpeculativeEvaluation
    from specdiff_train.evaluation.command import SpecDiffTrainer
    from specdiff_train.evaluation.compare import min_permutations

    assert min_permutations(alpha) == minimum and 1 / (1 + minimum) < alpha <= 1 / minimum
    schedule, model = _chain()
    methods = method_grid(resolve_drafters(["free-eps"]), ["block"], [4])
    refused = f"num_permutations: {minimum - 1} permutations cannot flag .* alpha={alpha}.* use at least {minimum}"
    with pytest.raises(ValueError, match=refused):
        compare_methods(model, schedule, (2,), methods, num_steps=[5], seeds=range(8),
                        quality=Quality(num_permutations=minimum - 1), alpha=alpha)
    with pytest.raises(ValueError, match="SpeculativeEvaluation." + refused):
        SpeculativeEvaluation(num_permutations=minimum - 1, alpha=alpha)
    trainer = SpecDiffTrainer(logger=False, accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=refused):
        trainer.evaluate(model, num_permutations=minimum - 1, alpha=alpha, out_dir=str(tmp_path))
    SpeculativeEvaluation(num_permutations=minimum, alpha=alpha)  # the minimum itself is accepted
    with pytest.raises(ValueError, match="alpha: .* in \\(0, 1\\)"):
        min_permutations(1.5)


def test_exactness_reference_comes_from_other_seeds(monkeypatch):
    """The ancestral reference of the exactness test is sampled from seeds disjoint from the methods'
    (samples sharing x_T with them would be coupled and the test conservative); the ancestral row
    (wall-clock, quality) keeps the methods' seeds."""
    import specdiff_train.evaluation.compare as compare

    calls = []
    real = compare.ancestral_sample

    def recording(*args, seeds, **kwargs):
        calls.append(list(seeds))
        return real(*args, seeds=seeds, **kwargs)

    monkeypatch.setattr(compare, "ancestral_sample", recording)
    schedule, model = _chain()
    seeds = range(10, 74)
    report = compare_methods(model, schedule, (2,), method_grid(resolve_drafters(["free-eps"]), ["block"], [4]),
                             num_steps=[10], seeds=seeds, quality=Quality(num_permutations=100), warmup=False)
    assert calls[0] == list(seeds)
    reference = calls[1]
    assert len(reference) == len(seeds) and not set(reference) & set(seeds)
    assert report["config"]["exactness_first_seed"] == reference[0] == 74
    exact = report["results"][1]["vs_ancestral"]
    assert exact["energy_p_value"] >= 0.01 and report["results"][1]["exact_ok"]


FLAT_COSTS = {"target_rows": [1, 2], "target_s": [0.001, 0.001]}  # every window costs one call: draft long
PER_ROW_COSTS = {"target_rows": [1], "target_s": [0.001]}  # a window of L costs L + 1 calls: never draft
SLOPED_COSTS = {"target_rows": [8, 16], "target_s": [1.0, 1.2]}  # the best window depends on the pass rates


def test_policy_windows_are_named_run_and_reported(tmp_path):
    """"auto" and "heuristic" windows sit in a grid beside fixed ones (a string of digits is the int),
    run through compare_methods (warm-up included) and show in the names, rows, config and plot."""
    from specdiff_train.evaluation.reporting import write_report

    methods = method_grid(resolve_drafters(["free-x0"]), ["block"], [3, "auto", "heuristic", "8"])
    names = [m.name for m in methods]
    assert names == ["free-x0/block/w3", "free-x0/block/auto", "free-x0/block/heuristic", "free-x0/block/w8"]
    schedule, model = _chain()
    report = compare_methods(model, schedule, (2,), methods, num_steps=[20], seeds=range(32), batch_size=16,
                             quality=Quality(num_permutations=100))
    rows = {r["method"]: r for r in report["results"][1:]}
    assert [rows[name]["window"] for name in names] == [3, "auto", "heuristic", 8]
    assert all(row["target_calls_per_sample"] < 20 for row in rows.values())
    assert report["config"]["cost_models"] == {"free-x0/block/auto": None}  # auto measured its round times
    assert (write_report(report, tmp_path)["acceptance"]).stat().st_size > 0  # mixed windows sort and plot


def _auto_run(grid_costs=None, compare_costs=None, num_steps=20, warmup=False):
    """An auto window run, its cost model given to `method_grid` or to `compare_methods`: (report, its row)."""
    schedule, model = _chain()
    methods = method_grid(resolve_drafters(["free-x0"]), ["block"], ["auto"], grid_costs)
    report = compare_methods(model, schedule, (2,), methods, num_steps=[num_steps], seeds=range(24), batch_size=8,
                             quality=Quality(num_permutations=100), warmup=warmup, cost_model=compare_costs)
    return report, report["results"][1]


def test_a_cost_model_reaches_the_auto_policy_and_makes_runs_reproducible():
    """With an explicit cost model the auto windows depend only on the chains' past: two runs give the same
    samples and calls, whether the model comes with the grid or with compare_methods. The model is the
    one used: flat costs draft, costs proportional to rows never do (every draft costs a call)."""
    first_report, first = _auto_run(grid_costs=FLAT_COSTS)
    _, again = _auto_run(grid_costs=FLAT_COSTS)
    other_report, from_compare = _auto_run(compare_costs=FLAT_COSTS)
    for row in (again, from_compare):
        assert torch.equal(row["_samples"], first["_samples"])
        assert row["target_calls_per_sample"] == first["target_calls_per_sample"] < 20
    expected = {"free-x0/block/auto": {**FLAT_COSTS, "draft_step_s": 0.0, "round_s": 0.0}}
    assert json.loads(json.dumps(first_report["config"]["cost_models"])) == expected
    assert json.loads(json.dumps(other_report["config"]["cost_models"])) == expected
    _, per_row = _auto_run(compare_costs=PER_ROW_COSTS)
    assert per_row["drafted_steps"] == 0 and per_row["target_calls_per_sample"] == 20


def test_every_run_gets_a_fresh_window_policy():
    """An auto policy keeps what it learned across runs of one plan; the warm-up runs the timed run's plan
    (10 steps, one batch), so a shared policy would change the timed samples (it does with these costs).
    A policy object given as the window is copied for each run."""
    from specdiff_train.speculative.windows import HeuristicWindow

    _, warmed = _auto_run(grid_costs=SLOPED_COSTS, num_steps=10, warmup=True)
    _, cold = _auto_run(grid_costs=SLOPED_COSTS, num_steps=10, warmup=False)
    assert torch.equal(warmed["_samples"], cold["_samples"])
    method = Method(FreeDrafter, "block", HeuristicWindow(2, 6), label="free-eps")
    assert method.name == "free-eps/block/heuristic(2-6)" and method.policy() is not method.policy()


BAD_WINDOW_OPTIONS = {  # case -> (how it is given, what the one-line error says)
    "unknown policy": (lambda: Method(FreeDrafter, "block", "fast", label="free-x0"),
                       "method free-x0: window: unknown policy 'fast'"),
    "window 0": (lambda: Method(FreeDrafter, "block", 0, label="free-x0"), "method free-x0: window: expected an int >= 1"),
    "cost model, fixed window": (lambda: Method(FreeDrafter, "block", 8, label="free-x0", cost_model=FLAT_COSTS),
                                 "method free-x0: cost_model: only window='auto' uses a cost model"),
    "decreasing target_s": (lambda: Method(FreeDrafter, "block", "auto", label="free-x0",
                                           cost_model={"target_rows": [1, 2], "target_s": [0.002, 0.001]}),
                            "method free-x0: cost_model.target_s: a call on more rows cannot take less time"),
    "grid: unknown policy": (lambda: method_grid(resolve_drafters(["free-x0"]), ["block"], [3, "fast"]),
                             "window: unknown policy 'fast'"),
    "grid: cost model, no auto": (lambda: method_grid(resolve_drafters(["free-x0"]), ["block"], [3, 8], FLAT_COSTS),
                                  "cost_model: only window 'auto' uses a cost model, and the windows [3, 8] have none"),
    "grid: unknown cost key": (lambda: method_grid(resolve_drafters(["free-x0"]), ["block"], ["auto"], {"rows": [1]}),
                               "cost_model: expected keys target_rows, target_s"),
    "compare: cost model, no auto": (lambda: compare_methods(*reversed(_chain()), (2,), method_grid(
        resolve_drafters(["free-x0"]), ["block"], [3]), num_steps=[5], seeds=range(8), cost_model=FLAT_COSTS),
        "cost_model: only window 'auto' uses a cost model"),
}


@pytest.mark.parametrize("case", BAD_WINDOW_OPTIONS)
def test_bad_window_options_fail_in_one_line_naming_the_field(case):
    make, expected = BAD_WINDOW_OPTIONS[case]
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)


def test_evaluate_and_the_callback_take_policy_windows_and_refuse_bad_ones_before_sampling(tmp_path):
    from specdiff_train.evaluation import SpeculativeEvaluation
    from specdiff_train.evaluation.command import SpecDiffTrainer

    callback = SpeculativeEvaluation(drafters=["free-x0"], verifiers=["block"], windows=[3, "auto"],
                                     cost_model=FLAT_COSTS)
    assert [(m.name, m.cost_model) for m in callback.methods] == [("free-x0/block/w3", None),
                                                                  ("free-x0/block/auto", FLAT_COSTS)]
    with pytest.raises(ValueError, match="^cost_model: only window 'auto'"):
        SpeculativeEvaluation(windows=[3], cost_model=FLAT_COSTS)
    schedule, model = _chain()
    trainer = SpecDiffTrainer(logger=False, accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="^window: unknown policy 'fast'"):
        trainer.evaluate(model, windows=[3, "fast"], num_permutations=100, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="^cost_model.target_s: "):
        trainer.evaluate(model, windows=["auto"], cost_model={"target_rows": [1, 2], "target_s": [2e-3, 1e-3]},
                         num_permutations=100, out_dir=str(tmp_path))
