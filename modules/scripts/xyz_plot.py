"""A1111's "X/Y/Z plot": a picture for every combination of up to three axes' values (seeds,
steps, samplers, checkpoints...), in a labelled grid for each Z value, the Z grids side by side.

Each cell is the request with the axes' values written into it, made by `generate` as the
Generate button makes it, so a cell equals that single run bit for bit. Values are read when the
arguments are checked, before the job queues; the names they give (checkpoints, styles,
upscalers) and every cell's request are checked before the first cell runs.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from modules.app.errors import RequestError
from modules.generation.pipeline import Result, sampling_steps
from modules.generation.request import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_SEED, GenerationRequest
from modules.images import grids, storage
from modules.images.grids import GridAnnotation
from modules.images.infotext import format_params_line
from modules.postprocess.upscalers import find_latent_mode
from modules.scripts.base import Arg, Script
from modules.service.jobs import Job

TITLE = "X/Y/Z plot"
AXIS_NAMES = ("X", "Y", "Z")
# A range longer than this is surely a typo; the grid's own size limit comes later.
MAX_RANGE = 10_000


def _field(name: str, **also) -> Callable:
    return lambda request, value, values: request.replace(**{name: value}, **also)


def _prompt_sr(request, value, values):
    """A1111's Prompt S/R: the first value, found in the prompts, replaced by this one."""
    return request.replace(prompt=request.prompt.replace(values[0], value),
                           negative_prompt=request.negative_prompt.replace(values[0], value))


def _check_prompt_sr(ctx, request, values):
    if values[0] not in request.prompt and values[0] not in request.negative_prompt:
        raise RequestError(f"{values[0]!r} is in neither the prompt nor the negative prompt; the first value is "
                           "the text to replace")


def _style_names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _styles(request, value, values):
    return request.replace(styles=tuple(request.styles) + _style_names(value))


def _check_styles(ctx, request, values):
    ctx.styles.find([name for value in values for name in _style_names(value)])


def _no_refiner(value: str) -> bool:
    return value.strip().lower() in ("", "none")


def _refiner(request, value, values):
    return request.replace(refiner_checkpoint=None if _no_refiner(value) else value)


def _check_checkpoints(ctx, request, values):
    for value in values:
        if not _no_refiner(value):
            ctx.models.find_checkpoint(value)


def _check_upscalers(ctx, request, values):
    for value in values:
        if find_latent_mode(value) is None:
            ctx.upscalers.find(value)


def _file_name(value: str) -> str:
    return PurePath(value).name


def _shown(value) -> str:
    if isinstance(value, tuple):  # a size
        return f"{value[0]}x{value[1]}"
    return str(round(value, 8)) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Axis:
    """One kind of axis: how its values are read (`kind`: int, float, text, size; none for
    Nothing), how one is written into a request (given the axis' whole list too), how its
    legend shows it, and what must exist for its values (`check`: ctx, request, values)."""

    label: str
    kind: str
    apply: Callable[[GenerationRequest, object, list], GenerationRequest]
    show: Callable[[object], str] = _shown
    labelled: bool = True  # the legend says "label: value", else only the value
    check: Callable | None = None
    cost: float = 0.0  # A1111's: the costliest axis (a checkpoint load) changes least often
    txt2img_only: bool = False  # the hires fix's

    def legend(self, value) -> str:
        if value is None:
            return ""
        return f"{self.label}: {self.show(value)}" if self.labelled else self.show(value)


# A1111's axes in its order (Size and Hires upscale are ours). A1111's VAE axis is left out: the
# VAE is a server setting (ctx.settings.sd_vae) that the pipeline reads for every job, not a
# field of the request.
AXES: tuple[Axis, ...] = (
    Axis("Nothing", "none", lambda request, value, values: request),
    Axis("Seed", "int", _field("seed")),
    Axis("Var. seed", "int", _field("subseed", seed_enable_extras=True)),
    Axis("Var. strength", "float", _field("subseed_strength", seed_enable_extras=True)),
    Axis("Steps", "int", _field("steps")),
    Axis("Hires steps", "int", _field("hr_second_pass_steps"), txt2img_only=True),
    Axis("CFG Scale", "float", _field("cfg_scale")),
    Axis("Size", "size", lambda request, value, values: request.replace(width=value[0], height=value[1])),
    Axis("Prompt S/R", "text", _prompt_sr, labelled=False, check=_check_prompt_sr),
    Axis("Sampler", "text", _field("sampler_name"), labelled=False),
    Axis("Checkpoint name", "text", _field("checkpoint"), show=_file_name, labelled=False, check=_check_checkpoints,
         cost=1.0),
    Axis("Schedule type", "text", _field("scheduler")),
    Axis("Clip skip", "int", _field("clip_skip")),
    Axis("Denoising", "float", _field("denoising_strength")),
    Axis("Hires upscaler", "text", _field("hr_upscaler"), check=_check_upscalers, txt2img_only=True),
    # A size to resize to would win over the scale, so a scale axis clears it.
    Axis("Hires upscale", "float", _field("hr_scale", hr_resize_x=0, hr_resize_y=0), txt2img_only=True),
    Axis("Styles", "text", _styles, check=_check_styles),
    Axis("Refiner checkpoint", "text", _refiner, show=_file_name, labelled=False, check=_check_checkpoints, cost=1.0),
    Axis("Refiner switch at", "float", _field("refiner_switch_at")),
)
AXIS = {axis.label: axis for axis in AXES}

