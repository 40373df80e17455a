"""Users' extensions: found in extensions/, set up through their API (a hook, an accordion, a
route), a broken one skipped with everything it added taken back, turned off across restarts;
and the example extension seen working in Chromium."""

import io
import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from modules.api import routes
from modules.extensions.loader import ExtensionSet
from modules.generation import pipeline
from modules.generation.request import GenerationRequest
from modules.scripts.library import ScriptLibrary
from modules.service.hooks import Hooks
from tests.server import CHROMIUM, browser_page, running_server

EXAMPLES = Path(__file__).resolve().parent / "data" / "extensions"
SUFFIX = ", seen by the example extension"


def extensions_folder(root: Path) -> Path:
    """The example and broken extensions, one that does not parse, and a folder that is no extension."""
    folder = root / "extensions"
    shutil.copytree(EXAMPLES, folder)
    (folder / "unparsable").mkdir()
    (folder / "unparsable" / "extension.py").write_text("def setup(api):\n    return (\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("not an extension")
    return folder


def test_extensions_load_and_a_broken_one_is_skipped_with_its_additions_taken_back(tmp_path):
    hooks, scripts = Hooks(), ScriptLibrary.builtin()
    found = ExtensionSet(extensions_folder(tmp_path), tmp_path / "extensions.json").load(scripts, hooks)
    by_name = {e.name: e for e in found.all}
    assert sorted(by_name) == ["broken", "example", "unparsable"]
    assert by_name["example"].running and [t for t, _, _ in by_name["example"].accordions] == ["txt2img"]
    assert [r.path for r in by_name["example"].routes] == ["/sdapi/v1/ext/example/saved"]
    assert by_name["broken"].error == "RuntimeError: this extension is broken on purpose (extension.py, line 6)"
    assert by_name["unparsable"].error.startswith("SyntaxError")
    # Only the example's request hook is left: the broken one's was taken back.
    request = GenerationRequest(prompt="a red circle")
    assert hooks.request(request).prompt == "a red circle" + SUFFIX
    assert found.accordions("txt2img")[0][:2] == ("example", "Example extension") and found.accordions("img2img") == []


def test_turned_off_extensions_stay_off_after_a_restart(tmp_path):
    folder, state = extensions_folder(tmp_path), tmp_path / "extensions.json"
    ExtensionSet(folder, state).load(ScriptLibrary(), Hooks()).set_enabled({"example": False})
    hooks = Hooks()
    again = ExtensionSet(folder, state).load(ScriptLibrary(), hooks)
    example = next(e for e in again.all if e.name == "example")
    assert not example.enabled and not example.running and not hooks.request
    again.set_enabled({"example": True})
    assert next(e for e in ExtensionSet(folder, state).load(ScriptLibrary(), Hooks()).all if e.name == "example").running


def test_the_extensions_route_hook_and_listing_over_the_api(ctx, tmp_path):
    found = ExtensionSet(extensions_folder(tmp_path), tmp_path / "extensions.json").load(ScriptLibrary.builtin(), ctx.hooks)
    app = FastAPI()
    routes.install(app, ctx, extensions=found)
    http = TestClient(app)
    listed = {e["name"]: e for e in http.get("/sdapi/v1/extensions").json()}
    assert listed["example"]["enabled"] is True and listed["broken"]["enabled"] is False
    assert set(listed["example"]) == {"name", "remote", "branch", "commit_hash", "version", "commit_date", "enabled"}
    answer = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "width": 64, "height": 64,
                                                  "save_images": True})
    assert answer.status_code == 200 and "a red circle" + SUFFIX in answer.json()["info"]
    saved = http.get("/sdapi/v1/ext/example/saved").json()["saved"]
    assert len(saved) == 1 and saved[0]["infotext"].startswith("a red circle" + SUFFIX)
    assert pipeline.generate(ctx, GenerationRequest(prompt="x", steps=1, width=64, height=64), save=False).request.prompt == "x" + SUFFIX


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (python3 launch.py --test installs it as root)")
def test_the_example_extension_in_chromium(tmp_path):
    from playwright.sync_api import expect

    extensions_folder(tmp_path)
    with running_server(tmp_path) as url, browser_page(url) as page:
        # Its accordion, in the txt2img tab.
        page.get_by_text("Example extension").first.click()
        expect(page.locator("#example_extension_note")).to_contain_text("The example extension lives in example.", timeout=10_000)
        # Its hook: the picture's prompt carries the extension's mark, and its route lists the file.
        page.locator("#txt2img_prompt textarea").fill("a blue square")
        page.locator("#txt2img_generate").click()
        image = page.locator("#txt2img_gallery img").first
        image.wait_for(timeout=60_000)
        picture = Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body()))
        assert picture.info["parameters"].startswith("a blue square" + SUFFIX)
        saved = page.request.get(f"{url}/sdapi/v1/ext/example/saved").json()["saved"]
        assert [s["infotext"].splitlines()[0] for s in saved] == ["a blue square" + SUFFIX]
        # The broken ones are reported in the Extensions tab, and the page works all the same.
        page.get_by_role("tab", name="Extensions").click()
        table = page.locator("#extensions_installed")
        expect(table).to_contain_text("failed: RuntimeError: this extension is broken on purpose", timeout=10_000)
        expect(table).to_contain_text("failed: SyntaxError")
