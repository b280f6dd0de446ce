"""Targets from Hugging Face `diffusers` DDPM pipelines: a `DDPMPipeline.save_pretrained` folder
(`model_index.json`, `unet/`, `scheduler/`) or a hub id (`google/ddpm-cifar10-32`), as a target that
behaves like ours (`model(x, t)`, `model(x, t, return_features=True)`, `.schedule`, `.sample_shape`).

What the sampler cannot reproduce exactly is refused, naming the setting (`check_pipeline`): a
scheduler other than DDPM's ancestral one, a variance other than the posterior one ("fixed_small"),
dynamic thresholding, zero-terminal-SNR rescaling, learned/custom betas, a text-conditional UNet, a
class-conditional one other than an embedding table. The respacing of the sampling steps is the
sampler's own ("leading", as diffusers' default): `timestep_spacing` / `steps_offset` of the scheduler
only say how the pipeline respaces, not what the model learned, and are not used.

`diffusers` is an optional extra (`pip install -e ".[diffusers]"`): it is imported inside the functions
here only, so the rest of the package never imports it.

Class-conditional UNets (`num_class_embeds` N, `class_embed_type` null: an embedding table) are conditional
targets (`labels`, `guidance_scale` of the samplers). diffusers has no null class, so one is declared:
`null_class` (an argument, or the key `"_null_class"` in `unet/config.json`, which diffusers ignores) is the
embedding index trained as "no label". Then `num_classes` is N - 1, our labels 0 .. N - 2 are the other
indices in order (label c is index c below null_class, c + 1 above it; with the null index last, the same
numbers), `NULL_LABEL` rows get the null index, and guidance is allowed (`p_uncond` None: unknown). Without
`null_class`, `num_classes` is N, labels are the indices themselves, and `p_uncond` is 0: unconditional
samples and guidance are refused by `guidance.check_guidance`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import LightningModule

from ..diffusion import DDPMSchedule

PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
# Schedulers of DDPM-trained UNets: the model learned the same thing, whichever of these samples it
# (DDPM's ancestral step: `DDPMAncestral`, DDIM's: `chains.DDIM(eta)`; the parallel one batches DDPM's step).
SCHEDULER_CLASSES = ("DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler")
UNET_CLASSES = ("UNet2DModel",)
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# An `owner/name` hub id; paths to checkpoint files are never taken for one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
NULL_CLASS_KEY = "_null_class"  # in unet/config.json: the null class-embedding index (diffusers ignores "_" keys)
INSTALL_HINT = 'diffusers targets need the diffusers package: pip install -e ".[diffusers]"'


# --- which sources are pipelines -----------------------------------------------------------------
def is_hub_id(source: str | Path) -> bool:
    """`owner/name` that is no local path (and names no checkpoint file)."""
    text = str(source)
    return (not Path(text).exists() and _HUB_ID.fullmatch(text) is not None
            and not text.lower().endswith(_CHECKPOINT_SUFFIXES))


def is_pipeline_source(source: str | Path) -> bool:
    """True for a local folder (it must hold a pipeline) or a hub id; False for a file (our checkpoints)."""
    return Path(source).is_dir() or is_hub_id(source)


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ModuleNotFoundError(INSTALL_HINT) from err
    return diffusers


def pipeline_folder(source: str | Path) -> Path:
    """The local folder of a pipeline: `source` itself, or the hub snapshot (downloaded once, then cached)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{source}: a folder but not a diffusers pipeline (no model_index.json): pass a target checkpoint "
                "file (a run's last.ckpt), or a folder written by DDPMPipeline.save_pretrained (model_index.json, "
                "unet/, scheduler/)"
            )
        return path
    if not is_hub_id(source):
        raise FileNotFoundError(f"{source}: no such file or folder, and not a hub id (owner/name)")
    diffusers = _diffusers()
    try:
        return Path(diffusers.DiffusionPipeline.download(str(source)))
    except OSError as err:
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"{source}: not a local file or folder, and the hub pipeline {source!r} could not be fetched ({first}). "
            "A hub id needs the network once (then it is cached): run once with network access and without "
            "HF_HUB_OFFLINE=1, or pass the folder of `DDPMPipeline.from_pretrained(...).save_pretrained(folder)`"
        ) from err


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path.parent.parent}: the pipeline has no {what} ({path.relative_to(path.parent.parent)} "
                         "is missing); save it with DDPMPipeline(unet, scheduler).save_pretrained(folder)")
    return json.loads(path.read_text())


