"""PNG info: the parameters a picture carries (PNG chunk, JPEG/WebP EXIF comment), read back and
pasted into a tab's fields; any file, even a broken one, gives a message and no exception."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from modules.api import routes
from modules.app.config import Flags
from modules.context import AppContext
from modules.generation.parameters import infotext_params, request_from_infotext
from modules.generation.request import GenerationRequest
from modules.images import image_info, storage
from modules.images.image_info import decode_user_comment, read_bytes
from modules.images.infotext import format_infotext
from modules.ui.paste import field_values
from modules.ui.png_info import info_html

# Written by A1111 1.10 (quoted values, hashes and all), given literally.
A1111_TEXT = (
    "masterpiece, 1girl, (blue eyes:1.2), <lora:detail:0.5>\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3849105541, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
    'Clip skip: 2, Lora hashes: "detail: 2f5a1c0b9e7d", TI hashes: "bad_prompt: 6bc2f1d7", Version: v1.10.1'
)
FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "seed", "width", "height",
          "clip_skip", "noise_source", "checkpoint"]


def red(size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, (200, 10, 10))


def png_with(chunks: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    red().save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def exif_picture(comment: bytes, fmt: str) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    buffer = io.BytesIO()
    red().save(buffer, fmt, exif=exif)
    return buffer.getvalue()


@pytest.fixture
def ctx(tmp_path):
    context = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    (context.paths.checkpoints / "v1-5-pruned-emaonly.safetensors").write_bytes(b"")
    return context


def test_reads_back_what_the_project_writes():
    request = GenerationRequest(prompt="a cat, 猫", negative_prompt="dog", steps=9, seed=11, width=64, height=96).validate()
    text = format_infotext(request.prompt, request.negative_prompt,
                           infotext_params(request, seed=11, model_hash="abc", model_name="tiny"))
    image, info = read_bytes(storage.png_bytes(red(), text))
    assert image.size == (16, 16)
    assert info == image_info.ImageInfo(parameters=text, items={})
    assert request_from_infotext(info.parameters)["prompt"] == "a cat, 猫"


def test_a1111_text_fills_every_field_and_the_model_when_present(ctx):
    _, info = read_bytes(png_with({"parameters": A1111_TEXT, "Software": "test"}))
    assert info.parameters == A1111_TEXT and info.items == {"Software": "test"}
    values = field_values(ctx, info.parameters, {name: name for name in FIELDS})
    assert values == {
        "prompt": "masterpiece, 1girl, (blue eyes:1.2), <lora:detail:0.5>",
        "negative_prompt": "lowres, bad anatomy",
        "steps": 28, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 6.5, "seed": 3849105541,
        "width": 512, "height": 768, "clip_skip": 2, "noise_source": "GPU",
        "checkpoint": "v1-5-pruned-emaonly.safetensors",
    }


def test_paste_leaves_fields_the_text_does_not_set(ctx):
    assert field_values(ctx, "just a prompt", {name: name for name in FIELDS}) == {"prompt": "just a prompt", "negative_prompt": ""}
    text = A1111_TEXT.replace("Model: v1-5-pruned-emaonly", "Model: not-here").replace("Steps: 28", "Steps: many")
    values = field_values(ctx, text, {"steps": "S", "checkpoint": "C", "seed": "N"})
    assert values == {"N": 3849105541}


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_exif_user_comment_in_unicode(fmt, encoding):
    _, info = read_bytes(exif_picture(b"UNICODE\0" + A1111_TEXT.encode(encoding), fmt))
    assert info.parameters == A1111_TEXT and info.error is None


@pytest.mark.parametrize(
    "comment, text",
    [
        (b"ASCII\0\0\0Steps: 5, Seed: 1, Size: 8x8", "Steps: 5, Seed: 1, Size: 8x8"),
        (b"\0" * 8 + "ünïcode".encode(), "ünïcode"),
        (b"UNICODE\0" + "\ufeffa cat".encode("utf-16-le"), "a cat"),
        (b"UNICODE\0" + "猫 cat\0".encode("utf-16-be"), "猫 cat"),
    ],
)
def test_user_comment_charsets(comment, text):
    assert decode_user_comment(comment) == text


def test_gif_comment_is_read():
    buffer = io.BytesIO()
    red().save(buffer, "GIF", comment=A1111_TEXT.encode())
    assert read_bytes(buffer.getvalue())[1].parameters == A1111_TEXT


def test_damaged_pixel_data_still_shows_the_text():
    data = storage.png_bytes(red((32, 32)), A1111_TEXT)
    start = data.index(b"IDAT") + 8
    broken = data[:start] + b"\xff" * 16 + data[start + 16:]
    image, info = read_bytes(broken, "photo.png")
    assert image is None
    assert info.parameters == A1111_TEXT
    assert info.error.startswith("photo.png is damaged: its picture data cannot be decoded")


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "not a picture in a known format"),
        (b"hello, world", "not a picture in a known format"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "could not be read"),
        (storage.png_bytes(red(), "x")[:60], "could not be read"),
    ],
)
def test_files_that_are_no_picture_give_a_message(data, words):
    image, info = read_bytes(data, "upload.png")
    assert image is None and info.parameters == "" and words in info.error and info.error.startswith("upload.png")
    assert words in info_html(info)


def test_info_html_escapes_and_orders_like_a1111():
    shown = info_html(image_info.ImageInfo(parameters="<b>cat</b>", items={"postprocessing": "Postprocess upscaler: Lanczos"}))
    assert shown.index("parameters") < shown.index("postprocessing")
    assert "&lt;b&gt;cat&lt;/b&gt;" in shown and "<b>cat</b>" not in shown
    assert "carries no generation parameters" in info_html(image_info.ImageInfo())


def test_png_info_api_shares_the_reading(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    client = TestClient(app)

    def post(data: bytes):
        return client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(data).decode()})

    jpeg = post(exif_picture(b"UNICODE\0" + A1111_TEXT.encode("utf-16-be"), "JPEG")).json()
    assert jpeg["info"] == A1111_TEXT
    assert jpeg["parameters"]["Sampler"] == "DPM++ 2M" and jpeg["parameters"]["Negative prompt"] == "lowres, bad anatomy"
    assert post(png_with({"parameters": "a", "extras": "Postprocess upscaler: Nearest"})).json()["items"] == {"extras": "Postprocess upscaler: Nearest"}
    bad = post(b"garbage")
    assert bad.status_code == 422 and "not a picture in a known format" in bad.text


def test_picture_too_large_to_open_safely_says_so():
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")  # 400 megapixels, a few kilobytes as a file
    image, info = read_bytes(buffer.getvalue(), "huge.png")
    assert image is None and info.error.startswith("huge.png is too large to open safely")
