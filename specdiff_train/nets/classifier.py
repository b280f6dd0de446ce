"""A small CNN classifier whose penultimate layer is the project's offline feature space for FID/KID,
and the scikit-learn digits split it is trained and tested on.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class DigitsClassifier(nn.Module):
    """Conv net: (B, C, H, W) images in [-1, 1] -> features (B, feature_dim) -> logits (B, num_classes).

    Each stage halves the resolution until it is 4x4 (one stage for 8x8 digits), then a wider conv
    and global average pooling; the features are the ReLU'd penultimate layer, like Inception's
    pool features.

    Args:
        in_channels: image channels.
        image_size: side of the (square) input images.
        num_classes: number of classes.
        width: channels of the first stages (the last conv has 2 * width).
        feature_dim: size of the feature vector used by FID / KID.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        width: int = 64,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.feature_dim = in_channels, image_size, feature_dim
        num_down = max(1, int(math.log2(max(image_size // 4, 1))))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(num_down):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        layers += [nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
        layers += [nn.Flatten(), nn.Linear(2 * width, feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, C, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.body(x))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of a classifier on (images, labels), in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    model.train(was_training)
    return correct / len(images)


def digits_images(image_size: int = 8, in_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as images (1797, C, S, S) in [-1, 1] and labels (1797,).

    Pixel values 0..16 map linearly to [-1, 1]. Other sizes are bilinearly resized (match the
    resizing of the diffusion data); more channels repeat the grey image.
    """
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None] / 8.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    return images.repeat(1, in_channels, 1, 1), torch.from_numpy(digits.target).long()


def digits_split(
    image_size: int = 8, in_channels: int = 1, test_fraction: float = 0.25, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A stratified, seeded train/test split of `digits_images`.

    Returns:
        dict(train_images, train_labels, test_images, test_labels).
    """
    images, labels = digits_images(image_size, in_channels)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
    }
