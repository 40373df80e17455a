"""Folders a request names on the server (img2img and Extras batches, a training dataset) lie
under the data folder or an --allowed-path one, after symlinks and '..' are resolved."""

from __future__ import annotations

import dataclasses
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from modules.api import routes
from modules.app.config import Flags, Paths, parse_flags
from modules.app.errors import RequestError
from modules.context import AppContext
from modules.postprocess import extras


@pytest.fixture
def outside(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside")
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 200, 40 * i)).save(folder / f"{i}.png")
    return folder


def test_folders_inside_the_data_folder_are_resolved(tmp_path):
    paths = Paths(tmp_path)
    (tmp_path / "in").mkdir()
    assert paths.server_folder(tmp_path / "in", "x") == (tmp_path / "in").resolve()
    assert paths.server_folder("in", "x") == (tmp_path / "in").resolve()  # relative: from the data folder
    assert paths.server_folder(f"  {tmp_path}/in/../in/new  ", "x") == (tmp_path / "in" / "new").resolve()
    assert paths.server_folder(tmp_path, "x") == tmp_path.resolve()


@pytest.mark.parametrize("given", ["{outside}", "..", "in/../../..", "{root}/../{outside_name}", "/", "~"])
def test_folders_outside_are_refused_naming_the_roots(tmp_path, outside, given):
    root = tmp_path / "data"
    (root / "in").mkdir(parents=True)
    text = given.format(outside=outside, root=root, outside_name=outside.name)
    with pytest.raises(RequestError) as error:
        Paths(root).server_folder(text, "Input directory")
    message = str(error.value)
    assert message.startswith(f"Input directory {text!r} is outside")
    assert str(root.resolve()) in message and "--allowed-path" in message


def test_a_symlink_out_of_the_data_folder_is_refused(tmp_path, outside):
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RequestError, match="outside"):
        Paths(tmp_path).server_folder(tmp_path / "link", "x")
    with pytest.raises(RequestError, match="outside"):
        Paths(tmp_path).server_folder("link/new", "x")
    # One that stays inside is followed.
    (tmp_path / "real").mkdir()
    (tmp_path / "inner").symlink_to(tmp_path / "real", target_is_directory=True)
    assert Paths(tmp_path).server_folder("inner", "x") == (tmp_path / "real").resolve()


def test_allowed_paths_extend_the_roots(tmp_path, outside):
    paths = Paths(tmp_path, (outside,))
    assert paths.allowed_roots == [tmp_path.resolve(), outside.resolve()]
    assert paths.server_folder(outside / "sub", "x") == outside.resolve() / "sub"
    with pytest.raises(RequestError, match=re.escape(str(outside.resolve()))):
        paths.server_folder(outside.parent, "x")


def test_a_path_that_is_no_path_is_refused(tmp_path):
    with pytest.raises(RequestError, match="not a usable path"):
        Paths(tmp_path).server_folder("in\x00out", "x")


def test_allowed_path_flag(tmp_path, outside):
    flags = parse_flags(["--data-dir", str(tmp_path), "--allowed-path", str(outside), "--allowed-path", str(tmp_path)])
    assert flags.allowed_paths == (outside.resolve(), tmp_path.resolve())
    assert parse_flags([]).allowed_paths == ()
    with pytest.raises(SystemExit):
        parse_flags(["--allowed-path", str(tmp_path / "missing")])


def test_extras_directory_and_output_are_confined(ctx, outside):
    with pytest.raises(RequestError, match="input directory .* outside"):
        extras.directory_inputs(ctx.paths, outside)
    inputs, _ = extras.directory_inputs(dataclasses.replace(ctx.paths, allowed=(outside,)), outside)
    assert len(inputs) == 2
    with pytest.raises(RequestError, match="output directory .* outside"):
        extras.run(ctx, extras.ExtrasRequest(upscaler_1="Nearest"), inputs, outside / "out")
    assert not (outside / "out").exists()


def client_for(ctx) -> TestClient:
    app = FastAPI()
    routes.install(app, ctx)
    return TestClient(app)


TRAIN = {"embedding_name": "confined", "training_width": 64, "steps": 1, "save_embedding_every": 0}


def test_training_data_root_over_the_api(ctx, data_dir, outside):
    client = client_for(ctx)
    assert client.post("/sdapi/v1/create/embedding", json={"name": "confined"}).status_code == 200
    (data_dir / "escape").symlink_to(outside, target_is_directory=True)
    for data_root in (str(outside), f"{data_dir}/../{outside.name}", "../" + outside.name, str(data_dir / "escape")):
        r = client.post("/sdapi/v1/train/embedding", json={**TRAIN, "data_root": data_root})
        assert r.status_code == 422, data_root
        assert "outside" in r.json()["detail"] and str(data_dir.resolve()) in r.json()["detail"]
    inside = data_dir / "pictures"
    inside.mkdir()
    for picture in outside.iterdir():
        picture.rename(inside / picture.name)
    r = client.post("/sdapi/v1/train/embedding", json={**TRAIN, "data_root": "pictures"})
    assert r.status_code == 200, r.text


def test_allowed_path_lets_training_read_there(data_dir, outside):
    ctx = AppContext.create(Flags(data_dir=data_dir, device="cpu", allowed_paths=(outside,)))
    client = client_for(ctx)
    assert client.post("/sdapi/v1/create/embedding", json={"name": "confined"}).status_code == 200
    r = client.post("/sdapi/v1/train/embedding", json={**TRAIN, "data_root": str(outside)})
    assert r.status_code == 200, r.text
