"""Request fields that carry their limits (modules/app/fields.py), and the API bodies made from the
request dataclasses (modules/api/models.py): a field is declared once, on its request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modules.api import models as api
from modules.api import routes
from modules.api.training import TrainEmbeddingBody
from modules.app import fields
from modules.app.fields import Bounds, Choices, bounded, indexed, one_of
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.postprocess.extras import ExtrasRequest
from modules.training.textual_inversion import TrainingOptions


@pytest.mark.parametrize("value, message", [
    (8, None),
    (64, None),
    (0, "steps must be a whole number from 1 to 64, got 0"),
    (65, "steps must be a whole number from 1 to 64, got 65"),
    (4.0, "steps must be a whole number from 1 to 64, got 4.0"),
    (True, "steps must be a whole number from 1 to 64, got True"),
    ("8", "steps must be a whole number from 1 to 64, got '8'"),
    (12, "steps must be a multiple of 8, got 12"),
])
def test_bounds_of_a_whole_number(value, message):
    assert Bounds(1, 64, multiple=8).problem("steps", value) == message


@pytest.mark.parametrize("value, message", [
    (0.5, None),
    (2, None),
    (0, "scale must be a number above 0 and at most 2, got 0"),
    (float("nan"), "scale must be a number above 0 and at most 2, got nan"),
    (float("inf"), "scale must be a number above 0 and at most 2, got inf"),
])
def test_bounds_of_a_number_above_its_low_end(value, message):
    assert Bounds(0, 2, whole=False, low_allowed=False).problem("scale", value) == message


def test_choices_by_index_and_by_label():
    by_index, by_label = Choices(("fill", "original"), by_index=True), Choices(("CPU", "GPU"), by_index=False)
    assert by_index.problem("fill", 1) is None and by_label.problem("rng", "GPU") is None
    assert by_index.problem("fill", 2) == "fill must be one of 0 (fill), 1 (original); got 2"
    assert by_index.problem("fill", "original") == "fill must be one of 0 (fill), 1 (original); got 'original'"
    assert by_label.problem("rng", "gpu") == "rng must be one of CPU, GPU, got 'gpu'"


@dataclass(frozen=True)
class Example:
    size: int = bounded(512, 64, 1024, multiple=8)
    mode: int = indexed(0, ("a", "b"))
    source: str = one_of("CPU", ("CPU", "GPU"))
    upscale: bool = False
    factor: float = bounded(2.0, 1, 4, whole=False, only_with="upscale")
    note: str = ""


def test_problems_checks_every_limited_field_and_skips_switched_off_ones():
    assert fields.problems(Example()) == []
    assert fields.problems(Example(size=65, mode=5, source="TPU", factor=9.0)) == [
        "size must be a multiple of 8, got 65",
        "mode must be one of 0 (a), 1 (b); got 5",
        "source must be one of CPU, GPU, got 'TPU'",
    ]
    assert fields.problems(Example(upscale=True, factor=9.0)) == ["factor must be a number from 1 to 4, got 9.0"]


def test_a_request_field_is_one_edit_for_the_api_too():
    body = api.request_body("ExampleBody", Example, api_names={"size": "width"}, leave_out=("note",))
    assert list(body.model_fields) == ["width", "mode", "source", "upscale", "factor"]
    schema = body.model_json_schema()["properties"]
    assert {k: schema["width"][k] for k in ("default", "minimum", "maximum", "multipleOf")} == {
        "default": 512, "minimum": 64, "maximum": 1024, "multipleOf": 8}
    assert schema["mode"]["enum"] == [0, 1] and schema["source"]["enum"] == ["CPU", "GPU"]
    sent = body.model_validate({"width": 640, "factor": None, "unknown": 1})
    assert sent.request_fields() == {"size": 640, "mode": 0, "source": "CPU", "upscale": False, "factor": 2.0}
    assert Example(**sent.request_fields()).size == 640


def _defaults(request_type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(request_type)}


def test_txt2img_body_holds_every_request_field_with_its_default():
    body = api.Txt2ImgBody()
    expected = {name: list(v) if isinstance(v, tuple) else v for name, v in _defaults(GenerationRequest).items()
                if name not in api.NOT_BODY_FIELDS}
    assert body.request_fields() == expected
    assert set(_defaults(GenerationRequest)) - set(expected) <= set(routes.OVERRIDES.values())
    assert "n_iter" in api.Txt2ImgBody.model_fields and "batch_count" not in api.Txt2ImgBody.model_fields


def test_img2img_body_takes_a1111s_api_defaults_where_they_differ_from_the_ui():
    values = api.Img2ImgBody(init_images=["x"]).request_fields()
    assert {k: values[k] for k in api.IMG2IMG_API_DEFAULTS} == api.IMG2IMG_API_DEFAULTS
    assert values["mask_blur"] == Img2ImgRequest.mask_blur and values["denoising_strength"] == Img2ImgRequest.denoising_strength
    assert not set(api.HIRES_FIELDS) & set(values)  # the hires fix is txt2img's


def test_sampler_index_mask_blur_pair_and_overrides_reach_the_request():
    body = api.Img2ImgBody.model_validate({
        "init_images": ["x"], "sampler_index": "DPM++ 2M", "mask_blur_x": 6, "mask_blur_y": 6,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "randn_source": "gpu", "inpainting_mask_weight": 0.5},
    })
    request = routes.img2img_request_from_body(body)
    assert (request.sampler_name, request.mask_blur, request.clip_skip) == ("DPM++ 2M", 6, 2)
    assert (request.noise_source, request.inpainting_mask_weight) == ("GPU", 0.5)
    named = routes.request_from_body(api.Txt2ImgBody(sampler_name="Euler", sampler_index="DPM++ 2M"))
    assert named.sampler_name == "Euler"


def test_extras_and_training_bodies_use_a1111s_names_for_their_requests_fields():
    extras = api.ExtrasBody(extras_upscaler_2_visibility=0.25, upscaler_1="Lanczos").request_fields()
    assert extras == {**_defaults(ExtrasRequest), "upscaler_2_visibility": 0.25, "upscaler_1": "Lanczos"}
    training = TrainEmbeddingBody(embedding_name="cat", data_root="/data", gradient_step=4).request_fields()
    assert training["embedding"] == "cat" and training["gradient_steps"] == 4
    assert training["template"] == "subject_filewords.txt" and training["preview_every"] == 0  # A1111's API defaults
    assert training["batch_size"] == TrainingOptions.batch_size
    assert "embedding_name" in TrainEmbeddingBody.model_json_schema()["required"]


def test_the_openapi_schema_shows_the_requests_limits(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    schemas = TestClient(app).get("/openapi.json").json()["components"]["schemas"]
    width = schemas["Txt2ImgBody"]["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 4096, 8)
    fill = schemas["Img2ImgBody"]["properties"]["inpainting_fill"]
    assert fill["default"] == 0 and fill["enum"] == [0, 1, 2, 3]


def test_widget_values_become_request_fields_of_the_right_types():
    from modules.ui.common import form_fields

    values = {"steps": 20.0, "cfg_scale": 7, "seed": None, "checkpoint": "", "styles": ["a", "b"], "enable_hr": 1,
              "prompt": "a cat"}
    fields = form_fields(GenerationRequest, values)
    assert fields == {"steps": 20, "cfg_scale": 7.0, "styles": ("a", "b"), "enable_hr": True, "prompt": "a cat"}
    assert [type(fields[k]) for k in ("steps", "cfg_scale")] == [int, float]
    request = GenerationRequest(**fields)
    assert (request.seed, request.checkpoint) == (-1, None)  # empty widgets keep the defaults


def test_a_hires_switch_given_as_1_checks_the_hires_fields():
    from modules.app.errors import RequestError

    with pytest.raises(RequestError, match="hr_scale must be a number from 1 to 8, got 20"):
        GenerationRequest(enable_hr=1, hr_scale=20, width=64, height=64).validate()
    assert GenerationRequest(enable_hr=0, hr_scale=20).validate().enable_hr is False


@pytest.mark.parametrize("value, message", [
    ("a cat, é, 😀, \u200b", None),
    (("fine", "also fine"), None),
    ("a\x00b", "note holds NUL (U+0000) at character 2; text may not hold NUL or lone surrogate characters"),
    ("\ud800", "note holds a lone surrogate (U+D800) at character 1"),
    (("ok", "x\udfff"), "note holds a lone surrogate (U+DFFF) at character 2"),
])
def test_text_that_no_file_can_hold_is_named(value, message):
    found = fields.problems(Example(note=value))
    assert found == [] if message is None else found[0].startswith(message)


def test_a_generation_request_names_the_field_and_the_character():
    from modules.app.errors import RequestError

    with pytest.raises(RequestError, match=r"negative_prompt holds NUL \(U\+0000\) at character 4"):
        GenerationRequest(negative_prompt="bad\x00").validate()
    with pytest.raises(RequestError, match=r"styles holds a lone surrogate \(U\+DC80\)"):
        GenerationRequest(styles=("\udc80",)).validate()


def test_samplers_that_pick_their_own_levels_need_two_steps():
    from modules.app.errors import RequestError

    with pytest.raises(RequestError, match="DPM fast needs at least 2 steps"):
        GenerationRequest(sampler_name="DPM fast", steps=1).validate()
    assert GenerationRequest(sampler_name="DPM adaptive", steps=2).validate().steps == 2
    assert GenerationRequest(sampler_name="DPM++ 2M SDE", steps=1).validate().steps == 1
