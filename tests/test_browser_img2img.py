"""The img2img tab in headless Chromium: paint a stroke in the inpaint editor, Generate, and check
that only the painted band was redrawn; send a picture and its parameters from PNG Info."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.server import CHROMIUM, browser_page, generated

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (python3 launch.py --test installs it as root)"),
]
SIZE = 128
BRUSH = 16  # the editor's default brush radius, in picture pixels
REACH = 10  # how far mask blur 4 spreads the mask


@pytest.fixture(scope="module")
def page(live_server):
    with browser_page(live_server, viewport={"width": 1400, "height": 1000}) as page:
        yield page


def paint_across(page, editor, reach: int) -> None:
    """A horizontal stroke through the middle, `reach` screen pixels each way: the picture sits
    centred in the editor's canvas."""
    box = editor.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - reach, y)
    page.mouse.down()
    page.mouse.move(x + reach, y, steps=4)
    page.mouse.up()


def test_painted_stroke_is_redrawn_and_nothing_else(page, tmp_path):
    from playwright.sync_api import expect

    picture = Image.new("RGB", (SIZE, SIZE), (30, 60, 200))
    ImageDraw.Draw(picture).ellipse((40, 40, 88, 88), fill=(220, 30, 30))
    picture.save(tmp_path / "picture.png")

    page.get_by_role("tab", name="img2img").first.click()
    # A picture put in the img2img source sets the size to its own.
    picture.resize((96, 64)).save(tmp_path / "wide.png")
    page.locator("#img2img_image input[type=file]").set_input_files(tmp_path / "wide.png")
    expect(page.locator("#img2img_width input[type=number]")).to_have_value("96", timeout=20_000)
    expect(page.locator("#img2img_height input[type=number]")).to_have_value("64")

    page.get_by_role("tab", name="Inpaint", exact=True).click()
    editor = page.locator("#img2img_inpaint_editor")
    editor.locator("canvas").first.wait_for()  # the editor ignores files given before its canvas exists
    editor.locator("input[type=file]").set_input_files(tmp_path / "picture.png")
    # The size follows once the editor has taken the picture in (slow with software WebGL):
    # painting before that could land on a canvas about to be replaced.
    expect(page.locator("#img2img_width input[type=number]")).to_have_value(str(SIZE), timeout=60_000)

    paint_across(page, editor, 100)

    page.locator("#img2img_prompt textarea").fill("a large green square")
    steps = page.locator("#img2img_steps input[type=number]")
    steps.fill("4")
    steps.press("Enter")
    image = generated(page, "img2img")
    response = page.request.get(image.get_attribute("src"))
    assert response.ok
    result = Image.open(io.BytesIO(response.body()))
    assert result.size == (SIZE, SIZE)
    assert "Mask blur: 4" in result.info["parameters"]

    changed = np.abs(np.asarray(result.convert("RGB"), dtype=int) - np.asarray(picture, dtype=int)).sum(-1) > 0
    centre = SIZE // 2
    assert changed[centre - 4:centre + 4, centre - 8:centre + 8].all()  # inside the stroke
    margin = BRUSH + REACH + 4
    assert not changed[:centre - margin].any() and not changed[centre + margin:].any()  # above and below it
    assert changed[centre - BRUSH - REACH:centre + BRUSH + REACH].any(1).sum() > 2 * BRUSH

    # Generating again from the same canvas works as well.
    page.locator("#img2img_seed input[type=number]").fill("5")
    page.locator("#img2img_generate").click()
    page.locator("#img2img_infotext").get_by_text("Seed: 5,").wait_for(timeout=60_000)


def test_png_info_sends_the_picture_and_its_parameters_to_img2img(page, tmp_path):
    from modules.images import storage

    text = "a red circle\nSteps: 9, Sampler: Euler, CFG scale: 6, Seed: 77, Size: 64x64, Denoising strength: 0.35, Model: tiny"
    (tmp_path / "made.png").write_bytes(storage.png_bytes(Image.new("RGB", (64, 64), "blue"), text))
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(tmp_path / "made.png")
    page.locator("#pnginfo_html").get_by_text("Seed: 77").wait_for(timeout=20_000)
    page.locator("#send_to_img2img").click()
    page.locator("#img2img_image img").wait_for(timeout=20_000)
    page.wait_for_function("document.querySelector('#img2img_seed input').value === '77'", timeout=10_000)
    assert page.locator("#img2img_prompt textarea").input_value() == "a red circle"
    assert page.locator("#img2img_denoising_strength input[type=number]").input_value() == "0.35"

    page.locator("#img2img_generate").click()
    page.locator("#img2img_infotext").get_by_text("Seed: 77,").wait_for(timeout=60_000)
    infotext = page.locator("#img2img_infotext").inner_text()
    assert "Steps: 9, Sampler: Euler" in infotext and "Denoising strength: 0.35" in infotext


def test_png_info_sends_the_picture_to_inpaint(page, live_server, tmp_path):
    from playwright.sync_api import expect

    from modules.images import storage

    text = "a green square\nSteps: 4, Sampler: Euler, CFG scale: 6, Seed: 78, Size: 128x128, Model: tiny"
    picture = Image.new("RGB", (SIZE, SIZE), (30, 60, 200))
    (tmp_path / "made.png").write_bytes(storage.png_bytes(picture, text))
    # A page of its own, so that its inpaint editor starts empty: the editor enables its Pan
    # button once a picture is in, the sign that painting now lands on that picture.
    context = page.context.browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(live_server, wait_until="load")
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(tmp_path / "made.png")
    page.locator("#pnginfo_html").get_by_text("Seed: 78").wait_for(timeout=20_000)
    page.locator("#send_to_inpaint").click()

    editor = page.locator("#img2img_inpaint_editor")
    expect(editor.locator("button[aria-label=Pan]")).to_be_enabled(timeout=30_000)
    expect(page.locator("#img2img_inpainting_fill")).to_be_visible()  # the inpainting options come with it
    page.wait_for_function("document.querySelector('#img2img_seed input').value === '78'", timeout=10_000)
    paint_across(page, editor, 60)

    image = generated(page, "img2img")
    result = Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body()))
    assert result.size == (SIZE, SIZE) and "Mask blur: 4" in result.info["parameters"]
    changed = np.abs(np.asarray(result.convert("RGB"), dtype=int) - np.asarray(picture, dtype=int)).sum(-1) > 0
    assert changed[SIZE // 2].any() and not changed[:8].any()  # the stroke redrawn, the top row kept
    context.close()
