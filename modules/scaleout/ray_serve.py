"""Generation on Ray Serve replicas, each with its own models (one GPU each where there are GPUs).

The front end (UI, API, sign-in, the fair queue, files on disk) stays one process. For each
generation job the queue calls RayServeBackend, which sends the request, resolved as it will run,
to the deployment; Serve's model multiplexing routes it to a replica that already holds its
checkpoint (the multiplexed model id is the checkpoint's hash). The replica runs the very same
pipeline.generate, streaming progress and live previews back, and returns the pictures and
infotexts; the front end writes the files, so there is one outputs/ and nothing half-written.

Interrupt and Skip travel the other way through a small named actor (JobControl) that the
replica reads while the job runs. A replica that dies mid-job costs its job one more try on
another replica (Serve restarts the dead one); a job that fails so twice is reported failed.

Importing this module imports Ray; webui imports it only with --workers or --ray-address.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from modules.app.config import ROOT, Flags, Settings
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.service.jobs import Job, JobFailed

log = logging.getLogger(__name__)

NAMESPACE = "sd-webui"
APP = "generation"
CONTROL = "job-control"
POLL_SECONDS = 0.2  # how often a replica reports progress and reads Interrupt and Skip
TRIES = 2
REPLICA_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)


@ray.remote(num_cpus=0)
class JobControl:
    """What the front end tells running jobs: whether each is interrupted and how many of its
    batches to skip so far (a count, so that a replica acts on each Skip once)."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[bool, int]] = {}

    def set(self, job_id: str, interrupted: bool, skips: int) -> None:
        self._jobs[job_id] = (interrupted, skips)

    def get(self, job_id: str) -> tuple[bool, int]:
        return self._jobs.get(job_id, (False, 0))

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)


@dataclass
class Progress:
    step: int
    total_steps: int
    status: str
    preview: Any  # a new live preview (PIL image), or None
    replica: str  # host:pid, which a test may stop


@dataclass
class Finished:
    result: pipeline.Result
    replica: str
    loads: int  # checkpoints this replica has read since it started


class GenerationReplica:
    """One replica: an AppContext of its own on the same data folder (models, LoRA, embeddings),
    running one job at a time."""

    def __init__(self, flags: Flags) -> None:
        if flags.threads:
            torch.set_num_threads(flags.threads)
        self.ctx = AppContext.create(flags)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.control = ray.get_actor(CONTROL, namespace=NAMESPACE)
        self._wanted: dict[str, tuple[str, str]] = {}  # checkpoint hash -> (title, VAE choice) to load

    @serve.multiplexed(max_num_models_per_replica=1)
    async def checkpoint(self, model_id: str):
        title, vae = self._wanted[model_id]
        return await asyncio.to_thread(self.ctx.models.get, title, vae)

    async def run(self, request: GenerationRequest, settings: Settings, job_id: str):
        """Streams Progress while the job runs, then its Finished."""
        self.ctx.settings = settings  # the front end's: VAE, previews, noise
        self._wanted[serve.get_multiplexed_model_id()] = (request.checkpoint, settings.sd_vae)
        job = Job(id=job_id)
        job.status = "Loading the checkpoint"
        yield Progress(0, 0, job.status, None, self.name)
        # Through the multiplexed loader, so that Serve sends later jobs for this checkpoint here.
        await self.checkpoint(serve.get_multiplexed_model_id())
        work = asyncio.ensure_future(asyncio.to_thread(pipeline.generate, self.ctx, request, job, False))
        skips, shown = 0, job.preview_id
        while not work.done():
            await asyncio.wait({work}, timeout=POLL_SECONDS)
            interrupted, wanted_skips = await self.control.get.remote(job_id)
            if interrupted:
                job.interrupt()
            if wanted_skips > skips:
                skips = wanted_skips
                job.skip()
            preview = job.preview if job.preview_id != shown else None
            shown = job.preview_id
            yield Progress(job.step, job.total_steps, job.status, preview, self.name)
        yield Finished(work.result(), self.name, self.ctx.models.loads)