# --- what the sampler can reproduce --------------------------------------------------------------
def _defaults(cls) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not p.empty}


def schedule_from_scheduler_config(config: Mapping[str, Any], where: str = "scheduler") -> DDPMSchedule:
    """The `DDPMSchedule` of a DDPM scheduler config (missing keys take DDPMScheduler's defaults);
    ValueError naming the setting for what the ancestral sampler cannot reproduce."""
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"{where}._class_name: {name!r} is not a scheduler of a DDPM-trained UNet that the samplers reproduce "
            f"(supported: {', '.join(SCHEDULER_CLASSES)}; sample with chain=DDPMAncestral() or DDIM(eta)). A UNet "
            "trained with the DDPM loss can be re-saved "
            "with DDPMScheduler.from_config(scheduler.config)"
        )
    cfg = {**_defaults(_diffusers().DDPMScheduler), **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg.get("variance_type", "fixed_small") != "fixed_small":
        learned = str(cfg["variance_type"]).startswith("learned")
        raise ValueError(
            f"{where}.variance_type: {cfg['variance_type']!r} is not supported; the sampler's step variance is the "
            "posterior one, variance_type 'fixed_small'"
            + (" (this UNet predicts its own variance, which the sampler does not model)" if learned else
               ". To sample this UNet with the posterior variance, set \"variance_type\": \"fixed_small\" in "
               "scheduler/scheduler_config.json (another sampler of the same model)")
        )
    if cfg.get("thresholding"):
        raise ValueError(f"{where}.thresholding: true is not supported (dynamic thresholding is a per-sample "
                         "quantile map the sampler does not apply); set it to false, or use clip_sample")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}.rescale_betas_zero_snr: true is not supported (zero terminal SNR); the sampler's "
                         "schedules are linear, scaled_linear and squaredcos_cap_v2 betas as named")
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{where}.trained_betas: explicit betas are not supported; the sampler's schedules are "
                         f"named ({', '.join(BETA_SCHEDULES)})")
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"{where}.beta_schedule: {cfg['beta_schedule']!r} is not supported; expected one of "
                         f"{tuple(BETA_SCHEDULES)}")
    if cfg["prediction_type"] not in PREDICTIONS:
        raise ValueError(f"{where}.prediction_type: expected one of {tuple(PREDICTIONS)}, got {cfg['prediction_type']!r}")
    return DDPMSchedule(
        num_train_steps=int(cfg["num_train_timesteps"]),
        beta_schedule=BETA_SCHEDULES[cfg["beta_schedule"]],
        prediction=PREDICTIONS[cfg["prediction_type"]],
        clip_denoised=bool(cfg["clip_sample"]),
        beta_start=float(cfg["beta_start"]),
        beta_end=float(cfg["beta_end"]),
        clip_range=float(cfg.get("clip_sample_range", 1.0)),
    )


def check_unet_config(config: Mapping[str, Any], where: str = "unet") -> int:
    """The UNet's number of class embeddings (0: unconditional); ValueError naming the setting when it is
    not a `model(x, t)` denoiser, or a class-conditional one with an embedding table of integer classes."""
    name = config.get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        conditional = "Condition" in name
        raise ValueError(
            f"{where}._class_name: {name!r} is not supported (expected {', '.join(UNET_CLASSES)})"
            + ("; a text-conditional UNet needs a prompt, the sampler calls model(x, t) only" if conditional else "")
        )
    if config.get("class_embed_type") is not None:
        raise ValueError(
            f"{where}.class_embed_type: {config['class_embed_type']!r} is not supported (it embeds continuous class "
            "values); class-conditional UNets are supported with an embedding table: class_embed_type null and "
            "num_class_embeds N (integer labels)"
        )
    num_class_embeds = config.get("num_class_embeds")
    if num_class_embeds is not None and (isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int)
                                         or num_class_embeds < 1):
        raise ValueError(f"{where}.num_class_embeds: expected null or an int >= 1, got {num_class_embeds!r}")
    if config.get("time_embedding_type", "positional") == "fourier":
        raise ValueError(f"{where}.time_embedding_type: 'fourier' (score-SDE, conditioned on noise levels) is not "
                         "supported; DDPM UNets take integer timesteps ('positional' or 'learned')")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_ch != out_ch:
        raise ValueError(f"{where}.out_channels: {out_ch} != in_channels {in_ch}; the sampler needs one prediction "
                         "shaped like the sample (a learned variance is not supported)")
    return int(num_class_embeds or 0)


