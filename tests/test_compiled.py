"""Compiled rounds (`compile=True`, speculative/compiled.py) on the CPU with the inductor backend.

A compiled round evaluates every slot, pads its window to the policy's width and computes its
correction in every round; none of that may change a sample or a count. Each shipped drafter x
verifier gives the eager samples (to float tolerance: the network sees padded batches) and the same
calls and rounds; the round is one graph (fullgraph: a graph break would raise, or send the drafter
to its eager fallback, which warns); the per-step exactness test holds on the compiled path, and a
known-wrong rule is still detected there.
"""
import warnings
from functools import lru_cache, partial

import pytest
import torch

from helpers import ROOT
from specdiff_train.compiling import compile_mode
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.drafters.training_free import training_free_drafters
from specdiff_train.models import load_target
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import (
    CostAwareWindow,
    DraftNetworkDrafter,
    FreeDrafter,
    HeuristicWindow,
    MedusaDrafter,
    speculative_sample,
)
from specdiff_train.speculative.costs import CostModel
from specdiff_train.speculative.verify import verify_block
from specdiff_train.testing import GaussianDataDenoiser, PathObserver, closed_form_marginals, marginal_test, path_test

from test_exactness_power import DATA_MEAN, DATA_VAR, NUM_SAMPLES, NUM_STEPS, WINDOW, assert_path_exact, unweighted_residual
from test_speculative_exactness import BiasedDrafter

DRAFTERS = training_free_drafters() | {
    "medusa": lambda: MedusaDrafter(str(ROOT / "checkpoints" / "toy2d" / "medusa.ckpt")),
    "draftnet": lambda: DraftNetworkDrafter(str(ROOT / "checkpoints" / "toy2d" / "draftnet.ckpt")),
}
VERIFIERS = ("block", "tokenwise", "tokenwise-residual")


@lru_cache(maxsize=1)
def toy_target():
    return load_target(ROOT / "checkpoints" / "toy2d" / "target.ckpt").eval()


def sample_both(drafter: str, verifier="block", window=4, **options):
    """Eager and compiled runs of the same seeds: 6 seeds through 4 slots (a slot reused, and the last
    rounds with finished chains' slots left empty)."""
    target = toy_target()
    kw = dict(num_steps=40, seeds=range(6), batch_size=4, verifier=verifier) | options
    eager = speculative_sample(target, target.schedule, target.sample_shape, drafter=DRAFTERS[drafter](),
                               window=window() if callable(window) else window, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = speculative_sample(target, target.schedule, target.sample_shape, drafter=DRAFTERS[drafter](),
                                      window=window() if callable(window) else window, compile=True, **kw)
    assert not [w for w in caught if str(w.message).startswith("compile:")], "the drafter fell back to eager"
    return eager, compiled


def assert_same_run(eager, compiled):
    torch.testing.assert_close(compiled.samples, eager.samples, atol=1e-4, rtol=1e-4)
    for key in ("target_calls_per_sample", "rounds", "rounds_per_sample", "drafted_per_step", "accepted_per_step",
                "draft_calls"):
        assert compiled.stats[key] == eager.stats[key], key


# Every kind of drafter (every freeze of the Free Drafter) and every verifier at least twice (cold
# compilation costs ~10 s a run on a 2-core CPU); the whole matrix is `make test-compiled` (~4 minutes).
SHIPPED = [("free-x0", "block"), ("free-eps", "tokenwise"), ("free-increment", "tokenwise-residual"),
           ("frozen-eps", "block"), ("medusa", "tokenwise-residual"), ("draftnet", "block")]
MATRIX = [pytest.param(d, v, marks=pytest.mark.compile_matrix) for d in DRAFTERS for v in VERIFIERS
          if (d, v) not in SHIPPED]


@pytest.mark.parametrize("drafter,verifier", SHIPPED + MATRIX)
def test_compiled_rounds_give_the_eager_samples_and_calls(drafter, verifier):
    eager, compiled = sample_both(drafter, verifier)
    assert_same_run(eager, compiled)
    assert eager.stats.compile_s == 0


@pytest.mark.parametrize("window", [
    pytest.param(lambda: HeuristicWindow(initial=2, max_window=4), id="heuristic"),
    pytest.param(lambda: CostAwareWindow(max_window=4, cost_model=CostModel(target_rows=(1, 9), target_s=(1.0, 1.3),
                                                                           round_s=0.2)), id="auto-cost-model"),
])
def test_compiled_rounds_with_adaptive_windows(window):
    """Windows padded to powers of two (the heuristic's policy is captured in the graph; the cost-aware
    one runs between compiled rounds) give the eager run."""
    eager, compiled = sample_both("free-x0", "block", window)
    assert_same_run(eager, compiled)


def test_compiled_rounds_in_successive_batches():
    eager, compiled = sample_both("frozen-eps", "block", 3, refill=False)
    assert_same_run(eager, compiled)


def test_one_graph_per_width_and_reused_by_later_calls():
    """A fixed window compiles at most three graphs (its width, and the plain round on the full noise buffer
    and on the step-only one of plain rounds in a row), whatever the chains' windows at their ends; a second call
    with the same shapes compiles none (compile_s = 0), even with a new model object of the same network
    (its weights are graph inputs)."""
    from torch._dynamo.utils import counters

    assert 2 <= _new_graphs_of_a_fixed_window_run(num_steps=21) <= 3  # the step-only plain graph if a run needs it
    before = counters["stats"]["unique_graphs"]
    schedule = DDPMSchedule(1000)
    kw = dict(num_steps=21, seeds=range(5), batch_size=2, drafter=FreeDrafter("x0"), window=6, compile=True)
    second = speculative_sample(GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR), schedule, (2,), **kw)
    assert counters["stats"]["unique_graphs"] == before and second.stats.compile_s == 0
    eager = speculative_sample(GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR), schedule, (2,),
                               **(kw | dict(compile=False)))
    torch.testing.assert_close(second.samples, eager.samples, atol=1e-5, rtol=1e-5)


