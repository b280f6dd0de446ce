"""The quality-cost frontier (docs/frontier.md): bootstrap metrics, diffusers' deterministic solvers over our
targets, the frontier runner and `scripts/frontier.py`, and their one-line errors."""
import json
import sys
from pathlib import Path

import pytest
import torch

from specdiff_train.diffusion import DDIM, DDPMSchedule
from specdiff_train.edm import EDMSchedule
from specdiff_train.evaluation import frontier
from specdiff_train.evaluation.bootstrap import (
    METRICS,
    _within,
    bootstrap_counts,
    energy_pair_kernel,
    fid_bootstrap,
    kid_bootstrap,
    metric_replicates,
    metric_with_interval,
    paired_difference,
    polynomial_pair_kernel,
    rbf_pair_kernel,
    shifted_percentile_interval,
    weighted_moments,
)
from specdiff_train.evaluation.metrics import energy_distance, mmd_rbf
from specdiff_train.sampling import ancestral_sample
from specdiff_train.testing import GaussianDataDenoiser

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(excinfo, *fields):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for field in fields:
        assert field in message, message


# --- bootstrap metrics -------------------------------------------------------------------------------------
def test_observed_column_is_the_plain_metric():
    """Column 0 (all ones) of every bootstrap metric is the metric the project already reports: energy distance and
    MMD of metrics.py, torchmetrics' FID, and its KID with one subset of all samples."""
    pytest.importorskip("torchmetrics")
    from specdiff_train.evaluation.features import fid_kid

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 2, generator=g), torch.randn(250, 2, generator=g) * 1.2 + 0.2
    wx, wy = bootstrap_counts(300, 5, 0), bootstrap_counts(250, 5, 1)
    assert METRICS["energy"][0](x, y, wx, wy)[0].item() == pytest.approx(energy_distance(x, y), rel=1e-9)
    assert METRICS["mmd"][0](x, y, wx, wy)[0].item() == pytest.approx(mmd_rbf(x, y), rel=1e-9)
    fx, fy = torch.randn(400, 12, generator=g).double(), (torch.randn(400, 12, generator=g) * 1.1 + 0.1).double()
    wx, wy = bootstrap_counts(400, 5, 0), bootstrap_counts(400, 5, 1)
    reference = fid_kid(fx, fy, kid_subset_size=400, kid_subsets=1)
    assert fid_bootstrap(fx, fy, wx, wy)[0].item() == pytest.approx(reference["fid"], rel=1e-6)
    assert kid_bootstrap(fx, fy, wx, wy)[0].item() == pytest.approx(reference["kid_mean"], rel=1e-6)


def test_bootstrap_counts():
    counts = bootstrap_counts(50, 7, seed=3)
    assert counts.shape == (50, 8)
    assert torch.equal(counts[:, 0], torch.ones(50, dtype=torch.float64))
    assert torch.equal(counts.sum(0), torch.full((8,), 50.0, dtype=torch.float64))
    assert torch.equal(counts, bootstrap_counts(50, 7, seed=3))
    assert not torch.equal(counts, bootstrap_counts(50, 7, seed=4))
    with pytest.raises(ValueError) as excinfo:
        bootstrap_counts(50, 0)
    one_line_error(excinfo, "num_resamples")


