"""Two-sample statistics (against naive formulas, power and calibration), the shipped feature net, FID/KID."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import kstest

from specdiff_train.evaluation import metrics
from specdiff_train.evaluation.features import (
    DIGITS_FEATURES,
    extract_features,
    feature_two_sample_test,
    fid_kid,
    image_quality,
    inception_feature_extractor,
    load_feature_extractor,
)
from specdiff_train.evaluation.metrics import (
    energy_distance,
    mmd_rbf,
    permutation_labels,
    permutation_test,
    two_sample_report,
)
from specdiff_train.nets.classifier import accuracy, digits_images, digits_split


def gaussians(n: int, shift: float = 0.0, scale: float = 1.0, seed: int = 0, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), shift + scale * torch.randn(n, d, generator=g)


# ---- statistics against naive formulas ----


def naive_energy(x: np.ndarray, y: np.ndarray) -> float:
    n, m = len(x), len(y)
    return 2 * cdist(x, y).mean() - cdist(x, x).sum() / (n * (n - 1)) - cdist(y, y).sum() / (m * (m - 1))


def naive_mmd(x: np.ndarray, y: np.ndarray, h: float) -> float:
    n, m = len(x), len(y)
    k = lambda a, b: np.exp(-cdist(a, b) ** 2 / (2 * h * h))  # noqa: E731
    k_xx, k_yy = k(x, x), k(y, y)
    return (
        (k_xx.sum() - n) / (n * (n - 1)) + (k_yy.sum() - m) / (m * (m - 1)) - 2 * k(x, y).mean()
    )


def test_statistics_match_naive_formulas():
    x, y = gaussians(37, shift=0.2, seed=1, d=3)
    y = y[:29]
    xn, yn = x.double().numpy(), y.double().numpy()
    pooled = np.vstack([xn, yn])
    h = np.median(cdist(pooled, pooled)[np.triu_indices(len(pooled), 1)])
    assert energy_distance(x, y) == pytest.approx(naive_energy(xn, yn), rel=1e-10)
    assert mmd_rbf(x, y) == pytest.approx(naive_mmd(xn, yn, h), rel=1e-10)
    assert mmd_rbf(x, y, bandwidth=0.7) == pytest.approx(naive_mmd(xn, yn, 0.7), rel=1e-10)
    # images are flattened: (n, 2, 3) is the same as (n, 6)
    x6, y6 = gaussians(20, seed=2, d=6)
    assert energy_distance(x6.view(20, 2, 3), y6.view(20, 2, 3)) == energy_distance(x6, y6)


def test_row_chunking_does_not_change_the_result(monkeypatch):
    x, y = gaussians(40, shift=0.1, seed=3)
    full = permutation_test(x, y, "mmd", num_permutations=50)
    monkeypatch.setattr(metrics, "ROW_CHUNK", 7)
    chunked = permutation_test(x, y, "mmd", num_permutations=50)
    assert chunked["statistic"] == pytest.approx(full["statistic"], rel=1e-10)
    assert chunked["p_value"] == full["p_value"]


def test_p_value_matches_brute_force_relabelling():
    x, y = gaussians(15, shift=0.3, seed=4)
    y = y[:12]
    result = permutation_test(x, y, "energy", num_permutations=100, seed=5)
    pooled = torch.cat([x, y])
    labels = permutation_labels(15, 12, 100, seed=5).bool()
    permuted = np.array([energy_distance(pooled[z], pooled[~z]) for z in labels.T])
    hits = (permuted >= result["statistic"] - 1e-12).sum()
    assert result["statistic"] == pytest.approx(energy_distance(x, y), rel=1e-12)
    assert result["p_value"] == pytest.approx((1 + hits) / 101, abs=1e-12)


# ---- power and calibration ----


@pytest.mark.parametrize("statistic", ["energy", "mmd"])
def test_same_law_is_not_flagged_and_a_biased_sampler_is(statistic):
    same = permutation_test(*gaussians(1000, seed=6), statistic, num_permutations=200)
    shifted = permutation_test(*gaussians(1000, shift=0.3, seed=6), statistic, num_permutations=200)
    assert same["p_value"] > 0.05
    assert shifted["p_value"] <= 0.01  # the smallest possible is 1/201
    assert shifted["statistic"] > 10 * abs(same["statistic"])


def test_a_sampler_with_the_wrong_spread_is_flagged():
    report = two_sample_report(*gaussians(1000, scale=1.2, seed=7), num_permutations=200)
    assert report["energy_p_value"] <= 0.01 and report["mmd_p_value"] <= 0.01


def test_p_values_are_deterministic_given_the_seed():
    x, y = gaussians(60, shift=0.1, seed=8)
    assert permutation_test(x, y, seed=3) == permutation_test(x, y, seed=3)
    assert two_sample_report(x, y, 100, seed=3) == two_sample_report(x, y, 100, seed=3)
    p_values = {permutation_test(x, y, num_permutations=100, seed=s)["p_value"] for s in range(5)}
    assert len(p_values) > 1  # the seed does drive the relabellings


def test_p_values_are_roughly_uniform_under_the_null():
    reports = [two_sample_report(*gaussians(30, seed=100 + r), num_permutations=100) for r in range(20)]
    for key in ("energy_p_value", "mmd_p_value"):
        p = np.array([r[key] for r in reports])
        assert (p < 0.05).sum() <= 4
        assert 0.3 < p.mean() < 0.7
        assert kstest(p, "uniform").pvalue > 0.01


# ---- report and errors ----


def test_report_fields_are_plain_numbers():
    x, y = gaussians(50, shift=0.5, seed=9)
    report = two_sample_report(x, y, num_permutations=50)
    json.dumps(report)
    assert {"energy_distance", "energy_p_value", "mmd", "mmd_p_value", "ks_p_value_1"} <= report.keys()
    assert report["mean_diff_0"] == pytest.approx(float(x[:, 0].mean() - y[:, 0].mean()))
    high = two_sample_report(*gaussians(20, seed=9, d=16), num_permutations=20)
    assert "max_abs_mean_diff" in high and "mean_diff_0" not in high and "ks_p_value_0" not in high


def test_clear_errors():
    x, y = gaussians(10)
    msg = "energy distance needs at least 2 samples per set, got 1; raise num_samples"
    with pytest.raises(ValueError, match=msg):
        energy_distance(x[:1], y)
    with pytest.raises(ValueError, match="MMD needs at least 2 samples per set, got 1"):
        mmd_rbf(x, y[:1])
    with pytest.raises(ValueError, match=r"\(10, 2\).*\(10, 3\)"):
        permutation_test(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="unknown statistic"):
        permutation_test(x, y, statistic="wasserstein")
    with pytest.raises(ValueError, match="NaN"):
        energy_distance(x, torch.full_like(y, float("nan")))


# ---- feature net, FID and KID ----


@pytest.fixture(scope="module")
def extractor():
    return load_feature_extractor()


@pytest.fixture(scope="module")
def digit_halves():
    images, _ = digits_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:800]], images[order[800:1600]]


def test_shipped_feature_net_is_accurate_and_small(extractor):
    ckpt = torch.load(DIGITS_FEATURES, weights_only=True)
    assert ckpt["test_accuracy"] >= 0.9 and "train_feature_net.py" in ckpt["note"]
    assert DIGITS_FEATURES.stat().st_size < 1_000_000
    split = digits_split(test_fraction=ckpt["test_fraction"], seed=ckpt["split_seed"])
    recomputed = accuracy(extractor.net, split["test_images"], split["test_labels"])
    assert recomputed >= 0.9 and recomputed == pytest.approx(ckpt["test_accuracy"], abs=0.01)
    features = extractor(split["test_images"][:5])
    assert features.shape == (5, 128) and features.dtype == torch.float64
    assert not any(p.requires_grad for p in extractor.parameters()) and not extractor.train().training


def test_fid_kid_separate_digits_from_noise(extractor, digit_halves):
    real_a, real_b = digit_halves
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kw = dict(kid_subset_size=200, kid_subsets=20)
    same = image_quality(real_a, real_b, extractor, **kw)
    other = image_quality(noise, real_b, extractor, **kw)
    assert other["fid"] > 20 * max(same["fid"], 0.1)
    assert other["kid_mean"] > 20 * max(abs(same["kid_mean"]), 0.01)
    assert same == image_quality(real_a, real_b, extractor, **kw)  # KID subsets are seeded


def test_extractor_is_a_torchmetrics_feature_module(extractor, digit_halves):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_a, real_b = digit_halves
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    fid.update(real_b, real=True)
    fid.update(real_a, real=False)
    ours = fid_kid(extract_features(real_a, extractor), extract_features(real_b, extractor), 100, 2)
    assert float(fid.compute()) == pytest.approx(ours["fid"], rel=1e-9)


def test_fid_runs_without_torch_fidelity():
    code = (
        "import sys; sys.modules['torch_fidelity'] = None\n"  # any import of it now fails
        "import torch\n"
        "from specdiff_train.evaluation.features import image_quality, load_feature_extractor\n"
        "x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1\n"
        "r = image_quality(x[:32], x[32:], load_feature_extractor(), kid_subsets=5)\n"
        "assert r['fid'] == r['fid'] and r['kid_mean'] == r['kid_mean']\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_too_few_images_and_missing_inception_weights(extractor, digit_halves):
    real_a, real_b = digit_halves
    with pytest.raises(ValueError, match="at least 2 samples.*num_samples"):
        image_quality(real_a[:1], real_b, extractor)
    with pytest.raises(ValueError, match="KID subset size 50.*num_samples"):
        image_quality(real_a[:20], real_b, extractor, kid_subset_size=50)
    with pytest.raises(ValueError, match=r"\(20, 1, 8, 8\).*\(20, 1, 16, 16\)"):
        image_quality(real_a[:20], torch.zeros(20, 1, 16, 16), extractor)
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match="torch-fidelity|weights"):
        inception_feature_extractor("/nonexistent/weights-inception.pth")


def test_feature_space_test_flags_blurred_digits(extractor, digit_halves):
    real_a, real_b = digit_halves
    blurred = torch.nn.functional.avg_pool2d(real_a, 3, stride=1, padding=1, count_include_pad=False)
    same = feature_two_sample_test(real_a, real_b, extractor, num_permutations=100)
    biased = feature_two_sample_test(blurred, real_b, extractor, num_permutations=100)
    assert same["energy_p_value"] > 0.05 and biased["energy_p_value"] <= 0.01
