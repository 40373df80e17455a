"""Textual-inversion inputs: learning-rate schedules, dataset folders, prompt templates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from modules.training import ti_dataset
from modules.training.lr_schedule import UNTIL_END, ScheduleError, parse_schedule
from tests.tiny import tiny_sd_model

TEMPLATES = Path(__file__).resolve().parent.parent / "textual_inversion_templates"


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("0.005", [(0.005, UNTIL_END)]),
        ("0.005:100, 1e-3:1000, 1e-5", [(0.005, 100), (1e-3, 1000), (1e-5, UNTIL_END)]),
        (" 1e-3 : 500 ,1e-4:-1", [(1e-3, 500), (1e-4, UNTIL_END)]),
        ("0.1:10,0.01:20", [(0.1, 10), (0.01, 20)]),
    ],
)
def test_schedules_parse(text, pieces):
    assert list(parse_schedule(text).pieces) == pieces


def test_schedule_rates_by_step():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5")
    assert [schedule.rate(s) for s in (1, 100, 101, 1000, 1001, 10**6)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.end_step is None
    bounded = parse_schedule("0.1:10, 0.01:20")
    assert (bounded.rate(20), bounded.rate(21), bounded.end_step) == (0.01, None, 20)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("fast", "'fast' is not a learning rate"),
        ("0.01:ten", "'ten' is not a whole step number"),
        ("0.01:100, 0.001:50", "step 50 does not come after step 100"),
        ("0.01, 0.001:50", "never reached"),
        ("-0.01", "positive"),
        ("nan", "positive"),
        ("0.01:0", "1 or more"),
        ("0.01:100,, 0.1", "is not a learning rate"),
    ],
)
def test_bad_schedules_say_what_is_wrong(text, words):
    with pytest.raises(ScheduleError, match=words):
        parse_schedule(text)


def test_schedule_error_points_at_the_piece():
    with pytest.raises(ScheduleError, match=r"'0.001:x' \(at character 11\)"):
        parse_schedule("0.01:100, 0.001:x")


def test_filewords_shuffle_and_dropout_are_seeded():
    caption = "red, circle, large, left, white background"
    assert ti_dataset.filewords(caption, random.Random(0), shuffle=False, dropout=0) == caption
    shuffled = ti_dataset.filewords(caption, random.Random(1), shuffle=True, dropout=0)
    assert shuffled != caption and sorted(shuffled.split(", ")) == sorted(caption.split(", "))
    assert shuffled == ti_dataset.filewords(caption, random.Random(1), shuffle=True, dropout=0)
    kept = [len(ti_dataset.filewords(caption, random.Random(s), shuffle=False, dropout=0.5).split(", ")) for s in range(200)]
    assert 2.0 < sum(kept) / len(kept) < 3.2  # about half of five tags survive
    assert ti_dataset.filewords(caption, random.Random(0), shuffle=False, dropout=1.0) == ""


def test_templates_fill_and_shipped_files_use_the_placeholders():
    assert ti_dataset.fill_template("a [name], [filewords]", "zork", "red") == "a zork, red"
    for name in ("subject", "style", "subject_filewords", "style_filewords"):
        lines = ti_dataset.read_templates(TEMPLATES / f"{name}.txt")
        assert lines and all("[name]" in line for line in lines)
        assert all(("[filewords]" in line) == name.endswith("filewords") for line in lines)


def test_bad_template_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ti_dataset.DatasetError, match="empty.txt has no lines"):
        ti_dataset.read_templates(tmp_path / "empty.txt")
    with pytest.raises(ti_dataset.DatasetError, match="missing.txt"):
        ti_dataset.read_templates(tmp_path / "missing.txt")


def _image(path: Path, colour, size=(40, 24)) -> None:
    Image.new("RGB", size, colour).save(path)


def test_dataset_reads_captions_and_encodes_each_picture(tmp_path):
    _image(tmp_path / "0001-a_red_thing.png", (255, 0, 0))
    _image(tmp_path / "blue.jpg", (0, 0, 255))
    (tmp_path / "blue.txt").write_text("a blue  thing,\n plain")
    (tmp_path / "notes.md").write_text("not an image")
    model = tiny_sd_model(seed=0)
    pictures = ti_dataset.load_pictures(model, tmp_path, size=32, latent_sampling="deterministic")
    assert [p.caption for p in pictures] == ["a red thing", "a blue thing, plain"]
    assert pictures[0].mean.shape == (4, 32 // model.downscale, 32 // model.downscale)
    assert torch.equal(pictures[0].fixed, pictures[0].mean)
    assert not torch.allclose(pictures[0].mean, pictures[1].mean)

    once = ti_dataset.load_pictures(model, tmp_path, size=32, latent_sampling="once", seed=3)
    assert not torch.equal(once[0].fixed, once[0].mean)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ti_dataset.latent_for(once[0], "once", g), ti_dataset.latent_for(once[0], "once", g))
    assert not torch.equal(ti_dataset.latent_for(once[0], "random", g), ti_dataset.latent_for(once[0], "random", g))


def test_bad_dataset_folders(tmp_path):
    model = tiny_sd_model(seed=0)
    with pytest.raises(ti_dataset.DatasetError, match="does not exist"):
        ti_dataset.load_pictures(model, tmp_path / "nope", size=32)
    with pytest.raises(ti_dataset.DatasetError, match="holds no images"):
        ti_dataset.load_pictures(model, tmp_path, size=32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ti_dataset.DatasetError, match="broken.png is not a readable image"):
        ti_dataset.load_pictures(model, tmp_path, size=32)
    with pytest.raises(ti_dataset.DatasetError, match="latent sampling method"):
        ti_dataset.load_pictures(model, tmp_path, size=32, latent_sampling="sometimes")
