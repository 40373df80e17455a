"""Infotext writing and reading: the text A1111 stores in a PNG's "parameters" chunk."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from modules.generation.parameters import infotext_params, request_fields, request_from_infotext
from modules.generation.request import GenerationRequest
from modules.images.infotext import format_infotext, parse_infotext, quote

ISSUE_EXAMPLE = (
    "a photo of a cat\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
    "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
)

# As A1111 v1.10.1 writes it, with hires fix, a LoRA and a textual-inversion embedding.
A1111_WRITTEN = (
    "masterpiece, best quality, 1girl,\n"
    "standing in a field of flowers, <lora:flowers:0.8>\n"
    "Negative prompt: lowres, bad anatomy,\n"
    "bad hands, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3046184411, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    "Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "flowers: 4c6a1f3b2d9e, detail: 0a1b2c3d4e5f", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def text_for(request: GenerationRequest, seed: int, model_hash: str | None = None, model_name: str | None = None) -> str:
    params = infotext_params(request, seed=seed, model_hash=model_hash, model_name=model_name)
    return format_infotext(request.prompt, request.negative_prompt, params)


def test_issue_example_is_written_byte_for_byte():
    request = GenerationRequest(
        prompt="a photo of a cat", negative_prompt="blurry", sampler_name="DPM++ 2M",
        scheduler="Karras", steps=20, cfg_scale=7.0, seed=1234567890, noise_source="GPU",
    ).validate()
    assert text_for(request, 1234567890, "6ce0161689", "v1-5-pruned-emaonly") == ISSUE_EXAMPLE


def test_params_order_and_optional_keys():
    request = GenerationRequest(
        sampler_name="Euler", scheduler="Exponential", steps=30, cfg_scale=7.5,
        width=768, height=512, clip_skip=2, noise_source="CPU",
    ).validate()
    params = infotext_params(request, seed=99, model_hash="abc123", model_name="mine")
    assert list(params.items()) == [
        ("Steps", 30), ("Sampler", "Euler"), ("Schedule type", "Exponential"), ("CFG scale", 7.5),
        ("Seed", 99), ("Size", "768x512"), ("Model hash", "abc123"), ("Model", "mine"),
        ("Clip skip", 2), ("RNG", "CPU"),
    ]


def test_defaults_a1111_assumes_are_left_out():
    # A1111 reads a missing "Clip skip" as 1 and a missing "RNG" as GPU, so it never writes them.
    request = GenerationRequest(clip_skip=1, noise_source="GPU").validate()
    params = infotext_params(request, seed=5, model_hash=None, model_name=None)
    assert "Clip skip" not in params and "RNG" not in params
    assert "Model hash" not in params and "Model" not in params
    assert params["Seed"] == 5


@pytest.mark.parametrize(
    ("sampler", "scheduler", "written"),
    [
        ("DPM++ 2M", "Automatic", "Karras"),  # the sampler's own default schedule
        ("DPM++ 2M SDE", "Automatic", "Exponential"),
        ("Euler a", "Automatic", "Automatic"),  # runs on the model's plain levels
        ("Euler a", "Uniform", "Uniform"),
        ("DPM++ 2M", "SGM Uniform", "SGM Uniform"),
    ],
)
def test_schedule_type_is_the_schedule_used(sampler, scheduler, written):
    request = GenerationRequest(sampler_name=sampler, scheduler=scheduler).validate()
    assert infotext_params(request, seed=1, model_hash=None, model_name=None)["Schedule type"] == written


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (7.0, "CFG scale: 7"),
        (7.5, "CFG scale: 7.5"),
        (12, "CFG scale: 12"),
    ],
)
def test_whole_floats_are_written_as_integers(value, written):
    assert format_infotext("p", "", {"CFG scale": value, "Steps": 1}) == f"p\n{written}, Steps: 1"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain value", "plain value"),
        ("a, b", '"a, b"'),
        ("key: value", '"key: value"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("猫, 犬", '"猫, 犬"'),  # kept readable, not \\u-escaped
    ],
)
def test_values_that_would_break_the_line_are_json_quoted(value, written):
    assert quote(value) == written
    text = format_infotext("p", "", {"Steps": 1, "Note": value, "Seed": 2})
    assert text == f"p\nSteps: 1, Note: {written}, Seed: 2"
    assert parse_infotext(text)[2] == {"Steps": "1", "Note": value, "Seed": "2"}


def test_no_negative_prompt_line_when_negative_is_empty():
    text = format_infotext("a cat\non a mat", "", {"Steps": 20, "Seed": 1, "Size": "64x64"})
    assert text == "a cat\non a mat\nSteps: 20, Seed: 1, Size: 64x64"


def test_empty_prompt_starts_with_the_negative_prompt():
    text = format_infotext("", "blurry", {"Steps": 20, "Seed": 1, "Size": "64x64"})
    assert text == "Negative prompt: blurry\nSteps: 20, Seed: 1, Size: 64x64"
    assert parse_infotext(text) == ("", "blurry", {"Steps": "20", "Seed": "1", "Size": "64x64"})


ROUND_TRIP_REQUESTS = [
    GenerationRequest(
        prompt="a (red:1.2) fox, forest,\nmorning light: soft", negative_prompt="blurry, low quality\njpeg artifacts",
        sampler_name="DPM++ 2M", scheduler="Karras", steps=27, cfg_scale=7.5, seed=4000000000,
        width=640, height=448, clip_skip=2, noise_source="CPU",
    ),
    GenerationRequest(
        prompt="a cat", sampler_name="Euler a", scheduler="Automatic", steps=1, cfg_scale=1.0,
        seed=0, width=64, height=4096, clip_skip=1, noise_source="GPU",
    ),
    GenerationRequest(
        prompt="", negative_prompt="only a negative", sampler_name="DPM++ 3M SDE", scheduler="Exponential",
        steps=150, cfg_scale=30.0, seed=123, clip_skip=12, noise_source="CPU",
    ),
    GenerationRequest(
        prompt="a cat", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic antialiased)",
        hr_second_pass_steps=7, denoising_strength=0.35, width=64, height=64,
    ),
    GenerationRequest(prompt="a cat", enable_hr=True, hr_resize_x=0, hr_resize_y=1024, hr_upscaler="Lanczos"),
]
ROUND_TRIP_FIELDS = (
    "prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale",
    "seed", "width", "height", "clip_skip", "noise_source", "enable_hr", "hr_scale", "hr_upscaler",
    "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "denoising_strength",
)


@pytest.mark.parametrize("request_", ROUND_TRIP_REQUESTS, ids=["full", "defaults-omitted", "negative-only", "hires-scale", "hires-resize"])
def test_round_trip_request_to_infotext_and_back(request_):
    request_ = request_.validate()
    text = text_for(request_, request_.seed, "6ce0161689", "v1-5-pruned-emaonly")
    fields = request_from_infotext(text)
    rebuilt = GenerationRequest(**fields).validate()
    assert {f: getattr(rebuilt, f) for f in ROUND_TRIP_FIELDS} == {f: getattr(request_, f) for f in ROUND_TRIP_FIELDS}


def test_parses_a1111_text_given_literally():
    prompt, negative, params = parse_infotext(A1111_WRITTEN)
    assert prompt == "masterpiece, best quality, 1girl,\nstanding in a field of flowers, <lora:flowers:0.8>"
    assert negative == "lowres, bad anatomy,\nbad hands, (worst quality:1.4)"
    assert params == {
        "Steps": "28", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5",
        "Seed": "3046184411", "Size": "512x768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "Denoising strength": "0.45", "Clip skip": "2",
        "Hires upscale": "2", "Hires steps": "15", "Hires upscaler": "R-ESRGAN 4x+",
        "Lora hashes": "flowers: 4c6a1f3b2d9e, detail: 0a1b2c3d4e5f",
        "TI hashes": "easynegative: c74b4e810b03", "Version": "v1.10.1",
    }


def test_a1111_text_maps_onto_request_fields():
    assert request_from_infotext(A1111_WRITTEN) == {
        "prompt": "masterpiece, best quality, 1girl,\nstanding in a field of flowers, <lora:flowers:0.8>",
        "negative_prompt": "lowres, bad anatomy,\nbad hands, (worst quality:1.4)",
        "steps": 28, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 6.5,
        "seed": 3046184411, "width": 512, "height": 768, "clip_skip": 2,
        "noise_source": "GPU",  # no "RNG" key: A1111 made the noise on the GPU
        "enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 15, "hr_upscaler": "R-ESRGAN 4x+",
        "denoising_strength": 0.45,
        "refiner_checkpoint": None,  # no "Refiner" key: made without one
    }


def test_windows_line_endings():
    text = "a cat\r\nNegative prompt: a dog\r\nSteps: 5, Seed: 6, Size: 64x128\r\n"
    assert parse_infotext(text) == ("a cat", "a dog", {"Steps": "5", "Seed": "6", "Size": "64x128"})


def test_old_combined_sampler_name_keeps_its_schedule():
    # Written by A1111 before "Schedule type" existed.
    fields = request_from_infotext("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ 2M", "Karras")


@pytest.mark.parametrize(
    "text",
    [
        "a cat, sitting: on a mat",
        "style: anime, mood: calm",  # two pairs: still a prompt
        "a cat\nsecond line: with a colon, and a comma",
    ],
)
def test_text_without_a_parameters_line_is_all_prompt(text):
    assert parse_infotext(text) == (text, "", {})
    assert request_from_infotext(text) == {"prompt": text, "negative_prompt": ""}


def test_three_pairs_make_a_parameters_line():
    assert parse_infotext("style: anime, mood: calm, light: dusk") == (
        "", "", {"style": "anime", "mood": "calm", "light": "dusk"}
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "\r\n"])
def test_empty_text(text):
    assert parse_infotext(text) == ("", "", {})
    assert request_from_infotext(text) == {"prompt": "", "negative_prompt": ""}


def test_unreadable_values_are_skipped_not_raised():
    text = ("p\nSteps: many, Sampler: Nonexistent sampler, CFG scale: x, Seed: 12, Size: big, RNG: NV, Clip skip: 1.5, "
            "Hires upscale: big, Hires steps: 2.5, Hires upscaler: Lanczos")
    assert request_from_infotext(text) == {
        "prompt": "p", "negative_prompt": "", "seed": 12, "scheduler": "Automatic", "hr_upscaler": "Lanczos",
        "refiner_checkpoint": None,
    }


def test_request_fields_uses_already_parsed_text():
    fields = request_fields("a", "b", {"Steps": "3", "Size": "64x96", "Unknown key": "x"})
    assert fields == {
        "prompt": "a", "negative_prompt": "b", "steps": 3, "width": 64, "height": 96,
        "clip_skip": 1, "noise_source": "GPU", "scheduler": "Automatic", "enable_hr": False, "refiner_checkpoint": None,
    }


GARBAGE = [
    '"', '""', ":", ",", ": , : , :", 'Steps: "unterminated, Seed: 1, Size: 2',
    'a: "\\", b: "\\u12", c: "\\ud800"', "Negative prompt:", "Negative prompt:\nNegative prompt:",
    "\x00\x01\x02", "x" * 100_000, " " * 100_000 + "a", "a: b, " * 5000, "\u2028\u2029\x85", "Size: 1x, Steps: -, Seed: 99999999999999999999999",
    "CFG scale: nan, Seed: 1e400, Steps: ١٢",
]


def random_garbage(count: int) -> list[str]:
    rng = random.Random(1234)
    alphabet = ['"', ",", ":", "\n", "\\", " ", "a", "Z", "9", "-", "x", "Negative prompt:", "Size", "u", "猫"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(count)]


@pytest.mark.parametrize("text", GARBAGE + random_garbage(300))
def test_garbage_never_raises(text):
    prompt, negative, params = parse_infotext(text)
    assert isinstance(prompt, str) and isinstance(negative, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
    fields = request_from_infotext(text)
    assert fields["prompt"] == prompt and fields["negative_prompt"] == negative


def test_reading_parameters_does_not_load_torch():
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from modules.images import infotext; "
        f"infotext.parse_infotext({A1111_WRITTEN!r}); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_refiner_keys_map_onto_the_refiner_fields():
    text = "a castle\nSteps: 30, Seed: 1, Size: 1024x1024, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.75"
    fields = request_from_infotext(text)
    assert (fields["refiner_checkpoint"], fields["refiner_switch_at"]) == ("sd_xl_refiner_1.0 [7440042bbd]", 0.75)
