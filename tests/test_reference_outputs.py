"""Samples and call counts stay bit-identical across refactors of the sampling engine.

`tests/data/reference_outputs.json` holds, for every shipped drafter x verifier x window on the shipped
toy2d and digits targets (and ancestral sampling), a hash of the samples' bytes and the exact call
counts, recorded from the code before the engine was rebuilt (issue 16):

    PYTHONPATH=<checkout of the older commit> python tests/test_reference_outputs.py --record

A refactor must reproduce them bit for bit. Floating-point results can differ between CPU kernels,
so the comparison runs only on the torch version and CPU capability the file was recorded with
(skipped elsewhere, with the reason; re-record from the older commit on the new machine).
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "reference_outputs.json"
VERIFIERS = {"block": dict(verifier="block"), "tokenwise-reflection": dict(verifier="tokenwise"),
             "tokenwise-residual": dict(verifier="tokenwise", correction="residual")}
WINDOWS = (3, 8)
NUM_STEPS = 20
SEEDS = list(range(11))
BATCH_SIZE = 4  # fewer slots than seeds: chains are retired and admitted mid-run


def machine() -> dict:
    return dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability())


def drafters(target: str) -> dict:
    from specdiff_train.speculative import DraftNetworkDrafter, MedusaDrafter
    from specdiff_train.drafters import training_free_drafters

    learned = {"draftnet": lambda: DraftNetworkDrafter(str(ROOT / "checkpoints" / target / "draftnet.ckpt")),
               "medusa": lambda: MedusaDrafter(str(ROOT / "checkpoints" / target / "medusa.ckpt"))}
    return training_free_drafters() | learned


def digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def outputs(target_name: str) -> dict:
    """{method: [sample hash, calls per sample, rounds, target rows, drafted per step, accepted per step]}."""
    from specdiff_train.models import load_target
    from specdiff_train.sampling import ancestral_sample
    from specdiff_train.speculative import speculative_sample

    torch.set_num_threads(1)
    target = load_target(str(ROOT / "checkpoints" / target_name / "target.ckpt"))
    shape = tuple(target.sample_shape)
    out = {"ancestral": [digest(ancestral_sample(target, target.schedule, shape, num_steps=NUM_STEPS, seeds=SEEDS,
                                                 batch_size=BATCH_SIZE))]}
    for name, make in drafters(target_name).items():
        for verifier, options in VERIFIERS.items():
            for window in WINDOWS:
                result = speculative_sample(target, target.schedule, shape, num_steps=NUM_STEPS, seeds=SEEDS,
                                            drafter=make(), window=window, batch_size=BATCH_SIZE, **options)
                s = result.stats
                out[f"{name}/{verifier}/w{window}"] = [
                    digest(result.samples), s["target_calls_per_sample"], s["rounds"], s["target_rows"],
                    list(s["drafted_per_step"]), list(s["accepted_per_step"])]
    return out


def record() -> None:
    """Write the reference file: one line per method, so that a diff shows which changed."""
    targets = {t: outputs(t) for t in ("toy2d", "digits")}
    lines = [f'{{"machine": {json.dumps(machine())}, "outputs": {{']
    for i, (target, methods) in enumerate(targets.items()):
        rows = [f"  {json.dumps(m)}: {json.dumps(v)}" for m, v in methods.items()]
        lines.append(f' {json.dumps(target)}: {{\n' + ",\n".join(rows) + "}" + ("," if i < len(targets) - 1 else ""))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text("\n".join(lines) + "}}\n")


@pytest.fixture(scope="module")
def reference() -> dict:
    recorded = json.loads(REFERENCE.read_text())
    if recorded["machine"] != machine():
        pytest.skip(f"reference outputs were recorded with {recorded['machine']}, this is {machine()}: floating-point "
                    "kernels may round differently; re-record them from the commit before the change")
    return recorded["outputs"]


@pytest.mark.parametrize("target", ["toy2d", "digits"])
def test_samples_and_counts_are_those_recorded_before_the_engine_rebuild(reference, target):
    now, then = outputs(target), reference[target]
    assert now.keys() == then.keys()
    differ = [method for method in then if now[method] != then[method]]
    assert not differ, {m: (then[m][:4], now[m][:4]) for m in differ[:5]}


if __name__ == "__main__" and "--record" in sys.argv:
    record()
