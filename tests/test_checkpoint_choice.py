"""The checkpoint is each user's own choice: POST /options and the dropdown set the caller's,
requests name theirs, and a checkpoint is loaded only inside a queued job."""

import base64
import json

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from modules.api import routes
from modules.images.infotext import parse_infotext
from modules.models import loader
from modules.service.auth import Credentials, SignIn, Throttle
from modules.service.preferences import Preferences

BODY = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3}


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}


@pytest.fixture
def api(ctx, checkpoint_loads):
    """The API with two users, and the owner of the job running at each checkpoint load."""
    app = FastAPI()
    routes.install(app, ctx, SignIn(Credentials([("ann", "pw"), ("bob", "pw")], "--api-auth"), Throttle()))
    return TestClient(app), checkpoint_loads


def model_of(answer) -> str:
    return parse_infotext(json.loads(answer.json()["info"])["infotexts"][0])[2]["Model"]


def test_each_user_has_their_own_checkpoint_loaded_only_in_their_job(ctx, api):
    http, loads = api
    default = ctx.models.default_checkpoint()
    other = next(c for c in ctx.models.checkpoints() if c.path != default.path)  # the shipped model

    chosen = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": other.name}, headers=basic("ann"))
    assert chosen.status_code == 200 and chosen.json()["sd_model_checkpoint"] == other.title
    assert loads == []  # choosing loads nothing
    assert http.get("/sdapi/v1/options", headers=basic("bob")).json()["sd_model_checkpoint"] == default.title

    assert model_of(http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("ann"))) == other.name
    assert model_of(http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("bob"))) == default.name
    # Each load happened inside the job of the user whose request named the checkpoint.
    assert loads == [(other.path.name, "ann"), (default.path.name, "bob")]
    assert ctx.models.default_checkpoint().path == default.path  # nobody changed the server's default

    # A request's override is for that request; the caller's choice stays.
    override = {**BODY, "override_settings": {"sd_model_checkpoint": default.title}}
    assert model_of(http.post("/sdapi/v1/txt2img", json=override, headers=basic("ann"))) == default.name
    assert http.get("/sdapi/v1/options", headers=basic("ann")).json()["sd_model_checkpoint"] == other.title
    # Choices outlast a restart.
    assert Preferences(ctx.paths.preferences_file).of("ann") == {"sd_model_checkpoint": other.title}


def test_overrides_kept_when_asked_become_the_callers_own_choice(ctx, api):
    http, _ = api
    kept = {**BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": False}
    answer = http.post("/sdapi/v1/txt2img", json=kept, headers=basic("bob"))
    assert answer.status_code == 200 and "Clip skip: 2" in answer.json()["info"]
    assert http.get("/sdapi/v1/options", headers=basic("bob")).json()["CLIP_stop_at_last_layers"] == 2
    assert http.get("/sdapi/v1/options", headers=basic("ann")).json()["CLIP_stop_at_last_layers"] == 1
    assert "Clip skip: 2" in http.post("/sdapi/v1/txt2img", json=BODY, headers=basic("bob")).json()["info"]


@pytest.mark.parametrize(("options", "status", "message"), [
    ({"sd_model_checkpoint": "nope"}, 404, "Checkpoint 'nope' not found"),
    ({"CLIP_stop_at_last_layers": 99}, 422, "CLIP_stop_at_last_layers must be a whole number from 1 to"),
    ({"randn_source": "TPU"}, 422, "randn_source must be one of CPU, GPU"),
    ({"inpainting_mask_weight": "heavy"}, 422, "inpainting_mask_weight must be a number"),
])
def test_bad_options_are_refused_and_change_nothing(ctx, api, options, status, message):
    http, _ = api
    before = http.get("/sdapi/v1/options", headers=basic("ann")).json()
    answer = http.post("/sdapi/v1/options", json=options, headers=basic("ann"))
    assert answer.status_code == status and message in answer.json()["detail"]
    assert http.get("/sdapi/v1/options", headers=basic("ann")).json() == before


def test_options_of_callers_not_signed_in_are_shared_and_lowercase_noise_source_is_taken(ctx):
    app = FastAPI()
    routes.install(app, ctx)
    http = TestClient(app)
    assert http.post("/sdapi/v1/options", json={"randn_source": "gpu"}).json()["randn_source"] == "GPU"
    assert ctx.preferences.of(None) == {"randn_source": "GPU"}


def test_preferences_forget_and_survive_a_damaged_file(tmp_path):
    path = tmp_path / "choices.json"
    prefs = Preferences(path)
    prefs.choose("ann", sd_model_checkpoint="a.safetensors", CLIP_stop_at_last_layers=2)
    assert prefs.choose("ann", CLIP_stop_at_last_layers=None) == {"sd_model_checkpoint": "a.safetensors"}
    assert Preferences(path).of("ann") == {"sd_model_checkpoint": "a.safetensors"}
    assert Preferences(path).of("bob") == {} and Preferences(path).of(None) == {}
    path.write_text("{not json")
    assert Preferences(path).of("ann") == {}


def test_a_checkpoints_spec_is_read_from_its_header_without_loading_it(ctx, monkeypatch):
    tiny = ctx.models.find_checkpoint("tiny")
    monkeypatch.setattr(loader, "load_checkpoint", lambda *a, **k: pytest.fail("spec_of must not load"))
    from_header = ctx.models.spec_of("tiny")
    monkeypatch.undo()
    assert from_header == ctx.models.get("tiny").spec
    # A pickled file's keys cannot be listed without reading it.
    pickled = tiny.path.with_name("pickled.ckpt")
    torch.save({"state_dict": load_file(tiny.path)}, pickled)
    assert ctx.models.spec_of("pickled") is None
