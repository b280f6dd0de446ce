"""Token-wise and block verification of a window of drafts, batched over chains.

A verifier sees tensors only (ALGORITHMS.md sections 2-3). For C chains and a padded window L:

    noise        (C, L, d)    Z_i, the draft X_i = draft_means[:, i-1] + s_i Z_i
    states       (C, L+1, d)  X_0 (the chain's state) and the drafts X_1..X_L
    draft_means  (C, L, d)    mean of Q for step i, from X_{i-1}
    target_means (C, L+1, d)  mean of P for step i+1 from X_i, i = 0..L (row L: the bonus step)
    stds         (C, L+1)     shared std of step i+1
    lengths      (C,)         this chain's window L' (0 <= L' <= L; 0 = a plain target step)
    has_next     (C,)         whether a step follows X_{L'} (False at the end of the chain)
    accept_u     (C, L)       uniforms for the accept tests
    xi           (C, d)       standard normal for the bonus or the correction
    residual_u   (C,)         uniform for the residual's inverse CDF

The result commits X_1..X_tau and then, if a step follows, one more state drawn from the target's
law given the history: a bonus step, a reflection, or a residual draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .coupling import (
    log1mexp,
    log_density_ratio,
    log_residual_mass,
    reflect,
    sample_residual,
    sample_weighted_residual,
    scaled_mean_difference,
)


@dataclass
class VerifyResult:
    accepted: torch.Tensor  # (C,) tau, drafts committed
    next_state: torch.Tensor  # (C, d) the chain's state after this round
    advanced: torch.Tensor  # (C,) steps advanced: tau + 1 if a step followed X_tau, else tau


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[c, index[c]] for a (C, L, ...) tensor."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _finish(tau, lengths, has_next, states, target_means, stds, xi, correction_state):
    """Assemble the round's outcome: bonus when all drafts passed and a step follows,
    the last draft when all passed at the end of the chain, else the correction."""
    all_passed = tau == lengths
    bonus = _take(target_means, tau) + _take(stds, tau).to(xi.dtype).unsqueeze(-1) * xi.to(target_means.dtype)
    last_draft = _take(states, tau)
    state = torch.where(
        (all_passed & has_next).unsqueeze(-1), bonus, torch.where(all_passed.unsqueeze(-1), last_draft, correction_state)
    )
    advanced = tau + (~all_passed | has_next).long()
    return VerifyResult(accepted=tau, next_state=state, advanced=advanced)


def _window_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return torch.arange(1, L + 1, device=lengths.device)[None, :] <= lengths[:, None]


def verify_tokenwise(
    noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
    correction: str = "reflection",
) -> VerifyResult:
    """Accept X_i with prob min(1, P/Q) in order; at the first rejection correct with the
    reflection maximal coupling (no extra randomness) or a fresh draw from (P - Q)_+."""
    C, L = accept_u.shape
    d = scaled_mean_difference(target_means[:, :L], draft_means, stds[:, :L])
    log_ratio = log_density_ratio(noise, d)
    passed = (torch.log(accept_u) < log_ratio) & _window_mask(lengths, L)
    tau = passed.long().cumprod(dim=1).sum(dim=1)  # number of leading acceptances

    if L == 0:  # plain target steps only: nothing to correct
        return _finish(tau, lengths, has_next, states, target_means, stds, xi, target_means[:, 0])
    row = tau.clamp(max=L - 1)  # the first rejected draft, 0-based
    mu_p, mu_q, s = _take(target_means, row), _take(draft_means, row), _take(stds, row)
    if correction == "reflection":
        fixed = reflect(_take(noise, row), _take(d, row), mu_p, s)
    elif correction == "residual":
        fixed = mu_p.clone()
        needs = (tau < lengths).nonzero().squeeze(1)
        if len(needs):
            fixed[needs] = sample_residual(mu_p[needs], mu_q[needs], s[needs], xi[needs], residual_u[needs]).to(fixed.dtype)
    else:
        raise ValueError(f"correction: expected 'reflection' or 'residual', got {correction!r}")
    return _finish(tau, lengths, has_next, states, target_means, stds, xi, fixed)


ResidualSampler = Callable[..., torch.Tensor]


def weighted_residual_correction(mu_p, mu_q, std, log_w, xi, u, draft_noise):
    """The exact block correction: a fresh draw from (w P - Q)_+ normalised."""
    return sample_weighted_residual(mu_p, mu_q, std, log_w, xi, u)


def reflection_instead_of_residual(mu_p, mu_q, std, log_w, xi, u, draft_noise):
    """A WRONG block correction (reflect the rejected draft), kept only so that tests show it is
    detected: the draft after tau does not have the residual's law given tau."""
    return reflect(draft_noise, scaled_mean_difference(mu_p, mu_q, std), mu_p, std)


