"""X/Y/Z plot: A1111's value syntax, the grid (cells equal single runs bit for bit, legends drawn
where they belong), values refused before any cell runs, interrupt, progress, the API and the
saved grid."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFont

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.images import grids, storage
from modules.images.grids import GridAnnotation
from modules.images.infotext import parse_infotext
from modules.scripts.library import ScriptLibrary
from modules.scripts.xyz_plot import AXIS, XYZPlot, parse_values, processing_order
from modules.service.jobs import Job

PROMPT = "a large red star in the top left corner on a blue background"
REQUEST = GenerationRequest(prompt=PROMPT, steps=2, width=64, height=64, seed=11)
LIBRARY = ScriptLibrary([XYZPlot()])
# X: Steps 2, 3; Y: CFG 3, 5, 7; every cell also returned (Include Sub Images).
STEPS_BY_CFG = ["Steps", "2,3", "CFG Scale", "3-7 [3]", "Nothing", "", True, True, False, False, 0]


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def plot(ctx, args, request=REQUEST, save=False, job=None):
    return ctx.jobs.run(job or Job(), LIBRARY.job(ctx, request.mode, "X/Y/Z plot", args), ctx, request, save=save)


def run_direct(ctx, args, request=REQUEST, after_each=None, calls=None):
    """The script's run with a generate that records the job's total in `calls` at each call;
    `after_each(job, calls)` runs after every cell."""
    script = XYZPlot()
    job, calls = Job(), ([] if calls is None else calls)

    def generate(ctx, cell, job, save):
        calls.append(job.total_steps)
        result = pipeline.generate(ctx, cell, job=job, save=save)
        if after_each:
            after_each(job, calls)
        return result

    return script.run(ctx, request, script.values(args), job, generate, False), job, calls


@pytest.mark.parametrize(("axis", "text", "values"), [
    ("Steps", "2,3", [2, 3]),
    ("Steps", "1-5", [1, 2, 3, 4, 5]),
    ("Steps", "1-10 (+2)", [1, 3, 5, 7, 9]),
    ("Steps", "10-30 [5]", [10, 15, 20, 25, 30]),
    ("Steps", "1-2 [3]", [1, 1, 2]),  # A1111 truncates the spaced values
    ("Steps", "5-1", [5, 4, 3, 2, 1]),
    ("Steps", "10-1 (-3)", [10, 7, 4, 1]),
    ("Steps", " 4 , 1-3, 8", [4, 1, 2, 3, 8]),
    ("Steps", "2,3,", [2, 3]),
    ("Seed", "-1, -5--3", [-1, -5, -4, -3]),
    ("CFG Scale", "1.0-2.0 [3]", [1.0, 1.5, 2.0]),
    ("CFG Scale", "3-7 [3]", [3.0, 5.0, 7.0]),
    ("CFG Scale", "1-2 (+0.5)", [1.0, 1.5, 2.0]),
    ("CFG Scale", "0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
    ("CFG Scale", "0-1 (+0.3)", [0.0, 0.3, 0.6, 0.9]),
    ("CFG Scale", "7, 7.5", [7.0, 7.5]),
    ("Var. strength", "0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("Size", "64x64, 128 X 96", [(64, 64), (128, 96)]),
    ("Prompt S/R", 'red, "green, with dots", ', ["red", "green, with dots", ""]),
    ("Sampler", "Euler a, DPM++ 2M", ["Euler a", "DPM++ 2M"]),
    ("Nothing", "whatever", [None]),
])
def test_values_are_read_in_a1111s_syntax(axis, text, values):
    assert parse_values(AXIS[axis], text) == values


@pytest.mark.parametrize(("axis", "text", "message"), [
    ("Steps", "2, 2.5", "X values (Steps): '2.5' is not a whole number"),
    ("Steps", "three", "'three' is not a whole number or a range"),
    ("Steps", "1-5 (-1)", "a step of -1 never goes from 1 to 5"),
    ("CFG Scale", "nan", "'nan' is not a finite number"),
    ("Size", "64", "'64' is not a size such as 512x768"),
    ("Steps", " , ", "give at least one value"),
])
def test_values_that_cannot_be_read_are_refused_naming_the_axis(axis, text, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_values(AXIS[axis], text)


def test_costly_axes_change_least_often():
    # A1111's order: Z outermost, X innermost ...
    assert processing_order([0, 0, 0], (2, 2, 1)) == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    # ... unless one axis (a checkpoint) costs more than the others.
    assert processing_order([1.0, 0, 0], (2, 2, 1)) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_the_grid_is_six_single_runs_with_legends(builtin_ctx):
    result = plot(builtin_ctx, STEPS_BY_CFG)
    singles = [pipeline.generate(builtin_ctx, REQUEST.replace(steps=steps, cfg_scale=cfg), save=False)
               for cfg in (3.0, 5.0, 7.0) for steps in (2, 3)]  # A1111's order: X within Y
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 6 and len(result.infotexts) == 7
    for cell, single in zip(cells, singles):
        assert np.array_equal(pixels(cell), pixels(single.images[0]))
    assert result.infotexts[1:] == [s.infotexts[0] for s in singles]

    # The cells sit at the bottom right, the labels take the rest.
    pad_left, pad_top = grid.width - 2 * 64, grid.height - 3 * 64
    assert pad_left == 64 * 3 // 4 and pad_top > 0
    for i, cell in enumerate(cells):
        x, y = pad_left + 64 * (i % 2), pad_top + 64 * (i // 2)
        assert np.array_equal(pixels(grid.crop((x, y, x + 64, y + 64))), pixels(cell))

    # The legends are the text drawn for these labels, each over its own column and row.
    hor = [[GridAnnotation("Steps: 2")], [GridAnnotation("Steps: 3")]]
    ver = [[GridAnnotation(f"CFG Scale: {c}")] for c in (3.0, 5.0, 7.0)]
    black = Image.new("RGB", (2 * 64, 3 * 64))
    expected = pixels(grids.draw_grid_annotations(black, 64, 64, hor, ver))
    got = pixels(grid)
    assert np.array_equal(got[:pad_top], expected[:pad_top]) and np.array_equal(got[:, :pad_left], expected[:, :pad_left])
    swapped = pixels(grids.draw_grid_annotations(black, 64, 64, hor[::-1], ver))
    column = np.s_[:pad_top, pad_left:pad_left + 64]
    assert not np.array_equal(got[column], swapped[column])
    assert (got[column] < 100).all(axis=-1).sum() > 20  # dark text on white

    # The grid's text is the first cell's with the axes, as A1111 writes it.
    assert result.infotexts[0] == (singles[0].infotexts[0] + ', Script: X/Y/Z plot, X Type: Steps, X Values: "2,3", '
                                   "Y Type: CFG Scale, Y Values: 3-7 [3]")
    assert parse_infotext(result.infotexts[0])[2]["X Values"] == "2,3"


def test_legends_use_a_truetype_font_and_wrap_long_labels():
    assert isinstance(grids.font(20), ImageFont.FreeTypeFont)
    typeface = grids.font(12)
    lines = grids.wrap("Prompt S/R: a very long replacement text", typeface, 64)
    assert len(lines) > 2 and all(typeface.getlength(line) <= 64 for line in lines if " " in line)
    assert " ".join(lines) == "Prompt S/R: a very long replacement text"
    black = Image.new("RGB", (64, 64))
    short = grids.draw_grid_annotations(black, 64, 64, [[GridAnnotation("a")]], [[GridAnnotation()]])
    long = grids.draw_grid_annotations(black, 64, 64, [[GridAnnotation(" ".join(lines))]], [[GridAnnotation()]])
    assert short.width == long.width == 64 and long.height > short.height


def test_z_values_make_sub_grids_side_by_side(builtin_ctx):
    args = ["Seed", "1,2", "Nothing", "", "Steps", "1,2", True, False, True, False, 4]
    result = plot(builtin_ctx, args, REQUEST.replace(steps=1))
    main, subs = result.images[0], result.images[1:]
    assert len(subs) == 2 and len(result.infotexts) == 3 and subs[0].size == subs[1].size
    pad_top = main.height - subs[0].height
    assert main.width == 2 * subs[0].width and pad_top > 0
    for i, sub in enumerate(subs):
        assert np.array_equal(pixels(main.crop((i * sub.width, pad_top, (i + 1) * sub.width, main.height))), pixels(sub))
    # The margin lies between the X cells of a sub-grid.
    assert subs[0].width == 2 * 64 + 4
    assert "Z Type: Steps" in result.infotexts[0] and "Z Type" not in result.infotexts[1]
    assert "Fixed X Values: \"1, 2\"" in result.infotexts[0] and "Steps: 2" in result.infotexts[2]


def test_a_random_seed_is_fixed_once_unless_kept(builtin_ctx):
    args = ["Steps", "1,2", "Nothing", "", "Nothing", "", True, True, False]
    shared = plot(builtin_ctx, args + [False], REQUEST.replace(seed=-1))
    assert shared.seeds[1] == shared.seeds[2] != -1
    kept = plot(builtin_ctx, args + [True], REQUEST.replace(seed=-1))
    assert kept.seeds[1] != kept.seeds[2]
    fixed = plot(builtin_ctx, ["Seed", "-1, 5", "Nothing", "", "Nothing", "", True, True], REQUEST.replace(steps=1))
    assert fixed.seeds[1] != -1 and fixed.seeds[2] == 5 and f"Fixed X Values: \"{fixed.seeds[1]}, 5\"" in fixed.infotexts[0]


@pytest.mark.parametrize(("args", "request_", "message"), [
    (["Sampler", "Euler a, Eulr"], REQUEST, r"X/Y/Z plot: X values \(Sampler\): Unknown sampler 'Eulr'"),
    (["Steps", "2", "Checkpoint name", "builtin-shapes, nope"], REQUEST,
     r"Y values \(Checkpoint name\): Checkpoint 'nope' not found"),
    (["Steps", "2", "Nothing", "", "Refiner checkpoint", "None, nope"], REQUEST,
     r"Z values \(Refiner checkpoint\): Checkpoint 'nope' not found"),
    (["Steps", "2, 0"], REQUEST, r"X values \(Steps\): steps must be a whole number from 1 to 150, got 0"),
    (["Prompt S/R", "green, blue"], REQUEST, r"X values \(Prompt S/R\): 'green' is in neither the prompt"),
    (["Styles", "no such style"], REQUEST, r"X values \(Styles\): styles: no style named 'no such style'"),
    (["Hires upscaler", "Latent, Lanczoz"], REQUEST, r"X values \(Hires upscaler\): .*Lanczoz"),
    (["Size", "64x64, 68x64"], REQUEST, r"X values \(Size\): width must be a multiple of 8, got 68"),
    (["Hires steps", "2"], Img2ImgRequest(init_images=(Image.new("RGB", (64, 64)),), width=64, height=64),
     r"X type Hires steps is for txt2img"),
    (["Steps", "1, 2", "Sampler", "Euler a, DPM fast"], REQUEST,
     r"the cell Steps: 1, DPM fast: DPM fast needs at least 2 steps"),
])
def test_bad_values_are_refused_before_any_cell_runs(builtin_ctx, args, request_, message):
    calls = []
    with pytest.raises(RequestError, match=message):
        run_direct(builtin_ctx, args, request_.validate(), calls=calls)
    assert calls == []


def test_values_are_read_before_the_job_queues(builtin_ctx):
    with pytest.raises(RequestError, match=r"X/Y/Z plot: Y values \(CFG Scale\): 'high' is not a number"):
        LIBRARY.job(builtin_ctx, "txt2img", "X/Y/Z plot", ["Steps", "2", "CFG Scale", "3, high"])


def test_interrupt_keeps_the_cells_made(builtin_ctx):
    result, job, calls = run_direct(builtin_ctx, STEPS_BY_CFG, after_each=lambda job, calls: job.interrupt())
    assert len(calls) == 1 and result.interrupted
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 1 and len(result.infotexts) == 2
    single = pipeline.generate(builtin_ctx, REQUEST.replace(steps=2, cfg_scale=3.0), save=False).images[0]
    assert np.array_equal(pixels(cells[0]), pixels(single))
    # The grid keeps its layout: the made cell in its place, the others black.
    full = plot(builtin_ctx, STEPS_BY_CFG).images[0]
    assert grid.size == full.size
    pad_left, pad_top = grid.width - 2 * 64, grid.height - 3 * 64
    assert np.array_equal(pixels(grid.crop((pad_left, pad_top, pad_left + 64, pad_top + 64))), pixels(single))
    assert not pixels(grid.crop((pad_left + 64, pad_top, grid.width, grid.height))).any()


def test_progress_counts_every_cell(builtin_ctx):
    result, job, calls = run_direct(builtin_ctx, ["Steps", "2,3", "Nothing", "", "Nothing", "", True, True],
                                    REQUEST.replace(batch_count=2))
    assert calls == [(2 + 3) * 2] * 2 and job.step == job.total_steps == 10
    # A cell of several pictures shows them as one grid, as A1111.
    assert [i.size for i in result.images[1:]] == [(128, 64), (128, 64)]


def test_the_api_runs_the_plot_and_the_grid_is_saved_with_its_text(builtin_ctx):
    app = FastAPI()
    routes.install(app, builtin_ctx, scripts=LIBRARY)
    http = TestClient(app)
    folder = storage.dated_dir(builtin_ctx.paths.outputs, "txt2img", grid=True)
    before = set(folder.glob("*.png")) if folder.is_dir() else set()
    body = {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64, "seed": 3, "save_images": True,
            "script_name": "x/y/z plot", "script_args": ["Seed", "3,4", "Steps", "1,2"]}
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in answer.json()["images"]]
    infotexts = json.loads(answer.json()["info"])["infotexts"]
    assert len(images) == 1 and images[0].size == plot(builtin_ctx, body["script_args"], REQUEST.replace(seed=3)).images[0].size
    assert "Script: X/Y/Z plot, X Type: Seed" in infotexts[0]
    saved = set(folder.glob("*.png")) - before
    assert len(saved) == 1
    grid_file = Image.open(saved.pop())
    assert grid_file.info["parameters"] == infotexts[0] and grid_file.size == images[0].size
    assert np.array_equal(pixels(grid_file), pixels(images[0]))

    refused = http.post("/sdapi/v1/txt2img", json={**body, "script_args": ["Sampler", "Eulr"]})
    assert refused.status_code == 422 and "X values (Sampler)" in refused.json()["detail"]


def test_img2img_plots_too_and_saves_in_img2img_grids(builtin_ctx):
    start = Image.new("RGB", (64, 64), (30, 60, 200))
    request = Img2ImgRequest(prompt=PROMPT, init_images=(start,), steps=4, width=64, height=64, seed=5).validate()
    result = plot(builtin_ctx, ["Denoising", "0.5, 0.75", "Nothing", "", "Nothing", "", True, True], request, save=True)
    for cell, strength in zip(result.images[1:], (0.5, 0.75)):
        single = pipeline.generate(builtin_ctx, request.replace(denoising_strength=strength), save=False).images[0]
        assert np.array_equal(pixels(cell), pixels(single))
    grid_path, *cell_paths = result.paths
    assert grid_path.parent.parent.name == "img2img-grids" and len(cell_paths) == 2
    assert Image.open(grid_path).info["parameters"] == result.infotexts[0]