class HostReadingDrafter(FreeDrafter):
    """A drafter with a host read in its proposal (data-dependent Python control flow): not capturable."""

    def propose_step(self, slots, x, step):
        if bool(x.isnan().any()):
            raise ValueError("a NaN state")
        return super().propose_step(slots, x, step)

    def describe(self):
        return "HostReadingDrafter"


def test_a_drafter_that_cannot_be_captured_runs_eagerly_with_one_warning():
    target = toy_target()
    kw = dict(num_steps=30, seeds=range(3), window=4)
    eager = speculative_sample(target, target.schedule, target.sample_shape, drafter=HostReadingDrafter("x0"), **kw)
    with pytest.warns(UserWarning, match="compile: the drafter HostReadingDrafter could not be captured"):
        compiled = speculative_sample(target, target.schedule, target.sample_shape, drafter=HostReadingDrafter("x0"),
                                      compile=True, **kw)
    assert_same_run(eager, compiled)
    with warnings.catch_warnings(record=True) as caught:  # once per drafter
        warnings.simplefilter("always")
        speculative_sample(target, target.schedule, target.sample_shape, drafter=HostReadingDrafter("x0"),
                           compile=True, **kw)
    assert not [w for w in caught if str(w.message).startswith("compile:")]
    assert _new_graphs_of_a_fixed_window_run(num_steps=23) >= 2  # other drafters are still captured whole


def _new_graphs_of_a_fixed_window_run(num_steps: int):
    """Graphs compiled by a run of a plan length no other test uses (its step tables are new shapes)."""
    from torch._dynamo.utils import counters

    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    before = counters["stats"]["unique_graphs"]
    speculative_sample(model, schedule, (2,), num_steps=num_steps, seeds=range(5), batch_size=2,
                       drafter=FreeDrafter("x0"), window=6, compile=True)
    return counters["stats"]["unique_graphs"] - before


def test_compiled_ancestral_sampling_gives_the_eager_samples():
    target = toy_target()
    kw = dict(num_steps=30, seeds=range(5), return_stats=True)
    eager = ancestral_sample(target, target.schedule, target.sample_shape, **kw)
    compiled = ancestral_sample(target, target.schedule, target.sample_shape, compile=True, **kw)
    torch.testing.assert_close(compiled.samples, eager.samples, atol=1e-5, rtol=1e-5)
    again = ancestral_sample(target, target.schedule, target.sample_shape, compile=True, **kw)
    assert again.stats.compile_s == 0 and torch.equal(again.samples, compiled.samples)


def test_compile_option_errors_name_the_field():
    assert compile_mode(False, "cpu") is None
    assert compile_mode(True, "cpu") == "default" and compile_mode(True, "cuda") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile: expected True, False or a torch.compile mode"):
        compile_mode("fast", "cpu")
    target = toy_target()
    with pytest.raises(ValueError, match="compile:"):
        speculative_sample(target, target.schedule, target.sample_shape, num_steps=10, seeds=[0],
                           drafter=FreeDrafter(), compile="fast")


# --- exactness on the compiled path ------------------------------------------------------------------
@lru_cache(maxsize=None)
def _compiled_path(verifier: str):
    """The closed-form chain of test_exactness_power.py, compiled, its transitions seen by an observer."""
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, DATA_MEAN, DATA_VAR)
    plan = schedule.plan(NUM_STEPS)
    means, variances = closed_form_marginals(schedule, NUM_STEPS, DATA_MEAN, DATA_VAR)
    rules = {"block": "block", "tokenwise": "tokenwise", "unweighted-residual":
             partial(verify_block, correction=unweighted_residual, defer_correction=True)}
    observer = PathObserver(plan)
    result = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(NUM_SAMPLES),
                                drafter=BiasedDrafter(), window=WINDOW, verifier=rules[verifier], batch_size=2500,
                                callbacks=[observer], compile=True)
    return result, path_test(observer, means, variances), marginal_test(result.samples, means[-1], variances[-1])


