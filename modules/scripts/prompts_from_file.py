"""A1111's "Prompts from file or textbox": one generation per line of the text, each line a prompt
or a line of A1111's options (`--prompt "a cat" --steps 10 --seed 5 ...`) that change the
request for that line alone.

Every line is read when the script's arguments are checked, and every line's request is checked
before the first picture is drawn, so a bad line is refused, naming its number, before anything
runs. A1111's file upload fills the same textbox in its UI; the text is the argument here.
"""

from __future__ import annotations

import math
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import MAX_SEED, GenerationRequest
from modules.sampling.registry import SAMPLERS, find_sampler
from modules.scripts.base import Arg, Script

TITLE = "Prompts from file or textbox"
ITERATE, SAME_SEED, POSITION, LINES = ("Iterate seed every line", "Use same random seed for all lines",
                                      "Insert prompts at the", "List of prompt inputs")
PROMPT_TAGS = ("prompt", "negative_prompt")


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _switch(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError("must be true or false")
    return text.lower() == "true"


def _sampler(text: str) -> str:
    return find_sampler(text).name  # A1111 looks names and aliases up in any case too


def _sampler_index(text: str) -> str:
    index = _whole(text)
    if not 0 <= index < len(SAMPLERS):
        raise ValueError(f"must be from 0 to {len(SAMPLERS) - 1}, the samplers' places in A1111's list")
    return SAMPLERS[index].name


def _styles(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class Tag:
    """One of A1111's options: the request field it sets (None: the line's own saving switch, or
    nothing) and how its text becomes the value."""

    field: str | None
    read: Callable[[str], object]


# A1111's options with their types, under the request fields they set.
TAGS: dict[str, Tag] = {
    "sd_model": Tag("checkpoint", str),
    "prompt": Tag("prompt", str),
    "negative_prompt": Tag("negative_prompt", str),
    "styles": Tag("styles", _styles),
    "seed": Tag("seed", _whole),
    "subseed": Tag("subseed", _whole),
    "subseed_strength": Tag("subseed_strength", _number),
    "seed_resize_from_h": Tag("seed_resize_from_h", _whole),
    "seed_resize_from_w": Tag("seed_resize_from_w", _whole),
    "sampler_index": Tag("sampler_name", _sampler_index),
    "sampler_name": Tag("sampler_name", _sampler),
    "batch_size": Tag("batch_size", _whole),
    "n_iter": Tag("batch_count", _whole),
    "steps": Tag("steps", _whole),
    "cfg_scale": Tag("cfg_scale", _number),
    "width": Tag("width", _whole),
    "height": Tag("height", _whole),
    "do_not_save_samples": Tag(None, _switch),
    # No grid is made and the prompt shown is the prompt, so these change nothing here.
    "do_not_save_grid": Tag(None, _switch),
    "prompt_for_display": Tag(None, str),
}
# A1111's options that this web UI has nothing for, and why.
NOT_HERE = {
    "outpath_samples": "pictures are saved in the outputs folder",
    "outpath_grids": "pictures are saved in the outputs folder",
    "restore_faces": "face restoration is in the Extras tab",
    "tiling": "tiling is not supported",
}


@dataclass(frozen=True)
class Line:
    """One line of the text: its number (from 1, blank lines counted), the request fields it
    sets, and whether its pictures are saved (False: --do_not_save_samples true)."""

    number: int
    fields: dict
    save: bool = True


def checked(field: str, value):
    """`value`, if a request with it in `field` passes the request's own checks (those of one
    field: a default request holds the rest); RequestError otherwise."""
    GenerationRequest().replace(**{field: value}).validate()
    return value


def parse_options(text: str) -> tuple[dict, bool]:
    """(request fields, save) of an options line; ValueError naming the option that is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot be split into options ({e})") from None
    fields, save, pos = {}, True, 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise ValueError(f"{word!r} is not an option; options start with --")
        name = word[2:]
        if pos + 1 == len(words):
            raise ValueError(f"{word} has no value")
        if name in PROMPT_TAGS:  # the words up to the next option, as A1111 reads them unquoted
            end = pos + 2
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            fields[name] = " ".join(words[pos + 1:end])
            pos = end
            continue
        if name in NOT_HERE:
            raise ValueError(f"{word} is not supported here: {NOT_HERE[name]}")
        tag = TAGS.get(name)
        if tag is None:
            raise ValueError(f"unknown option {word}; the options are --{', --'.join([*TAGS, *NOT_HERE])}")
        try:
            value = tag.read(words[pos + 1])
        except ValueError as e:
            raise ValueError(f"{word} {words[pos + 1]!r}: {e}") from None
        if tag.field is not None:
            try:
                fields[tag.field] = checked(tag.field, value)
            except ValueError as e:
                raise ValueError(f"{word} {words[pos + 1]!r}: {e}") from None
        elif name == "do_not_save_samples":
            save = not value
        pos += 2
    return fields, save


def parse_lines(text: str) -> list[Line]:
    """The text's non-blank lines; RequestError naming the first bad line. A line that starts
    with -- holds options, any other line is a prompt: A1111 reads the same, but takes a line of
    options it cannot read as a prompt, where it is refused here."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            fields, save = parse_options(line) if line.startswith("--") else ({"prompt": checked("prompt", line)}, True)
        except ValueError as e:
            raise RequestError(f"{TITLE}: line {number}: {e}") from None
        lines.append(Line(number, fields, save))
    if not lines:
        raise RequestError(f"{TITLE}: {LINES} is empty; write one prompt, or one line of options, a line")
    return lines


def joined(line_text: str, request_text: str, position: str) -> str:
    """A line's prompt put before ("start") or after ("end") the request's own, as A1111."""
    if not line_text or not request_text:
        return line_text or request_text
    return f"{line_text} {request_text}" if position == "start" else f"{request_text} {line_text}"


class PromptsFromFile(Script):
    title = TITLE
    args = (
        Arg(ITERATE, "checkbox", False),
        Arg(SAME_SEED, "checkbox", False),
        Arg(POSITION, "radio", "start", choices=("start", "end")),
        Arg(LINES, "textbox", "", info="one prompt a line, or options: --prompt \"...\" --steps 10 --seed 5 ..."),
    )

    def values(self, given):
        values = super().values(given)
        parse_lines(values[LINES])  # a bad line is refused before the job waits in the queue
        return values

    def line_requests(self, ctx, request: GenerationRequest, values) -> list[tuple[Line, GenerationRequest]]:
        """Each line with the request it runs, resolved (so checked, styles applied, seed
        fixed); RequestError naming the first line whose request is wrong."""
        lines = parse_lines(values[LINES])
        seed, step = request.seed, request.batch_size * request.batch_count
        if (values[ITERATE] or values[SAME_SEED]) and seed == -1:
            # One random seed for all lines; low enough that every line's seeds stay in range.
            images = max(line.fields.get("batch_size", request.batch_size) * line.fields.get("batch_count", request.batch_count)
                         for line in lines)
            seed = random.SystemRandom().randrange(0, MAX_SEED + 1 - len(lines) * step - images)
        runs = []
        for line in lines:
            fields = dict(line.fields)
            for name in PROMPT_TAGS:
                if name in fields:
                    fields[name] = joined(fields[name], getattr(request, name), values[POSITION])
            try:
                if "checkpoint" in fields:
                    ctx.models.find_checkpoint(fields["checkpoint"])
                runs.append((line, pipeline.resolved(ctx, request.replace(**{"seed": seed, **fields}))))
            except (RequestError, LookupError) as e:
                raise RequestError(f"{TITLE}: line {line.number}: {e}") from None
            if values[ITERATE]:  # by the request's own pictures per line, whatever the line sets, as A1111
                seed += step
        return runs

    def run(self, ctx, request, values, job, generate, save):
        runs = self.line_requests(ctx, request, values)
        job.total_steps = job.step + sum(r.batch_count * pipeline.sampling_steps(r) for _, r in runs)
        result = None
        for line, line_request in runs:
            made = generate(ctx, line_request, job=job, save=save if line.save else False)
            if result is None:
                result = pipeline.Result(request=made.request)
            result.images += made.images
            result.infotexts += made.infotexts
            result.seeds += made.seeds
            result.paths += made.paths
            result.interrupted = result.interrupted or made.interrupted or job.interrupted
            if job.interrupted:
                break
        return result
