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

from .._aranges import arange
from .coupling import (
    log1mexp,
    log_density_ratio,
    log_residual_mass,
    reflect,
    sample_weighted_residual,
    scaled_mean_difference,
)


COMPACT_MIN_CHAINS = 16  # from this many chains, corrections are drawn only for the chains that need one


CORRECTIONS = ("reflection", "residual")  # token-wise verification's corrections


def check_correction(correction: str) -> str:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    return correction


@dataclass
class RoundOutcome:
    """What the verifier decided for each chain this round (the drafter's view of the pass it decided
    on is `drafters.Verification`)."""

    accepted: torch.Tensor  # (C,) tau, drafts committed
    next_state: torch.Tensor | None  # (C, d) the chain's state after this round (None while deferred)
    advanced: torch.Tensor  # (C,) steps advanced: tau + 1 if a step followed X_tau, else tau
    needs_correction: torch.Tensor | None = None  # (C,) chains that stopped short of their window
    complete: Callable[[bool], torch.Tensor] | None = None  # deferred: complete(any_needs) -> next_state

    def settle(self, any_needs_correction: bool) -> torch.Tensor:
        """The next state; a deferred correction is computed only if some chain needs one."""
        return self.next_state if self.complete is None else self.complete(any_needs_correction)


def _finish(tau, lengths, has_next, states, target_means, stds, xi, correction, defer: bool = False):
    """Assemble the round's outcome: bonus when all drafts passed and a step follows,
    the last draft when all passed at the end of the chain, else the correction.

    `correction` is the corrected state per chain, or a function that computes it. With `defer`, the
    next state is left to `RoundOutcome.settle(any_needs_correction)`: the sampler reads whether any
    chain stopped short with its one host read, and the correction is computed only then."""
    all_passed = tau == lengths
    advanced = tau + (has_next | ~all_passed)

    def next_state(any_needs_correction: bool = True) -> torch.Tensor:
        rows = arange(0, len(tau), tau.device)
        bonus = torch.addcmul(target_means[rows, tau], stds[rows, tau].to(xi.dtype).unsqueeze(-1), xi)
        passed_state = torch.where(has_next.unsqueeze(-1), bonus, states[rows, tau])
        if not any_needs_correction:  # every chain passed its whole window
            return passed_state
        fixed = correction() if callable(correction) else correction
        return torch.where(all_passed.unsqueeze(-1), passed_state, fixed.to(bonus.dtype))

    if defer:
        return RoundOutcome(accepted=tau, next_state=None, advanced=advanced, needs_correction=~all_passed,
                            complete=next_state)
    return RoundOutcome(accepted=tau, next_state=next_state(), advanced=advanced)


def _window_mask(lengths: torch.Tensor, L: int) -> torch.Tensor:
    return arange(1, L + 1, lengths.device) <= lengths.unsqueeze(-1)


def _draft_statistics(noise, draft_means, target_means, stds):
    """D = (mu_P - mu_Q) / s at each drafted transition (C, L, d, float64), delta = |D| and the log
    density ratio log P/Q at each draft, z.D - |D|^2 / 2 (C, L)."""
    L = noise.shape[1]
    d = scaled_mean_difference(target_means[:, :L], draft_means, stds[:, :L])
    delta_sq = (d * d).sum(-1)
    return d, delta_sq.sqrt(), log_density_ratio(noise, d, delta_sq)


def verify_tokenwise(
    noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
    correction: str = "reflection", defer_correction: bool = False,
) -> RoundOutcome:
    """Accept X_i with prob min(1, P/Q) in order; at the first rejection correct with the
    reflection maximal coupling (no extra randomness) or a fresh draw from (P - Q)_+.
    `defer_correction`: see `_finish` (the sampler's way to skip corrections no chain needs)."""
    check_correction(correction)
    C, L = accept_u.shape
    if L == 0:  # plain target steps only: nothing to correct
        return _finish(lengths * 0, lengths, has_next, states, target_means, stds, xi, target_means[:, 0],
                       defer_correction)
    d, delta, log_ratio = _draft_statistics(noise, draft_means, target_means, stds)
    passed = (torch.log(accept_u) < log_ratio) & _window_mask(lengths, L)
    tau = passed.cumprod(dim=1).sum(dim=1)  # number of leading acceptances

    def fixed():
        rows, row = arange(0, C, tau.device), tau.clamp(max=L - 1)  # the first rejected draft
        mu_p, s, d_row = target_means[rows, row], stds[rows, row], d[rows, row]
        if correction == "reflection":
            return reflect(noise[rows, row], d_row, mu_p, s)
        return sample_weighted_residual(mu_p, draft_means[rows, row], s, torch.zeros_like(s), xi, residual_u,
                                        d=d_row, delta=delta[rows, row])

    return _finish(tau, lengths, has_next, states, target_means, stds, xi, fixed, defer_correction)


