"""SD upscale: A1111's tiling (split_grid) and blending (combine_grid), the upscaled size, the
tiles' seeds, what denoising 0 gives back, seamless overlaps, Interrupt, and the API."""

import base64
import io
import json
import math

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.sampling.schedules import img2img_steps
from modules.scripts.sd_upscale import Grid, SdUpscale, combine_grid, edges, split_grid, upscaled_size
from modules.service.jobs import Job

STAR = "a large red star on a blue background"
CIRCLE = "a small yellow circle on a green background"


@pytest.fixture(scope="module")
def source(builtin_ctx):
    made = pipeline.generate(builtin_ctx, GenerationRequest(prompt=STAR, steps=6, width=64, height=64, seed=3), save=False)
    return made.images[0]


def request(source, **changes):
    return Img2ImgRequest(**{"prompt": STAR, "steps": 4, "width": 64, "height": 64, "seed": 7, "init_images": (source,),
                             "denoising_strength": 0.75, **changes})


def run(ctx, req, args, job=None, calls=None):
    """The script's job, with the generations it asks for noted in `calls` as (request, pictures)."""
    def generate(ctx, r, job, save):
        made = pipeline.generate(ctx, r, job=job, save=save)
        if calls is not None:
            calls.append((r, made.images))
        return made

    script = SdUpscale()
    return script.run(ctx, req, script.values(args), job or Job(), generate, save=False)


