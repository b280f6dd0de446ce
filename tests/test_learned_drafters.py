"""Learned drafters (distilled draft networks, Medusa-like heads): the delta-matching loss weights,
exactness of speculative sampling with them, training through the CLI, loading, draft cost, errors."""
import math
import warnings

import pytest
import torch

from helpers import ROOT, find_one, run_train
from specdiff_train.diffusion import DDPMSchedule, one_step_acceptance
from specdiff_train.drafters import ConvHead, HeadDistillation, MLPHead, export_slim_drafter, load_draft_network
from specdiff_train.drafters.distillation import (
    delta_sq_weight,
    draft_delta_sq,
    mismatch_loss,
    pool_pairs,
    target_rollout,
    x0_delta_sq_weight,
)
from specdiff_train.config_io import build_module, module_config
from specdiff_train.models import TargetDiffusion, load_target
from specdiff_train.nets import MLPDenoiser
from specdiff_train.speculative import (
    DraftNetworkDrafter,
    FreeDrafter,
    MedusaDrafter,
    relative_draft_cost,
    speculative_sample,
)
from specdiff_train.testing import GaussianDataDenoiser, closed_form_marginal, marginal_test

TOY2D = ROOT / "checkpoints" / "toy2d"
MEAN, VAR = torch.tensor([1.5, -1.0]), 0.05


# --- fixtures: tiny target checkpoints (fast to build, fast to distil from) ------------------------
def save_target(path, net_config):
    """A slim target checkpoint of an untrained TargetDiffusion (what `load_target` reads)."""
    torch.manual_seed(0)
    model = TargetDiffusion(net=net_config)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    mlp = {"class_path": "specdiff_train.nets.MLPDenoiser",
           "init_args": {"dim": 2, "hidden": 32, "depth": 1, "time_embed_dim": 16}}
    unet = {"class_path": "specdiff_train.nets.UNet",
            "init_args": {"in_channels": 1, "image_size": 8, "base_channels": 8, "channel_mults": [1],
                          "num_res_blocks": 1, "attention_levels": [], "num_heads": 1}}
    return {"toy2d": save_target(root / "toy2d.ckpt", mlp), "digits": save_target(root / "digits.ckpt", unet)}


def random_head(**kwargs) -> MLPHead:
    """Heads with a non-zero output layer (a fresh head starts at zero, i.e. as the Free Drafter)."""
    torch.manual_seed(0)
    head = MLPHead(**kwargs)
    torch.nn.init.normal_(head.out.weight, std=0.3)
    return head


# --- the loss weights are the transition's delta^2 --------------------------------------------------
@pytest.mark.parametrize("num_steps", [1000, 100, 7])
def test_loss_weight_is_the_transitions_delta_squared(num_steps):
    plan = DDPMSchedule(1000).plan(num_steps)
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, plan.num_stochastic_steps, (64,), generator=gen)
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    eps_p, eps_q = torch.randn(2, 64, 3, generator=gen, dtype=torch.float64)
    mu_p, std = plan.transition(x, k, eps_p)
    mu_q, _ = plan.transition(x, k, eps_q)
    true_delta_sq = ((mu_p - mu_q) / std[:, None]).pow(2).sum(1)
    torch.testing.assert_close(delta_sq_weight(plan, k) * (eps_p - eps_q).pow(2).sum(1), true_delta_sq)
    if num_steps == 1000:  # posterior variance: beta_t / (alpha_t (1 - abar_{t-1})), not ALGORITHMS.md's 1 - abar_t
        sched, t = plan.schedule, plan.timesteps[k]
        beta, abar_prev = sched.betas[t], sched.alphas_cumprod[t - 1]
        torch.testing.assert_close(delta_sq_weight(plan, k), beta / ((1 - beta) * (1 - abar_prev)))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_x0_loss_weight_is_the_transitions_delta_squared(prediction):
    plan = DDPMSchedule(1000, prediction=prediction).plan(50)
    gen = torch.Generator().manual_seed(1)
    k = torch.randint(0, plan.num_stochastic_steps, (64,), generator=gen)
    x, out_p, out_q = torch.randn(3, 64, 2, generator=gen, dtype=torch.float64)
    t = plan.t(k)
    mu_p, std = plan.transition(x, k, out_p)
    mu_q, _ = plan.transition(x, k, out_q)
    x0_diff = plan.schedule.to_x0(out_p, x, t) - plan.schedule.to_x0(out_q, x, t)
    torch.testing.assert_close(x0_delta_sq_weight(plan, k) * x0_diff.pow(2).sum(1),
                               ((mu_p - mu_q) / std[:, None]).pow(2).sum(1))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_draft_loss_is_the_transitions_delta_squared(prediction, clip):
    """The draft network's loss is delta^2 of the transition for every prediction type; with clipping it
    equals it where the draft's x0 is in range and bounds it from above elsewhere (the draft is not clipped
    in the loss so that it keeps gradients)."""
    plan = DDPMSchedule(1000, prediction=prediction, clip_denoised=clip, clip_range=1.5).plan(50)
    gen = torch.Generator().manual_seed(2)
    k = torch.randint(0, plan.num_stochastic_steps, (256,), generator=gen)
    x, out_p, out_q = torch.randn(3, 256, 2, generator=gen, dtype=torch.float64)
    mu_p, std = plan.transition(x, k, out_p)
    mu_q, _ = plan.transition(x, k, out_q)
    true_delta_sq = ((mu_p - mu_q) / std[:, None]).pow(2).sum(1)
    loss = draft_delta_sq(plan, k, x, out_p, out_q)
    if not clip:
        torch.testing.assert_close(loss, true_delta_sq)
        return
    x0_q = plan.schedule.to_x0(out_q, x, plan.t(k))
    inside = (x0_q.abs() <= 1.5).all(1)
    assert 0 < inside.sum() < len(k)  # both cases occur
    torch.testing.assert_close(loss[inside], true_delta_sq[inside])
    assert (loss[~inside] >= true_delta_sq[~inside] * (1 - 1e-9)).all()
    assert (loss[~inside] > true_delta_sq[~inside] * 1.01).any()  # the bound is not the value there


