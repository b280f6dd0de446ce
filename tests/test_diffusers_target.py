"""diffusers DDPM pipelines as targets (models/diffusers_target.py), offline, on tiny randomly initialised
`UNet2DModel` + `DDPMScheduler` pipelines saved to temporary folders: the outputs are the UNet's, the
schedule the scheduler's, one ancestral step `DDPMScheduler.step`; speculative sampling is exact on them
(per-step tests, and a closed-form chain through a pipeline); drafters train against them through the CLI,
and evaluate reports on them; everything the sampler cannot reproduce is refused, naming the setting."""
import functools
import json
import shutil

import pytest
import torch

from helpers import find_one, run_train, save_tiny_pipeline, train_on_fixed_states
from specdiff_train.config_io import target_fingerprint
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.drafters import ConvHead, HeadDistillation, check_drafter_target, export_slim_drafter
from specdiff_train.models import DiffusersTarget, load_target
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FrozenTargetDrafter, MedusaDrafter, speculative_sample
from specdiff_train.speculative.verify import verify_block
from specdiff_train.testing import TransitionRecorder, marginal_test, path_test

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny", clip_sample=True)


@pytest.fixture(scope="module")
def target(pipeline):
    return load_target(pipeline)


def reference_unet(folder):
    return diffusers.UNet2DModel.from_pretrained(str(folder), subfolder="unet").eval()


# --- the target behaves like ours --------------------------------------------------------------------
@torch.no_grad()
def test_outputs_and_features_are_the_unets(pipeline, target):
    assert isinstance(target, DiffusersTarget) and not target.training
    assert not any(p.requires_grad for p in target.parameters())
    assert target.sample_shape == (1, 8, 8) and target.net.feature_dim == 8
    assert target.checkpoint_info["path"] == str(pipeline)
    unet = reference_unet(pipeline)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 1, 8, 8, generator=gen), torch.tensor([0, 1, 250, 500, 999])
    expected = unet(x, t).sample
    assert torch.equal(target(x, t), expected)
    seen = []  # the features, read independently: the input of the UNet's output norm
    handle = unet.conv_norm_out.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    unet(x, t)
    handle.remove()
    out, features = target(x, t, return_features=True)
    assert torch.equal(out, expected) and torch.equal(features, seen[0]) and features.shape == (5, 8, 8, 8)
    assert not target.net.unet.up_blocks[-1]._forward_hooks  # the hook is removed after the pass


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_schedule_is_the_schedulers(tmp_path, beta_schedule, prediction_type):
    options = dict(num_train_timesteps=500, beta_schedule=beta_schedule, prediction_type=prediction_type,
                   beta_start=0.00085, beta_end=0.012, clip_sample=prediction_type == "sample", clip_sample_range=1.5)
    folder = save_tiny_pipeline(tmp_path / "p", **options)
    schedule = load_target(folder).schedule
    ref = diffusers.DDPMScheduler(**options)
    assert schedule.num_train_steps == 500
    assert schedule.prediction == {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction_type]
    assert schedule.clip_denoised == options["clip_sample"] and schedule.clip_range == 1.5
    torch.testing.assert_close(schedule.betas, ref.betas.double(), rtol=0, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=0)  # ref: float32


