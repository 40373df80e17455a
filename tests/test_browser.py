"""The txt2img tab in headless Chromium: type a prompt, Generate, and check the picture and its PNG."""

import io

import pytest
from PIL import Image

from tests.server import CHROMIUM, browser_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (python3 launch.py --test installs it as root)"),
]

@pytest.fixture(scope="module")
def page(live_server):
    with browser_page(live_server) as page:
        yield page


def test_generate_shows_image_carrying_parameters(page):
    from playwright.sync_api import expect

    page.locator("#txt2img_prompt textarea").fill("a green square in the corner")
    page.locator("#txt2img_steps input[type=number]").fill("6")
    page.locator("#txt2img_steps input[type=number]").press("Enter")
    # The width and height follow the selected model's native resolution (set by the page's load event).
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64", timeout=20_000)
    page.get_by_role("tab", name="img2img").click()  # img2img's too
    expect(page.locator("#img2img_width input[type=number]")).to_have_value("64", timeout=20_000)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_generate").click()
    image = page.locator("#txt2img_gallery img").first
    image.wait_for(timeout=60_000)
    response = page.request.get(image.get_attribute("src"))
    assert response.ok
    picture = Image.open(io.BytesIO(response.body()))
    assert picture.size == (64, 64)
    params = picture.info["parameters"]
    assert params.startswith("a green square in the corner\nSteps: 6, Sampler: Euler a")
    infotext = page.locator("#txt2img_infotext").inner_text()
    assert "Steps: 6" in infotext and "Model: tiny" in infotext


def test_bad_input_shows_a_message_and_the_page_keeps_working(page):
    seed = page.locator("#txt2img_seed input[type=number]")
    seed.fill(str(2**40))
    page.locator("#txt2img_generate").click()
    assert page.get_by_text("seed must be a whole number from -1 to").first.wait_for(timeout=20_000) is None
    seed.fill("7")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_infotext").get_by_text("Seed: 7,").wait_for(timeout=60_000)


def test_save_a_style_pick_it_and_generate_with_it(page):
    page.locator("#txt2img_prompt textarea").fill("{prompt} in a gold frame")
    page.locator("#txt2img_neg_prompt textarea").fill("ugly")
    page.locator("#txt2img_style_save_box").get_by_text("Save prompts as a style").click()
    page.locator("#txt2img_style_name textarea, #txt2img_style_name input").first.fill("Framed")
    page.locator("#txt2img_style_save").click()
    page.locator("#txt2img_style_status").get_by_text("Saved style").wait_for(timeout=20_000)

    page.locator("#txt2img_prompt textarea").fill("a blue star")
    page.locator("#txt2img_neg_prompt textarea").fill("")
    page.locator("#txt2img_styles input").click()
    page.get_by_role("option", name="Framed").click()
    page.locator("#txt2img_generate").click()
    infotext = page.locator("#txt2img_infotext")
    infotext.get_by_text("a blue star in a gold frame").wait_for(timeout=60_000)
    assert "Negative prompt: ugly" in infotext.inner_text()


@pytest.mark.parametrize("prompt, message", [
    ("a (cat:1.2.3)", "'1.2.3' is not a plain number; write an attention weight like (word:1.2) (at character 8)"),
    ("a cat <lora:nowhere:1>", "no LoRA named 'nowhere' (at character 7)"),
])
def test_prompt_errors_show_where_they_are(page, prompt, message):
    page.locator("#txt2img_prompt textarea").fill(prompt)
    page.locator("#txt2img_generate").click()
    assert page.get_by_text(message).first.wait_for(timeout=30_000) is None


def test_embeddings_and_loras_are_listed(page, tiny_data_dir):
    import torch

    files = [tiny_data_dir / "embeddings" / "zqxstyle.pt", tiny_data_dir / "models" / "Lora" / "zqxlora.safetensors"]
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}}, files[0])
    files[1].write_bytes(b"listed by name; read only when a prompt calls it")
    try:
        page.locator("#txt2img_extra_networks").get_by_text("Embeddings and LoRA").click()
        page.locator("#txt2img_extra_networks_refresh").click()
        listing = page.locator("#txt2img_extra_networks_list")
        listing.get_by_text("zqxstyle").wait_for(timeout=20_000)
        assert "2 vectors, 32 wide" in listing.inner_text()
        assert "<lora:zqxlora:1>" in listing.inner_text()
    finally:
        for path in files:
            path.unlink()


def _pick(page, dropdown: str, option: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.locator(f"#{dropdown}").get_by_role("option", name=option, exact=True).click()


def test_png_info_sends_parameters_to_txt2img_and_the_picture_to_extras(page, tmp_path):
    from modules.images import storage

    text = ("a blue square\nNegative prompt: red\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 5.5, Seed: 1234, Size: 64x128, Model: tiny")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "made.png").write_bytes(storage.png_bytes(Image.new("RGB", (32, 32), "blue"), text))
    page.get_by_role("tab", name="PNG Info").click()
    upload = page.locator("#pnginfo_image input[type=file]")
    upload.set_input_files(tmp_path / "broken.png")
    page.locator("#pnginfo_html").get_by_text("broken.png could not be read").wait_for(timeout=20_000)
    page.locator("#pnginfo_image").get_by_role("button", name="Clear").click()
    upload.set_input_files(tmp_path / "made.png")
    page.locator("#pnginfo_html").get_by_text("Seed: 1234").wait_for(timeout=20_000)

    page.locator("#send_to_txt2img").click()
    page.locator("#txt2img_prompt textarea").wait_for(state="visible")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '1234'", timeout=10_000)
    assert page.locator("#txt2img_prompt textarea").input_value() == "a blue square"
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "red"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "7"
    assert page.locator("#txt2img_height input[type=number]").input_value() == "128"
    assert page.locator("#txt2img_sampler input").input_value() == "DPM++ 2M"
    assert page.locator("#txt2img_scheduler input").input_value() == "Karras"

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#send_to_extras").click()
    page.locator("#extras_image img").wait_for(timeout=10_000)
    _pick(page, "extras_upscaler_1", "Lanczos")
    page.locator("#extras_generate").click()
    result = page.locator("#extras_gallery img").first
    result.wait_for(timeout=60_000)
    picture = Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body()))
    assert picture.size == (64, 64)
    assert picture.info["parameters"] == text
    assert picture.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"


