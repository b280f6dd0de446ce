"""Verifier-level properties on identical drafts."""
from functools import partial

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import ndtr

from specdiff_train.speculative.coupling import log_density_ratio, scaled_mean_difference
from specdiff_train.speculative.verify import (
    block_pass_probabilities,
    running_log_weights,
    verify_block,
    verify_tokenwise,
)
from specdiff_train.testing import marginal_test, reflection_instead_of_residual, sample_residual


def random_walk_window(n, L, d, bias, seed=0):
    """Drafts of a Gaussian random walk: P_i(.|y) = N(y + a_i, s^2), Q_i(.|y) = N(y + a_i + b, s^2)."""
    gen = torch.Generator().manual_seed(seed)
    s = 0.3
    drift = 0.1 * torch.randn(L + 1, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, L, d, generator=gen, dtype=torch.float64)
    states = torch.zeros(n, L + 1, d, dtype=torch.float64)
    draft_means = torch.zeros(n, L, d, dtype=torch.float64)
    for i in range(L):
        # a state-dependent mismatch, so that deltas differ across the window
        draft_means[:, i] = states[:, i] + drift[i] + bias * s * torch.tanh(states[:, i])
        states[:, i + 1] = draft_means[:, i] + s * noise[:, i]
    target_means = states + drift
    stds = torch.full((n, L + 1), s, dtype=torch.float64)
    return noise, states, draft_means, target_means, stds


def expected_accepted(noise, draft_means, target_means, stds, L):
    """E[tau | drafts] for both verifiers, in closed form over the verification uniforms."""
    d = scaled_mean_difference(target_means[:, :L], draft_means, stds[:, :L])
    log_ratio = log_density_ratio(noise, d)
    token = log_ratio.clamp(max=0).cumsum(1).exp().sum(1)
    lengths = torch.full((len(noise),), L)
    h, _, _ = block_pass_probabilities(log_ratio, torch.zeros(len(noise), dtype=torch.float64), d.norm(dim=-1), lengths)
    # P(tau >= i) = 1 - prod_{j >= i} (1 - h_j)
    fail_from = torch.flip(torch.cumprod(torch.flip(1 - h, [1]), 1), [1])
    block = (1 - fail_from).sum(1)
    return token, block


def test_block_accepts_at_least_as_many_drafts_as_tokenwise_on_the_same_drafts():
    n, L, d = 20000, 6, 4
    noise, states, draft_means, target_means, stds = random_walk_window(n, L, d, bias=1.5)
    token, block = expected_accepted(noise, draft_means, target_means, stds, L)
    assert block.mean() >= token.mean()
    assert block.mean() > 1.02 * token.mean()  # the gain is real here, not a tie

    # Monte Carlo with the verifiers themselves, on the same drafts.
    gen = torch.Generator().manual_seed(5)
    lengths, has_next = torch.full((n,), L), torch.ones(n, dtype=torch.bool)
    common = (noise, states, draft_means, target_means, stds, lengths, has_next)
    taus = {}
    for name, verify in (("block", verify_block), ("token", verify_tokenwise)):
        rand = dict(
            accept_u=torch.rand(n, L, generator=gen, dtype=torch.float64),
            xi=torch.randn(n, d, generator=gen, dtype=torch.float64),
            residual_u=torch.rand(n, generator=gen, dtype=torch.float64),
        )
        result = verify(*common, **rand)
        assert (result.advanced == result.accepted + 1).all()
        taus[name] = result.accepted.double()
    stderr = (taus["block"].var() / n + taus["token"].var() / n).sqrt()
    assert abs(taus["block"].mean() - block.mean()) < 4 * stderr
    assert abs(taus["token"].mean() - token.mean()) < 4 * stderr
    assert taus["block"].mean() > taus["token"].mean()


