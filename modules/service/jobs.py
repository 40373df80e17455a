"""Jobs, each with an id and an owner, run one at a time by a queue that is fair between owners,
with progress that the UI and the API can read while a job runs.

A Job is written by the pipeline's sampler callback and read by pollers in other threads; plain
attribute writes are atomic in CPython, so a reader may see a slightly stale step, never a torn one.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class SamplingStopped(Exception):
    """Raised from the sampler callback when the user interrupts or skips; carries the latest denoised latent."""

    def __init__(self, latent):
        super().__init__("sampling stopped by the user")
        self.latent = latent


@dataclass(eq=False)
class Job:
    description: str = ""
    owner: str = "local"  # the signed-in user, or the browser session or API client
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Asked before the job starts: False when whoever waits for it has gone (a closed browser tab).
    wanted: Callable[[], bool] = lambda: True
    cancelled: bool = False
    total_steps: int = 0  # over the whole job: batches x steps
    step: int = 0
    started: float = field(default_factory=time.monotonic)
    preview: Any = None  # PIL image of the current batch, updated every N steps
    preview_id: int = 0
    interrupted: bool = False
    skipped: bool = False
    finished: bool = False
    status: str = ""
    hooks: Any = None  # the job's own hook functions (service.hooks.Hooks), run after the app's

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


class QueueFull(Exception):
    """The queue holds as many waiting jobs as it may (--queue-size); the message says so."""


class JobFailed(RuntimeError):
    """A job that could not run for a reason outside its request (the worker it ran on died);
    the message names the job and the reason."""


class JobCancelled(Exception):
    """The job was cancelled (by its owner, or because its caller went away) before it started."""


class JobQueue:
    """Runs jobs on worker threads, fairly between owners: they take turns, one job each, so one
    owner's forty queued jobs do not keep another's single job waiting behind all of them. The
    next turn is the waiting owner's whose last job started longest ago, or who has had none: a
    newcomer's job runs as soon as the running one ends. Within an owner, jobs run in the order
    they came. `max_waiting` bounds how many may wait.
    Callers wait on the returned Future or poll the Job; a Future of a job cancelled before it
    started raises JobCancelled.

    Jobs that use this process's models run one at a time (models are large, and two jobs at once
    would only fight for the same device). A job whose function has a true `elsewhere` attribute
    (a scale-out backend's, which runs it on another process's model) holds no such turn: up to
    `workers` of those run side by side."""

    def __init__(self, max_waiting: int | None = None, workers: int = 1) -> None:
        self.max_waiting = max_waiting
        self.running: list[Job] = []
        self._waiting: dict[str, deque[tuple[Job, Future, Callable[[], Any], bool]]] = {}  # owner -> jobs, in order of arrival
        self._started: dict[str, int] = {}  # owner -> the number of the turn in which its last job started
        self._turns = 0
        self._lock = threading.Condition()
        self._here = threading.Lock()  # held by a job that runs on this process's models
        self._workers = [threading.Thread(target=self._work, name=f"job-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, job: Job, fn, *args, **kwargs) -> Future:
        """Queues fn(*args, job=job, **kwargs); raises QueueFull when max_waiting jobs wait."""
        future: Future = Future()
        with self._lock:
            waiting = sum(len(jobs) for jobs in self._waiting.values())
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting, at most {self.max_waiting}); try again later")
            elsewhere = bool(getattr(fn, "elsewhere", False))
            self._waiting.setdefault(job.owner, deque()).append((job, future, lambda: fn(*args, job=job, **kwargs), elsewhere))
            self._lock.notify()
        return future

    def run(self, job: Job, fn, *args, **kwargs):
        return self.submit(job, fn, *args, **kwargs).result()

    @staticmethod
    def _turn(waiting, started: dict[str, int]) -> str:
        """Whose turn it is among the owners of `waiting`: the one whose last job started longest ago
        (never: first of all); among equals, the one that came first."""
        return min(waiting, key=lambda owner: started.get(owner, -1))

    def _next(self) -> tuple[Job, Future, Callable[[], Any], bool]:
        """The first job of the owner whose turn it is."""
        with self._lock:
            while not self._waiting:
                self._lock.wait()
            owner = self._turn(self._waiting, self._started)
            jobs = self._waiting[owner]
            entry = jobs.popleft()
            if not jobs:
                del self._waiting[owner]
            self._turns += 1
            self._started[owner] = self._turns
            self.running.append(entry[0])
            return entry

    def _work(self) -> None:
        while True:
            job, future, call, elsewhere = self._next()
            try:
                if job.cancelled or not job.wanted():
                    future.set_exception(JobCancelled(f"job {job.id} was cancelled before it started"))
                    continue
                if not future.set_running_or_notify_cancel():
                    continue
                with contextlib.nullcontext() if elsewhere else self._here:
                    job.started = time.monotonic()
                    try:
                        future.set_result(call())
                    except BaseException as e:  # the caller gets it from the Future
                        future.set_exception(e)
            finally:
                job.finished = True
                with self._lock:
                    self.running.remove(job)

    def _running(self, owner: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self.running if not j.finished and (owner is None or j.owner == owner)]

    def ahead_of(self, job: Job) -> int | None:
        """How many jobs will run before `job` (the running ones included); None when it is not
        waiting. The turns to come are played out as _next will take them."""
        with self._lock:
            queues = {owner: deque(entry[0] for entry in jobs) for owner, jobs in self._waiting.items()}
            started, turns = dict(self._started), self._turns
        if not any(job in q for q in queues.values()):
            return None
        ahead = len(self._running())
        while True:
            owner = self._turn(queues, started)
            if queues[owner].popleft() is job:
                return ahead
            ahead += 1
            if not queues[owner]:
                del queues[owner]
            turns += 1
            started[owner] = turns

    def jobs_of(self, owner: str) -> list[Job]:
        """The owner's running jobs and waiting jobs, in the order they will run."""
        with self._lock:
            waiting = [entry[0] for entry in self._waiting.get(owner, ())]
        return self._running(owner) + waiting

    def cancel(self, job: Job) -> bool:
        """Takes a waiting job out of the queue (its Future raises JobCancelled); False when it
        has already started."""
        with self._lock:
            for owner, jobs in self._waiting.items():
                for entry in jobs:
                    if entry[0] is job:
                        jobs.remove(entry)
                        if not jobs:
                            del self._waiting[owner]
                        job.cancelled = job.finished = True
                        entry[1].set_exception(JobCancelled(f"job {job.id} was cancelled before it started"))
                        return True
        return False

    def interrupt(self, owner: str | None = None) -> bool:
        """Interrupts the running jobs that are `owner`'s (anyone's when owner is None). An owner
        whose jobs all still wait has them taken out of the queue instead."""
        running = self._running(owner)
        for job in running:
            job.interrupt()
        if running:
            return True
        return owner is not None and any([self.cancel(waiting) for waiting in self.jobs_of(owner)])

    def skip(self, owner: str | None = None) -> bool:
        """Skips the current batch of the running jobs that are `owner`'s (anyone's when owner is None)."""
        running = self._running(owner)
        for job in running:
            job.skip()
        return bool(running)