def test_tv_objective_is_the_mean_rejection_probability():
    delta_sq = torch.tensor([0.0, 0.25, 4.0, 1e4], dtype=torch.float64)
    rejection = 1 - one_step_acceptance(delta_sq.sqrt())
    torch.testing.assert_close(mismatch_loss(delta_sq, "tv"), rejection.mean())
    assert mismatch_loss(delta_sq, "delta_sq") == delta_sq.mean()
    near = delta_sq[:3]  # where 2 Phi(-delta/2) is representable
    torch.testing.assert_close(mismatch_loss(near, "log_acceptance"), -one_step_acceptance(near.sqrt()).log().mean())
    far = torch.tensor([1e4], dtype=torch.float64, requires_grad=True)  # delta 100: acceptance 0 in float64
    mismatch_loss(far, "log_acceptance").backward()
    assert 0.1 < float(far.grad) < 0.2  # ~ d(delta^2 / 8): the hopeless step keeps its gradient (tv's is 0)
    with pytest.raises(ValueError, match="objective"):
        mismatch_loss(delta_sq, "l1")


def test_rollout_follows_the_target_chain():
    """The heads' training states: the target's ancestral chain continued from the anchor."""
    schedule = DDPMSchedule(1000)
    plan, model = schedule.plan(20), GaussianDataDenoiser(schedule, MEAN, VAR)
    k = torch.tensor([0, 5, 18])
    x = torch.randn(3, 2)
    states, steps, outputs = target_rollout(model, plan, x, k, model(x, plan.t(k)), 3, torch.Generator().manual_seed(0))
    assert [s.tolist() for s in steps] == [[1, 6, 19], [2, 7, 20], [3, 8, 21]]
    torch.testing.assert_close(outputs[0], model(states[0], plan.t(steps[0])))
    mean, std = plan.transition(x, k, model(x, plan.t(k)))
    z = (states[0] - mean) / std[:, None]  # one standard-normal draw per row
    assert z.abs().max() < 6 and (states[1][:2] != states[0][:2]).all()


def test_rollout_on_the_drafters_own_path():
    """Rows marked `drafted` take the drafter's steps after the first (the first is the target's step from the
    anchor, as in a speculative round); the other rows and the target's outputs are unchanged."""
    schedule = DDPMSchedule(1000)
    plan, model = schedule.plan(20), GaussianDataDenoiser(schedule, MEAN, VAR)
    k, x = torch.tensor([2, 2, 2]), torch.randn(3, 2)
    offsets = []

    def draft_x0(x, k, offset):
        offsets.append(offset)
        return torch.zeros_like(x)  # a drafter far from the target: its path leaves the target's

    run = lambda **kw: target_rollout(model, plan, x, k, model(x, plan.t(k)), 3,  # noqa: E731
                                      torch.Generator().manual_seed(0), **kw)
    plain = run()
    own = run(draft_x0=draft_x0, drafted=torch.tensor([True, False, True]))
    assert offsets == [1, 2]  # the state after the first step is one step after the anchor
    torch.testing.assert_close(own[0][0], plain[0][0])  # the first step: the target's
    torch.testing.assert_close(own[0][2][1], plain[0][2][1])  # an undrafted row: the target's path
    mean = plan.transition_from_x0(own[0][0], own[1][0], torch.zeros(3, 2))[0]
    z = (own[0][1] - mean) / plan.std_at(own[1][0])[:, None]
    assert z[[0, 2]].abs().max() < 6 and (own[0][1][[0, 2]] != plain[0][1][[0, 2]]).all()
    torch.testing.assert_close(own[2][1], model(own[0][1], plan.t(own[1][1])))  # outputs at the drafted states


