"""Acceptance by step and offset on the target's own chains, and the modelled calls (drafters/diagnostics.py).

The calls model is held to the sampler itself: on the closed-form chain a drafter that proposes the target's
mean pushed a fixed c stds off is accepted at every step with probability 2 Phi(-c / 2), independently, which
is the model's assumption; the sampler's mean calls must match the model's within their standard error. The
acceptance tables are held to what they must give by construction: 1 for the target's own x0, the Free
Drafter's values for untrained (zero-output) heads, NaN where no anchor reaches.
"""
import math
import sys
from functools import lru_cache

import pytest
import torch

from helpers import ROOT
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.drafters import MLPHead
from specdiff_train.drafters.distillation import target_trajectories, x0_delta_sq_weight
from specdiff_train.drafters.diagnostics import (
    Anchor,
    expected_calls,
    free_x0_rule,
    heads_rule,
    other_target_rule,
    pair_acceptance,
    rollout_acceptance,
    stale_time_rule,
    x0_tolerance,
)
from specdiff_train.models import load_target
from specdiff_train.speculative import FreeDrafter, speculative_sample
from specdiff_train.testing import GaussianDataDenoiser


class ShiftedExactDrafter(FreeDrafter):
    """The target's own step mean pushed `shift` stds off along the first axis (the closed-form target is cheap
    to call directly, uncounted): each drafted step has delta = shift exactly, whatever the state."""

    def __init__(self, model, shift: float):
        super().__init__("x0")
        self.model, self.shift = model, shift

    def propose(self, slots, x, k):
        mean = self.plan.transition(x, k, self.model(x, self.plan.t(k)))[0].clone()
        mean[:, 0] += self.shift * self.plan.std_at(k).to(mean.dtype)
        return mean


@pytest.mark.parametrize("shift,window,num_steps", [(1.0, 4, 20), (0.5, 8, 40), (2.0, 3, 20)])
def test_expected_calls_match_the_sampler_at_a_known_acceptance(shift, window, num_steps):
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)
    result = speculative_sample(model, schedule, (2,), num_steps=num_steps, seeds=range(4000),
                                drafter=ShiftedExactDrafter(model, shift), verifier="tokenwise", window=window)
    plan = schedule.plan(num_steps)
    accept = 2 * torch.special.ndtr(torch.tensor(-shift / 2, dtype=torch.float64)).item()
    table = torch.full((plan.num_stochastic_steps, 2), accept)
    modelled = expected_calls(table, window, final_step=plan.num_steps > plan.num_stochastic_steps)
    measured = result.stats.target_calls_per_sample
    assert abs(measured - modelled) < 0.08, (measured, modelled)  # about 3 standard errors of 4000 chains


def test_expected_calls_at_the_extremes():
    S = 99
    assert expected_calls(torch.zeros(S, 8), 8) == pytest.approx(S + 1)  # one step a call, and the final step
    for w in (1, 8, 16):  # warm-up, then w + 1 steps a round; the last round's drafts reach the end: no final call
        rounds = math.ceil((S - 1) / (w + 1))
        extra = 1.0 if (S - 1) % (w + 1) == 0 else 0.0  # a bonus step that lands on the end leaves the final call
        assert expected_calls(torch.ones(S, 8), w) == pytest.approx(1 + rounds + extra)
    assert expected_calls(torch.full((S, 8), float("nan")), 4, final_step=False) == pytest.approx(S)
    first_only = torch.zeros(S, 8)
    first_only[:, 0] = 1.0  # offset 1 always accepted, offset 2 never: every round advances 2 steps
    assert expected_calls(first_only, 8) == pytest.approx(1 + (S - 1) / 2 + 1)  # warm-up, 49 rounds, the final step
    better = torch.full((S, 8), 0.9)
    better[:20] = 0.95
    assert expected_calls(better, 8) < expected_calls(torch.full((S, 8), 0.9), 8)