def test_repeated_points_are_not_paired_with_themselves():
    """A resample that draws every point twice is the same set: the weighted statistics must not move (a plug-in
    that pairs a point with its copy would shrink the covariance and the within-set kernel means)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g).double(), torch.randn(40, 3, generator=g).double() + 0.3
    ones, twos = torch.ones(40, 1, dtype=torch.float64), torch.full((40, 1), 2.0, dtype=torch.float64)
    mean1, cov1 = weighted_moments(x, ones)
    mean2, cov2 = weighted_moments(x, twos)
    torch.testing.assert_close(cov1[0], torch.cov(x.T))
    torch.testing.assert_close((mean2[0], cov2[0]), (mean1[0], cov1[0]))
    for kernel in (energy_pair_kernel, rbf_pair_kernel(1.0), polynomial_pair_kernel(3)):
        torch.testing.assert_close(_within(x, twos, kernel), _within(x, ones, kernel))


def _coverage(metric, make_sets, reps=40, n=200, shifted=True):
    values, intervals = [], []
    for r in range(reps):
        x, y = make_sets(torch.Generator().manual_seed(r))
        column = METRICS[metric][0](x, y, bootstrap_counts(n, 100, 2 * r), bootstrap_counts(n, 100, 2 * r + 1))
        if shifted:
            value, low, high = shifted_percentile_interval(column)
        else:  # the plain percentile interval: known wrong for FID (a resample's FID carries the bias again)
            value = float(column[0])
            low, high = (float(q) for q in torch.quantile(column[1:], torch.tensor([0.025, 0.975], dtype=torch.float64)))
        values.append(value)
        intervals.append((low, high))
    expected = sum(values) / reps  # the metric's expectation at this n, estimated over the repetitions
    return sum(low <= expected <= high for low, high in intervals) / reps


def _feature_sets(g, n=200):
    return torch.randn(n, 8, generator=g).double(), (torch.randn(n, 8, generator=g) * 1.1 + 0.05).double()


def _point_sets(g, n=200):
    return torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) * 1.1 + 0.1


@pytest.mark.parametrize("metric,make_sets", [("energy", _point_sets), ("mmd", _point_sets),
                                              ("fid", _feature_sets), ("kid", _feature_sets)])
def test_intervals_cover_the_expected_metric(metric, make_sets):
    """Over 40 independent repetitions, the 95% interval covers the metric's expectation at this sample size
    (conservatively: at least 90% of the time)."""
    assert _coverage(metric, make_sets) >= 0.9


def _wide_feature_sets(g, n=200):
    return torch.randn(n, 16, generator=g).double(), (torch.randn(n, 16, generator=g) * 1.1 + 0.05).double()


def test_plain_percentile_interval_misses_fid():
    """Known wrong: the unshifted percentile interval of FID sits above the FID expectation (the resamples
    repeat points, so their FID carries the finite-sample bias once more) and almost never covers it; in the
    same setting the shifted interval does (16 features, where FID's bias is large next to its spread)."""
    assert _coverage("fid", _wide_feature_sets, reps=20, shifted=False) <= 0.1
    assert _coverage("fid", _wide_feature_sets, reps=20, shifted=True) >= 0.9


def test_intervals_separate_different_laws():
    g = torch.Generator().manual_seed(5)
    data, same = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    shifted = torch.randn(1500, 2, generator=g) + torch.tensor([0.3, 0.0])
    for metric in ("energy", "mmd"):
        _, low, high = metric_with_interval(metric, same, data, num_resamples=100)
        assert low <= 0.0 <= high
        value, low, _ = metric_with_interval(metric, shifted, data, num_resamples=100)
        assert low > 0.0 and low <= value
    with pytest.raises(ValueError) as excinfo:
        metric_with_interval("is", same, data)
    one_line_error(excinfo, "metric", "'is'")


def test_paired_difference_cancels_the_shared_reference():
    """Two coupled samplers (row i of both from seed i, as the frontier's points) measured against one reference on
    the same resamples: their difference's interval is far narrower than either interval (the reference's noise
    and the shared seeds' cancel), and it separates a small bias the separate intervals cannot."""
    g = torch.Generator().manual_seed(2)
    data = torch.randn(800, 2, generator=g)
    good = torch.randn(800, 2, generator=g)
    biased = 1.15 * good
    good_reps, biased_reps = (metric_replicates("energy", x, data, 200) for x in (good, biased))
    _, good_low, good_high = shifted_percentile_interval(good_reps)
    _, biased_low, _ = shifted_percentile_interval(biased_reps)
    diff, low, high = paired_difference(biased_reps, good_reps)
    assert biased_low < good_high  # separately the intervals overlap
    assert 0 < low <= diff <= high and high - low < good_high - good_low
    with pytest.raises(ValueError) as excinfo:
        paired_difference(good_reps, metric_replicates("energy", good, data, 100))
    one_line_error(excinfo, "paired_difference", "num_resamples")


# --- diffusers' solvers over our targets -----------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusers_ddim_is_our_ddim_eta0_chain(prediction):
    """diffusers' DDIMScheduler (eta 0) run by `solver_sample` gives, seed for seed, the samples of our DDIM(eta=0)
    chain: the same initial noise and the same deterministic steps."""
    pytest.importorskip("diffusers")
    from specdiff_train.evaluation.solvers import solver_sample

    schedule = DDPMSchedule(1000, prediction=prediction)
    model = GaussianDataDenoiser(schedule, torch.tensor(0.5), 0.25)
    ours = ancestral_sample(model, schedule, (3,), num_steps=20, seeds=range(500), chain=DDIM(eta=0.0))
    theirs = solver_sample(model, schedule, (3,), solver="ddim", num_steps=20, seeds=range(500), batch_size=200)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)


