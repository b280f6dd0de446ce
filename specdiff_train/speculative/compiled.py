"""Compiled rounds: a speculative round's whole tensor program captured by `torch.compile(fullgraph=True)`.

    speculative_sample(..., compile=True)     # "reduce-overhead" (CUDA graphs) on a GPU, inductor elsewhere

At batch 1 a GPU is launch-bound, so a round costs what it dispatches. Compiled, everything between two
host reads is one graph: the noise gathered for the round, the window's tables, drafting, the target
call, the x0 estimates and means, verification with the correction, the drafter's `observe`, the
window policy's `learn` and next windows (when the policy can be captured) and the flags of the one host
read. The host read itself, commit, retirement, admission and the noise buffer refills stay outside.

What differs from an eager round, so that every round of a run reuses a few graphs:
- every slot is evaluated, live or not (a finished chain's slot is masked out of the commit): the shapes
  depend on the capacity, never on how many chains are live;
- the round's window is padded to the policy's `padded_width` (the longest window for a fixed window;
  powers of two for adaptive ones): padded drafts are never used, so the samples are the
  same (noise is keyed by position);
- no compaction (evaluation of all rows, corrections for all chains): data-dependent shapes are host reads;
- the correction is computed in every round rather than only when the host read says a chain needs one;
- the drafter's and policy's per-slot state (their `round_state`) is modified on copies inside the graph
  and written back after it: a graph that modifies its inputs is not recorded as a CUDA graph (inductor
  skips it, "mutated inputs"), and such a round ran launch by launch on a GPU.

One graph per (capacity, padded width), and one per noise-buffer layout for plain rounds; dynamo reuses
them in later calls with the same network, drafter, verifier and shapes. A drafter whose hooks cannot be
captured is run eagerly around a compiled evaluate-verify graph, with a one-time warning naming it.
"""
from __future__ import annotations

import warnings

import torch

from ..compiling import CompileClock, compile_graphs, uses_cuda_graphs
from .engine import RoundNoiseDraw, host_flags, window_of

_EAGER_DRAFTERS_WARNED: set[str] = set()
_KEPT = ("next_state", "new_step", "rounds", "next_lengths", "accepted", "advanced", "finished")  # outlive the round


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _round_state(owner) -> list[tuple[object, str]]:
    """(object, attribute name) of the per-slot state a drafter or policy modifies in a round, its parts'
    (a hybrid drafter's `parts`) included."""
    pairs = [(owner, name) for name in getattr(owner, "round_state", ())]
    return pairs + [pair for part in getattr(owner, "parts", ()) for pair in _round_state(part)]


