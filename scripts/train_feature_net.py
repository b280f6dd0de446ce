"""Train the project's feature network (a small digits classifier) for offline FID / KID.

    python scripts/train_feature_net.py                      # -> checkpoints/digits_features.pt
    python scripts/train_feature_net.py --image-size 16 --out checkpoints/digits16_features.pt

Deterministic for a given seed on a given torch build; runs in well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specdiff_train.nets.classifier import DigitsClassifier, accuracy, digits_split

ROOT = Path(__file__).resolve().parents[1]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with the background (-1)."""
    b, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    # (B, H+2s, W+2s, C) gathered at per-image offsets -> (B, H, W, C)
    crops = padded.permute(0, 2, 3, 1)[torch.arange(b).view(b, 1, 1), rows, cols]
    return crops.permute(0, 3, 1, 2)


def train(args: argparse.Namespace) -> dict:
    """Train on the digits train split; return the checkpoint dict (weights, kwargs, test accuracy)."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data = digits_split(args.image_size, args.in_channels, args.test_fraction, args.seed)
    kwargs = dict(
        in_channels=args.in_channels,
        image_size=args.image_size,
        num_classes=10,
        width=args.width,
        feature_dim=args.feature_dim,
    )
    model = DigitsClassifier(**kwargs)
    x, y = data["train_images"], data["train_labels"]
    steps_per_epoch = -(-len(x) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], 1, g)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    test_acc = accuracy(model, data["test_images"], data["test_labels"])
    note = (
        f"scripts/train_feature_net.py --seed {args.seed} --epochs {args.epochs} "
        f"--image-size {args.image_size} --in-channels {args.in_channels}: sklearn load_digits "
        f"(0..16 -> [-1, 1]), stratified split test_fraction={args.test_fraction} "
        f"random_state={args.seed}, +-1 px shifts; torch {torch.__version__}"
    )
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "kwargs": kwargs,
        "test_accuracy": test_acc,
        "test_fraction": args.test_fraction,
        "split_seed": args.seed,
        "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "digits_features.pt")
    parser.add_argument("--image-size", type=int, default=8, help="resize the 8x8 digits to this side")
    parser.add_argument("--in-channels", type=int, default=1, help="repeat the grey image to C channels")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    ckpt = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    print(
        f"test accuracy {ckpt['test_accuracy']:.4f}; saved {args.out} "
        f"({args.out.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