def check_null_class(null_class, num_class_embeds: int, where: str = "null_class") -> int | None:
    """The null class-embedding index (None: the UNet has none); ValueError naming `where` when it is no
    index of the UNet's class embeddings."""
    if null_class is None:
        return None
    if num_class_embeds == 0:
        raise ValueError(f"{where}: {null_class!r} given, but the UNet is unconditional (no num_class_embeds); "
                         "leave null_class unset")
    if isinstance(null_class, bool) or not isinstance(null_class, int) or not 0 <= null_class < num_class_embeds:
        raise ValueError(f"{where}: {null_class!r} is not a class-embedding index of the UNet (num_class_embeds "
                         f"{num_class_embeds}); give the index trained as 'no label', an int in "
                         f"[0, {num_class_embeds})")
    return null_class


def check_pipeline(folder: str | Path) -> tuple[dict, DDPMSchedule]:
    """(the UNet's config, the schedule) of a pipeline folder, after every check."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json", "model index")
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{folder}/model_index.json: _class_name {name!r} is not a DDPM pipeline (supported: "
            f"{', '.join(PIPELINE_CLASSES)}: an unconditional UNet2DModel and a DDPMScheduler)"
        )
    for part in ("unet", "scheduler"):
        if part not in index:
            raise ValueError(f"{folder}/model_index.json: no {part!r} component; a DDPMPipeline has unet and scheduler")
    unet_config = _read_json(folder / "unet" / "config.json", "UNet config")
    check_unet_config(unet_config, f"{folder}/unet")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    schedule = schedule_from_scheduler_config(scheduler_config, f"{folder}/scheduler")
    trained_steps = unet_config.get("num_train_timesteps")
    if trained_steps is not None and int(trained_steps) != schedule.num_train_steps:
        raise ValueError(f"{folder}/unet.num_train_timesteps: {trained_steps} != the scheduler's "
                         f"num_train_timesteps {schedule.num_train_steps}")
    return unet_config, schedule


# --- the target ----------------------------------------------------------------------------------
def _sample_size(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


class DiffusersUNet(torch.nn.Module):
    """A diffusers `UNet2DModel` behind our nets' contract: `net(x, t[, labels=...])` -> its prediction
    (`.sample`); `net(x, t, return_features=True)` -> (prediction, the output of its last up block).

    The features are the last up block's output, read by a forward hook during the same pass: full
    resolution, `feature_dim` = `block_out_channels[0]` channels (128 for google/ddpm-cifar10-32), the
    size a Medusa `ConvHead` takes (`head.init_args.feature_dim`).

    A class-conditional UNet (`num_class_embeds`) gets `class_labels` from `labels` (module docstring:
    the null class convention); `num_classes` is 0 for an unconditional UNet.

    Args:
        unet: the UNet2DModel.
        null_class: the class-embedding index trained as "no label" (None: the UNet has none).
        where: what an error about `null_class` names (the argument, or the config key it came from).
    """

    def __init__(self, unet: torch.nn.Module, null_class: int | None = None, where: str = "null_class"):
        super().__init__()
        self.unet = unet
        config = unet.config
        if config.sample_size is None:
            raise ValueError("unet.sample_size: not set in the UNet's config; the sample shape is unknown")
        self.sample_shape = (int(config.in_channels), *_sample_size(config.sample_size))
        self.feature_dim = int(config.block_out_channels[0])
        if getattr(config, "class_embed_type", None) is not None:
            raise ValueError(f"unet.class_embed_type: {config.class_embed_type!r} is not supported; class-conditional "
                             "UNets are supported with an embedding table (class_embed_type null, num_class_embeds N)")
        self.num_class_embeds = int(getattr(config, "num_class_embeds", None) or 0)
        self.null_class = check_null_class(null_class, self.num_class_embeds, where)
        self.num_classes = self.num_class_embeds - (self.null_class is not None)

    def class_labels(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """The UNet's `class_labels` for our labels (B,) (`NULL_LABEL` or None: the null class)."""
        if not self.num_class_embeds:
            if labels is not None:
                raise ValueError("labels: the diffusers UNet is unconditional (no num_class_embeds); sample it "
                                 "without labels")
            return None
        if labels is None:
            if self.null_class is None:
                raise ValueError(f"labels: the class-conditional UNet (num_class_embeds {self.num_class_embeds}) has "
                                 "no null class; give a label per row, or declare the index trained as 'no label' "
                                 "(null_class)")
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.long()
        if self.null_class is None:
            return labels
        return torch.where(labels < 0, self.null_class, labels + (labels >= self.null_class).long())

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        class_labels = self.class_labels(labels, len(x), x.device)
        if not return_features:
            return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
        captured: list[torch.Tensor] = []

        def keep(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self.unet.up_blocks[-1].register_forward_hook(keep)
        try:
            out = self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
        finally:
            handle.remove()
        return out, captured[-1]


class DiffusersTarget(LightningModule):
    """A diffusers DDPM pipeline as a frozen target: sampling (`ancestral_sample`, `speculative_sample`),
    `python train.py evaluate` and drafter training use it as they use a `TargetDiffusion`.

    `model(x, t)` is the UNet's prediction at integer train timesteps t (B,), as the pipeline calls it;
    `model.schedule` is the scheduler's (see `schedule_from_scheduler_config`); `model.sample_shape` is
    (in_channels, *sample_size). Loaded in eval mode and frozen; it is not trained here (no `training_step`).
    A class-conditional UNet makes a conditional target: `model(x, t, labels=...)`, `model.num_classes`,
    `model.p_uncond` (0 without a null class: no guidance; None with one: unknown, guidance allowed).

    Args:
        pretrained: a folder written by `DDPMPipeline.save_pretrained`, or a hub id such as
            google/ddpm-cifar10-32 (needs the network once, then read from the hub cache).
        sample_shape: linked from the data by the CLI; must equal the UNet's.
        null_class: for a class-conditional UNet, the class-embedding index trained as "no label"
            (module docstring); default: `"_null_class"` of `unet/config.json`, else none.
    """

    def __init__(self, pretrained: str, sample_shape: tuple[int, ...] | None = None, null_class: int | None = None):
        super().__init__()
        folder = pipeline_folder(pretrained)
        unet_config, schedule = check_pipeline(folder)
        where = "null_class" if null_class is not None else f"{folder}/unet/config.json {NULL_CLASS_KEY}"
        null_class = null_class if null_class is not None else unet_config.get(NULL_CLASS_KEY)
        check_null_class(null_class, check_unet_config(unet_config), where)  # before loading the weights
        unet = _diffusers().UNet2DModel.from_pretrained(str(folder), subfolder="unet")
        self.net = DiffusersUNet(unet, null_class, where)
        self.schedule = schedule
        self.pretrained = str(pretrained)
        self.sample_shape = tuple(self.net.sample_shape)
        if sample_shape is not None and tuple(int(s) for s in sample_shape) != self.sample_shape:
            raise ValueError(f"model.sample_shape: the data gives samples of shape {tuple(sample_shape)} but the "
                             f"pipeline's UNet ({pretrained}) takes {self.sample_shape}; use data of the model's size")
        conditional_without_null = self.net.num_class_embeds > 0 and self.net.null_class is None
        self.p_uncond = 0.0 if conditional_without_null else None  # 0: guidance.check_guidance refuses the null row
        self.save_hyperparameters({"pretrained": self.pretrained, "sample_shape": list(self.sample_shape),
                                   "null_class": self.net.null_class})
        self.eval().requires_grad_(False)
        self.checkpoint_info = {"path": self.pretrained, "weights": "diffusers", "global_step": None, "epoch": None}

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional UNet (0: unconditional), the null class not counted."""
        return self.net.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_features: bool = False, labels=None):
        """The UNet's prediction at states x (B, *shape), train timesteps t (B,) and, for a class-conditional
        UNet, labels (B,) (`guidance.NULL_LABEL` or None: the null class)."""
        return self.net(x, t, return_features=return_features, labels=labels)


def load_pipeline_target(source: str | Path, map_location="cpu", null_class: int | None = None) -> DiffusersTarget:
    """`DiffusersTarget(source, null_class=...)` on `map_location`, in eval mode, frozen (what `load_target`
    returns)."""
    target = DiffusersTarget(str(source), null_class=null_class)
    return target.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
