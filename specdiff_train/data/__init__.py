"""Data through Hugging Face `datasets`: toy 2-D distributions, bundled digits, hub and local images."""
from .datamodule import DiffusionDataModule
from .digits import digits_dataset
from .toy2d import TOY2D, make_toy2d, toy2d_dataset

__all__ = ["DiffusionDataModule", "TOY2D", "digits_dataset", "make_toy2d", "toy2d_dataset"]
