"""Denoising networks. Every denoiser: `forward(x, t, return_features=False, labels=None)`, `sample_shape`,
`feature_dim`, `num_classes` (0: unconditional; labels (B,) in [0, num_classes) or `NULL_LABEL`)."""
from ..guidance import NULL_LABEL
from .mlp import MLPDenoiser
from .unet import UNet

__all__ = ["MLPDenoiser", "NULL_LABEL", "UNet"]
