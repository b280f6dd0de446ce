"""The distilled draft network: its loss weight, exactness with it, training through the CLI, errors."""
import pytest
import torch

from helpers import ROOT, find_one, run_train
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.models.drafter import delta_sq_weight, load_draft_network
from specdiff_train.nets import MLPDenoiser
from specdiff_train.speculative import DraftNetworkDrafter, speculative_sample
from specdiff_train.testing import GaussianDataDenoiser, closed_form_marginal, marginal_test

TOY2D = ROOT / "checkpoints" / "toy2d"


def test_loss_weight_is_the_transitions_delta_squared():
    plan = DDPMSchedule(1000).plan(100)
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, plan.num_stochastic_steps, (64,), generator=gen)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    eps_p, eps_q = torch.randn(64, 3, generator=gen, dtype=torch.float64), torch.randn(64, 3, generator=gen, dtype=torch.float64)
    mu_p, std = plan.transition(x, k, eps_p)
    mu_q, _ = plan.transition(x, k, eps_q)
    true_delta_sq = ((mu_p - mu_q) / std[:, None]).pow(2).sum(1)
    torch.testing.assert_close(delta_sq_weight(plan, k) * (eps_p - eps_q).pow(2).sum(1), true_delta_sq)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("verifier", ["block", "tokenwise"])
def test_speculative_sampling_with_a_draft_network_is_exact(verifier, window):
    schedule = DDPMSchedule(1000)
    mean = torch.tensor([1.5, -1.0])
    model = GaussianDataDenoiser(schedule, mean, 0.05)
    torch.manual_seed(0)
    drafter = DraftNetworkDrafter.from_net(MLPDenoiser(hidden=16, depth=1, time_embed_dim=8), schedule, (2,))
    out = speculative_sample(model, schedule, (2,), num_steps=20, seeds=range(10_000), drafter=drafter,
                             window=window, verifier=verifier)
    mu, var = closed_form_marginal(schedule, 20, mean, 0.05)
    report = marginal_test(out.samples, mu.expand(2), var.expand(2))
    assert report["ks_p"] > 1e-4 and report["mean_z"] < 4.5 and report["var_z"] < 4.5, report
    assert 0 < out.stats["acceptance_rate"] < 0.99


def test_drafter_for_another_schedule_or_shape_is_refused():
    model = GaussianDataDenoiser(DDPMSchedule(1000), torch.zeros(2), 1.0)
    net = MLPDenoiser(hidden=8, depth=1, time_embed_dim=8)
    for schedule, shape, match in ((DDPMSchedule(500), (2,), "num_train_steps"),
                                   (DDPMSchedule(1000, prediction="x0"), (2,), "prediction"),
                                   (DDPMSchedule(1000), (3,), "sample_shape")):
        with pytest.raises(ValueError, match=match):
            speculative_sample(model, DDPMSchedule(1000), (2,), num_steps=10, seeds=[0],
                               drafter=DraftNetworkDrafter.from_net(net, schedule, shape))


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not a draft-network checkpoint"):
        load_draft_network(TOY2D / "target.ckpt")
    proc = run_train("fit", "--config", "configs/drafter/toy2d_draftnet.yaml", "--model.init_args.target_ckpt",
                     tmp_path / "missing.ckpt", "--trainer.default_root_dir", tmp_path, check=False)
    assert proc.returncode != 0 and "target_ckpt: no file at" in proc.stderr


def test_tiny_distillation_run_gives_a_usable_drafter(tmp_path):
    run_train("fit", "--config", "configs/drafter/toy2d_draftnet.yaml", "--trainer.default_root_dir", tmp_path,
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3")
    ckpt = find_one(tmp_path, "last.ckpt")
    drafter = DraftNetworkDrafter(str(ckpt))
    from specdiff_train.models import load_target

    target = load_target(TOY2D / "target.ckpt")
    out = speculative_sample(target, target.schedule, (2,), num_steps=20, seeds=range(8), drafter=drafter, window=4)
    assert out.samples.shape == (8, 2)


def test_shipped_draft_network_beats_an_untrained_one():
    from specdiff_train.models import load_target

    target = load_target(TOY2D / "target.ckpt")
    trained = DraftNetworkDrafter(str(TOY2D / "draftnet.ckpt"))
    torch.manual_seed(0)
    untrained = DraftNetworkDrafter.from_net(MLPDenoiser(hidden=64, depth=2, time_embed_dim=32), target.schedule, (2,))
    kwargs = dict(num_steps=100, seeds=range(300), window=8)
    good = speculative_sample(target, target.schedule, (2,), drafter=trained, **kwargs).stats
    bad = speculative_sample(target, target.schedule, (2,), drafter=untrained, **kwargs).stats
    assert good["acceptance_rate"] > 0.9 > bad["acceptance_rate"]
    assert good["target_calls_per_sample"] < bad["target_calls_per_sample"]
