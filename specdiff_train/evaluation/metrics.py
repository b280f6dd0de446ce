"""Two-sample statistics for exactness and quality checks: energy distance, MMD, permutation tests.

Every function takes two samples x (n, ...) and y (m, ...), flattens them to (n, d) and (m, d) and
computes in float64. Within-sample terms are U-statistics (diagonal excluded), so both discrepancies
are unbiased: under the null they scatter around 0 and can be slightly negative.

Energy distance is the MMD of the distance kernel k(a, b) = -|a - b|, so one code path serves both:
a discrepancy is a function of three block sums of a kernel matrix over the pooled sample, and a
relabelling of the pooled sample (a permutation) only changes which entries fall in which block.
"""
from __future__ import annotations

from typing import Callable

import torch
from scipy.stats import ks_2samp

STATISTICS = ("energy", "mmd")
ROW_CHUNK = 1024  # rows of the pooled kernel matrix held in memory at once
MEDIAN_SUBSAMPLE = 2048  # points the median heuristic looks at (its cost is quadratic)
LOW_DIM = 8  # per-coordinate mean / std differences are reported up to this dimension
KS_MAX_DIM = 4  # per-coordinate Kolmogorov-Smirnov tests up to this dimension

Kernel = Callable[[torch.Tensor], torch.Tensor]  # pairwise Euclidean distances -> kernel values


def flatten_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two samples and return them as float64 (n, d), (m, d) on x's device.

    Args:
        x: first sample, (n,) or (n, ...).
        y: second sample with the same per-sample shape as x.
        name: the metric's name, used in error messages.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() == 0 or y.dim() == 0 or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{name} needs two samples of the same per-sample shape, "
            f"got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    for n in (x.shape[0], y.shape[0]):
        if n < 2:
            raise ValueError(f"{name} needs at least 2 samples per set, got {n}; raise num_samples")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    y = y.detach().reshape(y.shape[0], -1).to(device=x.device, dtype=torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{name} got samples with NaN or inf values")
    return x, y


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n, m) between the rows of a (n, d) and b (m, d)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0).sqrt_()  # clamp: cancellation can make tiny squares negative


def median_bandwidth(pooled: torch.Tensor) -> float:
    """Median heuristic: the median distance between distinct points of the pooled sample (n, d).

    Above MEDIAN_SUBSAMPLE points a fixed (seeded) subset is used, so the bandwidth stays a
    deterministic function of the data at a bounded cost.
    """
    if pooled.shape[0] > MEDIAN_SUBSAMPLE:
        g = torch.Generator().manual_seed(0)
        pooled = pooled[torch.randperm(pooled.shape[0], generator=g)[:MEDIAN_SUBSAMPLE].to(pooled.device)]
    i, j = torch.triu_indices(pooled.shape[0], pooled.shape[0], offset=1, device=pooled.device)
    dist = pairwise_distances(pooled, pooled)[i, j]
    median = float(dist.median())
    # Mostly repeated points (discrete data) give a zero median; any positive scale is valid.
    return median if median > 0 else (float(dist.mean()) or 1.0)


def energy_kernel() -> Kernel:
    """k(a, b) = -|a - b|: its MMD is the energy distance."""
    return torch.neg


def rbf_kernel(bandwidth: float) -> Kernel:
    """Gaussian kernel exp(-|a - b|^2 / (2 h^2)) with bandwidth h."""
    if not bandwidth > 0:
        raise ValueError(f"the MMD bandwidth must be positive, got {bandwidth}")
    scale = -0.5 / bandwidth**2
    return lambda dist: torch.exp(scale * dist * dist)


