"""Hires fix: sizes, validation, the two passes on the built-in model, the infotext's way back, the API."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from modules.app.errors import RequestError
from modules.generation import hires, img2img, pipeline
from modules.generation.parameters import request_from_infotext
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.postprocess import upscalers
from modules.service.jobs import Job

PROMPT = "a large red circle on a blue background"


def hires_request(**fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, width=64, height=64, steps=6, seed=3, sampler_name="Euler", enable_hr=True,
                hr_scale=2.0, hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=4)
    return GenerationRequest(**{**base, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


# ---- sizes (pure) ----

@pytest.mark.parametrize("size, fields, cover, target", [
    ((64, 64), {"hr_scale": 2.0}, (128, 128), (128, 128)),
    ((512, 512), {"hr_scale": 1.3}, (664, 664), (664, 664)),  # 665.6 rounded down to a multiple of 8
    ((512, 768), {"hr_resize_x": 1024}, (1024, 1536), (1024, 1536)),  # one side given: the aspect is kept
    ((512, 768), {"hr_resize_y": 1024}, (680, 1024), (680, 1024)),
    ((512, 768), {"hr_resize_x": 1024, "hr_resize_y": 1024}, (1024, 1536), (1024, 1024)),  # covered, then cropped
    ((768, 512), {"hr_resize_x": 1024, "hr_resize_y": 1024}, (1536, 1024), (1024, 1024)),
])
def test_sizes(size, fields, cover, target):
    request = GenerationRequest(width=size[0], height=size[1], enable_hr=True, **fields)
    assert request.hr_cover_size() == cover
    assert request.hr_target_size() == target


def test_second_pass_steps_follow_the_strength():
    assert hires.sampling_steps(hires_request(hr_second_pass_steps=20, denoising_strength=0.5)) == 11
    assert hires.sampling_steps(hires_request(hr_second_pass_steps=0, steps=10, denoising_strength=1.0)) == 10
    assert pipeline.sampling_steps(hires_request(steps=6, hr_second_pass_steps=20, denoising_strength=0.5)) == 6 + 11


# ---- validation ----

@pytest.mark.parametrize("fields, words", [
    ({"hr_scale": 0.5}, "hr_scale must be a number from 1 to 8"),
    ({"hr_resize_x": 100}, "hr_resize_x must be a multiple of 8"),
    ({"hr_resize_y": -8}, "hr_resize_y must be a whole number from 0 to 4096"),
    ({"denoising_strength": 2}, "denoising_strength must be a number from 0 to 1"),
    ({"hr_second_pass_steps": 151}, "hr_second_pass_steps must be a whole number from 0 to 150"),
    ({"width": 2048, "hr_scale": 4.0}, "the hires fix would make 8192x256 pictures"),
    ({"hr_upscaler": ""}, "hr_upscaler must be the name of an upscaler"),
    ({"sampler_name": "DPM adaptive", "hr_second_pass_steps": 2, "denoising_strength": 0.4},
     "DPM adaptive needs at least 2 noise levels"),
])
def test_bad_hires_options_say_what_is_wrong(fields, words):
    with pytest.raises(RequestError, match=words):
        hires_request(**fields).validate()


def test_hires_options_are_not_checked_while_it_is_off():
    assert GenerationRequest(hr_scale=0.5, denoising_strength=7).validate().enable_hr is False


def test_img2img_refuses_the_hires_fix():
    picture = Image.new("RGB", (64, 64), "blue")
    with pytest.raises(RequestError, match="the hires fix is a txt2img option"):
        Img2ImgRequest(init_images=(picture,), width=64, height=64, enable_hr=True).validate()


def test_unknown_upscaler_is_refused_before_sampling(builtin_ctx):
    job = Job()
    with pytest.raises(LookupError, match="Upscaler 'Magic' not found.*Lanczos.*Latent \\(bicubic\\)"):
        pipeline.generate(builtin_ctx, hires_request(hr_upscaler="Magic"), job=job, save=False)
    assert job.step == 0


# ---- both passes on the built-in model ----

@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos"])
def test_hires_gives_the_target_size_in_the_steps_it_counts(builtin_ctx, upscaler):
    job = Job()
    request = hires_request(hr_upscaler=upscaler, denoising_strength=0.35)
    result = pipeline.generate(builtin_ctx, request, job=job, save=False)
    assert result.images[0].size == (128, 128)
    assert job.total_steps == job.step == 6 + hires.sampling_steps(request.validate()) == 6 + 2


def test_strength_zero_gives_the_upscaled_first_pass(builtin_ctx):
    """Without denoising, the second pass returns what it starts from: the first pass's latents
    upscaled in latent space, or its picture upscaled and encoded again."""
    sd_model = builtin_ctx.models.get(None)
    request = hires_request(denoising_strength=0.0).validate()
    latents = pipeline.sample_latents(sd_model, request.replace(enable_hr=False), [request.seed])
    first = pipeline.latents_to_images(sd_model, latents)[0]

    latent_way = pipeline.generate(builtin_ctx, request, save=False).images[0]
    mode = upscalers.find_latent_mode("Latent")
    expected = pipeline.latents_to_images(sd_model, upscalers.upscale_latent(latents, mode, 32, 32))[0]
    assert np.array_equal(pixels(latent_way), pixels(expected))

    pixel_way = pipeline.generate(builtin_ctx, request.replace(hr_upscaler="Lanczos"), save=False).images[0]
    upscaled = first.resize((128, 128), Image.Resampling.LANCZOS)
    with torch.no_grad():
        encoded = sd_model.encode_first_stage(img2img.to_tensor([upscaled]))
    assert np.array_equal(pixels(pixel_way), pixels(pipeline.latents_to_images(sd_model, encoded)[0]))

    refined = pipeline.generate(builtin_ctx, request.replace(denoising_strength=0.5), save=False).images[0]
    assert np.abs(pixels(refined) - pixels(latent_way)).mean() > 5  # a real second pass changes it


def test_resize_to_another_aspect_covers_and_crops(builtin_ctx):
    result = pipeline.generate(builtin_ctx, hires_request(hr_resize_x=96, hr_resize_y=64, hr_upscaler="Lanczos"), save=False)
    assert result.images[0].size == (96, 64)
    assert "Hires resize: 96x64" in result.infotexts[0] and "Hires upscale:" not in result.infotexts[0]


def test_infotext_reads_back_and_remakes_the_picture(builtin_ctx, tmp_path):
    request = hires_request(denoising_strength=0.55, hr_upscaler="Latent (bicubic)")
    result = pipeline.generate(builtin_ctx, request, save=True)
    text = result.infotexts[0]
    assert "Size: 64x64" in text  # the first pass's, as A1111 writes it
    assert text.endswith("Denoising strength: 0.55, RNG: CPU, Hires upscale: 2, Hires steps: 4, "
                         "Hires upscaler: Latent (bicubic)")
    assert Image.open(result.paths[0]).info["parameters"] == text
    fields = request_from_infotext(text)
    assert {k: fields[k] for k in ("enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler", "denoising_strength")} \
        == {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 4, "hr_upscaler": "Latent (bicubic)",
            "denoising_strength": 0.55}
    again = pipeline.generate(builtin_ctx, GenerationRequest(**fields), save=False)
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))
    assert again.infotexts[0] == text


def test_infotext_without_hires_turns_it_off():
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.4"
    fields = request_from_infotext(text)
    assert fields["enable_hr"] is False and "denoising_strength" not in fields
    resized = request_from_infotext(text + ", Hires resize: 0x1024, Hires upscaler: Lanczos")
    assert (resized["enable_hr"], resized["hr_resize_x"], resized["hr_resize_y"], resized["hr_upscaler"],
            resized["denoising_strength"]) == (True, 0, 1024, "Lanczos", 0.4)


# ---- over HTTP (tiny random model) ----

def test_txt2img_route_runs_the_hires_fix(live_server):
    r = httpx.post(f"{live_server}/sdapi/v1/txt2img", timeout=120, json=dict(
        prompt="x", steps=3, seed=2, width=64, height=64, sampler_name="Euler", enable_hr=True, hr_scale=1.5,
        hr_upscaler="Nearest", denoising_strength=0.5))
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert info["denoising_strength"] == 0.5 and (info["width"], info["height"]) == (64, 64)
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (96, 96)
    assert "Hires upscale: 1.5, Hires upscaler: Nearest" in image.info["parameters"]


def test_txt2img_route_names_an_unknown_hires_upscaler(live_server):
    r = httpx.post(f"{live_server}/sdapi/v1/txt2img", timeout=120, json=dict(
        prompt="x", steps=3, width=64, height=64, enable_hr=True, hr_upscaler="Magic"))
    assert r.status_code == 404 and "Upscaler 'Magic' not found" in r.json()["detail"]
