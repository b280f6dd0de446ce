"""Shared test helpers: small stand-in nets and data, running `train.py` in a subprocess, reading
checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


class TinyDenoiser(torch.nn.Module):
    """A small MLP denoiser for 2-D data, with the nets' contract (sample_shape, feature_dim,
    return_features); its constructor arguments are attributes, so its config is recoverable."""

    def __init__(self, dim: int = 2, hidden: int = 32, num_train_steps: int = 1000):
        super().__init__()
        self.dim, self.hidden, self.num_train_steps = dim, hidden, num_train_steps
        self.sample_shape = (dim,)
        self.feature_dim = hidden
        self.body = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.SiLU())
        self.head = torch.nn.Linear(hidden, dim)

    def forward(self, x, t, return_features=False):
        h = self.body(torch.cat([x, (t.float() / self.num_train_steps)[:, None].to(x.dtype)], dim=1))
        out = self.head(h)
        return (out, h) if return_features else out


class OpaqueDenoiser(TinyDenoiser):
    """Same net, but its width is not stored under the constructor argument's name."""

    def __init__(self, width: int = 32):
        super().__init__(hidden=width)


class NaNDenoiser(TinyDenoiser):
    """Returns NaN from the start: training must stop with a clear message."""

    def forward(self, x, t, return_features=False):
        return super().forward(x, t) * float("nan")


class TinyDataModule(LightningDataModule):
    """Two Gaussian blobs in 2-D, with the data modules' contract (`sample_shape`, `reference_samples`)."""

    def __init__(self, num_samples: int = 256, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.sample_shape = (2,)

    def reference_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        centres = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])[torch.randint(0, 2, (n,), generator=gen)]
        return centres + 0.1 * torch.randn(n, 2, generator=gen)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.reference_samples(self.num_samples, self.seed)),
                          batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.reference_samples(self.batch_size, self.seed + 1)),
                          batch_size=self.batch_size)

    test_dataloader = val_dataloader


def offline_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    # One intra-op thread: on a small shared CI machine, several OpenMP threads per process thrash
    # (50x slower steps seen on 2 busy cores). A caller's setting wins.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_train(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py *args` from the repository root, offline (plus `env`); fails with its output on error."""
    # A session of its own: on timeout the whole group goes (DDP workers too, which would otherwise
    # keep the pipes open and hang the test instead of failing it).
    with subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env={**offline_env(), **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"train.py {' '.join(map(str, args))} ran past {timeout}s (killed):\n"
                                 f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-8000:]}")
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_one(root: Path, pattern: str) -> Path:
    found = sorted(Path(root).rglob(pattern))
    assert found, f"no {pattern} under {root}: {sorted(p.relative_to(root) for p in Path(root).rglob('*'))}"
    return found[-1]


def save_tiny_pipeline(folder, *, in_channels: int = 1, sample_size: int = 8, block_out_channels=(8, 16),
                       seed: int = 0, unet_kwargs: dict | None = None, **scheduler_kwargs) -> Path:
    """A randomly initialised diffusers `UNet2DModel` (a few 10k parameters, one attention level) and a
    `DDPMScheduler` (`scheduler_kwargs`), written by `DDPMPipeline.save_pretrained` to `folder`."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, **(unet_kwargs or {}))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_kwargs)).save_pretrained(str(folder))
    return Path(folder)


def train_on_fixed_states(module, x0, steps: int, seed: int, lr: float = 3e-3) -> list[tuple[float, float]]:
    """`steps` Adam steps of a drafter-training module's `losses` on the same states each step (the generator
    reseeded with `seed`): [(loss, mean delta^2)] per step."""
    optimizer = torch.optim.Adam(getattr(module, module.module_key).parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss, delta_sq, _, _ = module.losses(x0, torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), delta_sq.mean().item()))
    return history


def widen_scheduler_tables(sched):
    """A diffusers scheduler with its beta / alpha tables in float64, to compare steps with ours in float64
    (both are built from the same float32 betas)."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    return sched