def sample_labels(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indicator (n + m, 1) of the first set in the pooled sample, as observed."""
    labels = torch.zeros(n + m, 1, dtype=torch.float64, device=device)
    labels[:n] = 1.0
    return labels


def permutation_labels(n: int, m: int, num_permutations: int, seed: int) -> torch.Tensor:
    """Indicators (n + m, num_permutations) of a random n-subset of the pooled sample, one per column.

    Drawn on the CPU from one seeded generator, so they depend only on (n, m, num_permutations, seed).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(num_permutations, n + m, generator=g).argsort(dim=1)
    labels = torch.zeros(num_permutations, n + m, dtype=torch.float64)
    labels.scatter_(1, order[:, :n], 1.0)
    return labels.T.contiguous()


def stratified_permutation_labels(strata: torch.Tensor, n: int, num_permutations: int, seed: int) -> torch.Tensor:
    """Like `permutation_labels`, but each relabelling keeps every stratum's count in the first set: within
    each stratum (equal values of `strata`, (n + m,) ints for the pooled sample, the first n from the first
    set) a random subset of its size in the first set. Exchangeable under "the two laws agree stratum by
    stratum", so the test stays exact when both samples were drawn with the same labels (a pooled
    relabelling would unbalance the classes and make the test conservative)."""
    strata = torch.as_tensor(strata).reshape(-1).cpu()
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(num_permutations, len(strata), dtype=torch.float64)
    for value in torch.unique(strata).tolist():
        members = torch.nonzero(strata == value).reshape(-1)
        first = int((members < n).sum())
        order = torch.rand(num_permutations, len(members), generator=g).argsort(dim=1)
        labels.scatter_(1, members[order[:, :first]], 1.0)
    return labels.T.contiguous()


def discrepancies(
    x: torch.Tensor, y: torch.Tensor, kernels: list[Kernel], labels: torch.Tensor
) -> torch.Tensor:
    """Unbiased MMD^2 of each kernel for each labelling of the pooled sample.

    For a labelling z (1 = first set) and a kernel matrix K with zero diagonal, the block sums are
    S_xx = z'Kz, S_xy = z'K1 - S_xx and S_yy = 1'K1 - S_xx - 2 S_xy, and
    MMD^2 = S_xx / (n(n-1)) + S_yy / (m(m-1)) - 2 S_xy / (nm).
    K is built once, ROW_CHUNK rows at a time, and each chunk meets all labellings in one matmul, so
    memory is O(ROW_CHUNK * N + N * P) and time O(N^2 (d + P)) for N = n + m and P labellings.

    Args:
        x: first sample (n, d), float64.
        y: second sample (m, d), float64.
        kernels: functions of the pairwise distances.
        labels: (n + m, P) indicators with n ones per column; column 0 is usually the observed split.

    Returns:
        (len(kernels), P) float64.
    """
    n, m = x.shape[0], y.shape[0]
    pooled = torch.cat([x, y])
    labels = labels.to(pooled.device)
    s_xx = torch.zeros(len(kernels), labels.shape[1], dtype=torch.float64, device=pooled.device)
    z_row = torch.zeros_like(s_xx)  # z'K1
    total = torch.zeros(len(kernels), 1, dtype=torch.float64, device=pooled.device)  # 1'K1
    for start in range(0, n + m, ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, n + m))
        dist = pairwise_distances(pooled[rows], pooled)
        diag = torch.arange(rows.stop - rows.start, device=pooled.device)
        for k, kernel in enumerate(kernels):
            block = kernel(dist)
            block[diag, diag + start] = 0.0  # U-statistics: no self-pairs
            s_xx[k] += (labels[rows] * (block @ labels)).sum(0)
            row_sums = block.sum(1)
            z_row[k] += row_sums @ labels[rows]
            total[k] += row_sums.sum()
    s_xy = z_row - s_xx
    s_yy = total - s_xx - 2.0 * s_xy
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (unbiased; 0 iff the laws are equal).

    Args:
        x: first sample (n, ...), n >= 2.
        y: second sample (m, ...) with the same per-sample shape, m >= 2.
    """
    x, y = flatten_pair(x, y, "energy distance")
    return float(discrepancies(x, y, [energy_kernel()], sample_labels(x.shape[0], y.shape[0]))[0, 0])


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with a Gaussian kernel.

    Args:
        x: first sample (n, ...), n >= 2.
        y: second sample (m, ...) with the same per-sample shape, m >= 2.
        bandwidth: kernel bandwidth h; None takes the median heuristic on the pooled sample.
    """
    x, y = flatten_pair(x, y, "MMD")
    kernel = rbf_kernel(median_bandwidth(torch.cat([x, y])) if bandwidth is None else bandwidth)
    return float(discrepancies(x, y, [kernel], sample_labels(x.shape[0], y.shape[0]))[0, 0])


def p_value(observed: torch.Tensor, permuted: torch.Tensor) -> torch.Tensor:
    """(1 + #{permuted >= observed}) / (1 + P), per row; never 0, exact under the null.

    A relabelling equal to the observed split must count as a tie, but its sums run in another
    order, so ties are taken up to a rounding tolerance.
    """
    scale = torch.maximum(observed.abs(), permuted.abs().amax(-1))
    hits = (permuted >= (observed - 1e-12 * scale)[:, None]).sum(-1, dtype=torch.float64)
    return (1.0 + hits) / (1.0 + permuted.shape[-1])


