"""The samplers' `compile` option: torch.compile modes, and compilation time kept apart from sampling time.

    ancestral_sample(..., compile=True)       # the step (network + update) as one graph
    speculative_sample(..., compile=True)     # the whole round as one graph (speculative/compiled.py)

True means "reduce-overhead" on CUDA (inductor with CUDA graphs: at batch 1 a GPU is launch-bound) and
inductor's "default" elsewhere; a torch.compile mode may be given by name. Graphs are compiled with
`fullgraph=True, dynamic=False`: one graph per shape, and an error rather than a silent graph break.
"""
from __future__ import annotations

import time

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Each (drafter, verifier, policy, capacity, width) is one graph of the same round function: more than
# dynamo's default of 8 per function in a process that samples with several (evaluate, the tests).
RECOMPILE_LIMIT, ACCUMULATED_RECOMPILE_LIMIT = 256, 4096


def compile_mode(compile, device) -> str | None:
    """The torch.compile mode for a sampler's `compile` option: None (eager) for False; for True,
    "reduce-overhead" (CUDA graphs) on CUDA and "default" elsewhere; or a mode by name."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile: expected True, False or a torch.compile mode {COMPILE_MODES}, got {compile!r}")


def compile_graphs(fn, mode: str):
    """`torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)`, with room for one graph per shape."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    ACCUMULATED_RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def uses_cuda_graphs(mode: str | None) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (to tell a call that compiled from one that ran)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileClock:
    """Splits a compiled sampler's wall-clock: the calls that compiled a graph (tracing and inductor;
    on a GPU also the CUDA graph's recording at its first calls) go to `compile_s`."""

    def __init__(self):
        self.compile_s = 0.0
        self.compiled_last = False  # whether the last call compiled

    def call(self, fn, *args):
        before, start = _graphs_compiled(), time.perf_counter()
        out = fn(*args)
        self.compiled_last = _graphs_compiled() != before
        if self.compiled_last:
            self.compile_s += time.perf_counter() - start
        return out
