"""The target LightningModule in process: the loss, hyperparameters that rebuild it, EMA in
validation and checkpoints, load_target / slim checkpoints and their errors, the NaN guard, plots."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from helpers import NaNDenoiser, OpaqueDenoiser, TinyDataModule, TinyDenoiser, load_ckpt
from specdiff_train import plotting
from specdiff_train.config_io import module_config
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.models import TargetDiffusion, export_slim_checkpoint, load_target
from specdiff_train.optim import CosineToEndLR, follow_run_length
from specdiff_train.sampling import ancestral_sample

TINY = {"class_path": "helpers.TinyDenoiser", "init_args": {"hidden": 8}}


def make_trainer(root, max_steps=12, callbacks=(), **kwargs) -> Trainer:
    options = dict(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, val_check_interval=max_steps,
                   check_val_every_n_epoch=None, log_every_n_steps=1)
    options.update(kwargs)
    return Trainer(callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True), *callbacks], **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fitted for 12 steps with EMA; returns its last.ckpt."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    model = TargetDiffusion(TinyDenoiser(hidden=16), val_num_samples=16, val_num_steps=5,
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    make_trainer(root, callbacks=[EMAWeightAveraging(decay=0.9)]).fit(model, TinyDataModule())
    return root / "ckpt" / "last.ckpt"


def test_forward_is_the_sampler_contract():
    model = TargetDiffusion(TinyDenoiser(hidden=8))
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    assert model(x, t).shape == (5, 2)
    out, features = model(x, t, return_features=True)
    assert out.shape == (5, 2) and features.shape == (5, 8)
    assert model.sample_shape == (2,)  # from net.sample_shape when not linked from the data
    samples = ancestral_sample(model, model.schedule, model.sample_shape, num_steps=4, seeds=[0, 1, 2])
    assert samples.shape == (3, 2) and torch.isfinite(samples).all()


def test_loss_is_mse_to_the_training_target():
    model = TargetDiffusion(TinyDenoiser(hidden=8), schedule=DDPMSchedule(prediction="v"))
    x0, noise, t = torch.randn(6, 2), torch.randn(6, 2), torch.randint(0, 1000, (6,))
    x_t = model.schedule.q_sample(x0, t, noise)
    expected = (model(x_t, t) - model.schedule.training_target(x0, noise, t)).pow(2).mean()
    torch.testing.assert_close(model.diffusion_loss(x0, t, noise), expected)


def test_hyperparameters_are_plain_data_that_rebuild_the_model(tmp_path):
    model = TargetDiffusion(TinyDenoiser(hidden=8), schedule=DDPMSchedule(beta_schedule="cosine"),
                            optimizer=functools.partial(torch.optim.SGD, lr=0.1), sample_shape=(2,))
    hp = dict(model.hparams)
    assert hp["net"] == {"class_path": "helpers.TinyDenoiser",
                         "init_args": {"dim": 2, "hidden": 8, "num_train_steps": 1000}}
    assert hp["schedule"]["init_args"]["beta_schedule"] == "cosine"
    assert hp["optimizer"] == {"class_path": "torch.optim.sgd.SGD", "init_args": {"lr": 0.1}}
    assert hp["sample_shape"] == [2] and hp["_class_path"].endswith("TargetDiffusion")
    torch.save({"hp": hp}, tmp_path / "hp.pt")
    torch.load(tmp_path / "hp.pt", weights_only=True)  # no pickled objects


def test_net_given_as_a_config_dict():
    model = TargetDiffusion(TINY)
    assert isinstance(model.net, TinyDenoiser) and model.net.hidden == 8
    assert model.hparams["net"] == TINY


def test_unrecoverable_net_config_warns_and_load_says_why(tmp_path):
    assert module_config(TinyDenoiser(hidden=8)) is not None
    assert module_config(OpaqueDenoiser(width=8)) is None  # `width` is not stored: guessing is refused
    with pytest.warns(UserWarning, match="cannot record how to rebuild OpaqueDenoiser"):
        model = TargetDiffusion(OpaqueDenoiser(width=8))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "o.ckpt")
    with pytest.raises(ValueError, match="does not record how to build its network"):
        load_target(tmp_path / "o.ckpt")


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="loss_weighting"):
        TargetDiffusion(TinyDenoiser(), loss_weighting="snr")
    with pytest.raises(ValueError, match=r"sample_shape.*\(3,\).*\(2,\)"):
        TargetDiffusion(TinyDenoiser(dim=2), sample_shape=(3,))


def test_min_snr_weighting_trains():
    model = TargetDiffusion(TinyDenoiser(hidden=8), loss_weighting="min_snr")
    loss = model.diffusion_loss(torch.randn(4, 2), torch.tensor([0, 10, 500, 999]), torch.randn(4, 2))
    assert torch.isfinite(loss)


def test_lr_scheduler_steps_every_optimizer_step():
    model = TargetDiffusion(TinyDenoiser(), lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR,
                                                                           step_size=10))
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert model.hparams["lr_scheduler"]["init_args"] == {"step_size": 10}


def test_cosine_to_end_follows_the_run_length(tmp_path):
    """The LR decays to eta_min at the run's last step, whatever max_steps is; a resumed run keeps its
    step but not the old horizon; a run without a length is refused with the fix."""
    for max_steps in (5, 9):
        model = TargetDiffusion(TinyDenoiser(hidden=8), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                                lr_scheduler=functools.partial(CosineToEndLR, eta_min=1e-3, warmup_steps=2))
        trainer = make_trainer(tmp_path / str(max_steps), max_steps=max_steps, limit_val_batches=0)
        trainer.fit(model, TinyDataModule())
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert scheduler.horizon == max_steps
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert "horizon" not in scheduler.state_dict() and scheduler.state_dict()["last_epoch"] == 9
    sched = CosineToEndLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=2)
    assert [sched.factor(k) for k in (0, 1)] == [0.5, 1.0]
    sched.follow_run(12)
    assert sched.factor(7) == pytest.approx(0.5) and sched.factor(12) == sched.factor(50) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"lr_scheduler: CosineToEndLR .* --trainer.max_steps N"):
        CosineToEndLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)).follow_run(float("inf"))


def test_run_checkpoint_saves_the_final_step_between_validations(tmp_path):
    """Lightning's ModelCheckpoint keeps the last validation's state (step 5 here); RunCheckpoint also
    writes last.ckpt at the run's final step."""
    from specdiff_train.callbacks import RunCheckpoint

    model = TargetDiffusion(TinyDenoiser(hidden=8), val_num_samples=0)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=7, val_check_interval=5, check_val_every_n_epoch=None,
                      logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      callbacks=[RunCheckpoint(dirpath=tmp_path / "ckpt")])
    trainer.fit(model, TinyDataModule())
    assert load_ckpt(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 7


def test_resuming_a_moved_run_keeps_writing_its_last_ckpt(tmp_path):
    """A run folder copied elsewhere and resumed from its last.ckpt: the checkpoint records the old folder, so
    Lightning's ModelCheckpoint took the file it resumed from for someone else's and wrote last-v1.ckpt beside
    it, leaving last.ckpt at the old step; RunCheckpoint keeps writing the last.ckpt it resumed from."""
    import shutil

    from specdiff_train.callbacks import RunCheckpoint

    def fit(root, steps, ckpt_path=None):
        trainer = Trainer(default_root_dir=root, max_steps=steps, val_check_interval=5, check_val_every_n_epoch=None,
                          logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                          callbacks=[RunCheckpoint(dirpath=root / "ckpt")])
        trainer.fit(TargetDiffusion(TinyDenoiser(hidden=8), val_num_samples=0), TinyDataModule(), ckpt_path=ckpt_path)

    fit(tmp_path / "first", 5)
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        fit(tmp_path / "moved", 8, ckpt_path=tmp_path / "moved" / "ckpt" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "moved" / "ckpt").glob("last*.ckpt")) == ["last.ckpt"]
    assert load_ckpt(tmp_path / "moved" / "ckpt" / "last.ckpt")["global_step"] == 8