@pytest.mark.parametrize("prediction_type,clip", [("epsilon", True), ("v_prediction", False), ("sample", True)])
@pytest.mark.parametrize("num_steps", [1000, 50])
@torch.no_grad()
def test_one_ancestral_step_is_ddpm_scheduler_step(tmp_path, prediction_type, clip, num_steps):
    """Every step of the plan, from states at that step, with the pipeline's own UNet output: our mean
    plus our std times the noise diffusers draws equals `DDPMScheduler.step`'s prev_sample."""
    folder = save_tiny_pipeline(tmp_path / "p", prediction_type=prediction_type, clip_sample=clip)
    target = load_target(folder)
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    scheduler.set_timesteps(num_steps)
    plan = target.schedule.plan(num_steps)
    assert torch.equal(plan.timesteps, scheduler.timesteps.long())
    gen = torch.Generator().manual_seed(1)
    k = torch.arange(num_steps)
    x = 2 * torch.randn(num_steps, *target.sample_shape, generator=gen)
    output = target(x, plan.t(k))
    mean, std = plan.transition(x, k, output)
    for i in range(0, num_steps, max(1, num_steps // 25)):
        t = int(plan.timesteps[i])
        step = scheduler.step(output[i:i + 1], t, x[i:i + 1], generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(1, *target.sample_shape, generator=torch.Generator().manual_seed(i))
        ours = mean[i:i + 1] + (std[i] * noise if t > 0 else 0)
        torch.testing.assert_close(ours, step, rtol=1e-5, atol=1e-5)


# --- sampling -----------------------------------------------------------------------------------------
class OnePixelBiasedDrafter(FrozenTargetDrafter):
    """The frozen-target draft pushed one std off at one pixel: rejections are common, so a wrong
    correction would show in the transitions' law."""

    def propose(self, slots, x, k):
        mean = super().propose(slots, x, k).clone()
        mean.view(len(mean), -1)[:, 0] += self.plan.std_at(k).to(mean.dtype)
        return mean


def random_heads(feature_dim: int = 8) -> ConvHead:
    torch.manual_seed(0)
    head = ConvHead(in_channels=1, image_size=8, feature_dim=feature_dim, hidden=8, depth=1, time_embed_dim=8,
                    max_offset=4)
    torch.nn.init.normal_(head.out.weight, std=0.05)  # a fresh head drafts as the Free Drafter: make it differ
    return head


def assert_increments_standard_normal(recorder, num_samples):
    steps, _, z = recorder.by_step()
    assert len(steps) == num_samples * recorder.plan.num_steps  # every chain, every step, once
    for k in range(recorder.plan.num_stochastic_steps):
        rows = z[steps == k]
        report = marginal_test(rows, torch.zeros(rows.shape[1], dtype=torch.float64), torch.ones(rows.shape[1], dtype=torch.float64))
        assert report["mean_z"] < 4.8 and report["var_z"] < 4.8 and report["ks_p"] > 1e-5, (k, report)


@torch.no_grad()
def test_ancestral_and_speculative_sampling_are_exact_on_the_pipeline(target):
    """Ancestral samples are the chain's; speculative sampling with Medusa heads on the UNet's features:
    every transition of every chain is the target's ancestral step (standardised increments N(0, I))."""
    schedule, shape, num_steps, n = target.schedule, target.sample_shape, 10, 1500
    samples = ancestral_sample(target, schedule, shape, num_steps=num_steps, seeds=range(8))
    assert samples.shape == (8, *shape) and torch.isfinite(samples).all()
    drafter = MedusaDrafter.from_head(random_heads(), schedule, shape)
    recorder = TransitionRecorder(verify_block, schedule.plan(num_steps))
    result = speculative_sample(target, schedule, shape, num_steps=num_steps, seeds=range(n), drafter=drafter,
                                window=4, verifier=recorder, batch_size=n)
    assert result.samples.shape == (n, *shape) and torch.isfinite(result.samples).all()
    assert 0 < result.stats["acceptance_rate"] < 1 and result.stats["target_calls_per_sample"] < num_steps
    assert_increments_standard_normal(recorder, n)


@torch.no_grad()
def test_closed_form_chain_through_a_pipeline(tmp_path):
    """A pipeline whose UNet outputs eps = 0 (conv_out zeroed; no clipping): the ancestral chain is linear-
    Gaussian with known marginals, x_{k+1} ~ N(a_k x_k, s_k^2), a_k = coef_x0 / sqrt(abar) + coef_xt. Every
    step's states (and increments) of speculative sampling with a biased drafter are tested against them."""
    folder = save_tiny_pipeline(tmp_path / "p", clip_sample=False)
    unet = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder="unet")
    torch.nn.init.zeros_(unet.conv_out.weight), torch.nn.init.zeros_(unet.conv_out.bias)
    unet.save_pretrained(str(folder / "unet"))
    target = load_target(folder)
    num_steps, n, plan = 10, 3000, target.schedule.plan(10)
    abar = target.schedule.alphas_cumprod[plan.timesteps]
    slope = plan.coef_x0 / abar.sqrt() + plan.coef_xt
    variance, variances = torch.tensor(1.0, dtype=torch.float64), []
    for k in range(num_steps):
        variance = slope[k] ** 2 * variance + plan.std[k] ** 2
        variances.append(variance)
    d = 64
    means, variances = torch.zeros(num_steps, d, dtype=torch.float64), torch.stack(variances)[:, None].expand(-1, d)
    recorder = TransitionRecorder(verify_block, plan)
    speculative_sample(target, target.schedule, target.sample_shape, num_steps=num_steps, seeds=range(n),
                       drafter=OnePixelBiasedDrafter(), window=4, verifier=recorder, batch_size=n)
    recorder.after = [a.reshape(len(a), -1) for a in recorder.after]
    recorder.z = [z.reshape(len(z), -1) for z in recorder.z]
    report = path_test(recorder, means, variances)
    assert report["samples_per_step"] == (n, n), report
    for key in ("mean_z", "var_z", "inc_mean_z", "inc_var_z"):
        assert report[key] < 4.8, report
    assert report["ks_p"] > 1e-5 and report["inc_ks_p"] > 1e-5, report


# --- drafters against a pipeline -----------------------------------------------------------------------
def test_heads_train_against_a_pipeline_and_record_it(pipeline, target):
    module = HeadDistillation(random_heads(), str(pipeline), num_steps=20)
    assert module.hparams["target_ckpt"] == str(pipeline)
    assert module.hparams["target_fingerprint"] == target_fingerprint(target)
    assert module.hparams["schedule"] == target.schedule.config()
    with pytest.raises(ValueError, match="feature_dim 8"):
        HeadDistillation(ConvHead(feature_dim=32), str(pipeline))
    loss, delta_sq, steps, _ = module.losses(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad and delta_sq.shape == steps.shape


def test_a_draft_network_learns_a_clipping_pipeline(pipeline, target, tmp_path):
    """google/ddpm-cifar10-32 clips x0 (clip_sample: true): a draft network trains against such a pipeline,
    and a few steps on fixed states cut its delta^2 (the loss compares x0 as the sampler uses it)."""
    from specdiff_train.drafters import DraftDistillation
    from specdiff_train.nets import UNet

    assert target.schedule.clip_denoised
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
               attention_levels=(), num_heads=1)
    module = DraftDistillation(net, str(pipeline), num_steps=20)
    assert module.hparams["target_ckpt"] == str(pipeline)
    x0 = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean_delta_sq = [delta_sq for _, delta_sq in train_on_fixed_states(module, x0, steps=40, seed=2)]
    assert mean_delta_sq[-1] < 0.5 * mean_delta_sq[0], mean_delta_sq

    x0_pipeline = save_tiny_pipeline(tmp_path / "x0", prediction_type="sample")  # distillation takes any prediction
    assert DraftDistillation(net, str(x0_pipeline)).schedule.prediction == "x0"
    with pytest.raises(ValueError, match="mode: 'data' trains the draft net with the eps loss"):
        DraftDistillation(net, str(x0_pipeline), mode="data")


def test_fit_heads_then_evaluate_through_the_cli(pipeline, target, tmp_path):
    """`fit` trains heads against the pipeline folder (digits data fit its 1x8x8 UNet), the checkpoint records
    it, and `evaluate --ckpt_path <pipeline>` reports them with no target config and no fingerprint warning."""
    run_train("fit", "--config", "configs/drafter/digits_medusa.yaml", "--model.init_args.target_ckpt", pipeline,
              "--model.init_args.num_steps", "20", "--model.init_args.head.init_args.feature_dim", "8",
              "--model.init_args.head.init_args.hidden", "8", "--model.init_args.trajectory_chains", "8",
              "--data.init_args.batch_size", "8", "--trainer.default_root_dir", tmp_path / "fit",
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false")
    heads = export_slim_drafter(find_one(tmp_path / "fit", "last.ckpt"), tmp_path / "medusa.ckpt")
    hparams = torch.load(heads, weights_only=True)["hyper_parameters"]
    assert hparams["target_ckpt"] == str(pipeline) and hparams["target_fingerprint"] == target_fingerprint(target)
    drafter = MedusaDrafter(str(heads))
    assert check_drafter_target(drafter, target) is None

    config = tmp_path / "eval.yaml"
    config.write_text(
        "drafters:\n  - free-x0\n  - class_path: specdiff_train.speculative.MedusaDrafter\n"
        f"    init_args: {{checkpoint: {heads}}}\n"
        "verifiers: [block]\nwindows: [4]\nnum_steps: [20]\nnum_samples: 200\nbatch_size: 200\nnum_permutations: 100\n"
    )
    out = tmp_path / "report"
    proc = run_train("evaluate", "--ckpt_path", pipeline, "--config", config, "--trainer.logger", "false",
                     "--out_dir", out)
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"ancestral", "free-x0/block/w4", "medusa/block/w4"}, proc.stdout
    assert report["config"]["ckpt_path"] == str(pipeline) and report["warnings"] == []
    assert all(r["exact_ok"] for name, r in rows.items() if name != "ancestral")
    assert rows["medusa/block/w4"]["target_calls_per_sample"] < 20


# --- refusals ------------------------------------------------------------------------------------------
def _edit(folder, part: str, **changes):
    path = folder / part
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


SCHEDULER = "scheduler/scheduler_config.json"
UNET = "unet/config.json"
REFUSALS = {
    "dpm_solver": (SCHEDULER, {"_class_name": "DPMSolverMultistepScheduler"},
                   r"_class_name: 'DPMSolverMultistepScheduler' is not a scheduler of a DDPM-trained UNet"),
    "fixed_large": (SCHEDULER, {"variance_type": "fixed_large"}, r"variance_type: 'fixed_large'.*fixed_small"),
    "learned": (SCHEDULER, {"variance_type": "learned_range"}, r"variance_type: 'learned_range'.*own variance"),
    "thresholding": (SCHEDULER, {"thresholding": True}, r"thresholding: true is not supported"),
    "zero_snr": (SCHEDULER, {"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr"),
    "trained_betas": (SCHEDULER, {"trained_betas": [0.1] * 1000}, r"trained_betas"),
    "sigmoid": (SCHEDULER, {"beta_schedule": "sigmoid"}, r"beta_schedule: 'sigmoid' is not supported"),
    "class_embed_type": (UNET, {"class_embed_type": "timestep"}, r"class_embed_type: 'timestep' is not supported.*table"),
    "num_class_embeds": (UNET, {"num_class_embeds": 0}, r"num_class_embeds: expected null or an int >= 1, got 0"),
    "text_conditional": (UNET, {"_class_name": "UNet2DConditionModel"}, r"UNet2DConditionModel.*text-conditional"),
    "fourier": (UNET, {"time_embedding_type": "fourier"}, r"time_embedding_type: 'fourier'"),
    "learned_variance_unet": (UNET, {"out_channels": 2}, r"out_channels: 2 != in_channels 1"),
    "steps_differ": (UNET, {"num_train_timesteps": 500}, r"num_train_timesteps: 500 != the scheduler's"),
    "pipeline_class": ("model_index.json", {"_class_name": "LDMPipeline"}, r"_class_name 'LDMPipeline' is not a DDPM"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_the_sampler_cannot_reproduce_is_refused(pipeline, tmp_path, case):
    part, changes, message = REFUSALS[case]
    folder = tmp_path / "p"
    shutil.copytree(pipeline, folder)
    _edit(folder, part, **changes)
    with pytest.raises(ValueError, match=message) as err:
        load_target(folder)
    assert "\n" not in str(err.value)  # one line


def test_folders_that_are_not_pipelines_are_refused(pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline \\(no model_index.json\\)"):
        load_target(tmp_path / "empty")
    for part, what in (("scheduler", "scheduler config"), ("unet", "UNet config")):
        folder = tmp_path / f"no_{part}"
        shutil.copytree(pipeline, folder)
        shutil.rmtree(folder / part)
        with pytest.raises(ValueError, match=f"has no {what}"):
            load_target(folder)


def test_respacing_settings_are_the_samplers_own(pipeline, tmp_path):
    """timestep_spacing / steps_offset say how a pipeline respaces its steps, not what the model learned:
    accepted, and the schedule is the same."""
    folder = tmp_path / "p"
    shutil.copytree(pipeline, folder)
    _edit(folder, SCHEDULER, timestep_spacing="trailing", steps_offset=1)
    assert load_target(folder).schedule == load_target(pipeline).schedule


def test_a_hub_id_offline_says_the_network_is_needed_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="needs the network once.*HF_HUB_OFFLINE"):
        load_target("specdiff-tests/no-such-pipeline")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing checkpoint file is not a hub id
        load_target("checkpoints/no-such.ckpt")


def test_a_hub_id_loads_through_the_hub_download(pipeline, target, monkeypatch):
    """With a network, a hub id is fetched by `DiffusionPipeline.download` (here: returns the tiny folder) and the
    target and the drafters trained against it record the hub id, not the cache folder."""
    asked = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", lambda repo_id, **kw: asked.append(repo_id) or str(pipeline))
    hub_target = load_target("google/ddpm-cifar10-32")
    assert asked == ["google/ddpm-cifar10-32"] and isinstance(hub_target, DiffusersTarget)
    assert hub_target.checkpoint_info["path"] == "google/ddpm-cifar10-32"
    assert target_fingerprint(hub_target) == target_fingerprint(target)
    module = HeadDistillation(random_heads(), "google/ddpm-cifar10-32", num_steps=20)
    assert module.hparams["target_ckpt"] == "google/ddpm-cifar10-32"


def test_other_verbs_refuse_a_pipeline_as_ckpt_path(pipeline):
    from specdiff_train.cli import pipeline_ckpt_path

    assert pipeline_ckpt_path(str(pipeline), "evaluate")
    with pytest.raises(ValueError, match="diffusers pipeline.*`fit` cannot use it.*target_ckpt"):
        pipeline_ckpt_path(str(pipeline), "fit")
    assert not pipeline_ckpt_path("checkpoints/toy2d/target.ckpt", "fit")


def test_the_sample_shape_from_the_data_must_fit(pipeline):
    with pytest.raises(ValueError, match=r"model.sample_shape.*\(3, 32, 32\).*\(1, 8, 8\)"):
        DiffusersTarget(str(pipeline), sample_shape=(3, 32, 32))


# --- class-conditional pipelines ---------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """One intra-op thread, as in the subprocesses (`helpers.offline_env`): several OpenMP threads per process
    thrash on a small busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cond_pipeline(tmp_path_factory):
    """A tiny class-conditional UNet2DModel (num_class_embeds 4, an embedding table) with a DDPMScheduler."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("cond") / "tiny", unet_kwargs={"num_class_embeds": 4})


def _with_null_class(folder, tmp_path, null_class):
    copy = tmp_path / f"null{null_class}"
    shutil.copytree(folder, copy)
    _edit(copy, UNET, _null_class=null_class)
    return copy


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_a_class_conditional_pipeline_is_a_conditional_target(cond_pipeline):
    """Without a declared null class: num_classes = num_class_embeds, labels are the class indices, outputs and
    features are the raw UNet's with the same class_labels, p_uncond 0 (no guidance); no label: a clear error."""
    target = load_target(cond_pipeline)
    assert isinstance(target, DiffusersTarget) and target.num_classes == 4 and target.p_uncond == 0
    assert target.hparams["null_class"] is None
    unet = reference_unet(cond_pipeline)
    gen = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 10, 500, 999]), torch.tensor([3, 0, 2, 1])
    expected = unet(x, t, class_labels=labels).sample
    assert torch.equal(target(x, t, labels=labels), expected)
    assert not torch.allclose(expected, unet(x, t, class_labels=labels.flip(0)).sample)  # the label matters
    out, features = target(x, t, return_features=True, labels=labels)
    assert torch.equal(out, expected) and features.shape == (4, 8, 8, 8)
    with pytest.raises(ValueError, match=r"labels: the class-conditional UNet \(num_class_embeds 4\) has no null class"):
        target(x, t)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("null_class,indices", [(3, [0, 1, 2, 3]), (0, [1, 2, 3, 0]), (1, [0, 2, 3, 1])])
@torch.no_grad()
def test_the_null_class_convention(cond_pipeline, tmp_path, null_class, indices):
    """With null_class k (argument or `_null_class` in unet/config.json): num_classes = N - 1, label c is index c
    below k and c + 1 from k on, NULL_LABEL (-1) and no labels are index k; p_uncond unknown (None)."""
    unet = reference_unet(cond_pipeline)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([5, 50, 500, 900])
    expected = unet(x, t, class_labels=torch.tensor(indices)).sample
    from specdiff_train.models.diffusers_target import load_pipeline_target

    for target in (load_pipeline_target(cond_pipeline, null_class=null_class),
                   load_target(_with_null_class(cond_pipeline, tmp_path, null_class))):
        assert target.num_classes == 3 and target.p_uncond is None and target.hparams["null_class"] == null_class
        assert torch.equal(target(x, t, labels=torch.tensor([0, 1, 2, -1])), expected)
        torch.testing.assert_close(target(x[3:], t[3:]), expected[3:])  # no labels: the null class (one row)


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_sampling_a_class_conditional_pipeline(cond_pipeline, tmp_path):
    """ancestral_sample and speculative_sample take labels (and guidance with a null class); a sample depends
    on its seed and label only; speculative sampling evaluates both guidance rows in the same call."""
    target = load_target(_with_null_class(cond_pipeline, tmp_path, 3))
    schedule, shape = target.schedule, target.sample_shape
    samples = ancestral_sample(target, schedule, shape, num_steps=6, seeds=[0, 1, 2, 3], labels=[0, 1, 2, None],
                               guidance_scale=2.0)
    assert samples.shape == (4, *shape) and torch.isfinite(samples).all()
    again = ancestral_sample(target, schedule, shape, num_steps=6, seeds=[7, 2, 0], labels=[1, 2, 0], guidance_scale=2.0)
    torch.testing.assert_close(again[1:], samples[[2, 0]], rtol=1e-4, atol=1e-4)
    other = ancestral_sample(target, schedule, shape, num_steps=6, seeds=[0], labels=[1], guidance_scale=2.0)
    assert not torch.allclose(other[0], samples[0], atol=1e-3)  # another label, another sample
    drafter = MedusaDrafter.from_head(random_heads(), schedule, shape)
    result = speculative_sample(target, schedule, shape, num_steps=6, seeds=range(6), labels=[0, 1, 2, 0, 1, -1],
                                guidance_scale=2.0, drafter=drafter, window=3)
    assert result.samples.shape == (6, *shape) and torch.isfinite(result.samples).all()
    assert result.stats["target_calls_per_sample"] <= 6
    plain = load_target(cond_pipeline)  # no null class: labelled, unguided sampling only
    result = speculative_sample(plain, schedule, shape, num_steps=6, seeds=range(3), labels=[3, 0, 1],
                                drafter=drafter, window=3)
    assert torch.isfinite(result.samples).all()


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("one_thread")
def test_class_conditional_refusals(pipeline, target, cond_pipeline, tmp_path):
    """Guidance or unconditional samples without a null class, labels out of range, labels for an unconditional
    pipeline, and a null class that is no index of the UNet: one-line errors naming the field."""
    from specdiff_train.models.diffusers_target import load_pipeline_target

    cond = load_target(cond_pipeline)
    sample = functools.partial(ancestral_sample, cond, cond.schedule, cond.sample_shape, num_steps=3, seeds=[0, 1])
    _one_line_error(lambda: sample(labels=[0, 1], guidance_scale=2.0), r"guidance_scale: .*p_uncond=0")
    _one_line_error(lambda: sample(), r"guidance_scale: .*p_uncond=0")  # unconditional samples: the null row
    _one_line_error(lambda: sample(labels=[0, 4]), r"labels: 4 is not a class of this target.*\[0, 4\)")
    _one_line_error(lambda: ancestral_sample(target, target.schedule, target.sample_shape, num_steps=3, seeds=[0],
                                             labels=[0]), r"labels: the target is unconditional")
    _one_line_error(lambda: target(torch.zeros(1, 1, 8, 8), torch.tensor([3]), labels=torch.tensor([0])),
                    r"labels: the diffusers UNet is unconditional")
    _one_line_error(lambda: load_pipeline_target(cond_pipeline, null_class=4),
                    r"null_class: 4 is not a class-embedding index of the UNet \(num_class_embeds 4\)")
    _one_line_error(lambda: load_target(_with_null_class(cond_pipeline, tmp_path, -1)),
                    r"unet/config.json _null_class: -1 is not a class-embedding index")
    _one_line_error(lambda: load_pipeline_target(pipeline, null_class=0),
                    r"null_class: 0 given, but the UNet is unconditional")
    null = load_pipeline_target(cond_pipeline, null_class=3)
    _one_line_error(lambda: ancestral_sample(null, null.schedule, null.sample_shape, num_steps=3, seeds=[0], labels=[3]),
                    r"labels: 3 is not a class of this target.*\[0, 3\)")


@torch.no_grad()
def test_a_ddim_pipeline_is_a_ddpm_trained_target_sampled_by_ddim_eta(pipeline, tmp_path):
    """A DDIMPipeline / DDIMScheduler folder holds a DDPM-trained UNet: it loads with the same schedule, and
    `chain=DDIM(eta)` samples it (speculatively too); the EDM sampler is refused for it in one line."""
    from specdiff_train.chains import DDIM, EulerAncestral

    folder = tmp_path / "ddim"
    shutil.copytree(pipeline, folder)
    _edit(folder, SCHEDULER, _class_name="DDIMScheduler", set_alpha_to_one=True)
    _edit(folder, "model_index.json", _class_name="DDIMPipeline", scheduler=["diffusers", "DDIMScheduler"])
    model = load_target(folder)
    assert model.schedule == load_target(pipeline).schedule
    shape, chain = model.sample_shape, DDIM(eta=0.5)
    plain = ancestral_sample(model, model.schedule, shape, num_steps=5, seeds=[0, 1], chain=chain)
    spec = speculative_sample(model, model.schedule, shape, num_steps=5, seeds=[0, 1], chain=chain,
                              drafter=FrozenTargetDrafter(), window=3)
    assert plain.shape == spec.samples.shape == (2, *shape) and torch.isfinite(spec.samples).all()
    with pytest.raises(ValueError, match=r"chain: EulerAncestral.*'edm' schedule.*DDPMSchedule"):
        ancestral_sample(model, model.schedule, shape, num_steps=5, seeds=[0], chain=EulerAncestral())
