"""What a drafted step costs next to a target call, at batch 1 (issue: learned drafters must stay cheap).

For the shipped learned drafters (`relative_draft_cost`: one draft call against one call of their own target)
and for Medusa heads sized for CIFAR-10 (configs/drafter/ddpm_cifar10_medusa.yaml's ConvHead, random weights)
against the CIFAR-size U-Net (configs/target/cifar10.yaml's network, random weights, as `bench_rounds.py`):
medians of `--repeats` calls after a warm-up, all in one run.

    python scripts/bench_draft_cost.py                 # CPU, 1 thread
    python scripts/bench_draft_cost.py --device cuda
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.diffusion import DDPMSchedule  # noqa: E402
from specdiff_train.drafters import relative_draft_cost  # noqa: E402
from specdiff_train.drafters.cost import median_call_time  # noqa: E402
from specdiff_train.drafters.medusa import ConvHead, medusa_x0  # noqa: E402
from specdiff_train.drafters.shipped import LEARNED_KINDS, learned_drafters_beside  # noqa: E402
from specdiff_train.models import load_target  # noqa: E402
from specdiff_train.nets import UNet  # noqa: E402


@torch.no_grad()
def cifar_rows(device, repeats: int) -> list[dict]:
    """The CIFAR-10 Medusa heads' draft step (random weights) against the CIFAR-size U-Net's call, batch 1."""
    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=32, base_channels=128, channel_mults=[1, 2, 2, 2], num_res_blocks=2,
               attention_levels=[1], num_heads=4, dropout=0.1).eval().to(device)
    head = ConvHead(in_channels=3, image_size=32, feature_dim=128, hidden=64, depth=2, time_embed_dim=64,
                    max_offset=8).eval().to(device)
    torch.nn.init.normal_(head.out.weight, std=0.01)  # a trained head's output layer is not zero
    schedule = DDPMSchedule(1000)
    x, anchor, anchor_x0 = (torch.randn(1, 3, 32, 32, device=device) for _ in range(3))
    features = torch.randn(1, 128, 32, 32, device=device)
    t, anchor_t, offset = (torch.full((1,), v, device=device) for v in (490, 500, 3))
    target_s = median_call_time(lambda: net(x, t), device, repeats)
    draft_s = median_call_time(lambda: medusa_x0(head, schedule, features, anchor, anchor_x0, x, t, offset, anchor_t),
                          device, repeats)
    return [dict(target="CIFAR-size U-Net (random weights)", drafter="medusa heads (ddpm_cifar10_medusa.yaml sizes)",
                 draft_ms=1e3 * draft_s, target_ms=1e3 * target_s, relative=draft_s / target_s, cifar_relative=draft_s / target_s)]


def shipped_rows(name: str, device, repeats: int, cifar_ms: float) -> list[dict]:
    target = load_target(ROOT / "checkpoints" / name / "target.ckpt").eval().to(device)
    rows = []
    for kind, make in learned_drafters_beside(ROOT / "checkpoints" / name, sorted(LEARNED_KINDS)).items():
        cost = relative_draft_cost(make(), target, target.schedule, target.sample_shape, batch_size=1, repeats=repeats)
        rows.append(dict(target=name, drafter=kind, draft_ms=1e3 * cost["draft_s"], target_ms=1e3 * cost["target_s"],
                         relative=cost["relative"], cifar_relative=1e3 * cost["draft_s"] / cifar_ms))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--targets", nargs="*", default=["toy2d", "digits"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = cifar_rows(device, args.repeats)
    cifar_ms = rows[0]["target_ms"]
    for name in args.targets:
        rows += shipped_rows(name, device, args.repeats, cifar_ms)
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)")
    print(f"device: {card}; torch {torch.__version__}; batch 1; median of {args.repeats} calls\n")
    print("| target | drafter | draft step ms | target call ms | draft / its target call | draft / CIFAR-size call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['drafter']} | {r['draft_ms']:.3f} | {r['target_ms']:.3f} | {r['relative']:.3f} "
              f"| {r['cifar_relative']:.4f} |")


if __name__ == "__main__":
    main()