def test_fixed_lr_horizon_that_differs_from_the_run_warns():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3000)
    assert follow_run_length(cosine, 3000) is None
    assert "rises again after step 3000" in follow_run_length(cosine, 10000)
    assert "T_max=3000" in follow_run_length(cosine, 50) and "CosineToEndLR" in follow_run_length(cosine, 50)
    assert "no fixed length" in follow_run_length(cosine, float("inf"))
    assert follow_run_length(torch.optim.lr_scheduler.StepLR(opt, 10), 50) is None


def test_checkpoint_keeps_ema_and_raw_weights(trained):
    ckpt = load_ckpt(trained)
    assert ckpt["global_step"] == 12
    assert set(ckpt["state_dict"]) == set(ckpt["current_model_state"])
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])


def test_load_target_gives_ema_weights_in_eval_mode(trained):
    ckpt = load_ckpt(trained)
    model = load_target(trained)
    assert isinstance(model, TargetDiffusion) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.checkpoint_info["weights"] == "ema" and model.checkpoint_info["global_step"] == 12
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k])
    raw = load_target(trained, ema=False)
    assert raw.checkpoint_info["weights"] == "raw"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), raw.parameters()))
    samples = ancestral_sample(model, model.schedule, model.sample_shape, num_steps=5, seeds=[3, 4])
    assert samples.shape == (2, 2)


