"""A1111's routes about the server itself (modules/api/system.py) and /options with the server's
settings: each answer's fields by A1111's names (from its modules/api/models.py), and what they hold."""

import base64
import dataclasses
import io
import json
import os
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from modules.api import routes
from modules.app.config import Settings, load_settings
from modules.service.auth import Credentials, SignIn, Throttle
from tests.server import running_server

# Field names of A1111's response models and flags.
SD_VAE_ITEM = {"model_name", "filename"}
FACE_RESTORER_ITEM = {"name", "cmd_dir"}
REALESRGAN_ITEM = {"name", "path", "scale"}
MEMORY = {"ram", "cuda"}
RAM = {"free", "used", "total"}
CUDA = {"system", "active", "allocated", "reserved", "inactive", "events"}
A1111_FLAGS = {"listen", "port", "data_dir", "ckpt", "use_cpu", "device_id", "precision", "no_half", "no_half_vae",
               "medvram", "lowvram", "api", "gradio_auth", "gradio_auth_path", "api_auth", "api_server_stop"}
A1111_OPTIONS = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "randn_source", "inpainting_mask_weight", "sd_vae",
                 "show_progress_every_n_steps", "samples_save", "ESRGAN_tile", "ESRGAN_tile_overlap"}
BODY = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3}


def client(ctx, sign_in=None) -> tuple[TestClient, FastAPI]:
    app = FastAPI()
    routes.install(app, ctx, sign_in)
    return TestClient(app), app


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def put(path, data: bytes = b"weights") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_cmd_flags_by_a1111_names_without_passwords(ctx):
    ctx.flags = dataclasses.replace(ctx.flags, api_auth=("ann:s3cret",), gradio_auth=("bob:hunter2",), queue_size=3)
    answer = client(ctx)[0].get("/sdapi/v1/cmd-flags")
    flags = answer.json()
    assert A1111_FLAGS <= set(flags)
    assert flags["use_cpu"] == ["all"] and flags["device_id"] is None and flags["listen"] is False
    assert flags["data_dir"] == str(ctx.paths.root) and flags["port"] == 7860 and flags["api_server_stop"] is False
    assert flags["queue_size"] == 3  # ours, which A1111 lacks, under our own name
    assert flags["api_auth"] and flags["gradio_auth"]
    assert "s3cret" not in answer.text and "hunter2" not in answer.text


def test_sd_vae_and_sd_modules_list_the_vae_folder(ctx):
    http = client(ctx)[0]
    assert http.get("/sdapi/v1/sd-vae").json() == []
    put(ctx.paths.vae / "soft.safetensors")
    assert http.post("/sdapi/v1/refresh-vae").json() is None  # as A1111 answers
    listed = http.get("/sdapi/v1/sd-vae").json()
    assert listed == [{"model_name": "soft.safetensors", "filename": str(ctx.paths.vae / "soft.safetensors")}]
    assert set(listed[0]) == SD_VAE_ITEM
    assert http.get("/sdapi/v1/sd-modules").json() == listed
    # What it lists is what the sd_vae option takes.
    assert http.post("/sdapi/v1/options", json={"sd_vae": "soft.safetensors"}).json()["sd_vae"] == "soft.safetensors"


def test_refresh_loras_and_embeddings_pick_up_new_files(ctx):
    http = client(ctx)[0]
    assert http.get("/sdapi/v1/loras").json() == []
    save_file({"lora_unet_x.alpha": torch.ones(())}, ctx.paths.lora / "fresh.safetensors")
    assert http.post("/sdapi/v1/refresh-loras").json() is None
    assert [lora["name"] for lora in http.get("/sdapi/v1/loras").json()] == ["fresh"]

    assert http.get("/sdapi/v1/embeddings").json()["loaded"] == {}
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "step": 7}, ctx.paths.embeddings / "newbed.pt")
    assert http.post("/sdapi/v1/refresh-embeddings").json() is None
    embeddings = http.get("/sdapi/v1/embeddings").json()
    found = {**embeddings["loaded"], **embeddings["skipped"]}
    assert found["newbed"]["vectors"] == 2 and found["newbed"]["step"] == 7


def test_hypernetworks_are_an_empty_list_and_refused_by_name(ctx):
    http = client(ctx)[0]
    assert http.get("/sdapi/v1/hypernetworks").json() == []
    for path in ("/sdapi/v1/create/hypernetwork", "/sdapi/v1/train/hypernetwork"):
        answer = http.post(path, json={"name": "hn"})
        assert answer.status_code == 422 and "hypernetworks are not supported" in answer.json()["detail"]


