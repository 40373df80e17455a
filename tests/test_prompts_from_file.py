"""Prompts from file or textbox: each line a prompt or a line of A1111's options, run as the
single request it stands for; seeds iterated as A1111 does; bad lines refused, naming the line,
before anything runs; Interrupt keeps the lines made; the API's script_name path."""

import json

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import MAX_SEED, GenerationRequest
from modules.images.infotext import parse_infotext
from modules.scripts.library import ScriptLibrary
from modules.scripts.prompts_from_file import TITLE, PromptsFromFile
from modules.service.jobs import Job

REQUEST = GenerationRequest(steps=3, width=64, height=64, seed=11)
STAR = "a large red star on a blue background"


def run(ctx, text, request=REQUEST, iterate=False, same_seed=False, position="start", save=False, job=None):
    work = ScriptLibrary.builtin().job(ctx, "txt2img", TITLE, [iterate, same_seed, position, text])
    return ctx.jobs.run(job or Job(), work, ctx, request, save=save)


def requests(ctx, text, request=REQUEST, iterate=False, same_seed=False, position="start"):
    """The request each line runs, without running them."""
    script = PromptsFromFile()
    return [r for _, r in script.line_requests(ctx, request, script.values([iterate, same_seed, position, text]))]


def pixels(image):
    return np.asarray(image).astype(int)


def test_plain_and_options_lines_make_the_pictures_of_their_single_requests(builtin_ctx):
    text = (f"{STAR}\n\n"
            '--prompt "a small green circle" in the top left corner --negative_prompt "red" --steps 4 --cfg_scale 5 '
            '--seed 5 --sampler_name "euler" --height 72 --n_iter 2\n'
            "--prompt 'a yellow square' --sampler_index 1 --batch_size 2 --steps 2")
    job = Job()
    result = run(builtin_ctx, text, job=job)
    singles = [
        REQUEST.replace(prompt=STAR),
        REQUEST.replace(prompt="a small green circle in the top left corner", negative_prompt="red", steps=4, cfg_scale=5.0,
                        seed=5, sampler_name="Euler", height=72, batch_count=2),
        REQUEST.replace(prompt="a yellow square", sampler_name="DPM++ SDE", batch_size=2, steps=2),
    ]
    made = [pipeline.generate(builtin_ctx, r, save=False) for r in singles]
    assert result.infotexts == [t for m in made for t in m.infotexts]
    assert result.seeds == [11, 5, 6, 11, 12]
    assert "Negative prompt: red\nSteps: 4, Sampler: Euler," in result.infotexts[1] and "Size: 64x72" in result.infotexts[1]
    for ours, single in zip(result.images, [i for m in made for i in m.images]):
        assert np.array_equal(pixels(ours), pixels(single))
    # Progress runs over all lines: 3 steps, 2 x 4, then one batch of 2 (its pictures share the steps).
    assert job.step == job.total_steps == 3 + 8 + 2 and not result.interrupted


def test_a_line_goes_before_or_after_the_requests_own_prompts(builtin_ctx):
    request = REQUEST.replace(prompt="on a blue background", negative_prompt="green")
    text = "a red star\n--prompt 'a circle' --negative_prompt blurry"
    start = requests(builtin_ctx, text, request)
    assert [(r.prompt, r.negative_prompt) for r in start] == [("a red star on a blue background", "green"),
                                                              ("a circle on a blue background", "blurry green")]
    end = requests(builtin_ctx, text, request, position="end")
    assert [(r.prompt, r.negative_prompt) for r in end] == [("on a blue background a red star", "green"),
                                                            ("on a blue background a circle", "green blurry")]
    assert parse_infotext(run(builtin_ctx, "a red star", request.replace(steps=1)).infotexts[0])[:2] == (
        "a red star on a blue background", "green")


def test_seeds_iterate_by_the_requests_pictures_as_a1111(builtin_ctx):
    request = REQUEST.replace(steps=1, batch_count=2)
    text = "a\nb\n--prompt c --seed 100\n--prompt d --n_iter 1"
    # Each line moves on by the request's 2 pictures, whatever a line sets; a line's --seed is its own.
    assert run(builtin_ctx, text, request, iterate=True).seeds == [11, 12, 13, 14, 100, 101, 17]
    assert [r.seed for r in requests(builtin_ctx, text, request)] == [11, 11, 100, 11]
    random = request.replace(seed=-1)
    same = [r.seed for r in requests(builtin_ctx, text, random, same_seed=True)]
    assert same[0] == same[1] == same[3] != -1 and same[2] == 100
    iterated = [r.seed for r in requests(builtin_ctx, text, random, iterate=True)]
    assert iterated[1] == iterated[0] + 2 and iterated[3] == iterated[0] + 6 and iterated[3] + 1 <= MAX_SEED
    each = [r.seed for r in requests(builtin_ctx, "a\nb\nc", random)]
    assert len(set(each)) == 3 and -1 not in each