def test_x0_tolerance_is_the_error_at_which_a_step_is_accepted_at_the_given_rate():
    """An x0 off by the tolerance in every coordinate gives the step exactly the asked acceptance; a smaller
    error more, and nearest the data (larger weight) the tolerance shrinks."""
    from specdiff_train.diffusion import one_step_acceptance
    from specdiff_train.drafters.distillation import x0_delta_sq

    plan = DDPMSchedule(1000).plan(100)
    k = torch.tensor([10, 60, 97, 98])
    dim = 64
    for acceptance in (0.5, 0.9):
        tol = x0_tolerance(plan, k, acceptance, dim)
        assert (tol[1:] < tol[:-1]).all()
        x0_q = torch.zeros(len(k), dim, dtype=torch.float64)
        got = one_step_acceptance(x0_delta_sq(plan, k, tol[:, None].expand(-1, dim), x0_q).sqrt())
        assert torch.allclose(got, torch.full_like(got, acceptance), atol=1e-9)
        smaller = one_step_acceptance(x0_delta_sq(plan, k, 0.5 * tol[:, None].expand(-1, dim), x0_q).sqrt())
        assert (smaller > acceptance).all()
    for bad, match in (({"acceptance": 1.0}, "acceptance"), ({"acceptance": 0.0}, "acceptance"), ({"dim": 0}, "dim")):
        kwargs = {"acceptance": 0.5, "dim": dim, **bad}
        with pytest.raises(ValueError, match=match):
            x0_tolerance(plan, k, **kwargs)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_expected_calls_refuse_a_bad_window(window):
    with pytest.raises(ValueError, match="window: expected an int >= 1"):
        expected_calls(torch.ones(10, 2), window)


@lru_cache(maxsize=1)
def _toy():
    return load_target(ROOT / "checkpoints" / "toy2d" / "target.ckpt").eval()


def test_rollout_acceptance_by_construction():
    target = _toy()
    plan = target.schedule.plan(20)
    schedule = plan.schedule
    exact = lambda anchor, x, k, offset: schedule.denoised(target(x, plan.t(k)), x, plan.t(k))  # noqa: E731
    head = MLPHead(dim=2, feature_dim=target.net.feature_dim, hidden=16, depth=1, max_offset=3)  # zero output layer
    rules = {"exact": exact, "free": free_x0_rule, "untrained heads": heads_rule(head, plan),
             "stale time": stale_time_rule(target, plan), "the target as other target": other_target_rule(target, plan)}
    tables = rollout_acceptance(target, plan, rules, num_chains=6, max_offset=3,
                                generator=torch.Generator().manual_seed(0))
    S = plan.num_stochastic_steps
    reached = ~torch.isnan(tables["free"])
    assert tables["free"].shape == (S, 3)
    steps, offsets = torch.arange(S).unsqueeze(1), torch.arange(1, 4).unsqueeze(0)
    assert torch.equal(reached, steps >= offsets)  # step k is drafted from anchors k - offset >= 0 only
    assert torch.allclose(tables["exact"][reached], torch.ones(()).double())
    assert torch.allclose(tables["the target as other target"], tables["exact"], equal_nan=True)
    assert torch.allclose(tables["untrained heads"][reached], tables["free"][reached])
    assert not any(table.requires_grad for table in tables.values())  # trainable heads draft without autograd
    free, stale = tables["free"][reached], tables["stale time"][reached]
    assert ((free > 0) & (free < 1)).all() and ((stale > 0) & (stale <= 1)).all()
    assert stale.mean() > free.mean()  # the state, known exactly, explains most of the step
    with pytest.raises(ValueError, match="max_offset"):
        rollout_acceptance(target, plan, rules, max_offset=0)
    digits = load_target(ROOT / "checkpoints" / "digits" / "target.ckpt")
    with pytest.raises(ValueError, match="other target: its schedule .* differs"):
        other_target_rule(load_target(ROOT / "checkpoints" / "digits_edm" / "target.ckpt"), digits.schedule.plan(20))


