"""Jobs per second on Ray Serve replicas against generating in this process, and what a job pays
for travelling to a replica.

    venv/bin/python bench/scale_out.py [--jobs 24] [--steps 8] [--size 128] [--repeats 2]

Everything runs on the built-in model in a fresh data folder, each generator on one CPU thread:
  in-process   the default backend: the job queue runs pipeline.generate here, one job at a time
  1 replica    --workers 1: the same jobs through the queue to one Ray Serve replica
  2 replicas   --workers 2: two replicas, so the queue runs two jobs at once
All jobs are queued at once (two users, alternating); throughput is jobs over the wall time until
the last is done. Each backend first runs a job per replica so that loading the checkpoint is not
counted. The added latency is the mean time of one job sent alone to one replica, minus the same
job here. The same seeds give the same pictures on every backend (checked on the first job).

Goals: 2 replicas >= 1.7x one replica's jobs per second, and at most 50 ms added per job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules.app.config import Flags  # noqa: E402
from modules.context import AppContext  # noqa: E402
from modules.generation import pipeline  # noqa: E402
from modules.generation.request import GenerationRequest  # noqa: E402
from modules.service.jobs import Job  # noqa: E402


def requests(count: int, steps: int, size: int) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=f"a red circle and a blue square {i}", steps=steps, width=size, height=size, seed=1000 + i)
            for i in range(count)]


def throughput(ctx: AppContext, jobs: list[GenerationRequest], warm: int) -> tuple[float, list]:
    """(jobs per second, results) with every job queued at once, after `warm` untimed jobs."""
    generate = pipeline.generator(ctx)
    warmups = [ctx.jobs.submit(Job(owner="warm"), generate, ctx, jobs[0], save=False) for _ in range(warm)]
    for future in warmups:
        future.result()
    start = time.perf_counter()
    futures = [ctx.jobs.submit(Job(owner=("ann", "bob")[i % 2]), generate, ctx, r, save=False) for i, r in enumerate(jobs)]
    results = [f.result() for f in futures]
    return len(jobs) / (time.perf_counter() - start), results


def latency(ctx: AppContext, request: GenerationRequest, repeats: int) -> float:
    """Mean seconds of one job alone, through the queue."""
    generate, times = pipeline.generator(ctx), []
    for _ in range(repeats):
        start = time.perf_counter()
        ctx.jobs.run(Job(owner="ann"), generate, ctx, request, save=False)
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the whole comparison; the best of each is kept")
    parser.add_argument("--latency-jobs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(tempfile.mkdtemp(prefix="scale-out-"))
    jobs = requests(args.jobs, args.steps, args.size)
    single = jobs[0]
    print(f"{os.cpu_count()} CPUs; {args.jobs} jobs of {args.steps} steps at {args.size}x{args.size} on the built-in model; "
          "one thread per generator")

    base = Flags(data_dir=data, device="cpu", precision="fp32", threads=1)
    here = AppContext.create(base)
    from modules.scaleout.ray_serve import RayServeBackend

    rates: dict[str, list[float]] = {"in-process": [], "1 replica": [], "2 replicas": []}
    latencies: dict[str, list[float]] = {"in-process": [], "1 replica": []}
    reference = None
    for _ in range(args.repeats):
        rate, results = throughput(here, jobs, warm=1)
        rates["in-process"].append(rate)
        reference = reference or results[0]
        latencies["in-process"].append(latency(here, single, args.latency_jobs))
        for workers, name in ((1, "1 replica"), (2, "2 replicas")):
            flags = Flags(data_dir=data, device="cpu", precision="fp32", threads=1, workers=workers)
            backend = RayServeBackend.start(flags)
            remote = AppContext.create(flags, backend)
            rate, results = throughput(remote, jobs, warm=workers)
            rates[name].append(rate)
            same = np.array_equal(np.asarray(results[0].images[0]), np.asarray(reference.images[0]))
            assert same, f"{name}: the first picture differs from the in-process one"
            if workers == 1:
                latencies[name].append(latency(remote, single, args.latency_jobs))

    best = {name: max(values) for name, values in rates.items()}
    print(f"\n{'backend':<12} {'jobs/s':>8}  (each round)")
    for name, values in rates.items():
        print(f"{name:<12} {best[name]:>8.2f}  ({', '.join(f'{v:.2f}' for v in values)})")
    local, remote = min(latencies["in-process"]), min(latencies["1 replica"])
    speedup = best["2 replicas"] / best["1 replica"]
    added_ms = (remote - local) * 1000
    print(f"\n2 replicas / 1 replica: {speedup:.2f}x (goal >= 1.7x: {'met' if speedup >= 1.7 else 'missed'})")
    print(f"1 replica / in-process: {best['1 replica'] / best['in-process']:.2f}x")
    print(f"one job alone: {local * 1000:.0f} ms here, {remote * 1000:.0f} ms on a replica: "
          f"{added_ms:+.0f} ms added (goal <= 50 ms: {'met' if added_ms <= 50 else 'missed'})")
    print("pictures: the first job's equals the in-process one on every backend")


if __name__ == "__main__":
    main()
