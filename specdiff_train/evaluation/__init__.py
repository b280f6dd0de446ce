"""Evaluation: speculative sampling against ancestral sampling (costs, quality, exactness)."""
from .compare import Method, Quality, compare_methods, method_grid
from .sampling_callback import SpeculativeEvaluation

__all__ = ["Method", "Quality", "SpeculativeEvaluation", "compare_methods", "method_grid"]
