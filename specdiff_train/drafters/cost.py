"""What one draft call costs next to one target call (`relative_draft_cost`), for any drafter."""
from __future__ import annotations

import statistics
import time

import torch

from ..diffusion import Schedule
from ..sampling import model_device_dtype
from .base import DraftContext, Drafter, Verification


def median_call_time(fn, device, repeats: int) -> float:
    """Median wall-clock of `repeats` calls of `fn` after one warm-up call (synchronised on CUDA)."""
    device = torch.device(device)
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def relative_draft_cost(drafter: Drafter, target, schedule: Schedule, sample_shape, *, num_steps: int = 100,
                        batch_size: int = 64, repeats: int = 20, seed: int = 0, chain=None) -> dict:
    """Wall-clock of one draft call (`drafter.propose` on `batch_size` states) next to one target call
    on the same batch, median of `repeats` after a warm-up, on the target's device.

    The drafter is bound and fed one verification (one target pass, features included if it wants
    them) at mid-chain states, as in sampling. `chain`: the sampler (a `Chain` or its config; default: the one a
    learned drafter was trained for, else the schedule's). Returns {"draft_s", "target_s", "relative"}.
    """
    plan = schedule.plan(num_steps, chain if chain is not None else getattr(drafter, "trained_chain", None))
    device, dtype = model_device_dtype(target)
    shape = tuple(int(s) for s in sample_shape)

    def call_target(x, k, slots=None, return_features=False):
        t = plan.t(k)
        return target(x, t, return_features=True) if return_features else target(x, t)

    drafter.bind(DraftContext(call_target, schedule, plan, shape, batch_size, device, dtype))
    slots = torch.arange(batch_size, device=device)
    gen = torch.Generator().manual_seed(seed)
    k = torch.full((batch_size,), plan.num_stochastic_steps // 2, dtype=torch.int64, device=device)
    alpha, sigma = schedule.signal_noise(plan.t(k[:1].cpu()))  # states of the step's scale (EDM: sigma ~ 1)
    scale = float((alpha**2 + sigma**2).sqrt())
    x = (torch.randn(batch_size, *shape, generator=gen) * scale).to(device=device, dtype=dtype)
    drafter.join(slots)
    out = call_target(x, k, return_features=drafter.wants_features)
    out, features = out if drafter.wants_features else (out, None)
    drafter.observe(slots, Verification(
        states=x[:, None], steps=k, outputs=out[:, None], features=None if features is None else features[:, None],
        evaluated=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
        accepted=torch.zeros(batch_size, dtype=torch.int64, device=device),
    ))
    x_next, k_next = plan.transition(x, k, out)[0], k + 1
    drafter.start_round(slots, x_next, k_next)

    draft_s = median_call_time(lambda: drafter.propose(slots, x_next, k_next), device, repeats)
    target_s = median_call_time(lambda: call_target(x_next, k_next), device, repeats)
    return dict(draft_s=draft_s, target_s=target_s, relative=draft_s / target_s)