def test_pair_acceptance_by_construction():
    """Long-offset pairs: the target's own x0 is accepted, untrained heads draft as the Free Drafter, and the Free
    Drafter's frozen x0 is accepted less the further the drafted state lies from its anchor."""
    target = _toy()
    plan = target.schedule.plan(20)
    schedule, S = plan.schedule, plan.num_stochastic_steps
    exact = lambda anchor, x, k, offset: schedule.denoised(target(x, plan.t(k)), x, plan.t(k))  # noqa: E731
    head = MLPHead(dim=2, feature_dim=target.net.feature_dim, hidden=16, depth=1, max_offset=3)
    rules = {"exact": exact, "free": free_x0_rule, "untrained heads": heads_rule(head, plan)}
    steps, offsets, accepted = pair_acceptance(target, plan, rules, num_chains=5, num_pairs=300, batch_size=64,
                                               generator=torch.Generator().manual_seed(1))
    assert steps.shape == offsets.shape == (300,) and not accepted["free"].requires_grad
    assert (offsets >= 1).all() and (steps - offsets >= 0).all() and (steps <= S - 1).all()
    assert offsets.max() > S // 2  # log-uniform up to the whole chain
    assert torch.allclose(accepted["exact"], torch.ones(()).double())
    assert torch.allclose(accepted["untrained heads"], accepted["free"])
    free = accepted["free"]
    assert ((free >= 0) & (free < 1)).all() and free[offsets <= 2].mean() > 0.8 > 0.5 > free[offsets >= 10].mean()
    with pytest.raises(ValueError, match="num_pairs"):
        pair_acceptance(target, plan, rules, num_pairs=0)
    # each pair is one trajectory's state at the anchor step and at the drafted step, j steps later
    seen = []
    record = lambda anchor, x, k, offset: seen.append((anchor.state, x, k, offset)) or anchor.x0  # noqa: E731
    pair_acceptance(target, plan, {"record": record}, num_chains=5, num_pairs=40, generator=torch.Generator().manual_seed(2))
    trajectories = target_trajectories(target, plan, 5, tuple(target.sample_shape), torch.Generator().manual_seed(2))
    anchor_states, states, steps, offs = map(torch.cat, zip(*seen))
    for a, x, k, j in zip(anchor_states, states, steps.tolist(), offs.tolist()):
        chain = (trajectories[k - j] == a).all(1).nonzero().flatten()
        assert len(chain) == 1 and torch.equal(trajectories[k, chain[0]], x)
    cond = load_target(ROOT / "checkpoints" / "digits_cond" / "target.ckpt")
    with pytest.raises(ValueError, match="unconditional targets only"):
        pair_acceptance(cond, cond.schedule.plan(20), {"free": free_x0_rule}, num_pairs=4)


def test_a_draft_a_known_delta_off_is_accepted_at_its_closed_form_rate():
    """A draft whose x0 is the target's pushed so that delta = c exactly (along the first axis, by the step's weight
    w_k = coef_x0^2 / std^2) is accepted at 2 Phi(-c / 2) at every step and offset, by both measurements: a missing or
    wrong weight, or a wrong delta, moves it off."""
    target = _toy()
    plan = target.schedule.plan(20)
    schedule, c = plan.schedule, 1.3
    assert not schedule.clip_denoised  # the push is not clipped away

    def pushed(anchor, x, k, offset):
        x0 = schedule.denoised(target(x, plan.t(k)), x, plan.t(k)).clone()
        x0[:, 0] += c / x0_delta_sq_weight(plan, k).sqrt().to(x0.dtype)
        return x0

    expected = 2 * torch.special.ndtr(torch.tensor(-c / 2, dtype=torch.float64))
    tables = rollout_acceptance(target, plan, {"pushed": pushed}, num_chains=4, max_offset=3)
    reached = ~torch.isnan(tables["pushed"])
    assert torch.allclose(tables["pushed"][reached], expected, atol=1e-5)
    _, _, accepted = pair_acceptance(target, plan, {"pushed": pushed}, num_chains=4, num_pairs=64)
    assert torch.allclose(accepted["pushed"], expected, atol=1e-5)


def test_heads_rule_takes_one_offset_per_row():
    target = _toy()
    plan = target.schedule.plan(20)
    head = MLPHead(dim=2, feature_dim=target.net.feature_dim, hidden=16, depth=1, max_offset=3)
    torch.nn.init.normal_(head.out.weight)  # trained-like: the output depends on the offset
    x, k = torch.randn(4, 2), torch.tensor([3, 5, 8, 12])
    t = plan.t(k - 2)
    out, features = target(x, t, return_features=True)
    anchor = Anchor(x, k - 2, t, plan.schedule.denoised(out, x, t), features)
    rule = heads_rule(head, plan)
    assert torch.equal(rule(anchor, x, k, torch.full_like(k, 2)), rule(anchor, x, k, 2))
    per_row = rule(anchor, x, k, torch.tensor([1, 2, 3, 2]))
    assert torch.equal(per_row[1], rule(anchor, x, k, 2)[1]) and not torch.equal(per_row[0], rule(anchor, x, k, 2)[0])