# --- long offsets: anchor/state pairs on the trajectory pool -------------------------------------------
def test_pool_pairs_stay_on_drafted_steps_with_log_uniform_offsets():
    gen = torch.Generator().manual_seed(0)
    chain, anchor, offset = pool_pairs(99, 7, 20_000, 64, gen)
    assert offset.min() == 1 and offset.max() == 64 and anchor.min() == 0 and (anchor + offset).max() == 98
    assert chain.min() == 0 and chain.max() == 6
    assert abs((offset <= 8).double().mean() - math.log(9) / math.log(65)) < 0.02  # log-uniform in [1, 64]
    assert abs((offset > 32).double().mean() - (1 - math.log(33) / math.log(65))) < 0.02
    _, anchor, offset = pool_pairs(5, 2, 1000, 64, gen)  # offsets beyond the chain are not drawn
    assert offset.max() == 4 and (anchor + offset).max() == 4
    with pytest.raises(ValueError, match="max_offset"):
        pool_pairs(1, 2, 10, 8, gen)


def test_long_offset_embedding_starts_at_zero_and_tells_long_offsets_apart():
    plain = random_head(dim=2, feature_dim=4, hidden=16, depth=1, time_embed_dim=8, max_offset=2)
    long = MLPHead(dim=2, feature_dim=4, hidden=16, depth=1, time_embed_dim=8, max_offset=2, long_offsets=True)
    missing = long.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith("cond.long.") for key in missing)
    features, inputs, t = torch.randn(3, 4), torch.randn(3, 8), torch.tensor([10, 500, 900])
    for offset in (1, 5, 40):
        j = torch.full((3,), offset)
        torch.testing.assert_close(long(features, inputs, t, j), plain(features, inputs, t, j))  # zero at the start
    torch.nn.init.normal_(long.cond.long.mlp[-1].weight, std=0.5)
    far, farther = torch.full((3,), 5), torch.full((3,), 40)
    torch.testing.assert_close(plain(features, inputs, t, far), plain(features, inputs, t, farther))  # one embedding
    assert not torch.allclose(long(features, inputs, t, far), long(features, inputs, t, farther))
    config = module_config(long)
    assert config["init_args"]["long_offsets"] is True and "cond.long.mlp.0.weight" in build_module(config).state_dict()


def test_heads_train_on_long_offset_pairs_of_the_pool(tiny_targets):
    def module(pool_offsets, head=None, pairs=3):
        head = head or MLPHead(feature_dim=32, hidden=8, depth=1, max_offset=2, long_offsets=True)
        return HeadDistillation(head, str(tiny_targets["toy2d"]), num_steps=50, objective="tv", trajectory_chains=8,
                                pool_offsets=pool_offsets, pool_pairs_per_row=pairs)

    x0 = torch.randn(6, 2)
    trained = random_head(dim=2, feature_dim=32, hidden=8, depth=1, max_offset=2, long_offsets=True)
    with_pairs, without = module(40, trained), module(0)
    assert with_pairs.hparams["pool_offsets"] == 40 and with_pairs.hparams["head"]["init_args"]["long_offsets"]
    loss, delta_sq, k, _ = with_pairs.losses(x0, torch.Generator().manual_seed(1))
    _, plain_sq, _, _ = without.losses(x0, torch.Generator().manual_seed(1))
    assert len(delta_sq) == len(plain_sq) + 18 and k.max() < with_pairs.plan.num_stochastic_steps
    loss.backward()
    assert trained.cond.long.mlp[-1].weight.grad.abs().sum() > 0  # the long-offset embedding is trained
    fresh = module(40).eval()  # validation: the pairs are logged apart; a fresh head drafts as the Free Drafter
    _, delta_sq, _, extra = fresh.losses(x0, torch.Generator().manual_seed(1))
    assert len(delta_sq) == len(plain_sq)
    torch.testing.assert_close(extra["long_acceptance"], extra["long_free_acceptance"])
    with pytest.raises(ValueError, match="long_offsets true"):
        module(40, MLPHead(feature_dim=32, hidden=8, depth=1, max_offset=2))
    with pytest.raises(ValueError, match="model.init_args.pool_offsets"):
        module(-1)
    with pytest.raises(ValueError, match="model.init_args.pool_pairs_per_row"):
        module(40, pairs=0)


