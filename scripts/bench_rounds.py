"""Where a speculative round's time goes, at batch 1: the table of docs/performance.md.

For the shipped digits target and a CIFAR-size U-Net (configs/target/cifar10.yaml's network, random
weights: enough to time a round against a step), prints per method:
  - operators dispatched outside the networks per round / per ancestral step, host syncs per round
    (`specdiff_train.overhead`, counted on an eager run),
  - wall-clock of speculative vs ancestral sampling per sample at batch 1 (ratio measured in one run),
  - a round's time over one target call on as many rows as a round evaluates (window + 1).
`--compile target` applies torch.compile (mode "reduce-overhead": CUDA graphs on a GPU) to the target
network only, for ancestral and speculative sampling alike; `--compile all` samples with compile=True (the
whole round and the ancestral step captured as graphs; compilation is the untimed warm-up). The
"N-row target call" is the compiled network in both compiled modes.

    python scripts/bench_rounds.py                                   # CPU, 1 thread
    python scripts/bench_rounds.py --compile all --targets digits    # compiled rounds on the CPU
    python scripts/bench_rounds.py --device cuda --compile all       # make bench-gpu
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdiff_train.diffusion import DDPMSchedule  # noqa: E402
from specdiff_train.models import load_target  # noqa: E402
from specdiff_train.nets import UNet  # noqa: E402
from specdiff_train.overhead import ancestral_overhead, speculative_overhead  # noqa: E402
from specdiff_train.sampling import ancestral_sample  # noqa: E402
from specdiff_train.speculative import FreeDrafter, speculative_sample  # noqa: E402


class _Target(torch.nn.Module):
    """A network with the denoiser contract model(x, t), its schedule and sample shape."""

    def __init__(self, net, schedule, sample_shape):
        super().__init__()
        self.net, self.schedule, self.sample_shape = net, schedule, tuple(sample_shape)

    def forward(self, x, t):
        return self.net(x, t)


def cifar_size_target() -> _Target:
    net = UNet(in_channels=3, image_size=32, base_channels=128, channel_mults=[1, 2, 2, 2], num_res_blocks=2,
               attention_levels=[1], num_heads=4, dropout=0.1)
    return _Target(net.eval(), DDPMSchedule(1000), (3, 32, 32))


def digits_target() -> _Target:
    target = load_target(ROOT / "checkpoints" / "digits" / "target.ckpt")
    return _Target(target.eval(), target.schedule, target.sample_shape)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_sample_time(fn, seeds, device) -> float:
    fn(seeds[0])  # warm-up: caches, compilation, CUDA graphs for this shape
    synchronize(device)
    times = []
    for seed in seeds:
        start = time.perf_counter()
        fn(seed)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def call_time(model, rows: int, shape, device, repeats: int = 30) -> float:
    x = torch.randn(rows, *shape, device=device)
    t = torch.full((rows,), 500, device=device)
    with torch.no_grad():
        return per_sample_time(lambda _: model(x, t), list(range(repeats)), device)


def run(name: str, target: _Target, args, device) -> list[dict]:
    target = target.to(device)
    schedule, shape = target.schedule, target.sample_shape
    model, compile_round, network = target, args.compile == "all", target
    if args.compile != "none":
        network = torch.compile(target, mode="reduce-overhead")  # the target call alone, for round / call
        model = target if compile_round else network  # "all": the samplers compile the network with the round
        # every row count an eager round can evaluate (1 .. window + 1; compiled rounds call the network in
        # their own graphs, timed here at window + 1 rows only), compiled and captured before any timing
        for n_rows in ([args.window + 1] if compile_round else range(1, args.window + 2)):
            for _ in range(3):
                call_time(network, n_rows, shape, device, repeats=1)
    rows = []
    for num_steps in args.num_steps:
        ancestral = ancestral_overhead(target, schedule, shape, num_steps=num_steps, seeds=[1])
        seeds = list(range(100, 100 + args.samples))
        anc_s = per_sample_time(lambda s: ancestral_sample(model, schedule, shape, num_steps=num_steps, seeds=[s],
                                                           compile=compile_round), seeds, device)
        for verifier in args.verifiers:
            counts = speculative_overhead(target, schedule, shape, num_steps=num_steps, drafter=FreeDrafter("x0"),
                                          verifier=verifier, window=args.window, seeds=[1])
            results = []

            def spec(s):
                results.append(speculative_sample(model, schedule, shape, num_steps=num_steps, seeds=[s],
                                                  drafter=FreeDrafter("x0"), verifier=verifier, window=args.window,
                                                  compile=compile_round))

            spec_s = per_sample_time(spec, seeds, device)
            rounds = statistics.mean(r.stats.rounds for r in results)
            calls = statistics.mean(r.stats.target_calls_per_sample for r in results)
            window_call = call_time(network, args.window + 1, shape, device)
            rows.append(dict(
                target=name, steps=num_steps, method=f"free-x0/{verifier}/w{args.window}",
                ops_round=counts["ops_per_round"], syncs_round=counts["syncs_per_round"],
                ops_step=ancestral["ops_per_step"], calls=calls, ancestral_ms=1e3 * anc_s, spec_ms=1e3 * spec_s,
                ratio=spec_s / anc_s, round_ms=1e3 * spec_s / rounds, call_ms=1e3 * window_call,
                round_over_call=spec_s / rounds / window_call,
            ))
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| target | steps | method | ops/round (outside nets) | host syncs/round | ancestral ops/step "
          "| target calls/sample | ancestral ms/sample | speculative ms/sample | speculative / ancestral "
          "| round ms | {rows}-row target call ms | round / call |")


def format_row(r: dict) -> str:
    return (f"| {r['target']} | {r['steps']} | {r['method']} | {r['ops_round']:.0f} | {r['syncs_round']:.2f} "
            f"| {r['ops_step']:.1f} | {r['calls']:.1f} | {r['ancestral_ms']:.1f} | {r['spec_ms']:.1f} "
            f"| {r['ratio']:.2f} | {r['round_ms']:.2f} | {r['call_ms']:.2f} | {r['round_over_call']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=["none", "target", "all"], default="none",
                        help="target: torch.compile (mode 'reduce-overhead') the target network only; all: the samplers' "
                             "compile=True (the whole round, and the ancestral step, as graphs)")
    parser.add_argument("--targets", nargs="+", default=["digits", "cifar-size"], choices=["digits", "cifar-size"])
    parser.add_argument("--num-steps", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--verifiers", nargs="+", default=["block", "tokenwise"])
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--samples", type=int, default=3, help="seeds timed one by one (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    makers = {"digits": digits_target, "cifar-size": cifar_size_target}
    rows = []
    for name in args.targets:
        rows += run(name, makers[name](), args, device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\ndevice: {card}; torch {torch.__version__}; batch 1; compile: {args.compile}")
    print(HEADER.format(rows=args.window + 1))
    print("|" + "---|" * 13)
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