def _permutation_tests(
    x: torch.Tensor,
    y: torch.Tensor,
    statistics: tuple[str, ...],
    num_permutations: int,
    seed: int,
    bandwidth: float | None,
    strata: tuple | None = None,
) -> dict[str, float]:
    """Permutation tests of several statistics on the same relabellings (x, y already flattened); with
    `strata` (x's and y's stratum of each point), relabellings within strata only."""
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistic(s) {sorted(unknown)}; choose from {STATISTICS}")
    n, m = x.shape[0], y.shape[0]
    if "mmd" in statistics and bandwidth is None:
        bandwidth = median_bandwidth(torch.cat([x, y]))
    kernels = [energy_kernel() if s == "energy" else rbf_kernel(bandwidth) for s in statistics]
    if strata is None:
        permuted = permutation_labels(n, m, num_permutations, seed)
    else:
        pooled = torch.cat([torch.as_tensor(strata[0]).reshape(-1), torch.as_tensor(strata[1]).reshape(-1)])
        if len(pooled) != n + m:
            raise ValueError(f"strata: expected one stratum per point ({n} and {m}), got {len(pooled)} in all")
        permuted = stratified_permutation_labels(pooled, n, num_permutations, seed)
    labels = torch.cat([sample_labels(n, m), permuted], 1)
    values = discrepancies(x, y, kernels, labels).cpu()
    p = p_value(values[:, 0], values[:, 1:])
    out = {}
    for k, name in enumerate(statistics):
        out[name] = float(values[k, 0])
        out[f"{name}_p_value"] = float(p[k])
    if bandwidth is not None:
        out["mmd_bandwidth"] = float(bandwidth)
    return out


def permutation_test(
    x: torch.Tensor,
    y: torch.Tensor,
    statistic: str = "energy",
    num_permutations: int = 500,
    seed: int = 0,
    bandwidth: float | None = None,
) -> dict[str, float]:
    """Permutation test of "x and y have the same law" with the energy distance or the RBF MMD.

    Args:
        x: first sample (n, ...), n >= 2.
        y: second sample (m, ...) with the same per-sample shape, m >= 2.
        statistic: "energy" or "mmd".
        num_permutations: random relabellings of the pooled sample; the smallest p-value is 1/(1+P).
        seed: seed of the relabellings; the result is a deterministic function of the data and seed.
        bandwidth: MMD bandwidth (median heuristic on the pooled sample when None).

    Returns:
        dict(statistic=observed value, p_value=(1 + #{permuted >= observed}) / (1 + P)).
    """
    name = "energy distance" if statistic == "energy" else "MMD"
    x, y = flatten_pair(x, y, name)
    out = _permutation_tests(x, y, (statistic,), num_permutations, seed, bandwidth)
    return {"statistic": out[statistic], "p_value": out[f"{statistic}_p_value"]}


def two_sample_report(
    x: torch.Tensor,
    y: torch.Tensor,
    num_permutations: int = 500,
    seed: int = 0,
    bandwidth: float | None = None,
    strata: tuple | None = None,
) -> dict[str, float | int]:
    """Everything we check between two samples, as plain numbers ready for JSON.

    Keys: num_samples_x, num_samples_y, dim; energy_distance, energy_p_value, mmd, mmd_p_value,
    mmd_bandwidth (both tests share the same relabellings); max_abs_mean_diff, max_abs_std_diff;
    for dim <= LOW_DIM also mean_diff_i and std_diff_i (x minus y) per coordinate i; for
    dim <= KS_MAX_DIM also ks_p_value_i (two-sided Kolmogorov-Smirnov, marginal i).

    Args:
        x: first sample (n, ...), n >= 2 (e.g. speculative samples).
        y: second sample (m, ...) with the same per-sample shape, m >= 2 (e.g. ancestral or data).
        num_permutations: relabellings for the p-values.
        seed: seed of the relabellings.
        bandwidth: MMD bandwidth (median heuristic when None).
        strata: (x's, y's) stratum of each point, e.g. class labels when both samples were drawn with the
            same labels: the p-values then come from relabellings within strata (`stratified_permutation_labels`).
    """
    x, y = flatten_pair(x, y, "two-sample report")
    tests = _permutation_tests(x, y, STATISTICS, num_permutations, seed, bandwidth, strata)
    mean_diff = (x.mean(0) - y.mean(0)).cpu()
    std_diff = (x.std(0) - y.std(0)).cpu()
    report: dict[str, float | int] = {
        "num_samples_x": x.shape[0],
        "num_samples_y": y.shape[0],
        "dim": x.shape[1],
        "energy_distance": tests["energy"],
        "energy_p_value": tests["energy_p_value"],
        "mmd": tests["mmd"],
        "mmd_p_value": tests["mmd_p_value"],
        "mmd_bandwidth": tests["mmd_bandwidth"],
        "max_abs_mean_diff": float(mean_diff.abs().max()),
        "max_abs_std_diff": float(std_diff.abs().max()),
    }
    if x.shape[1] <= LOW_DIM:
        report.update({f"mean_diff_{i}": float(v) for i, v in enumerate(mean_diff)})
        report.update({f"std_diff_{i}": float(v) for i, v in enumerate(std_diff)})
    if x.shape[1] <= KS_MAX_DIM:
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        for i in range(x.shape[1]):  # at most KS_MAX_DIM coordinates
            report[f"ks_p_value_{i}"] = float(ks_2samp(xs[:, i], ys[:, i]).pvalue)
    return report