# --- exactness with learned drafters -----------------------------------------------------------------
def draft_network_drafter(schedule):
    torch.manual_seed(0)
    return DraftNetworkDrafter.from_net(MLPDenoiser(hidden=16, depth=1, time_embed_dim=8), schedule, (2,))


def medusa_drafter(schedule):
    # GaussianDataDenoiser's features are (x, output): 4 numbers; max_offset 4 < window 8 tests the clamp
    return MedusaDrafter.from_head(random_head(dim=2, feature_dim=4, hidden=16, depth=1, time_embed_dim=8,
                                               max_offset=4), schedule, (2,))


def long_offset_medusa_drafter(schedule):
    # max_offset 2 < window 8: offsets 3-8 are told apart by the long-offset embedding only
    head = random_head(dim=2, feature_dim=4, hidden=16, depth=1, time_embed_dim=8, max_offset=2, long_offsets=True)
    torch.nn.init.normal_(head.cond.long.mlp[-1].weight, std=0.5)
    return MedusaDrafter.from_head(head, schedule, (2,))


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("verifier", ["block", "tokenwise"])
@pytest.mark.parametrize("make", [draft_network_drafter, medusa_drafter, long_offset_medusa_drafter],
                         ids=["draftnet", "medusa", "medusa-long-offsets"])
def test_speculative_sampling_with_a_learned_drafter_is_exact(make, verifier, window):
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, MEAN, VAR)
    out = speculative_sample(model, schedule, (2,), num_steps=20, seeds=range(10_000), drafter=make(schedule),
                             window=window, verifier=verifier)
    mu, var = closed_form_marginal(schedule, 20, MEAN, VAR)
    report = marginal_test(out.samples, mu.expand(2), var.expand(2))
    assert report["ks_p"] > 1e-4 and report["mean_z"] < 4.5 and report["var_z"] < 4.5, report
    assert 0 < out.stats["acceptance_rate"] < 0.99
    assert out.stats["draft_calls"] > 0


def test_untrained_heads_draft_exactly_like_the_free_drafter_on_x0():
    """A fresh head's correction is zero: same drafts, so the same samples and counts as FreeDrafter(x0)."""
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, MEAN, VAR)
    torch.manual_seed(0)
    head = MLPHead(dim=2, feature_dim=4, hidden=16, depth=1, time_embed_dim=8)
    kwargs = dict(num_steps=30, seeds=range(500), window=5)
    medusa = speculative_sample(model, schedule, (2,), drafter=MedusaDrafter.from_head(head, schedule, (2,)), **kwargs)
    free = speculative_sample(model, schedule, (2,), drafter=FreeDrafter(freeze="x0"), **kwargs)
    torch.testing.assert_close(medusa.samples, free.samples)
    assert medusa.stats["target_calls_per_sample"] == free.stats["target_calls_per_sample"]


# --- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
def test_drafter_for_another_schedule_or_shape_is_refused(kind):
    model = GaussianDataDenoiser(DDPMSchedule(1000), torch.zeros(2), 1.0)
    module = MLPDenoiser(hidden=8, depth=1, time_embed_dim=8) if kind == "draftnet" else MLPHead(feature_dim=4)
    build = DraftNetworkDrafter.from_net if kind == "draftnet" else MedusaDrafter.from_head
    for schedule, shape, match in ((DDPMSchedule(500), (2,), "num_train_steps: 500 != 1000"),
                                   (DDPMSchedule(1000, prediction="x0"), (2,), "prediction"),
                                   (DDPMSchedule(1000, beta_schedule="cosine"), (2,), "beta_schedule"),
                                   (DDPMSchedule(1000), (3,), "sample_shape")):
        with pytest.raises(ValueError, match=match):
            speculative_sample(model, DDPMSchedule(1000), (2,), num_steps=10, seeds=[0],
                               drafter=build(module, schedule, shape))


