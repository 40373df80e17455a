"""Infotext: the A1111 "parameters" text stored in every PNG, and its way back to a request.

The text is three parts, as A1111 writes and reads it:

    a photo of a cat                      prompt, any number of lines
    Negative prompt: blurry               only when there is a negative prompt, may go on for lines
    Steps: 20, Sampler: DPM++ 2M, ...     one line of "key: value" pairs, always the last

Formatting and parsing are plain functions of text. The sampler table (which pulls in torch
through k-diffusion) is imported only by the two functions that need it, so reading an image's
parameters does not load torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modules.generation.request import GenerationRequest

NEGATIVE_PREFIX = "Negative prompt:"

# One "key: value" pair of the parameters line. Keys start with a word character and go on with
# word characters, spaces, '-' and '/'; a value is either a JSON string (which may hold commas)
# or runs up to the next comma. A1111 reads the same grammar, so both recognise the same lines.
# Keys are bounded in length (A1111's longest are ~25 characters) so that a long line without a
# colon is scanned in linear, not quadratic, time.
_PAIR = re.compile(
    r"""
    (?P<key> \w [\w\ \-/]{1,63} ) : \s*
    (?P<value> " (?: \\. | [^\\"] )+ " | [^,]* )
    (?: , | $ )
    """,
    re.VERBOSE,
)
# A1111 takes the last line as parameters only when it holds at least this many pairs, so that a
# prompt line with a stray "word: word" stays part of the prompt.
_MIN_PAIRS = 3
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEEDS_QUOTES = (",", ":", "\n")


def _format_value(value: object) -> str:
    """A1111's look for numbers: 7.0 is written "7", 7.5 stays "7.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: str) -> str:
    """JSON-quoted when the value would otherwise break the "key: value, ..." line."""
    if any(mark in value for mark in _NEEDS_QUOTES):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def _schedule_label(request: GenerationRequest) -> str:
    """The schedule actually used, as A1111 records it: "Automatic" resolves to the sampler's own
    default schedule (DPM++ 2M -> Karras) and stays "Automatic" only for samplers that run on the
    model's plain levels."""
    from modules.sampling.registry import find_sampler
    from modules.sampling.schedules import find_schedule

    try:
        schedule = find_schedule(request.scheduler)
        if schedule.fn is not None:
            return schedule.label
        default = find_sampler(request.sampler_name).options.get("scheduler")
    except ValueError:
        return str(request.scheduler)
    return find_schedule(default).label if default else schedule.label


