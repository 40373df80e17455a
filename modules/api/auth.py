"""HTTP Basic sign-in on every /sdapi/v1 route (--api-auth), checked by the service's SignIn."""

from __future__ import annotations

import base64
import binascii
import math

from starlette.responses import JSONResponse

from modules.service.auth import SignIn, TooManyAttempts

PREFIX = "/sdapi/"


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from an Authorization header's Basic value; None if it holds none."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = text.partition(":")
    return (user, password) if colon else None


def signed_in(request) -> str | None:
    """The user an API request (a Starlette Request) signed in as; None without --api-auth."""
    return getattr(request.state, "api_user", None)


def caller(request) -> str:
    """Whose jobs an API request makes: the signed-in user, else the client's address."""
    return signed_in(request) or f"api {request.client.host if request.client else 'unknown'}"


class BasicAuth:
    """ASGI middleware: a request under PREFIX passes only with a user and password `sign_in`
    accepts; else 401 asking for Basic credentials, or 429 while its address must wait."""

    def __init__(self, app, sign_in: SignIn):
        self.app = app
        self.sign_in = sign_in

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), "")
        refusal = self.refusal(header, (scope.get("client") or ("unknown",))[0])
        if refusal is None:
            # The routes make the signed-in user the owner of the jobs it asks for.
            scope.setdefault("state", {})["api_user"] = basic_credentials(header)[0]
            return await self.app(scope, receive, send)
        await refusal(scope, receive, send)

    def refusal(self, header: str, client: str) -> JSONResponse | None:
        ask = {"WWW-Authenticate": "Basic"}
        if not header:
            return JSONResponse({"detail": "this API needs a user name and password (HTTP Basic)"}, 401, ask)
        user, password = basic_credentials(header) or ("", "")
        try:
            if self.sign_in.attempt(user, password, client):
                return None
        except TooManyAttempts as e:
            return JSONResponse({"detail": str(e)}, 429, {"Retry-After": str(math.ceil(e.retry_after))})
        return JSONResponse({"detail": "wrong user name or password"}, 401, ask)
