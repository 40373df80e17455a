"""Jobs over the API belong to their caller: interrupt and progress reach only the caller's own,
the queue takes owners in turns and refuses past --queue-size with 429."""

import base64
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modules.api import routes
from modules.generation import pipeline
from modules.service.auth import Credentials, SignIn, Throttle
from modules.service.jobs import JobQueue

BODY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}


class HeldGeneration:
    """Stands in for pipeline.generate: each job records its prompt, then holds until released or
    interrupted, so that others queue behind it."""

    def __init__(self, generate):
        self.generate = generate
        self.started, self.release, self.order = threading.Event(), threading.Event(), []

    def __call__(self, ctx, request, job=None, save=None):
        self.order.append(request.prompt)
        self.started.set()
        while not self.release.is_set() and not job.interrupted:
            time.sleep(0.01)
        return self.generate(ctx, request.replace(steps=1), job=job, save=False)


@pytest.fixture
def client(ctx, monkeypatch):
    ctx.jobs = JobQueue(max_waiting=3)
    held = HeldGeneration(pipeline.generate)
    monkeypatch.setattr(pipeline, "generate", held)
    app = FastAPI()
    routes.install(app, ctx, SignIn(Credentials([("ann", "pw"), ("bob", "pw")], "--api-auth"), Throttle()))
    return TestClient(app), held


def in_background(call) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_interrupt_and_progress_are_the_callers_own(client):
    http, held = client
    answers = {}
    thread = in_background(lambda: answers.update(ann=http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("ann"))))
    assert held.started.wait(10)
    progress = http.get("/sdapi/v1/progress", headers=basic("bob")).json()
    assert progress["state"]["job_count"] == 0 and progress["current_image"] is None  # bob sees nothing of ann's
    assert http.get("/sdapi/v1/progress", headers=basic("ann")).json()["state"]["job"] == "txt2img (api)"
    http.post("/sdapi/v1/interrupt", headers=basic("bob"))
    time.sleep(0.2)
    assert thread.is_alive()  # bob's interrupt did not touch ann's job
    http.post("/sdapi/v1/interrupt", headers=basic("ann"))
    thread.join(20)
    assert answers["ann"].status_code == 200


def test_owners_take_turns_and_a_full_queue_refuses_with_429(client):
    http, held = client
    answers = []

    def send(user, prompt):
        answers.append(http.post("/sdapi/v1/txt2img", json={**BODY, "prompt": prompt}, headers=basic(user)))

    threads = [in_background(lambda: send("ann", "ann 0"))]
    assert held.started.wait(10)
    for i in (1, 2):
        threads.append(in_background(lambda i=i: send("ann", f"ann {i}")))
        time.sleep(0.2)  # in this order
    threads.append(in_background(lambda: send("bob", "bob 0")))
    time.sleep(0.2)
    waiting = http.get("/sdapi/v1/progress", headers=basic("bob")).json()
    assert waiting["textinfo"] == "Queued: 1 job ahead"  # ann's running job: bob has had no turn yet
    refused = http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("bob"))
    assert refused.status_code == 429 and "queue is full" in refused.json()["detail"]
    held.release.set()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 4
    assert held.order == ["ann 0", "bob 0", "ann 1", "ann 2"]


def test_a_client_that_goes_away_takes_its_waiting_job_out_of_the_queue(client):
    import asyncio
    import json

    http, held = client
    answers = {}
    thread = in_background(lambda: answers.update(ann=http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("ann"))))
    assert held.started.wait(10)
    body = json.dumps({**BODY, "prompt": "bob, gone"}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/sdapi/v1/txt2img", "raw_path": b"/sdapi/v1/txt2img", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"authorization", basic("bob")["Authorization"].encode())],
             "client": ("127.0.0.2", 1), "server": ("testserver", 80)}
    sent = []

    async def bob_goes_away():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}  # the client hangs up once it has sent

        async def send(message):
            sent.append(message)

        await http.app(scope, receive, send)

    asyncio.run(bob_goes_away())
    held.release.set()
    thread.join(30)
    assert answers["ann"].status_code == 200
    assert sent[0]["status"] == 409 and b"cancelled" in sent[1]["body"]
    assert held.order == ["a red circle"]  # bob's job never ran
