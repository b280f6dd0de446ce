"""Learned and training-free drafters for every sampler family (ALGORITHMS.md sections 5 and 8): EDM
(`EulerAncestral`), flow matching (`FlowEulerMaruyama`) and DDPM targets sampled with `DDIM(eta=0.5)`.

Tiny untrained MLP targets suffice: what is checked is that the distillation loss is each chain's own
delta^2 = |coef_x0 (x0_P - x0_Q)|^2 / std^2 (against the chain's transition at the same states), that
training steps run and lower it, that the checkpoint records the chain and rebuilds it, that speculative
sampling runs with the drafter on that chain, and that a chain of another class is refused and other
settings of the same class are warned about."""
import warnings

import pytest
import torch
from lightning.pytorch import Trainer

from helpers import TinyDataModule, find_one, run_train, train_on_fixed_states
from specdiff_train.chains import (
    DDIM,
    DDPMAncestral,
    DDPMSchedule,
    EDMSchedule,
    EulerAncestral,
    FlowEulerMaruyama,
    FlowSchedule,
)
from specdiff_train.drafters import (
    DraftDistillation,
    DraftNetworkDrafter,
    FreeDrafter,
    FrozenTargetDrafter,
    HeadDistillation,
    MedusaDrafter,
    MLPHead,
    export_slim_drafter,
    relative_draft_cost,
)
from specdiff_train.drafters.distillation import NUM_BUCKETS, target_rollout, target_trajectories, time_bucket
from specdiff_train.drafters.medusa import medusa_x0
from specdiff_train.models import TargetDiffusion, load_target
from specdiff_train.nets import MLPDenoiser
from specdiff_train.speculative import speculative_sample
from specdiff_train.testing import GaussianDataDenoiser, closed_form_marginal, marginal_test

