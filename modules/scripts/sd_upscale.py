"""A1111's "SD upscale" (img2img): the picture upscaled by an upscaler, cut into overlapping
tiles of the request's width x height, each tile redrawn by img2img at the request's denoising
strength, and the tiles put back together with their overlaps blended.

Seeds as A1111 gives them: the k-th picture of the batch count starts at seed + k, each batch of
tiles (batch size tiles at a time) at one more than the batch before, its tiles counting up from
there. Each result carries the infotext of its first tile with "SD upscale overlap" and "SD
upscale upscaler" added, and is saved as an img2img picture; the tiles are not saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import MAX_SEED, SIZE_STEP
from modules.images.infotext import format_params_line
from modules.postprocess.upscalers import BUILTIN, NONE
from modules.scripts.base import Arg, Script

TITLE = "SD upscale"
OVERLAP, UPSCALER, SCALE = "Tile overlap", "Upscaler", "Scale Factor"
MIN_TILE = 64  # the smallest side a request may have


@dataclass(frozen=True)
class Grid:
    """Where A1111's split_grid cuts a width x height picture: tiles of tile_w x tile_h whose
    left edges are `xs` and top edges `ys`, neighbours overlapping by at least `overlap`."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)


def edges(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """The tiles' starts along a side (tile <= size, overlap < tile): as few tiles as overlap by
    `overlap`, spread evenly from 0 to size - tile (A1111's rule, in whole numbers so that the
    last tile ends exactly at the side's end)."""
    count = math.ceil((size - overlap) / (tile - overlap))
    if count == 1:
        return (0,)
    return tuple(i * (size - tile) // (count - 1) for i in range(count))


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> tuple[Grid, list[Image.Image]]:
    """The grid and its tiles, row by row."""
    grid = Grid(image.width, image.height, tile_w, tile_h, overlap,
                edges(image.width, tile_w, overlap), edges(image.height, tile_h, overlap))
    tiles = [image.crop((x, y, x + tile_w, y + tile_h)) for y in grid.ys for x in grid.xs]
    return grid, tiles


def _blend_in(into: np.ndarray, piece: np.ndarray, at: int, overlap: int, axis: int) -> None:
    """`piece` laid into `into` from `at` along `axis`: its first `overlap` lines fade in over
    what is there (weight 0, 1/overlap, ...), the rest replaces it, as A1111's combine_grid."""
    ramp = np.arange(overlap, dtype=np.float64) / max(overlap, 1)
    ramp = ramp.reshape((1, overlap, 1) if axis == 1 else (overlap, 1, 1))
    length = piece.shape[axis]
    head, rest = np.split(piece, [overlap], axis=axis)
    lines = [slice(None)] * 3
    lines[axis] = slice(at, at + overlap)
    into[tuple(lines)] = into[tuple(lines)] * (1 - ramp) + head * ramp
    lines[axis] = slice(at + overlap, at + length)
    into[tuple(lines)] = rest


def combine_grid(grid: Grid, tiles: list[Image.Image]) -> Image.Image:
    """The tiles (row by row, as split_grid gives them) put back into one picture: each row's
    tiles left to right, then the rows top to bottom, each blended over its predecessor."""
    picture = np.zeros((grid.height, grid.width, 3), dtype=np.float64)
    for row, y in enumerate(grid.ys):
        strip = np.zeros((grid.tile_h, grid.width, 3), dtype=np.float64)
        for col, x in enumerate(grid.xs):
            tile = np.asarray(tiles[row * len(grid.xs) + col].convert("RGB"), dtype=np.float64)
            _blend_in(strip, tile, x, grid.overlap if col else 0, axis=1)
        _blend_in(picture, strip, y, grid.overlap if row else 0, axis=0)
    return Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8))


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's size for an upscale by `scale`: each side scaled, down to a multiple of 8."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


@dataclass(frozen=True)
class UpscalerArg(Arg):
    """An upscaler's name, or A1111's index into the list of them. The list grows with the network
    files found when the script runs, so a name passes here and `run` refuses one not found."""

    def check(self, value, script):
        if isinstance(value, bool) or not (isinstance(value, str) and value.strip() or isinstance(value, int) and value >= 0):
            raise RequestError(f"{script}: {self.label} must be an upscaler's name or its place in the list, got {value!r}")
        return value


