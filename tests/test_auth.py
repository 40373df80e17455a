"""Sign-in with A1111's flags: parsing them (and the file), HTTP Basic on /sdapi/v1, the web UI's
login callable, the slow-down of repeated failures, and the real server with both."""

from __future__ import annotations

import base64
import re

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import webui
from modules.api import routes
from modules.api.auth import basic_credentials
from modules.app.config import parse_flags
from modules.service import auth
from modules.service.auth import AuthError, Credentials, SignIn, SignIns, Throttle, TooManyAttempts, parse_credentials


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_pairs_are_parsed_as_a1111_takes_them():
    assert parse_credentials("ann:secret, bob:p:w:d ,", "--x") == [("ann", "secret"), ("bob", "p:w:d")]


@pytest.mark.parametrize("text, words", [
    ("ann", "'ann' is not user:password (no colon)"),
    (":secret", "empty user name"),
    ("  :secret", "empty user name"),
    ("ann:", "user 'ann' has an empty password"),
])
def test_malformed_pairs_are_named_without_the_password(text, words):
    with pytest.raises(AuthError, match=f"--gradio-auth: .*{re.escape(words)}") as error:
        parse_credentials(text, "--gradio-auth")
    assert "secret" not in str(error.value)


def test_flags_and_the_file_add_up(tmp_path):
    file = tmp_path / "users.txt"
    file.write_text("carl:one\n\n dora:two , eve:three\n")
    flags = parse_flags(["--gradio-auth", "ann:a,bob:b", "--gradio-auth", "ann:a", "--gradio-auth-path", str(file),
                         "--api-auth", "robot:beep"])
    sign_ins = SignIns.from_flags(flags)
    assert sign_ins.ui.credentials.users == ["ann", "bob", "carl", "dora", "eve"]
    assert sign_ins.api.credentials.users == ["robot"]
    assert sign_ins.ui.throttle is sign_ins.api.throttle
    assert SignIns.from_flags(parse_flags([])) == SignIns(None, None)


@pytest.mark.parametrize("lines, words", [
    ("ann:a\nbob\n", "users.txt, line 2: 'bob' is not user:password"),
    ("ann:a\nann:b\n", "user 'ann' is given twice"),
    ("\n\n", "no user:password given"),
])
def test_a_bad_file_is_named_with_its_line(tmp_path, lines, words):
    (tmp_path / "users.txt").write_text(lines)
    with pytest.raises(AuthError, match=words):
        SignIns.from_flags(parse_flags(["--gradio-auth-path", str(tmp_path / "users.txt")]))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(AuthError, match="missing.txt: cannot be read"):
        SignIns.from_flags(parse_flags(["--gradio-auth-path", str(tmp_path / "missing.txt")]))


def test_malformed_flags_stop_the_start_with_the_reason():
    with pytest.raises(SystemExit, match="launch.py: error: --api-auth: 'robot' is not user:password"):
        webui.main(["--api-auth", "robot"])


def test_credentials_check():
    credentials = Credentials([("ann", "sécret"), ("bob", "b")], "--x")
    assert credentials.check("ann", "sécret")
    assert not credentials.check("ann", "secret")
    assert not credentials.check("ann", "b")
    assert not credentials.check("nobody", "\0unknown user")
    assert not credentials.check("ann", "\ud800")  # any text compares, none raises


def test_failures_from_one_address_are_slowed_down():
    clock = Clock()
    sign_in = SignIn(Credentials([("ann", "a")], "--x"), Throttle(limit=3, window=60, clock=clock))
    for _ in range(3):
        assert not sign_in.attempt("ann", "wrong", "10.0.0.1")
        clock.now += 1
    with pytest.raises(TooManyAttempts) as error:
        sign_in.attempt("ann", "a", "10.0.0.1")  # even the right password waits
    assert error.value.retry_after == pytest.approx(57)
    assert sign_in.attempt("ann", "a", "10.0.0.2")  # another address is not held up
    clock.now += 57
    assert sign_in.attempt("ann", "a", "10.0.0.1")


def test_right_passwords_do_not_count():
    clock = Clock()
    sign_in = SignIn(Credentials([("ann", "a")], "--x"), Throttle(limit=2, window=60, clock=clock))
    for _ in range(10):
        assert sign_in.attempt("ann", "a", "10.0.0.1")
    assert not sign_in.attempt("ann", "x", "10.0.0.1")
    assert sign_in.attempt("ann", "a", "10.0.0.1")


def test_the_throttle_forgets_quiet_addresses():
    clock = Clock()
    throttle = Throttle(limit=2, window=10, clock=clock)
    throttle.MAX_CLIENTS = 3
    for n in range(5):
        throttle.failed(f"10.0.0.{n}")
    clock.now += 11
    throttle.failed("10.0.1.1")
    assert list(throttle._failures) == ["10.0.1.1"]