def test_solvers_converge_to_the_data_law():
    """On Gaussian data N(0.5, 0.5^2) (exact denoiser) the probability-flow ODE maps noise onto the data law:
    both solvers' sample std approaches 0.5 as steps grow, DPM-Solver++(2M) faster than DDIM."""
    pytest.importorskip("diffusers")
    from specdiff_train.evaluation.solvers import solver_sample

    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, torch.tensor(0.5), 0.25)
    error = {}
    for solver in ("ddim", "dpm-solver++"):
        for steps in (10, 50):
            samples = solver_sample(model, schedule, (4,), solver=solver, num_steps=steps, seeds=range(2000))
            error[solver, steps] = abs(samples.std().item() - 0.5)
            assert abs(samples.mean().item() - 0.5) < 0.02
    assert error["dpm-solver++", 50] < 0.01
    assert error["dpm-solver++", 50] < error["dpm-solver++", 10]
    assert error["ddim", 50] < error["ddim", 10]
    assert error["dpm-solver++", 10] < error["ddim", 10]


def test_solver_errors():
    pytest.importorskip("diffusers")
    from specdiff_train.evaluation.solvers import solver_sample

    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, torch.tensor(0.0), 1.0)
    with pytest.raises(ValueError) as excinfo:
        solver_sample(model, schedule, (2,), solver="heun", num_steps=5, seeds=[0])
    one_line_error(excinfo, "solver", "'heun'", "dpm-solver++")
    with pytest.raises(ValueError) as excinfo:
        solver_sample(model, schedule, (2,), solver="ddim", num_steps=0, seeds=[0])
    one_line_error(excinfo, "num_steps")
    edm = EDMSchedule()
    with pytest.raises(ValueError) as excinfo:
        solver_sample(GaussianDataDenoiser(edm, torch.tensor(0.0), 1.0), edm, (2,), solver="ddim", num_steps=5,
                      seeds=[0])
    one_line_error(excinfo, "EDMSchedule", "DDPM")