_INT, _FLOAT = r"\d+", r"\d+(?:\.\d*)?"


def _range(number: str) -> re.Pattern:
    """A1111's `start-end`, `start-end (+step)` and `start-end [count]`."""
    signed = rf"[+-]?\s*{number}"
    return re.compile(rf"\s*({signed})\s*-\s*({signed})\s*(?:\(\s*({signed})\s*\)|\[\s*(\d+)\s*\])?\s*")


_INT_RANGE, _FLOAT_RANGE = _range(_INT), _range(_FLOAT)
_SIZE = re.compile(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", re.IGNORECASE)


def _number(text: str, kind: type):
    return kind(text.replace(" ", ""))


def _int_range(start: int, end: int, step: int | None) -> list[int]:
    """start, start + step, ... up to and with `end` where the steps land on it (step 1 or -1,
    towards `end`, when not given)."""
    step = step if step is not None else (1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"a step of {step} never goes from {start} to {end}")
    if abs(end - start) // abs(step) >= MAX_RANGE:
        raise ValueError(f"more than {MAX_RANGE} values")
    return list(range(start, end + (1 if step > 0 else -1), step))


def _float_range(start: float, end: float, step: float | None) -> list[float]:
    step = step if step is not None else (1.0 if end >= start else -1.0)
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"a step of {step} never goes from {start} to {end}")
    # The tolerance keeps `end` when float rounding puts it a hair past; rounding keeps 0.1 + 2 x 0.1 at 0.3.
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_RANGE:
        raise ValueError(f"more than {MAX_RANGE} values")
    return [round(start + i * step, 10) for i in range(count)]


def _spread(start, end, count: int, kind: type) -> list:
    """A1111's `[count]`: evenly spaced from start to end; whole numbers truncated as A1111's int()."""
    if not 1 <= count <= MAX_RANGE:
        raise ValueError(f"a count must be from 1 to {MAX_RANGE}, got {count}")
    return [kind(v) for v in np.linspace(start, end, count).tolist()]


def _read(item: str, kind: str) -> list:
    """One comma-separated item of an axis' values, as the values it stands for."""
    if kind == "size":
        match = _SIZE.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not a size such as 512x768")
        return [(int(match[1]), int(match[2]))]
    number = int if kind == "int" else float
    match = (_INT_RANGE if kind == "int" else _FLOAT_RANGE).fullmatch(item)
    if match is not None:
        start, end = _number(match[1], number), _number(match[2], number)
        if match[4] is not None:
            return _spread(start, end, int(match[4]), number)
        step = _number(match[3], number) if match[3] is not None else None
        return (_int_range if kind == "int" else _float_range)(start, end, step)
    try:
        value = _number(item, number)
    except ValueError:
        raise ValueError(f"{item!r} is not a {'whole number' if kind == 'int' else 'number'} or a range "
                         "such as 1-5, 1-10 (+2) or 10-30 [5]") from None
    if not math.isfinite(value):
        raise ValueError(f"{item!r} is not a finite number")
    return [value]


def parse_values(axis: Axis, text: str, name: str = "X") -> list:
    """The values an axis' text stands for, in A1111's syntax: items separated by commas (in
    quotes when they hold one, as csv reads them); for numbers, ranges `1-5` (every whole number),
    `1-10 (+2)` (by a step), `10-30 [5]` (that many, evenly spaced), and `1.0-2.0 [3]` for
    fractions; sizes as 512x768. Nothing has the one value None. RequestError naming the axis."""
    if axis.kind == "none":
        return [None]
    items = [item.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for item in row]
    if axis.kind != "text":  # a stray comma between numbers is no value; in text it may replace with nothing
        items = [item for item in items if item]
    try:
        values = [v for item in items for v in _read(item, axis.kind)] if axis.kind != "text" else items
    except ValueError as e:
        raise RequestError(f"{TITLE}: {name} values ({axis.label}): {e}") from None
    if not values:
        raise RequestError(f"{TITLE}: {name} values ({axis.label}): give at least one value")
    return values


