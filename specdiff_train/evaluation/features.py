"""Image quality in the feature space of a project-owned network: FID, KID and a permutation test.

torchmetrics' FID / KID accept any nn.Module as `feature=`. With a module they hand the images to it
unchanged (no uint8 cast; `normalize` only shapes a dummy input that `num_features` lets us skip)
and never import torch-fidelity. So `FeatureExtractor` takes images in [-1, 1], as the diffusion
models produce them, and exposes `num_features`.

Inception features exist only from local weights (`inception_feature_extractor`); nothing here
downloads anything.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from specdiff_train.evaluation.metrics import two_sample_report
from specdiff_train.guidance import NULL_LABEL
from specdiff_train.nets.classifier import DigitsClassifier

DIGITS_FEATURES = Path(__file__).resolve().parents[2] / "checkpoints" / "digits_features.pt"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID weights
KID_SUBSET_SIZE = 1000  # torchmetrics' default, capped by the sample sizes


class FeatureExtractor(nn.Module):
    """Frozen feature map: images (B, C, H, W) in [-1, 1] (or uint8 0..255) -> float64 (B, num_features).

    Usable directly as torchmetrics' `feature=` module. It never leaves eval mode.

    Args:
        net: a module with `features(x)` for float32 images in [-1, 1].
        num_features: size of the feature vector (read by torchmetrics instead of a dummy forward).
        input_shape: expected (C, H, W) of the images, or None to accept any.
    """

    def __init__(self, net: nn.Module, num_features: int, input_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_features = num_features
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or (self.input_shape and tuple(images.shape[1:]) != self.input_shape):
            raise ValueError(
                f"feature extractor expects images (B, {', '.join(map(str, self.input_shape or 'CHW'))}),"
                f" got shape {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        return self.net.features(images.float()).double()  # float64 so FID / KID compute in float64


def load_feature_extractor(path: str | Path = DIGITS_FEATURES, map_location: str = "cpu") -> FeatureExtractor:
    """Load a `DigitsClassifier` checkpoint written by scripts/train_feature_net.py as a frozen extractor.

    Args:
        path: the checkpoint (dict with state_dict and kwargs); defaults to the shipped digits net.
        map_location: device to load the weights on.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature network at {path}; train one with `python scripts/train_feature_net.py --out {path}`"
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    kwargs = ckpt["kwargs"]
    net = DigitsClassifier(**kwargs)
    net.load_state_dict(ckpt["state_dict"])
    shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    return FeatureExtractor(net, kwargs["feature_dim"], shape)


def label_classifier(sample_shape, num_classes: int, extractor: FeatureExtractor | None = None) -> nn.Module | None:
    """The classifier that scores a conditional target's samples (`label_accuracy`): the feature network's
    `DigitsClassifier` when it takes images of `sample_shape` and has `num_classes` classes; without an
    extractor, the shipped digits network (1x8x8 digits, 10 classes) when it fits. None otherwise (no
    label accuracy: unconditional targets, other shapes or class counts, Inception features)."""
    if num_classes <= 0 or len(sample_shape) != 3:
        return None
    if extractor is None:
        if not DIGITS_FEATURES.exists():
            return None
        extractor = load_feature_extractor(DIGITS_FEATURES)
    net = getattr(extractor, "net", None)
    if not isinstance(net, DigitsClassifier) or getattr(extractor, "input_shape", None) != tuple(sample_shape):
        return None
    return net if net.head.out_features == num_classes else None


