"""Single-step maths of the couplings, against quadrature and simulation (ALGORITHMS.md 4, 7)."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from specdiff_train.diffusion import one_step_acceptance
from specdiff_train.speculative.coupling import (
    log_residual_mass,
    log_residual_tail,
    residual_projection,
    sample_weighted_residual,
)
from specdiff_train.speculative.verify import verify_block, verify_tokenwise
from specdiff_train.testing import residual_projection_bisection

GRID = [(w, d) for w in (1.0, 0.5, 1e-3, 1e-12) for d in (1e-3, 0.05, 1.0, 5.0)]


def residual_density(t, w, delta):
    return max(w * stats.norm.pdf(t - delta) - stats.norm.pdf(t), 0.0)


@pytest.mark.parametrize("w,delta", GRID)
def test_residual_mass_matches_quadrature(w, delta):
    c = delta / 2 - math.log(w) / delta
    expected, _ = integrate.quad(residual_density, c, c + 40, args=(w, delta), epsabs=0, epsrel=1e-12, limit=400)
    got = log_residual_mass(torch.tensor(math.log(w)), torch.tensor(delta)).exp().item()
    if expected > 1e-280:
        assert got == pytest.approx(expected, rel=1e-6)


def test_residual_mass_special_values():
    delta = torch.tensor([1e-6, 0.1, 2.0], dtype=torch.float64)
    tv = 2 * torch.special.ndtr(delta / 2) - 1
    torch.testing.assert_close(log_residual_mass(torch.zeros(3), delta).exp(), tv, rtol=1e-9, atol=0)
    assert log_residual_mass(torch.tensor(-0.5), torch.tensor(0.0)).item() == -math.inf
    # Stable where the plain formula underflows to zero.
    tiny = log_residual_mass(torch.tensor(math.log(1e-200)), torch.tensor(0.01)).item()
    assert math.isfinite(tiny) and tiny < -400


@pytest.mark.parametrize("w,delta", [(1.0, 0.05), (1.0, 2.0), (0.3, 0.5), (1e-6, 1.0), (0.9, 4.0), (1.0, 2e-6), (1.0, 1e-4)])
def test_residual_projection_has_the_residual_law(w, delta):
    n = 20000
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    t = residual_projection(torch.full((n,), math.log(w)), torch.full((n,), delta), u).numpy()
    c = delta / 2 - math.log(w) / delta
    assert (t >= c - 1e-9).all()
    mass = w * stats.norm.sf(c - delta) - stats.norm.sf(c)
    cdf = lambda s: 1 - (w * stats.norm.sf(np.maximum(s, c) - delta) - stats.norm.sf(np.maximum(s, c))) / mass
    assert stats.kstest(t, cdf).pvalue > 1e-3


def test_residual_inverse_cdf_matches_bisection_on_a_sweep():
    """The fixed-count root-find (grid bracket + 2 Newton steps) against bisection to float64 resolution,
    in the CDF: |G(t) - u| must be as small as the bisection's own error allows."""
    grid = [(lw, d, u) for lw in (0.0, -1e-12, -1e-6, -0.01, -0.7, -3.0, -14.0)
            for d in (1e-6, 1e-5, 3.5e-4, 1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 40.0, 200.0)
            for u in (2.0**-53, 1e-12, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.999, 1 - 1e-9)]
    log_w, delta, u = (torch.tensor(c, dtype=torch.float64) for c in zip(*grid))
    log_mass = log_residual_mass(log_w, delta)
    usable = log_mass > -700  # else the residual is never selected (its mass underflows)
    cdf_error = lambda t: (torch.exp(log_residual_tail(t, log_w, delta) - log_mass) - u).abs()[usable]  # noqa: E731
    fast, reference = cdf_error(residual_projection(log_w, delta, u)), cdf_error(residual_projection_bisection(log_w, delta, u))
    assert usable.sum() > 0.7 * len(grid)
    assert fast.max() < 2e-8, fast.max()  # a CDF error of 2e-8: invisible to any feasible sample size
    assert fast.max() <= 2 * reference.max()  # no worse than bisection's own float64 evaluation of G
    assert fast.median() < 1e-13  # (the bisection itself reaches ~1.3e-8 at worst: G is evaluated in float64)


@pytest.mark.parametrize("delta", [2e-6, 1e-4])
def test_weighted_residual_sampler_is_exact_for_tiny_mean_differences(delta):
    """Down to delta = 1e-6 the draw is the residual's, not a fallback draw from P (which would put the
    coordinate along e at N(delta, 1) instead of the residual's law on t > c)."""
    n, d = 20000, 3
    gen = torch.Generator().manual_seed(3)
    mu_q = torch.zeros(n, d, dtype=torch.float64)
    mu_p = mu_q.clone()
    mu_p[:, 0] = delta * 0.5
    std = torch.full((n,), 0.5, dtype=torch.float64)
    y = sample_weighted_residual(mu_p, mu_q, std, torch.zeros(n, dtype=torch.float64),
                                 torch.randn(n, d, generator=gen, dtype=torch.float64),
                                 torch.rand(n, generator=gen, dtype=torch.float64))
    t = (y[:, 0] / 0.5).numpy()
    c = delta / 2
    mass = stats.norm.sf(c - delta) - stats.norm.sf(c)
    cdf = lambda s: 1 - (stats.norm.sf(np.maximum(s, c) - delta) - stats.norm.sf(np.maximum(s, c))) / mass
    assert (t >= c - 1e-9).all()
    assert stats.kstest(t, cdf).pvalue > 1e-3


