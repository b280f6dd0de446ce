"""The `chain` option of `compare_methods`, `evaluate`, the `SpeculativeEvaluation` callback and
scripts/benchmark.py: the sampler family (`specdiff_train.chains`) that the ancestral baseline and every
speculative method of a comparison use alike.

A chain option is None (the target schedule's default chain), a `Chain`, its config
`{class_path: specdiff_train.chains.DDIM, init_args: {eta: 0.5}}`, or a short name with options,
`NAME[:KEY=VALUE,...]` (`CHAIN_NAMES`: ddpm, ddim, edm / euler_ancestral, flow / flow_euler_maruyama, a
chain class's name, or default), e.g. `ddim:eta=0.5`, `edm:eta=1,rho=7`, `flow:churn=0.5`. `evaluate` and the
callback also take a list of them: one set of report rows per chain. A bad value is a one-line ValueError
that names the field (`evaluate.chain: ...`).
"""
from __future__ import annotations

import inspect
from typing import Sequence

from ..chains import (DDIM, Chain, DDPMAncestral, EulerAncestral, FlowEulerMaruyama, as_chain, chain_families,
                      check_stochastic)

# Short names of the shipped chains (chain classes are also known by their own names, any case).
CHAIN_NAMES: dict[str, type] = {
    "ddpm": DDPMAncestral,
    "ddim": DDIM,
    "edm": EulerAncestral,
    "euler_ancestral": EulerAncestral,
    "flow": FlowEulerMaruyama,
    "flow_euler_maruyama": FlowEulerMaruyama,
}
DEFAULT_NAME = "default"  # the target schedule's default chain


def known_chain_names() -> dict[str, type]:
    """`CHAIN_NAMES` and every chain class by its lower-cased name."""
    return CHAIN_NAMES | {cls.__name__.lower(): cls for cls in chain_families()}


def names_help() -> str:
    """The names, for help texts and errors: "ddpm, ddim, edm (euler_ancestral), ...", then the syntax."""
    by_class: dict[type, list[str]] = {}
    for name, cls in CHAIN_NAMES.items():
        by_class.setdefault(cls, []).append(name)
    listed = ", ".join(names[0] + (f" ({', '.join(names[1:])})" if names[1:] else "") for names in by_class.values())
    return f"{listed} or {DEFAULT_NAME}, with options as NAME:KEY=VALUE,... (e.g. ddim:eta=0.5)"


def _value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)  # 0.5 -> float, 7 -> int, null / none -> None
    except yaml.YAMLError:
        return text


def chain_from_name(text: str) -> Chain | None:
    """A chain from `NAME[:KEY=VALUE,...]` (None for "default"); a one-line ValueError ("chain: ...") otherwise."""
    name, _, options = text.strip().partition(":")
    known = known_chain_names()
    if name.lower() == DEFAULT_NAME and not options:
        return None
    cls = known.get(name.lower())
    if cls is None:
        raise ValueError(f"chain: unknown chain {text!r}; use {names_help()}, or a {{class_path, init_args}} config")
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"chain: {text!r}: expected options as KEY=VALUE separated by commas, got {item!r}")
        kwargs[key.strip()] = _value(value.strip())
    return _build(cls, kwargs, text)


def _build(cls: type, kwargs: dict, given) -> Chain:
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise ValueError(f"chain: {given!r}: {cls.__name__} takes {takes}; got {', '.join(unknown)}")
    return cls(**kwargs)


def as_chain_option(value, field: str = "chain") -> Chain | None:
    """One chain option (None, a `Chain`, a {class_path, init_args} config or a name) as a `Chain`, or None
    for the target's default; a one-line ValueError naming `field` otherwise."""
    try:
        if value is None:
            return None
        if isinstance(value, str):
            return chain_from_name(value)
        return as_chain(value)  # a Chain or its {class_path, init_args} config, or a one-line error
    except (ValueError, TypeError) as err:
        raise renamed(err, field) from None


def chain_options(value, field: str = "chain") -> list[Chain | None]:
    """The chains of an option that may also be a list (one set of report rows per chain): [chain or None, ...]."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{field}: expected a chain or a non-empty list of chains, got an empty list")
        return [as_chain_option(item, field) for item in value]
    return [as_chain_option(value, field)]


def resolve_chains(chains: Sequence[Chain | None], schedule, num_steps: Sequence[int], field: str = "chain",
                   speculative: bool = True) -> list[Chain]:
    """The chains for a target's `schedule` (None: its default chain), each checked against the schedule and,
    for `speculative` sampling, for a stochastic step, at every step count; distinct. One-line errors naming
    `field`."""
    resolved = []
    for chain in chains:
        chain = chain if chain is not None else schedule.default_chain()
        try:
            for steps in num_steps:
                plan = schedule.plan(steps, chain)
                if speculative:
                    check_stochastic(plan)
        except ValueError as err:
            raise renamed(err, field) from None
        if chain in resolved:
            raise ValueError(f"{field}: {chain!r} is given twice (the target's default chain is "
                             f"{schedule.default_chain()!r})")
        resolved.append(chain)
    return resolved


def renamed(err: Exception, field: str) -> ValueError:
    """The error on one line, its leading "chain" (the samplers' name for the option) replaced by `field`."""
    message = " ".join(str(err).split("\n"))
    if message.startswith("chain"):
        return ValueError(field + message[len("chain"):])
    return ValueError(f"{field}: {message}")


def chain_tag(chain: str) -> str:
    """A chain's repr without spaces, for logger keys and file keys."""
    return chain.replace(" ", "")