@torch.no_grad()
def label_accuracy(images: torch.Tensor, labels, classifier: nn.Module, batch_size: int = 256) -> float | None:
    """The share of labelled images (label not `NULL_LABEL`) that `classifier` (images -> logits) puts in
    their label's class; None when no image is labelled."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    keep = labels != NULL_LABEL
    if not bool(keep.any()):
        return None
    device = next(classifier.parameters(), torch.empty(0)).device
    predicted = torch.cat([classifier(images[i : i + batch_size].to(device).float()).argmax(1).cpu()
                           for i in range(0, len(images), batch_size)])
    return float((predicted[keep] == labels[keep]).double().mean())


class _InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 behind the [-1, 1] contract: it wants uint8 RGB."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def features(self, images: torch.Tensor) -> torch.Tensor:
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        return self.inception(uint8)


def inception_feature_extractor(weights_path: str | Path | None = None) -> FeatureExtractor:
    """InceptionV3 pool features (2048) from local weights, for FID / KID comparable with papers.

    Needs torch-fidelity installed and its weights file on disk: `weights_path`, or when None the
    torch hub cache (`<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth`).
    Never downloads; raises a clear error instead.
    """
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "Inception features need torch-fidelity (`pip install torch-fidelity`) and local weights "
            f"({INCEPTION_WEIGHTS_FILE}); offline, use load_feature_extractor() with the project's "
            "feature network instead"
        )
    path = Path(weights_path) if weights_path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; download {INCEPTION_WEIGHTS_FILE} from the "
            "torch-fidelity v0.2.0 release on a machine with internet and pass its path"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return FeatureExtractor(_InceptionFeatures(net), num_features=2048)


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """Features (N, F) of images (N, C, H, W), computed in batches on the extractor's device."""
    device = next(extractor.parameters(), torch.empty(0)).device
    chunks = [extractor(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double()


class _Precomputed(nn.Module):
    """Identity `feature=` module: FID and KID consume features extracted once, not images twice."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    features: torch.Tensor,
    reference_features: torch.Tensor,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID and KID (mean, std over subsets) between two feature sets (N, F), (M, F), via torchmetrics.

    Args:
        features: features of the generated samples.
        reference_features: features of the reference (data, or another sampler).
        kid_subset_size: samples per KID subset; None takes min(1000, N, M).
        kid_subsets: number of KID subsets.
        seed: seed of the KID subsets (torchmetrics draws them from the global generator).
    """
    n, m = len(features), len(reference_features)
    if min(n, m) < 2:
        raise ValueError(f"FID / KID need at least 2 samples per set, got {min(n, m)}; raise num_samples")
    subset = min(KID_SUBSET_SIZE, n, m) if kid_subset_size is None else kid_subset_size
    if not 2 <= subset <= min(n, m):
        raise ValueError(
            f"KID subset size {subset} must be in [2, min(num_samples)] for {n} samples and {m} "
            "reference samples; lower kid_subset_size or raise num_samples"
        )
    identity = _Precomputed(features.shape[1])
    # sync_on_compute=False: the inputs are already complete; a rank-0-only call must not all_gather.
    fid = FrechetInceptionDistance(feature=identity, normalize=True, sync_on_compute=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=identity, subsets=kid_subsets, subset_size=subset, normalize=True, sync_on_compute=False
        )
    for metric in (fid, kid):
        metric.update(reference_features.double().cpu(), real=True)
        metric.update(features.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "num_samples": n,
        "num_reference": m,
    }


def image_quality(
    samples: torch.Tensor,
    reference: torch.Tensor,
    feature_extractor: nn.Module,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID and KID of images against reference images in a feature extractor's space.

    FID and KID are biased with few samples and depend on the feature network: compare numbers only
    at equal sample counts and with the same extractor.

    Args:
        samples: generated images (N, C, H, W) in [-1, 1].
        reference: reference images (M, C, H, W) in [-1, 1].
        feature_extractor: e.g. `load_feature_extractor()` or `inception_feature_extractor(path)`.
        kid_subset_size: samples per KID subset; None takes min(1000, N, M).
        kid_subsets: number of KID subsets.
        batch_size: images per forward pass of the extractor.
        seed: seed of the KID subsets.

    Returns:
        dict(fid, kid_mean, kid_std, kid_subset_size, num_samples, num_reference).
    """
    _check_image_pair(samples, reference)
    return fid_kid(
        extract_features(samples, feature_extractor, batch_size),
        extract_features(reference, feature_extractor, batch_size),
        kid_subset_size,
        kid_subsets,
        seed,
    )


def inception_quality(
    samples: torch.Tensor,
    reference: torch.Tensor,
    weights_path: str | Path | None = None,
    **kwargs,
) -> dict[str, float | int]:
    """`image_quality` with InceptionV3 features from local weights (see inception_feature_extractor)."""
    return image_quality(samples, reference, inception_feature_extractor(weights_path), **kwargs)


def feature_two_sample_test(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    extractor: nn.Module,
    num_permutations: int = 500,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """`two_sample_report` (energy / MMD permutation tests) on the features of two image sets.

    Exact speculative sampling and ancestral sampling share one law, so their feature sets should
    not be told apart (p-values not small); a biased sampler shows as small p-values.
    """
    _check_image_pair(samples_a, samples_b)
    return two_sample_report(
        extract_features(samples_a, extractor, batch_size),
        extract_features(samples_b, extractor, batch_size),
        num_permutations=num_permutations,
        seed=seed,
    )


def _check_image_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"expected two image batches (N, C, H, W) of the same image shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