class CompiledRounds:
    """The compiled round programs of one `RoundEngine` (see the module docstring)."""

    def __init__(self, engine, mode: str):
        self.engine = engine
        self.clock = CompileClock()
        self.capturable_policy = bool(getattr(engine.policy, "capturable", False))
        self._whole = compile_graphs(self._speculative_program, mode)
        self._plain = compile_graphs(self._plain_program, mode)
        self._check_only = compile_graphs(self._check_program, mode)
        self.cuda_graphs = uses_cuda_graphs(mode) and engine.pool.all_slots.device.type == "cuda"
        self.drafter_eager = False
        owners = [engine.drafter] + ([engine.policy] if self.capturable_policy else [])
        self.round_state = [pair for owner in owners for pair in _round_state(owner)]

    # --- the programs (traced by dynamo; plain tensor code) ------------------------------------------
    def _draw(self, noise_tensors, chain_rounds, L: int):
        """The round's noise for every slot, cut to L drafts (offsets clamped: a finished chain's slot
        holds no draws for this round, and its values are never used)."""
        gaussians, uniforms, first_round = noise_tensors
        ahead, W = gaussians.shape[1], gaussians.shape[2] - 1
        offset = (chain_rounds - first_round).clamp(0, ahead - 1)
        rows = self.engine.pool.all_slots
        g, u = gaussians[rows, offset], uniforms[rows, offset]
        shape = self.engine.setup.shape
        return RoundNoiseDraw(g[:, :L].reshape(len(rows), L, *shape), g[:, W], u[:, :L], u[:, W])

    def _safe_steps(self, n):
        return n.clamp(max=self.engine.setup.plan.num_steps - 1)  # a finished chain's slot

    def _drafts(self, x, n, lengths, noise, L: int):
        return self.engine._drafts(self.engine.pool.all_slots, x, self._safe_steps(n), lengths, L, noise)

    def _check(self, x, n, lengths, live, noise, window, states, draft_means) -> dict:
        result, verification = self.engine._check_drafts(self.engine.pool.all_slots, self._safe_steps(n), lengths,
                                                         noise, window, states, draft_means)
        return self._outcome(x, n, live, result, result.settle(True), verification)

    def _outcome(self, x, n, live, result, next_state, verification) -> dict:
        """Commit values for every slot (a finished chain's slot keeps its state) and the record's tensors."""
        engine = self.engine
        advanced = result.advanced * live
        new_step = n + advanced
        finished = live & (new_step >= engine.setup.plan.num_steps)
        flat = lambda v: v.reshape(len(x), -1)  # noqa: E731
        next_state = torch.where(live.unsqueeze(-1), flat(next_state).to(x.dtype), flat(x)).reshape(x.shape)
        needs = result.needs_correction
        return dict(accepted=result.accepted * live, advanced=advanced, new_step=new_step, finished=finished,
                    next_state=next_state, rounds=engine.pool.rounds + live,
                    needs_correction=None if needs is None else needs & live, verification=verification)

    def _observe_learn_flags(self, out: dict, n, lengths, live) -> dict:
        """The drafter's `observe`, and the policy's learning, next windows and the host read's flags when
        the policy can be captured (else the engine runs them after the call)."""
        engine, slots = self.engine, self.engine.pool.all_slots
        engine.drafter.observe(slots, out["verification"])
        if self.capturable_policy:
            engine.policy.learn(slots, n, lengths, out["accepted"])
            out["next_lengths"] = engine._windows(slots, self._safe_steps(out["new_step"])) * live
            out["flags"] = host_flags(out["finished"], out["next_lengths"], out["advanced"], out["needs_correction"])
        return out

    def _detach_state(self) -> list:
        """In a program: point the round's state attributes at copies (the graph then modifies no input)."""
        originals = [getattr(owner, name) for owner, name in self.round_state]
        for (owner, name), value in zip(self.round_state, originals):
            if value is not None:
                setattr(owner, name, value.clone())
        return originals

    def _reattach_state(self, out: dict, originals: list) -> dict:
        """In a program: the state's new values go out with the round's outputs; the originals come back."""
        out["round_state"] = [getattr(owner, name) for owner, name in self.round_state]
        for (owner, name), value in zip(self.round_state, originals):
            setattr(owner, name, value)
        return out

    def _write_back_state(self, new_values: list) -> None:
        """After the graph: the state's new values into its own tensors (a state first made by the graph,
        such as Medusa's features, is copied out of the CUDA graphs' memory pool)."""
        for (owner, name), new in zip(self.round_state, new_values):
            current = getattr(owner, name)
            if current is not None:
                current.copy_(new)
            elif new is not None:
                setattr(owner, name, new.clone())

    def _speculative_program(self, x, n, lengths, live, chain_rounds, noise_tensors, L: int):
        originals = self._detach_state()
        noise = self._draw(noise_tensors, chain_rounds, L)
        window, states, draft_means = self._drafts(x, n, lengths, noise, L)
        out = self._check(x, n, lengths, live, noise, window, states, draft_means)
        return self._reattach_state(self._observe_learn_flags(out, n, lengths, live), originals)

    def _check_program(self, x, n, lengths, live, noise, window_steps, states, draft_means):
        """The eager-drafter fallback's compiled part: the target call, verification and commit values."""
        setup = self.engine.setup
        window = window_of(setup.tables, self._safe_steps(n), window_steps.shape[1] - 1, len(setup.shape))
        return self._check(x, n, lengths, live, noise, window, states, draft_means)

    def _plain_program(self, x, n, lengths, live, chain_rounds, noise_tensors):
        engine, originals = self.engine, self._detach_state()
        result, verification = engine._plain_round(engine.pool.all_slots, x, self._safe_steps(n),
                                                   self._draw(noise_tensors, chain_rounds, 0).xi)
        out = self._outcome(x, n, live, result, result.next_state, verification)
        return self._reattach_state(self._observe_learn_flags(out, n, lengths, live), originals)

    # --- what the engine calls ---------------------------------------------------------------------
    def run(self, x, n, lengths, live, chain_rounds, noise_tensors, L: int, plain: bool) -> dict:
        """One round on every slot: the commit values, the record's tensors and (with a capturable policy)
        the next windows and the host read's flags."""
        target = self.engine.target
        target.traced_rows = ()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous round's outputs have been consumed
        args = (x, n, lengths, live, chain_rounds, noise_tensors)
        if plain:
            out = self.clock.call(self._plain, *args)
        elif self.drafter_eager:
            out = self._eager_drafter_round(*args, L)
        else:
            try:
                out = self.clock.call(self._whole, *args, L)
            except torch._dynamo.exc.TorchDynamoException as err:  # raised while tracing: nothing ran
                self.drafter_eager = True
                out = self._eager_drafter_round(*args, L)  # raises if the rest cannot be captured either
                self._warn_eager_drafter(err)
        target.count_traced()
        if "round_state" in out:
            self._write_back_state(out.pop("round_state"))
        if self.cuda_graphs:  # what the engine keeps must not live in the CUDA graphs' memory pool
            out.update({key: out[key].clone() for key in _KEPT if key in out})
        return out

    def _warn_eager_drafter(self, err) -> None:
        name = self.engine.drafter.describe()
        if name not in _EAGER_DRAFTERS_WARNED:
            _EAGER_DRAFTERS_WARNED.add(name)
            warnings.warn(f"compile: the drafter {name} could not be captured in the round's graph "
                          f"({_first_line(err)}); it runs eagerly around a compiled evaluate-verify graph",
                          stacklevel=4)

    def _eager_drafter_round(self, x, n, lengths, live, chain_rounds, noise_tensors, L: int) -> dict:
        engine = self.engine
        noise = self._draw(noise_tensors, chain_rounds, L)
        window, states, draft_means = self._drafts(x, n, lengths, noise, L)
        try:
            out = self.clock.call(self._check_only, x, n, lengths, live, noise, window.steps, states, draft_means)
        except torch._dynamo.exc.TorchDynamoException as err:
            raise RuntimeError(
                f"compile: the round's evaluation and verification could not be captured in one graph "
                f"({_first_line(err)}): the target network or the verifier breaks the graph; sample with "
                "compile=False, or make that code capturable"
            ) from err
        engine.drafter.observe(engine.pool.all_slots, out["verification"])
        return out

