"""Class-conditional targets and classifier-free guidance on tiny networks: the label embedding and its null
label, `guidance.guided_output` (one network call), guidance in eps / x0 / v space, labels from the data
module (toy2d, digits, imagefolder class folders), `TargetDiffusion`'s labels, label dropout and per-class
validation samples, `train.py fit` on configs/target/digits_cond.yaml, the samplers' one-line errors for bad
labels and scales, and samples that depend only on (seed, label)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from helpers import find_one, run_train
from specdiff_train import plotting
from specdiff_train.data import TOY2D, DiffusionDataModule
from specdiff_train.data.toy2d import TOY2D_CLASSES
from specdiff_train.diffusion import DDPMSchedule
from specdiff_train.guidance import NULL_LABEL, class_grid_labels, guided_output, rows_per_state
from specdiff_train.models import TargetDiffusion, load_target
from specdiff_train.nets import MLPDenoiser, UNet
from specdiff_train.nets.classifier import digits_images
from specdiff_train.nets.embedding import LabelEmbedding, check_num_classes
from specdiff_train.sampling import ancestral_sample
from specdiff_train.speculative import FreeDrafter, speculative_sample


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as in the subprocesses (`helpers.offline_env`): on a small busy CI machine several
    OpenMP threads per process thrash (a tiny U-Net's forward: 1.5 s instead of 10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mlp(num_classes: int = 3, seed: int = 0) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser(dim=2, hidden=16, depth=1, time_embed_dim=16, num_classes=num_classes)


def tiny_unet(num_classes: int = 3, seed: int = 0, live_output: bool = False) -> UNet:
    torch.manual_seed(seed)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
               attention_levels=(), num_heads=1, num_classes=num_classes)
    if live_output:  # the output convolution starts at zero: give it weights so that labels show
        torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return net


def one_line_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value), str(err.value)


# --- the label embedding ---------------------------------------------------------------------------------
@torch.no_grad()
def test_the_null_label_is_the_last_row_of_the_embedding_and_the_default():
    emb = LabelEmbedding(3, 8)
    assert emb.table.num_embeddings == 4  # 3 classes and the null class
    torch.testing.assert_close(emb(torch.tensor([0, 2, NULL_LABEL]), 3, "cpu"), emb.table.weight[[0, 2, 3]])
    torch.testing.assert_close(emb(None, 2, "cpu"), emb.table.weight[[3, 3]])
    gen = torch.Generator().manual_seed(0)
    for net, x in ((tiny_mlp(), torch.randn(4, 2, generator=gen)),
                   (tiny_unet(live_output=True), torch.randn(4, 1, 8, 8, generator=gen))):
        t = torch.tensor([0, 10, 500, 999])
        null = net(x, t, labels=torch.full((4,), NULL_LABEL))
        assert torch.equal(null, net(x, t))  # no labels: every row is a null row
        conditional = net(x, t, labels=torch.tensor([0, 1, 2, 0]))
        assert not torch.allclose(conditional, null)
        out, features = net(x, t, return_features=True, labels=torch.tensor([0, 1, 2, 0]))
        assert torch.equal(out, conditional) and len(features) == 4


def test_an_unconditional_net_refuses_labels_and_num_classes_is_checked():
    x, t, labels = torch.zeros(2, 2), torch.tensor([1, 2]), torch.tensor([0, 1])
    one_line_error(lambda: tiny_mlp(0)(x, t, labels=labels), r"labels: MLPDenoiser is unconditional \(num_classes=0\)")
    one_line_error(lambda: tiny_unet(0)(torch.zeros(2, 1, 8, 8), t, labels=labels), r"labels: UNet is unconditional")
    for bad in (-1, 2.5, True, "3"):
        one_line_error(lambda: check_num_classes(bad, "UNet"), r"UNet: num_classes must be an int >= 0")
    one_line_error(lambda: MLPDenoiser(num_classes=-2),
                   r"MLPDenoiser: num_classes must be an int >= 0 \(0: unconditional\), got -2")


@pytest.mark.parametrize("make", [tiny_mlp, tiny_unet], ids=["mlp", "unet"])
def test_seeded_construction_of_an_unconditional_net_is_unchanged(make):
    """The label embedding is built last: with the same seed, an unconditional net draws the weights it drew
    before labels existed (those of a conditional net without its label_embed), and has no label parameters,
    so checkpoints of unconditional nets load as before."""
    plain, conditional = make(0), make(5)
    assert plain.label_embed is None and plain.num_classes == 0 and conditional.num_classes == 5
    plain_state, conditional_state = plain.state_dict(), conditional.state_dict()
    assert set(conditional_state) - set(plain_state) == {"label_embed.table.weight"}
    assert all(torch.equal(value, conditional_state[name]) for name, value in plain_state.items())


# --- guided_output --------------------------------------------------------------------------------------
class CallRecorder(torch.nn.Module):
    """The net, recording each call's rows and labels."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, return_features=False, **kwargs):
        labels = kwargs.get("labels")
        self.calls.append((len(x), None if labels is None else labels.tolist()))
        return self.net(x, t, return_features=return_features, **kwargs)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