def test_running_log_weights_match_the_recursion():
    gen = torch.Generator().manual_seed(3)
    log_ratio = 2 * torch.randn(500, 9, generator=gen, dtype=torch.float64)
    log_w0 = -torch.rand(500, generator=gen, dtype=torch.float64)
    expected = [log_w0]
    for i in range(9):
        expected.append(torch.clamp(expected[-1] + log_ratio[:, i], max=0.0))
    torch.testing.assert_close(running_log_weights(log_ratio, log_w0), torch.stack(expected, 1), rtol=0, atol=1e-12)


def test_window_end_without_a_next_step_keeps_the_last_draft():
    n, L, d = 100, 3, 2
    noise, states, draft_means, target_means, stds = random_walk_window(n, L, d, bias=0.0)
    lengths, has_next = torch.full((n,), L), torch.zeros(n, dtype=torch.bool)
    rand = dict(accept_u=torch.full((n, L), 0.5, dtype=torch.float64), xi=torch.zeros(n, d, dtype=torch.float64),
                residual_u=torch.full((n,), 0.5, dtype=torch.float64))
    for verify in (verify_block, verify_tokenwise):
        result = verify(noise, states, draft_means, target_means, stds, lengths, has_next, **rand)
        # perfect drafts: all accepted, no bonus at the end of the chain
        assert (result.accepted == L).all() and (result.advanced == L).all()
        torch.testing.assert_close(result.next_state, states[:, L])


def test_empty_window_is_a_plain_target_step():
    n, d = 50, 2
    noise, states, draft_means, target_means, stds = random_walk_window(n, 2, d, bias=1.0)
    lengths, has_next = torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.bool)
    xi = torch.randn(n, d, dtype=torch.float64)
    rand = dict(accept_u=torch.rand(n, 2, dtype=torch.float64), xi=xi, residual_u=torch.rand(n, dtype=torch.float64))
    for verify in (verify_block, verify_tokenwise):
        result = verify(noise, states, draft_means, target_means, stds, lengths, has_next, **rand)
        assert (result.accepted == 0).all() and (result.advanced == 1).all()
        torch.testing.assert_close(result.next_state, target_means[:, 0] + 0.3 * xi)


# --- block verification against laws computed without the verifier's formulas (issue 10, item 2) ---

AR_SLOPE, AR_STD = 0.9, 0.5


def biased_first_draft_window(n, L, d, bias=1.0, seed=0):
    """Drafts of a Gaussian AR(1) target P_i(.|y) = N(0.9 y + a_i, s^2) by a drafter biased at EVERY
    position, the first included (X_0 ~ N(0, I), bias s * b * (1 + tanh(y) / 2) per coordinate), so
    that deltas vary and the first draft is never exact."""
    gen = torch.Generator().manual_seed(seed)
    s = AR_STD
    drift = 0.2 * torch.randn(L + 1, d, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, L, d, generator=gen, dtype=torch.float64)
    states = torch.zeros(n, L + 1, d, dtype=torch.float64)
    states[:, 0] = torch.randn(n, d, generator=gen, dtype=torch.float64)
    draft_means = torch.zeros(n, L, d, dtype=torch.float64)
    for i in range(L):
        y = states[:, i]
        draft_means[:, i] = AR_SLOPE * y + drift[i] + bias * s * (1 + 0.5 * torch.tanh(y))
        states[:, i + 1] = draft_means[:, i] + s * noise[:, i]
    target_means = AR_SLOPE * states + drift
    stds = torch.full((n, L + 1), s, dtype=torch.float64)
    return noise, states, draft_means, target_means, stds, drift


