"""Noise drawn ahead is consumed once, with the value its (seed, counter) key gives, however it is buffered.

Both samplers draw their noise ahead in batched hashes (`noise.step_noise_blocks`, the speculative
sampler's round buffer) and refill when it runs out. With the default buffer (2**22 values) the
exactness tests never refill, so a refill that reused a block, a round or a position would make
samples wrong in law while every short-run statistic looked fine. Here the buffer is shrunk with
`noise_buffer=` so that chains refill every round or every few rounds, chains are admitted mid-run,
and:
- every noise value a chain consumes is recorded from outside the sampler (a verifier sees the
  round's noise, a drafter sees which chain each row is) and compared with the public
  `noise.gaussian` / `noise.uniform` of its key (seed, round << 16 | position, stream);
- samples and counters are bit-identical whatever the buffer size.
The laws under tiny buffers are checked in test_speculative_exactness.py and test_exactness_power.py.
"""
import math

import pytest
import torch

from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.noise import Stream, gaussian, step_noise_blocks, uniform
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FreeDrafter, FrozenTargetDrafter, speculative_sample
from specdiff_train.speculative.verify import verify_block, verify_tokenwise
from specdiff_train.speculative.windows import WindowPolicy
from specdiff_train.testing import GaussianDataDenoiser

NUM_STEPS = 20
SHAPE = (2,)
SEEDS = list(range(1000, 1040))  # not 0..n-1: a seed mixed up with its index would show


@pytest.fixture(scope="module")
def chain():
    schedule = DDPMSchedule(1000)
    return schedule, GaussianDataDenoiser(schedule, torch.tensor([1.5, -1.0]), 0.05)


def round_buffer(batch_size: int, window: int, rounds_ahead: int) -> int:
    """`noise_buffer` that makes the speculative sampler draw exactly `rounds_ahead` rounds per refill."""
    return rounds_ahead * batch_size * (window + 1) * math.prod(SHAPE)


# --- ancestral sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("steps_per_block", [1, 3, 7, 100])
def test_step_noise_blocks_give_each_step_its_own_key(steps_per_block):
    seeds = torch.tensor(SEEDS[:5])
    num_steps = 19  # not a multiple of the block: the last block is short
    blocks = step_noise_blocks(seeds, SHAPE, num_steps, max_elements=steps_per_block * len(seeds) * 2)
    drawn = list(blocks)
    assert len(drawn) == num_steps
    for k, z in enumerate(drawn):
        assert torch.equal(z, gaussian(seeds, k, Stream.STEP, SHAPE)), f"step {k}"
    flat = torch.stack(drawn).reshape(-1)
    assert len(flat.unique()) == len(flat)  # no step, seed or element drawn twice


@pytest.mark.parametrize("noise_buffer", [1, 2 * 7 * 3])  # one step per refill; three steps per refill
def test_ancestral_samples_do_not_depend_on_the_noise_buffer(chain, noise_buffer):
    schedule, model = chain
    kwargs = dict(num_steps=NUM_STEPS, seeds=SEEDS, batch_size=7)
    reference = ancestral_sample(model, schedule, SHAPE, **kwargs)
    assert torch.equal(ancestral_sample(model, schedule, SHAPE, noise_buffer=noise_buffer, **kwargs), reference)


# --- speculative sampling -----------------------------------------------------------------------

class NoiseLedger:
    """Records, per chain and round of that chain, the noise the round used: a verifier that sees the
    round's noise and a drafter that knows which seed occupies each slot (seeds are admitted in order)."""

    def __init__(self, verify):
        self.verify = verify
        self.round_noise = None
        self.records = []  # (seed index, chain round, draft noise (L, d), xi (d,), accept u (L,), residual u)
        self.__name__ = "ledger"

    def __call__(self, noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi, residual_u,
                 **kwargs):
        self.round_noise = (noise, xi, accept_u, residual_u)
        return self.verify(noise, states, draft_means, target_means, stds, lengths, has_next, accept_u, xi,
                           residual_u, **kwargs)

    def drafter(self, base: type, **options):
        ledger = self

        class LedgerDrafter(base):
            def bind(self, context):
                super().bind(context)
                self.slot_seed, self.slot_round, self.admitted = [-1] * context.capacity, [0] * context.capacity, 0

            def join(self, slots):
                super().join(slots)
                for slot in slots.tolist():
                    self.slot_seed[slot], self.slot_round[slot] = self.admitted, 0
                    self.admitted += 1

            def observe(self, slots, verification):
                super().observe(slots, verification)
                noise, xi, accept_u, residual_u = ledger.round_noise
                for row, slot in enumerate(slots.tolist()):
                    ledger.records.append((self.slot_seed[slot], self.slot_round[slot], noise[row], xi[row],
                                           accept_u[row], residual_u[row]))
                    self.slot_round[slot] += 1

        return LedgerDrafter(**options)


