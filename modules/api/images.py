"""Pictures in JSON: base64 PNG out, base64 of any picture format in."""

from __future__ import annotations

import base64

from fastapi import HTTPException
from PIL import Image

from modules.images import image_info, pictures, storage


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_png(image: Image.Image, infotext: str | None) -> str:
    return encode_bytes(storage.png_bytes(image, infotext))


def decode_bytes(data: str) -> bytes:
    """The bytes of a base64 string, with or without a data: URL prefix; HTTP 422 if it is not base64."""
    try:
        return pictures.base64_bytes(data)
    except ValueError as e:
        raise HTTPException(422, str(e))


def decode_image(data: str, name: str = "image") -> Image.Image:
    """The picture in a base64 string, with its text; HTTP 422 saying why if it cannot be read."""
    image, info = image_info.read_bytes(decode_bytes(data), name)
    if image is None:
        raise HTTPException(422, info.error)
    return image