@torch.no_grad()
def test_guided_output_is_uncond_plus_scale_times_the_difference_in_one_call(scale):
    net = tiny_mlp()
    gen = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(5, 2, generator=gen), torch.tensor([0, 3, 300, 600, 999]), torch.tensor([0, 1, 2, 0, -1])
    null = torch.full_like(labels, NULL_LABEL)
    cond, uncond = net(x, t, labels=labels), net(x, t, labels=null)
    model = CallRecorder(net)
    guided = guided_output(model, x, t, labels, scale)
    torch.testing.assert_close(guided, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-6)
    expected_call = {0.0: (5, null.tolist()), 1.0: (5, labels.tolist()), 3.0: (10, labels.tolist() + null.tolist())}
    assert model.calls == [expected_call[scale]]  # ONE call: 2B rows (conditional, then null) only when 0 < s != 1
    assert rows_per_state(labels, scale) == (2 if scale == 3.0 else 1)
    out, features = guided_output(model, x, t, labels, scale, return_features=True, dtype=torch.float64)
    assert out.dtype == features.dtype == torch.float64 and features.shape == (5, 16)
    features_of = net(x, t, return_features=True, labels=null if scale == 0 else labels)[1]
    torch.testing.assert_close(features.float(), features_of, rtol=1e-5, atol=1e-6)  # the conditional rows'


def test_an_unconditional_target_is_called_without_labels():
    model = CallRecorder(tiny_mlp(0))
    x, t = torch.zeros(3, 2), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(guided_output(model, x, t, None, 1.0), model.net(x, t))
    assert model.calls == [(3, None)] and rows_per_state(None, 1.0) == 1


