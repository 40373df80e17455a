"""Seconds and peak memory from a fp16 .safetensors file to a model ready to sample, against reading the file.

    venv/bin/python bench/load.py [--family sd1|sdxl] [--file PATH] [--threads 2] [--repeats 1]
                                  [--no-half] [--no-cold] [--thp] [--no-hash]

The file (random weights, every key of the family's full-size model: SD 1.5 2.1 GB, SDXL base
6.9 GB) is written once, one tensor at a time, and reused. Each load runs in a fresh process, as
the first load after the web UI starts: the web UI's ModelManager loads the file the way a request
does (read, detect family and sizes, build, place in the policy's precision; --no-half: float32).
Beside it the file's bytes are read once into one reused buffer, which is as fast as the file can
be read. "Cold" means the file's pages were dropped from the page cache first (posix_fadvise
DONTNEED; the disk or the host may still cache them; the faster of a cold read before and one
after the cold load counts), "warm" that the whole file is in the page cache. Peak memory is the
loading process's VmHWM (resident, counting the file's mapped pages), against the loaded model's
own size; "own" leaves out what the process held before loading (Python, torch and the web UI's
modules). A fresh process also times allocating and writing tensors of the loaded model's shapes
and dtype: the new memory any casting load needs, a floor for it. --thp adds a warm load with
PyTorch's THP_MEM_ALLOC_ENABLE=1 (large allocations on transparent huge pages). The first model
hash (sha256 of the whole file, cached afterwards) is timed on its own.

Goals: a load within 2x the time of reading the file, and a peak within 1.25x the loaded
model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = {"sd1": ("SD1", "SD 1.5"), "sdxl": ("SDXL", "SDXL base")}
READ_CHUNK = 1 << 24
GOAL_TIME = 2.0  # x the time to read the file
GOAL_MEMORY = 1.25  # x the loaded model's size


def write_random_checkpoint(path: Path, family: str, seed: int = 0) -> None:
    """Every key of the family's full-size model, fp16 random normal * 0.02, written tensor by
    tensor so that the writer never holds more than one."""
    import torch

    from modules.models import detect
    from modules.models import safetensors_stream as st
    from modules.models.sd_model import build_model

    skeleton = build_model(detect.full_size_spec(family), device="meta").state_dict()
    generator = torch.Generator().manual_seed(seed)
    entries = st.plan((key, torch.float16, tuple(value.shape)) for key, value in skeleton.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        st.write(f, entries, lambda e: (torch.randn(e.shape, generator=generator) * 0.02).to(torch.float16))
    partial.replace(path)


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_seconds(path: Path) -> float:
    buffer = memoryview(bytearray(READ_CHUNK))
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


def _memory_gb() -> dict[str, float]:
    """Resident memory now (VmRSS: RssAnon + RssFile + RssShmem) and its peak (VmHWM), in GB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(value.split()[0]) * 1024 / 1e9
    return values


def child(path: Path, threads: int, no_half: bool) -> None:
    """One load in this fresh process; prints its figures as JSON."""
    import torch

    torch.set_num_threads(threads)
    from modules.app.config import Flags, Paths
    from modules.models import loader, memory
    from modules.models.memory import DevicePolicy, ModelManager

    # Where the time goes: the file to an fp16 model (read, detect, build), then the cast.
    steps: dict[str, float] = {}

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                steps[name] = time.perf_counter() - started
        return call

    loader.load_checkpoint = timed("read, detect, build", loader.load_checkpoint)
    memory.place = timed("place (cast to the policy's dtype)", memory.place)

    # Peaks of the two parts of resident memory, sampled: anonymous (the cast model) and file
    # pages mapped by the process (the checkpoint's tensors not yet cast).
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _memory_gb()
            for key in peaks:
                peaks[key] = max(peaks[key], now[key])
            done.wait(0.005)

    with tempfile.TemporaryDirectory() as root:
        paths = Paths(Path(root))
        paths.checkpoints.mkdir(parents=True)
        (paths.checkpoints / path.name).symlink_to(path.resolve())
        models = ModelManager(paths, DevicePolicy.from_flags(Flags(device="cpu", no_half=no_half)))
        before = _memory_gb()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        model = models.get()
        seconds = time.perf_counter() - started
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        done.set()
        sampler.join()
        after = _memory_gb()
        tensors = [*model.parameters(), *model.buffers()]
        print(json.dumps({
            "seconds": seconds,
            "user": usage_after.ru_utime - usage.ru_utime,
            "system": usage_after.ru_stime - usage.ru_stime,
            # Page faults: minor ones map memory already there (fresh zeroed pages, cached file
            # pages), major ones wait for the disk.
            "minor_faults": usage_after.ru_minflt - usage.ru_minflt,
            "major_faults": usage_after.ru_majflt - usage.ru_majflt,
            "steps": steps,
            "dtype": str(tensors[0].dtype).removeprefix("torch."),
            "model_gb": sum(t.numel() * t.element_size() for t in tensors) / 1e9,
            "before_gb": before["VmRSS"],
            "peak_gb": after["VmHWM"],
            "after_gb": after["VmRSS"],
            "peak_anon_gb": peaks["RssAnon"],
            "peak_file_gb": peaks["RssFile"],
        }))


