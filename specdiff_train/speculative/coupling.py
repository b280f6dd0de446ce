"""Couplings of two isotropic Gaussians with the same std (ALGORITHMS.md sections 1, 2 and 4).

P = N(mu_p, s^2 I) is the target kernel, Q = N(mu_q, s^2 I) the draft kernel. States are flattened
to (R, d); per-row scalars are (R,). Scalar maths runs in float64.
"""
from __future__ import annotations

import torch

# Below this delta the residual's inverse CDF cannot be evaluated in float64 (checked down to 1e-6 in
# tests/test_coupling.py); such a correction draws from P instead, off the residual by at most the
# residual's mass, TV(P, Q) = 2 Phi(delta / 2) - 1 < 4e-7, and only in the rare round that needs it.
_DEGENERATE_DELTA = 1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, to an absolute error of ~1e-16: all that a sum of logs needs (the
    result is added to other logs, so its absolute error is a relative error of the product), in
    three operations instead of a two-branch `where`."""
    return torch.log(-torch.expm1(x))


def scaled_mean_difference(mu_p: torch.Tensor, mu_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """D = (mu_p - mu_q) / s, float64, (..., d); std broadcast over the last dim.

    The difference is taken in the means' own dtype (exact to half an ulp of the difference), then
    widened: the states themselves carry no more precision than that."""
    return (mu_p - mu_q).double() / std.double().unsqueeze(-1)


def log_density_ratio(z: torch.Tensor, d: torch.Tensor, delta_sq: torch.Tensor | None = None) -> torch.Tensor:
    """log P(X)/Q(X) at the draft X = mu_q + s z: z.D - |D|^2 / 2 (last dim summed); `delta_sq` = |D|^2
    when already computed."""
    d = d.double()
    if delta_sq is None:
        delta_sq = (d * d).sum(-1)
    return (z.double() * d).sum(-1) - 0.5 * delta_sq


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
    no_mass = delta <= 0
    dd = delta.masked_fill(no_mass, 1.0)
    a = dd / 2 + log_w / dd
    log_phi_a = torch.special.log_ndtr(a)
    inner = torch.special.log_ndtr(a - dd) - log_w - log_phi_a
    log_mass = log_w + log_phi_a + log1mexp(inner.clamp(max=0.0))
    return log_mass.masked_fill(no_mass, -torch.inf)


def log_residual_tail(t: torch.Tensor, log_w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """log of the residual's unnormalised tail mass beyond t (t >= c): w Phibar(t - delta) - Phibar(t)."""
    log_p = log_w + torch.special.log_ndtr(delta - t)
    log_q = torch.special.log_ndtr(-t)
    return log_p + log1mexp((log_q - log_p).clamp(max=0.0))


_LOG_SQRT_2PI = 0.9189385332046727
RESIDUAL_GRID_POINTS = 256  # bracket grid of the residual's inverse CDF
RESIDUAL_GRID_POWER = 3  # grid points s_max (j / P)^3: dense near c (u near 1) and through the bulk
RESIDUAL_NEWTON_STEPS = 2
_GRID_CACHE: dict = {}


def _residual_grid(device) -> torch.Tensor:
    """(P + 1,) ascending fractions of the bracket's width, (j / P)^power for j = 0..P."""
    def grid():
        j = torch.arange(0, RESIDUAL_GRID_POINTS + 1, dtype=torch.float64, device=device)
        return (j / RESIDUAL_GRID_POINTS) ** RESIDUAL_GRID_POWER

    if torch.compiler.is_compiling():  # a graph makes its own: a cache filled while tracing would recompile
        return grid()
    key = torch.device(device)
    if key not in _GRID_CACHE:
        _GRID_CACHE[key] = grid()
    return _GRID_CACHE[key]


