"""Throughput and fairness of the job queue (modules/service/jobs.py) through the real HTTP API, on
the built-in model, both measured in one run.

    venv/bin/python bench/job_queue.py [--users 4] [--jobs 10] [--fair-jobs 30] [--delay 0] [--steps 20]
                                   [--size 64] [--threads 2] [--repeats 1]

The web UI runs as its own process (tests/server.py's launcher) on a fresh data folder, so that its
only checkpoint is the built-in model, with `--threads` torch threads and `--api-auth` naming one
user per client: each signed-in user is an owner of its own in the queue. A job is one
POST /sdapi/v1/txt2img: one picture, `--steps` Euler steps at `--size` px, sent back as a PNG.
The clients are threads of this process (httpx), which waits on the network and needs little CPU.

1. Throughput: `--users` users each send `--jobs` jobs at once (a thread per request, so that all
   of them wait in the queue together), against one user sending the same number of jobs one
   after another. Seconds from the first request to the last answer; the two runs alternate
   `--repeats` times. Also printed: when each user's last answer came and the order of all the
   answers by user number, which show the turns. Goal: the users' throughput at least 0.95x the
   single user's (taking turns costs nothing).
2. Fairness: user A sends `--fair-jobs` jobs at once; as soon as A's /progress counts all of them
   in the queue (and `--delay` seconds later, 0 by default), user B sends one. B's wait, from
   sending to its job's start, in units of one job's mean time (the single user's seconds per job
   in part 1). The start is seen by B polling its own /progress every 20 ms (the first answer that
   shows B's job running, so at most one poll late), and checked against B's answer time less one
   job's mean time. Goal: at most two jobs' time. (Each request waiting for its job holds one of
   the server's 40 request threads; past that, A's requests wait for a thread before they reach
   the queue, and the bench says how many had reached it when B sent.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import running_server  # noqa: E402

PASSWORD = "pw"
GOAL_THROUGHPUT = 0.95  # the users' throughput / one user's
GOAL_WAIT = 2.0  # B's wait, in jobs
POLL = 0.02  # seconds between B's /progress polls


class Api:
    """The server's /sdapi/v1 for the users `user0`, `user1`, ... (one httpx client each, with room
    for as many connections as requests it sends at once)."""

    def __init__(self, url: str, users: int, connections: int, steps: int, size: int) -> None:
        self.url, self.steps, self.size = url, steps, size
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.clients = {f"user{i}": httpx.Client(base_url=url, auth=(f"user{i}", PASSWORD), limits=limits, timeout=None)
                        for i in range(users)}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def txt2img(self, user: str, seed: int) -> tuple[float, float]:
        """One job; the times its request was sent and its answer came (perf_counter)."""
        body = {"prompt": "a large red star in the top left corner on a blue background", "steps": self.steps,
                "width": self.size, "height": self.size, "seed": seed, "sampler_name": "Euler", "cfg_scale": 7}
        sent = time.perf_counter()
        answer = self.clients[user].post("/sdapi/v1/txt2img", json=body)
        done = time.perf_counter()
        if answer.status_code != 200 or not answer.json().get("images"):
            raise SystemExit(f"{user}'s job (seed {seed}) failed with {answer.status_code}: {answer.text[:500]}")
        return sent, done

    def progress(self, user: str) -> dict:
        answer = self.clients[user].get("/sdapi/v1/progress", params={"skip_current_image": "true"})
        answer.raise_for_status()
        return answer.json()


def at_once(calls) -> tuple[float, list]:
    """Runs the calls each in its own thread, released together; the release time and their results
    (SystemExit from a call is raised here)."""
    results: list = [None] * len(calls)
    gate = threading.Barrier(len(calls) + 1)

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = calls[i]()
        except SystemExit as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    gate.wait()
    released = time.perf_counter()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, SystemExit):
            raise result
    return released, results


def one_user(api: Api, jobs: int) -> float:
    started = time.perf_counter()
    for i in range(jobs):
        api.txt2img("user0", seed=i)
    return time.perf_counter() - started


def many_users(api: Api, users: int, jobs: int) -> tuple[float, dict[str, float], str]:
    """Total seconds, when each user's last answer came (seconds from the start), and the order
    of the answers as user numbers (0123 0123 ... when the users take turns)."""
    calls = [lambda u=u, i=i: (u, api.txt2img(f"user{u}", seed=i)) for u in range(users) for i in range(jobs)]
    started, results = at_once(calls)
    last: dict[str, float] = {}
    for u, (_, done) in results:
        last[f"user{u}"] = max(last.get(f"user{u}", 0.0), done - started)
    order = "".join(str(u) if u < 10 else "+" for u, _ in sorted(results, key=lambda result: result[1][1]))
    return max(last.values()), last, " ".join(order[i:i + users] for i in range(0, len(order), users))


def fairness(api: Api, jobs: int, delay: float) -> dict:
    """User A (user0) sends `jobs` jobs at once; once they are all queued, user B (user1) sends
    one while polling its own /progress."""
    a_results: list = []
    a_thread = threading.Thread(target=lambda: a_results.append(
        at_once([lambda i=i: api.txt2img("user0", seed=1000 + i) for i in range(jobs)])), daemon=True)
    a_thread.start()
    # A's jobs in the queue (running or waiting); B sends once all are there, or once their
    # count has not grown for 2 s (the server holds requests back that it has no thread for).
    counted, grew = 0, time.monotonic()
    while counted < jobs and time.monotonic() - grew < 2:
        now = api.progress("user0")["state"]["job_count"]
        if now > counted:
            counted, grew = now, time.monotonic()
        time.sleep(0.005)
    time.sleep(delay)

    b_answer: list = []
    b_thread = threading.Thread(target=lambda: b_answer.append(at_once([lambda: api.txt2img("user1", seed=2000)])[1][0]),
                                daemon=True)
    b_thread.start()
    queued_ahead, running_seen = None, None
    while b_thread.is_alive():
        state = api.progress("user1")
        seen = time.perf_counter()
        text = state.get("textinfo") or ""
        if text.startswith("Queued") and queued_ahead is None:
            queued_ahead = text
        elif state["state"]["job"] and not text.startswith("Queued") and running_seen is None:
            running_seen = seen
        time.sleep(POLL)
    b_thread.join()
    if not b_answer:
        raise SystemExit("B's job failed (see above)")
    b_sent, b_done = b_answer[0]
    a_thread.join()
    a_started, a_done = a_results[0]
    a_last = max(done for _, done in a_done) - a_started
    return {"b_sent": b_sent, "b_done": b_done, "running_seen": running_seen, "queued_ahead": queued_ahead,
            "b_after_a": b_sent - a_started, "a_total": a_last, "a_queued": counted}


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4, help="users sending at once in part 1")
    p.add_argument("--jobs", type=int, default=10, help="jobs per user in part 1")
    p.add_argument("--fair-jobs", type=int, default=30, help="jobs user A queues in part 2")
    p.add_argument("--delay", type=float, default=0.0, help="seconds B waits after A's jobs are queued")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="picture side, px")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--repeats", type=int, default=1, help="part 1's runs, alternating one user and many")
    args = p.parse_args(argv)
    total = args.users * args.jobs
    accounts = max(args.users, 2)

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start; server "
          f"--threads {args.threads}; built-in model, {args.steps} Euler steps at {args.size} px, one picture a job",
          flush=True)
    with tempfile.TemporaryDirectory() as data_dir:
        logins = ",".join(f"user{i}:{PASSWORD}" for i in range(accounts))
        # running_server passes --threads 1; the later --threads here is the one the server keeps.
        with running_server(Path(data_dir), "--api-auth", logins, "--threads", str(args.threads)) as url:
            api = Api(url, accounts, max(args.jobs, args.fair_jobs) + 2, args.steps, args.size)
            try:
                one_user(api, 2)  # the model's first load and first run, not timed
                runs = []
                for repeat in range(args.repeats):
                    single = one_user(api, total)
                    many, last, order = many_users(api, args.users, args.jobs)
                    runs.append((single, many, last, order))
                    print(f"  part 1, run {repeat + 1}: one user {single:.2f} s, {args.users} users {many:.2f} s",
                          flush=True)
                unit = sum(run[0] for run in runs) / (len(runs) * total)
                fair = fairness(api, args.fair_jobs, args.delay)
            finally:
                api.close()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")

    print(f"\n1. Throughput: {total} jobs, one user one after another against {args.users} users "
          f"x {args.jobs} jobs at once")
    print(f"  {'run':<4} {'1 user':>10} {'s/job':>7} {f'{args.users} users':>10} {'s/job':>7} {'throughput ratio':>17}"
          f"   each user's last answer (s)")
    for n, (single, many, last, _) in enumerate(runs, 1):
        finishes = ", ".join(f"{last[f'user{u}']:.1f}" for u in range(args.users))
        print(f"  {n:<4} {single:>9.2f}s {single / total:>7.3f} {many:>9.2f}s {many / total:>7.3f} "
              f"{single / many:>16.3f}x   {finishes}")
    for n, run in enumerate(runs, 1):
        print(f"  run {n}, the users' answers in the order they came: {run[3]}")
    ratio = sum(run[0] for run in runs) / sum(run[1] for run in runs)
    print(f"  {args.users}-user throughput / 1-user throughput: {ratio:.3f}x "
          f"(goal >= {GOAL_THROUGHPUT}x: {verdict(ratio >= GOAL_THROUGHPUT)})")

    print(f"\n2. Fairness: A queues {args.fair_jobs} jobs at once, B sends 1 job "
          f"{fair['b_after_a'] * 1000:.0f} ms after A began sending; one job = {unit:.3f} s (part 1's one user)")
    answer = fair["b_done"] - fair["b_sent"]
    by_answer = answer - unit
    if fair["a_queued"] < args.fair_jobs:
        print(f"  only {fair['a_queued']} of A's {args.fair_jobs} jobs had reached the queue when B sent; "
              "the others were held back by the server before the queue")
    print(f"  what B's /progress said while it waited: {fair['queued_ahead'] or '(never seen queued)'}")
    if fair["running_seen"] is not None:
        by_poll = fair["running_seen"] - fair["b_sent"]
        print(f"  B's wait to its job's start (polled): {by_poll:.2f} s = {by_poll / unit:.2f} jobs")
    else:
        by_poll = None
        print("  B's job was never seen running by a poll (it ran between two polls)")
    print(f"  B's answer after {answer:.2f} s; less one job: {by_answer:.2f} s = {by_answer / unit:.2f} jobs")
    print(f"  A's {args.fair_jobs} jobs all answered after {fair['a_total']:.2f} s")
    wait = by_poll if by_poll is not None else by_answer
    print(f"  B's wait: {wait / unit:.2f} jobs (goal <= {GOAL_WAIT:g}: {verdict(wait / unit <= GOAL_WAIT)})")


if __name__ == "__main__":
    main()
