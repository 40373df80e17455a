"""Generation on Ray Serve replicas (two CPU replicas on a local Ray instance): the same pictures
as in this process, every job completed even when its replica dies, Interrupt reaching a job on
a replica, jobs routed to the replica that holds their checkpoint, and Ray never imported
without --workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.app.config import Flags
from modules.context import AppContext
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.service.jobs import Job, JobFailed

ray_serve = pytest.importorskip("modules.scaleout.ray_serve", reason="needs ray[serve] (requirements.txt)")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tiny_data_dir):
    """(front-end context generating on 2 replicas, a context generating here) on one data folder."""
    flags = Flags(data_dir=tiny_data_dir, device="cpu", precision="fp32", workers=2, threads=1)
    backend = ray_serve.RayServeBackend.start(flags)
    yield AppContext.create(flags, backend), AppContext.create(Flags(data_dir=tiny_data_dir, device="cpu", precision="fp32"))
    from ray import serve

    serve.shutdown()
    ray_serve.ray.shutdown()


def here(ctx, request):
    """The in-process picture, on one thread as each replica runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipeline.generate(ctx, request, save=False)
    finally:
        torch.set_num_threads(threads)


def pixels(image):
    return np.asarray(image)


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def long_request(seed):
    return GenerationRequest(prompt="a blue square", steps=150, width=96, height=96, seed=seed, checkpoint="builtin-shapes")


def test_jobs_of_two_users_all_complete_with_the_pictures_made_here(cluster):
    remote, local = cluster
    requests = [GenerationRequest(prompt=f"a red circle {i}", steps=3, width=64, height=64, seed=100 + i,
                                  checkpoint="builtin-shapes", batch_size=1 + i % 2)
                for i in range(20)]
    futures = [remote.jobs.submit(Job(owner=("ann", "bob")[i % 2]), remote.generator, remote, r, save=True)
               for i, r in enumerate(requests)]
    results = [f.result(300) for f in futures]
    for request, result in zip(requests, results):
        expected = here(local, request)
        assert result.infotexts == expected.infotexts
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(result.images, expected.images))
        # The front end wrote each picture, whole.
        assert [p.exists() and p.parent.is_relative_to(remote.paths.outputs) for p in result.paths] == [True] * len(result.images)
    assert len(set(remote.generator.loads)) == 2  # both replicas worked


def test_a_job_whose_replica_dies_completes_on_the_other(cluster):
    remote, local = cluster
    backend, request, job = remote.generator, long_request(7).replace(steps=60), Job(owner="ann")
    future = remote.jobs.submit(job, backend, remote, request, save=False)
    wait_for(lambda: job.step > 5 and job.id in backend.placed)
    first = backend.placed[job.id]
    os.kill(int(first.rsplit(":", 1)[1]), signal.SIGKILL)
    result = future.result(300)
    assert backend.placed.get(job.id) is None and not result.interrupted
    assert np.array_equal(pixels(result.images[0]), pixels(here(local, request).images[0]))


def test_interrupt_reaches_only_its_owners_job_on_a_replica(cluster):
    remote, _ = cluster
    backend = remote.generator
    mine, theirs = Job(owner="ann"), Job(owner="bob")
    mine_future = remote.jobs.submit(mine, backend, remote, long_request(8), save=False)
    theirs_future = remote.jobs.submit(theirs, backend, remote, long_request(9).replace(steps=40), save=False)
    wait_for(lambda: mine.step > 2 and theirs.step > 2)
    remote.jobs.interrupt("ann")
    assert mine_future.result(120).interrupted  # the replica's job saw the flag
    finished = theirs_future.result(120)
    assert not finished.interrupted and theirs.step == 40


def test_jobs_go_to_the_replica_that_holds_their_checkpoint(cluster):
    remote, _ = cluster
    backend = remote.generator
    before = dict(backend.loads)
    for i in range(8):
        checkpoint = ("builtin-shapes", "tiny")[i % 2]
        request = GenerationRequest(prompt="a red circle", steps=2, width=64, height=64, seed=i, checkpoint=checkpoint)
        remote.jobs.run(Job(owner="ann"), backend, remote, request, save=False)
    loads = {replica: count - before.get(replica, 0) for replica, count in backend.loads.items()}
    assert all(count <= 2 for count in loads.values()), loads  # not one load per job


class Dying:
    """Stands in for the deployment handle: every replica dies under its job."""

    def options(self, **_):
        return self

    @property
    def run(self):
        return self

    def remote(self, *_):
        raise ray_serve.ActorDiedError()


class Control:
    def __getattr__(self, _):
        return self

    def remote(self, *_):
        return None


def test_a_job_that_loses_its_replica_twice_is_reported_failed_and_nothing_is_written(ctx):
    backend = ray_serve.RayServeBackend(Dying(), Control(), replicas=1)
    job = Job(owner="ann")
    with pytest.raises(JobFailed, match=f"job {job.id} failed: its replica died on each of 2 tries"):
        backend(ctx, GenerationRequest(prompt="a red circle", steps=2, width=64, height=64), job=job, save=True)
    assert not any(p.is_file() for p in ctx.paths.outputs.rglob("*"))


def test_without_workers_ray_is_never_imported(tmp_path):
    script = ("import sys; import webui; from modules.app.config import parse_flags; "
              f"webui.create_app(parse_flags(['--data-dir', {str(tmp_path)!r}])); "
              "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_workers_flag_is_checked():
    from modules.app.config import parse_flags

    assert parse_flags(["--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        parse_flags(["--workers", "0"])