def test_merged_checkpoint_is_listed_at_once(page, tiny_data_dir):
    merged = tiny_data_dir / "models" / "Stable-diffusion" / "browser-merge.safetensors"
    try:
        page.get_by_role("tab", name="Checkpoint Merger").click()
        _pick(page, "modelmerger_primary_model_name", "tiny.safetensors")
        _pick(page, "modelmerger_secondary_model_name", "tiny.safetensors")
        page.locator("#modelmerger_custom_name textarea").fill("browser-merge")
        page.locator("#modelmerger_merge").click()
        page.locator("#modelmerger_result").get_by_text("Saved browser-merge.safetensors").wait_for(timeout=60_000)
        assert merged.is_file()
        page.locator("#sd_checkpoint input").click()
        page.locator("#sd_checkpoint").get_by_role("option", name="browser-merge.safetensors").wait_for(timeout=10_000)
        page.keyboard.press("Escape")
    finally:
        merged.unlink(missing_ok=True)


def test_train_tab_creates_an_embedding_and_stops_training_on_interrupt(page, tiny_data_dir, tmp_path):
    from playwright.sync_api import expect

    from modules.training.textual_inversion import read_embedding

    pictures = tiny_data_dir / "browser-pictures"  # a dataset must lie in the data folder
    pictures.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 0)).save(pictures / f"{i}.png")
    page.get_by_role("tab", name="Train", exact=True).first.click()
    page.locator("#train_embedding_name").locator("textarea, input").first.fill("browserbed")
    vectors_box = page.locator("#train_embedding_vectors input[type=number]")
    vectors_box.fill("2")
    vectors_box.press("Tab")  # the slider takes a typed number when the box loses focus
    expect(page.locator("#train_embedding_vectors input[type=range]")).to_have_value("2", timeout=10_000)
    page.locator("#train_create_embedding").click()
    page.locator("#train_create_status").get_by_text("Created browserbed.pt (2 vectors)").wait_for(timeout=20_000)
    vectors, step = read_embedding(tiny_data_dir / "embeddings" / "browserbed.pt")
    assert vectors.shape[0] == 2 and step == 0

    page.get_by_role("tab", name="Train", exact=True).last.click()
    page.locator("#train_steps input").fill("100000")
    page.locator("#train_preview_every input").fill("0")
    page.locator("#train_dataset").locator("textarea, input").first.fill(str(tmp_path))
    page.locator("#train_train_embedding").click()
    page.get_by_text(f"Dataset directory {str(tmp_path)!r} is outside").first.wait_for(timeout=30_000)
    page.locator("#train_dataset").locator("textarea, input").first.fill(str(pictures))
    page.locator("#train_train_embedding").click()
    page.locator("#train_status").get_by_text("loss").wait_for(timeout=60_000)
    page.locator("#train_interrupt").click()
    page.locator("#train_status").get_by_text("Interrupted at step").wait_for(timeout=60_000)
    status = page.locator("#train_status").inner_text()
    step = int(status.split("Interrupted at step ")[1].split()[0])
    assert 0 < step < 100000
    assert read_embedding(tiny_data_dir / "embeddings" / "browserbed.pt")[1] == step


def test_pasted_hires_parameters_run_the_hires_fix(page, tmp_path):
    from playwright.sync_api import expect

    from modules.images import storage

    text = ("a red star\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model: tiny, "
            "Denoising strength: 0.4, Hires upscale: 1.5, Hires upscaler: Nearest")
    (tmp_path / "hires.png").write_bytes(storage.png_bytes(Image.new("RGB", (96, 96), "red"), text))
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image").get_by_role("button", name="Clear").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(tmp_path / "hires.png")
    page.locator("#pnginfo_html").get_by_text("Hires upscale: 1.5").wait_for(timeout=20_000)
    page.locator("#send_to_txt2img").click()
    page.locator("#txt2img_prompt textarea").wait_for(state="visible")
    page.wait_for_function("document.querySelector('#txt2img_seed input').value === '5'", timeout=10_000)

    page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()
    expect(page.locator("#txt2img_enable_hr input")).to_be_checked(timeout=10_000)
    expect(page.locator("#txt2img_hr_upscaler input")).to_have_value("Nearest")
    expect(page.locator("#txt2img_denoising_strength input[type=number]")).to_have_value("0.4")
    expect(page.locator("#txt2img_hr_final")).to_contain_text("from 64x64 to 96x96", timeout=10_000)

    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_infotext").get_by_text("Hires upscaler: Nearest").wait_for(timeout=60_000)
    image = page.locator("#txt2img_gallery img").first
    picture = Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body()))
    assert picture.size == (96, 96)
    # No "RNG" key was pasted: A1111 reads that as noise made on the GPU, and so does the tab.
    assert picture.info["parameters"].endswith("Model: tiny, Denoising strength: 0.4, Hires upscale: 1.5, Hires upscaler: Nearest")