def test_face_restorers_with_a_model_file(ctx):
    http = client(ctx)[0]
    assert http.get("/sdapi/v1/face-restorers").json() == []
    (ctx.paths.models / "Codeformer").mkdir()  # a folder without a model file lists nothing
    put(ctx.paths.models / "GFPGAN" / "GFPGANv1.4.pth")
    listed = http.get("/sdapi/v1/face-restorers").json()
    assert listed == [{"name": "GFPGAN", "cmd_dir": str(ctx.paths.models / "GFPGAN")}]
    assert set(listed[0]) == FACE_RESTORER_ITEM


def test_realesrgan_models_from_the_upscalers(ctx):
    put(ctx.paths.models / "RealESRGAN" / "RealESRGAN_x2plus.pth")
    put(ctx.paths.esrgan / "4x-UltraSharp.pth")  # ESRGAN, not Real-ESRGAN
    listed = client(ctx)[0].get("/sdapi/v1/realesrgan-models").json()
    assert listed == [{"name": "RealESRGAN_x2plus", "path": str(ctx.paths.models / "RealESRGAN" / "RealESRGAN_x2plus.pth"),
                       "scale": 2}]
    assert set(listed[0]) == REALESRGAN_ITEM


def test_memory_in_a1111s_shape(ctx):
    memory = client(ctx)[0].get("/sdapi/v1/memory").json()
    assert set(memory) == MEMORY and set(memory["ram"]) == RAM
    assert memory["ram"]["total"] > 0 and memory["ram"]["free"] + memory["ram"]["used"] == memory["ram"]["total"]
    if torch.cuda.is_available():
        assert set(memory["cuda"]) == CUDA
    else:
        assert memory["cuda"] == {"error": "unavailable"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_of_the_gpu(data_dir):
    from modules.app.config import Flags
    from modules.context import AppContext

    ctx = AppContext.create(Flags(data_dir=data_dir, device="cuda"))
    http = client(ctx)[0]
    assert http.post("/sdapi/v1/reload-checkpoint").status_code == 200
    cuda = http.get("/sdapi/v1/memory").json()["cuda"]
    assert set(cuda) == CUDA and cuda["system"]["total"] > cuda["system"]["free"] > 0
    assert cuda["allocated"]["current"] > 0 and set(cuda["events"]) == {"retries", "oom"}


def loaded(ctx):
    return ctx.models.loaded_resolution() is not None


def test_unload_then_txt2img_loads_again(ctx):
    http = client(ctx)[0]
    assert http.post("/sdapi/v1/txt2img", json=BODY).status_code == 200 and loaded(ctx)
    assert http.post("/sdapi/v1/unload-checkpoint").json() == {}
    assert not loaded(ctx)
    answer = http.post("/sdapi/v1/txt2img", json=BODY)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1 and loaded(ctx)


def test_reload_loads_the_callers_own_checkpoint_in_their_job(ctx, checkpoint_loads):
    loads = checkpoint_loads
    http = client(ctx, SignIn(Credentials([("ann", "pw"), ("bob", "pw")], "--api-auth"), Throttle()))[0]
    ann, bob = ({"Authorization": "Basic " + base64.b64encode(f"{u}:pw".encode()).decode()} for u in ("ann", "bob"))
    shipped = next(c for c in ctx.models.checkpoints() if c.path != ctx.models.default_checkpoint().path)
    http.post("/sdapi/v1/options", json={"sd_model_checkpoint": shipped.title}, headers=ann)
    assert http.post("/sdapi/v1/reload-checkpoint", headers=ann).json() == {}
    assert http.post("/sdapi/v1/reload-checkpoint", headers=bob).json() == {}
    assert loads == [(shipped.path.name, "ann"), ("tiny.safetensors", "bob")]


def test_interrogate_names_the_folder_its_model_needs(ctx):
    http = client(ctx)[0]
    answer = http.post("/sdapi/v1/interrogate", json={"image": png()})
    assert answer.status_code == 404 and str(ctx.paths.models / "BLIP") in answer.json()["detail"]
    answer = http.post("/sdapi/v1/interrogate", json={"image": png(), "model": "deepdanbooru"})
    assert answer.status_code == 404 and str(ctx.paths.models / "torch_deepdanbooru") in answer.json()["detail"]
    answer = http.post("/sdapi/v1/interrogate", json={"image": png(), "model": "owl"})
    assert answer.status_code == 404 and "'owl' not found" in answer.json()["detail"]
    assert http.post("/sdapi/v1/interrogate", json={"image": "bm90IGEgcGljdHVyZQ=="}).status_code == 422
    assert http.post("/sdapi/v1/interrogate", json={}).status_code == 404
    put(ctx.paths.models / "BLIP" / "model_base_caption_capfilt_large.pth")
    answer = http.post("/sdapi/v1/interrogate", json={"image": png()})
    assert answer.status_code == 422 and "model_base_caption_capfilt_large.pth" in answer.json()["detail"]


def test_server_control_is_off_without_the_flag(ctx):
    http, app = client(ctx)
    app.state.server = SimpleNamespace(should_exit=False)
    for what in ("server-stop", "server-restart", "server-kill"):
        answer = http.post(f"/sdapi/v1/{what}")
        assert answer.status_code == 404 and "--api-server-stop" in answer.json()["detail"]
    assert app.state.server.should_exit is False
    assert "/sdapi/v1/server-stop" not in http.get("/openapi.json").json()["paths"]


def test_server_control_with_the_flag(ctx, monkeypatch):
    ctx.flags = dataclasses.replace(ctx.flags, api_server_stop=True)
    http, app = client(ctx)
    answer = http.post("/sdapi/v1/server-stop")
    assert answer.status_code == 409 and "not started by webui.py" in answer.json()["detail"]
    app.state.server = SimpleNamespace(should_exit=False)
    answer = http.post("/sdapi/v1/server-stop")
    assert answer.status_code == 200 and answer.text == "Stopping." and app.state.server.should_exit is True
    answer = http.post("/sdapi/v1/server-restart")
    assert answer.status_code == 409 and "server-stop" in answer.json()["detail"]
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    answer = http.post("/sdapi/v1/server-kill")
    assert answer.status_code == 200 and exits == [0]  # after the answer was sent


def test_server_stop_ends_the_real_server_cleanly(data_dir):
    with running_server(data_dir, "--api-server-stop") as url:
        assert httpx.post(f"{url}/sdapi/v1/server-stop", timeout=30).text == "Stopping."
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/sdapi/v1/samplers", timeout=2)
            except httpx.TransportError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server still answers 30 s after server-stop")
    assert "Traceback" not in (data_dir / "server.log").read_text()


def test_options_hold_a1111s_names_for_the_server_settings(ctx):
    options = client(ctx)[0].get("/sdapi/v1/options").json()
    assert A1111_OPTIONS <= set(options)
    assert options["ESRGAN_tile"] == Settings.upscaler_tile
    assert options["show_progress_every_n_steps"] == Settings.live_preview_every
    # Every setting is an option: the server's, or each caller's own with the setting as its default.
    served = {field for field, _ in routes.SERVER_OPTIONS.values()} | {"sd_model_checkpoint", "noise_source"}
    assert served == {f.name for f in dataclasses.fields(Settings)}


def test_a_server_setting_set_by_post_is_read_back_and_saved(ctx):
    http = client(ctx)[0]
    answer = http.post("/sdapi/v1/options", json={"ESRGAN_tile": 256, "samples_save": False, "CLIP_stop_at_last_layers": 2})
    assert answer.status_code == 200, answer.text
    options = http.get("/sdapi/v1/options").json()
    assert (options["ESRGAN_tile"], options["samples_save"], options["CLIP_stop_at_last_layers"]) == (256, False, 2)
    saved = json.loads(ctx.paths.settings_file.read_text())
    assert saved["upscaler_tile"] == 256 and saved["save_images"] is False
    assert load_settings(ctx.paths.settings_file) == ctx.settings
    assert ctx.tiling.size == 256
    assert "CLIP_stop_at_last_layers" not in saved  # the caller's own, not the server's
    assert ctx.preferences.of(None) == {"CLIP_stop_at_last_layers": 2}


@pytest.mark.parametrize(("options", "words"), [
    ({"samples_format": "jpg", "ESRGAN_tile": 64}, "unknown option 'samples_format'"),
    ({"grid_save": True, "face_restoration": True}, "unknown options 'grid_save', 'face_restoration'"),
    ({"ESRGAN_tile": 9999}, "ESRGAN_tile must be a whole number from 0 to 512, got 9999"),
    ({"samples_save": "yes"}, "samples_save must be true or false, got 'yes'"),
    ({"sd_vae": "nope.pt", "ESRGAN_tile": 64}, "sd_vae must be one of Automatic, None, got 'nope.pt'"),
])
def test_bad_options_are_refused_by_name_and_change_nothing(ctx, options, words):
    http = client(ctx)[0]
    before = http.get("/sdapi/v1/options").json()
    answer = http.post("/sdapi/v1/options", json=options)
    assert answer.status_code == 422 and words in answer.json()["detail"]
    assert http.get("/sdapi/v1/options").json() == before
    assert not ctx.paths.settings_file.exists()
