"""Denoising networks. Every denoiser: `forward(x, t, return_features=False)`, `sample_shape`, `feature_dim`."""
from .mlp import MLPDenoiser
from .unet import UNet

__all__ = ["MLPDenoiser", "UNet"]
