"""The scripts the app has (built-in and the extensions'), found by title, and what the job queue
runs for a request that names some."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.scripts import BUILTIN
from modules.scripts.base import Script
from modules.service.hooks import Hooks
from modules.service.jobs import Job

TABS = ("txt2img", "img2img")


class ScriptLibrary:
    def __init__(self, scripts: Sequence[Script] = ()) -> None:
        self._scripts: list[tuple[Script, str]] = []  # (script, who added it), in menu order
        for script in scripts:
            self.add(script)

    @classmethod
    def builtin(cls) -> "ScriptLibrary":
        return cls([kind() for kind in BUILTIN])

    def add(self, script: Script, by: str = "built-in") -> None:
        taken = {s.title.lower(): owner for s, owner in self._scripts}
        if script.title.lower() in taken:
            raise ValueError(f"a script titled {script.title!r} exists already ({taken[script.title.lower()]})")
        unknown = set(script.tabs) - set(TABS)
        if unknown:
            raise ValueError(f"script {script.title!r}: no tab {', '.join(sorted(unknown))}; tabs are {', '.join(TABS)}")
        self._scripts.append((script, by))

    def remove(self, script: Script) -> None:
        self._scripts = [(s, owner) for s, owner in self._scripts if s is not script]

    def added_by(self, script: Script) -> str:
        return next(owner for s, owner in self._scripts if s is script)

    def of(self, tab: str, always_on: bool | None = None) -> list[Script]:
        return [s for s, _ in self._scripts if tab in s.tabs and (always_on is None or s.always_on == always_on)]

    def find(self, title: str, tab: str, always_on: bool = False) -> Script:
        """The `tab` script titled `title` (any case, as A1111's API takes it)."""
        for script in self.of(tab, always_on):
            if script.title.lower() == str(title).strip().lower():
                return script
        kind = "always-on scripts" if always_on else "scripts"
        known = ", ".join(s.title for s in self.of(tab, always_on)) or "none"
        raise RequestError(f"{tab} has no script {title!r}; its {kind}: {known}")

    def job(self, ctx, tab: str, script_name: str | None = None, script_args: Sequence[Any] | dict | None = None,
            alwayson: dict[str, Any] | None = None) -> Callable:
        """The function the queue runs for a `tab` request (ctx, request, job=, save=): the named
        script's run, else plain generation; with the hooks of the always-on scripts given
        arguments (A1111's alwayson_scripts: title -> {"args": [...]}). Arguments are checked
        here, before the job waits in the queue."""
        generate = pipeline.generator(ctx)
        hooks = Hooks()
        for title, given in (alwayson or {}).items():
            script = self.find(title, tab, always_on=True)
            values = script.values(given.get("args") if isinstance(given, dict) else given)
            for point, fn in script.hooks(values).items():
                hooks.point(point).register(fn, script.title)
        chosen = self.find(script_name, tab) if script_name and script_name.lower() != "none" else None
        values = chosen.values(script_args) if chosen is not None else {}

        def run(ctx, request, job: Job | None = None, save: bool | None = None):
            job = job or Job()
            job.hooks = hooks
            if chosen is None:
                return generate(ctx, request, job=job, save=save)
            return chosen.run(ctx, request, values, job, generate, save)

        # Plain generation keeps its backend's kind: on a replica, side by side with others.
        run.elsewhere = chosen is None and getattr(generate, "elsewhere", False)
        return run