def residual_projection(
    log_w: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, log_mass: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse-CDF draw of the residual's coordinate t along e (density [w phi(t-delta) - phi(t)]_+ / I).

    Solves G(t) = tail(t) / I = u on (c, inf), c = delta/2 - ln(w)/delta, in float64 with a fixed
    number of whole-tensor operations and no host read (ALGORITHMS.md 4):
      1. an upper bound from the dominant term: tail(t) < w Phibar(t - delta) <= w exp(-(t - delta)^2 / 2);
      2. one grid of points between c and that bound (denser towards c) brackets the root;
      3. Newton steps on log tail(t) from the right of the root: log tail is concave (the residual's
         density is log-concave), so the iterates fall monotonically onto the root.
    `tests/test_coupling.py` checks it against `specdiff_train.testing.residual_projection_bisection`
    on a sweep of (w, delta, u).
    `log_mass` (log I(w, delta)) may be passed when already known.
    """
    if not (log_w.shape == delta.shape == u.shape):
        log_w, delta, u = torch.broadcast_tensors(log_w, delta, u)
    log_w, delta, u = log_w.double(), delta.double(), u.double()
    c = delta * 0.5 - log_w / delta
    if log_mass is None:
        log_mass = log_residual_mass(log_w, delta)
    target = torch.log(u) + log_mass
    excess = target - log_w  # log(u I / w) <= 0
    to_delta = delta - c
    # 1. upper bound (in s = t - c >= 0): w Phibar(t - delta) <= w exp(-(t - delta)^2 / 2) = u I
    s_max = (to_delta + torch.sqrt(excess.clamp(max=0.0) * -2.0)).clamp(min=1e-300)
    # 2. bracket: G falls from 1 at s = 0; count the grid points still above the target
    s_grid = s_max.unsqueeze(-1) * _residual_grid(delta.device)
    h_grid = log_residual_tail(c.unsqueeze(-1) + s_grid, log_w.unsqueeze(-1), delta.unsqueeze(-1))
    above = (h_grid > target.unsqueeze(-1)).sum(-1, keepdim=True).clamp(1, RESIDUAL_GRID_POINTS)
    s_lo, s_hi = s_grid.gather(-1, torch.cat([above - 1, above], dim=-1)).unbind(-1)
    # 3. Newton from the right of the root (log tail is concave: the iterates fall monotonically onto
    # it): start at the bracket's upper end or at the dominant term's exact root, whichever is nearer.
    s = torch.minimum(s_hi, to_delta - torch.special.ndtri(torch.exp(excess))).clamp(min=s_lo)
    for _ in range(RESIDUAL_NEWTON_STEPS):
        t = c + s
        h = log_residual_tail(t, log_w, delta)
        y = delta * s
        # log density: log phi(t) + log(e^y - 1), y = delta s
        log_density = log1mexp(-y) + torch.addcmul(y - _LOG_SQRT_2PI, t, t, value=-0.5)
        s = torch.addcmul(s, h - target, torch.exp(h - log_density)).clamp(s_lo, s_hi)
    # No residual mass in float64 (I underflows: such a residual is never selected): any finite point.
    return c + torch.nan_to_num(s, nan=0.0, posinf=0.0)


def sample_weighted_residual(
    mu_p: torch.Tensor,
    mu_q: torch.Tensor,
    std: torch.Tensor,
    log_w: torch.Tensor,
    xi: torch.Tensor,
    u: torch.Tensor,
    *,
    d: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    log_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """One exact draw from (w P - Q)_+ normalised, per row (ALGORITHMS.md section 4).

    Args:
        mu_p, mu_q: (R, d) target and draft means; std: (R,) shared std; log_w: (R,) log weight <= 0.
        xi: (R, d) standard normal; u: (R,) uniform in (0, 1).
        d, delta, log_mass: (mu_p - mu_q) / std, its norm and log I(w, delta), when already computed.
    Rows with a degenerate mean difference (the residual has no mass; such rows are never selected
    with positive probability) return mu_p + s xi.
    """
    if d is None:
        d = scaled_mean_difference(mu_p, mu_q, std)
    if delta is None:
        delta = d.norm(dim=-1)
    degenerate = delta < _DEGENERATE_DELTA
    safe_delta = delta.masked_fill(degenerate, 1.0)
    e = d / safe_delta.unsqueeze(-1)  # = d on degenerate rows
    xi = xi.double()
    t = residual_projection(log_w.double().clamp(max=0.0), safe_delta, u, log_mass=log_mass)
    # y = mu_q + s (xi + (t - xi.e) e): xi's component along e replaced by the residual's t. Degenerate
    # rows take mu_q + s (xi + d) = mu_p + s xi (the kernels coincide there).
    along = (t - (xi * e).sum(-1)).masked_fill(degenerate, 1.0).unsqueeze(-1)
    return (mu_q.double() + std.double().unsqueeze(-1) * torch.addcmul(xi, along, e)).to(mu_p.dtype)