def infotext_params(
    request: GenerationRequest, *, seed: int, model_hash: str | None, model_name: str | None,
    mask_weight: float | None = None, extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """The parameters of one image, in A1111's order; None values are left out.

    "Clip skip" appears only above 1 and "RNG" only when the noise was not made on the GPU:
    A1111 reads a missing key as those defaults. img2img and hires fix requests add "Denoising
    strength"; `mask_weight` is written as "Conditional mask weight" (inpainting models) and
    `extra` (the inpainting options, see img2img.prepare) and the hires keys go last, where A1111
    puts such entries."""
    params: dict[str, object | None] = {
        "Steps": request.steps,
        "Sampler": request.sampler_name,
        "Schedule type": _schedule_label(request),
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": request.strength_used,
        "Conditional mask weight": mask_weight,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "RNG": request.noise_source if request.noise_source != "GPU" else None,
        **(extra or {}),
        **(_hires_params(request) if request.enable_hr else {}),
    }
    return {key: value for key, value in params.items() if value is not None}


def _hires_params(request: GenerationRequest) -> dict[str, object | None]:
    """A1111's keys for the hires fix; "Size" stays the first pass's."""
    resize = request.hr_resize_x or request.hr_resize_y
    return {
        "Hires upscale": None if resize else request.hr_scale,
        "Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}" if resize else None,
        "Hires steps": request.hr_second_pass_steps or None,
        "Hires upscaler": request.hr_upscaler,
    }


def format_params_line(params: dict[str, object]) -> str:
    """One "key: value, ..." line; None values are left out."""
    return ", ".join(f"{key}: {quote(_format_value(value))}" for key, value in params.items() if value is not None)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """The full infotext; leading and trailing whitespace is dropped, as A1111 does."""
    line = format_params_line(params)
    parts = [prompt]
    if negative_prompt:
        parts.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    parts.append(line)
    return "\n".join(parts).strip()


def parse_params_line(line: str) -> dict[str, str]:
    """The "key: value" pairs of one line, quoted values decoded; later duplicates win."""
    return {m["key"]: unquote(m["value"]) for m in _PAIR.finditer(line)}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from an infotext; never raises.

    Text without a parameters line is all prompt. Lines are stripped, and every line after the
    one starting with "Negative prompt:" belongs to the negative prompt, as in A1111."""
    if not isinstance(text, str):
        return "", "", {}
    *lines, last = text.strip().split("\n")
    params: dict[str, str] = {}
    if len(_PAIR.findall(last)) >= _MIN_PAIRS:
        params = parse_params_line(last)
    else:
        lines.append(last)

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(NEGATIVE_PREFIX):].strip()
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def _size(value: str) -> dict[str, object]:
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"not a size: {value!r}")
    return {"width": int(match[1]), "height": int(match[2])}


def _sampler(value: str) -> dict[str, object]:
    """Also reads the older combined names ("DPM++ 2M Karras") that A1111 wrote before it had a
    separate "Schedule type"; the schedule in such a name is the one that was used."""
    from modules.sampling.registry import find_sampler_and_schedule

    sampler, schedule = find_sampler_and_schedule(value)
    fields: dict[str, object] = {"sampler_name": sampler.name}
    if schedule.fn is not None:
        fields["scheduler"] = schedule.label
    return fields


def _schedule(value: str) -> dict[str, object]:
    from modules.sampling.schedules import find_schedule

    return {"scheduler": find_schedule(value).label}


def _noise_source(value: str) -> dict[str, object]:
    from modules.generation.request import NOISE_SOURCES

    source = value.strip().upper()
    if source not in NOISE_SOURCES:
        raise ValueError(f"unsupported RNG {value!r}")
    return {"noise_source": source}


def _field(name: str, convert: Callable[[str], object]) -> Callable[[str], dict[str, object]]:
    return lambda value: {name: convert(value.strip())}


# Infotext key -> reader giving GenerationRequest fields; a reader raises ValueError on a value
# it cannot use, and that key is skipped. "Schedule type" comes before "Sampler" so that an old
# combined sampler name, written when there was no "Schedule type", keeps its schedule.
_READERS: dict[str, Callable[[str], dict[str, object]]] = {
    "Steps": _field("steps", int),
    "Schedule type": _schedule,
    "Sampler": _sampler,
    "CFG scale": _field("cfg_scale", float),
    "Seed": _field("seed", int),
    "Size": _size,
    "Clip skip": _field("clip_skip", int),
    "RNG": _noise_source,
}

def _hires_resize(value: str) -> dict[str, object]:
    size = _size(value)
    return {"enable_hr": True, "hr_resize_x": size["width"], "hr_resize_y": size["height"]}


# The hires fix's keys; "Denoising strength" is its strength when one of the first two is there.
_HIRES_READERS: dict[str, Callable[[str], dict[str, object]]] = {
    "Hires upscale": lambda value: {"enable_hr": True, "hr_scale": float(value)},
    "Hires resize": _hires_resize,
    "Hires steps": _field("hr_second_pass_steps", int),
    "Hires upscaler": _field("hr_upscaler", str),
    "Denoising strength": _field("denoising_strength", float),
}

# What A1111 means by a key that is missing from a parameters line.
_MISSING_MEANS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic"}


def _choice(name: str, choices: tuple[str, ...], convert: Callable[[int], object] = int) -> Callable[[str], dict[str, object]]:
    """Reader of an A1111 option written by its label, giving the request's index value."""

    def read(value: str) -> dict[str, object]:
        labels = [c.lower() for c in choices]
        if value.strip().lower() not in labels:
            raise ValueError(f"unknown {name} {value!r}")
        return {name: convert(labels.index(value.strip().lower()))}

    return read


def _img2img_readers() -> dict[str, Callable[[str], dict[str, object]]]:
    # The option tables live with the img2img code, which imports torch; read them only when asked.
    from modules.generation.img2img import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT

    return {
        "Denoising strength": _field("denoising_strength", float),
        "Conditional mask weight": _field("inpainting_mask_weight", float),
        "Mask blur": _field("mask_blur", int),
        "Mask mode": _choice("inpainting_mask_invert", MASK_MODES),
        "Inpaint area": _choice("inpaint_full_res", INPAINT_AREAS, bool),
        "Masked area padding": _field("inpaint_full_res_padding", int),
        "Masked content": _choice("inpainting_fill", MASKED_CONTENT),
    }


# A1111 writes these only when they differ from what a missing key means.
_IMG2IMG_MISSING_MEANS = {"Mask mode": "Inpaint masked", "Inpaint area": "Whole picture", "Masked content": "original"}


def request_fields(prompt: str, negative_prompt: str, params: dict[str, str], *, img2img: bool = False) -> dict[str, object]:
    """GenerationRequest keyword arguments (Img2ImgRequest ones with `img2img`) from parsed
    infotext; values that cannot be read (unknown sampler, "Steps: many") are left out so the
    request keeps its default."""
    fields: dict[str, object] = {"prompt": prompt, "negative_prompt": negative_prompt}
    readers = dict(_READERS)
    if params:
        params = {**_MISSING_MEANS, **params}
    if "Hires upscale" in params or "Hires resize" in params:
        readers.update(_HIRES_READERS)
    elif params:
        fields["enable_hr"] = False  # a picture made without the hires fix is remade without it
    if img2img:
        readers.update(_img2img_readers())
        if "Mask blur" in params:  # the inpainting keys' defaults hold only where a mask was used
            params = {**_IMG2IMG_MISSING_MEANS, **params}
    for key, read in readers.items():
        if key not in params:
            continue
        try:
            fields.update(read(params[key]))
        except (ValueError, TypeError, OverflowError):
            continue
    return fields


def request_from_infotext(text: str, *, img2img: bool = False) -> dict[str, object]:
    """GenerationRequest (or with `img2img`, Img2ImgRequest) keyword arguments from an infotext; never raises."""
    return request_fields(*parse_infotext(text), img2img=img2img)