def test_a_conditional_other_target_drafts_with_its_null_label():
    """The conditional digits target drafts the unconditional one with its null label: its own output there."""
    from specdiff_train.guidance import NULL_LABEL

    digits = load_target(ROOT / "checkpoints" / "digits" / "target.ckpt")
    cond = load_target(ROOT / "checkpoints" / "digits_cond" / "target.ckpt")
    plan = digits.schedule.plan(20)
    x, k = torch.randn(3, *digits.sample_shape), torch.tensor([2, 9, 15])
    anchor = type("Anchor", (), {"labels": None})()
    t = plan.t(k)
    expected = plan.schedule.denoised(cond(x, t, labels=torch.full((3,), NULL_LABEL)), x, t)
    assert torch.equal(other_target_rule(cond, plan)(anchor, x, k, 1), expected)
    assert not torch.allclose(expected, plan.schedule.denoised(cond(x, t, labels=torch.zeros(3, dtype=torch.long)), x, t))


def test_acceptance_by_offset_script_prints_the_tables(capsys, tmp_path):
    """scripts/acceptance_by_offset.py end to end on toy2d (the shipped heads), with the what-if rows."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from acceptance_by_offset import main

    main(["--target", str(ROOT / "checkpoints" / "toy2d"), "--num-steps", "20", "--chains", "4", "--max-offset", "3",
          "--windows", "3", "--drafters", "free-x0", "medusa", "stale-time",
          f"other-target={ROOT / 'checkpoints' / 'toy2d' / 'target.ckpt'}", "--what-if", "--by-offset", "--save", str(tmp_path / "t.pt")])
    saved = torch.load(tmp_path / "t.pt")
    other = f"other-target={ROOT / 'checkpoints' / 'toy2d' / 'target.ckpt'}"
    assert set(saved) == {"free-x0", "medusa", "stale-time", other} and saved["medusa"].shape == (19, 3)
    assert torch.allclose(saved[other].nan_to_num(1.0), torch.ones(()).double())  # the target itself: always accepted
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"free-x0", "medusa", "stale-time"} <= set(rows)
    calls = lambda line: float(line.rstrip(" |").split(" | ")[-1])  # noqa: E731
    whatif = [line for line in out.splitlines() if "| acceptance 1 " in line]
    assert len(whatif) == 12 and all(calls(line) <= calls(rows[line.split(" | ")[0][2:]]) for line in whatif)
    tolerance = [line for line in out.splitlines() if line.startswith("| 1") and line.count(" | ") == 8]
    assert [int(line.split(" | ")[0][2:]) for line in tolerance] == list(range(11, 19))  # the last 8 of 19 steps
    main(["--target", str(ROOT / "checkpoints" / "toy2d"), "--num-steps", "20", "--chains", "4", "--pairs", "200",
          "--drafters", "free-x0", "medusa", f"other-target={ROOT / 'checkpoints' / 'toy2d' / 'target.ckpt'}"])
    pairs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "-" in line[2:4]]
    assert [line.split(" | ")[0][2:] for line in pairs] == ["1-8", "9-18"]  # 19 stochastic steps: offsets up to 18
    assert all(line.rstrip(" |").split(" | ")[3].endswith("/ 1.000") for line in pairs)  # the target itself: always accepted
    with pytest.raises(SystemExit, match="unknown drafter"):
        main(["--target", str(ROOT / "checkpoints" / "toy2d"), "--drafters", "nope"])
    with pytest.raises(SystemExit, match="other-target needs a target checkpoint"):
        main(["--target", str(ROOT / "checkpoints" / "toy2d"), "--drafters", "other-target"])
    with pytest.raises(SystemExit, match="schedule .* differs"):
        main(["--target", str(ROOT / "checkpoints" / "digits"), "--drafters",
              f"other-target={ROOT / 'checkpoints' / 'digits_edm' / 'target.ckpt'}"])