# --- the frontier -----------------------------------------------------------------------------------------------
def test_frontier_points_and_bad_input():
    points = frontier.frontier_points(["ancestral", "ddim", "speculative"], drafters=["free-x0"], windows=[8],
                                      ancestral_steps=[10, 1000], solver_steps=[5], speculative_steps=[100])
    assert [(p.method, p.num_steps) for p in points] == [
        ("ancestral", 10), ("ancestral", 1000), ("ddim", 5), ("speculative free-x0/block/w8", 100)]
    learned = frontier.frontier_points(["speculative"], drafters=["free-x0", "medusa"], speculative_steps=[100, 1000],
                                       drafter_steps={"medusa": [100]})
    assert [(p.drafter, p.num_steps) for p in learned] == [("free-x0", 100), ("medusa", 100), ("free-x0", 1000)]
    with pytest.raises(ValueError) as excinfo:
        frontier.frontier_points(["ancestral", "dpm-solver"])
    one_line_error(excinfo, "methods", "'dpm-solver'", "dpm-solver++")
    for option, steps in (("ancestral_steps", [0]), ("solver_steps", [-5]), ("speculative_steps", [2000])):
        with pytest.raises(ValueError) as excinfo:
            frontier.frontier_points(list(frontier.FAMILIES), **{option: steps})
        one_line_error(excinfo, option, str(steps[0]))
    with pytest.raises(ValueError) as excinfo:
        frontier.frontier_points(["speculative"], speculative_steps=[1])
    one_line_error(excinfo, "speculative_steps", "at least 2")
    with pytest.raises(ValueError) as excinfo:
        frontier.frontier_points(["speculative"], windows=[8, "automatic"])
    one_line_error(excinfo, "window", "'automatic'")
    with pytest.raises(ValueError) as excinfo:
        frontier.frontier_points(["speculative"], verifier="blocks")
    one_line_error(excinfo, "blocks")
    with pytest.raises(ValueError) as excinfo:
        frontier.check_metrics(["fid"], (2,), "toy2d")
    one_line_error(excinfo, "metrics", "fid", "toy2d", "(2,)", "energy")
    with pytest.raises(ValueError) as excinfo:
        frontier.check_metrics(["fd"], (1, 8, 8))
    one_line_error(excinfo, "metrics", "'fd'")
    assert frontier.default_metrics((2,)) == ["energy", "mmd"]
    assert frontier.default_metrics((1, 8, 8)) == ["fid", "kid"]


class _Gaussian2d(GaussianDataDenoiser):
    sample_shape = (2,)


def test_run_frontier_records_and_exactness():
    """On Gaussian data with the exact denoiser: every record has the documented fields; a speculative point
    reproduces 1000-step ancestral sampling (its distance to that sampler's samples from other seeds has an
    interval around 0, as the 1000-step point's own), at far fewer calls; 5 DDIM steps are told apart from it."""
    pytest.importorskip("diffusers")
    from specdiff_train.speculative import FreeDrafter

    schedule = DDPMSchedule(1000)
    model = _Gaussian2d(schedule, torch.tensor([0.5, -0.5]), 0.09)
    data = 0.5 * torch.tensor([1.0, -1.0]) + 0.3 * torch.randn(1200, 2, generator=torch.Generator().manual_seed(9))
    points = frontier.frontier_points(["ancestral", "ddim", "speculative"], ancestral_steps=[1000], solver_steps=[5],
                                      speculative_steps=[1000], drafters=["free-x0"], windows=[8])
    lines = []
    records = frontier.run_frontier(model, "gauss", points, data=data, num_samples=1200, metrics=["energy", "mmd"],
                                    drafter_factories={"free-x0": lambda: FreeDrafter("x0")}, timing_seeds=0,
                                    num_resamples=100, log=lines.append)
    assert len(records) == 3 * 2 * 2 and len(lines) == 4
    for r in records:
        assert set(frontier.RECORD_FIELDS) <= set(r) and "replicates" not in r
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["num_samples"] == 1200 and r["wall_clock_ratio"] is None
        assert r["diff_low"] <= r["diff"] <= r["diff_high"]
    json.dumps(records)
    by = {(r["method"], r["metric"], r["reference"]): r for r in records}
    speculative = by["speculative free-x0/block/w8", "energy", "ancestral_1000"]
    assert speculative["calls_per_sample"] < 200 and 0 < speculative["acceptance_rate"] <= 1
    for metric in ("energy", "mmd"):
        assert by["ancestral", metric, "data"]["diff"] == 0.0  # the anchor itself
        for method in ("ancestral", "speculative free-x0/block/w8"):
            row = by[method, metric, "ancestral_1000"]
            assert row["ci_low"] <= 0.0 <= row["ci_high"], row
        row = by["speculative free-x0/block/w8", metric, "data"]
        assert row["diff_low"] <= 0.0 <= row["diff_high"], row
        # 5 ODE steps shrink the spread: detected against the other seeds' samples and in the paired difference
        assert by["ddim", metric, "ancestral_1000"]["ci_low"] > 0 and by["ddim", metric, "data"]["diff_low"] > 0
    summary = "\n".join(frontier.reach_summary(records))
    assert "free-x0/block/w8 at 1000 steps: no difference detectable" in summary
    assert "ddim: a loss is detectable up to N=5" in summary and "the largest N run" in summary
    table = frontier.frontier_table(records)
    assert table.count("\n") == 2 + 3 - 1 and table.count("|") == 5 * (4 + 3 * 2 + 1)


