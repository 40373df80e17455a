"""Two users signed in to the web UI at once, in headless Chromium: jobs are their owner's.
Bob's Interrupt does not stop Alice's job, Bob waits for his turn seeing his own place in the
queue and nothing of Alice's job, and Alice's own Interrupt stops hers. On the built-in model."""

import base64
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.server import running_server
from tests.server import CHROMIUM, CHROMIUM_FLAGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (launch.py --test installs it)"),
]
USERS = {"alice": "pw1", "bob": "pw2"}
# Alice's job: 128 px at 60 steps lasts several seconds on one CPU thread, long enough for Bob to
# act while it runs.
ALICE = {"prompt": "a red circle on the left", "seed": 1234, "steps": 60, "width": 128, "height": 128}
# Bob's job: under 5 steps, so that it makes no live preview of its own (one every 5 steps).
BOB = {"prompt": "a blue square at the top", "seed": 777, "steps": 4, "width": 128, "height": 128}
RUNNING = re.compile(r"step \d+/\d+")
PREDICT = "/gradio_api/run/predict"  # where a button without the queue (Interrupt) posts
# Records every picture shown in the preview and the gallery, and every progress line, as the page
# changes: a picture shown for a moment between two polls is caught too.
WATCH = """prefix => {
    const seen = window.__seen = {preview: [], gallery: [], progress: []};
    const look = () => {
        for (const img of document.querySelectorAll(`#${prefix}_preview img`)) seen.preview.push(img.src);
        for (const img of document.querySelectorAll(`#${prefix}_gallery img`)) seen.gallery.push(img.src);
        const progress = document.querySelector(`#${prefix}_progress`);
        if (progress && progress.innerText.trim()) seen.progress.push(progress.innerText.trim());
    };
    look();
    new MutationObserver(look).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_data_dir):
    """A data folder with the tiny checkpoint beside the built-in model (the server's default),
    the UI and the API asking Alice and Bob to sign in."""
    users = ",".join(f"{user}:{password}" for user, password in USERS.items())
    data = tmp_path_factory.mktemp("users-data")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", data / "models" / "Stable-diffusion")
    with running_server(data, "--ckpt", "builtin-shapes.safetensors", "--gradio-auth", users, "--api-auth", users) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def signed_in(browser, url: str, user: str):
    """A page of its own browser context (its own cookies), signed in on Gradio's login page."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url, wait_until="load")
    page.locator("input[type=text]").fill(user)
    page.locator("input[type=password]").fill(USERS[user])
    page.get_by_role("button", name="Login").click()
    page.locator("#txt2img_prompt textarea").wait_for(timeout=60_000)
    # The page's load event sets the size to the model's own; wait for it before typing ours.
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64", timeout=30_000)
    return page


@pytest.fixture(scope="module")
def alice(browser, server):
    page = signed_in(browser, server, "alice")
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def bob(browser, server):
    page = signed_in(browser, server, "bob")
    yield page
    page.context.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def over_api(url: str, user: str, request: dict) -> np.ndarray:
    """The picture of `request` sent by `user` over the API, run to the end with nobody interrupting."""
    import httpx

    answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=request, auth=(user, USERS[user]), timeout=120)
    assert answer.status_code == 200, answer.text
    return pixels(base64.b64decode(answer.json()["images"][0]))


@pytest.fixture(scope="module")
def reference(server) -> np.ndarray:
    return over_api(server, "alice", ALICE)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page, request: dict) -> None:
    """Fills the txt2img form with `request` and presses Generate."""
    from playwright.sync_api import expect

    page.locator("#txt2img_prompt textarea").fill(request["prompt"])
    for name in ("steps", "width", "height", "seed"):
        set_number(page, f"txt2img_{name}", request[name])
    for name in ("steps", "width", "height"):  # a slider takes a typed number once it is entered
        expect(page.locator(f"#txt2img_{name} input[type=range]")).to_have_value(str(request[name]), timeout=10_000)
    page.locator("#txt2img_generate").click()


def watch(page) -> None:
    page.evaluate(WATCH, "txt2img")


def seen(page) -> dict[str, list[str]]:
    return page.evaluate("window.__seen")


def gallery_src(page) -> str | None:
    image = page.locator("#txt2img_gallery img").first
    return image.get_attribute("src") if image.count() else None


def new_result(page, request: dict, before: str | None) -> tuple[np.ndarray, str]:
    """Waits for a picture other than `before` in the gallery, with `request`'s seed in the infotext;
    returns its pixels and the PNG's parameters."""
    page.wait_for_function(
        """before => { const img = document.querySelector('#txt2img_gallery img');
                       return img && img.src && img.src !== before; }""",
        arg=before, timeout=90_000)
    page.locator("#txt2img_infotext").get_by_text(f"Seed: {request['seed']},").wait_for(timeout=30_000)
    response = page.request.get(gallery_src(page))
    assert response.ok
    picture = Image.open(io.BytesIO(response.body()))
    assert picture.size == (request["width"], request["height"])
    return pixels(response.body()), picture.info["parameters"]


def step_of(text: str) -> int:
    return int(re.search(r"step (\d+)/", text).group(1))


