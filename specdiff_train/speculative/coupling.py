"""Couplings of two isotropic Gaussians with the same std (ALGORITHMS.md sections 1, 2 and 4).

P = N(mu_p, s^2 I) is the target kernel, Q = N(mu_q, s^2 I) the draft kernel. States are flattened
to (R, d); per-row scalars are (R,). Scalar maths runs in float64.
"""
from __future__ import annotations

import torch

_DEGENERATE_DELTA = torch.finfo(torch.float32).eps ** 0.5  # kernels coincide below this


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def scaled_mean_difference(mu_p: torch.Tensor, mu_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """D = (mu_p - mu_q) / s, float64, (..., d); std broadcast over the last dim."""
    return (mu_p.double() - mu_q.double()) / std.double().unsqueeze(-1)


def log_density_ratio(z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """log P(X)/Q(X) at the draft X = mu_q + s z: z.D - |D|^2 / 2 (last dim summed)."""
    d = d.double()
    return (z.double() * d).sum(-1) - 0.5 * (d * d).sum(-1)


def one_step_acceptance(delta: torch.Tensor) -> torch.Tensor:
    """Acceptance of the maximal coupling, 1 - TV(P, Q) = 2 Phi(-delta / 2)."""
    return 2 * torch.special.ndtr(-delta.double() / 2)


def reflect(z: torch.Tensor, d: torch.Tensor, mu_p: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reflection maximal coupling: the rejected draft mu_q + s z becomes mu_p + s (z - 2 (z.e) e).

    e = D / |D| points from the draft mean to the target mean. Where |D| = 0 the kernels coincide
    and the result is mu_p + s z.
    """
    z64, d = z.double(), d.double()
    norm = d.norm(dim=-1, keepdim=True)
    e = torch.where(norm > 0, d / norm.clamp_min(1e-300), torch.zeros_like(d))
    mirrored = z64 - 2 * (z64 * e).sum(-1, keepdim=True) * e
    return (mu_p.double() + std.double().unsqueeze(-1) * mirrored).to(mu_p.dtype)


def log_residual_mass(log_w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """log I(w, delta), I = integral of (w P - Q)_+ (ALGORITHMS.md section 4), stable in log space.

    I(w, delta) = w Phi(a) - Phi(a - delta), a = delta / 2 + ln(w) / delta; -inf where delta = 0.
    """
    log_w, delta = torch.broadcast_tensors(log_w.double(), delta.double())
    safe = delta > 0
    dd = torch.where(safe, delta, torch.ones_like(delta))
    a = dd / 2 + log_w / dd
    log_phi_a = torch.special.log_ndtr(a)
    inner = torch.special.log_ndtr(a - dd) - log_w - log_phi_a
    log_mass = log_w + log_phi_a + log1mexp(inner.clamp(max=0.0))
    return torch.where(safe, log_mass, torch.full_like(log_mass, -torch.inf))


def _log_residual_tail(t: torch.Tensor, log_w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """log of the residual's unnormalised tail mass beyond t (t >= c): w Phibar(t - delta) - Phibar(t)."""
    log_p = log_w + torch.special.log_ndtr(delta - t)
    log_q = torch.special.log_ndtr(-t)
    return log_p + log1mexp((log_q - log_p).clamp(max=0.0))


def residual_projection(
    log_w: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, iterations: int = 200
) -> torch.Tensor:
    """Inverse-CDF draw of the residual's coordinate t along e (density [w phi(t-delta) - phi(t)]_+ / I).

    Solves G(t) = tail(t) / I = u on (c, inf), c = delta/2 - ln(w)/delta, by bracketing and
    vectorised bisection in log space (float64). Exact up to float precision, fixed cost.
    """
    log_w, delta, u = (v.double() for v in torch.broadcast_tensors(log_w, delta, u))
    c = delta / 2 - log_w / delta
    target = torch.log(u) + log_residual_mass(log_w, delta)
    lo, width = c.clone(), torch.ones_like(c)
    for _ in range(64):  # expand the bracket until G(hi) <= u
        too_low = _log_residual_tail(lo + width, log_w, delta) > target
        if not too_low.any():
            break
        width = torch.where(too_low, 2 * width, width)
    hi = lo + width
    for i in range(iterations):
        mid = (lo + hi) / 2
        above = _log_residual_tail(mid, log_w, delta) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        # stop once every bracket is at float64 resolution (checked every 8 steps: one sync)
        if i % 8 == 7 and bool(((hi - lo) <= 4e-16 * (1 + lo.abs())).all()):
            break
    return (lo + hi) / 2


def sample_weighted_residual(
    mu_p: torch.Tensor,
    mu_q: torch.Tensor,
    std: torch.Tensor,
    log_w: torch.Tensor,
    xi: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """One exact draw from (w P - Q)_+ normalised, per row (ALGORITHMS.md section 4).

    Args:
        mu_p, mu_q: (R, d) target and draft means; std: (R,) shared std; log_w: (R,) log weight <= 0.
        xi: (R, d) standard normal; u: (R,) uniform in (0, 1).
    Rows with a degenerate mean difference (the residual has no mass; such rows are never selected
    with positive probability) return mu_p + s xi.
    """
    d = scaled_mean_difference(mu_p, mu_q, std)
    delta = d.norm(dim=-1)
    degenerate = delta < _DEGENERATE_DELTA
    e = d / torch.where(degenerate, torch.ones_like(delta), delta).unsqueeze(-1)
    xi = xi.double()
    z_perp = xi - (xi * e).sum(-1, keepdim=True) * e
    safe_delta = torch.where(degenerate, torch.ones_like(delta), delta)
    t = residual_projection(log_w.double().clamp(max=0.0), safe_delta, u)
    s = std.double().unsqueeze(-1)
    y = mu_q.double() + s * (t.unsqueeze(-1) * e + z_perp)
    fallback = mu_p.double() + s * xi
    return torch.where(degenerate.unsqueeze(-1), fallback, y).to(mu_p.dtype)


def sample_residual(mu_p, mu_q, std, xi, u) -> torch.Tensor:
    """Fresh draw from the unweighted residual (P - Q)_+ / TV: the alternative to reflection."""
    return sample_weighted_residual(mu_p, mu_q, std, torch.zeros_like(std, dtype=torch.float64), xi, u)
