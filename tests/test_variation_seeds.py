"""A1111's variation seeds: subseed, subseed_strength and seed_resize_from_w/h change each image's
starting noise (slerp towards the variation seed's, or drawn as for another size and centred),
in txt2img, img2img and the hires fix, with either noise source; written into the infotext and
read back; over the API with A1111's names."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.parameters import infotext_params, request_from_infotext
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.images.infotext import format_infotext
from modules.sampling.noise import Variation, image_noise, slerp
from modules.ui.paste import field_values
from tests.server import CHROMIUM, browser_page

SHAPE = (4, 8, 8)
SCENE = "a large red circle in the top left corner on a blue background"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


# ---- the noise ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["CPU", "GPU"])
def test_strength_zero_is_the_seeds_noise_and_one_the_variation_seeds(source, device):
    plain = image_noise([5, 6], SHAPE, source, device)
    assert torch.equal(image_noise([5, 6], SHAPE, source, device, variation=Variation((9, 10), 0.0)), plain)
    assert torch.equal(image_noise([5, 6], SHAPE, source, device, variation=Variation((9, 10), 1.0)),
                       image_noise([9, 10], SHAPE, source, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["CPU", "GPU"])
def test_half_way_differs_from_both_keeps_unit_variance_and_repeats(source, device):
    half = image_noise([5], (4, 64, 64), source, device, variation=Variation((9,), 0.5))
    assert torch.equal(half, image_noise([5], (4, 64, 64), source, device, variation=Variation((9,), 0.5)))
    for other in (image_noise([5], (4, 64, 64), source, device), image_noise([9], (4, 64, 64), source, device)):
        assert (half - other).abs().mean() > 0.3
    assert abs(float(half.std()) - 1) < 0.05  # a plain average of two noises would have 0.71


def test_slerp_turns_each_column_along_dim_1_by_its_share_of_the_angle():
    """A1111's mixing: the vectors are the columns [c, :, x]; two unit columns give the unit column
    t of the way along the great circle from one to the other."""
    def unit_columns(seed):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return noise / noise.norm(dim=1, keepdim=True)

    low, high = unit_columns(1), unit_columns(2)
    mixed = slerp(0.3, low, high)
    for c in range(SHAPE[0]):
        for x in range(SHAPE[2]):
            a, b, m = low[c, :, x], high[c, :, x], mixed[c, :, x]
            angle = math.acos(float(a @ b))
            assert float(m.norm()) == pytest.approx(1)
            assert math.acos(float(a @ m)) == pytest.approx(0.3 * angle)
            assert math.acos(float(m @ b)) == pytest.approx(0.7 * angle)
    same = torch.randn(SHAPE)
    assert torch.allclose(slerp(0.4, same, same.clone()), same)  # nearly parallel: mixed linearly, no NaN from acos


def test_one_images_noise_does_not_depend_on_its_batch_mates():
    variation = Variation((20, 21, 22), 0.4, (6, 10))
    batch = image_noise([5, 5, 5], SHAPE, variation=variation)
    for i, subseed in enumerate((20, 21, 22)):
        assert torch.equal(batch[i], image_noise([5], SHAPE, variation=Variation((subseed,), 0.4, (6, 10)))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["CPU", "GPU"])
def test_seed_resize_from_a_smaller_size_puts_its_noise_in_the_middle(source, device):
    full = image_noise([5], (4, 16, 16), source, device)
    resized = image_noise([5], (4, 16, 16), source, device, variation=Variation((9,), 0.0, (8, 6)))
    assert torch.equal(resized[:, :, 4:12, 5:11], image_noise([5], (4, 8, 6), source, device))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 5:11] = False
    assert torch.equal(resized[:, :, outside], full[:, :, outside])  # the rest is the seed's own noise at 16x16
    # With a strength, it is the small size's varied noise that goes in the middle.
    varied = image_noise([5], (4, 16, 16), source, device, variation=Variation((9,), 0.3, (8, 6)))
    assert torch.equal(varied[:, :, 4:12, 5:11], image_noise([5], (4, 8, 6), source, device, variation=Variation((9,), 0.3)))


def test_seed_resize_from_a_larger_size_keeps_its_middle():
    resized = image_noise([5], (4, 8, 8), variation=Variation((9,), 0.0, (12, 11)))
    larger = image_noise([5], (4, 12, 11))
    # 11 columns into 8: offset (8 - 11) // 2 = -2 rounded down, so 7 columns fit and the last stays the seed's.
    assert torch.equal(resized[:, :, :, :7], larger[:, :, 2:10, 2:9])
    assert torch.equal(resized[:, :, :, 7], image_noise([5], (4, 8, 8))[:, :, :, 7])


# ---- the request -------------------------------------------------------------------------------

def test_seeds_and_variation_seeds_of_a_job_as_a1111():
    plain = GenerationRequest(seed=10, subseed=50, batch_size=2, batch_count=2).validate()
    assert plain.seeds() == [10, 11, 12, 13] and plain.noise_variation(plain.subseeds()[:2], 8) is None
    varied = plain.replace(subseed_strength=0.25).validate()
    assert varied.seeds() == [10, 10, 10, 10]  # variations of one picture
    assert varied.subseeds() == [50, 51, 52, 53]
    assert varied.noise_variation([52, 53], 8) == Variation((52, 53), 0.25, None)
    resized = plain.replace(seed_resize_from_w=300, seed_resize_from_h=200).validate()
    assert resized.seeds() == [10, 11, 12, 13]
    assert resized.noise_variation([50, 51], 8) == Variation((50, 51), 0.0, (25, 37))


def test_random_variation_seed_is_resolved_with_the_seed():
    request = GenerationRequest(seed=-1, subseed=-1).with_seed_resolved()
    assert request.seed >= 0 and request.subseed >= 0
    assert GenerationRequest(seed=3, subseed=4).with_seed_resolved().subseed == 4


@pytest.mark.parametrize("change", [dict(seed_resize_from_w=-1, seed_resize_from_h=-1), dict(seed_resize_from_w=0),
                                    dict(seed_resize_from_w=512, seed_resize_from_h=0)])
def test_seed_resize_is_off_unless_both_sides_are_above_zero(change):
    request = GenerationRequest(**change).validate()
    assert request.noise_variation([1], 8) is None
    assert "Seed resize from" not in infotext_params(request, seed=1, model_hash=None, model_name=None)


@pytest.mark.parametrize("change, words", [
    (dict(subseed_strength=2), "subseed_strength must be a number from 0 to 1, got 2"),
    (dict(subseed_strength=-0.1), "subseed_strength must be a number from 0 to 1"),
    (dict(seed_resize_from_w=-5), "seed_resize_from_w must be a whole number from -1 to 4096, got -5"),
    (dict(seed_resize_from_h=-2), "seed_resize_from_h must be a whole number from -1 to 4096"),
    (dict(seed_resize_from_h=3), "seed_resize_from_h must be 0 or -1 (off) or at least 8, got 3"),
    (dict(subseed=-7), "subseed must be a whole number from -1 to"),
    (dict(subseed="x"), "subseed must be a whole number"),
    (dict(seed_enable_extras="yes"), "seed_enable_extras must be true or false"),
])
def test_bad_values_are_refused_naming_the_field(change, words):
    with pytest.raises(RequestError) as refused:
        GenerationRequest(**change).validate()
    assert words in str(refused.value)
    with pytest.raises(RequestError):
        Img2ImgRequest(init_images=(Image.new("RGB", (64, 64)),), **change).validate()


def test_without_the_extras_the_variation_is_off_whatever_its_fields_hold():
    request = GenerationRequest(subseed=5, subseed_strength=2, seed_resize_from_w=-9, seed_enable_extras=False).validate()
    assert (request.subseed, request.subseed_strength, request.seed_resize_from_w, request.seed_resize_from_h) == (-1, 0, 0, 0)


# ---- infotext ----------------------------------------------------------------------------------

def test_infotext_as_a1111_writes_it_and_read_back():
    request = GenerationRequest(prompt="a cat", seed=7, subseed=99, subseed_strength=0.3, seed_resize_from_w=512,
                                seed_resize_from_h=768, width=64, height=64, steps=5).validate()
    text = format_infotext(request.prompt, "", infotext_params(request, seed=7, subseed=100, model_hash="abc", model_name="m"))
    assert ("Seed: 7, Size: 64x64, Model hash: abc, Model: m, Variation seed: 100, Variation seed strength: 0.3, "
            "Seed resize from: 512x768") in text
    fields = request_from_infotext(text)
    assert {k: fields[k] for k in ("seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h")} == {
        "seed": 7, "subseed": 100, "subseed_strength": 0.3, "seed_resize_from_w": 512, "seed_resize_from_h": 768}
    rebuilt = GenerationRequest(**fields).validate()
    assert rebuilt.noise_variation([100], 8) == Variation((100,), 0.3, (96, 64))


def test_infotext_without_a_variation_has_none_of_its_keys():
    request = GenerationRequest(prompt="a cat", seed=7, subseed=99).validate()
    params = infotext_params(request, seed=7, subseed=99, model_hash=None, model_name=None)
    assert not {"Variation seed", "Variation seed strength", "Seed resize from"} & set(params)
    assert "subseed_strength" not in request_from_infotext(format_infotext("a cat", "", params))


def test_a1111_text_read_literally():
    text = ("a dog\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
            "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 4321, Variation seed strength: 0.15, "
            "Seed resize from: 640x448, Version: v1.10.1")
    fields = request_from_infotext(text)
    assert (fields["subseed"], fields["subseed_strength"], fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == (
        4321, 0.15, 640, 448)


def test_paste_ticks_extra_only_for_a_picture_made_with_variation_seeds(tmp_path):
    from modules.app.config import Flags
    from modules.context import AppContext

    ctx = AppContext.create(Flags(data_dir=tmp_path, device="cpu"))
    fields = {name: name for name in ("seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
                                      "seed_enable_extras")}
    varied = field_values(ctx, "p\nSteps: 5, Seed: 3, Variation seed: 8, Variation seed strength: 0.5", fields)
    assert varied == {"seed": 3, "subseed": 8, "subseed_strength": 0.5, "seed_enable_extras": True}
    resized = field_values(ctx, "p\nSteps: 5, Seed: 3, Seed resize from: 64x128", fields)
    assert resized == {"seed": 3, "seed_resize_from_w": 64, "seed_resize_from_h": 128, "seed_enable_extras": True}
    assert field_values(ctx, "p\nSteps: 5, Seed: 3, Size: 64x64", fields) == {"seed": 3, "seed_enable_extras": False}
    assert field_values(ctx, "just a prompt", fields) == {}


# ---- pictures on the built-in model ------------------------------------------------------------

def _pictures(ctx, request) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipeline.generate(ctx, request, save=False).images]


TXT2IMG = dict(prompt=SCENE, width=64, height=64, steps=6, sampler_name="Euler", seed=21, subseed=42)


def test_txt2img_strength_zero_one_and_half(builtin_ctx):
    plain = _pictures(builtin_ctx, GenerationRequest(**TXT2IMG))[0]
    assert np.array_equal(_pictures(builtin_ctx, GenerationRequest(**TXT2IMG, subseed_strength=0.0))[0], plain)
    own = _pictures(builtin_ctx, GenerationRequest(**{**TXT2IMG, "seed": 42}))[0]
    assert np.array_equal(_pictures(builtin_ctx, GenerationRequest(**TXT2IMG, subseed_strength=1.0))[0], own)
    half = _pictures(builtin_ctx, GenerationRequest(**TXT2IMG, subseed_strength=0.5))[0]
    assert np.array_equal(_pictures(builtin_ctx, GenerationRequest(**TXT2IMG, subseed_strength=0.5))[0], half)
    for other in (plain, own):  # the built-in model draws what the prompt says; the noise moves the details
        assert np.abs(half.astype(int) - other).mean() > 0.5


@pytest.fixture
def drawn_noises(monkeypatch):
    """Every starting noise the pipeline draws from now on, in order."""
    noises = []
    drawn = pipeline.image_noise

    def recording(*args, **kwargs):
        noises.append(drawn(*args, **kwargs))
        return noises[-1]

    monkeypatch.setattr(pipeline, "image_noise", recording)
    return noises


def test_each_image_of_a_batch_is_the_one_made_alone(builtin_ctx, drawn_noises):
    noises = drawn_noises
    # Euler a: the per-step noise comes from the seed, so it is the same for every image here.
    common = {**TXT2IMG, "sampler_name": "Euler a", "subseed_strength": 0.6}
    result = pipeline.generate(builtin_ctx, GenerationRequest(**common, batch_size=3, batch_count=2), save=False)
    assert result.seeds == [21] * 6
    assert [text.split("Variation seed: ")[1].split(",")[0] for text in result.infotexts] == [str(42 + i) for i in range(6)]
    batched = noises[:]
    for i in (1, 4):
        noises.clear()
        alone = pipeline.generate(builtin_ctx, GenerationRequest(**{**common, "subseed": 42 + i}), save=False)
        assert torch.equal(noises[0][0], batched[i // 3][i % 3])
        assert alone.infotexts[0] == result.infotexts[i]
        # The UNet's float rounding depends on the batch shape, by a level at most.
        assert np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(result.images[i])).max() <= 2


def test_seed_resize_in_txt2img_and_the_hires_pass(builtin_ctx, drawn_noises):
    noises = drawn_noises
    request = GenerationRequest(**{**TXT2IMG, "width": 128, "height": 96}, seed_resize_from_w=64, seed_resize_from_h=48,
                                enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, denoising_strength=0.5)
    result = pipeline.generate(builtin_ctx, request, save=False)
    first, second = noises
    cell = builtin_ctx.models.get(None).downscale  # the built-in model's latent cell is 4 pixels
    small = image_noise([21], (4, 48 // cell, 64 // cell))[0]
    for noise, (height, width) in ((first, (96, 128)), (second, (144, 192))):
        top, left = (height - 48) // 2 // cell, (width - 64) // 2 // cell
        assert noise.shape == (1, 4, height // cell, width // cell)
        assert torch.equal(noise[0, :, top:top + 48 // cell, left:left + 64 // cell], small)
    assert "Seed resize from: 64x48" in result.infotexts[0] and "Variation seed" not in result.infotexts[0]


def test_hires_fix_at_strength_one_is_the_variation_seeds_picture(builtin_ctx):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, denoising_strength=0.5)
    varied = _pictures(builtin_ctx, GenerationRequest(**TXT2IMG, **hires, subseed_strength=1.0))[0]
    own = _pictures(builtin_ctx, GenerationRequest(**{**TXT2IMG, "seed": 42}, **hires))[0]
    assert varied.shape == (96, 96, 3) and np.array_equal(varied, own)


def _start_picture() -> Image.Image:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (30, 60, 200)
    pixels[8:28, 8:28] = (220, 30, 30)
    return Image.fromarray(pixels, "RGB")


def test_img2img_strength_zero_and_one(builtin_ctx):
    common = dict(TXT2IMG, prompt="a large yellow star on a green background", init_images=(_start_picture(),),
                  denoising_strength=0.7)
    plain = _pictures(builtin_ctx, Img2ImgRequest(**common))[0]
    assert np.array_equal(_pictures(builtin_ctx, Img2ImgRequest(**common, subseed_strength=0.0))[0], plain)
    own = _pictures(builtin_ctx, Img2ImgRequest(**{**common, "seed": 42}))[0]
    assert np.array_equal(_pictures(builtin_ctx, Img2ImgRequest(**common, subseed_strength=1.0))[0], own)
    assert np.abs(_pictures(builtin_ctx, Img2ImgRequest(**common, subseed_strength=0.5))[0].astype(int) - plain).mean() > 1


# ---- API ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(builtin_ctx):
    app = FastAPI()
    routes.install(app, builtin_ctx)
    with TestClient(app) as client:
        yield client


def test_openapi_lists_the_fields_with_their_limits(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for body in ("Txt2ImgBody", "Img2ImgBody"):
        fields = schemas[body]["properties"]
        assert (fields["subseed"]["default"], fields["subseed"]["minimum"]) == (-1, -1)
        assert (fields["subseed_strength"]["minimum"], fields["subseed_strength"]["maximum"]) == (0, 1)
        for side in ("seed_resize_from_w", "seed_resize_from_h"):
            assert (fields[side]["default"], fields[side]["minimum"], fields[side]["maximum"]) == (0, -1, 4096)
        assert fields["seed_enable_extras"]["default"] is True


def test_api_body_with_variation_fields(client):
    body = dict(prompt=SCENE, width=64, height=64, steps=4, sampler_name="Euler", seed=21, subseed=42,
                subseed_strength=0.3, seed_resize_from_w=-1, seed_resize_from_h=-1, batch_size=2)
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["seed"], info["all_seeds"], info["subseed"], info["all_subseeds"]) == (21, [21, 21], 42, [42, 43])
    assert (info["subseed_strength"], info["seed_resize_from_w"], info["seed_resize_from_h"]) == (0.3, -1, -1)
    assert "Variation seed: 43, Variation seed strength: 0.3" in info["infotexts"][1]
    random_subseed = json.loads(client.post("/sdapi/v1/txt2img", json={**body, "subseed": -1, "batch_size": 1}).json()["info"])
    assert random_subseed["subseed"] >= 0 and random_subseed["all_subseeds"] == [random_subseed["subseed"]]


@pytest.mark.parametrize("change, words", [
    ({"subseed_strength": 2}, "subseed_strength"),
    ({"seed_resize_from_w": -3}, "seed_resize_from_w"),
    ({"seed_resize_from_h": 5}, "seed_resize_from_h"),
])
@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_api_refuses_bad_values_naming_the_field(client, route, change, words):
    body = dict(prompt="a", width=64, height=64, steps=2, **change)
    if route == "img2img":
        import base64
        import io

        buffer = io.BytesIO()
        _start_picture().save(buffer, "PNG")
        body["init_images"] = [base64.b64encode(buffer.getvalue()).decode()]
    r = client.post(f"/sdapi/v1/{route}", json=body)
    assert r.status_code == 422 and words in r.text, r.text


# ---- the web UI --------------------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (launch.py --test installs it as root)")
def test_extra_reveals_the_variation_seed_and_pasting_fills_it(live_server, tmp_path):
    from playwright.sync_api import expect

    from modules.images import storage

    text = "a blue square\nSteps: 3, Sampler: Euler, Seed: 12, Size: 64x64, Variation seed: 77, Variation seed strength: 0.25"
    (tmp_path / "varied.png").write_bytes(storage.png_bytes(Image.new("RGB", (32, 32), "blue"), text))
    with browser_page(live_server) as page:
        expect(page.locator("#txt2img_subseed")).to_be_hidden()
        page.locator("#txt2img_subseed_show input").check()
        expect(page.locator("#txt2img_subseed")).to_be_visible(timeout=10_000)
        page.locator("#txt2img_subseed_show input").uncheck()
        expect(page.locator("#txt2img_subseed")).to_be_hidden(timeout=10_000)

        page.get_by_role("tab", name="PNG Info").click()
        page.locator("#pnginfo_image input[type=file]").set_input_files(tmp_path / "varied.png")
        page.locator("#pnginfo_html").get_by_text("Variation seed: 77").wait_for(timeout=20_000)
        page.locator("#send_to_txt2img").click()
        expect(page.locator("#txt2img_subseed input")).to_have_value("77", timeout=10_000)
        expect(page.locator("#txt2img_subseed_show input")).to_be_checked()
        expect(page.locator("#txt2img_subseed_strength input[type=number]")).to_have_value("0.25")

        page.locator("#txt2img_generate").click()
        infotext = page.locator("#txt2img_infotext")
        infotext.get_by_text("Variation seed: 77, Variation seed strength: 0.25").wait_for(timeout=60_000)
        page.locator("#txt2img_random_subseed").click()
        expect(page.locator("#txt2img_subseed input")).to_have_value("-1", timeout=10_000)
        page.locator("#txt2img_reuse_subseed").click()
        expect(page.locator("#txt2img_subseed input")).to_have_value("77", timeout=10_000)