def test_slim_checkpoint_round_trip(trained, tmp_path):
    slim = export_slim_checkpoint(trained, tmp_path / "slim" / "tiny.ckpt")
    content = load_ckpt(slim)
    assert "optimizer_states" not in content and "current_model_state" not in content
    assert slim.stat().st_size < trained.stat().st_size
    full, small = load_target(trained), load_target(slim)
    assert small.checkpoint_info["weights"] == "ema"
    for a, b in zip(full.state_dict().values(), small.state_dict().values()):
        torch.testing.assert_close(a, b)
    # A slim checkpoint also validates through Lightning.
    make_trainer(tmp_path).validate(TargetDiffusion(TinyDenoiser(hidden=16), val_num_samples=0), TinyDataModule(),
                                    ckpt_path=slim, verbose=False)


def test_load_target_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_target(tmp_path / "nowhere.ckpt")
    torch.save(TinyDenoiser().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="bare.pt' holds a bare state dict.*expected a target diffusion"):
        load_target(tmp_path / "bare.pt")
    other = dict(load_ckpt(trained))
    other["hyper_parameters"] = {**other["hyper_parameters"], "_class_path": "helpers.TinyDataModule"}
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="holds TinyDataModule .*expected a target diffusion checkpoint"):
        load_target(tmp_path / "other.ckpt")
    tampered = dict(load_ckpt(trained))
    tampered["hyper_parameters"] = {**tampered["hyper_parameters"], "net": TINY}
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=r"does not fit the network.*shape \(16, 3\) in the checkpoint, \(8, 3\)"):
        load_target(tmp_path / "tampered.ckpt")


def test_resuming_with_another_net_names_the_difference(trained, tmp_path):
    model = TargetDiffusion(TinyDenoiser(hidden=8))
    with pytest.raises(ValueError, match=r"does not fit this model: net.init_args.hidden: 16 in the checkpoint, 8"):
        make_trainer(tmp_path).validate(model, TinyDataModule(), ckpt_path=trained, verbose=False)
    model = TargetDiffusion(TinyDenoiser(hidden=16), schedule=DDPMSchedule(beta_end=0.03))
    with pytest.raises(ValueError, match=r"schedule.beta_end: 0.02 in the checkpoint, 0.03 here"):
        make_trainer(tmp_path).validate(model, TinyDataModule(), ckpt_path=trained, verbose=False)
    from specdiff_train.edm import EDMSchedule

    model = TargetDiffusion(TinyDenoiser(hidden=16), schedule=EDMSchedule())  # the same net, another training family
    with pytest.raises(ValueError, match=r"does not fit this model: schedule: specdiff_train.diffusion.DDPMSchedule "
                                         r"!= specdiff_train.edm.EDMSchedule"):
        make_trainer(tmp_path).validate(model, TinyDataModule(), ckpt_path=trained, verbose=False)


