"""Hook points: where scripts and extensions take part in a job without reaching into it.

Each point hands its functions a value (modules/generation/hooks.py defines them: the request
before sampling, each step's latents, the decoded pictures, each saved file with its infotext).
A function may return a new value of the same kind to stand for it, or None to leave it; it never
gets the objects the job works on, so nothing it does to its value changes the job but what it
returns. A function that fails is reported in the log with the name it was registered under,
and the job goes on without its change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class HookPoint(Generic[T]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._functions: list[tuple[str, Callable[[T], T | None]]] = []
        self._lock = threading.Lock()

    def register(self, fn: Callable[[T], T | None], by: str) -> Callable[[], None]:
        """Adds `fn`, registered `by` (a script's or an extension's name); returns what removes it."""
        entry = (by, fn)
        with self._lock:
            self._functions.append(entry)

        def remove() -> None:
            with self._lock:
                if entry in self._functions:
                    self._functions.remove(entry)

        return remove

    def __bool__(self) -> bool:
        return bool(self._functions)

    def __call__(self, value: T, kind: type | None = None) -> T:
        """`value` after every function, in the order they were registered. A returned value
        that is not of `kind` is refused like a failure."""
        with self._lock:
            functions = list(self._functions)
        for by, fn in functions:
            try:
                result = fn(value)
            except Exception:  # an extension's bug must not cost the user the job
                log.exception("%s hook of %s failed; the job goes on without it", self.name, by)
                continue
            if result is None:
                continue
            if kind is not None and not isinstance(result, kind):
                log.error("%s hook of %s returned %s, not %s; ignored", self.name, by, type(result).__name__, kind.__name__)
                continue
            value = result
        return value


class Hooks:
    """The hook points of generation jobs (values in modules/generation/hooks.py):

    request   the request about to run (GenerationRequest): may return a changed copy
    step      each sampling step (StepLatents): a copy of the latents, for watching
    pictures  the decoded pictures of a batch (Pictures): may return other pictures, as many
    saved     each PNG written (SavedPicture): its path and infotext
    """

    POINTS = ("request", "step", "pictures", "saved")

    def __init__(self) -> None:
        self.request: HookPoint[Any] = HookPoint("request")
        self.step: HookPoint[Any] = HookPoint("step")
        self.pictures: HookPoint[Any] = HookPoint("pictures")
        self.saved: HookPoint[Any] = HookPoint("saved")

    def point(self, name: str) -> HookPoint[Any]:
        if name not in self.POINTS:
            raise KeyError(f"no hook point {name!r}; there are {', '.join(self.POINTS)}")
        return getattr(self, name)

    def joined(self, other: "Hooks | None") -> "Hooks":
        """These hooks, then `other`'s (a job's own), at every point."""
        if other is None:
            return self
        both = Hooks()
        for name in self.POINTS:
            for source in (self, other):
                for by, fn in source.point(name)._functions:
                    both.point(name).register(fn, by)
        return both
