"""No body sent to a /sdapi/v1 POST route gets a 5xx. Bodies are drawn from the routes' own body
models: a few fields each, holding either a cheap value within the field's limits or junk
(text with any code point, NUL and lone surrogates among them; numbers out of range, NaN and
infinities; wrong types; nulls; nested lists and objects), on the tiny model.

Examples are derandomised, so a run repeats the last; HYPOTHESIS_PROFILE=explore draws many
more, freshly, to look for new failures."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import typing

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from modules.api import models as api
from modules.api import routes
from modules.api.training import CreateEmbeddingBody, TrainEmbeddingBody
from modules.app.config import Flags
from modules.app.fields import Bounds, Choices, limits
from modules.context import AppContext
from modules.images import storage
from modules.sampling.registry import SAMPLERS

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=500, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def png(size=(8, 8), colour=(200, 30, 30), text: dict[str, str] | None = None) -> str:
    return base64.b64encode(storage.png_bytes(Image.new("RGB", size, colour), None, text)).decode()


PICTURE = png()
MASK = png(colour=(255, 255, 255))

# Text that has broken servers: any code point (st.characters() includes the surrogates), and a
# few written out so that every run tries them.
TEXT = st.one_of(
    st.text(st.characters(), max_size=12),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "x\udfffy", "\ud83d\ude00", "\ufeff", "é", "<lora:nope:1>",
                     "<hypernet:x:1>", "[a:b:0.5]", "[a|b]", "(a:1e308)", "((((", "]]]", "AND", "BREAK", "a:b:c",
                     "../..", "/", "~", "\\", "%s", "{}", "None", "Latent", "Euler a", "Karras", "-1", "nan"]),
)
# Numbers at the edges; no huge values in range, so a junk value never costs a large picture.
NUMBER = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**31, -(2**31), 2**63, 2**64, 10**30, -(10**30), float("nan"), float("inf"), float("-inf"),
                     -0.0, 0.5, 1e308, -1e308, 5e-324, 1.0000001]),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=5)


def within(rule: Bounds | Choices) -> st.SearchStrategy:
    """A cheap value inside the rule: the low end of a range, any of the choices."""
    if isinstance(rule, Choices):
        return st.integers(0, len(rule.labels) - 1) if rule.by_index else st.sampled_from(rule.labels)
    if not rule.whole:
        return st.floats(rule.low, min(rule.high, rule.low + 1), exclude_min=not rule.low_allowed)
    first = -(-int(rule.low) // rule.multiple) * rule.multiple
    if not rule.low_allowed and first == rule.low:
        first += rule.multiple
    return st.sampled_from([v for v in (first, first + rule.multiple) if v <= rule.high])


def of_type(annotation) -> st.SearchStrategy:
    """A value of the annotation's type, for a field without limits."""
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-2, 2)
    if annotation is float:
        return st.floats(-2, 2)
    if annotation is str:
        return TEXT
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        return st.lists(of_type(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(TEXT, JUNK, max_size=3)
    if args:  # a union: X | None
        return st.one_of([of_type(a) for a in args])
    if annotation is type(None):
        return st.none()
    return JUNK


def field_values(body: type[BaseModel], special: dict[str, st.SearchStrategy]) -> dict[str, st.SearchStrategy]:
    """For each field of the body: its special values, or a cheap one within its limits or of its
    type, or junk."""
    request_fields = {}
    if issubclass(body, api.RequestBody):
        request_fields = {body.api_names.get(f.name, f.name): f for f in dataclasses.fields(body.request_type)}
    values = {}
    for name, info in body.model_fields.items():
        rule = limits(request_fields[name]) if name in request_fields else None
        usual = special[name] if name in special else within(rule) if rule else of_type(info.annotation)
        values[name] = st.one_of(usual, usual, JUNK)
    return values


@st.composite
def bodies(draw, values: dict[str, st.SearchStrategy], base: dict):
    """The base body with up to four fields changed, or now and then a body that is no object at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JUNK)
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=4, unique=True)):
        body[name] = draw(values[name])
    return body


@pytest.fixture(scope="module")
def fuzz(tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-data")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", root / "models" / "Stable-diffusion")
    pictures = root / "pictures"
    pictures.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(pictures / f"{i}.png")
    ctx = AppContext.create(Flags(data_dir=root, device="cpu", precision="fp32"))
    app = FastAPI()
    routes.install(app, ctx)
    with TestClient(app) as client:  # an exception in a route fails the test with its traceback
        assert client.post("/sdapi/v1/create/embedding", json={"name": "fuzzbed"}).status_code == 200
        yield client, root


def post(client, path: str, body) -> None:
    r = client.post(f"/sdapi/v1{path}", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, f"{path} answered {r.status_code} to {body!r}: {r.text[:500]}"
    assert r.status_code in (200, 404, 422), f"{path} answered {r.status_code} to {body!r}: {r.text[:500]}"
    if r.status_code != 200:
        assert r.json()["detail"], r.text


OVERRIDES = st.dictionaries(st.one_of(st.sampled_from(sorted(routes.OVERRIDES)), TEXT), st.one_of(TEXT, JUNK, st.just("tiny.safetensors")),
                            max_size=2)
SAMPLER = st.one_of(st.sampled_from([s.name for s in SAMPLERS]), TEXT)
# Sizes the tiny UNet (one downsampling) can take: latent sides even, so 16 pixels a step; see
# test_every_size_the_request_allows_generates for the others.
SIDE = st.sampled_from([64, 80])
GENERATION = {"override_settings": OVERRIDES, "sampler_name": SAMPLER, "sampler_index": SAMPLER,
              "prompt": TEXT, "negative_prompt": TEXT, "width": SIDE, "height": SIDE,
              "hr_scale": st.sampled_from([1, 2]), "hr_resize_x": st.sampled_from([0, 128]),
              "hr_resize_y": st.sampled_from([0, 128])}

TXT2IMG = bodies(field_values(api.Txt2ImgBody, GENERATION), {"steps": 1, "width": 64, "height": 64})
IMG2IMG = bodies(
    field_values(api.Img2ImgBody, {
        **GENERATION,
        "init_images": st.lists(st.one_of(st.just(PICTURE), st.just(png((64, 8))), TEXT), max_size=2),
        "mask": st.one_of(st.just(MASK), st.just(PICTURE), TEXT),
        "script_name": st.one_of(st.just("outpainting mk2"), st.just("Poor man's outpainting"), TEXT),
        "script_args": st.lists(st.one_of(st.sampled_from([0, 16]), TEXT, JUNK), max_size=5),
    }),
    {"init_images": [PICTURE], "steps": 2, "width": 64, "height": 64},
)
UPSCALER = st.one_of(st.sampled_from(["None", "Lanczos", "Nearest"]), TEXT)
EXTRAS = {"upscaler_1": UPSCALER, "upscaler_2": UPSCALER}
SINGLE = bodies(field_values(api.ExtrasSingleImageBody, {**EXTRAS, "image": st.one_of(st.just(PICTURE), TEXT)}),
                {"image": PICTURE, "upscaler_1": "Lanczos"})
ITEM = st.fixed_dictionaries({"data": st.one_of(st.just(PICTURE), TEXT)}, optional={"name": TEXT})
BATCH = bodies(field_values(api.ExtrasBatchImagesBody, {**EXTRAS, "imageList": st.lists(st.one_of(ITEM, JUNK), max_size=3)}),
               {"imageList": [{"data": PICTURE, "name": "a.png"}], "upscaler_1": "Lanczos"})
PNG_INFO = bodies({"image": st.one_of(
    st.builds(lambda k, v: png(text={k: v}), st.sampled_from(["parameters", "postprocessing", "Comment"]),
              st.text(st.characters(codec="utf-8"), max_size=40)),
    TEXT, JUNK)}, {"image": PICTURE})
CREATE = bodies(field_values(CreateEmbeddingBody, {"name": st.one_of(st.sampled_from(["fuzz", "fuzz.2"]), TEXT)}),
                {"name": "fuzz"})
OPTIONS = bodies({"sd_model_checkpoint": st.one_of(st.just("tiny.safetensors"), TEXT, JUNK), "CLIP_stop_at_last_layers": JUNK,
                  "sd_vae": st.one_of(st.sampled_from(["Automatic", "None"]), TEXT, JUNK), "ESRGAN_tile": st.one_of(NUMBER, JUNK),
                  "samples_save": JUNK, "show_progress_every_n_steps": st.one_of(NUMBER, JUNK), "samples_format": JUNK}, {})
INTERROGATE = bodies({"image": st.one_of(st.just(PICTURE), TEXT, JUNK),
                      "model": st.one_of(st.sampled_from(["clip", "deepdanbooru"]), TEXT)}, {"image": PICTURE})


def train_bodies(root):
    return bodies(
        field_values(TrainEmbeddingBody, {
            "embedding_name": st.one_of(st.just("fuzzbed"), TEXT),
            "data_root": st.one_of(st.sampled_from([str(root / "pictures"), "pictures", str(root), "/", "/etc", "../.."]), TEXT),
            "template_filename": st.one_of(st.sampled_from(["subject_filewords.txt", "none.txt"]), TEXT),
            "learn_rate": st.one_of(st.sampled_from(["0.005", "0.005:1, 1e-3", "1:0"]), TEXT),
        }),
        {"embedding_name": "fuzzbed", "data_root": str(root / "pictures"), "training_width": 64, "steps": 1,
         "save_embedding_every": 0, "create_image_every": 0},
    )


def examples(n: int):
    return settings(settings.get_profile(PROFILE), **({"max_examples": n} if PROFILE == "ci" else {}))


@examples(40)
@given(body=TXT2IMG)
def test_txt2img(fuzz, body):
    post(fuzz[0], "/txt2img", body)


@examples(30)
@given(body=IMG2IMG)
def test_img2img(fuzz, body):
    post(fuzz[0], "/img2img", body)


@examples(40)
@given(body=SINGLE)
def test_extra_single_image(fuzz, body):
    post(fuzz[0], "/extra-single-image", body)


@examples(30)
@given(body=BATCH)
def test_extra_batch_images(fuzz, body):
    post(fuzz[0], "/extra-batch-images", body)


@examples(40)
@given(body=PNG_INFO)
def test_png_info(fuzz, body):
    post(fuzz[0], "/png-info", body)


@examples(30)
@given(body=CREATE)
def test_create_embedding(fuzz, body):
    post(fuzz[0], "/create/embedding", body)


@examples(30)
@given(data=st.data())
def test_train_embedding(fuzz, data):
    client, root = fuzz
    post(client, "/train/embedding", data.draw(train_bodies(root)))


@examples(30)
@given(body=OPTIONS)
def test_options(fuzz, body):
    post(fuzz[0], "/options", body)


@examples(20)
@given(body=INTERROGATE)
def test_interrogate(fuzz, body):
    post(fuzz[0], "/interrogate", body)


@examples(30)
@given(path=st.sampled_from(["/refresh-checkpoints", "/interrupt", "/skip", "/refresh-vae", "/refresh-embeddings",
                             "/refresh-loras", "/unload-checkpoint", "/reload-checkpoint", "/create/hypernetwork",
                             "/train/hypernetwork", "/server-stop", "/server-restart", "/server-kill"]), body=JUNK)
def test_routes_without_a_body(fuzz, path, body):
    post(fuzz[0], path, body)


@pytest.mark.parametrize("body, words", [
    ({"prompt": "a\x00b"}, "prompt holds NUL (U+0000) at character 2"),
    ({"negative_prompt": "\ud800"}, "negative_prompt holds a lone surrogate (U+D800) at character 1"),
    ({"styles": ["x\udfff"]}, "styles holds a lone surrogate (U+DFFF) at character 2"),
])
def test_text_no_file_can_hold_is_refused_naming_the_field_and_character(fuzz, body, words):
    r = fuzz[0].post("/sdapi/v1/txt2img", content=json.dumps({"steps": 1, "width": 64, "height": 64, **body}),
                     headers={"content-type": "application/json"})
    assert r.status_code == 422 and words in r.json()["detail"]


def test_a_refusal_quoting_what_json_cannot_hold_still_answers(fuzz):
    """FastAPI's own 422 quotes the input: a lone surrogate comes back escaped, NaN as text."""
    r = fuzz[0].post("/sdapi/v1/png-info", content=b'{"image": ["\\ud800"]}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == ["\ud800"]
    r = fuzz[0].post("/sdapi/v1/create/embedding", content=b'{"name": "x", "num_vectors_per_token": NaN}',
                     headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "nan"


def test_every_size_the_request_allows_generates(fuzz):
    # 72 px is a 9-cell latent side, which the UNet's downsampling does not halve evenly.
    r = fuzz[0].post("/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 72})
    assert r.status_code == 200, r.text
    picture = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert picture.size == (64, 72)