def test_bobs_interrupt_does_not_stop_alices_job(alice, bob, reference):
    from playwright.sync_api import expect

    before = gallery_src(alice)
    generate(alice, ALICE)
    progress = alice.locator("#txt2img_progress")
    expect(progress).to_contain_text(RUNNING, timeout=60_000)
    with bob.expect_response(lambda r: PREDICT in r.url) as answer:
        bob.locator("#txt2img_interrupt").click()
    assert answer.value.ok
    # Bob's interrupt has been handled, and Alice's job is still running after it.
    assert step_of(progress.inner_text()) < ALICE["steps"]
    picture, parameters = new_result(alice, ALICE, before)
    assert parameters.startswith(f"{ALICE['prompt']}\nSteps: {ALICE['steps']}, ")
    assert np.array_equal(picture, reference), "Alice's picture differs from the same request run without Bob's Interrupt"


def test_bob_waits_his_turn_and_sees_nothing_of_alices_job(server, alice, bob, reference):
    from playwright.sync_api import expect

    alice_before, bob_before = gallery_src(alice), gallery_src(bob)
    watch(alice)
    generate(alice, ALICE)
    expect(alice.locator("#txt2img_progress")).to_contain_text(RUNNING, timeout=60_000)
    watch(bob)
    generate(bob, BOB)
    expect(bob.locator("#txt2img_progress")).to_contain_text("Queued: 1 job ahead", timeout=30_000)
    assert RUNNING.search(alice.locator("#txt2img_progress").inner_text()), "Alice's job ended before Bob's was queued"

    alice_picture, _ = new_result(alice, ALICE, alice_before)
    bob_picture, bob_parameters = new_result(bob, BOB, bob_before)
    bob_seen, alice_seen = seen(bob), seen(alice)

    # Alice's page showed live previews of her job: there was something for Bob not to see.
    assert alice_seen["preview"], "Alice's page showed no live preview"
    assert np.array_equal(alice_picture, reference)
    # Bob's page showed his own place in the queue, then his own job's progress; never Alice's.
    assert "Queued: 1 job ahead" in bob_seen["progress"]
    assert not [t for t in bob_seen["progress"] if f"/{ALICE['steps']}" in t], bob_seen["progress"]
    assert bob_seen["preview"] == [], f"Bob's page showed a preview: {sorted(set(bob_seen['preview']))}"
    assert set(bob_seen["gallery"]) == {gallery_src(bob)}, "Bob's gallery showed a picture other than his own result"
    # His picture is his own request's.
    assert bob_parameters.startswith(f"{BOB['prompt']}\nSteps: {BOB['steps']}, ")
    assert f"Seed: {BOB['seed']}," in bob_parameters and "Size: 128x128" in bob_parameters
    assert f"Seed: {BOB['seed']}," in bob.locator("#txt2img_infotext").inner_text()
    assert not np.array_equal(bob_picture, alice_picture)
    assert np.array_equal(bob_picture, over_api(server, "bob", BOB))


def test_alices_own_interrupt_stops_her_job(alice, reference):
    from playwright.sync_api import expect

    before = gallery_src(alice)
    watch(alice)
    generate(alice, ALICE)
    progress = alice.locator("#txt2img_progress")
    expect(progress).to_contain_text(RUNNING, timeout=60_000)
    with alice.expect_response(lambda r: PREDICT in r.url) as answer:
        alice.locator("#txt2img_interrupt").click()
    assert answer.value.ok
    picture, parameters = new_result(alice, ALICE, before)
    steps_shown = [step_of(t) for t in seen(alice)["progress"] if RUNNING.search(t)]
    assert steps_shown and max(steps_shown) < ALICE["steps"], f"the job ran to the end: {steps_shown}"
    assert parameters.startswith(f"{ALICE['prompt']}\nSteps: {ALICE['steps']}, ")  # as asked, like A1111
    assert not np.array_equal(picture, reference), "the interrupted picture is the finished one"


def chosen_checkpoint(page) -> str:
    return page.locator("#sd_checkpoint input").input_value()


def test_a_checkpoint_chosen_by_alice_is_hers_alone(server, alice, bob):
    import httpx
    from playwright.sync_api import expect

    default = chosen_checkpoint(bob)
    assert default.startswith("builtin-") and chosen_checkpoint(alice) == default
    alice.locator("#sd_checkpoint input").click()
    alice.locator("#sd_checkpoint").get_by_role("option", name="tiny.safetensors").click()
    expect(alice.locator("#sd_checkpoint input")).to_have_value("tiny.safetensors", timeout=10_000)
    # Alice's choice is hers over the API as well, and only hers.
    options = {user: httpx.get(f"{server}/sdapi/v1/options", auth=(user, USERS[user])).json()["sd_model_checkpoint"]
               for user in USERS}
    assert options == {"alice": "tiny.safetensors", "bob": default}
    # A fresh page keeps each one's own choice.
    for page in (alice, bob):
        page.reload(wait_until="load")
        page.locator("#txt2img_prompt textarea").wait_for(timeout=60_000)
    expect(alice.locator("#sd_checkpoint input")).to_have_value("tiny.safetensors", timeout=20_000)
    expect(bob.locator("#sd_checkpoint input")).to_have_value(default, timeout=20_000)
    # Each one's pictures come from their own checkpoint.
    for page, model in ((alice, "Model: tiny"), (bob, "Model: builtin-")):
        page.locator("#txt2img_prompt textarea").fill("a red circle")
        set_number(page, "txt2img_steps", 2)
        page.locator("#txt2img_generate").click()
        expect(page.locator("#txt2img_infotext")).to_contain_text(model, timeout=60_000)