def _record(family, steps, diff, low, high, calls=None, metric="fid"):
    return dict(target="t", method=family, family=family, num_steps=steps, calls_per_sample=calls or steps,
                wall_clock_ratio=None, metric=metric, reference="data", value=1.0 + diff, ci_low=0.5 + diff,
                ci_high=1.5 + diff, num_samples=100, diff=diff, diff_low=low, diff_high=high)


def test_reach_summary_reads_the_paired_intervals():
    """A loss counts as detectable only when the paired interval lies above 0, not when the point estimate does:
    N=10 here is worse in its point estimate but not detectably; a non-monotone family says so."""
    records = [_record("ancestral", 1000, 0.0, 0.0, 0.0),
               _record("ddim", 5, 3.0, 2.0, 4.0), _record("ddim", 10, 0.4, -0.2, 1.0), _record("ddim", 20, -0.1, -0.6, 0.4),
               _record("dpm-solver++", 5, 2.0, 1.0, 3.0), _record("dpm-solver++", 10, 0.1, -0.5, 0.7),
               _record("dpm-solver++", 20, 0.9, 0.1, 1.7),
               _record("speculative", 1000, 0.3, 0.05, 0.6, calls=125.0)]
    records[-1]["method"] = "speculative free-x0/block/w8"
    lines = frontier.reach_summary(records)
    assert lines[0].startswith("- **fid** to the data: ancestral sampling at 1000 steps gives 1 [0.5, 1.5]")
    assert "speculative free-x0/block/w8 at 1000 steps: a detectable difference" in lines[1]
    assert "(8.0x fewer)" in lines[1]
    assert lines[2].startswith("  - ddim: a loss is detectable up to N=5 ") and "none from N=10 (10 calls) on" in lines[2]
    assert lines[3].startswith("  - dpm-solver++: a loss is detectable up to N=20 ")
    assert "not at every N below it" in lines[3] and "the largest N run" in lines[3]


def test_conditional_target_and_solver_on_edm_refused_before_sampling():
    class Conditional(_Gaussian2d):
        num_classes = 10

    edm = EDMSchedule()
    with pytest.raises(ValueError) as excinfo:
        frontier.run_frontier(_Gaussian2d(edm, torch.tensor(0.0), 1.0), "edm", frontier.frontier_points(["ddim"]),
                              data=torch.zeros(4, 2), num_samples=4, metrics=["energy"])
    one_line_error(excinfo, "ddim", "EDMSchedule")
    schedule = DDPMSchedule(1000)
    with pytest.raises(ValueError) as excinfo:
        frontier.run_frontier(Conditional(schedule, torch.tensor(0.0), 1.0), "cond", [], data=torch.zeros(4, 2),
                              num_samples=4, metrics=["energy"])
    one_line_error(excinfo, "cond", "unconditional")


