"""A request's A1111 parameters: the "key: value" pairs written into each picture's infotext
(`infotext_params`), and the request fields a pasted or dropped infotext stands for
(`request_fields`, `request_from_infotext`). The text format itself is images/infotext.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from modules.generation.options import INPAINT_AREAS, MASK_MODES, MASKED_CONTENT
from modules.generation.request import NOISE_SOURCES, GenerationRequest
from modules.images.infotext import parse_infotext
from modules.sampling.registry import find_sampler, find_sampler_and_schedule
from modules.sampling.schedules import find_schedule

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _schedule_label(request: GenerationRequest) -> str:
    """The schedule actually used, as A1111 records it: "Automatic" resolves to the sampler's own
    default schedule (DPM++ 2M -> Karras) and stays "Automatic" only for samplers that run on the
    model's plain levels."""
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
    mask_weight: float | None = None, extra: dict[str, object] | None = None, subseed: int | None = None,
) -> dict[str, object]:
    """The parameters of one image, in A1111's order; None values are left out.

    "Clip skip" appears only above 1 and "RNG" only when the noise was not made on the GPU:
    A1111 reads a missing key as those defaults. The variation seed (the image's `subseed`, else
    the request's) and its strength appear only with a strength, "Seed resize from" only when on.
    img2img and hires fix requests add "Denoising strength"; `mask_weight` is written as
    "Conditional mask weight" (inpainting models) and `extra` (the inpainting options, see
    img2img.prepare) and the hires keys go last, where A1111 puts such entries."""
    params: dict[str, object | None] = {
        "Steps": request.steps,
        "Sampler": request.sampler_name,
        "Schedule type": _schedule_label(request),
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
        **_variation_params(request, request.subseed if subseed is None else subseed),
        "Denoising strength": request.strength_used,
        "Conditional mask weight": mask_weight,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "RNG": request.noise_source if request.noise_source != "GPU" else None,
        **(extra or {}),
        **(_hires_params(request) if request.enable_hr else {}),
    }
    return {key: value for key, value in params.items() if value is not None}


def _variation_params(request: GenerationRequest, subseed: int) -> dict[str, object | None]:
    strength = request.subseed_strength or None
    resized = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
    return {
        "Variation seed": subseed if strength else None,
        "Variation seed strength": strength,
        "Seed resize from": f"{request.seed_resize_from_w}x{request.seed_resize_from_h}" if resized else None,
    }


def _hires_params(request: GenerationRequest) -> dict[str, object | None]:
    """A1111's keys for the hires fix; "Size" stays the first pass's."""
    resize = request.hr_resize_x or request.hr_resize_y
    return {
        "Hires upscale": None if resize else request.hr_scale,
        "Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}" if resize else None,
        "Hires steps": request.hr_second_pass_steps or None,
        "Hires upscaler": request.hr_upscaler,
    }


def _size(value: str) -> dict[str, object]:
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"not a size: {value!r}")
    return {"width": int(match[1]), "height": int(match[2])}


def _sampler(value: str) -> dict[str, object]:
    """Also reads the older combined names ("DPM++ 2M Karras") that A1111 wrote before it had a
    separate "Schedule type"; the schedule in such a name is the one that was used."""
    sampler, schedule = find_sampler_and_schedule(value)
    fields: dict[str, object] = {"sampler_name": sampler.name}
    if schedule.fn is not None:
        fields["scheduler"] = schedule.label
    return fields


def _schedule(value: str) -> dict[str, object]:
    return {"scheduler": find_schedule(value).label}


def _noise_source(value: str) -> dict[str, object]:
    source = value.strip().upper()
    if source not in NOISE_SOURCES:
        raise ValueError(f"unsupported RNG {value!r}")
    return {"noise_source": source}


def _field(name: str, convert: Callable[[str], object]) -> Callable[[str], dict[str, object]]:
    return lambda value: {name: convert(value.strip())}


def _seed_resize(value: str) -> dict[str, object]:
    size = _size(value)
    return {"seed_resize_from_w": size["width"], "seed_resize_from_h": size["height"]}


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
    "Variation seed": _field("subseed", int),
    "Variation seed strength": _field("subseed_strength", float),
    "Seed resize from": _seed_resize,
    "Clip skip": _field("clip_skip", int),
    "RNG": _noise_source,
    "Refiner": lambda value: {"refiner_checkpoint": None if value.strip() == "None" else value.strip()},
    "Refiner switch at": _field("refiner_switch_at", float),
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
_MISSING_MEANS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic", "Refiner": "None"}


def _choice(name: str, choices: tuple[str, ...], convert: Callable[[int], object] = int) -> Callable[[str], dict[str, object]]:
    """Reader of an A1111 option written by its label, giving the request's index value."""

    def read(value: str) -> dict[str, object]:
        labels = [c.lower() for c in choices]
        if value.strip().lower() not in labels:
            raise ValueError(f"unknown {name} {value!r}")
        return {name: convert(labels.index(value.strip().lower()))}

    return read


_IMG2IMG_READERS: dict[str, Callable[[str], dict[str, object]]] = {
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
        readers.update(_IMG2IMG_READERS)
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