def a1111_edges(size, tile, overlap):
    """A1111's split_grid along one side, as it computes it."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return tuple(size - tile if int(i * step) + tile >= size else int(i * step) for i in range(count))


def pixels(image):
    return np.asarray(image).astype(float)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(128, 64, 16), (96, 64, 32), (1024, 512, 64), (1536, 512, 64),
                                                       (200, 64, 0), (64, 64, 32), (1000, 768, 256)])
def test_tiles_lie_where_a1111_puts_them(size, tile, overlap):
    starts = edges(size, tile, overlap)
    assert starts == a1111_edges(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_split_then_combine_gives_the_picture_back():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (136, 200, 3), dtype=np.uint8))
    for overlap in (0, 16):
        grid, tiles = split_grid(picture, 64, 48, overlap)
        assert grid.count == len(tiles) == len(edges(200, 64, overlap)) * len(edges(136, 48, overlap))
        assert np.array_equal(np.asarray(combine_grid(grid, tiles)), np.asarray(picture))


def test_overlaps_fade_from_one_tile_to_the_next():
    grid = Grid(112, 64, 64, 64, 16, (0, 48), (0,))
    left, right = Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (160, 80, 16))
    row = np.asarray(combine_grid(grid, [left, right]))[10, :, 0]
    # The left tile alone, then over the 16 columns of overlap the right one in by 0/16, 1/16, ...
    assert list(row[:48]) == [0] * 48 and list(row[48:64]) == [10 * i for i in range(16)] and list(row[64:]) == [160] * 48


def test_size_tiles_seeds_and_infotext_as_a1111(builtin_ctx, source):
    calls, job = [], Job()
    req = request(source, batch_size=2, batch_count=2)
    result = run(builtin_ctx, req, [32, "Lanczos", 1.5], job, calls)
    # 64 px x 1.5 = 96 px, cut into 2 x 2 tiles of 64 px; 2 tiles a batch; picture n from seed 7 + n.
    assert [image.size for image in result.images] == [upscaled_size(64, 64, 1.5)] * 2 == [(96, 96)] * 2
    assert [(r.seed, r.batch_size, r.width, r.height) for r, _ in calls] == [(7, 2, 64, 64), (8, 2, 64, 64),
                                                                            (8, 2, 64, 64), (9, 2, 64, 64)]
    assert result.seeds == [7, 8] and job.step == job.total_steps == 4 * img2img_steps(4, 0.75)
    for infotext, seed in zip(result.infotexts, (7, 8)):
        assert f"Seed: {seed}, Size: 64x64" in infotext and "Denoising strength: 0.75" in infotext
        assert infotext.endswith("SD upscale overlap: 32, SD upscale upscaler: Lanczos")
    # The first picture is its redrawn tiles blended together; each tile is what a single img2img
    # run makes of it with the seed A1111 gives it (a batch's sums may round a pixel one level apart).
    upscaled = builtin_ctx.upscalers.upscale(source, "Lanczos", 96, 96)
    grid, tiles = split_grid(upscaled, 64, 64, 32)
    redrawn = [image for r, images in calls[:2] for image in images]
    assert [pixels(t).tolist() for r, _ in calls[:2] for t in r.init_images] == [pixels(t).tolist() for t in tiles]
    assert np.array_equal(pixels(result.images[0]), pixels(combine_grid(grid, redrawn)))
    singles = [pipeline.generate(builtin_ctx, req.replace(init_images=(tile,), batch_size=1, batch_count=1, seed=seed),
                                 save=False).images[0] for tile, seed in zip(tiles, (7, 8, 8, 9))]
    assert all(np.abs(pixels(a) - pixels(b)).max() <= 1 for a, b in zip(redrawn, singles))


def test_denoising_zero_gives_the_upscaled_picture_back_through_the_vae(builtin_ctx, source):
    req = request(source, denoising_strength=0.0)
    result = run(builtin_ctx, req, [16, "Lanczos", 2.0])
    upscaled = builtin_ctx.upscalers.upscale(source, "Lanczos", 128, 128)
    grid, tiles = split_grid(upscaled, 64, 64, 16)
    assert grid.count == 9  # ceil((128 - 16) / (64 - 16)) = 3 a side
    # Exactly: each tile through the VAE (strength 0), blended back together.
    round_trips = [pipeline.generate(builtin_ctx, req.replace(init_images=(t,)), save=False).images[0] for t in tiles]
    assert np.array_equal(pixels(result.images[0]), pixels(combine_grid(grid, round_trips)))
    # And so as near the upscaled picture as the VAE brings the whole of it back.
    whole = pipeline.generate(builtin_ctx, req.replace(init_images=(upscaled,), width=128, height=128), save=False).images[0]
    interior = (slice(8, -8), slice(8, -8))
    ours = np.abs(pixels(result.images[0]) - pixels(upscaled))[interior].mean()
    assert ours <= 1.25 * np.abs(pixels(whole) - pixels(upscaled))[interior].mean()


def _seam_bound_holds(out, first, second, start, overlap):
    """Along axis 1: across every column boundary from just before the overlap to its end, `out`
    changes no more than the more changing of the two tiles does there, plus 1/overlap of how far
    the tiles differ in the overlap, plus 1 for rounding. `second` starts at column `start`."""
    def jump(a, x):
        return np.abs(a[:, x + 1] - a[:, x]).mean()

    apart = max(np.abs(first[:, x] - second[:, x - start]).mean() for x in range(start, start + overlap))
    for x in range(start - 1, start + overlap):
        own = max([jump(first, x)] * (x + 1 < first.shape[1]) + [jump(second, x - start)] * (x >= start))
        if jump(out, x) > own + apart / overlap + 1:
            return False
    return True


def test_overlaps_leave_no_seam(builtin_ctx, source):
    calls = []
    result = run(builtin_ctx, request(source, prompt=CIRCLE), [24, "Lanczos", 1.5], calls=calls)
    tiles = [pixels(images[0]) for _, images in calls]
    grid, _ = split_grid(Image.new("RGB", (96, 96)), 64, 64, 24)
    assert (grid.xs, grid.ys) == ((0, 32), (0, 32))
    out = pixels(result.images[0])
    # Where only the first row of tiles lies: the seam between tiles 0 and 1, column by column;
    # where only the first column lies: the seam between tiles 0 and 2, row by row.
    assert _seam_bound_holds(out[:32], tiles[0][:32], tiles[1][:32], 32, 24)
    transposed = [np.swapaxes(a, 0, 1) for a in (out[:, :32], tiles[0][:, :32], tiles[2][:, :32])]
    assert _seam_bound_holds(*transposed, 32, 24)
    # Tiles pasted over each other without the blend do leave a seam that the check sees.
    pasted = pixels(combine_grid(Grid(96, 96, 64, 64, 0, grid.xs, grid.ys), [Image.fromarray(t.astype(np.uint8)) for t in tiles]))
    assert not _seam_bound_holds(pasted[:32], tiles[0][:32], tiles[1][:32], 32, 24)


def test_interrupt_keeps_the_tiles_made(builtin_ctx, source):
    job, calls = Job(), []

    def generate(ctx, r, job, save):
        calls.append(r.seed)
        made = pipeline.generate(ctx, r, job=job, save=save)
        job.interrupt()  # as if pressed during the first tile
        return made

    script = SdUpscale()
    result = script.run(builtin_ctx, request(source, batch_count=2), script.values([32, "Lanczos", 1.5]), job, generate, False)
    assert calls == [7] and result.interrupted and len(result.images) == 1
    # The tiles not redrawn keep the upscaled picture: the corner only the last tile covers.
    upscaled = pixels(builtin_ctx.upscalers.upscale(source, "Lanczos", 96, 96))
    assert np.array_equal(pixels(result.images[0])[64:, 64:], upscaled[64:, 64:])
    assert not np.array_equal(pixels(result.images[0])[:32, :32], upscaled[:32, :32])


def test_upscaler_none_redraws_the_picture_at_its_own_size(builtin_ctx, source):
    result = run(builtin_ctx, request(source, denoising_strength=0.0), [16, "None", 2.0])
    assert result.images[0].size == (64, 64) and "SD upscale upscaler: None" in result.infotexts[0]


@pytest.mark.parametrize(("args", "message"), [
    ([64, "Lanczos", 2.0], r"Tile overlap \(64\) must be smaller than the tiles' sides \(64x64\)"),
    ([16, "Nope", 2.0], "no upscaler 'Nope'; available: None, Lanczos, Nearest"),
    ([16, 99, 2.0], "no upscaler 99"),
])
def test_what_cannot_run_is_refused_before_any_tile(builtin_ctx, source, args, message):
    calls = []
    script = SdUpscale()
    with pytest.raises(RequestError, match=message):
        script.run(builtin_ctx, request(source), script.values(args), Job(), lambda *a, **k: calls.append(a), False)
    assert calls == []
    with pytest.raises(RequestError, match="Scale Factor must be from 1.0 to 4.0"):
        script.values([16, "Lanczos", 5])


def test_api_takes_a1111s_script_args(builtin_ctx, source):
    app = FastAPI()
    routes.install(app, builtin_ctx)
    http = TestClient(app)
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    body = {"prompt": STAR, "steps": 2, "width": 64, "height": 64, "seed": 5, "denoising_strength": 0.5,
            "init_images": [base64.b64encode(buffer.getvalue()).decode()], "script_name": "sd upscale",
            # A1111's arguments: its info text's slot, the overlap, the upscaler (name or index), the scale.
            "script_args": ["", 32, "lanczos", 1.5]}
    answer = http.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    info = json.loads(answer.json()["info"])
    assert picture.size == (96, 96) and info["all_seeds"] == [5] and "SD upscale upscaler: Lanczos" in info["infotexts"][0]
    indexed = http.post("/sdapi/v1/img2img", json={**body, "script_args": [32, 1, 1.5], "send_images": False})
    assert indexed.status_code == 200 and json.loads(indexed.json()["info"])["infotexts"] == info["infotexts"]
    refused = http.post("/sdapi/v1/img2img", json={**body, "script_args": [32, "Nope", 1.5]})
    assert refused.status_code == 422 and "available: None, Lanczos, Nearest" in refused.json()["detail"]
    assert http.post("/sdapi/v1/txt2img", json={"prompt": STAR, "script_name": "SD upscale"}).status_code == 422
