"""A1111's img2img options as tables: resize modes (with the pixel work each one does), masked
content, mask modes, inpaint areas, outpainting directions, and the arguments of the "Poor man's
outpainting" script. The API sends an option by its index in these tables and the infotext
writes its label, so their order is A1111's. Torch-free: requests, infotexts, the UI and the API
read them without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# A1111's names, in the order of its index values (the API sends the index).
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


# ---- resize modes ------------------------------------------------------------------------------

def just_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), Image.Resampling.LANCZOS)


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover the target, centred, the overhang cut off."""
    if width / height > image.width / image.height:
        w, h = width, image.height * width // image.width
    else:
        w, h = image.width * height // image.height, height
    out = Image.new(image.mode, (width, height))
    out.paste(just_resize(image, w, h), (width // 2 - w // 2, height // 2 - h // 2))
    return out


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to fit inside the target, centred, the empty bands filled by repeating the edge
    rows or columns outwards."""
    if width / height < image.width / image.height:
        w, h = width, image.height * width // image.width
    else:
        w, h = image.width * height // image.height, height
    w, h = max(w, 1), max(h, 1)
    left, top = width // 2 - w // 2, height // 2 - h // 2
    pixels = np.asarray(just_resize(image, w, h))
    pad = ((top, height - h - top), (left, width - w - left)) + ((0, 0),) * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"), image.mode)


@dataclass(frozen=True)
class ResizeMode:
    name: str  # A1111's label; its index in RESIZE_MODES is the API's resize_mode
    resize: Callable[[Image.Image, int, int], Image.Image]
    latent: bool = False  # encode at the picture's own size and scale the latent instead


RESIZE_MODES: tuple[ResizeMode, ...] = (
    ResizeMode("Just resize", just_resize),
    ResizeMode("Crop and resize", crop_and_resize),
    ResizeMode("Resize and fill", resize_and_fill),
    ResizeMode("Just resize (latent upscale)", just_resize, latent=True),
)


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    return RESIZE_MODES[mode].resize(image, width, height)


# ---- A1111's "Poor man's outpainting" script ---------------------------------------------------

OUTPAINT_SCRIPT = "Poor man's outpainting"
# The script's own controls and defaults, in the order of its arguments (A1111's script_args).
OUTPAINT_DEFAULTS = (128, 4, 0, OUTPAINT_DIRECTIONS)  # pixels, mask blur, masked content (fill), directions


def outpaint_fields(pixels: Any, mask_blur: Any, masked_content: Any, directions: Any) -> dict[str, object]:
    """Img2ImgRequest fields for the script's arguments. As in A1111 the script blurs the mask
    twice as much as its slider says, always works on the whole picture, and the request's own
    mask options do not apply."""
    return {
        "outpaint_pixels": pixels,
        "mask_blur": mask_blur * 2 if isinstance(mask_blur, int) and not isinstance(mask_blur, bool) else mask_blur,
        "inpainting_fill": masked_content,
        "outpaint_directions": tuple(directions) if isinstance(directions, (list, tuple)) else directions,
        "inpaint_full_res": False,
        "inpainting_mask_invert": 0,
    }
