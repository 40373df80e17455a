"""The buttons under the galleries in headless Chromium: a txt2img picture chosen in the gallery is
saved (with its parameters) into outputs/save, zipped with its batch, sent to Extras and to
inpainting with its parameters; and the token counters beside the prompts."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.server import CHROMIUM, browser_page, generated
from tests.test_browser import _pick
from tests.test_browser_img2img import paint_across

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed (python3 launch.py --test installs it as root)"),
]
SIZE = 128
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def page(live_server):
    with browser_page(live_server, viewport={"width": 1400, "height": 1000}) as page:
        yield page


def fetch(page, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, url
    return response.body()


def picture_at(page, selector: str) -> Image.Image:
    return Image.open(io.BytesIO(fetch(page, page.locator(selector).first.get_attribute("src"))))


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=int)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def saved_file(page, tab: str, suffix: str, folder):
    """The file the last Save or Zip of `tab` wrote, as named in its message and offered for download."""
    from playwright.sync_api import expect

    log = page.locator(f"#html_log_{tab}")
    expect(log).to_contain_text(suffix, timeout=20_000)
    name = log.inner_text().removeprefix("Saved: ").strip()
    link = page.locator(f"#download_files_{tab} a[download='{name}']")
    link.wait_for(timeout=20_000)
    assert fetch(page, link.get_attribute("href")) == (folder / name).read_bytes()
    return folder / name


def test_token_counters_follow_the_prompts(page):
    from playwright.sync_api import expect

    from modules.prompting.conditioning import token_count

    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill(PROMPT)
    expect(page.locator("#txt2img_token_counter")).to_have_text(f"{token_count(PROMPT)}/75", timeout=10_000)
    long = ", ".join(["a red circle on a blue background"] * 12)
    assert 75 < token_count(long) <= 150
    prompt.fill(long)
    expect(page.locator("#txt2img_token_counter")).to_have_text(f"{token_count(long)}/150", timeout=10_000)
    prompt.fill("a (cat:1.2.3)")  # an attention weight that does not parse
    expect(page.locator("#txt2img_token_counter")).to_have_text("–", timeout=10_000)
    page.locator("#txt2img_neg_prompt textarea").fill("blurry AND ugly")  # a negative prompt is read whole
    expect(page.locator("#txt2img_negative_token_counter")).to_have_text("3/75", timeout=10_000)
    page.locator("#txt2img_neg_prompt textarea").fill("")


def test_the_chosen_picture_is_saved_zipped_and_sent_on(page, tiny_data_dir):
    from playwright.sync_api import expect

    from modules.prompting.conditioning import token_count

    page.get_by_role("tab", name="txt2img").first.click()
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    # The page's load event sets the checkpoint's native size; only then do ours stay.
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64", timeout=20_000)
    for elem_id, value in (("txt2img_steps", 3), ("txt2img_width", SIZE), ("txt2img_height", SIZE),
                           ("txt2img_batch_size", 2), ("txt2img_seed", 42)):
        set_number(page, elem_id, value)
    page.locator("#txt2img_generate").click()
    thumbnails = page.locator("#txt2img_gallery button.thumbnail-item img")
    expect(thumbnails).to_have_count(2, timeout=60_000)
    made = [Image.open(io.BytesIO(fetch(page, thumbnails.nth(i).get_attribute("src")))) for i in range(2)]
    assert [p.size for p in made] == [(SIZE, SIZE)] * 2 and "Seed: 43," in made[1].info["parameters"]

    # Zip: every picture of the gallery, each with its parameters.
    page.locator("#save_zip_txt2img").click()
    archive = zipfile.ZipFile(saved_file(page, "txt2img", ".zip", tiny_data_dir / "outputs" / "save"))
    names = archive.namelist()
    assert len(names) == 2 and names[1].startswith("00001-43-a red circle")
    for name, picture in zip(names, made):
        packed = Image.open(io.BytesIO(archive.read(name)))
        assert (pixels(packed) == pixels(picture)).all() and packed.info["parameters"] == picture.info["parameters"]

    # Save: the chosen (second) picture only, into outputs/save although the job saved it already.
    thumbnails.nth(1).click()
    expect(page.locator("#txt2img_infotext")).to_contain_text("Seed: 43,", timeout=10_000)
    page.locator("#save_txt2img").click()
    path = saved_file(page, "txt2img", ".png", tiny_data_dir / "outputs" / "save")
    assert path.name.endswith("-43-a red circle.png")
    saved = Image.open(path)
    assert (pixels(saved) == pixels(made[1])).all() and saved.info["parameters"] == made[1].info["parameters"]

    # Send to extras: the picture into the single image source.
    page.locator("#txt2img_send_to_extras").click()
    page.locator("#extras_image img").wait_for(timeout=20_000)
    assert (pixels(picture_at(page, "#extras_image img")) == pixels(made[1])).all()

    # Send to inpaint: the picture into the editor and its parameters into the fields.
    page.get_by_role("tab", name="txt2img").first.click()
    page.locator("#txt2img_send_to_inpaint").click()
    editor = page.locator("#img2img_inpaint_editor")
    expect(editor.locator("button[aria-label=Pan]")).to_be_enabled(timeout=30_000)  # a picture is in
    page.wait_for_function("document.querySelector('#img2img_seed input').value === '43'", timeout=10_000)
    assert page.locator("#img2img_prompt textarea").input_value() == PROMPT
    assert page.locator("#img2img_steps input[type=number]").input_value() == "3"
    expect(page.locator("#img2img_token_counter")).to_have_text(f"{token_count(PROMPT)}/75", timeout=10_000)
    expect(page.locator("#img2img_inpainting_fill")).to_be_visible()
    # What the editor holds comes back unchanged outside the painted band.
    paint_across(page, editor, 60)
    generated(page, "img2img")
    redrawn = picture_at(page, "#img2img_gallery img")
    assert redrawn.size == (SIZE, SIZE) and "Seed: 43," in redrawn.info["parameters"]
    changed = np.abs(pixels(redrawn) - pixels(made[1])).sum(-1) > 0
    assert changed[SIZE // 2].any() and not changed[:8].any() and not changed[-8:].any()


def test_extras_sends_its_result_on_without_parameters(page, tmp_path):
    picture = Image.new("RGB", (32, 32), (20, 160, 40))
    picture.save(tmp_path / "green.png")
    page.get_by_role("tab", name="Extras").click()
    page.locator("#extras_image input[type=file]").set_input_files(tmp_path / "green.png")
    page.locator("#extras_image img").wait_for(timeout=20_000)
    _pick(page, "extras_upscaler_1", "Lanczos")
    page.locator("#extras_generate").click()
    page.locator("#extras_gallery img").first.wait_for(timeout=60_000)
    upscaled = picture_at(page, "#extras_gallery img")
    prompt_before = page.locator("#img2img_prompt textarea").input_value()

    page.locator("#extras_send_to_img2img").click()
    page.locator("#img2img_image img").wait_for(timeout=20_000)
    assert (pixels(picture_at(page, "#img2img_image img")) == pixels(upscaled)).all()
    assert page.locator("#img2img_prompt textarea").input_value() == prompt_before
