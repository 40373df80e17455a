"""The txt2img tab in headless Chromium: type a prompt, Generate, and check the picture and its PNG."""

import io
from pathlib import Path

import pytest
from PIL import Image

from tests.server import running_server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (python3 launch.py --test installs it as root)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tiny_data_dir):
    from playwright.sync_api import sync_playwright

    with running_server(tiny_data_dir) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page()
        # Not "networkidle": Gradio keeps a heartbeat connection open for as long as the page lives.
        page.goto(url, wait_until="load")
        page.locator("#txt2img_prompt textarea").wait_for(timeout=60_000)
        yield page
        browser.close()


def test_generate_shows_image_carrying_parameters(page):
    from playwright.sync_api import expect

    page.locator("#txt2img_prompt textarea").fill("a green square in the corner")
    page.locator("#txt2img_steps input[type=number]").fill("6")
    page.locator("#txt2img_steps input[type=number]").press("Enter")
    # The width and height follow the selected model's native resolution.
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64", timeout=20_000)
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
    assert page.get_by_text("seed must be between -1 and").first.wait_for(timeout=20_000) is None
    seed.fill("7")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_infotext").get_by_text("Seed: 7,").wait_for(timeout=60_000)


def test_train_tab_creates_an_embedding_and_stops_training_on_interrupt(page, tiny_data_dir, tmp_path):
    from modules.training.textual_inversion import read_embedding

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 0)).save(pictures / f"{i}.png")
    page.get_by_role("tab", name="Train", exact=True).first.click()
    page.locator("#train_embedding_name").locator("textarea, input").first.fill("browserbed")
    page.locator("#train_embedding_vectors input[type=number]").fill("2")
    page.locator("#train_embedding_vectors input[type=number]").press("Enter")
    page.locator("#train_create_embedding").click()
    page.locator("#train_create_status").get_by_text("Created browserbed.pt").wait_for(timeout=20_000)
    vectors, step = read_embedding(tiny_data_dir / "embeddings" / "browserbed.pt")
    assert vectors.shape[0] == 2 and step == 0

    page.get_by_role("tab", name="Train", exact=True).last.click()
    page.locator("#train_dataset").locator("textarea, input").first.fill(str(pictures))
    page.locator("#train_steps input").fill("100000")
    page.locator("#train_preview_every input").fill("0")
    page.locator("#train_train_embedding").click()
    page.locator("#train_status").get_by_text("loss").wait_for(timeout=60_000)
    page.locator("#train_interrupt").click()
    page.locator("#train_status").get_by_text("Interrupted at step").wait_for(timeout=60_000)
    status = page.locator("#train_status").inner_text()
    step = int(status.split("Interrupted at step ")[1].split()[0])
    assert 0 < step < 100000
    assert read_embedding(tiny_data_dir / "embeddings" / "browserbed.pt")[1] == step
