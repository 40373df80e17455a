"""Pictures in: whatever a person or an HTTP client sent (a PIL image, file bytes, base64 text
with or without a data: URL) as an RGB picture or a 0/255 mask, or a ValueError saying what is
wrong with it. Large pictures are refused from their header, before they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image

from modules.images import image_info

MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 8192 * 8192
BACKGROUND = (255, 255, 255)  # what transparent pixels become (A1111's img2img background colour)
MASK_THRESHOLD = 128  # mask pixels above this are masked (A1111 rounds masks the same way)

# Pixel modes with 16 bits per sample: scaled to 8 bits rather than clipped as PIL would.
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_HAS_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


def base64_bytes(text: str, what: str = "image") -> bytes:
    """The bytes of base64 text, with or without a data: URL prefix; ValueError if it is not base64."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what} is not valid base64: {e}") from None


def read_image(data: Any, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, file bytes or base64 text. Raises ValueError saying what
    `what` is and why it cannot be used."""
    if isinstance(data, str):
        data = base64_bytes(data, what)
    if isinstance(data, (bytes, bytearray)):
        try:  # the header alone refuses a huge picture before it is decoded
            header = Image.open(io.BytesIO(data))
        except Exception:  # not a picture: image_info.read_bytes says what is wrong
            header = None
        if header is not None:
            check_size(header, what)
        data, info = image_info.read_bytes(bytes(data), what)
        if data is None:
            raise ValueError(info.error)
    if not isinstance(data, Image.Image):
        raise ValueError(f"{what} must be a picture, got {type(data).__name__}")
    check_size(data, what)
    return data


def check_size(image: Image.Image, what: str = "image") -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is empty ({width}x{height})")
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} is {width}x{height}, too large; the limit is {MAX_IMAGE_SIDE} pixels a side and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels. Scale it down first"
        )


def _eight_bit(image: Image.Image, what: str) -> Image.Image:
    """The image in a mode PIL can convert to RGB or L without losing its brightness scale."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        raise ValueError(
            f"{what} has 32-bit floating-point pixels (mode F), which have no fixed brightness range; "
            "save it as an 8-bit PNG or JPEG"
        )
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _HAS_ALPHA or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """The picture as RGB; transparent pixels are laid onto white, as A1111 flattens them."""
    image = _eight_bit(image, what)
    try:
        if _has_alpha(image):
            flat = Image.new("RGBA", image.size, BACKGROUND + (255,))
            flat.alpha_composite(image.convert("RGBA"))
            return flat.convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"{what} has pixel mode {image.mode}, which cannot be converted to RGB: {e}") from None


def binary_mask(image: Image.Image, what: str = "mask") -> Image.Image:
    """0/255 mask ("L"): the alpha channel where the picture has transparency (a painted layer),
    else its brightness; anything above half is masked."""
    image = _eight_bit(image, what)
    try:
        if _has_alpha(image):
            alpha = image.convert("RGBA").getchannel("A")
            grey = alpha if alpha.getextrema() != (255, 255) else image.convert("L")
        else:
            grey = image.convert("L")
    except ValueError as e:
        raise ValueError(f"{what} has pixel mode {image.mode}, which cannot be read as a mask: {e}") from None
    return grey.point(lambda v: 255 if v > MASK_THRESHOLD else 0)


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at `size` when it has the same shape (a mask drawn on a scaled copy); ValueError otherwise."""
    if mask.size == size:
        return mask
    (mw, mh), (w, h) = mask.size, size
    if abs(mw / mh - w / h) > 0.01 * (w / h):
        raise ValueError(f"the mask is {mw}x{mh} but the image is {w}x{h}; they must have the same size or shape")
    return binary_mask(mask.resize(size, Image.Resampling.BILINEAR))
