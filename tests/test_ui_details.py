"""The pure parts of the gallery buttons and the token counters (modules/ui/common.py)."""

import io
import zipfile

import numpy as np
import torch
from PIL import Image

from modules.images import storage
from modules.images.image_info import ImageInfo
from modules.prompting.conditioning import token_count
from modules.prompting.styles import PromptStyle
from modules.ui.common import (
    NO_COUNT,
    chosen_pictures,
    name_tail,
    picture_png,
    picture_texts,
    save_zip,
    token_counter,
)

TINY = "tiny.safetensors"


def test_token_counter_counts_as_the_pipeline_reads_the_prompt(ctx):
    short = "a red circle"
    assert token_counter(ctx, short, 20, TINY) == f"{token_count(short)}/75"
    long = ", ".join(["a red circle on a blue background"] * 12)
    assert 75 < token_count(long) <= 150 and token_counter(ctx, long, 20, TINY) == f"{token_count(long)}/150"
    assert token_counter(ctx, "", 20, TINY) == "0/75"
    assert token_counter(ctx, "a (cat:1.2.3)", 20, TINY) == NO_COUNT  # an unreadable weight
    assert token_counter(ctx, "a <lora:x:big>", 20, TINY) == NO_COUNT  # a weight that is not a number
    assert token_counter(ctx, "a cat <lora:x:1>", 20, TINY) == "2/75"  # tags are not text
    # The most over AND parts and editing steps; a negative prompt is read whole.
    assert token_counter(ctx, "a AND b c", 20, TINY) == "2/75"
    assert token_counter(ctx, "a AND b c", 20, TINY, negative=True) == "4/75"
    assert token_counter(ctx, "[a:b c d:5]", 20, TINY) == "3/75"


def test_token_counter_counts_styles_and_embedding_vectors(ctx):
    ctx.styles.save(PromptStyle("framed", "{prompt} in a gold frame", "ugly, blurry"))
    assert token_counter(ctx, "a cat", 20, TINY, ["framed"]) == f"{token_count('a cat in a gold frame')}/75"
    assert token_counter(ctx, "red", 20, TINY, ["framed"], negative=True) == f"{token_count('ugly, blurry, red')}/75"
    assert token_counter(ctx, "a cat", 20, TINY, ["gone"]) == NO_COUNT

    width = sum(e.width for e in ctx.models.spec_of(TINY).text)
    ctx.paths.embeddings.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": torch.zeros(5, width)}}, ctx.paths.embeddings / "zqxstyle.pt")
    assert token_counter(ctx, "a zqxstyle", 20, TINY) == "6/75"  # its five vectors
    assert token_counter(ctx, "a zqxstyle", 20, "no such checkpoint") != NO_COUNT  # the embeddings left out, still counted


def test_the_chosen_picture_or_all():
    gallery = [("a.png", None), ("b.png", None), ("c.png", None)]
    texts = [{"parameters": "a"}, {"parameters": "b"}]  # a picture without text gets none
    assert chosen_pictures(gallery, texts, 1) == [("b.png", {"parameters": "b"})]
    everything = [("a.png", {"parameters": "a"}), ("b.png", {"parameters": "b"}), ("c.png", {})]
    assert chosen_pictures(gallery, texts, None) == everything
    assert chosen_pictures(gallery, texts, 7) == chosen_pictures(gallery, texts, None)  # a choice from an earlier result
    assert chosen_pictures(None, [], None) == []


def test_picture_texts_and_names(ctx):
    assert picture_texts("a cat\nSeed: 5") == {"parameters": "a cat\nSeed: 5"}
    assert picture_texts(None) == {}
    info = ImageInfo(parameters="a cat", items={"postprocessing": "upscaled"})
    assert list(picture_texts(info=info).items()) == [("parameters", "a cat"), ("postprocessing", "upscaled")]
    assert name_tail(ctx, {"parameters": "a cat: big\nSteps: 3, Sampler: Euler, Seed: 42"}) == "42-a cat big"
    # A picture's text names no folder, whatever it says.
    assert "/" not in name_tail(ctx, {"parameters": "../../x/y\nSteps: 3, Sampler: Euler, Seed: ../../etc"})
    assert name_tail(ctx, {}) == ""


def test_a_gallery_picture_is_written_with_its_text_and_zips_take_the_next_number(tmp_path):
    picture = Image.fromarray(np.arange(48 * 3, dtype=np.uint8).reshape(4, 12, 3))
    picture.save(tmp_path / "bare.png")  # as the gallery holds a picture a job did not save
    data = picture_png(str(tmp_path / "bare.png"), {"parameters": "a cat\nSeed: 1", "postprocessing": "x"})
    again = Image.open(io.BytesIO(data))
    assert (np.asarray(again) == np.asarray(picture)).all()
    assert again.info["parameters"] == "a cat\nSeed: 1" and again.info["postprocessing"] == "x"

    folder = tmp_path / "save"
    storage.save_png(data, folder, "1-a cat")
    path = save_zip(b"PK\x05\x06" + bytes(18), folder, "1-a cat")  # an empty archive
    assert path.name == "00001-1-a cat.zip" and zipfile.ZipFile(path).namelist() == []
    assert save_zip(path.read_bytes(), folder, "").name == "00002.zip"
    assert sorted(p.name for p in folder.iterdir()) == ["00000-1-a cat.png", "00001-1-a cat.zip", "00002.zip"]
