"""What a round costs besides the networks: aten operators and host syncs (docs/performance.md).

At batch 1 a GPU is launch-bound, so these deterministic counts predict wall-clock; they are held
here so that a change that adds per-round work fails CI. The bounds are the goals of the fast-rounds
issue (block: 250 operators, 2 syncs per round; ancestral: 30 operators per step, held tighter here);
measured today (digits target, batch 1, 100 steps, seed 1): block 249.65 ops / 1.45 syncs per round,
token-wise 154 / 1.4, ancestral 10.5 ops / 0 syncs per step.
"""
import pytest
import torch

from specdiff_train.models import load_target
from specdiff_train.overhead import OverheadCounter, ancestral_overhead, speculative_overhead
from specdiff_train.speculative import FreeDrafter, FrozenTargetDrafter

from helpers import ROOT


@pytest.fixture(scope="module")
def digits():
    target = load_target(ROOT / "checkpoints" / "digits" / "target.ckpt")
    return target, target.schedule, tuple(target.sample_shape)


@pytest.mark.parametrize("verifier,max_ops", [("block", 250), ("tokenwise", 160)])
def test_speculative_round_overhead(digits, verifier, max_ops):
    target, schedule, shape = digits
    counts = speculative_overhead(target, schedule, shape, num_steps=100, drafter=FreeDrafter("x0"),
                                  verifier=verifier, window=8, seeds=[1])
    assert counts["ops_per_round"] <= max_ops, counts["counter"].top()
    assert counts["syncs_per_round"] <= 2, counts["counter"].sync_ops
    assert counts["network_ops_per_round"] > 0  # the target's forward was seen, and kept apart


def test_frozen_target_drafter_round_has_no_extra_host_read(digits):
    target, schedule, shape = digits
    counts = speculative_overhead(target, schedule, shape, num_steps=100, drafter=FrozenTargetDrafter("eps"),
                                  verifier="block", window=8, seeds=[1])
    assert counts["syncs_per_round"] <= 2, counts["counter"].sync_ops


def test_ancestral_step_overhead(digits):
    target, schedule, shape = digits
    counts = ancestral_overhead(target, schedule, shape, num_steps=100, seeds=[1])
    assert counts["ops_per_step"] <= 12, counts["counter"].top()
    assert counts["syncs_per_step"] == 0, counts["counter"].sync_ops


def test_counter_sees_syncs_and_keeps_networks_apart():
    net = torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)
    with torch.no_grad(), OverheadCounter([net]) as counter:
        y = net(x)
        (y > 0).nonzero()
        float(y.sum())
        y.tolist()
        y[y > 0]
    assert counter.network_ops >= 1
    assert counter.syncs == 4  # nonzero, the scalar read, tolist, boolean-mask indexing
    assert counter.ops >= 5
