"""Saving images: A1111's folder layout and numbering, the parameters chunk, atomic writes."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest
from PIL import Image

from modules.images import storage
from modules.images.storage import dated_dir, png_bytes, sanitize_prompt, save_image

INFOTEXT = "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 8x8"


def picture(shade: int = 0) -> Image.Image:
    image = Image.new("RGB", (8, 8), (shade, 100, 200))
    image.putpixel((3, 5), (255, 0, shade))
    return image


def test_dated_dir_is_mode_and_today_and_not_created(tmp_path):
    folder = dated_dir(tmp_path, "txt2img")
    assert folder == tmp_path / "txt2img-images" / date.today().isoformat()
    assert not folder.exists()


def test_first_save_creates_the_folder_and_starts_at_zero(tmp_path):
    folder = tmp_path / "txt2img-images" / "2024-01-02"
    path = save_image(picture(), folder, seed=42, prompt="a cat", infotext=INFOTEXT)
    assert path == folder / "00000-42-a cat.png"
    assert os.listdir(folder) == ["00000-42-a cat.png"]


def test_numbering_continues_after_the_highest_existing_number(tmp_path):
    for name in ("00007-1-a.png", "00002-2-b.png", "00012-3-c.txt", "notes.txt", "cat-00099.png"):
        (tmp_path / name).write_bytes(b"x")
    first = save_image(picture(), tmp_path, seed=5, prompt="dog", infotext=None)
    second = save_image(picture(), tmp_path, seed=6, prompt="dog", infotext=None)
    assert (first.name, second.name) == ("00013-5-dog.png", "00014-6-dog.png")


@pytest.mark.parametrize(
    ("prompt", "max_chars", "expected"),
    [
        ('a <red> cat: "fluffy"\n\n  on|a mat?*#', 64, "a red cat fluffy ona mat"),
        ("path/to\\file", 64, "pathtofile"),
        ("tabs\tand\r\nnewlines   and  spaces", 64, "tabs and newlines and spaces"),
        ("ends with dots...", 64, "ends with dots"),
        ("abcdefgh. ij", 10, "abcdefgh"),  # cut, then no trailing dot or space
        ("x" * 100, 64, "x" * 64),
        ("\x00\x1f\x7fcontrol", 64, "control"),
        ("猫 in a box", 64, "猫 in a box"),
        ("  ...  ", 64, ""),
    ],
)
def test_sanitize_prompt(prompt, max_chars, expected):
    assert sanitize_prompt(prompt, max_chars) == expected


def test_saved_name_uses_the_sanitised_prompt(tmp_path):
    path = save_image(picture(), tmp_path, seed=7, prompt='close-up: a "cat"/dog, 4k.', infotext=None, max_prompt=20)
    assert path.name == "00000-7-close-up a catdog, 4.png"
    assert path.is_file()


def test_empty_prompt_leaves_no_dangling_dash(tmp_path):
    assert save_image(picture(), tmp_path, seed=9, prompt="", infotext=None).name == "00000-9.png"


def test_long_multibyte_prompt_stays_within_file_name_limits(tmp_path):
    path = save_image(picture(), tmp_path, seed=1, prompt="🐱" * 64, infotext=None)
    assert len(path.name.encode("utf-8")) <= 255
    assert path.name.startswith("00000-1-🐱")


def test_parameters_chunk_is_readable_by_pil(tmp_path):
    path = save_image(picture(30), tmp_path, seed=42, prompt="a cat", infotext=INFOTEXT)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.info["parameters"] == INFOTEXT
        assert saved.convert("RGB").tobytes() == picture(30).tobytes()


def test_non_latin1_parameters_survive(tmp_path):
    text = "一只猫 🐱\nSteps: 20, Seed: 1, Size: 8x8"
    path = save_image(picture(), tmp_path, seed=1, prompt="猫", infotext=text)
    with Image.open(path) as saved:
        assert saved.info["parameters"] == text


def test_no_parameters_chunk_without_infotext(tmp_path):
    path = save_image(picture(), tmp_path, seed=1, prompt="a", infotext=None)
    with Image.open(path) as saved:
        assert "parameters" not in saved.info


def test_failure_while_encoding_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "00000-1-old.png").write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError("encoder failed halfway")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="halfway"):
        save_image(picture(), tmp_path, seed=2, prompt="new", infotext=INFOTEXT)
    assert os.listdir(tmp_path) == ["00000-1-old.png"]


def test_failure_while_writing_to_disk_leaves_no_file(tmp_path, monkeypatch):
    (tmp_path / "00000-1-old.png").write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"seed 2 in .*No space left"):
        save_image(picture(), tmp_path, seed=2, prompt="new", infotext=INFOTEXT)
    assert os.listdir(tmp_path) == ["00000-1-old.png"]
    assert (tmp_path / "00000-1-old.png").read_bytes() == b"old"


def test_a_name_taken_meanwhile_moves_on_to_the_next_number(tmp_path, monkeypatch):
    real_link = os.link
    taken = []

    def link_after_another_writer(src, dst):
        if not taken:  # another process saves under the same number between our scan and link
            taken.append(dst)
            with open(dst, "wb") as f:
                f.write(b"theirs")
        return real_link(src, dst)

    monkeypatch.setattr(storage.os, "link", link_after_another_writer)
    path = save_image(picture(), tmp_path, seed=3, prompt="mine", infotext=INFOTEXT)
    assert path.name == "00001-3-mine.png"
    assert open(taken[0], "rb").read() == b"theirs"
    with Image.open(path) as saved:
        assert saved.info["parameters"] == INFOTEXT
    assert sorted(os.listdir(tmp_path)) == ["00000-3-mine.png", "00001-3-mine.png"]


def test_file_systems_without_hard_links_still_save(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(storage.os, "link", no_links)
    (tmp_path / "00004-1-a.png").write_bytes(b"x")
    path = save_image(picture(60), tmp_path, seed=8, prompt="b", infotext=INFOTEXT)
    assert path.name == "00005-8-b.png"
    with Image.open(path) as saved:
        assert saved.info["parameters"] == INFOTEXT
        assert saved.convert("RGB").tobytes() == picture(60).tobytes()
    assert sorted(os.listdir(tmp_path)) == ["00004-1-a.png", "00005-8-b.png"]


def test_concurrent_saves_get_distinct_numbers(tmp_path):
    seeds = list(range(100, 116))
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(
            lambda seed: save_image(picture(seed), tmp_path, seed=seed, prompt="race", infotext=f"race\nSeed: {seed}, Steps: 1, Size: 8x8"),
            seeds,
        ))
    assert sorted(p.name[:5] for p in paths) == [f"{n:05}" for n in range(len(seeds))]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no temporary files left
    for seed, path in zip(seeds, paths):
        with Image.open(path) as saved:
            assert saved.info["parameters"] == f"race\nSeed: {seed}, Steps: 1, Size: 8x8"
            assert saved.getpixel((0, 0)) == (seed, 100, 200)


def test_png_bytes_round_trip():
    data = png_bytes(picture(10), INFOTEXT)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.info["parameters"] == INFOTEXT
        assert decoded.convert("RGB").tobytes() == picture(10).tobytes()
    with Image.open(io.BytesIO(png_bytes(picture(10), None))) as plain:
        assert "parameters" not in plain.info


def test_saved_file_holds_exactly_png_bytes(tmp_path):
    path = save_image(picture(20), tmp_path, seed=4, prompt="same", infotext=INFOTEXT)
    assert path.read_bytes() == png_bytes(picture(20), INFOTEXT)
