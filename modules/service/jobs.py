"""One generation at a time, with progress that the UI and the API can read while it runs.

A Job is written by the pipeline's sampler callback and read by pollers in other threads; plain
attribute writes are atomic in CPython, so a reader may see a slightly stale step, never a torn one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class SamplingStopped(Exception):
    """Raised from the sampler callback when the user interrupts or skips; carries the latest denoised latent."""

    def __init__(self, latent):
        super().__init__("sampling stopped by the user")
        self.latent = latent


@dataclass
class Job:
    description: str = ""
    total_steps: int = 0  # over the whole job: batches x steps
    step: int = 0
    started: float = field(default_factory=time.monotonic)
    preview: Any = None  # PIL image of the current batch, updated every N steps
    preview_id: int = 0
    interrupted: bool = False
    skipped: bool = False
    finished: bool = False
    status: str = ""

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the steps done so far."""
        if not self.step or not self.total_steps:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.step * (self.total_steps - self.step)


class JobQueue:
    """Runs generations one at a time on a worker thread: models are large, and two jobs at once
    would only fight for the same device. Callers wait on the returned Future or poll the Job."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")
        self.current: Job | None = None

    def submit(self, job: Job, fn, *args, **kwargs) -> Future:
        def run():
            self.current = job
            job.started = time.monotonic()
            try:
                return fn(*args, job=job, **kwargs)
            finally:
                job.finished = True

        return self._executor.submit(run)

    def run(self, job: Job, fn, *args, **kwargs):
        return self.submit(job, fn, *args, **kwargs).result()

    def interrupt(self) -> None:
        if self.current is not None and not self.current.finished:
            self.current.interrupt()

    def skip(self) -> None:
        if self.current is not None and not self.current.finished:
            self.current.skip()
