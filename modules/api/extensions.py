"""GET /sdapi/v1/extensions (A1111's fields) and the routes the running extensions add."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from modules.extensions.loader import ExtensionSet

log = logging.getLogger(__name__)


class ExtensionItem(BaseModel):
    name: str
    remote: str | None
    branch: str | None
    commit_hash: str | None
    version: str | None
    commit_date: int | None
    enabled: bool


def create_router(extensions: ExtensionSet) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    @router.get("/extensions", response_model=list[ExtensionItem])
    def listed():
        items = []
        for e in extensions.all:
            git = e.git()
            commit = git["commit_hash"]
            items.append(ExtensionItem(name=e.name, remote=git["remote"], branch=git["branch"], commit_hash=commit,
                                       version=commit[:8] if commit else None, commit_date=None, enabled=e.running))
        return items

    return router


def mount(app: FastAPI, extensions: ExtensionSet) -> None:
    """The running extensions' own routes; one FastAPI refuses is logged and left out."""
    for extension in extensions.running():
        for route in extension.routes:
            try:
                app.add_api_route(route.path, route.endpoint, methods=[route.method])
            except Exception as e:  # a user's endpoint FastAPI cannot take must not stop the start
                log.error("extension %s: route %s %s left out: %s", extension.name, route.method, route.path, e)