def expected_round_noise(seed: int, chain_round: int, window: int):
    """What round `chain_round` of the chain with `seed` must use, from the public per-key draws."""
    seeds, base = torch.tensor([seed]), chain_round << 16
    draft = torch.cat([gaussian(seeds, base | (i + 1), Stream.DRAFT, SHAPE) for i in range(window)])
    xi = gaussian(seeds, base, Stream.CORRECTION, SHAPE)[0]
    accept = uniform(seeds, base, Stream.ACCEPT, (window,))[0]
    residual = uniform(seeds, base, Stream.RESIDUAL_U, (1,))[0, 0]
    return draft, xi, accept, residual


@pytest.mark.parametrize("rounds_ahead", [1, 3])
@pytest.mark.parametrize("refill", [True, False])
@pytest.mark.parametrize("drafter", [FreeDrafter, FrozenTargetDrafter])
def test_every_round_uses_the_noise_of_its_own_key_once(chain, rounds_ahead, refill, drafter):
    schedule, model = chain
    window, batch_size = 4, 7
    ledger = NoiseLedger(verify_block)
    result = speculative_sample(model, schedule, SHAPE, num_steps=NUM_STEPS, seeds=SEEDS, batch_size=batch_size,
                                refill=refill, drafter=ledger.drafter(drafter, freeze="x0"), window=window,
                                verifier=ledger, noise_buffer=round_buffer(batch_size, window, rounds_ahead))
    rounds = {}
    for seed_index, chain_round, draft, xi, accept, residual in ledger.records:
        rounds.setdefault(seed_index, []).append(chain_round)
        want = expected_round_noise(SEEDS[seed_index], chain_round, window)
        L = draft.shape[0]  # the round's padded window: shorter at the end of the chains
        where = f"seed {SEEDS[seed_index]}, round {chain_round}"
        assert torch.equal(draft.reshape(L, *SHAPE), want[0][:L].to(draft.dtype)), where
        assert torch.equal(xi, want[1].to(xi.dtype)), where
        assert torch.equal(accept, want[2][:L].to(accept.dtype)), where
        assert torch.equal(residual, want[3].to(residual.dtype)), where
    # every chain ran, each of its rounds once, as many as the sampler counted
    assert sorted(rounds) == list(range(len(SEEDS)))
    per_sample = result.stats["rounds_per_sample"] * len(SEEDS)
    assert sum(len(r) for r in rounds.values()) == pytest.approx(per_sample)
    assert max(len(r) for r in rounds.values()) > rounds_ahead  # the buffer ran out, so it was refilled
    # no draft noise drawn twice, across chains, rounds and positions
    drafts = torch.cat([draft.reshape(-1, *SHAPE) for _, _, draft, *_ in ledger.records])
    assert len(drafts[:, 0].unique()) == len(drafts)


@pytest.mark.parametrize("verifier", [dict(verifier="block"), dict(verifier="tokenwise", correction="reflection"),
                                      dict(verifier="tokenwise", correction="residual")])
