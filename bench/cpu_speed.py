"""CPU speed of the precision policy: float32 against the policy's precision (bfloat16 on a
processor with AVX-512 BF16 or AMX), beside diffusers' float32, in one run.

    venv/bin/python bench/cpu_speed.py [--threads 2] [--steps 20] [--n 100] [--skip-picture]

1. An SD 1.5-size UNet with random weights, batch 2 (one picture with classifier-free guidance),
   64x64 latent (512 px): ours in float32, ours in the policy's precision, diffusers'
   UNet2DConditionModel in float32 holding the same weights; timed in turns, best of `--repeats`.
2. That model's VAE decoding a 512 px picture: float32, the policy's dtype, and that dtype with
   channels-last convolution weights.
3. A whole 512 px picture of that model (text encoding, `--steps` Euler steps, VAE decode) in each
   precision, and how far the bfloat16 run's final latent is from float32's.
4. The built-in model: seconds per picture, adherence scores on the prompt sets that did not
   choose it (bench/builtin_model_eval.py's FRESH_SEEDS) in each precision, and the PSNR between
   the two precisions' pictures of the same seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import builtin_model_eval as builtin  # noqa: E402
from modules.app.config import Flags  # noqa: E402
from modules.generation import pipeline  # noqa: E402
from modules.generation.request import GenerationRequest  # noqa: E402
from modules.models.detect import sd15_spec  # noqa: E402
from modules.models.memory import DTYPES, DevicePolicy, place  # noqa: E402
from modules.models.sd_model import SDModel  # noqa: E402
from modules.models.unet import UNetModel  # noqa: E402
from tests.reference_models import diffusers_unet  # noqa: E402
from tests.tiny import randomize_  # noqa: E402


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def unet_speed(model: SDModel, policy: DevicePolicy, latent: int, repeats: int) -> None:
    dtype = policy.dtype
    ours32 = model.model.diffusion_model
    with torch.device("meta"):
        ours = UNetModel(**model.spec.unet)
    ours.load_state_dict({k: v.to(dtype) for k, v in ours32.state_dict().items()}, assign=True)
    ours = ours.eval().requires_grad_(False)
    if policy.channels_last:  # as modules.models.memory.place puts it
        ours.to(memory_format=torch.channels_last)
    theirs = diffusers_unet(model.spec.unet, ours32).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, model.spec.unet["context_dim"], generator=g)
    runs = {
        "ours float32": lambda: ours32(x, t, context),
        f"ours {str(dtype)[6:]}": lambda: ours(x.to(dtype), t, context.to(dtype)),
        "diffusers float32": lambda: theirs(x, t, encoder_hidden_states=context).sample,
    }
    with torch.inference_mode():
        outputs = {name: run().float() for name, run in runs.items()}  # also the warm-ups
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(seconds(run))
    best = {name: min(values) for name, values in times.items()}
    print(f"1. SD 1.5-size UNet, batch 2, {latent}x{latent} latent ({latent * 8} px), best of {repeats}")
    for name, value in best.items():
        print(f"   {name:18s} {value:6.2f} s per forward  (all: {', '.join(f'{v:.2f}' for v in times[name])})")
    fast, reference = list(best)[1], "diffusers float32"
    print(f"   {fast} / diffusers float32: {best[fast] / best[reference]:.2f}x (goal <= 0.4x); "
          f"ours float32 / diffusers: {best['ours float32'] / best[reference]:.2f}x")
    print(f"   relative difference of the output, {fast} against float32: {relative(outputs[fast], outputs['ours float32']):.4f}")


def vae_speed(model: SDModel, policy: DevicePolicy) -> None:
    """The 512 px decode in float32, in the policy's dtype, and in that dtype with channels-last
    weights (what `place` does when the policy says so)."""
    vae32 = model.first_stage_model
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    print("2. SD VAE decode, 512 px")
    with torch.inference_mode():
        reference = vae32.decode(z)
        print(f"   float32                  {seconds(lambda: vae32.decode(z)):6.2f} s")
        with torch.device("meta"):
            vae = type(vae32)(**model.spec.vae)
        vae.load_state_dict({k: v.to(policy.dtype) for k, v in vae32.state_dict().items()}, assign=True)
        name = str(policy.dtype)[6:]
        vae.decode(z.to(policy.dtype))  # warm-up
        print(f"   {name:24s} {seconds(lambda: vae.decode(z.to(policy.dtype))):6.2f} s")
        vae.to(memory_format=torch.channels_last)
        vae.decode(z.to(policy.dtype))
        print(f"   {name + ', channels-last':24s} {seconds(lambda: vae.decode(z.to(policy.dtype))):6.2f} s; relative difference "
              f"against float32 {relative(vae.decode(z.to(policy.dtype)), reference):.4f}")


def whole_picture(model: SDModel, policy: DevicePolicy, steps: int) -> None:
    request = GenerationRequest(prompt="a photograph of a lighthouse on a cliff at sunset, detailed", negative_prompt="blurry",
                                steps=steps, width=512, height=512, sampler_name="Euler", seed=1)
    fp32 = DevicePolicy(policy.device, torch.float32, torch.float32, "none")
    latents, took = {}, {}
    print(f"3. A 512 px SD 1.5-size picture, {steps} Euler steps (text, sampling, VAE decode)")
    for name, chosen in (("float32", fp32), (str(policy.dtype)[6:], policy)):
        place(model, chosen)
        started = time.perf_counter()
        with torch.inference_mode():
            latents[name] = pipeline.sample_latents(model, request, [1])
            pipeline.latents_to_images(model, latents[name])
        took[name] = time.perf_counter() - started
        print(f"   {name:9s} {took[name]:6.1f} s per picture (goal < 60 s)")
    first, second = list(latents)
    print(f"   final latent, {second} against float32: relative difference {relative(latents[second], latents[first]):.4f}")


def builtin_model(policy: DevicePolicy, n: int, steps: int) -> None:
    precisions = {"float32": "fp32", str(policy.dtype)[6:]: next(k for k, v in DTYPES.items() if v == policy.dtype)}
    print(f"4. Built-in model, {n} prompts in each of the sets {', '.join(map(str, builtin.FRESH_SEEDS))} (chose nothing), {steps} steps")
    pictures, per_image = {}, {}
    for name, precision in precisions.items():
        model = builtin.load_model(builtin.DEFAULT_MODEL, precision)
        results = [builtin.evaluate(model, n, seed, steps) for seed in builtin.FRESH_SEEDS]
        pooled = builtin._pooled([scores for scores, *_ in results])
        per_image[name] = sum(s for _, s, _, _ in results) / len(results)
        pictures[name] = np.concatenate([p for *_, p in results])
        print(f"   {name:9s} " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pooled.items())
              + f"; {per_image[name]:.3f} s per picture")
    first, second = list(pictures)
    each = [psnr(a, b) for a, b in zip(pictures[first], pictures[second])]
    finite = [v for v in each if np.isfinite(v)]
    print(f"   PSNR {second} against float32, same seeds: mean {np.mean(finite):.1f} dB over {len(finite)} pictures "
          f"({len(each) - len(finite)} identical); speed-up {per_image[first] / per_image[second]:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="UNet latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=100, help="built-in model: prompts per set")
    p.add_argument("--skip-picture", action="store_true", help="leave out the whole SD 1.5-size picture (minutes)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = DevicePolicy.from_flags(Flags(device="cpu"))
    print(f"policy: {policy.reason}; {args.threads} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    model = randomize_(SDModel(sd15_spec()), seed=0).eval().requires_grad_(False)
    unet_speed(model, policy, args.latent, args.repeats)
    vae_speed(model, policy)
    if not args.skip_picture:
        whole_picture(model, policy, args.steps)
    del model
    builtin_model(policy, args.n, args.steps)


if __name__ == "__main__":
    main()
