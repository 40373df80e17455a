"""Grids of pictures with A1111's legends: `image_grid` lays pictures out in rows,
`draw_grid_annotations` writes labels above the columns and left of the rows (wrapped to the
space they have, struck through in grey when inactive), `draw_prompt_matrix` the prompt matrix's
on/off legends. The text is drawn with a TrueType font (Pillow's own, no file needed)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# A1111's default "Maximal image size (megapixels)" for a grid.
MAX_GRID_MEGAPIXELS = 200
# A1111 sizes the text (width + height) / 25, 5 px for the built-in model's 64 px pictures:
# unreadable, so no smaller than this.
MIN_FONT_SIZE = 12
ACTIVE = (0, 0, 0)
INACTIVE = (153, 153, 153)
BACKGROUND = (255, 255, 255)


@dataclass
class GridAnnotation:
    text: str = ""
    is_active: bool = True


def grid_size_problem(cells: int, width: int, height: int) -> str | None:
    """Why a grid of `cells` pictures of width x height would be too large, or None."""
    megapixels = cells * width * height / 1_000_000
    if megapixels > MAX_GRID_MEGAPIXELS:
        return (f"the grid would have {megapixels:.0f} megapixels ({cells} pictures of {width}x{height}); "
                f"at most {MAX_GRID_MEGAPIXELS}: ask for fewer or smaller pictures")
    return None


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def font_size(width: int, height: int) -> int:
    """The legend's text size for cells of width x height."""
    return max(MIN_FONT_SIZE, (width + height) // 25)


def image_grid(images: Sequence[Image.Image | None], rows: int | None = None,
               size: tuple[int, int] | None = None) -> Image.Image:
    """The pictures in `rows` rows (default: as square as the count allows, as A1111) on black,
    each centred in a slot of `size` (default: the largest picture's); a None (a picture not
    made) leaves its slot black."""
    rows = rows or max(1, round(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    made = [image for image in images if image is not None]
    width, height = size or (max(i.width for i in made), max(i.height for i in made))
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        if image is not None:
            x, y = index % cols * width, index // cols * height
            grid.paste(image, (x + (width - image.width) // 2, y + (height - image.height) // 2))
    return grid


def wrap(text: str, typeface, width: float) -> list[str]:
    """The words of `text` in lines no wider than `width` where a word allows it."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and typeface.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    return lines


def draw_grid_annotations(im: Image.Image, width: int, height: int, hor_texts: Sequence[Sequence[GridAnnotation]],
                          ver_texts: Sequence[Sequence[GridAnnotation]], margin: int = 0) -> Image.Image:
    """`im`, a grid of cells of width x height, with `margin` pixels between cells, each column's
    labels above it and each row's to its left (a column of 3/4 of a cell, when any row has
    text), on white. A label too long for its space is wrapped at words, and a word still too
    wide is drawn smaller."""
    cols, rows = len(hor_texts), len(ver_texts)
    if (cols * width, rows * height) != im.size:
        raise ValueError(f"{cols}x{rows} labels for a grid of {im.width // width}x{im.height // height} cells")
    size = font_size(width, height)
    typeface = font(size)
    spacing = size // 2
    ascent, descent = typeface.getmetrics()
    line_height = ascent + descent
    pad_left = width * 3 // 4 if any(a.text.strip() for texts in ver_texts for a in texts) else 0

    def lines_of(texts, room):
        return [(line, a.is_active) for a in texts for line in wrap(a.text, typeface, room)]

    hor_lines = [lines_of(texts, width) for texts in hor_texts]
    ver_lines = [lines_of(texts, pad_left) for texts in ver_texts]

    def block_height(lines):
        return len(lines) * (line_height + spacing) - spacing if lines else 0

    pad_top = max(map(block_height, hor_lines), default=0)
    pad_top = pad_top + 2 * spacing if pad_top else 0

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)), BACKGROUND)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    draw = ImageDraw.Draw(result)

    def draw_lines(center_x, top, lines, room):
        for text, active in lines:
            fitted, fitted_size = typeface, size
            while fitted.getlength(text) > room and fitted_size > 1:
                fitted_size -= 1
                fitted = font(fitted_size)
            middle = top + line_height / 2
            colour = ACTIVE if active else INACTIVE
            draw.text((center_x, middle), text, font=fitted, fill=colour, anchor="mm")
            if not active:
                half = fitted.getlength(text) / 2
                draw.line((center_x - half, middle, center_x + half, middle), fill=INACTIVE, width=max(1, size // 6))
            top += line_height + spacing

    for col, lines in enumerate(hor_lines):
        draw_lines(pad_left + (width + margin) * col + width / 2, pad_top / 2 - block_height(lines) / 2, lines, width)
    for row, lines in enumerate(ver_lines):
        draw_lines(pad_left / 2, pad_top + (height + margin) * row + height / 2 - block_height(lines) / 2, lines, pad_left)
    return result


def prompt_matrix_annotations(parts: Sequence[str]) -> tuple[list[list[GridAnnotation]], list[list[GridAnnotation]]]:
    """A1111's prompt matrix legends for `parts` (the prompt split at '|', the first always in):
    the first half of the variable parts over the columns, the rest by the rows; column (row) n
    has part i on when bit i of n is set."""
    variable = list(parts[1:])
    boundary = math.ceil(len(variable) / 2)
    across, down = variable[:boundary], variable[boundary:]
    hor = [[GridAnnotation(text, bool(pos & (1 << i))) for i, text in enumerate(across)] for pos in range(1 << len(across))]
    ver = [[GridAnnotation(text, bool(pos & (1 << i))) for i, text in enumerate(down)] for pos in range(1 << len(down))]
    return hor, ver


def draw_prompt_matrix(im: Image.Image, width: int, height: int, parts: Sequence[str], margin: int = 0) -> Image.Image:
    hor, ver = prompt_matrix_annotations(parts)
    return draw_grid_annotations(im, width, height, hor, ver, margin)