def _fixed_seeds(axis: Axis, values: list) -> list:
    """A1111: a -1 on a seed axis becomes one random seed, the same for the whole plot."""
    if axis.label not in ("Seed", "Var. seed"):
        return values
    rng = random.SystemRandom()
    return [rng.randrange(0, MAX_SEED - MAX_BATCH_COUNT * MAX_BATCH_SIZE) if v == -1 else v for v in values]


def processing_order(costs: Sequence[float], counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(ix, iy, iz) of every cell in the order A1111 makes them: Z outermost, then Y, X innermost,
    unless one axis costs more than both others (a checkpoint), which then goes outermost."""
    cx, cy, cz = costs
    outer, middle = 2, 1
    if cx > cy and cx > cz:
        outer, middle = 0, (1 if cy > cz else 2)
    elif cy > cx and cy > cz:
        outer, middle = 1, (0 if cx > cz else 2)
    elif cz > cx and cz > cy:
        outer, middle = 2, (0 if cx > cy else 1)
    inner = 3 - outer - middle
    order = []
    for a, b, c in itertools.product(range(counts[outer]), range(counts[middle]), range(counts[inner])):
        index = [0, 0, 0]
        index[outer], index[middle], index[inner] = a, b, c
        order.append(tuple(index))
    return order


def run_cells(ctx, cells: Sequence[GenerationRequest], order: Sequence[int], job: Job, generate: Callable,
              save: bool | None) -> dict[int, Result]:
    """Generates cells[i] for each i in `order` on one job until it is interrupted; the results
    that have pictures, by index. The job's total is every cell's steps, set before the first."""
    job.total_steps = job.step + sum(cell.batch_count * sampling_steps(cell) for cell in cells)
    made: dict[int, Result] = {}
    for index in order:
        if job.interrupted:
            break
        result = generate(ctx, cells[index], job=job, save=save)
        if result.images:
            made[index] = result
    return made


def cell_picture(result: Result):
    """A cell's picture: its one picture, or a grid of its batch's (as A1111 shows it)."""
    return result.images[0] if len(result.images) == 1 else grids.image_grid(result.images)


def _checked(ctx, request: GenerationRequest, axis: Axis, values: list, name: str) -> None:
    """RequestError naming the axis unless each of its values makes a valid request."""
    where = f"{TITLE}: {name} values ({axis.label})"
    if axis.txt2img_only and request.mode != "txt2img":
        raise RequestError(f"{TITLE}: {name} type {axis.label} is for txt2img (the hires fix)")
    try:
        if axis.check is not None:
            axis.check(ctx, request, values)
        for value in values:
            axis.apply(request, value, values).validate()
    except (LookupError, ValueError) as e:
        raise RequestError(f"{where}: {e}") from None


def _cells(request: GenerationRequest, axes: Sequence[Axis], lists: Sequence[list], legends) -> list[GenerationRequest]:
    """Every cell's request, validated, at A1111's index ix + iy*nx + iz*nx*ny; the axes are
    written in X, Y, Z order. RequestError naming the cell's values for one that is invalid."""
    nx, ny, nz = map(len, lists)
    cells = []
    for iz, iy, ix in itertools.product(range(nz), range(ny), range(nx)):
        cell = request
        for axis, vs, i in zip(axes, lists, (ix, iy, iz)):
            cell = axis.apply(cell, vs[i], vs)
        try:
            cells.append(cell.validate())
        except ValueError as e:
            where = ", ".join(filter(None, (legends[0][ix], legends[1][iy], legends[2][iz])))
            raise RequestError(f"{TITLE}: the cell {where}: {e}") from None
    return cells


def draw_plot(pictures: Sequence, counts: Sequence[int], legends: Sequence[list[str]] | None, margin: int = 0):
    """(the whole grid, the grid of each Z value) of the cells' pictures (None where not made,
    left black), with the X and Y legends and `margin` between cells in each Z grid and the Z
    legends over the whole (no legends, and no margin, without `legends`, as A1111)."""
    nx, ny, nz = counts
    cell_size = (max(p.width for p in pictures if p), max(p.height for p in pictures if p))
    sub_grids = []
    for iz in range(nz):
        grid = grids.image_grid(pictures[iz * nx * ny:(iz + 1) * nx * ny], rows=ny, size=cell_size)
        if legends:
            grid = grids.draw_grid_annotations(grid, *cell_size, [[GridAnnotation(t)] for t in legends[0]],
                                               [[GridAnnotation(t)] for t in legends[1]], margin)
        sub_grids.append(grid)
    main = grids.image_grid(sub_grids, rows=1)
    if legends:
        main = grids.draw_grid_annotations(main, *sub_grids[0].size, [[GridAnnotation(t)] for t in legends[2]],
                                           [[GridAnnotation()]])
    return main, sub_grids


class XYZPlot(Script):
    title = TITLE
    args = (
        *(arg for name, default in zip(AXIS_NAMES, ("Seed", "Nothing", "Nothing")) for arg in (
            Arg(f"{name} type", "dropdown", default, choices=tuple(AXIS)),
            Arg(f"{name} values", "text", "", info="1,2,3 or 1-5, 1-10 (+2), 10-30 [5]; text with commas in quotes"),
        )),
        Arg("Draw legend", "checkbox", True),
        Arg("Include Sub Images", "checkbox", False),
        Arg("Include Sub Grids", "checkbox", False),
        Arg("Keep -1 for seeds", "checkbox", False),
        Arg("Grid margins (px)", "slider", 0, 0, 500, 2),
    )

    def values(self, given):
        """As every script's, and the axes' values read, so that a typo is refused before the job queues."""
        values = super().values(given)
        for name in AXIS_NAMES:
            parse_values(AXIS[values[f"{name} type"]], values[f"{name} values"], name)
        return values

    def run(self, ctx, request, values, job, generate, save):
        keep_random = values["Keep -1 for seeds"]
        if not keep_random:  # A1111's fix_seed: every cell gets the same seed
            request = request.with_seed_resolved()
        axes = [AXIS[values[f"{name} type"]] for name in AXIS_NAMES]
        lists = [parse_values(axis, values[f"{name} values"], name) for axis, name in zip(axes, AXIS_NAMES)]
        if not keep_random:
            lists = [_fixed_seeds(axis, vs) for axis, vs in zip(axes, lists)]
        for axis, vs, name in zip(axes, lists, AXIS_NAMES):
            _checked(ctx, request, axis, vs, name)
        nx, ny, nz = map(len, lists)
        legends = [[axis.legend(v) for v in vs] for axis, vs in zip(axes, lists)]

        cells = _cells(request, axes, lists, legends)
        sizes = [c.hr_target_size() if c.enable_hr else (c.width, c.height) for c in cells]
        problem = grids.grid_size_problem(len(cells) * request.batch_count * request.batch_size,
                                          max(w for w, _ in sizes), max(h for _, h in sizes))
        if problem:
            raise RequestError(f"{TITLE}: {problem}")

        order = [ix + iy * nx + iz * nx * ny for ix, iy, iz in processing_order([a.cost for a in axes], (nx, ny, nz))]
        made = run_cells(ctx, cells, order, job, generate, save)
        if not made:
            return Result(request=cells[0], interrupted=True)

        pictures = [cell_picture(made[i]) if i in made else None for i in range(len(cells))]
        main, sub_grids = draw_plot(pictures, (nx, ny, nz), legends if values["Draw legend"] else None,
                                    values["Grid margins (px)"])

        # A grid's text is its first cell's, with the axes as A1111 writes them.
        def axes_params(names):
            params = {"Script": TITLE}
            for axis, vs, name in zip(axes, lists, AXIS_NAMES):
                if name in names and axis.kind != "none":
                    params[f"{name} Type"] = axis.label
                    params[f"{name} Values"] = values[f"{name} values"]
                    if axis.label in ("Seed", "Var. seed") and not keep_random:
                        params[f"Fixed {name} Values"] = ", ".join(map(str, vs))
            return params

        def first_of(indices):
            return made[next((i for i in indices if i in made), min(made))]

        grid_sources = [first_of(range(len(cells)))]
        grid_texts = [f"{grid_sources[0].infotexts[0]}, {format_params_line(axes_params('XYZ'))}"]
        for iz in range(nz):
            source = first_of(range(iz * nx * ny, (iz + 1) * nx * ny))
            grid_sources.append(source)
            grid_texts.append(f"{source.infotexts[0]}, {format_params_line(axes_params('XY'))}")

        shown = [0] + (list(range(1, nz + 1)) if values["Include Sub Grids"] else [])
        result = Result(request=grid_sources[0].request,
                        interrupted=job.interrupted or any(r.interrupted for r in made.values()))
        grid_images = [main, *sub_grids]
        if ctx.settings.save_images if save is None else save:
            # A1111 saves the sub-grids too when they are shown and there are several.
            for g in (shown if nz > 1 else [0]):
                source = grid_sources[g]
                result.paths.append(storage.save_grid(grid_images[g], ctx.paths.outputs, source.request.mode,
                                                      seed=source.seeds[0], prompt=source.request.prompt,
                                                      infotext=grid_texts[g]))
        for g in shown:
            result.images.append(grid_images[g])
            result.infotexts.append(grid_texts[g])
            result.seeds.append(grid_sources[g].seeds[0])
        for index in sorted(made):
            if values["Include Sub Images"]:
                result.images.append(pictures[index])
                result.infotexts.append(made[index].infotexts[0])
                result.seeds.append(made[index].seeds[0])
            result.paths.extend(made[index].paths)
        return result