class RecordingTarget(TargetDiffusion):
    """Remembers the weights it sampled with."""

    def plot_samples(self, out_dir):
        self.sampled_with = [p.detach().clone() for p in self.parameters()]
        self.plot_path = super().plot_samples(out_dir)
        return self.plot_path


def test_validation_samples_use_ema_weights(tmp_path):
    torch.manual_seed(0)
    model = RecordingTarget(TinyDenoiser(hidden=8), val_num_samples=16, val_num_steps=4,
                            optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    initial = [p.detach().clone() for p in model.parameters()]
    # An EMA that never updates holds the initial weights: the samples must be drawn with those.
    ema = EMAWeightAveraging(update_starting_at_step=10**9)
    make_trainer(tmp_path, max_steps=6, callbacks=[ema]).fit(model, TinyDataModule())
    for sampled, init in zip(model.sampled_with, initial):
        torch.testing.assert_close(sampled, init)
    raw = load_ckpt(tmp_path / "ckpt" / "last.ckpt")["current_model_state"]
    assert not torch.equal(raw["net.head.weight"], initial[-2])
    assert model.plot_path.is_file() and model.plot_path.name == "epoch=001-step=000006.png"  # 4 batches an epoch


def test_no_samples_in_sanity_check_or_fast_dev_run(tmp_path):
    model = RecordingTarget(TinyDenoiser(hidden=8), val_num_samples=8, val_num_steps=2)
    Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(model, TinyDataModule())
    assert not hasattr(model, "sampled_with")
    assert not (tmp_path / "samples").exists()


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = TargetDiffusion(NaNDenoiser(hidden=8), val_num_samples=0)
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at step 0 .*Lower the learning rate"):
        make_trainer(tmp_path, max_steps=3).fit(model, TinyDataModule())


def test_huge_learning_rate_diverges_with_the_same_message(tmp_path):
    torch.manual_seed(0)
    model = TargetDiffusion(TinyDenoiser(hidden=8), val_num_samples=0,
                            optimizer=functools.partial(torch.optim.SGD, lr=1e30))
    with pytest.raises(FloatingPointError, match=r"train/loss is (nan|inf) at step \d+ .*learning rate"):
        make_trainer(tmp_path, max_steps=50).fit(model, TinyDataModule())


def test_plots(tmp_path):
    points = plotting.scatter_plot(torch.randn(50, 2), torch.randn(80, 2), tmp_path / "s.png", "points")
    assert (tmp_path / "s.png").is_file() and points.ndim == 3 and points.dtype == np.uint8
    grid = plotting.image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=5, title="digits")
    assert (tmp_path / "g.png").is_file() and grid.shape[-1] == 3
    plotting.plot_samples(torch.rand(4, 3, 8, 8), tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"no picture for samples of shape \(4, 5\)"):
        plotting.plot_samples(torch.rand(4, 5))


def test_deepcopy_shares_the_optimizer_factory():
    """EMAWeightAveraging deep-copies the module: the CLI's optimizer factory (which references the
    CLI and its trainer) must be shared, not copied (copying it fails under DDP)."""
    factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    model = TargetDiffusion(TinyDenoiser(hidden=8), optimizer=factory)
    clone = copy.deepcopy(model)
    assert clone.optimizer is factory and clone.net is not model.net
    for a, b in zip(clone.parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_built_inside_another_modules_cli_instantiation():
    """A module built while the CLI instantiates another one (a drafter loading its target) must not
    take that module's config as its hyperparameters."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    foreign = {"_class_path": "helpers.TinyDataModule", "num_samples": 3,
               "net": {"class_path": "helpers.OpaqueDenoiser", "init_args": {"width": 4}}}
    with _given_hyperparameters_context(hparams=foreign, instantiator="lightning.pytorch.cli.instantiate_module"):
        model = TargetDiffusion(TinyDenoiser(hidden=8), val_num_steps=7)
    assert "num_samples" not in model.hparams and model.hparams["val_num_steps"] == 7
    assert model.hparams["net"]["class_path"] == "helpers.TinyDenoiser"
