"""Index vectors reused by every round (an `arange` is one more operator each time it is made)."""
from __future__ import annotations

import torch

_CACHE: dict = {}


def arange(start: int, end: int, device) -> torch.Tensor:
    """torch.arange(start, end) on `device`, made once; callers must not modify it. In a compiled graph
    the arange is part of the graph (a cache filled while tracing would make the next call recompile)."""
    if torch.compiler.is_compiling():
        return torch.arange(start, end, device=device)
    key = (start, end, torch.device(device))
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = torch.arange(start, end, device=device)
    return _CACHE[key]