@pytest.mark.parametrize("drafter", [FreeDrafter, FrozenTargetDrafter])
def test_speculative_samples_do_not_depend_on_the_noise_buffer(chain, verifier, drafter):
    schedule, model = chain
    window, batch_size = 3, 7
    runs = {}
    for ahead in (1, 2, 64):
        for refill in (True, False):
            result = speculative_sample(model, schedule, SHAPE, num_steps=NUM_STEPS, seeds=SEEDS, drafter=drafter("eps"),
                                        window=window, batch_size=batch_size, refill=refill,
                                        noise_buffer=round_buffer(batch_size, window, ahead), **verifier)
            runs[ahead, refill] = result
    reference = runs[64, True]
    for key, result in runs.items():
        assert torch.equal(result.samples, reference.samples), key
        assert result.stats["target_calls_per_sample"] == reference.stats["target_calls_per_sample"], key
        assert result.stats["accepted_per_step"] == reference.stats["accepted_per_step"], key


def test_bad_noise_buffer_is_refused(chain):
    schedule, model = chain
    with pytest.raises(ValueError, match="noise_buffer"):
        ancestral_sample(model, schedule, SHAPE, num_steps=5, seeds=[0], noise_buffer=0)
    with pytest.raises(ValueError, match="noise_buffer"):
        speculative_sample(model, schedule, SHAPE, num_steps=5, seeds=[0], drafter=FreeDrafter(), noise_buffer=2.5)


def test_tokenwise_ledger_sees_the_same_keys(chain):
    """The token-wise verifier is handed the same per-key noise (one run, one refill per round)."""
    schedule, model = chain
    ledger = NoiseLedger(verify_tokenwise)
    speculative_sample(model, schedule, SHAPE, num_steps=NUM_STEPS, seeds=SEEDS[:9], batch_size=4, window=5,
                       drafter=ledger.drafter(FreeDrafter, freeze="eps"), verifier=ledger,
                       noise_buffer=round_buffer(4, 5, 1))
    for seed_index, chain_round, draft, xi, accept, residual in ledger.records:
        want = expected_round_noise(SEEDS[seed_index], chain_round, 5)
        L = draft.shape[0]
        assert torch.equal(draft.reshape(L, *SHAPE), want[0][:L]) and torch.equal(accept, want[2][:L])


class GrowingWindow(WindowPolicy):
    """Windows 1, 1, 2, 2, 3, 3, 4, ... (every chain), from a noise buffer that starts one draft wide:
    the engine widens the buffer as the windows grow (as it does for `window="auto"`)."""

    def start(self, plan, capacity, device):
        super().start(plan, capacity, device)
        self.rounds = 0
        return 4

    def noise_window(self) -> int:
        return 1

    def learn(self, slots, steps, lengths, accepted):
        self.rounds += 1

    def windows(self, slots, steps, ready):
        return self.steps_left(steps).clamp(min=0, max=min(4, 1 + self.rounds // 2)) * ready


@pytest.mark.parametrize("rounds_ahead", [1, 64])
def test_a_widened_noise_buffer_gives_every_round_its_own_keys(chain, rounds_ahead):
    schedule, model = chain
    ledger = NoiseLedger(verify_block)
    result = speculative_sample(model, schedule, SHAPE, num_steps=NUM_STEPS, seeds=SEEDS, batch_size=7,
                                drafter=ledger.drafter(FreeDrafter, freeze="x0"), window=GrowingWindow(),
                                verifier=ledger, noise_buffer=round_buffer(7, 4, rounds_ahead))
    widths = set()
    for seed_index, chain_round, draft, xi, accept, residual in ledger.records:
        want = expected_round_noise(SEEDS[seed_index], chain_round, 4)
        L = draft.shape[0]
        widths.add(L)
        where = f"seed {SEEDS[seed_index]}, round {chain_round}"
        assert torch.equal(draft.reshape(L, *SHAPE), want[0][:L].to(draft.dtype)), where
        assert torch.equal(xi, want[1].to(xi.dtype)) and torch.equal(accept, want[2][:L].to(accept.dtype)), where
        assert torch.equal(residual, want[3].to(residual.dtype)), where
    assert {1, 2, 4} <= widths  # the buffer was widened twice
    reference = speculative_sample(model, schedule, SHAPE, num_steps=NUM_STEPS, seeds=SEEDS, batch_size=7,
                                   drafter=FreeDrafter("x0"), window=GrowingWindow())
    assert torch.equal(result.samples, reference.samples)  # the same samples whatever the buffer's history