def block_pass_probabilities(log_ratio, log_w0, next_delta, lengths):
    """h_i of block verification (Sun et al. 2024) and the running log weights log w_i.

    log_ratio: (C, L) log P/Q at each draft; next_delta: (C, L) delta of the kernel at X_i for
    step i+1 (used for i < L'). Returns (h (C, L), log_w (C, L+1)) with log_w[:, 0] = log_w0.
    """
    C, L = log_ratio.shape
    log_w = [log_w0]
    for i in range(L):
        log_w.append(torch.clamp(log_w[-1] + log_ratio[:, i], max=0.0))
    log_w = torch.stack(log_w, dim=1)  # (C, L+1)
    lw = log_w[:, 1:]
    log_rho = log_residual_mass(lw, next_delta)
    # h = rho / (rho + 1 - w) = sigmoid(log rho - log(1 - w)); w = 1 gives 1 (also 0/0 -> 1).
    inner = torch.sigmoid(log_rho - log1mexp(lw))
    inner = torch.where(lw >= 0, torch.ones_like(inner), inner)
    is_last = torch.arange(1, L + 1, device=lengths.device)[None, :] == lengths[:, None]
    h = torch.where(is_last, lw.exp(), inner)
    return h, log_w


def verify_block(
    noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
    correction: ResidualSampler = weighted_residual_correction,
) -> VerifyResult:
    """Block verification: tau is the LAST index that passes; a partial acceptance is corrected by
    a fresh draw from the weighted residual (w_tau P - Q)_+ at X_tau (never by a reflection).

    `correction(mu_p, mu_q, std, log_w, xi, u, draft_noise)` is injectable so tests can show that
    a wrong correction is detected.
    """
    C, L = accept_u.shape
    d = scaled_mean_difference(target_means[:, :L], draft_means, stds[:, :L])
    log_ratio = log_density_ratio(noise, d)
    delta = d.norm(dim=-1)  # (C, L): delta of step i+1 at X_i, i = 0..L-1
    next_delta = torch.cat([delta[:, 1:], torch.zeros_like(delta[:, :1])], dim=1)
    zero = torch.zeros(C, dtype=torch.float64, device=accept_u.device)
    h, log_w = block_pass_probabilities(log_ratio, zero, next_delta, lengths)
    passes = (accept_u < h) & _window_mask(lengths, L)
    index = torch.arange(1, L + 1, device=lengths.device)[None, :]
    tau = torch.where(passes, index, torch.zeros_like(index)).amax(dim=1) if L > 0 else lengths * 0

    row = tau.clamp(max=max(L - 1, 0))
    fixed = target_means[:, 0].clone()  # placeholder where no correction is needed
    needs = (tau < lengths).nonzero().squeeze(1)  # partial acceptance: draw from the residual
    if len(needs):
        r = row[needs]
        fixed[needs] = correction(
            target_means[needs, r], draft_means[needs, r], stds[needs, r], log_w[needs, tau[needs]], xi[needs],
            residual_u[needs], noise[needs, r],
        ).to(fixed.dtype)
    return _finish(tau, lengths, has_next, states, target_means, stds, xi, fixed)


VERIFIERS = {
    "block": verify_block,
    "tokenwise": verify_tokenwise,
}
