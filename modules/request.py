"""What the user asked for, as one frozen value that the UI and the API both build.

`validate()` is the single place where bad input is caught; everything below trusts a request
that passed it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from modules.extra_networks import parse_extra_networks
from modules.prompt_parser import PromptError, validate_prompt
from modules.sampling.registry import find_sampler
from modules.sampling.schedules import find_schedule

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
NOISE_SOURCES = ("CPU", "GPU")


class RequestError(ValueError):
    """A request a person has to fix; the message says which field and why."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_count: int = 1
    batch_size: int = 1
    clip_skip: int = 1
    noise_source: str = "CPU"
    checkpoint: str | None = None  # None: whatever the model manager has selected
    styles: tuple[str, ...] = ()  # names in styles.csv, applied to the prompts in this order

    mode = "txt2img"

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "GenerationRequest":
        """Returns the request with sampler/schedule names canonicalised; raises RequestError."""
        problems = []
        for field, value, low, high in (
            ("steps", self.steps, 1, MAX_STEPS),
            ("width", self.width, 64, MAX_SIDE),
            ("height", self.height, 64, MAX_SIDE),
            ("batch_count", self.batch_count, 1, MAX_BATCH_COUNT),
            ("batch_size", self.batch_size, 1, MAX_BATCH_SIZE),
            ("clip_skip", self.clip_skip, 1, 12),
            ("seed", self.seed, -1, MAX_SEED),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{field} must be a whole number, got {value!r}")
            elif not low <= value <= high:
                problems.append(f"{field} must be between {low} and {high}, got {value}")
        for field in ("width", "height"):
            value = getattr(self, field)
            if isinstance(value, int) and value % 8:
                problems.append(f"{field} must be a multiple of 8, got {value}")
        if not isinstance(self.cfg_scale, (int, float)) or not 1.0 <= self.cfg_scale <= 30.0:
            problems.append(f"cfg_scale must be a number between 1 and 30, got {self.cfg_scale!r}")
        for field in ("prompt", "negative_prompt"):
            text = getattr(self, field)
            if not isinstance(text, str):
                problems.append(f"{field} must be text")
                continue
            try:
                validate_prompt(text)
                if field == "prompt":  # as in A1111, a negative prompt's <...> is text
                    parse_extra_networks(text)
            except PromptError as e:
                problems.append(f"{field}: {e}")
        if not isinstance(self.styles, (list, tuple)) or not all(isinstance(s, str) for s in self.styles):
            problems.append(f"styles must be a list of style names, got {self.styles!r}")
        if self.noise_source not in NOISE_SOURCES:
            problems.append(f"noise_source must be one of {', '.join(NOISE_SOURCES)}, got {self.noise_source!r}")
        sampler = scheduler = None
        try:
            sampler = find_sampler(self.sampler_name)
        except ValueError as e:
            problems.append(str(e))
        try:
            scheduler = find_schedule(self.scheduler)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise RequestError("; ".join(problems))
        return self.replace(sampler_name=sampler.name, scheduler=scheduler.label, cfg_scale=float(self.cfg_scale),
                            styles=tuple(self.styles))

    def with_seed_resolved(self, rng: random.Random | None = None) -> "GenerationRequest":
        if self.seed != -1:
            return self
        return self.replace(seed=(rng or random.SystemRandom()).randrange(0, MAX_SEED - MAX_BATCH_COUNT * MAX_BATCH_SIZE))

    def seeds(self) -> list[int]:
        """Image i of the whole job uses seed + i, whatever the batch layout."""
        return [self.seed + i for i in range(self.batch_count * self.batch_size)]