# --- the script -------------------------------------------------------------------------------------------------
def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    import frontier as script

    return script


def test_script_writes_json_plot_and_page(tmp_path, capsys):
    """`scripts/frontier.py` on the shipped toy2d target, small: one JSON record per point x metric x reference,
    the PNG, and the page (text above the marker kept)."""
    pytest.importorskip("diffusers")
    script = _script()
    page = tmp_path / "frontier.md"
    page.write_text("# Frontier\n\nHand-written notes.\n\n" + script.MARKER + "\n\nold run\n")
    out = tmp_path / "f.json"
    script.main(["--targets", "toy2d", "--num-samples", "150", "--ancestral-steps", "10", "--solver-steps", "5",
                 "--speculative-steps", "100", "--drafters", "free-x0", "--num-resamples", "20",
                 "--timing-seeds", "1", "--json", str(out), "--plot", str(tmp_path / "f.png"),
                 "--markdown", str(page)])
    records = json.loads(out.read_text())
    assert len(records) == 4 * 2 * 2  # ancestral 10, ddim 5, dpm-solver++ 5, speculative 100; 2 metrics; 2 references
    assert {r["method"] for r in records} == {"ancestral", "ddim", "dpm-solver++", "speculative free-x0/block/w8"}
    assert all(r["wall_clock_ratio"] > 0 for r in records)
    assert (tmp_path / "f.png").stat().st_size > 10_000
    text = page.read_text()
    assert text.startswith("# Frontier\n\nHand-written notes.") and "old run" not in text
    assert "![quality against sequential target calls](f.png)" in text and "### toy2d" in text
    # a page without the marker keeps all its text above the run
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# Notes\n\nkeep me\n")
    script.main(["--from-json", str(out), "--markdown", str(fresh)])
    assert fresh.read_text().startswith("# Notes\n\nkeep me\n\n" + script.MARKER)
    # --from-json redraws the page and plot from the records, without sampling
    (tmp_path / "f.png").unlink()
    again = script.main(["--from-json", str(out), "--plot", str(tmp_path / "f.png"), "--markdown", str(page)])
    assert again == records and (tmp_path / "f.png").exists() and "redrawn from" in page.read_text()


def test_learned_drafters_run_at_the_step_count_their_checkpoint_records():
    script = _script()
    assert script.trained_steps(ROOT / "checkpoints" / "digits", ["free-x0", "medusa", "draftnet"]) == {
        "medusa": [100], "draftnet": [100]}  # free-x0 runs at every step count


def test_toy2d_reference_data_is_never_trained_on():
    """toy2d's data reference: fresh draws of the distribution, none of them a point the target trained on (its
    validation split holds 2500 points, fewer than the frontier's 4000)."""
    from omegaconf import OmegaConf

    from specdiff_train.data import DiffusionDataModule

    script = _script()
    held_out = script.held_out_data("toy2d", 4000)
    init = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/target/toy2d.yaml"))["data"]["init_args"]
    data = DiffusionDataModule(**init)
    data.setup()
    training = data._source[0] if isinstance(data._source, tuple) else data._source
    assert held_out.shape == (4000, 2) and len(training) == 50_000
    assert not {tuple(p) for p in held_out.tolist()} & {tuple(p) for p in training.tolist()}
    assert abs(held_out.norm(dim=1).mean().item() - training.norm(dim=1).mean().item()) < 0.02  # the same law


@pytest.mark.parametrize("argv,expected", [
    (["--methods", "ancestral", "euler"], "unknown method 'euler'"),
    (["--ancestral-steps", "0"], "ancestral_steps"),
    (["--targets", "toy2d", "--metrics", "fid", "--methods", "ancestral", "--ancestral-steps", "10"],
     "fid needs image samples"),
])
def test_script_bad_input(argv, expected, capsys):
    script = _script()
    with pytest.raises(SystemExit) as excinfo:
        script.main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in err, err