def _block_round(L, correction=None, n=20000, d=2, seed=0):
    noise, states, draft_means, target_means, stds, drift = biased_first_draft_window(n, L, d, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    verify = verify_block if correction is None else partial(verify_block, correction=correction)
    result = verify(
        noise, states, draft_means, target_means, stds, torch.full((n,), L), torch.ones(n, dtype=torch.bool),
        accept_u=torch.rand(n, L, generator=gen, dtype=torch.float64),
        xi=torch.randn(n, d, generator=gen, dtype=torch.float64),
        residual_u=torch.rand(n, generator=gen, dtype=torch.float64),
    )
    return (noise, states, draft_means, target_means, drift), result, gen


def _log_ratios(states, draft_means, target_means):
    """log P(X_i)/Q(X_i) from Gaussian log densities (scipy), i = 1..L."""
    x = states[:, 1:].numpy()
    lp = stats.norm.logpdf(x, target_means[:, :-1].numpy(), AR_STD).sum(-1)
    lq = stats.norm.logpdf(x, draft_means.numpy(), AR_STD).sum(-1)
    return torch.from_numpy(lp - lq)


def _path_increments(window, result, gen, L):
    """Complete each round's path to L + 1 steps with exact target steps and return the standardised
    increments (Y_j - mu_P(Y_{j-1})) / s, j = 1..L+1: iid N(0, 1) exactly when the round is lossless."""
    noise, states, draft_means, target_means, drift = window
    tau, y_next = result.accepted, result.next_state
    n, d = y_next.shape
    path = [states[:, 0]]
    for j in range(1, L + 2):
        fresh = AR_SLOPE * path[-1] + drift[j - 1] + AR_STD * torch.randn(n, d, generator=gen, dtype=torch.float64)
        drafted = states[:, min(j, L)]
        y = torch.where((j <= tau).unsqueeze(-1), drafted, torch.where((j == tau + 1).unsqueeze(-1), y_next, fresh))
        path.append(y)
    z = [(path[j] - AR_SLOPE * path[j - 1] - drift[j - 1]) / AR_STD for j in range(1, L + 2)]
    return torch.cat(z, dim=1)


def _reflection(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    return reflection_instead_of_residual(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known)


def _unweighted(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    return sample_residual(mu_p, mu_q, std, xi, u)


@pytest.mark.parametrize("L", [2, 3])
def test_block_round_has_the_target_path_law_when_the_first_draft_is_biased(L):
    window, result, gen = _block_round(L)
    noise, states, draft_means, target_means, _ = window
    # the first draft is not exact, and partial acceptances with w_tau < 1 are common
    log_ratio = _log_ratios(states, draft_means, target_means)
    assert log_ratio[:, 0].clamp(max=0).exp().mean() < 0.8
    log_w = [torch.zeros(len(log_ratio), dtype=torch.float64)]
    for i in range(L):
        log_w.append((log_w[-1] + log_ratio[:, i]).clamp(max=0))
    w_tau = torch.stack(log_w, 1).gather(1, result.accepted.unsqueeze(1)).squeeze(1).exp()
    partial_with_weight = (result.accepted >= 1) & (result.accepted < L) & (w_tau < 0.9)
    assert partial_with_weight.double().mean() > 0.05
    report = marginal_test(_path_increments(window, result, gen, L), torch.zeros(1), torch.ones(1))
    assert report["mean_z"] < 4.5 and report["var_z"] < 4.5 and report["ks_p"] > 1e-4, report


def _residual_pit(window, result, L):
    """For rounds that stopped at 1 <= tau < L (a correction with weight w_tau), the correction's
    coordinate t along e through the weighted residual's CDF (ALGORITHMS.md 4, evaluated here with
    scipy): uniform exactly when the correction is a draw from (w_tau P - Q)_+; and the orthogonal
    coordinate, standard normal. Returns (pit, orthogonal, w_tau) on those rounds."""
    noise, states, draft_means, target_means, _ = window
    tau = result.accepted
    log_ratio = _log_ratios(states, draft_means, target_means)
    log_w = [torch.zeros(len(tau), dtype=torch.float64)]
    for i in range(L):
        log_w.append((log_w[-1] + log_ratio[:, i]).clamp(max=0))
    rows = ((tau >= 1) & (tau < L)).nonzero().squeeze(1)
    t_rows = tau[rows]
    w = torch.stack(log_w, 1)[rows, t_rows].exp().numpy()
    mu_p, mu_q = target_means[rows, t_rows], draft_means[rows, t_rows]
    D = (mu_p - mu_q) / AR_STD
    delta = D.norm(dim=-1)
    e = D / delta.unsqueeze(-1)
    r = (result.next_state[rows] - mu_q) / AR_STD
    t = (r * e).sum(-1).numpy()
    e_perp = torch.stack([-e[:, 1], e[:, 0]], dim=-1)
    orth = (r * e_perp).sum(-1).numpy()
    delta = delta.numpy()
    a = delta / 2 + torch.log(torch.from_numpy(w)).numpy() / delta
    mass = w * ndtr(a) - ndtr(a - delta)
    pit = (w * ndtr(-(t - delta)) - ndtr(-t)) / mass
    return pit, orth, w


def test_weighted_residual_with_w_below_one_inside_verify_block():
    L = 3
    window, result, _ = _block_round(L)
    pit, orth, w = _residual_pit(window, result, L)
    assert len(pit) > 3000 and (w < 0.5).mean() > 0.1  # many corrections, with genuinely small weights
    assert stats.kstest(pit, "uniform").pvalue > 1e-4
    assert stats.kstest(orth, "norm").pvalue > 1e-4
    low = w < 0.5  # where the weight matters most
    assert stats.kstest(pit[low], "uniform").pvalue > 1e-4


@pytest.mark.parametrize("wrong", [_reflection, _unweighted], ids=["reflection", "unweighted-residual"])
def test_wrong_block_corrections_fail_the_weighted_residual_law(wrong):
    L = 3
    window, result, _ = _block_round(L, correction=wrong)
    pit, orth, w = _residual_pit(window, result, L)
    assert stats.kstest(pit, "uniform").pvalue < 1e-6


def _window_law(window, L):
    """P(tau = i | drafts), i = 0..L, recomputed from ALGORITHMS.md 3 with scipy (not with
    `block_pass_probabilities`): w_i = min(1, w_{i-1} P/Q(X_i)), rho_i = I(w_i, delta_{i+1}) from the
    plain (not log-space) closed form, h_i = rho_i / (rho_i + 1 - w_i) for i < L, h_L = w_L;
    tau is the last passing index."""
    noise, states, draft_means, target_means, _ = window
    log_ratio = _log_ratios(states, draft_means, target_means).numpy()
    delta = ((target_means[:, :L] - draft_means) / AR_STD).norm(dim=-1).numpy()  # delta of step i+1 at X_i
    n = len(log_ratio)
    w, h = np.ones(n), []
    for i in range(1, L + 1):
        w = np.minimum(1.0, w * np.exp(log_ratio[:, i - 1]))
        if i < L:
            dl = delta[:, i]
            a = dl / 2 + np.log(w) / dl
            rho = w * ndtr(a) - ndtr(a - dl)
            h.append(np.where(w >= 1, 1.0, rho / (rho + 1 - w)))
        else:
            h.append(w)
    h = np.stack(h, 1)
    law = np.zeros((n, L + 1))
    for i in range(L + 1):
        later = np.prod(1 - h[:, i:], axis=1)  # every index after i fails
        law[:, i] = later if i == 0 else h[:, i - 1] * later
    return law


@pytest.mark.parametrize("L", [2, 3])
def test_block_window_law_matches_an_independent_closed_form(L):
    n = 20000
    window, result, _ = _block_round(L, n=n)
    law = _window_law(window, L)
    np.testing.assert_allclose(law.sum(1), 1.0, atol=1e-12)
    counts = np.bincount(result.accepted.numpy(), minlength=L + 1)
    expected = law.sum(0)  # sum of per-round probabilities: a Poisson-binomial count per tau
    sd = np.sqrt((law * (1 - law)).sum(0))
    z = np.abs(counts - expected) / sd
    assert (z < 4.5).all(), (counts, expected, z)
    assert (expected[1:L] > 0.05 * n).all()  # partial acceptances (w < 1 at tau) are common
