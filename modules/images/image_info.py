"""What an image file says about how it was made: the A1111 "parameters" text and its other text
entries, read the way A1111 reads them.

    PNG          a "parameters" text chunk (tEXt, zTXt or iTXt)
    JPEG, WebP   the EXIF UserComment, whose first 8 bytes name its character set
                 ("UNICODE\\0" then UTF-16, as A1111 writes it; "ASCII\\0\\0\\0"; or undefined)
    GIF          the comment extension

Reading never raises: a file that is not a picture, or one whose data is damaged, gives what
could be read and a message saying what was wrong.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError

PARAMETERS = "parameters"
_CHARSET_LENGTH = 8
_CHARSETS = {
    b"ASCII\0\0\0": "ascii",
    b"JIS\0\0\0\0\0": "shift_jis",
}
_UNICODE = b"UNICODE\0"


@dataclass(frozen=True)
class ImageInfo:
    parameters: str = ""  # the A1111 infotext; "" when the image carries none
    items: dict[str, str] = field(default_factory=dict)  # every other text entry, by name
    error: str | None = None  # why the file could not be read in full, for a person


def decode_user_comment(data: bytes) -> str:
    """An EXIF UserComment as text. A1111 (through piexif) writes UTF-16 big-endian after the
    "UNICODE" header; other programs write little-endian, which the position of the zero bytes
    of ASCII characters gives away when there is no byte order mark."""
    header, body = data[:_CHARSET_LENGTH], data[_CHARSET_LENGTH:]
    if header == _UNICODE:
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            little = body[1::2].count(0) > body[0::2].count(0)
            text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif header in _CHARSETS:
        text = body.decode(_CHARSETS[header], errors="replace")
    else:  # undefined character set (eight zero bytes) or no header at all
        text = (body if header == b"\0" * _CHARSET_LENGTH else data).decode("utf-8", errors="replace")
    return text.rstrip("\0")


def _user_comment(image: Image.Image) -> str:
    try:
        value = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception:  # EXIF is parsed by PIL on demand; broken EXIF is common and not our business
        return ""
    if isinstance(value, bytes):
        return decode_user_comment(value)
    return value if isinstance(value, str) else ""


def read_info(image: Image.Image) -> ImageInfo:
    """The text an opened image carries."""
    items: dict[str, str] = {}
    for key, value in (image.info or {}).items():
        if isinstance(value, bytes) and key == "comment":
            value = value.decode("utf-8", errors="replace")
        if isinstance(key, str) and isinstance(value, str):
            items[key] = value
    parameters = items.pop(PARAMETERS, "")
    comment = _user_comment(image)
    if comment:
        parameters = comment
    elif not parameters and "comment" in items:
        parameters = items.pop("comment")
    return ImageInfo(parameters=parameters, items=items)


def read_bytes(data: bytes, name: str = "This file") -> tuple[Image.Image | None, ImageInfo]:
    """(the picture, its info) from a file's bytes; the picture is None when it cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, ImageInfo(error=f"{name} could not be read: not a picture in a known format (PNG, JPEG, WebP, GIF...)")
    except Image.DecompressionBombError as e:
        return None, ImageInfo(error=f"{name} is too large to open safely ({e})")
    except Exception as e:  # PIL's format plugins raise a variety of errors on damaged input
        return None, ImageInfo(error=f"{name} could not be read: the file is damaged ({_reason(e)})")
    try:
        image.load()  # text chunks after the pixel data are only read here
    except Exception as e:
        info = read_info(image)
        return None, ImageInfo(info.parameters, info.items, f"{name} is damaged: its picture data cannot be decoded ({_reason(e)})")
    return image, read_info(image)


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def read_path(path: Path) -> tuple[Image.Image | None, ImageInfo]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, ImageInfo(error=f"{path.name} could not be read ({e.strerror or e})")
    return read_bytes(data, path.name)
