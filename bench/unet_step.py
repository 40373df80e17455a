"""Seconds per UNet forward: ours against diffusers' UNet2DConditionModel holding the same weights.

    venv/bin/python bench/unet_step.py [--latent 32] [--batch 2] [--threads 2] [--repeats 3]

An SD 1.5-size UNet with random weights, fp32 on the CPU. The two models are timed in turns
(ours, theirs, ours, ...) after one warm-up call each, so both see the same machine state; the
best time of each is compared. Needs diffusers (installed with the test requirements).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.models.detect import sd15_spec  # noqa: E402
from modules.models.unet import UNetModel  # noqa: E402
from tests.reference_models import diffusers_unet  # noqa: E402
from tests.tiny import randomize_  # noqa: E402


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px images)")
    p.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    kwargs = sd15_spec().unet
    ours = randomize_(UNetModel(**kwargs), seed=0).eval().requires_grad_(False)
    theirs = diffusers_unet(kwargs, ours).requires_grad_(False)
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    t = torch.full((args.batch,), 500.0)
    context = torch.randn(args.batch, 77, kwargs["context_dim"])

    runs = {
        "ours": lambda: ours(x, t, context),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample,
    }
    with torch.inference_mode():
        reference = runs["diffusers"]()  # also the warm-ups
        difference = (runs["ours"]() - reference).abs().max().item()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(seconds(run))

    best = {name: min(values) for name, values in times.items()}
    print(f"SD 1.5 UNet, fp32 CPU, batch {args.batch}, {args.latent}x{args.latent} latent, "
          f"{args.threads} threads, best of {args.repeats}")
    for name, value in best.items():
        print(f"  {name:9s} {value:6.2f} s per forward  (all: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"  ratio ours / diffusers: {best['ours'] / best['diffusers']:.2f}x   "
          f"(max output difference {difference:.1e}, output std {reference.std().item():.2f})")


if __name__ == "__main__":
    main()
