"""A drafter from a module outside the package (the README's example) plugs in by class_path."""
import sys
from pathlib import Path

import torch

from helpers import ROOT, offline_env, run_train
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.speculative import speculative_sample
from specdiff_train.testing import GaussianDataDenoiser, closed_form_marginal, marginal_test

EXTERNAL = Path(__file__).parent / "external_drafter"


def test_readme_drafter_is_exact():
    sys.path.insert(0, str(EXTERNAL))
    try:
        from my_drafters import DampedFreeDrafter
    finally:
        sys.path.remove(str(EXTERNAL))
    schedule = DDPMSchedule(1000)
    mean = torch.tensor([1.5, -1.0])
    model = GaussianDataDenoiser(schedule, mean, 0.05)
    out = speculative_sample(model, schedule, (2,), num_steps=20, seeds=range(10_000),
                             drafter=DampedFreeDrafter(0.9), window=4)
    mu, var = closed_form_marginal(schedule, 20, mean, 0.05)
    report = marginal_test(out.samples, mu.expand(2), var.expand(2))
    assert report["ks_p"] > 1e-4 and report["mean_z"] < 4.5 and report["var_z"] < 4.5, report
    assert out.stats["target_calls_per_sample"] < 20


def test_external_drafter_by_class_path_in_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(EXTERNAL))
    config = tmp_path / "eval.yaml"
    config.write_text(
        "drafters:\n  - free-x0\n  - class_path: my_drafters.DampedFreeDrafter\n    init_args: {damping: 0.95}\n"
        "verifiers: [block]\nwindows: [4]\nnum_steps: [30]\nnum_samples: 200\nnum_permutations: 100\n"
    )
    proc = run_train("evaluate", "--config", "configs/target/toy2d.yaml", "--config", config,
                     "--ckpt_path", ROOT / "checkpoints" / "toy2d" / "target.ckpt", "--trainer.logger", "false",
                     "--out_dir", tmp_path / "out")
    assert "DampedFreeDrafter/block/w4" in proc.stdout


def test_an_unimportable_drafter_package_says_how_to_make_it_importable(tmp_path):
    """Without PYTHONPATH the YAML route fails at parse time: the last line names the class, the
    missing module and both fixes (install the package, or put it on PYTHONPATH)."""
    config = tmp_path / "eval.yaml"
    config.write_text("drafters:\n  - class_path: my_drafters.DampedFreeDrafter\n    init_args: {damping: 0.95}\n")
    proc = run_train("evaluate", "--config", "configs/target/toy2d.yaml", "--config", config,
                     "--ckpt_path", ROOT / "checkpoints" / "toy2d" / "target.ckpt", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "drafters: cannot import 'my_drafters.DampedFreeDrafter': No module named 'my_drafters'" in last
    assert "pip install -e" in last and "PYTHONPATH" in last


def test_readme_example_is_the_tested_file():
    """The README's drafter example is the code these tests load, line for line."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("# my_package/drafters.py\n") + len("# my_package/drafters.py\n")
    example = readme[start:readme.index("```", start)].strip()
    tested = (ROOT / "tests" / "external_drafter" / "my_drafters.py").read_text()
    body = tested[tested.index("import torch"):].strip()
    assert example == body

