"""A1111's learning-rate schedule syntax, as a pure function of text.

    "0.005"                      0.005 for every step
    "0.005:100, 1e-3:1000, 1e-5" 0.005 up to step 100, then 1e-3 up to step 1000, then 1e-5
    "1e-3:500, 1e-4:-1"          -1 (or no step) means "until the end"

Steps are inclusive upper bounds, counted from 1. Pieces after one that runs to the end are
never reached, and A1111 ignores them; here they are an error, since they are surely a typo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNTIL_END = -1


class ScheduleError(ValueError):
    """A schedule a person has to fix; says which piece and where it starts (1-based)."""


@dataclass(frozen=True)
class LearningRateSchedule:
    pieces: tuple[tuple[float, int], ...]  # (rate, last step or UNTIL_END), steps increasing

    def rate(self, step: int) -> float | None:
        """The rate for a 1-based step, or None once the schedule has ended."""
        for rate, last in self.pieces:
            if last == UNTIL_END or step <= last:
                return rate
        return None

    @property
    def end_step(self) -> int | None:
        """The last step the schedule covers; None when it runs to the end."""
        last = self.pieces[-1][1]
        return None if last == UNTIL_END else last


def parse_schedule(text: str) -> LearningRateSchedule:
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("the learning rate is empty: give a number such as 0.005, or a schedule such as 0.005:100, 1e-3:1000")
    pieces: list[tuple[float, int]] = []
    position = 0
    for piece in text.split(","):
        start = position + len(piece) - len(piece.lstrip()) + 1
        position += len(piece) + 1
        where = f"{piece.strip()!r} (at character {start})"
        if pieces and pieces[-1][1] == UNTIL_END:
            raise ScheduleError(f"{where} is never reached: the piece before it runs to the end")
        rate_text, _, step_text = piece.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ScheduleError(f"{where}: {rate_text.strip()!r} is not a learning rate") from None
        if not math.isfinite(rate) or rate <= 0:
            raise ScheduleError(f"{where}: the learning rate must be a positive number")
        step = UNTIL_END
        if step_text.strip():
            try:
                step = int(step_text)
            except ValueError:
                raise ScheduleError(f"{where}: {step_text.strip()!r} is not a whole step number") from None
            if step == 0 or step < UNTIL_END:
                raise ScheduleError(f"{where}: the step must be 1 or more (or -1 for 'until the end')")
        if pieces and step != UNTIL_END and step <= pieces[-1][1]:
            raise ScheduleError(f"{where}: step {step} does not come after step {pieces[-1][1]}")
        pieces.append((rate, step))
    return LearningRateSchedule(tuple(pieces))