def test_the_gradio_login_callable():
    sign_in = SignIn(Credentials([("ann", "a")], "--x"), Throttle(limit=2, window=60, clock=Clock()))
    token = auth.CLIENT.set("10.0.0.1")
    try:
        assert sign_in.gradio_login("ann", "a")
        assert not sign_in.gradio_login("ann", "b")
        assert not sign_in.gradio_login("bob", "a")
        assert not sign_in.gradio_login("ann", "a")  # two failures: this address waits
    finally:
        auth.CLIENT.reset(token)
    assert sign_in.gradio_login("ann", "a")  # from another address


def test_basic_header():
    assert basic_credentials(basic("ann", "p:w")["Authorization"]) == ("ann", "p:w")
    assert basic_credentials("basic " + base64.b64encode(b"ann:").decode()) == ("ann", "")
    for header in ("Bearer abc", "Basic !!!", "Basic " + base64.b64encode(b"no colon").decode(),
                   "Basic " + base64.b64encode(b"\xff:x").decode(), "Basic"):
        assert basic_credentials(header) is None


@pytest.fixture
def client(ctx):
    app = FastAPI()

    @app.get("/elsewhere")
    def elsewhere():
        return {}

    clock = Clock()
    routes.install(app, ctx, SignIn(Credentials([("robot", "beep")], "--api-auth"), Throttle(limit=3, clock=clock)))
    client = TestClient(app)
    client.clock = clock
    return client


def test_every_api_route_asks_for_basic_credentials(client):
    for method, path in [("GET", "/sdapi/v1/samplers"), ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/png-info"),
                         ("GET", "/sdapi/v1/no-such-route")]:
        r = client.request(method, path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic", path
        r = client.request(method, path, headers=basic("robot", "wrong"))
        assert r.status_code in (401, 429), path
    assert client.get("/elsewhere").status_code == 200


def test_the_right_credentials_pass(client):
    r = client.get("/sdapi/v1/samplers", headers=basic("robot", "beep"))
    assert r.status_code == 200 and r.json()
    r = client.get("/sdapi/v1/samplers", headers=basic("robot", "beeps"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Basic"
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Basic %%%"}).status_code == 401


def test_repeated_failures_get_429_then_pass_again(client):
    for _ in range(3):
        assert client.get("/sdapi/v1/samplers", headers=basic("robot", "guess")).status_code == 401
    r = client.get("/sdapi/v1/samplers", headers=basic("robot", "beep"))
    assert r.status_code == 429 and r.headers["Retry-After"] == "60" and "try again in 60 s" in r.json()["detail"]
    client.clock.now += 60
    assert client.get("/sdapi/v1/samplers", headers=basic("robot", "beep")).status_code == 200


def test_listening_without_sign_in_is_warned_of():
    listen = parse_flags(["--listen"])
    assert len(SignIns.from_flags(listen).open_doors(listen)) == 2
    both = parse_flags(["--listen", "--gradio-auth", "a:b", "--api-auth", "c:d"])
    assert SignIns.from_flags(both).open_doors(both) == []
    ui_only = parse_flags(["--listen", "--gradio-auth", "a:b"])
    assert SignIns.from_flags(ui_only).open_doors(ui_only) == ["the /sdapi/v1 API (give --api-auth)"]
    local = parse_flags([])
    assert SignIns.from_flags(local).open_doors(local) == []


def test_the_real_server_with_both_sign_ins(tiny_data_dir, tmp_path):
    from tests.server import running_server  # starts a process: only when this test runs

    users = tmp_path / "users.txt"
    users.write_text("carl:from-file\n")
    with running_server(tiny_data_dir, "--gradio-auth", "ann:secret", "--gradio-auth-path", str(users),
                        "--api-auth", "robot:beep") as url:
        assert httpx.get(f"{url}/sdapi/v1/samplers").status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("robot", "beep")).status_code == 200
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("ann", "secret")).status_code == 401
        assert httpx.get(f"{url}/config").status_code == 401  # Gradio asks for its own sign-in
        for user, password, status in [("ann", "secret", 200), ("carl", "from-file", 200), ("ann", "wrong", 400)]:
            r = httpx.post(f"{url}/login", data={"username": user, "password": password})
            assert r.status_code == status, (user, r.text)
        with httpx.Client() as browser:
            assert browser.post(f"{url}/login", data={"username": "ann", "password": "secret"}).status_code == 200
            assert browser.get(f"{url}/config").status_code == 200
        for _ in range(4):  # five failures in all from 127.0.0.1: now even the right password waits
            httpx.post(f"{url}/login", data={"username": "ann", "password": "wrong"})
        assert httpx.post(f"{url}/login", data={"username": "ann", "password": "secret"}).status_code == 400
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("robot", "beep")).status_code == 429