def fresh_memory_child(family: str, dtype_name: str, threads: int) -> None:
    """Seconds to allocate and write tensors of the model's shapes and the loaded dtype in this
    fresh process: the memory every load that casts must take from the system, which the kernel
    hands out one zeroed page at a time on first touch. A floor for the load's cast."""
    import torch

    from modules.models import detect
    from modules.models.sd_model import build_model

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    shapes = [tuple(t.shape) for t in build_model(detect.full_size_spec(family), device="meta").state_dict().values()]
    started = time.perf_counter()
    tensors = [torch.empty(shape, dtype=dtype).fill_(1.0) for shape in shapes]
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "gb": sum(t.numel() * t.element_size() for t in tensors) / 1e9}))


def _run_child(arguments: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *arguments],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"the measuring process failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_in_fresh_process(path: Path, threads: int, no_half: bool, env: dict[str, str] | None = None) -> dict:
    return _run_child(["--child", str(path), "--threads", str(threads), *(["--no-half"] if no_half else [])], env)


def report(name: str, load: dict, read: float) -> None:
    steps = ", ".join(f"{step} {value:.2f} s" for step, value in load["steps"].items())
    own = load["peak_gb"] - load["before_gb"]
    ratio, memory = load["seconds"] / read, load["peak_gb"] / load["model_gb"]
    print(f"  {name}: file -> ready to sample ({load['dtype']}) {load['seconds']:.2f} s = "
          f"{ratio:.2f}x the read (goal {GOAL_TIME}x: {'met' if ratio <= GOAL_TIME else 'missed'})")
    print(f"    {steps}; cpu {load['user']:.1f} s user, {load['system']:.1f} s system; page faults "
          f"{load['minor_faults']} minor, {load['major_faults']} major")
    print(f"    peak RSS {load['peak_gb']:.2f} GB = {memory:.2f}x the model's {load['model_gb']:.2f} GB "
          f"(goal {GOAL_MEMORY}x: {'met' if memory <= GOAL_MEMORY else 'missed'}); own {own:.2f} GB = "
          f"{own / load['model_gb']:.2f}x (before loading {load['before_gb']:.2f} GB); peaks: anonymous "
          f"{load['peak_anon_gb']:.2f} GB, file pages {load['peak_file_gb']:.2f} GB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd1")
    p.add_argument("--file", type=Path, help="default: FAMILY-random-fp16.safetensors in the temp folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="warm loads, each in its own process")
    p.add_argument("--no-half", action="store_true", help="float32, as the web UI's --no-half loads")
    p.add_argument("--no-cold", action="store_true", help="warm page cache only")
    p.add_argument("--thp", action="store_true", help="also a warm load with THP_MEM_ALLOC_ENABLE=1")
    p.add_argument("--no-hash", action="store_true", help="skip timing the first model hash")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-fresh-memory", nargs=2, metavar=("FAMILY", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.threads, args.no_half)
        return
    if args.child_fresh_memory:
        fresh_memory_child(*args.child_fresh_memory, args.threads)
        return

    family, title = FAMILIES[args.family]
    path = args.file or Path(tempfile.gettempdir()) / f"{'sd15' if family == 'SD1' else 'sdxl'}-random-fp16.safetensors"
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        write_random_checkpoint(path, family)
    size_gb = path.stat().st_size / 1e9

    loads, reads = {}, {}
    if not args.no_cold:
        # A read on each side of the load: the host may cache what the guest dropped, so the
        # faster read is the fair comparison.
        drop_from_page_cache(path)
        first = read_seconds(path)
        drop_from_page_cache(path)
        loads["cold"] = load_in_fresh_process(path, args.threads, args.no_half)
        drop_from_page_cache(path)
        reads["cold"] = min(first, read_seconds(path))
    reads["warm"] = read_seconds(path)  # also fills the page cache
    reads["warm"] = min(reads["warm"], read_seconds(path))
    for run in range(args.repeats):
        name = "warm" if args.repeats == 1 else f"warm #{run + 1}"
        loads[name] = load_in_fresh_process(path, args.threads, args.no_half)
    dtype = next(iter(loads.values()))["dtype"]
    fresh = _run_child(["--child-fresh-memory", family, dtype, "--threads", str(args.threads)])
    if args.thp:
        loads["warm, THP_MEM_ALLOC_ENABLE=1"] = load_in_fresh_process(
            path, args.threads, args.no_half, {"THP_MEM_ALLOC_ENABLE": "1"})
    hash_seconds = None
    if not args.no_hash:
        from modules.models import loader

        started = time.perf_counter()
        loader.sha256_of(path)
        hash_seconds = time.perf_counter() - started

    print(f"{title}: {path.name}, {size_gb:.2f} GB fp16, {args.threads} threads, "
          "each load the first in a fresh process")
    for kind, seconds in reads.items():
        print(f"  read the file once, {kind}: {seconds:.2f} s ({size_gb / seconds:.1f} GB/s)")
    print(f"  fresh memory for the {dtype} model alone ({fresh['gb']:.2f} GB of tensors allocated and written, "
          f"first touch in a fresh process): {fresh['seconds']:.2f} s")
    for name, load in loads.items():
        report(name, load, reads[name.split()[0].strip(",")])
    if hash_seconds is not None:
        print(f"  first model hash (sha256, cached afterwards): {hash_seconds:.2f} s")


if __name__ == "__main__":
    main()
