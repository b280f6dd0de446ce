"""Every fast path that restates the ancestral step equals the reference formula, at every step.

The reference is `SamplingPlan.transition` (with `DDPMSchedule.denoised`), which test_diffusion.py
checks against diffusers. The sampling loops restate it for speed: ancestral sampling with Python-float
coefficients, the speculative round's target evaluation with the window's gathered coefficients (and
a compacted batch for large rounds), the drafters' `propose_step` with pre-gathered coefficients and
precomputed terms, and `observe` with the x0 / means the sampler already computed. A slip in one of
them (a swapped coefficient at the last step, a wrong sign for one prediction type, an off-by-one in
the window) changes the samples without changing their law enough for the statistical tests to see,
so each is compared here, to float tolerance, against the reference on the values it really saw:
for every prediction type, with and without clipping, at every step including the deterministic last.

The network is a fixed random tanh MLP: nonlinear in x and t (a linear denoiser can hide a swapped
coefficient), with outputs large enough that clipping really happens.
"""
import dataclasses
import math

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.noise import Stream, gaussian
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import (
    DraftNetworkDrafter,
    FreeDrafter,
    MedusaDrafter,
    speculative_sample,
)
from specdiff_train.speculative import engine as engine_module
from specdiff_train.drafters import MLPHead, training_free_drafters

PREDICTIONS = ("eps", "x0", "v")
CLIPS = (False, True)
SHAPE = (2, 3)  # two sample axes: the coefficients must broadcast over both
HIDDEN = 16
# float32 states against a float64 reference: a few ulps of the largest term (x0 reaches ~150 at
# t=900 for eps prediction, before clipping) are ~1e-5.
TOL = dict(rtol=1e-5, atol=2e-5)


class TanhNet(torch.nn.Module):
    """A fixed random MLP, `scale * tanh(...)`: nonlinear in x and t, outputs up to `scale` (beyond the
    clip range 1). `return_features=True` also returns the hidden layer (for Medusa heads)."""

    def __init__(self, shape=SHAPE, hidden: int = HIDDEN, seed: int = 0, scale: float = 2.5):
        super().__init__()
        numel = math.prod(shape)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.inp = torch.nn.Linear(numel + 1, hidden)
            self.out = torch.nn.Linear(hidden, numel)
        self.scale, self.feature_dim = scale, hidden

    def forward(self, x, t, return_features=False):
        flat = x.flatten(1)
        h = torch.tanh(self.inp(torch.cat([flat, (t.to(x.dtype) / 500)[:, None]], dim=1)))
        out = (self.scale * torch.tanh(self.out(h) + flat)).reshape(x.shape)
        return (out, h) if return_features else out


def make_schedule(prediction, clip):
    return DDPMSchedule(1000, prediction=prediction, clip_denoised=clip)


def clipped_any(schedule, output, x, t) -> bool:
    """Whether the unclipped x0 estimate leaves the clip range somewhere."""
    return bool((schedule.to_x0(output.double(), x.double(), t).abs() > schedule.clip_range).any())


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL,
                               msg=lambda m: f"{what}: the fast path differs from the reference\n{m}")


# --- 1. ancestral sampling's step is the plan's transition ------------------------------------------
class RecordingModel(torch.nn.Module):
    """Calls `net` and records each call's (x, t, output)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        out = self.net(x, t)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        return out


@pytest.mark.parametrize("num_steps", [10, 7])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ancestral_step_is_the_plan_transition(prediction, clip, num_steps):
    """Each state ancestral_sample computes (Python-float coefficients) is mean + std z of the plan's
    transition at the previous state and the network's output there, z the step's noise; the sample is
    the last, deterministic step's mean."""
    schedule = make_schedule(prediction, clip)
    plan = schedule.plan(num_steps)
    seeds = torch.tensor([0, 7, 2**33 + 5])
    model = RecordingModel(TanhNet())
    sample = ancestral_sample(model, schedule, SHAPE, num_steps=num_steps, seeds=seeds.tolist())
    assert len(model.calls) == num_steps
    next_states = [x for x, _, _ in model.calls[1:]] + [sample]
    clipped = False
    for k, ((x, t, out), after) in enumerate(zip(model.calls, next_states)):
        ks = torch.full((len(seeds),), k)
        assert torch.equal(t, plan.t(ks)), f"step {k}: the network saw timesteps {t.tolist()}"
        mean, std = plan.transition(x.double(), ks, out.double())
        # Step noise is keyed by the step index (the last step is deterministic: std 0, no noise).
        z = gaussian(seeds, k, Stream.STEP, SHAPE).double()
        expected = mean + std.reshape(-1, 1, 1) * z
        assert bool((std > 0).all()) == (k < num_steps - 1), "only the last step is deterministic"
        assert_close(after, expected, f"ancestral step {k} of {num_steps} ({prediction}, clip={clip})")
        clipped |= clipped_any(schedule, out, x, t)
    assert clipped, "the network's x0 estimate must leave the clip range, else clipping is never exercised"