def test_weighted_residual_sampler_projects_correctly():
    n, d = 20000, 5
    gen = torch.Generator().manual_seed(2)
    mu_q = torch.randn(1, d, generator=gen, dtype=torch.float64).expand(n, d)
    mu_p = mu_q + 0.4 * torch.randn(1, d, generator=gen, dtype=torch.float64)
    std = torch.full((n,), 0.7, dtype=torch.float64)
    log_w = torch.full((n,), math.log(0.6), dtype=torch.float64)
    y = sample_weighted_residual(mu_p, mu_q, std, log_w, torch.randn(n, d, generator=gen, dtype=torch.float64),
                                 torch.rand(n, generator=gen, dtype=torch.float64))
    diff = (mu_p[0] - mu_q[0]) / 0.7
    delta = diff.norm().item()
    e = diff / delta
    z = (y - mu_q) / 0.7
    t = (z @ e).numpy()
    c = delta / 2 - math.log(0.6) / delta
    mass = 0.6 * stats.norm.sf(c - delta) - stats.norm.sf(c)
    cdf = lambda s: 1 - (0.6 * stats.norm.sf(np.maximum(s, c) - delta) - stats.norm.sf(np.maximum(s, c))) / mass
    assert stats.kstest(t, cdf).pvalue > 1e-3
    ortho = torch.linalg.qr(torch.cat([e[:, None], torch.eye(d, dtype=torch.float64)[:, : d - 1]], 1))[0][:, 1:]
    for j in range(d - 1):
        assert stats.kstest((z @ ortho[:, j]).numpy(), "norm").pvalue > 1e-3


def one_step_inputs(n, d, delta, seed=0):
    """n chains, one drafted step, no step after it: the output must be exactly P = N(mu_p, s^2)."""
    gen = torch.Generator().manual_seed(seed)
    s = 0.5
    mu_q = torch.zeros(n, 1, d, dtype=torch.float64)
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    mu_p = (mu_q[:, 0] + delta * s * e).unsqueeze(1)
    target_means = torch.cat([mu_p, torch.zeros_like(mu_p)], 1)
    noise = torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    states = torch.cat([torch.zeros(n, 1, d, dtype=torch.float64), mu_q + s * noise], 1)
    stds = torch.full((n, 2), s, dtype=torch.float64)
    lengths = torch.ones(n, dtype=torch.int64)
    has_next = torch.zeros(n, dtype=torch.bool)
    rand = dict(
        accept_u=torch.rand(n, 1, generator=gen, dtype=torch.float64),
        xi=torch.randn(n, d, generator=gen, dtype=torch.float64),
        residual_u=torch.rand(n, generator=gen, dtype=torch.float64),
    )
    return (noise, states, mu_q, target_means, stds, lengths, has_next), rand, s, mu_p[:, 0]


@pytest.mark.parametrize(
    "verify",
    [verify_block, verify_tokenwise, lambda *a, **k: verify_tokenwise(*a, **k, correction="residual")],
    ids=["block", "tokenwise-reflection", "tokenwise-residual"],
)
@pytest.mark.parametrize("delta", [0.3, 1.5])
def test_single_step_acceptance_and_output_law(verify, delta):
    n, d = 40000, 3
    args, rand, s, mu_p = one_step_inputs(n, d, delta)
    result = verify(*args, **rand)
    acceptance = result.accepted.double().mean().item()
    expected = one_step_acceptance(torch.tensor(delta)).item()
    assert abs(acceptance - expected) < 4.5 * math.sqrt(expected * (1 - expected) / n)
    assert (result.advanced == 1).all()
    z = (result.next_state - mu_p) / s  # exactly standard normal in every coordinate
    for j in range(d):
        assert stats.kstest(z[:, j].numpy(), "norm").pvalue > 1e-3
    # In the draft's frame, the coordinate along e is N(delta, 1).
    assert stats.kstest((z[:, 0] + delta).numpy(), stats.norm(loc=delta).cdf).pvalue > 1e-3


def test_wrong_reflection_sign_is_detected():
    """Reflecting around the draft mean instead of the target mean gives plausible wrong samples."""
    n, d, delta = 40000, 3, 1.0
    args, rand, s, mu_p = one_step_inputs(n, d, delta)
    noise, states, mu_q, target_means, *_ = args
    result = verify_tokenwise(*args, **rand)
    wrong = result.next_state.clone()
    rejected = result.accepted == 0
    z = noise[:, 0]
    e = torch.zeros(d, dtype=torch.float64)
    e[0] = 1.0
    wrong[rejected] = (mu_q[:, 0] + s * (z - 2 * (z @ e)[:, None] * e))[rejected]
    assert stats.kstest(((wrong - mu_p) / s)[:, 0].numpy(), "norm").pvalue < 1e-6