def test_heads_on_features_of_another_size_are_refused():
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, torch.zeros(2), 1.0)  # features of size 4
    with pytest.raises(ValueError, match="features with 16 channels"):
        speculative_sample(model, schedule, (2,), num_steps=10, seeds=[0],
                           drafter=MedusaDrafter.from_head(MLPHead(feature_dim=16), schedule, (2,)))


def test_checkpoint_errors_name_the_problem(tmp_path, tiny_targets):
    with pytest.raises(ValueError, match="not a draft-network checkpoint"):
        load_draft_network(TOY2D / "target.ckpt")
    with pytest.raises(ValueError, match="not a drafter-heads checkpoint.*configs/drafter/toy2d_medusa.yaml"):
        MedusaDrafter(str(TOY2D / "draftnet.ckpt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DraftNetworkDrafter(str(tmp_path / "nothing.ckpt"))
    # training: a missing target names the path and how to make one; a drafter checkpoint is no target
    proc = run_train("fit", "--config", "configs/drafter/toy2d_draftnet.yaml", "--model.init_args.target_ckpt",
                     tmp_path / "missing.ckpt", "--trainer.default_root_dir", tmp_path, check=False)
    assert proc.returncode != 0 and "target_ckpt: no file at" in proc.stderr
    assert "python train.py fit --config configs/target/toy2d.yaml" in proc.stderr
    with pytest.raises(ValueError, match="is a drafter checkpoint .*not a target"):
        HeadDistillation(MLPHead(feature_dim=128), str(TOY2D / "draftnet.ckpt"))
    with pytest.raises(ValueError, match="expected a target diffusion checkpoint"):  # the sampler's loader too
        load_target(TOY2D / "draftnet.ckpt")


def test_training_refuses_a_drafter_that_does_not_fit_the_target(tiny_targets):
    from specdiff_train.drafters import DraftDistillation

    with pytest.raises(ValueError, match="feature_dim.*--model.init_args.head.init_args.feature_dim 32"):
        HeadDistillation(MLPHead(feature_dim=128), str(tiny_targets["toy2d"]))
    with pytest.raises(ValueError, match=r"model.init_args.head does not fit.*sample_shape \(1, 8, 8\)"):
        HeadDistillation(ConvHead(feature_dim=32), str(tiny_targets["toy2d"]))
    with pytest.raises(ValueError, match=r"model.init_args.net does not fit.*sample_shape \(3,\)"):
        DraftDistillation(MLPDenoiser(dim=3, hidden=8, depth=1), str(tiny_targets["toy2d"]))
    with pytest.raises(ValueError, match="num_train_steps 500 != the target's 1000"):
        DraftDistillation(MLPDenoiser(hidden=8, depth=1, num_train_steps=500), str(tiny_targets["toy2d"]))
    with pytest.raises(ValueError, match="data.sample_shape"):
        DraftDistillation(MLPDenoiser(hidden=8, depth=1), str(tiny_targets["toy2d"]), sample_shape=(1, 8, 8))


# --- training through the CLI ---------------------------------------------------------------------------
TINY = {  # config -> overrides that fit the tiny fixture targets
    "toy2d_draftnet": ["--model.init_args.trajectory_fraction", "0.5", "--model.init_args.trajectory_chains", "16"],
    "toy2d_medusa": ["--model.init_args.head.init_args.feature_dim", "32", "--model.init_args.trajectory_chains", "16"],
    "digits_draftnet": ["--model.init_args.trajectory_chains", "8"],
    "digits_medusa": ["--model.init_args.head.init_args.feature_dim", "8", "--model.init_args.trajectory_chains", "8",
                      "--data.init_args.batch_size", "16"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_fit_of_each_drafter_config_gives_a_usable_drafter(name, tiny_targets, tmp_path):
    data = name.split("_")[0]
    run_train("fit", "--config", f"configs/drafter/{name}.yaml", "--model.init_args.target_ckpt", tiny_targets[data],
              "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false", *TINY[name])
    slim = export_slim_drafter(find_one(tmp_path, "last.ckpt"), tmp_path / "slim.ckpt")
    drafter = (MedusaDrafter if "medusa" in name else DraftNetworkDrafter)(str(slim))
    target = load_target(tiny_targets[data])
    assert not any(p.requires_grad for p in drafter.module.parameters())
    out = speculative_sample(target, target.schedule, target.sample_shape, num_steps=20, seeds=range(4),
                             drafter=drafter, window=4)
    assert out.samples.shape == (4, *target.sample_shape) and torch.isfinite(out.samples).all()
    hparams = torch.load(slim, weights_only=True)["hyper_parameters"]
    assert hparams["target_ckpt"] == str(tiny_targets[data]) and hparams["num_steps"] == 100


def test_an_interrupted_drafter_run_resumes_with_its_step_optimizer_and_settings(tiny_targets, tmp_path):
    """`fit --ckpt_path last.ckpt` of a drafter: the checkpoint also records what only describes the run (the
    target's fingerprint, schedule, ...), which the module's constructor does not take."""
    args = ["--config", "configs/drafter/toy2d_medusa.yaml", "--model.init_args.target_ckpt", tiny_targets["toy2d"],
            "--model.init_args.head.init_args.feature_dim", "32", "--model.init_args.trajectory_chains", "8",
            "--model.init_args.head.init_args.long_offsets", "true", "--model.init_args.pool_offsets", "40",
            "--model.init_args.optimizer.init_args.lr", "0.0005", "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    run_train("fit", *args, "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", "2")
    first = find_one(tmp_path, "last.ckpt")
    run_train("fit", *args, "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", "4", "--ckpt_path", first)
    resumed = torch.load(first, weights_only=False)
    assert resumed["global_step"] == 4
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {4}  # Adam continued
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # the configured optimizer
    hparams = resumed["hyper_parameters"]
    assert hparams["pool_offsets"] == 40 and hparams["head"]["init_args"]["long_offsets"] is True


def test_drafter_checkpoint_holds_only_the_drafter(tiny_targets, tmp_path):
    module = HeadDistillation(MLPHead(feature_dim=32, hidden=8, depth=1), str(tiny_targets["toy2d"]))
    assert all(k.startswith("head.") for k in module.state_dict())
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.head.parameters()}
    assert not module.target.training and not any(p.requires_grad for p in module.target.parameters())
    optimizer = module.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.head.parameters()))


# --- the shipped drafters and their cost -----------------------------------------------------------------
def test_shipped_draft_network_has_a_smaller_delta_than_an_untrained_one():
    from specdiff_train.drafters import DraftDistillation

    trained = DraftNetworkDrafter(str(TOY2D / "draftnet.ckpt")).net
    module = DraftDistillation(MLPDenoiser(hidden=64, depth=2, time_embed_dim=32), str(TOY2D / "target.ckpt"))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same states for both nets
    x0 = torch.randn(512, 2, generator=gen()) * 2
    with torch.no_grad():
        _, untrained_sq, _, _ = module.losses(x0, gen())
        module.net.load_state_dict(trained.state_dict())
        _, trained_sq, _, _ = module.losses(x0, gen())
    assert trained_sq.sqrt().mean() < 0.3 * untrained_sq.sqrt().mean()


@pytest.mark.parametrize("name", ["draftnet", "medusa"])
def test_shipped_learned_drafter_beats_the_free_drafter_on_toy2d(name):
    if not (TOY2D / f"{name}.ckpt").exists():
        pytest.skip(f"checkpoints/toy2d/{name}.ckpt not shipped")
    target = load_target(TOY2D / "target.ckpt")
    learned = (MedusaDrafter if name == "medusa" else DraftNetworkDrafter)(str(TOY2D / f"{name}.ckpt"))
    kwargs = dict(num_steps=100, seeds=range(300), window=8)
    good = speculative_sample(target, target.schedule, (2,), drafter=learned, **kwargs).stats
    free = speculative_sample(target, target.schedule, (2,), drafter=FreeDrafter(freeze="x0"), **kwargs).stats
    assert good["acceptance_rate"] > 0.94 > free["acceptance_rate"]
    assert good["target_calls_per_sample"] < free["target_calls_per_sample"]


@pytest.mark.parametrize("make", [draft_network_drafter, medusa_drafter, lambda s: FreeDrafter()],
                         ids=["draftnet", "medusa", "free"])
def test_relative_draft_cost(make):
    schedule = DDPMSchedule(1000)
    model = GaussianDataDenoiser(schedule, MEAN, VAR)
    cost = relative_draft_cost(make(schedule), model, schedule, (2,), batch_size=8, repeats=3)
    assert cost["draft_s"] > 0 and cost["target_s"] > 0
    assert cost["relative"] == pytest.approx(cost["draft_s"] / cost["target_s"])


# --- which target a drafter was trained against ------------------------------------------------------------
def test_drafter_checkpoints_are_checked_against_the_target_they_are_used_with(tiny_targets, tmp_path):
    """Silence with the drafter's own target (full or slim checkpoint alike); a warning naming both
    targets with another one (e.g. an earlier checkpoint of the same run), in the evaluate report too;
    checkpoints without a recorded fingerprint are compared with their recorded target file."""
    from specdiff_train.evaluation.command import SpecDiffTrainer
    from specdiff_train.drafters import DraftDistillation
    from specdiff_train.config_io import target_fingerprint
    from specdiff_train.drafters import check_drafter_target, drafter_target_warning

    target_path = tmp_path / "target.ckpt"
    target_path.write_bytes(tiny_targets["toy2d"].read_bytes())
    module = DraftDistillation(MLPDenoiser(dim=2, hidden=8, depth=1, time_embed_dim=8), str(target_path))
    drafter_path = tmp_path / "draftnet.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, drafter_path)
    target = load_target(target_path)
    assert module.hparams["target_fingerprint"] == target_fingerprint(target)
    assert drafter_target_warning(drafter_path, target) is None
    assert check_drafter_target(DraftNetworkDrafter(str(drafter_path)), target) is None

    other = load_target(target_path)
    other.net.out.bias.data += 0.01  # another step of the same run: same shapes, other weights
    warning = drafter_target_warning(drafter_path, other)
    assert "was trained against another target" in warning and str(target_path) in warning
    assert target_fingerprint(target) in warning and target_fingerprint(other) in warning
    assert "Sampling stays exact" in warning and "--model.init_args.target_ckpt" in warning

    sample = lambda model: speculative_sample(model, model.schedule, (2,), num_steps=100, seeds=[0],  # noqa: E731
                                              drafter=DraftNetworkDrafter(str(drafter_path)), window=2)
    with pytest.warns(Warning, match="was trained against another target"):
        sample(other)  # the Python API says it too
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sample(target)

    trainer = SpecDiffTrainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.warns(Warning, match="was trained against another target"):
        report = trainer.evaluate(other, drafters=[DraftNetworkDrafter(str(drafter_path))], verifiers=["block"], windows=[2],
                                  num_steps=[5], num_samples=8, num_permutations=100, out_dir=str(tmp_path / "r"))
    assert report["warnings"] == [warning] and warning in (tmp_path / "r" / "report.md").read_text()

    old = torch.load(drafter_path, weights_only=True)  # written before fingerprints were recorded
    del old["hyper_parameters"]["target_fingerprint"]
    torch.save(old, drafter_path)
    assert drafter_target_warning(drafter_path, target) is None
    assert "as it is now" in drafter_target_warning(drafter_path, other)
    target_path.unlink()
    assert "cannot check" in drafter_target_warning(drafter_path, target)


def test_old_homes_of_the_drafters_still_resolve():
    """Issue 16 moved the drafters into `specdiff_train.drafters`: the class paths that users' configs and
    checkpoints' hyperparameters name (the shipped ones record `specdiff_train.nets.heads.MLPHead`,
    `specdiff_train.models.drafter.HeadDistillation`) resolve to the new classes, the public names stay
    importable from `specdiff_train.speculative`, and the old `specdiff_train.models` names say where they went."""
    import specdiff_train.drafters as drafters
    import specdiff_train.speculative as spec
    from specdiff_train.config_io import MOVED_CLASS_PATHS, build_module, read_checkpoint, resolve_class

    for old, new in MOVED_CLASS_PATHS.items():
        assert resolve_class(old, trusted_only=True) is resolve_class(new) is not None, old
    recorded = read_checkpoint(TOY2D / "medusa.ckpt")["hyper_parameters"]
    assert recorded["head"]["class_path"] == "specdiff_train.nets.heads.MLPHead"
    assert isinstance(build_module(recorded["head"]), drafters.MLPHead)
    for name in ("Drafter", "DraftContext", "Verification", "FreeDrafter", "FrozenTargetDrafter", "LearnedDrafter",
                 "DraftNetworkDrafter", "MedusaDrafter", "relative_draft_cost"):
        assert getattr(spec, name) is getattr(drafters, name), name
    with pytest.raises(ImportError, match="moved to specdiff_train.drafters.DraftDistillation"):
        from specdiff_train.models import DraftDistillation  # noqa: F401


def test_an_old_class_path_in_a_config_names_the_new_one():
    from specdiff_train.errors import explain_parse_error

    message = ("Parser key \"model\":\n  Problem with given class_path 'specdiff_train.nets.heads.ConvHead':\n"
               "    No module named 'specdiff_train.nets.heads'")
    assert explain_parse_error(message) == ("model.class_path: specdiff_train.nets.heads.ConvHead moved to "
                                            "specdiff_train.drafters.medusa.ConvHead; write that class_path in the config.")


# --- conditional targets: drafters distilled on the guided outputs -------------------------------------------
@pytest.fixture(scope="module")
def conditional_toy2d(tmp_path_factory):
    mlp = {"class_path": "specdiff_train.nets.MLPDenoiser",
           "init_args": {"dim": 2, "hidden": 32, "depth": 1, "time_embed_dim": 16, "num_classes": 4}}
    return save_target(tmp_path_factory.mktemp("cond") / "cond.ckpt", mlp)


@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
def test_drafters_of_a_conditional_target_train_on_its_guided_outputs(kind, conditional_toy2d, monkeypatch):
    from specdiff_train.drafters import DraftDistillation

    if kind == "draftnet":
        module = DraftDistillation(MLPDenoiser(dim=2, hidden=8, depth=1, time_embed_dim=8, num_classes=4),
                                   str(conditional_toy2d), num_steps=20, trajectory_fraction=0.5,
                                   trajectory_chains=8, guidance_scale=3.0)
    else:
        module = HeadDistillation(MLPHead(feature_dim=32, hidden=8, depth=1, max_offset=4), str(conditional_toy2d),
                                  num_steps=20, trajectory_fraction=0.5, trajectory_chains=8, guidance_scale=3.0)
    assert module.hparams["guidance_scale"] == 3.0 and module.hparams["num_classes"] == 4
    seen = []  # every target call is guided, with one label per row
    original = module.target_output
    monkeypatch.setattr(module, "target_output", lambda x, t, labels=None, **kw: (
        seen.append(None if labels is None else len(labels) == len(x)), original(x, t, labels, **kw))[1])
    batch = (torch.randn(16, 2), torch.arange(16) % 4)
    x0, labels = module._data(batch, torch.Generator().manual_seed(0))  # with the target's label dropout
    loss, _, _, _ = module.losses(x0, torch.Generator().manual_seed(1), labels)
    assert torch.isfinite(loss) and seen and all(seen)
    loss.backward()
    with pytest.raises(ValueError, match="data.label_column"):
        module._data(torch.randn(4, 2))
    with pytest.raises(ValueError, match="model.init_args.guidance_scale"):
        HeadDistillation(MLPHead(feature_dim=32, hidden=8, depth=1), str(conditional_toy2d), guidance_scale=-1.0)


def test_a_drafter_trained_for_another_guidance_scale_warns(conditional_toy2d):
    target = load_target(conditional_toy2d)
    drafter = DraftNetworkDrafter.from_net(MLPDenoiser(dim=2, hidden=8, depth=1, time_embed_dim=8, num_classes=4),
                                           target.schedule, (2,))
    drafter.trained_guidance_scale = 3.0
    with pytest.warns(UserWarning, match="trained for guidance scale 3, sampling uses 2"):
        out = speculative_sample(target, target.schedule, (2,), num_steps=20, seeds=range(6), drafter=drafter,
                                 labels=[0, 1, 2, 3, None, 1], guidance_scale=2.0, window=4)
    assert torch.isfinite(out.samples).all()


def test_sampling_at_another_step_count_than_trained_warns():
    """A drafter distilled for the 100-step sampler, used at 40 steps: exact, but its acceptance is not what it was
    trained for; the warning names the step counts and the fix. At 100 steps: no warning."""
    target = load_target(ROOT / "checkpoints" / "toy2d" / "target.ckpt").eval()
    drafter = lambda: MedusaDrafter(str(ROOT / "checkpoints" / "toy2d" / "medusa.ckpt"))  # noqa: E731
    kw = dict(seeds=range(4), window=4)
    with pytest.warns(UserWarning, match=r"trained for the 100-step sampler, sampling uses 40 steps.*--model.init_args.num_steps 40"):
        speculative_sample(target, target.schedule, target.sample_shape, num_steps=40, drafter=drafter(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        speculative_sample(target, target.schedule, target.sample_shape, num_steps=100, drafter=drafter(), **kw)


@pytest.mark.parametrize("name", ["medusa_1000.ckpt", "medusa_1000_long.ckpt"])
def test_the_shipped_1000_step_heads_belong_to_the_digits_target(name):
    from specdiff_train.drafters.checkpoints import drafter_target_warning, recorded_acceptance

    path = ROOT / "checkpoints" / "digits" / name
    drafter = MedusaDrafter(str(path))
    assert drafter.trained_num_steps == 1000 and recorded_acceptance(path)["num_steps"] == 1000
    assert drafter_target_warning(path, load_target(ROOT / "checkpoints" / "digits" / "target.ckpt")) is None