# --- 2. the speculative round's target evaluation is the plan's transition ---------------------------
class EvaluateChecker:
    """Wraps `engine.evaluate`: on every round, compares the target's outputs, x0 estimates and
    step means at the rows the round uses with `net`, `schedule.denoised` and `plan.transition`."""

    def __init__(self, net, schedule, plan):
        self.net, self.schedule, self.plan = net, schedule, plan
        self.original = engine_module.evaluate
        self.row_counts, self.steps_seen = [], set()

    def __call__(self, target, window, states, evaluated, wants_features, schedule, slots):
        out, features, x0, means = self.original(target, window, states, evaluated, wants_features, schedule, slots)
        C, L1 = states.shape[:2]
        self.row_counts.append(C * L1)
        x, k, o = states[evaluated].double(), window.steps[evaluated], out[evaluated].double()
        t = self.plan.t(k)
        what = f"round with {C}x{L1} rows at steps {sorted(set(k.tolist()))}"
        assert_close(out[evaluated], self.net(states[evaluated], t), f"{what}: target outputs")
        assert_close(x0[evaluated], self.schedule.denoised(o, x, t), f"{what}: x0 estimates")
        assert_close(means[evaluated], self.plan.transition(x, k, o)[0], f"{what}: target means")
        self.steps_seen.update(k.tolist())
        return out, features, x0, means


class PlainEvaluateChecker:
    """Wraps `engine.evaluate_plain` (a plain round: the Free Drafter's first round, a chain's last
    step) like `EvaluateChecker`, its step std included, recording the steps it saw in `seen`."""

    def __init__(self, net, schedule, plan, seen: set):
        self.net, self.schedule, self.plan, self.seen = net, schedule, plan, seen
        self.original = engine_module.evaluate_plain

    def __call__(self, target, tables, x, n, wants_features, schedule, slots):
        out, features, x0, mean, std = self.original(target, tables, x, n, wants_features, schedule, slots)
        t = self.plan.t(n)
        what = f"plain round at steps {sorted(set(n.tolist()))}"
        assert_close(out, self.net(x, t), f"{what}: target outputs")
        assert_close(x0, self.schedule.denoised(out.double(), x.double(), t), f"{what}: x0 estimates")
        reference_mean, reference_std = self.plan.transition(x.double(), n, out.double())
        assert_close(mean, reference_mean, f"{what}: target means")
        assert_close(std, reference_std.reshape(std.shape), f"{what}: step std")
        self.seen.update(n.tolist())
        return out, features, x0, mean, std


@pytest.mark.parametrize("num_chains", [16, 3], ids=["compacted", "uncompacted"])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_speculative_target_evaluation_is_the_plan_transition(prediction, clip, num_chains, monkeypatch):
    """The round's x0 estimates and target means (window coefficients; from COMPACT_MIN_ROWS padded rows,
    only the needed rows evaluated) are the reference's at every row the round uses; so are a plain
    round's, and its step std."""
    schedule, num_steps, window = make_schedule(prediction, clip), 10, 4
    net = TanhNet()
    checker = EvaluateChecker(net, schedule, schedule.plan(num_steps))
    plain = PlainEvaluateChecker(net, schedule, schedule.plan(num_steps), checker.steps_seen)
    monkeypatch.setattr(engine_module, "evaluate", checker)
    monkeypatch.setattr(engine_module, "evaluate_plain", plain)
    speculative_sample(net, schedule, SHAPE, num_steps=num_steps, seeds=range(num_chains), drafter=FreeDrafter(),
                       window=window)
    assert checker.steps_seen == set(range(num_steps)), "every step, the deterministic last one included"
    assert plain.seen >= {0, num_steps - 1}  # the Free Drafter's first round and the last step were plain
    compact = [rows >= engine_module.COMPACT_MIN_ROWS for rows in checker.row_counts]
    assert any(compact) if num_chains == 16 else not any(compact), checker.row_counts


