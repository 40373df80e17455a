"""Images on disk: outputs/<mode>-images/<date>/NNNNN-<seed>-<prompt>.png, as A1111 names them
(scripts' grids: outputs/<mode>-grids/<date>/).

A file appears under its final name only when it is complete: the PNG is encoded in memory,
written to a hidden temporary file in the same folder, and then linked to a name no other save
has taken. Saves in this process take their numbers one at a time, so two images saved at once
never share a number; a save from another process that takes a name first is stepped over.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from datetime import date
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Characters Windows refuses in file names (Linux refuses only '/'), control characters, and '#',
# which cuts a file's URL short in the browser gallery.
ILLEGAL_CHARACTERS = re.compile(r'[<>:"/\\|?*#\x00-\x1f\x7f]')
_WHITESPACE = re.compile(r"\s+")
# Linux allows 255 bytes per name; this leaves room for "NNNNN-<seed>-" and ".png".
_MAX_PROMPT_BYTES = 200
_NUMBERED = re.compile(r"^(\d+)(?:[-.]|$)")
_MAX_ATTEMPTS = 1000
# Names differ by seed and prompt, so only numbering in turn keeps two concurrent saves from both
# taking the same number.
_NUMBERING = threading.Lock()


def dated_dir(outputs: Path, mode: str, grid: bool = False) -> Path:
    """Today's folder for `mode` ("txt2img", "img2img"), or for its grids (A1111's
    outputs/txt2img-grids/DATE); created by the first save, not here."""
    return Path(outputs) / f"{mode}-{'grids' if grid else 'images'}" / date.today().isoformat()


def png_bytes(image: Image.Image, infotext: str | None, text: Mapping[str, str] | None = None) -> bytes:
    """The image as PNG, with the infotext in a "parameters" text chunk (iTXt when it is not
    Latin-1) where A1111 and other readers look for it, and `text` in further chunks after it."""
    chunks = {"parameters": infotext} if infotext is not None else {}
    chunks.update(text or {})
    info = None
    if chunks:
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def sanitize_prompt(prompt: str, max_chars: int = 64) -> str:
    """The prompt as part of a file name: illegal characters dropped, whitespace collapsed, cut to
    `max_chars` (and to a byte length every file system takes), no trailing dots or spaces,
    which Windows strips or refuses."""
    text = ILLEGAL_CHARACTERS.sub("", _WHITESPACE.sub(" ", prompt)).strip()[: max(max_chars, 0)]
    while len(text.encode("utf-8")) > _MAX_PROMPT_BYTES:
        text = text[:-1]
    return text.rstrip(" .")


def next_number(folder: Path) -> int:
    """One more than the highest number any name in `folder` starts with; 0 for a new folder."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    numbers = [int(m[1]) for m in map(_NUMBERED.match, names) if m]
    return max(numbers, default=-1) + 1


def _claim(temporary: Path, final: Path) -> bool:
    """Gives the finished temporary file its final name unless that name exists; True if done."""
    try:
        os.link(temporary, final)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # no hard links on this file system (FAT, some network shares): reserve, then replace
    try:
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    try:
        os.replace(temporary, final)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return True


def save_image(
    image: Image.Image,
    folder: Path,
    *,
    seed: int,
    prompt: str,
    infotext: str | None,
    max_prompt: int = 64,
) -> Path:
    """Saves the image as the next NNNNN-<seed>-<prompt>.png in `folder` and returns its path.
    On any failure no file is left behind and the error says where the write went wrong."""
    name_tail = "-".join(part for part in (str(seed), sanitize_prompt(prompt, max_prompt)) if part)
    return save_png(png_bytes(image, infotext), folder, name_tail, what=f"the image for seed {seed}")


def save_grid(image: Image.Image, outputs: Path, mode: str, *, seed: int, prompt: str, infotext: str | None) -> Path:
    """A script's grid (X/Y/Z plot, prompt matrix) as the next NNNNN-<seed>-<prompt>.png in
    today's grids folder of `mode`, its infotext inside."""
    return save_image(image, dated_dir(outputs, mode, grid=True), seed=seed, prompt=prompt, infotext=infotext)


def save_png(data: bytes, folder: Path, name_tail: str, what: str = "the image") -> Path:
    """Writes PNG bytes as the next NNNNN-<name_tail>.png (NNNNN.png when the tail is empty) in
    `folder`, atomically, and returns the path; `what` names the image in an error."""
    folder = Path(folder)
    suffix = f"-{name_tail}.png" if name_tail else ".png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary_name = tempfile.mkstemp(prefix=".saving-", suffix=".png", dir=folder)
    except OSError as e:
        raise OSError(f"Could not write images to {folder}: {e}") from e
    temporary = Path(temporary_name)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        with _NUMBERING:
            for _ in range(_MAX_ATTEMPTS):
                final = folder / f"{next_number(folder):05}{suffix}"
                if _claim(temporary, final):
                    return final
        raise OSError(f"no free file number after {_MAX_ATTEMPTS} attempts")
    except OSError as e:
        raise OSError(f"Could not save {what} in {folder}: {e}") from e
    finally:
        temporary.unlink(missing_ok=True)
