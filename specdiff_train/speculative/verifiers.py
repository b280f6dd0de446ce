"""Verification rules by name: the one registry that `speculative_sample`, `evaluate`, the sampling
callback and the benchmarks parse verifier options with.

    parse_verifier("block")                       # block verification, weighted residual
    parse_verifier("tokenwise")                   # token-wise, reflection maximal coupling
    parse_verifier("tokenwise-residual")          # token-wise, fresh draw from (P - Q)_+
    parse_verifier("tokenwise", "residual")       # the same, correction given apart
    parse_verifier(my_verify_function)            # research: the signature of verify.verify_block
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from .verify import check_correction, verify_block, verify_tokenwise

VERIFIER_NAMES = ("block", "tokenwise", "tokenwise-reflection", "tokenwise-residual")


@dataclass(frozen=True)
class Verifier:
    """A verification rule: `name` as reports show it, and `verify`, a function with the signature of
    `verify.verify_block` (the built-in rules leave their correction until a chain needs one).
    `plain_steps`: a round in which no chain drafts may skip the verifier and take the ancestral step
    directly (the built-in rules give exactly that step there); a custom rule sees every round."""

    name: str
    verify: Callable
    plain_steps: bool = False

    def __call__(self, *args, **kwargs):
        return self.verify(*args, **kwargs)


def _tokenwise(correction: str) -> Verifier:
    check_correction(correction)  # now, not at the first round
    return Verifier(f"tokenwise-{correction}", partial(verify_tokenwise, correction=correction, defer_correction=True),
                    plain_steps=True)


def parse_verifier(verifier, correction: str | None = None) -> Verifier:
    """The `Verifier` for a name in `VERIFIER_NAMES`, a `Verifier`, or a verify function.

    `correction` applies to "tokenwise" only (default "reflection"); with any other verifier it is
    refused, since block verification always corrects with the weighted residual."""
    if correction is not None and verifier not in ("tokenwise", f"tokenwise-{correction}"):
        raise ValueError(
            f"correction: {correction!r} applies to verifier='tokenwise' only; block verification always corrects "
            "with a fresh draw from the weighted residual (w P - Q)_+ (a custom verifier takes its own): drop `correction`"
        )
    if isinstance(verifier, Verifier):
        return verifier
    if callable(verifier):
        return Verifier(getattr(verifier, "__name__", "custom"), verifier)
    if verifier == "block":
        return Verifier("block", partial(verify_block, defer_correction=True), plain_steps=True)
    if verifier == "tokenwise":
        return _tokenwise(correction or "reflection")
    if isinstance(verifier, str) and verifier.startswith("tokenwise-") and verifier in VERIFIER_NAMES:
        return _tokenwise(verifier.removeprefix("tokenwise-"))
    raise ValueError(f"verifier: expected one of {VERIFIER_NAMES} or a verify function, got {verifier!r}")