@pytest.mark.parametrize("verifier", ["block", pytest.param("tokenwise", marks=pytest.mark.slow)])
def test_every_step_of_the_compiled_path_is_exact(verifier):
    result, report, output = _compiled_path(verifier)
    assert_path_exact(report)
    assert output["ks_p"] > 1e-4 and output["mean_z"] < 4.5 and output["var_z"] < 4.5, output
    assert 0.1 < result.stats["acceptance_rate"] < 0.9


def test_a_wrong_rule_is_detected_on_the_compiled_path():
    _, report, _ = _compiled_path("unweighted-residual")
    assert min(report["ks_p"], report["inc_ks_p"]) < 1e-6, report



def test_evaluation_reports_compiled_sampling_with_its_compile_time():
    """`evaluate` / the callback's `compile`: the same samples and calls as eager, compilation apart."""
    from specdiff_train.evaluation.compare import compare_methods, method_grid
    from specdiff_train.evaluation.sampling_callback import SpeculativeEvaluation

    target = toy_target()
    methods = method_grid({"free-x0": DRAFTERS["free-x0"]}, ["block"], [4])
    kw = dict(num_steps=[20], seeds=range(8), batch_size=4, warmup=False)
    eager = compare_methods(target, target.schedule, target.sample_shape, methods, **kw)
    compiled = compare_methods(target, target.schedule, target.sample_shape, methods, compile=True, **kw)
    assert compiled["config"]["compile"] is True
    for e, c in zip(eager["results"], compiled["results"]):
        assert c["target_calls_per_sample"] == e["target_calls_per_sample"] and "compile_s" in c
        torch.testing.assert_close(c["_samples"], e["_samples"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="compile: expected"):
        SpeculativeEvaluation(compile="fastest")


def test_latency_tables_of_compiled_sampling_leave_compilation_out():
    from specdiff_train.evaluation.latency import latency_by_window

    kw = dict(num_steps=20, windows=[4], seeds=range(2))
    eager = latency_by_window(toy_target(), DRAFTERS["free-x0"], **kw)
    compiled = latency_by_window(toy_target(), DRAFTERS["free-x0"], compile=True, **kw)
    assert [r["calls"] for r in compiled] == [r["calls"] for r in eager]
    assert all(0 < r["median_s"] < 1 for r in compiled)  # compilation (seconds) is not in the times


def _readme_drafter():
    """The README's example drafter (tests/external_drafter/my_drafters.py), which declares its `round_state`."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "external_drafter"))
    from my_drafters import DampedFreeDrafter

    return DampedFreeDrafter


def _input_mutations_of_compiled_rounds(monkeypatch, drafter, window) -> list[int]:
    """Sample with compiled rounds whose graphs go through AOT autograd (as inductor's do) and count, per
    graph, the inputs it modifies in place: inductor records no CUDA graph for such a graph."""
    from torch._dynamo.backends.common import aot_autograd

    from specdiff_train.speculative import compiled

    counts = []

    def record(gm, example_inputs):
        inputs = {node for node in gm.graph.nodes if node.op == "placeholder"}
        counts.append(sum(node.target is torch.ops.aten.copy_.default and node.args[0] in inputs
                          for node in gm.graph.nodes))
        return gm

    backend = aot_autograd(fw_compiler=record, keep_inference_input_mutations=True)
    monkeypatch.setattr(compiled, "compile_graphs",
                        lambda fn, mode: torch.compile(fn, fullgraph=True, dynamic=False, backend=backend))
    target = toy_target()
    with torch._dynamo.config.patch(recompile_limit=256):  # as compile_graphs sets it
        speculative_sample(target, target.schedule, target.sample_shape, num_steps=12, seeds=range(3), batch_size=2,
                           drafter=drafter, window=window, compile=True)
    return counts


@pytest.mark.parametrize("drafter,window", [
    pytest.param(lambda: FreeDrafter("x0"), lambda: 4, id="free-x0"),
    pytest.param(lambda: FreeDrafter("eps"), lambda: HeuristicWindow(initial=2, max_window=4), id="free-eps-heuristic"),
    pytest.param(DRAFTERS["medusa"], lambda: 3, id="medusa"),
    pytest.param(lambda: _readme_drafter()(0.9), lambda: 4, id="readme-example"),
])
def test_compiled_rounds_modify_no_graph_input(monkeypatch, drafter, window):
    """The drafter's and policy's `round_state` is modified on copies and written back after the graph, so
    every round graph can be recorded as a CUDA graph (on a GPU, a round with a modified input ran launch by
    launch: 3.3 ms against 0.5 ms for the target call). Without the declaration the graphs modify inputs."""
    assert sum(_input_mutations_of_compiled_rounds(monkeypatch, drafter(), window())) == 0
    undeclared = drafter()
    monkeypatch.setattr(type(undeclared), "round_state", ())
    assert sum(_input_mutations_of_compiled_rounds(monkeypatch, undeclared, window())) > 0
