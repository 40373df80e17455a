"""Seconds per image and peak GPU memory of an SD 1.5-size model in each precision and offload mode.

    python bench/gpu_generate.py [--file /tmp/sd15-random-fp16.safetensors] [--size 512] [--steps 20]

Needs a CUDA device. The checkpoint (random weights, 2.1 GB fp16) is the one bench/load.py writes,
written once and reused. Each mode builds its own AppContext as `launch.py` would with the
matching flags (--no-half, --medvram, --lowvram), generates one warm-up picture and then times
one more (text encoding, sampling and VAE decode included, through modules/generation/pipeline.py). Peak
memory is torch's high-water mark of allocated GPU memory over the timed picture. Ratios are to
the first mode, fp32 with the whole model on the GPU, measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import write_random_checkpoint  # noqa: E402
from modules.app.config import Flags  # noqa: E402
from modules.context import AppContext  # noqa: E402
from modules.generation import pipeline  # noqa: E402
from modules.generation.request import GenerationRequest  # noqa: E402

MODES = {  # name -> the launch flags that select it
    "fp32": dict(no_half=True),
    "fp16": dict(),
    "fp16 --medvram": dict(medvram=True),
    "fp16 --lowvram": dict(lowvram=True),
}


def measure(data_dir: Path, flags: dict, request: GenerationRequest) -> tuple[float, float]:
    ctx = AppContext.create(Flags(data_dir=data_dir, device="cuda", **flags))
    pipeline.generate(ctx, request, save=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipeline.generate(ctx, request.replace(seed=request.seed + 1), save=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    del ctx
    gc.collect()
    torch.cuda.empty_cache()
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "sd15-random-fp16.safetensors")
    p.add_argument("--size", type=int, default=512, help="width and height of the picture")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    if not args.file.is_file():
        print(f"writing {args.file} ...", flush=True)
        write_random_checkpoint(args.file, "SD1")

    request = GenerationRequest(prompt="a photograph of a lighthouse at dusk", negative_prompt="blurry",
                                steps=args.steps, width=args.size, height=args.size, seed=1)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        (folder / args.file.name).symlink_to(args.file.resolve())
        for name, flags in MODES.items():
            results[name] = measure(Path(root), flags, request)
            print(f"  {name}: {results[name][0]:.2f} s, peak {results[name][1]:.2f} GiB", flush=True)

    base_seconds, base_peak = next(iter(results.values()))
    print(f"{torch.cuda.get_device_name()}: {args.size}x{args.size}, {args.steps} steps, default sampler, batch 1")
    print(f"{'mode':<16} {'s/image':>8} {'speed':>7} {'peak GiB':>9} {'memory':>7}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<16} {seconds:>8.2f} {base_seconds / seconds:>6.2f}x {peak:>9.2f} {peak / base_peak:>6.2f}x")


if __name__ == "__main__":
    main()