@pytest.mark.parametrize("clip", [False, True])
def test_guidance_in_eps_x0_or_v_space_gives_the_same_step(clip):
    """uncond + s (cond - uncond) has weights summing to 1, and x0 is affine in the output: guiding eps, x0 or v
    predictions of the same two models gives the same x0 estimate, hence the same step mean (and clipping)."""
    gen = torch.Generator().manual_seed(0)
    num_steps, n, scale = 10, 10, 3.0
    schedules = {p: DDPMSchedule(prediction=p, clip_denoised=clip) for p in ("eps", "x0", "v")}
    plan = schedules["eps"].plan(num_steps)
    k = torch.arange(n) % num_steps
    t = plan.t(k)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    eps = {"cond": torch.randn(n, 2, generator=gen, dtype=torch.float64),
           "uncond": torch.randn(n, 2, generator=gen, dtype=torch.float64)}
    abar = schedules["eps"].alphas_cumprod[t][:, None]
    means = {}
    for prediction, schedule in schedules.items():
        outputs = {}
        for which, e in eps.items():
            x0 = schedule.to_x0(e, x, t, "eps")
            outputs[which] = {"eps": e, "x0": x0, "v": abar.sqrt() * e - (1 - abar).sqrt() * x0}[prediction]

        def model(xx, tt, labels=None, outputs=outputs):
            rows = len(xx) // n
            return torch.where((labels >= 0)[:, None], outputs["cond"].repeat(rows, 1), outputs["uncond"].repeat(rows, 1))

        guided = guided_output(model, x, t, torch.zeros(n, dtype=torch.long), scale)
        means[prediction] = schedule.plan(num_steps).transition(x, k, guided)[0]
    torch.testing.assert_close(means["x0"], means["eps"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(means["v"], means["eps"], rtol=1e-9, atol=1e-9)
    if not clip:  # the step mean is affine in the prediction, too
        cond_mean = plan.transition(x, k, eps["cond"])[0]
        uncond_mean = plan.transition(x, k, eps["uncond"])[0]
        torch.testing.assert_close(means["eps"], uncond_mean + scale * (cond_mean - uncond_mean), rtol=1e-9, atol=1e-9)


# --- labels from the data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOY2D)
def test_toy2d_labels_are_the_mixture_components(name):
    dm = DiffusionDataModule(dataset="toy2d", name=name, num_samples=400, label_column="label", batch_size=64,
                             val_fraction=0.1)
    assert dm.num_classes == TOY2D_CLASSES[name]
    dm.setup()
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 2) and x.dtype == torch.float32 and labels.shape == (64,) and labels.dtype == torch.int64
    all_labels = torch.cat([batch[1] for batch in dm.train_dataloader()])
    assert set(all_labels.tolist()) == set(range(dm.num_classes))  # every component, nothing else
    if name == "8gaussians":  # each point is near the centre of its component
        points, labels = dm.reference_samples(40, seed=3), dm.reference_labels(40, seed=3)
        angle = 2 * math.pi * labels.double() / 8
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
        assert (points.double() - centres).norm(dim=1).max() < 1.0


def test_digits_labels_are_the_digits(tmp_path):
    dm = DiffusionDataModule(dataset="digits", label_column="label", val_fraction=0.0, batch_size=1797,
                             cache_dir=str(tmp_path))
    assert dm.num_classes == 10
    dm.prepare_data()
    dm.setup()
    x, labels = next(iter(dm.train_dataloader()))
    images, digits = digits_images()
    pairs = sorted(zip(map(tuple, x.flatten(1).tolist()), labels.tolist()))
    assert pairs == sorted(zip(map(tuple, images.flatten(1).tolist()), digits.tolist()))


def test_imagefolder_labels_are_the_class_folders(tmp_path):
    for name, value in (("cat", 255), ("dog", 0)):  # imagefolder numbers the class folders alphabetically
        folder = tmp_path / "imgs" / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(folder / f"{i}.png")
    dm = DiffusionDataModule(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=4, channels=1,
                             label_column="label", val_fraction=0.0, batch_size=6)
    assert dm.num_classes == 2
    dm.setup()
    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 1, 4, 4) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert torch.equal(x.flatten(1).mean(1), torch.where(labels == 0, 1.0, -1.0))  # cats white, dogs black


def test_a_missing_label_column_names_the_setting(tmp_path):
    one_line_error(lambda: DiffusionDataModule(dataset="toy2d", num_samples=50, label_column="class").setup(),
                   r"data.label_column: the dataset has no column 'class'; its columns are \['x', 'label'\]")
    folder = tmp_path / "imgs" / "train"  # no class folders: no label column
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    dm = DiffusionDataModule(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=4, channels=1,
                             label_column="label")
    one_line_error(dm.setup, r"data.label_column: the dataset has no column 'label'")
    one_line_error(lambda: DiffusionDataModule(dataset="toy2d", num_samples=50).reference_labels(4),
                   r"data.label_column: reference labels need the dataset's label column")


# --- TargetDiffusion with labels ---------------------------------------------------------------------------
def test_training_step_with_labels_trains_the_label_embedding():
    model = TargetDiffusion(tiny_mlp(), p_uncond=0.0)
    assert model.num_classes == 3
    torch.manual_seed(0)
    batch = (torch.randn(16, 2), torch.tensor([0, 1] * 8))
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grad = model.net.label_embed.table.weight.grad
    assert grad[:2].abs().sum(1).gt(0).all() and grad[2:].abs().sum() == 0  # the rows of labels 0 and 1 only