ResidualSampler = Callable[..., torch.Tensor]


def weighted_residual_correction(mu_p, mu_q, std, log_w, xi, u, draft_noise, **known):
    """The exact block correction: a fresh draw from (w P - Q)_+ normalised. `known` may carry
    d, delta and log_mass (see `sample_weighted_residual`) when the verifier has them."""
    return sample_weighted_residual(mu_p, mu_q, std, log_w, xi, u, **known)


def running_log_weights(log_ratio: torch.Tensor, log_w0: torch.Tensor | None = None) -> torch.Tensor:
    """log w_i = min(0, log w_{i-1} + log_ratio_i), i = 1..L, without a loop (C, L+1 with log w_0).

    With S_i = log w_0 + sum_{j<=i} log_ratio_j, the recursion unrolls to S_i - max(0, S_1..S_i):
    a cumulative sum and a cumulative maximum."""
    S = log_ratio.cumsum(dim=1)
    if log_w0 is not None:
        S = S + log_w0.unsqueeze(-1)
    log_w = S - S.cummax(dim=1).values.clamp(min=0.0)
    if log_w0 is None:  # w_0 = 1
        return torch.nn.functional.pad(log_w, (1, 0))
    return torch.cat([log_w0.unsqueeze(-1), log_w], dim=1)


def block_pass_probabilities(log_ratio, log_w0, delta, lengths):
    """h_i of block verification (Sun et al. 2024) and the running log weights log w_i.

    log_ratio: (C, L) log P/Q at each draft; log_w0: (C,) or None for w_0 = 1; delta: (C, L) delta of the kernel at X_i, i = 0..L-1
    (h_i uses the one at X_i for step i+1, i < L'). Returns (h (C, L), log_w (C, L+1), log_rho (C, L)),
    log_rho[:, i] = log I(w_i, delta_i): the residual mass at X_i, what a correction at i draws from.
    """
    C, L = log_ratio.shape
    log_w = running_log_weights(log_ratio, log_w0)
    log_rho = log_residual_mass(log_w[:, :L], delta)
    lw, next_rho = log_w[:, 1:], torch.nn.functional.pad(log_rho[:, 1:], (0, 1), value=-torch.inf)
    # h = rho / (rho + 1 - w) = sigmoid(log rho - log(1 - w)); w = 1 gives 1 (also 0/0 -> 1).
    inner = torch.sigmoid(next_rho - log1mexp(lw)).masked_fill(lw >= 0, 1.0)
    is_last = arange(1, L + 1, lengths.device) == lengths.unsqueeze(-1)
    h = torch.where(is_last, lw.exp(), inner)
    return h, log_w, log_rho


def verify_block(
    noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
    correction: ResidualSampler = weighted_residual_correction, defer_correction: bool = False,
) -> RoundOutcome:
    """Block verification: tau is the LAST index that passes; a partial acceptance is corrected by
    a fresh draw from the weighted residual (w_tau P - Q)_+ at X_tau (never by a reflection).

    At small batches every chain's correction is computed (and used where tau < L'), a fixed set of
    operations with no host read; `defer_correction` leaves it until the sampler knows that some
    chain needs one (see `_finish`). `correction(mu_p, mu_q, std, log_w, xi, u, draft_noise,
    **known)` is injectable so tests can show that a wrong correction is detected.
    """
    C, L = accept_u.shape
    if L == 0:  # plain target steps only
        return _finish(lengths * 0, lengths, has_next, states, target_means, stds, xi, target_means[:, 0],
                       defer_correction)
    d, delta, log_ratio = _draft_statistics(noise, draft_means, target_means, stds)
    h, log_w, log_rho = block_pass_probabilities(log_ratio, None, delta, lengths)
    passes = (accept_u < h) & _window_mask(lengths, L)
    tau = (passes * arange(1, L + 1, lengths.device)).amax(dim=1)

    def fixed():
        rows, row = arange(0, C, tau.device), tau.clamp(max=L - 1)  # the residual sits at X_tau
        compact = C >= COMPACT_MIN_CHAINS and not torch.compiler.is_compiling()  # compiled: static shapes
        if compact:  # many chains: draw only where a correction is needed (one host read)
            rows = (tau < lengths).nonzero().squeeze(1)
            row, tau_rows = row[rows], tau[rows]
        else:
            tau_rows = tau
        drawn = correction(
            target_means[rows, row], draft_means[rows, row], stds[rows, row], log_w[rows, tau_rows], xi[rows],
            residual_u[rows], noise[rows, row], d=d[rows, row], delta=delta[rows, row], log_mass=log_rho[rows, row],
        )
        if compact:
            return target_means[:, 0].index_copy(0, rows, drawn.to(target_means.dtype))
        return drawn

    return _finish(tau, lengths, has_next, states, target_means, stds, xi, fixed, defer_correction)
