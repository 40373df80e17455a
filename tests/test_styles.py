"""Prompt styles: A1111's styles.csv read and written, applied to requests, listed by the API."""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from modules.api import routes
from modules.app.errors import RequestError
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.prompting.styles import PromptStyle, StyleLibrary, apply_styles, merge_prompts, read_styles, write_styles

# A file as A1111 writes it (byte-order mark, minimal quoting) with an older "text" column row.
A1111_FILE = (
    "\ufeffname,prompt,negative_prompt\n"
    'Cinematic,"cinematic still of {prompt}, shallow depth of field","cartoon, drawing"\n'
    "Sharp,highly detailed,blurry\n"
    ',"no name, left out",\n'
    '"Two lines","first\nsecond",\n'
)


@pytest.mark.parametrize("style, prompt, expected", [
    ("cinematic still of {prompt}, film grain", "a cat", "cinematic still of a cat, film grain"),
    ("{prompt} :: {prompt}", "x", "x :: x"),
    ("highly detailed", "a cat", "a cat, highly detailed"),
    ("highly detailed", "  a cat  ", "a cat, highly detailed"),
    ("highly detailed", "", "highly detailed"),
    ("", "a cat", "a cat"),
    ("{prompt}", "", ""),
])
def test_merge_prompts(style, prompt, expected):
    assert merge_prompts(style, prompt) == expected


def test_styles_apply_in_the_order_chosen():
    a = PromptStyle("a", "painting of {prompt}", "ugly")
    b = PromptStyle("b", "gold frame", "{prompt}, blurry")
    assert apply_styles("a cat", "", [a, b]) == ("painting of a cat, gold frame", "ugly, blurry")
    # b's "{prompt}" takes the empty negative prompt as it is, as in A1111
    assert apply_styles("a cat", "", [b, a]) == ("painting of a cat, gold frame", ", blurry, ugly")


def test_reads_a1111s_file():
    styles = read_styles(A1111_FILE.lstrip("\ufeff"))
    assert list(styles) == ["Cinematic", "Sharp", "Two lines"]
    assert styles["Cinematic"] == PromptStyle("Cinematic", "cinematic still of {prompt}, shallow depth of field", "cartoon, drawing")
    assert styles["Two lines"].prompt == "first\nsecond"
    assert read_styles("name,text\nOld,old style\n")["Old"].prompt == "old style"
    assert read_styles("") == {}


def test_write_then_read_round_trips():
    styles = [PromptStyle("q", 'say "hi", {prompt}', "a\nb"), PromptStyle("plain", "x", "")]
    assert list(read_styles(write_styles(styles)).values()) == styles


def test_save_adds_replaces_and_keeps_the_rest(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8")
    library = StyleLibrary(path)
    library.save(PromptStyle("New", "watercolor of {prompt}", "photo"))
    library.save(PromptStyle(" Sharp ", "ultra sharp", ""))
    again = StyleLibrary(path).styles()  # a fresh reader sees what was written
    assert list(again) == ["Cinematic", "Sharp", "Two lines", "New"]
    assert again["Sharp"] == PromptStyle("Sharp", "ultra sharp", "")
    assert again["New"].negative_prompt == "photo"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfname,prompt,negative_prompt")
    assert [p.name for p in tmp_path.iterdir()] == ["styles.csv"]  # no temporary file left


def test_changes_on_disk_are_seen(tmp_path):
    path = tmp_path / "styles.csv"
    library = StyleLibrary(path)
    assert library.styles() == {}
    path.write_text("name,prompt,negative_prompt\nA,a,\n", encoding="utf-8")
    assert list(library.styles()) == ["A"]
    path.write_text("name,prompt,negative_prompt\nA,a,\nBB,b,\n", encoding="utf-8")
    assert list(library.styles()) == ["A", "BB"]


def test_a_broken_file_is_reported_and_not_overwritten(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("title,words\nA,a\n", encoding="utf-8")
    library = StyleLibrary(path)
    assert library.styles() == {}
    assert "needs name, prompt, negative_prompt" in library.problem
    with pytest.raises(ValueError, match="fix or move it"):
        library.save(PromptStyle("B", "b"))
    assert path.read_text(encoding="utf-8") == "title,words\nA,a\n"
    with pytest.raises(ValueError, match="needs a name"):
        StyleLibrary(tmp_path / "other.csv").save(PromptStyle("  ", "b"))


def test_request_styles(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8")
    library = StyleLibrary(path)
    assert library.apply("a cat", "text", ("Cinematic", "Sharp")) == (
        "cinematic still of a cat, shallow depth of field, highly detailed", "text, cartoon, drawing, blurry")
    assert library.apply("a cat", "text", ()) == ("a cat", "text")
    with pytest.raises(RequestError, match="no style named 'Nope'; available: Cinematic, Sharp, Two lines"):
        library.apply("a cat", "text", ("Sharp", "Nope"))
    with pytest.raises(RequestError, match="styles must be a list"):
        GenerationRequest(styles="Sharp").validate()


def test_generation_and_api_use_styles(ctx):
    ctx.styles.save(PromptStyle("Framed", "{prompt} in a gold frame", "ugly"))
    result = pipeline.generate(ctx, GenerationRequest(prompt="a cat", steps=2, width=64, height=64, styles=("Framed",)), save=False)
    assert result.infotexts[0].startswith("a cat in a gold frame\nNegative prompt: ugly\nSteps: 2")

    app = FastAPI()
    routes.install(app, ctx)
    client = TestClient(app)
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Framed", "prompt": "{prompt} in a gold frame", "negative_prompt": "ugly"}]
    body = {"prompt": "a dog", "steps": 2, "width": 64, "height": 64, "styles": ["Framed"], "send_images": False}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["infotexts"][0].startswith("a dog in a gold frame\nNegative prompt: ugly\n")
    missing = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Framed", "Gone"]})
    assert missing.status_code == 422 and "no style named 'Gone'; available: Framed" in missing.text
