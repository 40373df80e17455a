"""Users' extensions: each a folder in extensions/ (beside models/) holding `extension.py`, whose
`setup(api)` adds to the app through an ExtensionAPI: scripts, hook functions, an accordion in a
tab or a tab of its own, and API routes. Nothing else of the app is handed to it.

Extensions are found at start. One that fails to import or to set up is reported with its error
and skipped, with whatever it had added taken back; the app starts anyway. Which ones are turned
off is kept in extensions.json in the data folder, so it outlasts a restart; a change takes
effect at the next start.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.app.fileio import atomic_write_json
from modules.scripts.base import Script
from modules.scripts.library import TABS, ScriptLibrary
from modules.service.hooks import Hooks

log = logging.getLogger(__name__)

ENTRY = "extension.py"
ROUTE_PREFIX = "/sdapi/v1/ext"  # under /sdapi/, so --api-auth guards extensions' routes too
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExtensionError(Exception):
    """What an extension asked for that the app cannot give; the message says what."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the full path, under ROUTE_PREFIX/<extension>
    endpoint: Callable[..., Any]


@dataclass
class Extension:
    name: str
    path: Path
    enabled: bool
    error: str | None = None  # why it is not running, when it failed
    scripts: list[Script] = field(default_factory=list)
    accordions: list[tuple[str, str, Callable[[], None]]] = field(default_factory=list)  # (tab, title, build)
    tabs: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (title, build)
    routes: list[Route] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.enabled and self.error is None

    def git(self) -> dict[str, str | None]:
        """The folder's git remote, branch and commit, as A1111 lists them (None where it has none)."""
        head = self.path / ".git" / "HEAD"
        info: dict[str, str | None] = {"remote": None, "branch": None, "commit_hash": None}
        try:
            ref = head.read_text().strip()
        except OSError:
            return info
        if ref.startswith("ref: "):
            info["branch"] = ref.removeprefix("ref: refs/heads/")
            commit = self.path / ".git" / ref.removeprefix("ref: ")
            info["commit_hash"] = commit.read_text().strip() if commit.is_file() else None
        else:
            info["commit_hash"] = ref
        config = self.path / ".git" / "config"
        if config.is_file():
            found = re.search(r'\[remote "origin"\][^\[]*?url\s*=\s*(\S+)', config.read_text(errors="replace"))
            info["remote"] = found.group(1) if found else None
        return info


class ExtensionAPI:
    """What an extension's setup(api) is given."""

    def __init__(self, extension: Extension, scripts: ScriptLibrary, hooks: Hooks) -> None:
        self._extension, self._scripts, self._hooks = extension, scripts, hooks
        self._undo: list[Callable[[], None]] = []

    @property
    def name(self) -> str:
        return self._extension.name

    @property
    def folder(self) -> Path:
        """The extension's own folder, for its files."""
        return self._extension.path

    def add_script(self, script: Script) -> None:
        """A script for the Script menu or, always on, for every request that sends it arguments."""
        if not isinstance(script, Script):
            raise ExtensionError(f"add_script takes a Script, not {type(script).__name__}")
        self._scripts.add(script, by=self.name)
        self._extension.scripts.append(script)
        self._undo.append(lambda: self._scripts.remove(script))

    def on(self, point: str, fn: Callable) -> None:
        """`fn` at one of the hook points (request, step, pictures, saved) of every job."""
        try:
            hook_point = self._hooks.point(point)
        except KeyError as e:
            raise ExtensionError(str(e)) from None
        self._undo.append(hook_point.register(fn, self.name))

    def add_accordion(self, tab: str, title: str, build: Callable[[], None]) -> None:
        """An accordion titled `title` in the txt2img or img2img tab; `build()` makes its Gradio
        components and wires their events."""
        if tab not in TABS:
            raise ExtensionError(f"no tab {tab!r} takes accordions; these do: {', '.join(TABS)}")
        self._extension.accordions.append((tab, title, build))

    def add_tab(self, title: str, build: Callable[[], None]) -> None:
        """A tab of its own, before Settings; `build()` makes its components."""
        self._extension.tabs.append((title, build))

    def add_route(self, method: str, path: str, endpoint: Callable[..., Any]) -> str:
        """An HTTP route (a FastAPI endpoint) at ROUTE_PREFIX/<extension><path>; returns the full path."""
        if method.upper() not in ("GET", "POST", "PUT", "DELETE"):
            raise ExtensionError(f"method {method!r}: use GET, POST, PUT or DELETE")
        if not path.startswith("/"):
            raise ExtensionError(f"route path {path!r} must start with /")
        full = f"{ROUTE_PREFIX}/{self.name}{path}"
        self._extension.routes.append(Route(method.upper(), full, endpoint))
        return full

    def _take_back(self) -> None:
        for undo in reversed(self._undo):
            undo()
        for added in (self._extension.scripts, self._extension.accordions, self._extension.tabs, self._extension.routes):
            added.clear()


class ExtensionSet:
    """The extensions found at start, running or not."""

    def __init__(self, folder: Path, state_file: Path) -> None:
        self.folder, self.state_file = folder, state_file
        self.all: list[Extension] = []

    def disabled_names(self) -> set[str]:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        names = state.get("disabled") if isinstance(state, dict) else None
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def set_enabled(self, enabled: dict[str, bool]) -> None:
        """Remembers which extensions run from the next start on."""
        disabled = (self.disabled_names() | {n for n, on in enabled.items() if not on}) - {n for n, on in enabled.items() if on}
        atomic_write_json(self.state_file, {"disabled": sorted(disabled)})

    def load(self, scripts: ScriptLibrary, hooks: Hooks) -> "ExtensionSet":
        disabled = self.disabled_names()
        folders = sorted(p for p in self.folder.iterdir() if p.is_dir() and (p / ENTRY).is_file()) if self.folder.is_dir() else []
        for path in folders:
            extension = Extension(path.name, path, enabled=path.name not in disabled)
            self.all.append(extension)
            if not NAME.match(path.name):
                extension.error = "its folder name must be letters, digits, '-', '_' or '.'"
            elif extension.enabled:
                self._start(extension, scripts, hooks)
        return self

    def _start(self, extension: Extension, scripts: ScriptLibrary, hooks: Hooks) -> None:
        api = ExtensionAPI(extension, scripts, hooks)
        module_name = f"sd_extensions.{extension.name}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, extension.path / ENTRY)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            setup = getattr(module, "setup", None)
            if not callable(setup):
                raise ExtensionError(f"{ENTRY} has no setup(api) function")
            setup(api)
        except Exception as e:  # whatever a user's code raises, the app starts without it
            sys.modules.pop(module_name, None)
            api._take_back()
            where = traceback.extract_tb(e.__traceback__)[-1]
            extension.error = f"{type(e).__name__}: {e} ({Path(where.filename).name}, line {where.lineno})"
            log.error("extension %s skipped: %s", extension.name, extension.error)
            return
        log.info("extension %s: %d scripts, %d accordions, %d tabs, %d routes", extension.name, len(extension.scripts),
                 len(extension.accordions), len(extension.tabs), len(extension.routes))

    def running(self) -> list[Extension]:
        return [e for e in self.all if e.running]

    def accordions(self, tab: str) -> list[tuple[str, str, Callable[[], None]]]:
        """(extension, title, build) of the accordions for `tab`."""
        return [(e.name, title, build) for e in self.running() for t, title, build in e.accordions if t == tab]
