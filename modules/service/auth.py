"""Sign-in with A1111's flags: --gradio-auth and --gradio-auth-path for the web UI, --api-auth
(HTTP Basic) for /sdapi/v1.

The web UI's login form (Gradio calls `SignIn.gradio_login`) and the API's Basic header both go
through `SignIn.attempt`: passwords are compared in constant time, and a client address that
has failed `Throttle.limit` times within `Throttle.window` seconds is refused without a look
until the oldest of those failures is that old, whatever it sends."""

from __future__ import annotations

import contextvars
import hmac
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# The address of the client whose request is being served; ClientAddress sets it, so that
# Gradio's login callable, which is given only the user and password, can be slowed per address.
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="unknown")


class AuthError(ValueError):
    """A sign-in flag or file that cannot be used; the message says which and why."""


class TooManyAttempts(Exception):
    """This client failed too often lately; it may try again in `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"too many failed sign-ins from this address; try again in {math.ceil(retry_after)} s")
        self.retry_after = retry_after


def parse_credentials(text: str, where: str) -> list[tuple[str, str]]:
    """The user:password pairs in `text`, separated by commas as A1111 takes them; a password is
    all that follows the first colon. `where` names the flag or file line in messages, which
    never repeat a password."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        user, colon, password = item.partition(":")
        user = user.strip()
        if not colon:
            raise AuthError(f"{where}: {item!r} is not user:password (no colon)")
        if not user:
            raise AuthError(f"{where}: a user:password pair has an empty user name")
        if not password:
            raise AuthError(f"{where}: user {user!r} has an empty password")
        pairs.append((user, password))
    return pairs


def read_credentials_file(path: Path) -> list[tuple[str, str]]:
    """The pairs in a --gradio-auth-path file: user:password a line (several on one line,
    separated by commas, as A1111 also reads them); blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"--gradio-auth-path {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        pairs += parse_credentials(line, f"--gradio-auth-path {path}, line {number}")
    return pairs


class Credentials:
    """Users and their passwords."""

    def __init__(self, pairs: Iterable[tuple[str, str]], where: str):
        self._passwords: dict[str, bytes] = {}
        for user, password in pairs:
            encoded = _bytes(password)
            if self._passwords.get(user, encoded) != encoded:
                raise AuthError(f"{where}: user {user!r} is given twice, with different passwords")
            self._passwords[user] = encoded
        if not self._passwords:
            raise AuthError(f"{where}: no user:password given")

    @property
    def users(self) -> list[str]:
        return list(self._passwords)

    def check(self, user: str, password: str) -> bool:
        """Whether the password is the user's. The comparison takes as long whatever the password,
        and an unknown user is compared too, so timing tells nothing of either."""
        expected = self._passwords.get(user)
        same = hmac.compare_digest(_bytes(password), expected if expected is not None else b"\0unknown user")
        return same and expected is not None


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # any text a client sends compares, none raises


class Throttle:
    """Failed sign-ins by client address: at most `limit` in any `window` seconds."""

    LIMIT = 5
    WINDOW = 60.0
    MAX_CLIENTS = 10_000  # beyond this many addresses, those with no recent failure are forgotten

    def __init__(self, limit: int = LIMIT, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Seconds before `client` may try again; 0 if it may now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            return times[0] + self.window - now if len(times) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            self._recent(client, now).append(now)
            if len(self._failures) > self.MAX_CLIENTS:
                for other in [c for c, t in self._failures.items() if not t or t[-1] <= now - self.window]:
                    del self._failures[other]

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque(maxlen=self.limit))
        while times and times[0] <= now - self.window:
            times.popleft()
        return times


@dataclass
class SignIn:
    credentials: Credentials
    throttle: Throttle = field(default_factory=Throttle)

    def attempt(self, user: str, password: str, client: str) -> bool:
        """Whether `user` and `password` sign in; a wrong pair counts against `client`.
        TooManyAttempts, without looking at them, if `client` has failed too often."""
        wait = self.throttle.wait(client)
        if wait > 0:
            raise TooManyAttempts(wait)
        if self.credentials.check(user, password):
            return True
        self.throttle.failed(client)
        return False

    def gradio_login(self, user: str, password: str) -> bool:
        """The callable Gradio's login form asks (auth=...); a client that failed too often is
        refused, as a wrong password is, until its wait is over."""
        try:
            return self.attempt(user, password, CLIENT.get())
        except TooManyAttempts:
            return False


@dataclass(frozen=True)
class SignIns:
    """Who may use the web UI and who the API; None: open to anyone who reaches the port."""

    ui: SignIn | None = None
    api: SignIn | None = None

    @classmethod
    def from_flags(cls, flags) -> "SignIns":
        """From --gradio-auth, --gradio-auth-path and --api-auth; AuthError if one cannot be
        used. One throttle serves both, so that a client cannot try twice as often."""
        throttle = Throttle()
        ui_pairs = [pair for text in flags.gradio_auth for pair in parse_credentials(text, "--gradio-auth")]
        ui_pairs += [pair for path in flags.gradio_auth_path for pair in read_credentials_file(path)]
        api_pairs = [pair for text in flags.api_auth for pair in parse_credentials(text, "--api-auth")]
        given_ui = bool(flags.gradio_auth or flags.gradio_auth_path)
        return cls(
            ui=SignIn(Credentials(ui_pairs, "--gradio-auth"), throttle) if given_ui else None,
            api=SignIn(Credentials(api_pairs, "--api-auth"), throttle) if flags.api_auth else None,
        )

    def open_doors(self, flags) -> list[str]:
        """What anyone who reaches the server can use without signing in, when it listens beyond
        this computer (--listen)."""
        if flags.host in ("127.0.0.1", "localhost", "::1"):
            return []
        doors = [] if self.ui else ["the web UI (give --gradio-auth or --gradio-auth-path)"]
        if flags.api and not self.api:
            doors.append("the /sdapi/v1 API (give --api-auth)")
        return doors


class ClientAddress:
    """ASGI middleware that records each request's client address in CLIENT."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = CLIENT.set((scope.get("client") or ("unknown",))[0])
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)
