"""Scripts and hooks: typed arguments checked before a job queues, hook points that see values
and change a job only through what they return, and the script routes of the API."""

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.hooks import Pictures
from modules.generation.request import GenerationRequest
from modules.scripts.base import Arg, Script
from modules.scripts.library import ScriptLibrary
from modules.service.jobs import Job

REQUEST = GenerationRequest(prompt="a red circle", steps=4, width=64, height=64, seed=11)


class Watcher(Script):
    """An always-on script: changes the steps, watches every step, inverts the pictures and
    notes each saved file."""

    title = "Watcher"
    always_on = True
    args = (Arg("Steps", "slider", 3, 1, 10, 1), Arg("Invert", "checkbox", True))

    def __init__(self):
        self.steps, self.saved = [], []

    def hooks(self, values):
        def request(r):
            return r.replace(steps=values["Steps"])

        def step(info):
            self.steps.append((info.step, info.steps, tuple(info.latents.shape)))
            info.latents.zero_()  # a copy: the picture must not change

        def pictures(p):
            if values["Invert"]:
                return Pictures(p.request, p.batch_index, tuple(ImageOps.invert(i) for i in p.images), p.seeds)
            return None

        return {"request": request, "step": step, "pictures": pictures,
                "saved": lambda s: self.saved.append((s.path, s.infotext))}


class Broken(Script):
    title = "Broken"
    always_on = True

    def hooks(self, values):
        def fail(_):
            raise RuntimeError("broken hook")

        return {"request": fail, "pictures": lambda p: Pictures(p.request, p.batch_index, p.images[:0], p.seeds)}


def run(ctx, library, request=REQUEST, save=False, **kwargs):
    return ctx.jobs.run(Job(), library.job(ctx, "txt2img", **kwargs), ctx, request, save=save)


def pixels(image):
    return np.asarray(image).astype(int)


def test_always_on_hooks_see_values_and_change_the_job_only_by_what_they_return(builtin_ctx):
    watcher = Watcher()
    library = ScriptLibrary([watcher])
    hooked = run(builtin_ctx, library, save=True, alwayson={"watcher": {"args": [3, True]}})
    plain = pipeline.generate(builtin_ctx, REQUEST.replace(steps=3), save=False)
    assert "Steps: 3" in hooked.infotexts[0] and hooked.infotexts == plain.infotexts
    assert np.array_equal(pixels(hooked.images[0]), 255 - pixels(plain.images[0]))
    downscale = builtin_ctx.models.get().downscale
    assert watcher.steps == [(i, 3, (1, 4, 64 // downscale, 64 // downscale)) for i in (1, 2, 3)]
    assert watcher.saved == [(hooked.paths[0], hooked.infotexts[0])]
    assert np.array_equal(pixels(Image.open(hooked.paths[0]).convert("RGB")), pixels(hooked.images[0]))
    # Without arguments for it, an always-on script takes no part.
    assert np.array_equal(pixels(run(builtin_ctx, library).images[0]),
                          pixels(pipeline.generate(builtin_ctx, REQUEST, save=False).images[0]))


def test_a_failing_hook_costs_only_its_own_change(builtin_ctx, caplog):
    library = ScriptLibrary([Broken()])
    result = run(builtin_ctx, library, alwayson={"Broken": []})
    plain = pipeline.generate(builtin_ctx, REQUEST, save=False)
    assert np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))
    assert "request hook of Broken failed" in caplog.text and "a pictures hook returned 0 pictures" in caplog.text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"script_name": "X/Z plot"}, "txt2img has no script 'X/Z plot'"),
    ({"alwayson": {"watcher": {"args": [99]}}}, "Watcher: Steps must be from 1 to 10, got 99"),
    ({"alwayson": {"watcher": {"args": [2, "yes"]}}}, "Watcher: Invert must be true or false"),
    ({"alwayson": {"watcher": [1, True, 3]}}, "Watcher takes 2 arguments, got 3"),
    ({"alwayson": {"watcher": {"args": {"Stepz": 2}}}}, "Watcher has no argument 'Stepz'"),
])
def test_script_arguments_are_checked_before_the_job_queues(builtin_ctx, kwargs, message):
    with pytest.raises(RequestError, match=message):
        ScriptLibrary([Watcher()]).job(builtin_ctx, "txt2img", **kwargs)


def test_titles_are_unique_and_tabs_known():
    library = ScriptLibrary([Watcher()])
    with pytest.raises(ValueError, match="exists already"):
        library.add(type("Again", (Watcher,), {"title": "WATCHER"})())
    with pytest.raises(ValueError, match="no tab extras"):
        library.add(type("Elsewhere", (Watcher,), {"title": "Elsewhere", "tabs": ("extras",)})())


def test_script_routes_list_the_scripts_with_their_arguments(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    http = TestClient(app)
    listed = http.get("/sdapi/v1/scripts").json()
    assert "poor man's outpainting" in listed["img2img"] and "poor man's outpainting" not in listed["txt2img"]
    info = {(s["name"], s["is_img2img"]): s for s in http.get("/sdapi/v1/script-info").json()}
    outpainting = info[("poor man's outpainting", True)]
    assert outpainting["is_alwayson"] is False
    assert [a["label"] for a in outpainting["args"]] == ["Pixels to expand", "Mask blur", "Masked content", "Outpainting direction"]
    assert outpainting["args"][0] == {"label": "Pixels to expand", "value": 128, "minimum": 8, "maximum": 256, "step": 8,
                                      "choices": None}
    refused = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                   "script_name": "Poor man's outpainting"})
    assert refused.status_code == 422 and "txt2img has no script" in refused.json()["detail"]
