"""Seconds from an SD 1.5-size fp16 .safetensors file to a model ready to sample.

    venv/bin/python bench/load.py [--file /tmp/sd15-random-fp16.safetensors] [--repeats 3]

The file (random weights, 2.1 GB) is written once and reused. The page cache is warmed by
reading it, then the web UI's ModelManager loads it the way a request does: read (memory-mapped),
detect family and sizes, build, place in the policy's precision (fp32 on this CPU). The first
model hash (sha256 of the whole file, cached afterwards) is timed on its own.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.app.config import Flags, Paths  # noqa: E402
from modules.models import detect, loader  # noqa: E402
from modules.models.memory import DevicePolicy, ModelManager  # noqa: E402
from modules.models.sd_model import build_model  # noqa: E402


def write_random_checkpoint(path: Path, seed: int = 0) -> None:
    from safetensors.torch import save_file

    skeleton = build_model(detect.sd15_spec(), device="meta")
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        key: (torch.randn(value.shape, generator=generator) * 0.02).to(torch.float16)
        for key, value in skeleton.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "sd15-random-fp16.safetensors")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not args.file.is_file():
        print(f"writing {args.file} ...")
        write_random_checkpoint(args.file)
    size_gb = args.file.stat().st_size / 1e9
    with open(args.file, "rb") as f:  # warm page cache
        while f.read(1 << 24):
            pass

    with tempfile.TemporaryDirectory() as root:
        paths = Paths(Path(root))
        paths.checkpoints.mkdir(parents=True)
        (paths.checkpoints / args.file.name).symlink_to(args.file.resolve())
        policy = DevicePolicy.from_flags(Flags(device="cpu"))
        times = []
        for _ in range(args.repeats):
            models = ModelManager(paths, policy)
            started = time.perf_counter()
            model = models.get()
            times.append(time.perf_counter() - started)
            dtype = next(model.parameters()).dtype
            del model, models
            gc.collect()
        started = time.perf_counter()
        loader.model_hash(args.file, paths.hash_cache)
        hash_seconds = time.perf_counter() - started

    print(f"{args.file.name}: {size_gb:.2f} GB fp16, warm page cache, {args.threads} threads")
    print(f"  file -> ready to sample ({dtype}): best {min(times):.2f} s  (all: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"  first model hash (sha256, cached afterwards): {hash_seconds:.2f} s")


if __name__ == "__main__":
    main()
