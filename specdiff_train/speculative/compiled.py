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
- the round's window is padded to one of the policy's `compiled_widths()` (the longest window for a
  fixed window; powers of two for adaptive ones): padded drafts are never used, so the samples are the
  same (noise is keyed by position);
- no compaction (evaluation of all rows, corrections for all chains): data-dependent shapes are host reads;
- the correction is computed in every round rather than only when the host read says a chain needs one.

One graph per (capacity, padded window) and per plain round; dynamo caches them across calls with the same
model, drafter and shapes. A drafter whose hooks cannot be captured is run eagerly around a compiled
evaluate-verify graph, with a one-time warning naming it.
"""
from __future__ import annotations

import warnings

import torch

from ..compiling import CompileClock, compile_graphs, uses_cuda_graphs
from ..drafters.base import Verification
from .verify import RoundOutcome
from .engine import RoundNoiseDraw, evaluate, evaluate_plain, host_flags, window_of

_EAGER_DRAFTERS_WARNED: set[str] = set()
_KEPT = ("next_state", "new_step", "rounds", "next_lengths", "accepted", "advanced", "finished")  # outlive the round


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class CompiledRounds:
    """The compiled round programs of one `RoundEngine` (see the module docstring)."""

    def __init__(self, engine, mode: str):
        self.engine, self.mode = engine, mode
        self.clock = CompileClock()
        self.capturable_policy = bool(getattr(engine.policy, "capturable", False))
        self._whole = compile_graphs(self._speculative_program, mode)
        self._plain = compile_graphs(self._plain_program, mode)
        self._verify_only = compile_graphs(self._verify_program, mode)
        self.cuda_graphs = uses_cuda_graphs(mode) and engine.pool.all_slots.device.type == "cuda"
        self.drafter_eager = False

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
        return g[:, :L].reshape(len(rows), L, *shape), g[:, W], u[:, :L], u[:, W]

    def _safe_steps(self, n):
        return n.clamp(max=self.engine.setup.plan.num_steps - 1)  # a finished chain's slot

    def _draft_part(self, x, n, lengths, draft_noise, L: int):
        engine = self.engine
        window = window_of(engine.setup.tables, self._safe_steps(n), L, len(engine.setup.shape))
        states, draft_means = engine._draft(engine.pool.all_slots, x, self._safe_steps(n), window, lengths,
                                            draft_noise)
        return window, states, draft_means

    def _verify_part(self, x, n, lengths, live, noise, window, states, draft_means):
        engine, setup = self.engine, self.engine.setup
        safe = self._safe_steps(n)
        evaluated, has_next = engine._rows_to_evaluate(safe, lengths, window.length)
        out, features, x0, target_means = evaluate(engine.target, window, states, evaluated,
                                                   engine.drafter.wants_features, setup.schedule)
        result = engine._verify(RoundNoiseDraw(*noise), window, states, draft_means,
                                target_means, lengths, has_next)
        verification = Verification(states=states, steps=safe, outputs=out, features=features, evaluated=evaluated,
                                    accepted=result.accepted, denoised=x0, means=target_means)
        return self._outcome(x, n, lengths, live, result, result.settle(True), verification)

    def _outcome(self, x, n, lengths, live, result, next_state, verification):
        """Commit values for every slot (a finished chain's slot keeps its state), and the host read's flags."""
        engine = self.engine
        advanced = result.advanced * live
        new_step = n + advanced
        finished = live & (new_step >= engine.setup.plan.num_steps)
        next_state = torch.where(live.unsqueeze(-1), next_state.reshape(len(x), -1).to(x.dtype), x.reshape(len(x), -1))
        needs = result.needs_correction
        return dict(accepted=result.accepted * live, advanced=advanced, new_step=new_step, finished=finished,
                    next_state=next_state.reshape(x.shape), rounds=engine.pool.rounds + live,
                    needs_correction=None if needs is None else needs & live, verification=verification)

    def _learn_and_flags(self, out, n, lengths, live):
        """The policy's learning and next windows (when it can be captured) and the host read's flags."""
        engine = self.engine
        slots = engine.pool.all_slots
        if self.capturable_policy:
            engine.policy.learn(slots, n, lengths, out["accepted"])
            out["next_lengths"] = engine._windows(slots, self._safe_steps(out["new_step"])) * live
            out["flags"] = host_flags(out["finished"], out["next_lengths"], out["advanced"], out["needs_correction"])
        return out

    def _speculative_program(self, x, n, lengths, live, chain_rounds, noise_tensors, L: int):
        noise = self._draw(noise_tensors, chain_rounds, L)
        window, states, draft_means = self._draft_part(x, n, lengths, noise[0], L)
        out = self._verify_part(x, n, lengths, live, noise, window, states, draft_means)
        self.engine.drafter.observe(self.engine.pool.all_slots, out["verification"])
        return self._learn_and_flags(out, n, lengths, live)

    def _verify_program(self, x, n, lengths, live, noise, window_steps, states, draft_means):
        """The eager-drafter fallback's compiled part: evaluation, verification, commit values."""
        setup = self.engine.setup
        window = window_of(setup.tables, self._safe_steps(n), window_steps.shape[1] - 1, len(setup.shape))
        return self._verify_part(x, n, lengths, live, noise, window, states, draft_means)

    def _plain_program(self, x, n, lengths, live, chain_rounds, noise_tensors):
        engine, setup = self.engine, self.engine.setup
        _, xi, _, _ = self._draw(noise_tensors, chain_rounds, 0)
        safe = self._safe_steps(n)
        out, features, x0, mean, std = evaluate_plain(engine.target, setup.tables, x, safe,
                                                      engine.drafter.wants_features, setup.schedule)
        C = len(x)
        next_state = torch.addcmul(mean.reshape(C, -1), std.to(xi.dtype).unsqueeze(-1), xi)
        zeros = n * 0
        result = RoundOutcome(accepted=zeros, next_state=next_state, advanced=zeros + 1)
        unsqueeze = lambda v: None if v is None else v.unsqueeze(1)  # noqa: E731
        verification = Verification(states=x.unsqueeze(1), steps=safe, outputs=out.unsqueeze(1),
                                    features=unsqueeze(features), evaluated=live.unsqueeze(1), accepted=zeros,
                                    denoised=x0.unsqueeze(1), means=mean.unsqueeze(1))
        out = self._outcome(x, n, lengths, live, result, next_state, verification)
        engine.drafter.observe(engine.pool.all_slots, verification)
        return self._learn_and_flags(out, n, lengths, live)

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
        if self.cuda_graphs:  # what the engine keeps must not live in the CUDA graphs' memory pool
            out.update({key: out[key].clone() for key in _KEPT if key in out})
        return out

    def _warn_eager_drafter(self, err) -> None:
        name = self.engine.drafter.describe()
        if name not in _EAGER_DRAFTERS_WARNED:
            _EAGER_DRAFTERS_WARNED.add(name)
            warnings.warn(f"compile: the drafter {name} could not be captured in the round's graph ({_first_line(err)}); "
                          "it runs eagerly around a compiled evaluate-verify graph", stacklevel=4)

    def _eager_drafter_round(self, x, n, lengths, live, chain_rounds, noise_tensors, L: int) -> dict:
        engine = self.engine
        noise = self._draw(noise_tensors, chain_rounds, L)
        window, states, draft_means = self._draft_part(x, n, lengths, noise[0], L)
        try:
            out = self.clock.call(self._verify_only, x, n, lengths, live, noise, window.steps, states, draft_means)
        except torch._dynamo.exc.TorchDynamoException as err:
            raise RuntimeError(
                f"compile: the round's evaluation and verification could not be captured in one graph "
                f"({_first_line(err)}): the target network or the verifier breaks the graph; sample with "
                "compile=False, or make that code capturable"
            ) from err
        engine.drafter.observe(engine.pool.all_slots, out["verification"])
        return out

