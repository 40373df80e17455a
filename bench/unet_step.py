"""Seconds per UNet forward: ours against diffusers' UNet2DConditionModel holding the same weights.

    venv/bin/python bench/unet_step.py [--family sd1|sd2|sdxl] [--latent 32] [--batch 2] [--threads 2] [--repeats 3]

A full-size UNet of the family (SD 1.5, SD 2.1, SDXL base 1.0) with random weights, fp32 on the
CPU. The two models are timed in turns (ours, theirs, ours, ...) after one warm-up call each, so
both see the same machine state; the best time of each is compared. diffusers' model is made by
its own single-file conversion and shares our weights' storage, so both fit in one model's memory
(SDXL's UNet is 10.3 GB in fp32). SDXL's vector input is built by SDModel.vector for ours and
given to diffusers as the pipelines do (pooled text and the raw size numbers). Needs diffusers
(installed with the test requirements).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.models.detect import full_size_spec  # noqa: E402
from modules.models.sd_model import build_model  # noqa: E402
from modules.models.unet import UNetModel  # noqa: E402
from tests.reference_models import diffusers_unet  # noqa: E402
from tests.tiny import randomize_  # noqa: E402

FAMILIES = {"sd1": ("SD1", "SD 1.5"), "sd2": ("SD2", "SD 2.1"), "sdxl": ("SDXL", "SDXL base")}


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def random_unet(kwargs: dict) -> UNetModel:
    # Built on the meta device and given memory without initialising it: randomize_ writes every
    # weight anyway, and default initialisation of SDXL's 2.6e9 weights would take as long again.
    with torch.device("meta"):
        unet = UNetModel(**kwargs)
    return randomize_(unet.to_empty(device="cpu"), seed=0).eval().requires_grad_(False)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd1")
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px images, 128 = SDXL's 1024 px)")
    p.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    family, title = FAMILIES[args.family]

    spec = full_size_spec(family)
    kwargs = spec.unet
    started = time.perf_counter()
    ours = random_unet(kwargs)
    theirs = diffusers_unet(kwargs, ours).requires_grad_(False)
    build_seconds = time.perf_counter() - started
    weights = sum(t.numel() for t in ours.parameters())
    ours_storage = {t.untyped_storage().data_ptr() for t in ours.parameters()}
    shared = all(t.untyped_storage().data_ptr() in ours_storage for t in theirs.parameters())

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    t = torch.full((args.batch,), 500.0)
    context = torch.randn(args.batch, 77, kwargs["context_dim"], generator=g)
    extra, added = {}, {}
    if spec.vector is not None:
        side = args.latent * 8
        pooled = torch.randn(args.batch, kwargs["adm_in_channels"] - 6 * 256, generator=g)
        skeleton = build_model(spec, device="meta")  # vector() reads the spec only
        extra["y"] = torch.stack([skeleton.vector(row, side, side) for row in pooled])
        added["added_cond_kwargs"] = {
            "text_embeds": pooled,
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * args.batch, dtype=torch.float32),
        }

    runs = {
        "ours": lambda: ours(x, t, context, **extra),
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=context, **added).sample,
    }
    with torch.inference_mode():
        reference = runs["diffusers"]()  # also the warm-ups
        difference = (runs["ours"]() - reference).abs().max().item()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(seconds(run))

    best = {name: min(values) for name, values in times.items()}
    print(f"{title} UNet ({weights / 1e9:.2f}e9 weights, {weights * 4 / 1e9:.1f} GB), fp32 CPU, batch {args.batch}, "
          f"{args.latent}x{args.latent} latent, {args.threads} threads, best of {args.repeats}")
    for name, value in best.items():
        print(f"  {name:9s} {value:6.2f} s per forward  (all: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"  ratio ours / diffusers: {best['ours'] / best['diffusers']:.2f}x   "
          f"(max output difference {difference:.1e}, output std {reference.std().item():.2f})")
    print(f"  both models built in {build_seconds:.1f} s, weights shared: {'yes' if shared else 'no'}, "
          f"peak RSS {peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
