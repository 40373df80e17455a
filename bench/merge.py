"""Peak memory of merging two SD 1.5-size fp16 checkpoints, as a multiple of one model's size.

    venv/bin/python bench/merge.py [--dir /tmp] [--method "Weighted sum"]

Two files with random weights (2.1 GB each) are written once and reused. Each measurement runs
in a fresh process and reports its own resident-set high-water mark (VmHWM in
/proc/self/status, which also counts memory-mapped file pages while they are resident; unlike a
child's ru_maxrss it does not start from the parent's size at fork): first a process that only
imports the web UI's modules and builds its context (the baseline), then one that also merges
the two files through modules/merger.py into a new .safetensors file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KIB = 1024


def child(data_dir: Path, method: str | None) -> None:
    """Runs in the measured process."""
    import torch

    torch.set_num_threads(2)
    from modules.app.config import Flags
    from modules.context import AppContext
    from modules.models import merger

    ctx = AppContext.create(Flags(data_dir=data_dir, device="cpu"))
    seconds, written = 0.0, 0
    if method:
        started = time.perf_counter()
        path = merger.merge(ctx, merger.MergeRequest(primary="a", secondary="b", tertiary="a", interpolation=method,
                                                     multiplier=0.5, name="merged"))
        seconds, written = time.perf_counter() - started, path.stat().st_size
    print(peak_rss(), seconds, written)


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * KIB


def measure(data_dir: Path, method: str | None) -> tuple[int, float, int]:
    """(peak resident bytes, merge seconds, bytes written) of one fresh process."""
    command = [sys.executable, __file__, "--child", str(data_dir)] + (["--method", method] if method else [])
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    peak, seconds, written = done.stdout.split()[-3:]
    return int(peak), float(seconds), int(written)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--method", default="Weighted sum")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.method if "--method" in (argv or sys.argv) else None)
        return

    from bench.load import write_random_checkpoint

    files = {name: args.dir / f"sd15-random-fp16-seed{seed}.safetensors" for name, seed in (("a", 1), ("b", 2))}
    for name, path in files.items():
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            write_random_checkpoint(path, seed=1 if name == "a" else 2)
    model_size = files["a"].stat().st_size

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        folder = Path(root) / "models" / "Stable-diffusion"
        folder.mkdir(parents=True)
        for name, path in files.items():
            (folder / f"{name}.safetensors").symlink_to(path.resolve())
        baseline, _, _ = measure(Path(root), None)
        peak, seconds, written = measure(Path(root), args.method)

    gb = 1e9
    print(f"two SD 1.5-size fp16 checkpoints, {model_size / gb:.2f} GB each; {args.method}, M = 0.5, to .safetensors")
    print(f"  output {written / gb:.2f} GB written in {seconds:.1f} s (including the sha256 of both inputs for the recipe)")
    print(f"  peak RSS of the merging process: {peak / gb:.2f} GB = {peak / model_size:.2f}x one model")
    print(f"  of which imports and context (same process without merging): {baseline / gb:.2f} GB = {baseline / model_size:.2f}x")
    print(f"  merge's own share: {(peak - baseline) / gb:.2f} GB = {(peak - baseline) / model_size:.2f}x")


if __name__ == "__main__":
    main()
