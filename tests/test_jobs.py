"""The job queue: one job at a time, owners taking turns, a bound on what waits, and interrupt,
skip and cancel reaching only their owner's jobs."""

import threading

import pytest

from modules.service.jobs import Job, JobCancelled, JobQueue, QueueFull


class Gate:
    """A first job that holds the worker until released, so that others queue behind it."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, job):
        self.started.set()
        assert self.release.wait(10)
        return "gate"


def record(order):
    def run(name, job):
        order.append(name)
        return name

    return run


def test_owners_take_turns():
    queue, gate, order = JobQueue(), Gate(), []
    first = queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)
    futures = [queue.submit(Job(owner="a"), record(order), f"a{i}") for i in range(10)]
    futures.append(queue.submit(Job(owner="b"), record(order), "b0"))
    gate.release.set()
    assert [f.result(10) for f in futures] == [f"a{i}" for i in range(10)] + ["b0"]
    assert first.result(10) == "gate"
    # b, who has had no turn, goes next: its single job waits only for a's running one.
    assert order == ["b0"] + [f"a{i}" for i in range(10)]


def test_turns_go_to_whoever_started_a_job_longest_ago():
    queue, gate, order = JobQueue(), Gate(), []
    queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)
    futures = [queue.submit(Job(owner=owner), record(order), f"{owner}{i}") for owner in "ab" for i in range(3)]
    futures.append(queue.submit(Job(owner="c"), record(order), "c0"))
    jobs = [Job(owner="c"), Job(owner="b")]
    gate.release.set()
    for f in futures:
        f.result(10)
    # b and c had no turn yet, a's began last: b (came first), c, then round and round.
    assert order == ["b0", "c0", "a0", "b1", "a1", "b2", "a2"]
    assert all(queue.ahead_of(j) is None for j in jobs)


def test_places_in_the_queue_follow_the_turns():
    queue, gate = JobQueue(), Gate()
    queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)
    a = [Job(owner="a") for _ in range(3)]
    b = Job(owner="b")
    for job in a:
        queue.submit(job, record([]), "x")
    queue.submit(b, record([]), "y")
    assert [queue.ahead_of(j) for j in (*a, b)] == [2, 3, 4, 1]
    assert queue.jobs_of("b") == [b] and queue.jobs_of("a")[1:] == a
    gate.release.set()


def test_the_queue_is_bounded():
    queue, gate = JobQueue(max_waiting=2), Gate()
    queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)  # running, so not waiting
    queue.submit(Job(owner="a"), record([]), 1)
    queue.submit(Job(owner="b"), record([]), 2)
    with pytest.raises(QueueFull, match="2 jobs waiting, at most 2"):
        queue.submit(Job(owner="c"), record([]), 3)
    gate.release.set()


def test_a_waiting_job_can_be_cancelled_and_a_gone_callers_job_is_dropped():
    queue, gate, order = JobQueue(), Gate(), []
    queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)
    cancelled, gone = Job(owner="a"), Job(owner="b", wanted=lambda: False)
    futures = [queue.submit(cancelled, record(order), "cancelled"), queue.submit(gone, record(order), "gone"),
               queue.submit(Job(owner="c"), record(order), "kept")]
    assert queue.cancel(cancelled) and not queue.cancel(Job())
    gate.release.set()
    assert futures[2].result(10) == "kept"
    for future in futures[:2]:
        with pytest.raises(JobCancelled):
            future.result(10)
    assert order == ["kept"] and cancelled.finished and gone.finished


def test_interrupt_and_skip_reach_only_their_owners_running_job():
    queue, gate = JobQueue(), Gate()
    job = Job(owner="a")
    future = queue.submit(job, gate)
    assert gate.started.wait(10)
    assert not queue.interrupt("b") and not queue.skip("b")
    assert not job.interrupted and not job.skipped
    assert queue.skip("a") and queue.interrupt("a")
    assert job.interrupted and job.skipped
    gate.release.set()
    future.result(10)
    assert not queue.interrupt("a")  # nothing runs any more


def test_an_error_reaches_the_caller_and_the_queue_goes_on():
    queue = JobQueue()

    def fails(job):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        queue.run(Job(), fails)
    assert queue.run(Job(), record([]), "next") == "next"


def test_interrupting_an_owner_with_only_waiting_jobs_takes_them_out():
    queue, gate = JobQueue(), Gate()
    queue.submit(Job(owner="a"), gate)
    assert gate.started.wait(10)
    waiting = queue.submit(Job(owner="b"), record([]), "b")
    other = queue.submit(Job(owner="c"), record([]), "c")
    assert queue.interrupt("b")
    with pytest.raises(JobCancelled):
        waiting.result(10)
    gate.release.set()
    assert other.result(10) == "c"


class Elsewhere:
    """A job function that runs on another process (a scale-out backend's): it counts how many
    of its calls overlap."""

    elsewhere = True

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def __call__(self, job):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        threading.Event().wait(0.2)
        with self.lock:
            self.now -= 1
        return job.owner


def test_jobs_run_elsewhere_side_by_side_and_those_here_one_at_a_time():
    queue, remote = JobQueue(workers=3), Elsewhere()
    futures = [queue.submit(Job(owner=f"u{i}"), remote) for i in range(6)]
    assert [f.result(10) for f in futures] == [f"u{i}" for i in range(6)]
    assert remote.most == 3  # as many as there are workers
    here = Elsewhere()
    here.elsewhere = False
    futures = [queue.submit(Job(owner=f"u{i}"), here) for i in range(3)]
    assert [f.result(10) for f in futures] == ["u0", "u1", "u2"] and here.most == 1
    # Interrupt reaches every running job of its owner, and only those.
    gate, other = Gate(), Gate()
    gate.elsewhere = other.elsewhere = True
    mine, theirs = Job(owner="a"), Job(owner="b")
    queue.submit(mine, gate), queue.submit(theirs, other)
    assert gate.started.wait(10) and other.started.wait(10)
    assert queue.ahead_of(Job()) is None and {j.owner for j in queue.jobs_of("a")} == {"a"}
    queue.interrupt("a")
    assert mine.interrupted and not theirs.interrupted
    gate.release.set(), other.release.set()
