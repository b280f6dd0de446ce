"""Verifier-level properties on identical drafts."""
import torch

from specdiff_train.speculative.coupling import log_density_ratio, scaled_mean_difference
from specdiff_train.speculative.verify import (
    block_pass_probabilities,
    running_log_weights,
    verify_block,
    verify_tokenwise,
)


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