NUM_STEPS = 10
FAMILIES = {  # name -> (target schedule, the chain the drafters are trained for, the same class with other settings)
    "edm": (lambda: EDMSchedule(sigma_max=20.0), EulerAncestral(), EulerAncestral(eta=0.7)),
    "flow": (FlowSchedule, FlowEulerMaruyama(churn=1.0), FlowEulerMaruyama(churn=0.5)),
    "ddim": (DDPMSchedule, DDIM(eta=0.5), DDIM(eta=1.0)),
}
MEAN, VAR = torch.tensor([0.8, -0.5]), 0.2
MLP = {"class_path": "specdiff_train.nets.MLPDenoiser", "init_args": {"dim": 2, "hidden": 16, "depth": 1, "time_embed_dim": 8}}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Slim checkpoints of untrained tiny MLP targets, one per family (what `load_target` reads)."""
    root, paths = tmp_path_factory.mktemp("family_targets"), {}
    for name, (schedule, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = TargetDiffusion(net=MLP, schedule=schedule())
        paths[name] = root / f"{name}.ckpt"
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, paths[name])
    return paths


def draft_module(kind: str, path, chain, **kwargs):
    torch.manual_seed(0)
    if kind == "draftnet":
        return DraftDistillation(MLPDenoiser(hidden=8, depth=1, time_embed_dim=8), str(path), num_steps=NUM_STEPS,
                                 chain=chain, **kwargs)
    head = MLPHead(feature_dim=16, hidden=8, depth=1, time_embed_dim=8, max_offset=3)
    torch.nn.init.normal_(head.out.weight, std=0.3)  # a fresh head is zero (the Free Drafter): make it differ
    return HeadDistillation(head, str(path), num_steps=NUM_STEPS, chain=chain, **kwargs)


def save_drafter(module, path):
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


# --- the loss is the chain's own delta^2 ----------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_draft_network_loss_is_the_chains_delta_squared(family, targets):
    module = draft_module("draftnet", targets[family], FAMILIES[family][1])
    plan, x0 = module.plan, torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert plan.chain == FAMILIES[family][1] and plan.schedule == module.target.schedule
    _, delta_sq, k, _ = module.losses(x0, torch.Generator().manual_seed(1))
    x, k_again, _, _ = module.start_states(x0, torch.Generator().manual_seed(1), plan.num_stochastic_steps)  # the same states
    assert torch.equal(k, k_again)
    t = plan.t(k)
    with torch.no_grad():
        mean_p, std = plan.transition(x.double(), k, module.target(x, t).double())
        mean_q, _ = plan.transition(x.double(), k, module(x, t).double())
    expected = ((mean_p - mean_q) / std[:, None]).pow(2).sum(1)
    torch.testing.assert_close(delta_sq.double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_loss_is_the_chains_delta_squared(family, targets):
    """The heads' states are the target's own chain continued from the anchor; at each, the loss is delta^2
    between the chain's step from the target's x0 and from the heads' x0."""
    module = draft_module("medusa", targets[family], FAMILIES[family][1])
    plan, K, S = module.plan, module.head.max_offset, module.plan.num_stochastic_steps
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    _, delta_sq, k, _ = module.losses(x0, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # the same anchors and rollout noise as the loss drew
    x_m, m, _, _ = module.start_states(x0, gen, S - 1)
    with torch.no_grad():
        out_m, features = module.target(x_m, plan.t(m), return_features=True)
        states, steps, outputs = target_rollout(module.target, plan, x_m, m, out_m, K, gen)
        x, ks, out = torch.cat(states), torch.cat(steps), torch.cat(outputs)
        keep = ks < S
        offsets = torch.arange(1, K + 1).repeat_interleave(len(x0))[keep]
        anchor = lambda v: v.repeat(K, *([1] * (v.dim() - 1)))[keep]  # noqa: E731
        x, ks, out = x[keep], ks[keep], out[keep]
        anchor_x0 = module.schedule.to_x0(out_m, x_m, plan.t(m))
        x0_q = medusa_x0(module.head, module.schedule, anchor(features), anchor(x_m), anchor(anchor_x0), x,
                         plan.t(ks), offsets, anchor(plan.t(m)))
        mean_p, std = plan.transition(x.double(), ks, out.double())
        mean_q, _ = plan.transition_from_x0(x.double(), ks, x0_q.double())
    assert torch.equal(k, ks)
    torch.testing.assert_close(delta_sq.double(), ((mean_p - mean_q) / std[:, None]).pow(2).sum(1), rtol=2e-4, atol=1e-6)


def test_time_buckets_and_trajectories_follow_the_chain(targets):
    """Validation buckets come from the plan's time fraction (EDM: log sigma), and the trajectory pool starts
    from the chain's initial std (EDM: sigma_max)."""
    module = draft_module("draftnet", targets["edm"], None)
    plan = module.plan
    k = torch.arange(plan.num_steps)
    expected = (plan.time_fraction * NUM_BUCKETS).floor().clamp(0, NUM_BUCKETS - 1).long()
    assert torch.equal(time_bucket(plan, k), expected) and expected[0] == NUM_BUCKETS - 1 and expected[-1] == 0
    pool = target_trajectories(module.target, plan, 512, (2,), torch.Generator().manual_seed(0))
    assert pool.shape == (plan.num_stochastic_steps, 512, 2)
    assert pool[0].std().item() == pytest.approx(plan.initial_std, rel=0.1) and plan.initial_std == 20.0
    ddpm = DDPMSchedule().plan(20)
    assert torch.equal(time_bucket(ddpm, torch.arange(20)), (ddpm.timesteps.double() / 1000 * 5).floor().long())


# --- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_few_training_steps_lower_the_loss(family, kind, targets):
    module = draft_module(kind, targets[family], FAMILIES[family][1], objective="tv")
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    losses = [loss for loss, _ in train_on_fixed_states(module, x0, steps=15, seed=1)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heads_train_on_their_own_drafted_paths(family, targets):
    """`draft_rollout_fraction`: training states on the heads' own path lower the loss as well; bad values name the field."""
    module = draft_module("medusa", targets[family], FAMILIES[family][1], objective="tv", draft_rollout_fraction=1.0)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    losses = [loss for loss, _ in train_on_fixed_states(module, x0, steps=15, seed=1)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert module.hparams["draft_rollout_fraction"] == 1.0
    with pytest.raises(ValueError, match="model.init_args.draft_rollout_fraction"):
        draft_module("medusa", targets[family], FAMILIES[family][1], draft_rollout_fraction=1.5)


def test_lightning_fit_with_a_chain_config_records_it(targets, tmp_path):
    """The Lightning loop (training and validation steps, the trajectory pool, the per-time logs) on an EDM target,
    with the chain given as YAML gives it (a dict); the checkpoint records it."""
    config = {"class_path": "specdiff_train.chains.EulerAncestral", "init_args": {"eta": 0.7}}
    module = draft_module("draftnet", targets["edm"], config, trajectory_fraction=0.5, trajectory_chains=8)
    assert module.plan.chain == EulerAncestral(eta=0.7)
    trainer = Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, TinyDataModule(num_samples=64, batch_size=16))
    assert {"val/delta", "val/acceptance"} <= set(trainer.callback_metrics)
    assert any(name.startswith("val/acceptance_t") for name in trainer.callback_metrics)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    drafter = DraftNetworkDrafter(str(export_slim_drafter(ckpt, tmp_path / "slim.ckpt")))
    assert drafter.trained_chain == EulerAncestral(eta=0.7) and drafter.target_schedule == EDMSchedule(sigma_max=20.0)


def test_cli_fit_takes_the_chain_from_the_command_line(targets, tmp_path):
    """`--model.init_args.chain` as in YAML (a flow-matching target, heads): recorded, and the drafter samples it."""
    run_train("fit", "--config", "configs/drafter/toy2d_medusa.yaml", "--model.init_args.target_ckpt", targets["flow"],
              "--model.init_args.chain", "{class_path: specdiff_train.chains.FlowEulerMaruyama, init_args: {churn: 0.5}}",
              "--model.init_args.num_steps", str(NUM_STEPS), "--model.init_args.head.init_args.feature_dim", "16",
              "--model.init_args.head.init_args.hidden", "8", "--data.init_args.batch_size", "32",
              "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false")
    drafter = MedusaDrafter(str(find_one(tmp_path, "last.ckpt")))
    assert drafter.trained_chain == FlowEulerMaruyama(churn=0.5) and drafter.target_schedule == FlowSchedule()
    target = load_target(targets["flow"])
    out = speculative_sample(target, target.schedule, (2,), num_steps=NUM_STEPS, seeds=range(4), drafter=drafter,
                             chain=FlowEulerMaruyama(churn=0.5), window=3)
    assert torch.isfinite(out.samples).all()


# --- checkpoints and sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_records_the_chain_and_samples_with_it(family, kind, targets, tmp_path):
    schedule, chain, _ = FAMILIES[family]
    module = draft_module(kind, targets[family], chain)
    assert module.hparams["chain"] == {"class_path": f"specdiff_train.chains.{type(chain).__name__}",
                                       "init_args": chain.config()}
    drafter_cls = DraftNetworkDrafter if kind == "draftnet" else MedusaDrafter
    drafter = drafter_cls(str(save_drafter(module, tmp_path / "drafter.ckpt")))
    assert drafter.trained_chain == chain and drafter.target_schedule == schedule()
    target = load_target(targets[family])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the chain it was trained for: no warning
        out = speculative_sample(target, target.schedule, (2,), num_steps=NUM_STEPS, seeds=range(16), drafter=drafter,
                                 chain=chain, window=3)
    assert torch.isfinite(out.samples).all() and out.stats["draft_calls"] > 0
    assert 0 < out.stats["acceptance_rate"] <= 1
    cost = relative_draft_cost(drafter, target, target.schedule, (2,), num_steps=NUM_STEPS, batch_size=4, repeats=1)
    assert cost["draft_s"] > 0  # bound with the chain the drafter was trained for


@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sampling_with_a_learned_drafter_is_exact_on_every_chain(family, kind):
    """Gaussian data (the exact denoiser of each family): the samples have the chain's closed-form marginal."""
    schedule, chain = FAMILIES[family][0](), FAMILIES[family][1]
    model = GaussianDataDenoiser(schedule, MEAN, VAR)
    torch.manual_seed(0)
    if kind == "draftnet":
        drafter = DraftNetworkDrafter.from_net(MLPDenoiser(hidden=16, depth=1, time_embed_dim=8), schedule, (2,), chain)
    else:  # the Gaussian denoiser's features are (x, output): 4 numbers
        head = MLPHead(feature_dim=4, hidden=16, depth=1, time_embed_dim=8, max_offset=3)
        torch.nn.init.normal_(head.out.weight, std=0.1)
        drafter = MedusaDrafter.from_head(head, schedule, (2,), chain)
    out = speculative_sample(model, schedule, (2,), num_steps=NUM_STEPS, seeds=range(4000), drafter=drafter,
                             chain=chain, window=4)
    mu, var = closed_form_marginal(schedule, NUM_STEPS, MEAN, VAR, chain=chain)
    report = marginal_test(out.samples, mu.expand(2), var.expand(2))
    assert report["ks_p"] > 1e-4 and report["mean_z"] < 4.5 and report["var_z"] < 4.5, report
    assert 0 < out.stats["acceptance_rate"] < 1 and out.stats["draft_calls"] > 0


def test_a_checkpoint_without_a_recorded_chain_is_for_the_schedules_default(targets, tmp_path):
    module = draft_module("draftnet", targets["ddim"], None)
    assert module.plan.chain == DDPMAncestral()
    path = save_drafter(module, tmp_path / "old.ckpt")
    old = torch.load(path, weights_only=True)  # as written before chains and other families were recorded
    del old["hyper_parameters"]["chain"], old["hyper_parameters"]["schedule_class"]
    torch.save(old, path)
    drafter = DraftNetworkDrafter(str(path))
    assert drafter.trained_chain == DDPMAncestral() and drafter.target_schedule == DDPMSchedule()


@pytest.mark.parametrize("family", ["edm", "flow"])
@pytest.mark.parametrize("name", ["free-x0", "free-eps", "free-increment", "frozen-eps"])
def test_training_free_drafters_sample_every_family(family, name, targets):
    target = load_target(targets[family])
    cls, freeze = (FreeDrafter if name.startswith("free") else FrozenTargetDrafter), name.split("-")[1]
    out = speculative_sample(target, target.schedule, (2,), num_steps=NUM_STEPS, seeds=range(16),
                             drafter=cls(freeze=freeze), chain=FAMILIES[family][1], window=3)
    assert torch.isfinite(out.samples).all() and out.stats["draft_calls"] > 0


# --- another chain: refused (another class) or warned about (other settings) ----------------------------------
@pytest.mark.parametrize("kind", ["draftnet", "medusa"])
def test_a_chain_of_another_class_is_refused_and_other_settings_warn(kind, targets, tmp_path):
    drafter_cls = DraftNetworkDrafter if kind == "draftnet" else MedusaDrafter
    target = load_target(targets["ddim"])
    sample = lambda drafter, chain: speculative_sample(  # noqa: E731
        target, target.schedule, (2,), num_steps=NUM_STEPS, seeds=range(4), drafter=drafter, chain=chain, window=2)
    ancestral = drafter_cls(str(save_drafter(draft_module(kind, targets["ddim"], None), tmp_path / "a.ckpt")))
    with pytest.raises(ValueError, match=r"^chain: drafter .*was trained for the chain DDPMAncestral\(\), but sampling "
                                         r"uses DDIM\(eta=0.5\); sample with chain=DDPMAncestral\(\).*init_args.chain"):
        sample(ancestral, DDIM(eta=0.5))
    ddim = drafter_cls(str(save_drafter(draft_module(kind, targets["ddim"], DDIM(eta=0.5)), tmp_path / "d.ckpt")))
    with pytest.raises(ValueError, match=r"trained for the chain DDIM\(eta=0.5\), but sampling uses DDPMAncestral"):
        sample(ddim, None)
    with pytest.warns(UserWarning, match=r"trained for DDIM\(eta=0.5\), sampling uses DDIM\(eta=1.0\): samples stay exact"):
        assert torch.isfinite(sample(ddim, DDIM(eta=1.0)).samples).all()
    with warnings.catch_warnings():  # DDIM(eta=1) is DDPM ancestral sampling (the same tables): accepted silently
        warnings.simplefilter("error")
        assert torch.isfinite(sample(ancestral, DDIM(eta=1.0)).samples).all()
    edm = drafter_cls(str(save_drafter(draft_module(kind, targets["edm"], None), tmp_path / "e.ckpt")))
    with pytest.raises(ValueError, match="trained for another target: schedule: EDMSchedule != DDPMSchedule"):
        sample(edm, None)  # another family's target: the schedule is refused first


@pytest.mark.parametrize("family", ["edm", "flow"])
def test_other_settings_of_the_same_family_warn_for_in_memory_drafters(family, targets):
    _, chain, other = FAMILIES[family]
    target = load_target(targets[family])
    torch.manual_seed(0)
    drafter = DraftNetworkDrafter.from_net(MLPDenoiser(hidden=8, depth=1, time_embed_dim=8), target.schedule, (2,),
                                           chain=chain)
    with pytest.warns(UserWarning, match=f"trained for {type(chain).__name__}.*sampling uses {type(other).__name__}"):
        speculative_sample(target, target.schedule, (2,), num_steps=NUM_STEPS, seeds=range(4), drafter=drafter,
                           chain=other, window=2)


def test_training_refuses_chains_that_do_not_fit(targets):
    with pytest.raises(ValueError, match=r"model.init_args.chain: DDIM\(eta=1.0\) samples targets trained with a 'ddpm'"):
        draft_module("draftnet", targets["edm"], DDIM())
    with pytest.raises(ValueError, match="model.init_args.chain: .*no stochastic step.*eta in"):
        draft_module("draftnet", targets["ddim"], DDIM(eta=0.0))
    with pytest.raises(ValueError, match="model.init_args.chain: expected a specdiff_train.chains chain"):
        draft_module("medusa", targets["flow"], {"class_path": "torch.nn.Linear"})
    with pytest.raises(ValueError, match="mode: 'data' trains the draft net with the eps loss.*EDMSchedule"):
        draft_module("draftnet", targets["edm"], None, mode="data")
    # the draft net's num_train_steps is compared only with a schedule that has some
    DraftDistillation(MLPDenoiser(hidden=8, depth=1, num_train_steps=500), str(targets["flow"]), num_steps=NUM_STEPS)
