"""The real server on 127.0.0.1, driven over HTTP like an A1111 API client would."""

import base64
import io
import json
from datetime import date

import httpx
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


def txt2img(url, **body):
    return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


BASE = dict(prompt="a red circle, on blue", negative_prompt="blurry", steps=4, width=64, height=64, cfg_scale=5, sampler_name="Euler a")


def test_txt2img_returns_images_with_parameters(server):
    r = txt2img(server, **BASE, seed=123, batch_size=2)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [123, 124]
    images = [decode(b) for b in data["images"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    params = images[1].info["parameters"]
    assert params.startswith("a red circle, on blue\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, ")
    assert "Seed: 124, Size: 64x64" in params
    assert "Model: tiny" in params
    assert params == info["infotexts"][1]


def test_same_seed_same_image_whatever_the_batch(server):
    alone = decode(txt2img(server, **BASE, seed=124).json()["images"][0])
    batched = decode(txt2img(server, **BASE, seed=123, batch_size=2).json()["images"][1])
    # The UNet's float rounding depends on the batch shape (about 1e-4 in the latent), never more.
    difference = np.abs(np.asarray(alone, dtype=int) - np.asarray(batched, dtype=int))
    assert difference.max() <= 2


def test_saved_png_lands_in_dated_folder(server, tiny_data_dir):
    r = txt2img(server, **BASE, seed=77, save_images=True)
    assert r.status_code == 200, r.text
    folder = tiny_data_dir / "outputs" / "txt2img-images" / date.today().isoformat()
    saved = sorted(folder.glob("*-77-*.png"))
    assert saved, list(folder.glob("*"))
    assert Image.open(saved[-1]).info["parameters"] == json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"width": 65}, "multiple of 8"),
        ({"steps": 0}, "steps"),
        ({"sampler_name": "No Such Sampler"}, "Euler a"),
        ({"scheduler": "zigzag"}, "Karras"),
        ({"cfg_scale": "lots"}, "cfg_scale"),
    ],
)
def test_bad_requests_get_a_clear_message_and_the_server_lives_on(server, change, words):
    r = txt2img(server, **{**BASE, **change})
    assert r.status_code == 422
    assert words in r.text
    assert httpx.get(f"{server}/sdapi/v1/samplers").status_code == 200


def test_unknown_checkpoint_is_named(server):
    r = txt2img(server, **BASE, override_settings={"sd_model_checkpoint": "nope.safetensors"})
    assert r.status_code == 404
    assert "nope.safetensors" in r.text and "tiny.safetensors" in r.text


def test_listings(server):
    samplers = {s["name"] for s in httpx.get(f"{server}/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "DPM adaptive"} <= samplers
    models = httpx.get(f"{server}/sdapi/v1/sd-models").json()
    # The data folder's own, then the built-in model that comes with the code.
    assert [m["title"] for m in models] == ["tiny.safetensors", "builtin-shapes.safetensors"]


def test_png_info_reads_back_what_we_wrote(server):
    image = txt2img(server, **BASE, seed=5).json()["images"][0]
    r = httpx.post(f"{server}/sdapi/v1/png-info", json={"image": image})
    assert r.status_code == 200
    assert r.json()["parameters"]["Seed"] == "5"
    assert r.json()["parameters"]["Prompt"] == "a red circle, on blue"
    bad = httpx.post(f"{server}/sdapi/v1/png-info", json={"image": base64.b64encode(b"not a picture").decode()})
    assert bad.status_code == 422 and "could not be read" in bad.text


def test_create_and_train_an_embedding(server, tiny_data_dir, tmp_path):
    pictures = tiny_data_dir / "training-pictures"  # a dataset must lie in the data folder
    pictures.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 200, 40 * i)).save(pictures / f"{i}.png")
    r = httpx.post(f"{server}/sdapi/v1/create/embedding", json={"name": "apibed", "num_vectors_per_token": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["info"].endswith("apibed.pt")
    again = httpx.post(f"{server}/sdapi/v1/create/embedding", json={"name": "apibed"}, timeout=60)
    assert again.status_code == 422 and "already exists" in again.text
    body = {"embedding_name": "apibed", "data_root": str(pictures), "training_width": 64, "steps": 3,
            "save_embedding_every": 0, "learn_rate": "0.01"}
    r = httpx.post(f"{server}/sdapi/v1/train/embedding", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert "step: 3 " in r.json()["info"]
    bad = httpx.post(f"{server}/sdapi/v1/train/embedding", json={**body, "learn_rate": "fast"}, timeout=60)
    assert bad.status_code == 422 and "'fast' is not a learning rate" in bad.text
    outside = httpx.post(f"{server}/sdapi/v1/train/embedding", json={**body, "data_root": str(tmp_path)}, timeout=60)
    assert outside.status_code == 422 and str(tiny_data_dir.resolve()) in outside.json()["detail"]
