"""`train.py` end to end in subprocesses: a smoke `fit` per local-data config, resume from
last.ckpt (step, optimizer and EMA state intact), `validate` and `test` on a checkpoint, a refused
config change on resume, and (slow) a 2-process CPU DDP fit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import ROOT, find_one, load_ckpt, offline_env, run_train

LOCAL_DATASETS = {"toy2d", "digits"}  # hub configs cannot download here: test_configs instantiates them
TARGETS = sorted((ROOT / "configs" / "target").glob("*.yaml"))
LOCAL = [p for p in TARGETS if yaml.safe_load(p.read_text())["data"]["init_args"]["dataset"] in LOCAL_DATASETS]
TOY = ROOT / "configs" / "target" / "toy2d.yaml"


def tiny(root, steps: int, *extra: str) -> list[str]:
    """Overrides that make any target config run in seconds, with one validation (and plot) at `steps`."""
    return [f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--model.init_args.val_num_samples=8", "--model.init_args.val_num_steps=4",
            f"--data.init_args.cache_dir={root}/data", *extra]


def small_toy(root, steps: int, *extra: str) -> list[str]:
    return ["--config", str(TOY), *tiny(root, steps, "--data.init_args.num_samples=2048",
                                        "--data.init_args.batch_size=64", *extra)]


def test_local_configs_exist():
    assert {p.stem for p in LOCAL} >= {"toy2d", "digits"}


@pytest.mark.parametrize("config", LOCAL, ids=lambda p: p.stem)
def test_fit_smoke(config, tmp_path):
    run_train("fit", "--config", config, *tiny(tmp_path, 3))
    last = find_one(tmp_path, "last.ckpt")
    assert load_ckpt(last)["global_step"] == 3
    assert find_one(tmp_path, "samples/epoch=*-step=000003.png").stat().st_size > 0
    saved = yaml.safe_load(find_one(tmp_path, "config.yaml").read_text())  # the run's record
    assert saved["model"]["class_path"].endswith("TargetDiffusion") and saved["trainer"]["max_steps"] == 3
    # --trainer.max_steps on the command line sets the LR schedule's length: at the run's end the LR
    # is the schedule's final value (with a fixed T_max of 3000 it would still be near the start value).
    eta_min = saved["model"]["init_args"]["lr_scheduler"]["init_args"]["eta_min"]
    assert load_ckpt(last)["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(eta_min)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    run_train("fit", *small_toy(root, 4))
    return find_one(root, "last.ckpt")


def _adam_steps(ckpt) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def test_resume_continues_step_optimizer_and_ema(first_run, tmp_path):
    first = load_ckpt(first_run)
    assert first["global_step"] == 4 and _adam_steps(first) == {4}
    assert int(first["averaging_state"]["n_averaged"]) == 4
    run_train("fit", *small_toy(tmp_path, 7), f"--ckpt_path={first_run}")
    resumed = load_ckpt(find_one(tmp_path, "last.ckpt"))
    assert resumed["global_step"] == 7
    assert _adam_steps(resumed) == {7}  # Adam moments continued, not restarted (would be 3)
    assert int(resumed["averaging_state"]["n_averaged"]) == 7  # the EMA continued, not re-initialised
    assert resumed["lr_schedulers"][0]["last_epoch"] == 7
    ema, raw = resumed["state_dict"], resumed["current_model_state"]
    assert set(ema) == set(raw) and any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert any(not torch.equal(ema[k], first["state_dict"][k]) for k in ema)


def test_validate_and_test_a_checkpoint(first_run, tmp_path):
    out = run_train("validate", "--config", TOY, *tiny(tmp_path / "validate", 1), f"--ckpt_path={first_run}")
    assert "val/loss" in out.stdout
    assert find_one(tmp_path, "samples/epoch=*-step=000004.png")  # named after the checkpoint's step
    out = run_train("test", "--config", TOY, *tiny(tmp_path / "test", 1), f"--ckpt_path={first_run}")
    assert "test/loss" in out.stdout


def test_resume_refuses_another_network(first_run, tmp_path):
    hidden = yaml.safe_load(TOY.read_text())["model"]["init_args"]["net"]["init_args"]["hidden"]
    out = run_train("fit", *small_toy(tmp_path, 6), f"--ckpt_path={first_run}",
                    f"--model.init_args.net.init_args.hidden={2 * hidden}", check=False)
    assert out.returncode != 0
    assert (f"holds a different model than the config: model.init_args.net.init_args.hidden: {hidden} in the "
            f"checkpoint, {2 * hidden} here") in out.stderr


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_in_the_same_run(tmp_path):
    """SIGINT in the middle of training, long before any scheduled checkpoint, writes last.ckpt at the
    step reached; `fit --ckpt_path .../last.ckpt` continues from that step in the same version_0
    directory, with a resumable data order (no "not resumable" warning), the LR schedule over the new
    max_steps and last.ckpt at its final step although no validation falls there."""
    args = [sys.executable, str(ROOT / "train.py"), "fit", *small_toy(tmp_path, 100_000)]
    env = dict(offline_env(), PYTHONWARNINGS="default")
    with subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as popen:
        deadline = time.monotonic() + 240
        while not list(tmp_path.rglob("events.out.tfevents*")) and time.monotonic() < deadline and popen.poll() is None:
            time.sleep(0.2)
        time.sleep(3.0)  # training steps, no validation or checkpoint before step 100 000
        assert not list(tmp_path.rglob("*.ckpt"))
        os.kill(popen.pid, signal.SIGINT)
        try:
            output, _ = popen.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            raise
    assert popen.returncode == 1, output[-3000:]
    assert "Ctrl-C: stopping after this training step" in output and "Interrupted at step" in output
    last = find_one(tmp_path, "last.ckpt")
    assert last.parent.parent.name == "version_0"
    stopped = load_ckpt(last)["global_step"]
    assert stopped > 0, output[-3000:]

    # No validation before the end: last.ckpt at the final step comes from RunCheckpoint.on_train_end.
    proc = run_train("fit", *small_toy(tmp_path, stopped + 7), "--trainer.val_check_interval=100000",
                     f"--ckpt_path={last}", env={"PYTHONWARNINGS": "default"})
    output = proc.stdout + proc.stderr
    assert "not resumable" not in output, output[-3000:]
    assert f"continue in {last.parent.parent}" in output
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    resumed = load_ckpt(last)
    assert resumed["global_step"] == stopped + 7
    eta_min = yaml.safe_load(TOY.read_text())["model"]["init_args"]["lr_scheduler"]["init_args"]["eta_min"]
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(eta_min)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run_train("fit", "--config", ROOT / "configs" / "trainer" / "ddp_cpu.yaml", *small_toy(tmp_path, 4), timeout=600)
    last = load_ckpt(find_one(tmp_path, "last.ckpt"))
    assert last["global_step"] == 4
    assert int(last["averaging_state"]["n_averaged"]) == 4
    assert len(list(tmp_path.rglob("samples/*.png"))) == 1  # rank 0 only


def _yaml_with(tmp_path, old: str, new: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(TOY.read_text().replace(old, new, 1))
    return str(path)


ERRORS = {  # case -> (arguments after the verb, what the last line of output must say)
    "toy name": (["--config", TOY, "--data.init_args.name", "8gausians"],
                 ["data.name: unknown toy distribution '8gausians'", "Did you mean '8gaussians'?", "swissroll"]),
    "yaml key": ([], ["data.init_args.batch_sise: DiffusionDataModule has no option 'batch_sise'",
                      "Did you mean 'batch_size'?"]),
    "negative max_steps": (["--config", TOY, "--trainer.max_steps", "-5"],
                           ["trainer: `max_steps` must be a non-negative integer or -1", "-5"]),
    "cli key": (["--config", TOY, "--trainer.max_stepz", "4"], ["--trainer.max_stepz", "'--trainer.max_steps'"]),
    "dataset name": ([], ["data.dataset: unknown dataset 'toy3d'.", "Did you mean 'toy2d'?"]),
    "truncated checkpoint": ([], ["could not be read as a torch file", "truncated"]),
    "drafter as target": (["--config", TOY, "--ckpt_path", "checkpoints/toy2d/draftnet.ckpt"],
                          ["is a draft-network checkpoint", "Give `fit` a target checkpoint",
                           "class_path: specdiff_train.speculative.DraftNetworkDrafter"]),
    "schedule value": (["--config", TOY, "--model.init_args.schedule.init_args.beta_schedule", "cosin"],
                       ["schedule.beta_schedule", "got 'cosin'", "Did you mean 'cosine'?"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_end_with_the_field_the_value_and_the_fix(case, tmp_path):
    args, expected = ERRORS[case]
    if case == "yaml key":
        args = ["--config", _yaml_with(tmp_path, "batch_size: 512", "batch_sise: 512")]
    elif case == "dataset name":
        args = ["--config", _yaml_with(tmp_path, "dataset: toy2d", "dataset: toy3d")]
    elif case == "truncated checkpoint":
        truncated = tmp_path / "last.ckpt"
        truncated.write_bytes((ROOT / "checkpoints" / "toy2d" / "target.ckpt").read_bytes()[:50_000])
        args = ["--config", TOY, "--ckpt_path", truncated]
        expected = [*expected, str(truncated)]
    proc = run_train("fit", *args, f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(part in last for part in expected), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) < 8, proc.stderr[-3000:]


def test_only_errors_meant_for_the_user_are_shortened():
    """Errors this package raises on purpose (and Lightning's MisconfigurationException) become one
    message; anything else, e.g. an error inside torch, keeps its traceback."""
    from specdiff_train.data import DiffusionDataModule
    from specdiff_train.errors import user_message

    with pytest.raises(ValueError) as ours:
        DiffusionDataModule(batch_size=0)
    assert user_message(ours.value) == "data.batch_size: expected >= 1, got 0"
    with pytest.raises(RuntimeError) as theirs:
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert user_message(theirs.value) is None


def test_evaluate_takes_policy_windows_and_a_cost_model_from_the_command_line(tmp_path):
    """`--windows '[3, auto]'` parses to a fixed window and the cost-aware policy, `--cost_model` to its
    mapping; a window that is neither fails in one line naming the field."""
    import json

    common = ["evaluate", "--config", TOY, "--ckpt_path", ROOT / "checkpoints" / "toy2d" / "target.ckpt",
              "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--drafters", "[free-x0]",
              "--verifiers", "[block]", "--num_steps", "[20]", "--num_samples", "64", "--num_permutations", "100",
              "--out_dir", tmp_path]
    proc = run_train(*common, "--windows", "[3, auto]", "--cost_model", "{target_rows: [1, 2], target_s: [0.001, 0.001]}")
    assert "| 20 | free-x0/block/auto |" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["method"], r.get("window")) for r in report["results"]] == [
        ("ancestral", None), ("free-x0/block/w3", 3), ("free-x0/block/auto", "auto")]
    assert report["config"]["cost_models"]["free-x0/block/auto"]["target_s"] == [0.001, 0.001]
    bad = run_train(*common, "--windows", "[3, fast]", check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: window: unknown policy 'fast'"), bad.stderr[-3000:]