# --- 3. drafters' fast paths equal their reference paths ---------------------------------------------
def random_head(feature_dim: int, dim: int) -> MLPHead:
    """Medusa heads with a non-zero output layer (a fresh head's correction is zero)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head = MLPHead(dim=dim, feature_dim=feature_dim, hidden=16, depth=1, time_embed_dim=8, max_offset=4)
        torch.nn.init.normal_(head.out.weight, std=0.3)
    return head


def make_drafter(kind, schedule, shape):
    if kind == "draftnet":
        return DraftNetworkDrafter.from_net(TanhNet(shape, seed=2), schedule, shape)
    if kind == "medusa":
        return MedusaDrafter.from_head(random_head(HIDDEN, shape[0]), schedule, shape)
    return training_free_drafters()[kind]()


# The buffers `observe` writes, per drafter class that overrides it.
OBSERVED_BUFFERS = {
    FreeDrafter: ("frozen", "has_frozen"),
    MedusaDrafter: ("features", "anchor_state", "anchor_x0", "anchor_step", "has_anchor"),
}


class DrafterChecker:
    """Replaces a drafter's `propose_step` and `observe` (on the instance) by functions that run the
    class's fast path and its reference path and compare them, then go on with the fast path's result.

    propose_step (window coefficients, precomputed terms) against propose (plan.transition*); observe
    with the sampler's x0 / means against observe computing them from the outputs."""

    def __init__(self, drafter):
        self.drafter, cls = drafter, type(drafter)
        self.fast_propose, self.reference_propose = cls.propose_step, cls.propose
        self.proposals, self.positions, self.steps, self.observed = 0, set(), set(), 0
        drafter.propose_step = self.propose_step
        self.buffers = next((names for base, names in OBSERVED_BUFFERS.items() if isinstance(drafter, base)), None)
        if self.buffers is not None:
            self.fast_observe = cls.observe
            drafter.observe = self.observe

    def propose_step(self, slots, x, step):
        fast = self.fast_propose(self.drafter, slots, x, step)  # first: it caches the window's terms
        reference = self.reference_propose(self.drafter, slots, x, step.k)
        assert_close(fast, reference, f"{self.drafter.describe()} at window position {step.index}, "
                                      f"steps {step.k.tolist()}")
        self.proposals += 1
        self.positions.add(step.index)
        self.steps.update(step.k.tolist())
        return fast

    def _buffers(self):
        return {name: getattr(self.drafter, name) for name in self.buffers}

    def observe(self, slots, verification):
        assert verification.denoised is not None and verification.means is not None
        before = {name: None if b is None else b.clone() for name, b in self._buffers().items()}
        self.fast_observe(self.drafter, slots, verification)
        fast = {name: b.clone() for name, b in self._buffers().items()}
        for name, b in before.items():  # the same update again, from the outputs alone
            setattr(self.drafter, name, b)
        self.fast_observe(self.drafter, slots, dataclasses.replace(verification, denoised=None, means=None))
        for name, b in self._buffers().items():
            assert_close(fast[name], b, f"{self.drafter.describe()}.observe: `{name}` with the sampler's x0/means")
        self.observed += 1


DRAFTER_KINDS = [*training_free_drafters(), "draftnet", "medusa"]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_drafter_fast_paths_equal_the_reference(kind, prediction, clip):
    """propose_step equals propose at every window position and step, and observe stores the same
    state from the sampler's x0 / means as from the outputs alone."""
    schedule, num_steps, window = make_schedule(prediction, clip), 10, 4
    shape = (3,) if kind == "medusa" else SHAPE  # heads take vector data
    drafter = make_drafter(kind, schedule, shape)
    checker = DrafterChecker(drafter)
    # 8 chains in 5 slots: refills keep some rounds on all slots, the end gathers a subset.
    speculative_sample(TanhNet(shape), schedule, shape, num_steps=num_steps, seeds=range(8), drafter=drafter,
                       window=window, batch_size=5)
    plan = schedule.plan(num_steps)
    assert checker.proposals > 0
    assert checker.positions == set(range(window)), "every position of the window"
    # every stochastic step is drafted (delayed drafters take a plain step first)
    assert checker.steps >= set(range(1, plan.num_stochastic_steps)), sorted(checker.steps)
    if checker.buffers is not None:
        assert checker.observed > 0
