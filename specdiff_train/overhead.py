"""Count what a sampling loop costs besides its networks: aten operators and host syncs.

At batch 1 a GPU is launch-bound: every aten operator is (at least) one kernel launch of a few
microseconds, and every host sync stalls the CPU until the GPU has drained its queue. Both counts are
deterministic, so they can be measured on a CPU and held by tests, unlike wall-clock.

    with OverheadCounter(networks=[target, drafter_net]) as counter:
        speculative_sample(...)
    counter.ops, counter.syncs, counter.network_ops, counter.top()

Operators dispatched inside the `forward` of a module in `networks` are counted apart
(`network_ops`): they are the model's cost, not the sampler's.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose result the host must wait for: a scalar read, or an output whose size depends on
# the data. On a GPU each one is a device-to-host copy plus a stream sync.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), `if t:`
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.equal.default,
    aten.bincount.default,  # sizes its output from the data's maximum
    aten.repeat_interleave.Tensor,  # without output_size
}


def _is_host_transfer(func, args, kwargs) -> bool:
    """A copy of a tensor that lives on an accelerator to the CPU (invisible on a CPU-only run)."""
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    return args[0].device.type == "cpu" and args[1].device.type != "cpu"


def _to_literal_cpu(args, kwargs) -> bool:
    """`.to("cpu", ...)` or `.to(device="cpu")`: a host copy by intent. A `torch.device` is not
    counted: on a CPU run `.to(device)` is the sampler's ordinary placement (see OverheadCounter)."""
    device = kwargs.get("device", args[0] if args else None)
    return isinstance(device, str) and torch.device(device).type == "cpu"


# Tensor methods that hand the host a copy but dispatch no operator for a tensor already on the CPU,
# with when a call is one (all their calls, or `.to` to the literal "cpu").
_HOST_READS = {
    "tolist": lambda args, kwargs: True,
    "numpy": lambda args, kwargs: True,
    "cpu": lambda args, kwargs: True,
    "to": _to_literal_cpu,
}


def _has_bool_index(func, args) -> bool:
    """`x[mask]` with a boolean mask: its output size depends on the data (a nonzero inside)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


class OverheadCounter(TorchDispatchMode):
    """A `TorchDispatchMode` that counts aten operators and host syncs outside `networks`.

    Args:
        networks: modules whose forwards are the model's cost (target, draft network, heads).

    Attributes after the `with` block: `ops` (operators outside the networks), `syncs` (host syncs,
    anywhere), `network_ops`, `by_op` (a `Counter` of the operators outside the networks) and
    `sync_ops` (a `Counter` of the syncing operators).

    Device-to-host copies: on an accelerator they dispatch `_to_copy`/`copy_` to the CPU and are
    counted there. On a CPU-only run, where the counts are held by tests, they dispatch nothing, so
    the methods that mean "give me the host copy" are counted by name when their tensor is already
    on the CPU: `Tensor.tolist()`, `Tensor.numpy()`, `Tensor.cpu()`, and `Tensor.to(...)` whose
    device is the literal string "cpu" (`.to("cpu")`, `.to(device="cpu")`). Not counted on a CPU
    run (a limit): `.to(torch.device("cpu"))` and `.to(device)` with a device variable, because the
    sampler's own `.to(device)` (host-to-device on an accelerator, no sync) looks exactly the same
    there; a copy to the host written that way is only seen by a count on an accelerator.
    """

    def __init__(self, networks: Iterable[torch.nn.Module] = ()):
        super().__init__()
        self.networks = [n for n in networks if isinstance(n, torch.nn.Module)]
        self.ops = self.syncs = self.network_ops = 0
        self.by_op: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self._depth = 0
        self._handles: list = []
        self._patched: dict = {}

    # --- network boundaries ------------------------------------------------------------------
    def _enter_network(self, *_):
        self._depth += 1

    def _leave_network(self, *_):
        self._depth -= 1

    def __enter__(self):
        self.ops = self.syncs = self.network_ops = 0
        self.by_op.clear()
        self.sync_ops.clear()
        for net in self.networks:
            self._handles.append(net.register_forward_pre_hook(self._enter_network))
            self._handles.append(net.register_forward_hook(self._leave_network, always_call=True))
        for name, reads_host in _HOST_READS.items():
            self._patched[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base
            setattr(torch.Tensor, name, self._counting_read(name, getattr(torch.Tensor, name), reads_host))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, original in self._patched.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def _counting_read(self, name, original, reads_host):
        counter = self

        def read(tensor, *args, **kwargs):
            # A tensor on an accelerator dispatches its copy to the host, counted by the dispatch hook.
            if tensor.device.type == "cpu" and reads_host(args, kwargs):
                counter.syncs += 1
                counter.sync_ops[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    # --- the dispatch hook ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS or _is_host_transfer(func, args, kwargs) or _has_bool_index(func, args):
            self.syncs += 1
            self.sync_ops[str(func.overloadpacket.__name__)] += 1
        if self._depth > 0:
            self.network_ops += 1
        else:
            self.ops += 1
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    def top(self, n: int = 15) -> list[tuple[str, int]]:
        """The most frequent operators outside the networks."""
        return self.by_op.most_common(n)


def _networks(model, drafter=None) -> list:
    nets = [model] if isinstance(model, torch.nn.Module) else []
    module = getattr(drafter, "module", None)
    return nets + ([module] if isinstance(module, torch.nn.Module) else [])


def speculative_overhead(model, schedule, shape, *, num_steps: int, drafter, verifier: str = "block",
                         window: int = 8, seeds=(0,), **kwargs) -> dict:
    """Operators and host syncs per round of `speculative_sample` outside the target's and the
    drafter's networks (a whole call: set-up and finishing included, divided by its rounds)."""
    from .speculative import speculative_sample

    run = lambda: speculative_sample(model, schedule, shape, num_steps=num_steps, seeds=list(seeds),  # noqa: E731
                                     drafter=drafter, verifier=verifier, window=window, **kwargs)
    run()  # first call: caches (plan tables, index vectors) are built outside the count
    with OverheadCounter(_networks(model, drafter)) as counter:
        result = run()
    rounds = result.stats.rounds
    return dict(ops_per_round=counter.ops / rounds, syncs_per_round=counter.syncs / rounds, rounds=rounds,
                network_ops_per_round=counter.network_ops / rounds, counter=counter)


def ancestral_overhead(model, schedule, shape, *, num_steps: int, seeds=(0,), **kwargs) -> dict:
    """Operators and host syncs per step of `ancestral_sample` outside the network."""
    from .sampling import ancestral_sample

    run = lambda: ancestral_sample(model, schedule, shape, num_steps=num_steps, seeds=list(seeds), **kwargs)  # noqa: E731
    run()
    with OverheadCounter(_networks(model)) as counter:
        run()
    return dict(ops_per_step=counter.ops / num_steps, syncs_per_step=counter.syncs / num_steps,
                network_ops_per_step=counter.network_ops / num_steps, counter=counter)
