"""Extras: upscaling finished pictures by a factor or to a size, blending a second upscaler,
keeping the source's parameters, saving under outputs/extras-images, and the A1111 API routes."""

from __future__ import annotations

import base64
import io
from datetime import date

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import ExifTags, Image
from safetensors.torch import save_file

from modules.api import routes
from modules.app.config import Flags
from modules.context import AppContext
from modules.images import storage
from modules.images.infotext import format_infotext
from modules.postprocess import extras
from modules.postprocess.extras import ExtrasError, ExtrasInput, ExtrasRequest
from modules.service.jobs import Job
from tests.test_upscalers import tiny_esrgan_state

INFOTEXT = format_infotext("a red circle", "blurry", {"Steps": 4, "Sampler": "Euler a", "Seed": 7, "Size": "64x32"})


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "models" / "ESRGAN").mkdir(parents=True)
    save_file(tiny_esrgan_state(), tmp_path / "models" / "ESRGAN" / "2x-tiny.safetensors")
    return AppContext.create(Flags(data_dir=tmp_path, device="cpu"))


def picture(width=64, height=32, seed=0, infotext: str | None = INFOTEXT) -> Image.Image:
    """A generated-looking picture: PNG with a parameters chunk, opened from bytes as a tab gets it."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.open(io.BytesIO(storage.png_bytes(image, infotext)))


def test_scale_by_saves_with_parameters_and_postprocessing(ctx):
    result = extras.run(ctx, ExtrasRequest(upscaler_1="Lanczos", upscaling_resize=2), [ExtrasInput(picture(), "")])
    line = "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert result.infotexts == [line]
    [path] = result.paths
    assert path == ctx.paths.outputs / "extras-images" / date.today().isoformat() / "00000.png"
    saved = Image.open(path)
    assert saved.size == (128, 64)
    assert saved.info == {"parameters": INFOTEXT, "postprocessing": line, "extras": line}
    assert path.read_bytes() == result.pngs[0]


def test_scale_to_crops_to_fit_or_keeps_the_aspect(ctx):
    source = picture(64, 32)
    cropped = extras.run(ctx, ExtrasRequest(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100, upscaler_1="Nearest"),
                         [ExtrasInput(source)], save=False)
    assert cropped.images[0].size == (100, 100)
    assert cropped.infotexts == ["Postprocess upscale to: 100x100, Postprocess crop to: 100x100, Postprocess upscaler: Nearest"]
    # Nearest by 100/32 = 3.125 then the centre cut: the middle column of the result is source column 32.
    assert np.array_equal(np.asarray(cropped.images[0])[:, 50], np.asarray(source.resize((200, 100), Image.Resampling.NEAREST))[:, 100])
    whole = extras.run(ctx, ExtrasRequest(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100, upscaling_crop=False,
                                          upscaler_1="Nearest"), [ExtrasInput(source)], save=False)
    assert whole.images[0].size == (200, 100)
    assert "crop" not in whole.infotexts[0]


def test_second_upscaler_is_blended_in_by_its_visibility(ctx):
    source = picture(16, 12)
    request = ExtrasRequest(upscaler_1="Lanczos", upscaler_2="2x-tiny", upscaler_2_visibility=0.25)
    blended = extras.run(ctx, request, [ExtrasInput(source)], save=False)
    first = ctx.upscalers.upscale(source.convert("RGB"), "Lanczos", 32, 24)
    second = ctx.upscalers.upscale(source.convert("RGB"), "2x-tiny", 32, 24)
    assert np.array_equal(np.asarray(blended.images[0]), np.asarray(Image.blend(first, second, 0.25)))
    assert blended.infotexts[0].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: 2x-tiny")


def test_upscaler_none_leaves_the_picture_and_its_text(ctx):
    source = picture()
    result = extras.run(ctx, ExtrasRequest(), [ExtrasInput(source, "cat")])
    assert result.infotexts == [""]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(source))
    assert result.paths[0].name == "00000-cat.png"
    assert Image.open(result.paths[0]).info == {"parameters": INFOTEXT}


def test_jpeg_parameters_from_exif_are_carried_into_the_png(ctx):
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"UNICODE\0" + INFOTEXT.encode("utf-16-be")
    buffer = io.BytesIO()
    picture(infotext=None).save(buffer, "JPEG", exif=exif)
    result = extras.run(ctx, ExtrasRequest(upscaler_1="Lanczos"), [ExtrasInput(Image.open(buffer))], save=False)
    assert Image.open(io.BytesIO(result.pngs[0])).info["parameters"] == INFOTEXT


def test_directory_batch_reads_the_pictures_and_names_the_rest(ctx, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    picture(seed=1).save(folder / "one.png")
    picture(seed=2).convert("RGB").save(folder / "two.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not a picture")
    inputs, problems = extras.directory_inputs(ctx.paths, folder)
    assert [i.name for i in inputs] == ["one", "two"]
    assert len(problems) == 1 and "broken.png" in problems[0]
    out = tmp_path / "out"
    result = extras.run(ctx, ExtrasRequest(upscaler_1="Nearest", upscaling_resize=1.5), inputs, out)
    assert [p.name for p in result.paths] == ["00000-one.png", "00001-two.png"]
    assert [Image.open(p).size for p in result.paths] == [(96, 48), (96, 48)]
    with pytest.raises(ExtrasError, match="does not exist"):
        extras.directory_inputs(ctx.paths, tmp_path / "missing")
    with pytest.raises(ExtrasError, match="no pictures"):
        extras.directory_inputs(ctx.paths, out.parent / "models")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"upscaler_1": "Bicubic++"}, r"no upscaler called 'Bicubic\+\+'; available: None, Lanczos, Nearest, 2x-tiny"),
        ({"upscaling_resize": 0}, "upscaling_resize"),
        ({"upscaling_resize": 9}, "at most 8"),
        ({"resize_mode": 2}, "resize_mode"),
        ({"upscaler_2_visibility": 1.5}, "upscaler_2_visibility must be a number from 0 to 1, got 1.5"),
        ({"upscaling_resize_w": 0, "resize_mode": 1}, "upscaling_resize_w"),
    ],
)
def test_bad_requests_are_named(ctx, change, words):
    with pytest.raises(ExtrasError, match=words):
        ExtrasRequest(**{"upscaler_1": "Lanczos", **change}).validate(ctx.upscalers.names())


def test_too_large_a_result_is_refused_before_any_work(ctx):
    with pytest.raises(ExtrasError, match="largest side allowed is 8192"):
        extras.run(ctx, ExtrasRequest(upscaler_1="Lanczos", upscaling_resize=8), [ExtrasInput(picture(1100, 10))], save=False)


def test_interrupt_stops_between_pictures(ctx):
    job = Job()
    job.interrupt()
    result = extras.run(ctx, ExtrasRequest(upscaler_1="Lanczos"), [ExtrasInput(picture())] * 2, job=job)
    assert result.interrupted and not result.paths


# ---- API ---------------------------------------------------------------------------------------


@pytest.fixture
def client(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    return TestClient(app)


def b64(image: Image.Image) -> str:
    return base64.b64encode(storage.png_bytes(image, image.info.get("parameters"))).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_api_single_image(client):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), "upscaler_1": "Nearest", "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 3, Postprocess upscaler: Nearest</p>"
    image = decode(r.json()["image"])
    assert image.size == (192, 96) and image.info["parameters"] == INFOTEXT


def test_api_batch_images_and_nothing_saved(client, ctx):
    body = {"imageList": [{"data": b64(picture(seed=s)), "name": f"{s}.png"} for s in (1, 2)],
            "resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 40, "upscaler_1": "Lanczos"}
    r = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert r.status_code == 200, r.text
    assert [decode(i).size for i in r.json()["images"]] == [(50, 40), (50, 40)]
    assert not (ctx.paths.outputs / "extras-images").exists()


@pytest.mark.parametrize(
    "body, words",
    [
        ({"image": base64.b64encode(b"not a picture").decode(), "upscaler_1": "Lanczos"}, "could not be read"),
        ({"upscaler_1": "4x-Nope"}, "4x-Nope"),
        ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "face restoration"),
    ],
)
def test_api_refusals_say_why(client, body, words):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(picture()), **body})
    assert r.status_code == 422 and words in r.text


def test_api_lists_upscalers_and_latent_modes(client):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "2x-tiny"]
    assert listed[3]["model_name"] == "ESRGAN" and listed[3]["scale"] == 2 and listed[3]["model_path"].endswith("2x-tiny.safetensors")
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                     "Latent (nearest)", "Latent (nearest-exact)"]