def test_label_dropout_replaces_labels_by_the_null_label_at_rate_p_uncond():
    labels = torch.randint(0, 3, (40_000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dropped = TargetDiffusion(tiny_mlp(), p_uncond=0.25)._drop_labels(labels)
    null = dropped == NULL_LABEL
    assert abs(null.double().mean().item() - 0.25) < 0.01  # 5 sigma: 0.0108
    assert torch.equal(dropped[~null], labels[~null])
    assert TargetDiffusion(tiny_mlp(), p_uncond=0.0)._drop_labels(labels) is labels


def test_a_conditional_target_refuses_unlabelled_batches_and_labels_out_of_range():
    x = torch.zeros(4, 2)
    for batch in (x, (x,), [x]):
        one_line_error(lambda: TargetDiffusion(tiny_mlp())._data(batch),
                       r"data.label_column: the target is conditional \(num_classes=3\) but the batches carry no labels")
    for labels in ([0, 1, 3, 2], [0, -1, 1, 2]):
        one_line_error(lambda: TargetDiffusion(tiny_mlp())._data((x, torch.tensor(labels))),
                       r"data.label_column: labels from -?\d to \d do not fit the net's num_classes=3")
    data, labels = TargetDiffusion(tiny_mlp(0))._data((x, torch.tensor([0, 5, 1, 2])))
    assert data is x and labels is None  # an unconditional target ignores the data's labels


def test_validation_samples_are_per_class_and_the_plot_has_one_class_per_row(tmp_path, monkeypatch):
    # every class (when there are enough samples), in class order, the remainder to the last class
    assert class_grid_labels(10, 8) == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7] and class_grid_labels(3, 5) == [0, 1, 2]
    assert class_grid_labels(80, 10) == [i // 8 for i in range(80)]
    model = TargetDiffusion(tiny_unet(live_output=True), val_num_samples=7, val_num_steps=3, val_guidance_scale=2.0)
    assert model.validation_labels() == [0, 0, 1, 1, 2, 2, 2] and model.validation_labels(4) == [0, 1, 2, 2]
    assert TargetDiffusion(tiny_unet(0)).validation_labels() is None
    samples = model.draw_samples()
    expected = ancestral_sample(model, model.schedule, (1, 8, 8), num_steps=3, seeds=range(7), labels=[0, 0, 1, 1, 2, 2, 2],
                                guidance_scale=2.0)
    assert torch.equal(samples, expected)
    rows = []
    image_grid = plotting.image_grid
    monkeypatch.setattr(plotting, "image_grid", lambda *a, **kw: rows.append(kw["nrow"]) or image_grid(*a, **kw))
    model.trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    path = model.plot_samples(tmp_path)
    assert path.is_file() and rows == [2]  # 2 images per row: one class per row (class 2 on two rows)
    scatter = plotting.plot_samples(torch.randn(6, 2), labels=class_grid_labels(6, 3))  # toy2d: colour by class
    assert scatter.ndim == 3 and scatter.shape[-1] == 3


def test_fit_digits_cond_config(tmp_path):
    """`train.py fit --config configs/target/digits_cond.yaml`, a few steps: labelled batches, label dropout,
    the per-class validation grid, and a checkpoint that loads as a conditional target and samples guided."""
    run_train("fit", "--config", "configs/target/digits_cond.yaml", "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "8",
              "--model.init_args.val_num_samples", "10", "--model.init_args.val_num_steps", "3",
              "--trainer.default_root_dir", tmp_path, "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              timeout=300)
    assert find_one(tmp_path, "epoch=*-step=000004.png")
    target = load_target(find_one(tmp_path, "last.ckpt"))
    assert target.num_classes == 10 and target.p_uncond == 0.1 and target.val_guidance_scale == 2.0
    samples = ancestral_sample(target, target.schedule, target.sample_shape, num_steps=3, seeds=range(3),
                               labels=[0, 9, None], guidance_scale=2.0)
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()


# --- the samplers' labels and scales --------------------------------------------------------------------------
def sample(sampler: str, model, **kwargs):
    options = dict(num_steps=3, seeds=kwargs.pop("seeds", [0, 1]))
    if sampler == "ancestral":
        return ancestral_sample(model, model.schedule, (2,), **options, **kwargs)
    return speculative_sample(model, model.schedule, (2,), **options, drafter=FreeDrafter(), window=2, **kwargs).samples


@pytest.mark.parametrize("sampler", ["ancestral", "speculative"])
def test_the_samplers_refuse_bad_labels_and_scales_in_one_line(sampler):
    conditional, unconditional = TargetDiffusion(tiny_mlp()), TargetDiffusion(tiny_mlp(0))
    no_dropout = TargetDiffusion(tiny_mlp(), p_uncond=0.0)
    run = lambda model, **kw: (lambda: sample(sampler, model, **kw))  # noqa: E731
    one_line_error(run(conditional, labels=[0, 3]),
                   r"labels: 3 is not a class of this target; labels must be ints in \[0, 3\)")
    one_line_error(run(conditional, labels=[0, -2]), r"labels: -2 is not a class")
    one_line_error(run(conditional, labels=[0, 1.5]), r"labels: 1.5 is not a class")
    one_line_error(run(conditional, labels=[True, 0]), r"labels: True is not a class")
    one_line_error(run(conditional, labels=torch.tensor([0, 1, 2])),
                   r"labels: got 3 labels for 2 seeds; give one label per seed")
    one_line_error(run(unconditional, labels=[0, 1]), r"labels: the target is unconditional \(num_classes=0\)")
    for scale in (-1.0, float("nan"), float("inf"), "2", True, None):
        one_line_error(run(conditional, labels=[0, 1], guidance_scale=scale), r"guidance_scale: expected a number >= 0")
    one_line_error(run(unconditional, guidance_scale=2.0), r"guidance_scale: 2.0 needs a conditional target")
    for kwargs in (dict(labels=[0, 1], guidance_scale=2.0), dict(labels=[0, None]), dict(labels=[0, 1], guidance_scale=0),
                   dict()):  # no labels: unconditional samples, the null row
        one_line_error(run(no_dropout, **kwargs),
                       r"guidance_scale: the target was trained without label dropout \(p_uncond=0\)")
    assert sample(sampler, no_dropout, labels=[0, 2]).shape == (2, 2)  # labelled and unguided: fine
    assert sample(sampler, conditional, labels=torch.tensor([2.0, -1.0]), guidance_scale=0.5).shape == (2, 2)
    assert sample(sampler, conditional, labels=np.array([2, 0]), guidance_scale=2).shape == (2, 2)  # numpy ints


@torch.no_grad()
def test_a_sample_depends_only_on_its_seed_and_label():
    """The same (seed, label) gives the same sample whatever the other seeds, their labels and the batch size:
    ancestral sampling, and speculative sampling (the same rounds for the chain, to float tolerance)."""
    model = TargetDiffusion(tiny_mlp()).eval()
    seeds, labels = [0, 1, 2, 3], [0, 1, 2, None]
    mixed_seeds, mixed_labels, order = [3, 9, 0, 2, 1], [None, 0, 0, 2, 1], [2, 4, 3, 0]  # seeds 0, 1, 2, 3 in there
    for sampler, batch_size in (("ancestral", 2), ("speculative", 2)):
        first = sample(sampler, model, seeds=seeds, labels=labels, guidance_scale=2.5)
        again = sample(sampler, model, seeds=mixed_seeds, labels=mixed_labels, guidance_scale=2.5, batch_size=batch_size)
        torch.testing.assert_close(again[order], first, rtol=1e-5, atol=1e-5)
        other_label = sample(sampler, model, seeds=[0], labels=[1], guidance_scale=2.5)
        assert not torch.allclose(other_label[0], first[0], atol=1e-3)
