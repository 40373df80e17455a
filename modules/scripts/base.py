"""What a script is: A1111's scripts on typed arguments and hook points.

A script has a title (A1111's, which API clients send as `script_name`), the tabs it serves and
its arguments, each an Arg with a kind, a default and limits: the UI builds the script's
controls from them, /sdapi/v1/script-info lists them, and a request's `script_args` are checked
against them. A selectable script (the "Script" menu) runs the whole job in `run`, calling
`generate` for each picture it needs; an always-on script runs with every request that sends it
arguments (A1111's `alwayson_scripts`) and acts only through the hook points it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from modules.app.errors import RequestError

KINDS = ("text", "textbox", "number", "slider", "checkbox", "dropdown", "radio", "checkboxes")


@dataclass(frozen=True)
class Arg:
    """One argument: `kind` is one of KINDS (textbox: several lines; checkboxes: a subset of
    `choices`); numbers are whole when `step` is."""

    label: str
    kind: str
    value: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    info: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"argument {self.label!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")

    @property
    def whole(self) -> bool:
        return self.step is not None and float(self.step).is_integer()

    def check(self, value: Any, script: str) -> Any:
        """`value` as this argument takes it; RequestError naming the script and the argument if it cannot be."""
        where = f"{script}: {self.label}"
        if self.kind in ("text", "textbox"):
            if not isinstance(value, str):
                raise RequestError(f"{where} must be text, got {value!r}")
            return value
        if self.kind == "checkbox":
            if not isinstance(value, bool):
                raise RequestError(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind in ("number", "slider"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"{where} must be a number, got {value!r}")
            if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
                raise RequestError(f"{where} must be from {self.minimum} to {self.maximum}, got {value}")
            if self.whole:
                if not float(value).is_integer():
                    raise RequestError(f"{where} must be a whole number, got {value}")
                return int(value)
            return float(value)
        if self.kind == "checkboxes":
            if not isinstance(value, (list, tuple)) or any(v not in self.choices for v in value):
                raise RequestError(f"{where} must be a list of some of {', '.join(self.choices)}; got {value!r}")
            return tuple(value)
        if value not in self.choices:  # dropdown, radio: a label, or its index as A1111's API sends some
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.choices):
                return self.choices[value]
            raise RequestError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        return value


class Script:
    """Subclass it, set the class attributes, and override `run` (selectable) or `hooks` (always on)."""

    title: ClassVar[str]
    args: ClassVar[tuple[Arg, ...]] = ()
    tabs: ClassVar[tuple[str, ...]] = ("txt2img", "img2img")
    always_on: ClassVar[bool] = False

    def values(self, given: Sequence[Any] | dict[str, Any] | None) -> dict[str, Any]:
        """Argument label -> checked value, from A1111's positional `script_args` (missing ones
        take their defaults) or a mapping by label."""
        given = given if given is not None else ()
        if isinstance(given, dict):
            unknown = sorted(set(given) - {a.label for a in self.args})
            if unknown:
                raise RequestError(f"{self.title} has no argument {', '.join(map(repr, unknown))}; "
                                   f"its arguments: {', '.join(a.label for a in self.args)}")
            raw = [given.get(a.label, a.value) for a in self.args]
        else:
            if len(given) > len(self.args):
                raise RequestError(f"{self.title} takes {len(self.args)} arguments, got {len(given)}")
            raw = list(given) + [a.value for a in self.args[len(given):]]
        return {a.label: a.check(v, self.title) for a, v in zip(self.args, raw)}

    def run(self, ctx, request, values: dict[str, Any], job, generate: Callable, save: bool | None):
        """The job of a selectable script: returns a pipeline Result. `generate(ctx, request, job=,
        save=)` makes pictures as the Generate button does (on this process or a replica)."""
        raise NotImplementedError(f"{self.title} is always on; it has no run")

    def hooks(self, values: dict[str, Any]) -> dict[str, Callable]:
        """Hook point name -> function, for one job with these argument values (always-on scripts)."""
        return {}
