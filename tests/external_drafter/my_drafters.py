"""A drafter defined outside the package: the README's example, kept verbatim (tests load it by class_path)."""
import torch
from specdiff_train.speculative import Drafter

class DampedFreeDrafter(Drafter):
    """Reuse the last verified eps, shrunk towards zero."""

    round_state = ("eps", "ready_mask")           # the per-slot tensors observe modifies (compiled rounds)

    def __init__(self, damping: float = 0.9):
        self.damping = damping

    def bind(self, context):                      # once per sampling run
        super().bind(context)                     # context.schedule, .plan, .sample_shape, .capacity, .target
        self.eps = torch.zeros(context.capacity, *context.sample_shape, device=context.device)
        self.ready_mask = torch.zeros(context.capacity, dtype=torch.bool, device=context.device)

    def join(self, slots):                        # new chains take these slots
        self.ready_mask[slots] = False

    def ready(self, slots):                       # chains not ready take one plain target step
        return self.ready_mask[slots]

    def propose(self, slots, x, k):               # mean of Q for step k (per row) from states x
        x0 = self.schedule.to_x0(self.damping * self.eps[slots], x, self.plan.t(k), prediction="eps")
        return self.plan.transition_from_x0(x, k, x0)[0]

    def observe(self, slots, verification):       # what the batched target call computed this round
        rows = torch.arange(len(slots), device=slots.device)
        tau = verification.accepted
        t = self.plan.t(verification.steps + tau)
        self.eps[slots] = self.schedule.to_eps(verification.outputs[rows, tau], verification.states[rows, tau], t)
        self.ready_mask[slots] = True
