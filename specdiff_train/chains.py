"""The sampler families (ALGORITHMS.md section 8), in one place to import and name them from.

    DDPMAncestral()               DDPM-trained targets: respaced ancestral sampling (the default)
    DDIM(eta=...)                 DDPM-trained targets: DDIM with eta in (0, 1]
    EulerAncestral(eta=, rho=)    EDM-trained targets (`EDMSchedule`): ancestral Euler on Karras sigmas
    FlowEulerMaruyama(churn=)     flow-matching targets (`FlowSchedule`): Euler-Maruyama with churn

Pass one as `chain=` to `ancestral_sample`, `speculative_sample`, `evaluate` or the sampling callback,
or in YAML as `{class_path: specdiff_train.chains.DDIM, init_args: {eta: 1.0}}`. A new family is one
subclass of `Chain` (`diffusion.py` documents the contract); its module must be imported for
`chain_families` to list it.
"""
from __future__ import annotations

from .diffusion import DDIM, Chain, DDPMAncestral, DDPMSchedule, Schedule, SamplingPlan, as_chain, chain_families
from .edm import EDMSchedule, EulerAncestral
from .flow import FlowEulerMaruyama, FlowSchedule

__all__ = ["Chain", "DDIM", "DDPMAncestral", "DDPMSchedule", "EDMSchedule", "EulerAncestral", "FlowEulerMaruyama",
           "FlowSchedule", "Schedule", "SamplingPlan", "as_chain", "chain_families", "check_stochastic"]


def check_stochastic(plan: SamplingPlan) -> None:
    """Speculative sampling needs noise: a one-line error for a plan with no stochastic step."""
    if plan.num_stochastic_steps == 0:
        raise ValueError(
            f"chain: {plan.chain!r} has no stochastic step with num_steps={plan.num_steps} (every step is "
            "deterministic), so drafts cannot be verified; speculative sampling needs noise: use "
            + ("num_steps >= 2" if plan.num_steps < 2 else plan.chain.stochastic_setting()))