@pytest.mark.parametrize(("text", "message"), [
    ("a cat\n--steps ten", "line 2: --steps 'ten': must be a whole number"),
    ("--prompt x --foo 1", "line 1: unknown option --foo; the options are --sd_model, --prompt"),
    ("\n\n--width 65 --prompt x", "line 3: --width '65': width must be a multiple of 8"),
    ("--cfg_scale nan", "line 1: --cfg_scale 'nan': must be a finite number"),
    ('--prompt "x', "line 1: cannot be split into options"),
    ("--prompt x --steps", "line 1: --steps has no value"),
    ("--sampler_name Nope", "line 1: --sampler_name 'Nope': Unknown sampler 'Nope'"),
    ("--sampler_index 99", "line 1: --sampler_index '99': must be from 0 to"),
    ("--tiling true", "line 1: --tiling is not supported here"),
    ("--do_not_save_samples maybe", "line 1: --do_not_save_samples 'maybe': must be true or false"),
    ("a red star\n<lora:a:xyz>", "line 2: prompt: 'xyz' is not a number"),
    ("--prompt x cat", None),
    ("\n  \n", "List of prompt inputs is empty"),
])
def test_bad_lines_are_refused_before_the_job_queues(builtin_ctx, text, message):
    if message is None:  # the words after --prompt up to the next option are the prompt, as A1111
        assert requests(builtin_ctx, text)[0].prompt == "x cat"
        return
    with pytest.raises(RequestError, match=f"^{TITLE}: {message}".replace("(", r"\(").replace(")", r"\)")):
        ScriptLibrary.builtin().job(builtin_ctx, "txt2img", TITLE, [False, False, "start", text])


@pytest.mark.parametrize(("line", "message"), [
    ("--sd_model nowhere", "line 2: Checkpoint 'nowhere' not found"),
    ("--styles 'no such style'", "line 2: styles: no style named 'no such style'"),
    # Each option within its limits, the two together not.
    ("--steps 1 --sampler_name 'DPM fast'", "line 2: DPM fast needs at least 2 steps"),
])
def test_a_line_whose_request_is_wrong_stops_the_job_before_any_picture(builtin_ctx, line, message):
    calls = []
    script = PromptsFromFile()
    values = script.values([False, False, "start", f"a red star\n{line}"])
    with pytest.raises(RequestError, match=f"{TITLE}: {message}"):
        script.run(builtin_ctx, REQUEST, values, Job(), lambda *a, **k: calls.append(a), save=False)
    assert calls == []


def test_interrupt_stops_after_the_current_line_and_keeps_it(builtin_ctx):
    calls = []

    def generate(ctx, request, job, save):
        calls.append(request.prompt)
        made = pipeline.generate(ctx, request, job=job, save=save)
        job.interrupt()  # as if pressed while this line ran
        return made

    script, job = PromptsFromFile(), Job()
    values = script.values([False, False, "start", "a red star\na blue circle"])
    result = script.run(builtin_ctx, REQUEST.replace(steps=1), values, job, generate, save=False)
    assert calls == ["a red star"] and result.interrupted and len(result.images) == len(result.infotexts) == 1
    assert "a red star" in result.infotexts[0]


def test_a_line_can_leave_its_pictures_unsaved(builtin_ctx):
    result = run(builtin_ctx, "a red star\n--prompt 'a blue circle' --do_not_save_samples true",
                 REQUEST.replace(steps=1), save=True)
    assert len(result.images) == 2 and len(result.paths) == 1 and "a red star" in result.paths[0].name


def test_api_runs_the_lines_by_script_name(builtin_ctx):
    app = FastAPI()
    routes.install(app, builtin_ctx)
    http = TestClient(app)
    body = {"prompt": "", "steps": 2, "width": 64, "height": 64, "seed": 3, "batch_size": 1,
            "script_name": "prompts from file or textbox", "script_args": [True, False, "start", "a red star\na blue circle"]}
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert len(answer.json()["images"]) == 2 and info["all_seeds"] == [3, 4]
    assert [parse_infotext(t)[0] for t in info["infotexts"]] == ["a red star", "a blue circle"]
    refused = http.post("/sdapi/v1/txt2img", json={**body, "script_args": [False, False, "start", "a red star\n--steps 0"]})
    assert refused.status_code == 422 and "line 2: --steps '0': steps must be" in refused.json()["detail"]
    listed = {s["name"]: s for s in http.get("/sdapi/v1/script-info").json() if not s["is_img2img"]}
    assert [a["label"] for a in listed["prompts from file or textbox"]["args"]] == [
        "Iterate seed every line", "Use same random seed for all lines", "Insert prompts at the", "List of prompt inputs"]
