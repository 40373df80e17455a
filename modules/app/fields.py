"""Request fields that carry their own limits. A dataclass field made with `bounded(...)` knows its
range, one made with `indexed(...)` or `one_of(...)` its choices, so a request's validate() checks
every such field in one loop (`problems`), and the API's schema shows the same limits: a field's
name, default and limits are written once, where the field is declared.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LIMITS = "limits"  # the key of a field's metadata that holds its Bounds or Choices
ONLY_WITH = "only_with"  # the key naming a field (a switch or an optional value) without which this one is not checked


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float
    whole: bool = True  # a whole number (int), else any number
    multiple: int = 1  # and a multiple of this
    low_allowed: bool = True  # False: the value must lie above `low`

    def problem(self, name: str, value: Any) -> str | None:
        kind = (int,) if self.whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not self._inside(value):
            what = "a whole number" if self.whole else "a number"
            span = f"from {_number(self.low)} to" if self.low_allowed else f"above {_number(self.low)} and at most"
            return f"{name} must be {what} {span} {_number(self.high)}, got {value!r}"
        if self.multiple > 1 and value % self.multiple:
            return f"{name} must be a multiple of {self.multiple}, got {value}"
        return None

    def _inside(self, value: float) -> bool:
        return (self.low <= value if self.low_allowed else self.low < value) and value <= self.high

    def schema(self) -> dict[str, Any]:
        """JSON-schema keywords for these limits."""
        low = {"minimum": self.low} if self.low_allowed else {"exclusiveMinimum": self.low}
        return {**low, "maximum": self.high, **({"multipleOf": self.multiple} if self.multiple > 1 else {})}


@dataclass(frozen=True)
class Choices:
    labels: tuple[str, ...]
    by_index: bool  # the value is an index into `labels` (as A1111's API sends options), else a label

    def problem(self, name: str, value: Any) -> str | None:
        if self.by_index:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.labels):
                listed = ", ".join(f"{i} ({label})" for i, label in enumerate(self.labels))
                return f"{name} must be one of {listed}; got {value!r}"
        elif value not in self.labels:
            return f"{name} must be one of {', '.join(self.labels)}, got {value!r}"
        return None

    def schema(self) -> dict[str, Any]:
        return {"enum": list(range(len(self.labels)) if self.by_index else self.labels)}


def _field(default: Any, limits: Bounds | Choices, only_with: str | None) -> Any:
    metadata = {LIMITS: limits, **({ONLY_WITH: only_with} if only_with else {})}
    return dataclasses.field(default=default, metadata=metadata)


def bounded(default: float, low: float, high: float, *, whole: bool = True, multiple: int = 1,
            low_allowed: bool = True, only_with: str | None = None) -> Any:
    """A number field from `low` to `high`; with `only_with`, checked only when that field is true."""
    return _field(default, Bounds(low, high, whole, multiple, low_allowed), only_with)


def indexed(default: int, labels: Sequence[str]) -> Any:
    """A field holding the index of one of `labels`."""
    return _field(default, Choices(tuple(labels), by_index=True), None)


def one_of(default: str, labels: Sequence[str]) -> Any:
    """A field holding one of `labels`."""
    return _field(default, Choices(tuple(labels), by_index=False), None)


def limits(field: dataclasses.Field) -> Bounds | Choices | None:
    return field.metadata.get(LIMITS)


# NUL, which no file name, C library or PNG text chunk takes, and the halves of a surrogate
# pair, which come alone only from a JSON escape or a broken client and which UTF-8 cannot write.
UNWRITABLE = re.compile("[\x00\ud800-\udfff]")


def _texts(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts(item)


def text_problem(name: str, value: Any) -> str | None:
    """What is wrong with text that a request holds (alone, or anywhere in lists and mappings): a
    character that cannot be written to a file or a picture's text. None if all is well."""
    for text in _texts(value):
        found = UNWRITABLE.search(text)
        if found:
            char = found.group()
            what = "NUL (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
            return (f"{name} holds {what} at character {found.start() + 1}; "
                    "text may not hold NUL or lone surrogate characters")
    return None


def problems(value: Any) -> list[str]:
    """What is wrong with the limited fields of the dataclass instance `value`, and with any
    text it holds, one message each; a field `only_with` another is skipped while that one is
    false."""
    found = []
    for field in dataclasses.fields(value):
        problem = text_problem(field.name, getattr(value, field.name))
        if problem:
            found.append(problem)
            continue
        rule = limits(field)
        switch = field.metadata.get(ONLY_WITH)
        if rule is None or (switch and not getattr(value, switch)):
            continue
        problem = rule.problem(field.name, getattr(value, field.name))
        if problem:
            found.append(problem)
    return found