def _connect(flags: Flags) -> None:
    # Replicas import this project's code from where it lies here (on a cluster: the same
    # folder on every host).
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    if flags.ray_address:
        ray.init(address=flags.ray_address, namespace=NAMESPACE, runtime_env=runtime_env, log_to_driver=False)
    else:
        # Never fewer CPUs than the replicas reserve: Ray would wait for them for ever.
        ray.init(num_cpus=max(os.cpu_count() or 1, (flags.workers or 1) * (flags.threads or 1)), namespace=NAMESPACE,
                 runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
        atexit.register(ray.shutdown)


class RayServeBackend:
    """Stands in for pipeline.generate: runs each job on a replica, as JobQueue's `elsewhere`
    jobs, `replicas` of them at once."""

    elsewhere = True

    def __init__(self, handle, control, replicas: int) -> None:
        self.handle = handle
        self.control = control
        self.replicas = replicas
        self.loads: dict[str, int] = {}  # replica -> checkpoints it has read, as last reported
        self.placed: dict[str, str] = {}  # job id -> the replica running it

    @classmethod
    def start(cls, flags: Flags) -> "RayServeBackend":
        """Joins the cluster at --ray-address, or starts a local Ray instance, and deploys the
        replicas: --workers of them, or one per GPU of the cluster (one, if it has none)."""
        if not ray.is_initialized():  # a second app in this process (tests) shares the instance
            _connect(flags)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = flags.workers or max(gpus, 1)
        if gpus >= replicas:
            resources, device = {"num_gpus": 1}, "cuda"
        else:
            resources, device = {"num_cpus": flags.threads or 1}, "cpu"
        # Replicas run what this process runs, on the device Serve gives them, never scaling out themselves.
        replica_flags = replace(flags, device=device, workers=None, ray_address=None, threads=flags.threads or 1)
        control = JobControl.options(name=CONTROL, namespace=NAMESPACE, get_if_exists=True).remote()
        serve.start(proxy_location="Disabled")  # the front end serves HTTP
        deployment = serve.deployment(GenerationReplica, name="GenerationReplica", num_replicas=replicas,
                                      max_ongoing_requests=1, ray_actor_options=resources)
        handle = serve.run(deployment.bind(replica_flags), name=APP, route_prefix=None)
        log.info("Generating on %d Ray Serve replica%s (%s)", replicas, "s" if replicas > 1 else "",
                 "one GPU each" if device == "cuda" else f"{replica_flags.threads} CPU thread(s) each")
        return cls(handle, control, replicas)

    def __call__(self, ctx: AppContext, request: GenerationRequest, job: Job | None = None,
                 save: bool | None = None) -> pipeline.Result:
        job = job or Job()
        # Styles, seed and the request hooks here, so that every try draws the same. The other hooks
        # run here too, but for the step hooks, which stay with this process.
        hooks = ctx.hooks.joined(job.hooks)
        request = pipeline.resolved(ctx, request, hooks)
        info = ctx.models.find_checkpoint(request.checkpoint) if request.checkpoint else ctx.models.default_checkpoint()
        if info is None:
            raise LookupError("No checkpoint found: put a .safetensors or .ckpt file in models/Stable-diffusion")
        request = request.replace(checkpoint=info.title)
        model_id = ctx.models.hash_of(info)
        started_at = job.step
        try:
            for attempt in range(1, TRIES + 1):
                try:
                    result = self._run(request, ctx.settings, job, model_id)
                    break
                except RayTaskError as e:  # the job's own error (a missing LoRA...), as generate here raises it
                    raise (e.cause if isinstance(e.cause, Exception) else e) from None
                except REPLICA_DIED as e:
                    reason = str(e).splitlines()[0]
                    log.warning("job %s: its replica died (%s); try %d of %d", job.id, reason, attempt, TRIES)
                    if attempt == TRIES:
                        raise JobFailed(f"job {job.id} failed: its replica died on each of {TRIES} tries ({reason})") from e
                    job.step = started_at
        finally:
            self.control.forget.remote(job.id)
            self.placed.pop(job.id, None)
        size = result.request.batch_size
        for start in range(0, len(result.images), size):
            result.images[start:start + size] = pipeline.hooked_pictures(
                hooks, result.request, start // size, result.images[start:start + size], result.seeds[start:start + size])
        if ctx.settings.save_images if save is None else save:
            result.paths = [pipeline.save_picture(ctx, result.request, image, seed, infotext, hooks)
                            for image, seed, infotext in zip(result.images, result.seeds, result.infotexts)]
        return result

    def _run(self, request: GenerationRequest, settings: Settings, job: Job, model_id: str) -> pipeline.Result:
        stream = self.handle.options(multiplexed_model_id=model_id, stream=True).run.remote(request, settings, job.id)
        skips, told, done_before = 0, (False, 0), job.step
        for event in stream:
            if isinstance(event, Finished):
                if self.loads.get(event.replica) != event.loads:
                    log.info("replica %s has loaded %d checkpoint%s", event.replica, event.loads, "s" if event.loads != 1 else "")
                self.loads[event.replica] = event.loads
                return event.result
            self.placed[job.id] = event.replica
            # As in-process, progress adds up over the generations of one job (a script's).
            job.step, job.status = done_before + event.step, event.status
            job.total_steps = max(job.total_steps, done_before + event.total_steps)
            if event.preview is not None:
                job.preview, job.preview_id = event.preview, job.preview_id + 1
            if job.skipped:  # the owner's Skip, passed on once
                skips, job.skipped = skips + 1, False
            wanted = (job.interrupted, skips)
            if wanted != told:
                self.control.set.remote(job.id, *wanted)
                told = wanted
        raise JobFailed(f"job {job.id}: its replica ended the job without a result")