def find_upscaler(names: list[str], value: str | int) -> str:
    """The upscaler `value` (a name in any case, or an index, as A1111's API sends it) names."""
    if isinstance(value, int):
        if value < len(names):
            return names[value]
    else:
        by_name = {name.lower(): name for name in names}
        if value.strip().lower() in by_name:
            return by_name[value.strip().lower()]
    raise RequestError(f"{TITLE}: no upscaler {value!r}; available: {', '.join(names)} "
                       "(network files go in models/ESRGAN and its sibling folders)")


class SdUpscale(Script):
    title = TITLE
    tabs = ("img2img",)
    # A1111's order, which its API clients send positionally.
    args = (
        Arg(OVERLAP, "slider", 64, 0, 256, 16),
        UpscalerArg(UPSCALER, "dropdown", NONE.name, choices=tuple(u.name for u in BUILTIN),
                    info="any upscaler of the list; \"None\" redraws the picture at its own size"),
        Arg(SCALE, "slider", 2.0, 1.0, 4.0, 0.05),
    )

    def values(self, given):
        # A1111's script_args begin with a slot for its info text, which sends nothing that matters.
        if isinstance(given, (list, tuple)) and len(given) == len(self.args) + 1:
            given = given[1:]
        return super().values(given)

    def run(self, ctx, request, values, job, generate, save):
        overlap = values[OVERLAP]
        upscaler = find_upscaler(ctx.upscalers.names(), values[UPSCALER])
        request = pipeline.resolved(ctx, request)  # checked, styles applied, seed fixed for every tile
        if request.mask is not None or request.outpaint_pixels:
            raise RequestError(f"{TITLE} redraws the whole picture; send no mask and no outpainting with it")
        picture = request.init_images[0]
        width, height = picture.size if upscaler == NONE.name else upscaled_size(*picture.size, values[SCALE])
        # A tile no larger than the picture, so that no tile reaches past its edges.
        tile_w, tile_h = (min(side, size // SIZE_STEP * SIZE_STEP) for side, size in
                          ((request.width, width), (request.height, height)))
        if min(tile_w, tile_h) < MIN_TILE:
            raise RequestError(f"{TITLE}: the upscaled picture would be {width}x{height}; it needs at least "
                               f"{MIN_TILE} pixels a side to be redrawn")
        if overlap >= min(tile_w, tile_h):
            raise RequestError(f"{TITLE}: {OVERLAP} ({overlap}) must be smaller than the tiles' sides ({tile_w}x{tile_h}); "
                               "lower it, or raise Width and Height, which set the tile size")
        if upscaler != NONE.name:
            picture = ctx.upscalers.upscale(picture, upscaler, width, height, ctx.tiling)
        grid, tiles = split_grid(picture, tile_w, tile_h, overlap)
        per_batch = request.batch_size
        batches = [tiles[i:i + per_batch] for i in range(0, len(tiles), per_batch)]
        last_seed = request.seed + request.batch_count + len(batches) + per_batch - 3
        if last_seed > MAX_SEED:
            raise RequestError(f"{TITLE}: seed {request.seed} would give the tiles seeds up to {last_seed}, above {MAX_SEED}; "
                               "choose a lower seed")

        tile_request = request.replace(width=tile_w, height=tile_h, resize_mode=0, batch_count=1)
        job.total_steps = job.step + request.batch_count * len(batches) * pipeline.sampling_steps(tile_request)
        save = ctx.settings.save_images if save is None else save
        hooks = ctx.hooks.joined(job.hooks)
        added = format_params_line({"SD upscale overlap": overlap, "SD upscale upscaler": upscaler})
        result = pipeline.Result(request=request)
        for n in range(request.batch_count):
            start_seed = request.seed + n
            redrawn, infotext = [], None
            for i, batch in enumerate(batches):
                made = generate(ctx, tile_request.replace(init_images=tuple(batch), batch_size=len(batch), seed=start_seed + i),
                                job=job, save=False)
                redrawn += made.images
                infotext = infotext or (f"{made.infotexts[0]}, {added}" if made.infotexts else None)
                if job.interrupted:
                    break
            if not redrawn:  # interrupted before this picture's first tile
                result.interrupted = True
                break
            # After an interrupt, the tiles not redrawn keep the upscaled picture's pixels.
            combined = combine_grid(grid, redrawn + tiles[len(redrawn):])
            if save:
                result.paths.append(pipeline.save_picture(ctx, request, combined, start_seed, infotext, hooks))
            result.images.append(combined)
            result.infotexts.append(infotext)
            result.seeds.append(start_seed)
            if job.interrupted:
                result.interrupted = True
                break
        return result
