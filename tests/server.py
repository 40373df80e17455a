"""Starts the real web UI process on 127.0.0.1 with a data folder of the test's choosing, and
opens it in headless Chromium."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; python3 launch.py --test installs it as root
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(data_dir: Path, *extra_args: str, timeout: float = 120.0):
    """Yields the base URL once the server answers; stops it afterwards and shows its log on failure."""
    port = free_port()
    log_path = data_dir / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "webui.py"), "--data-dir", str(data_dir), "--port", str(port), "--threads", "1", *extra_args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/sdapi/v1/samplers", timeout=2).status_code in (200, 401):  # 401: up, with --api-auth
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start in {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def browser_page(url: str, **page_options):
    """A Chromium page showing the web UI at `url`, once its txt2img prompt is there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(**page_options)
            # Not "networkidle": Gradio keeps a heartbeat connection open for as long as the page lives.
            page.goto(url, wait_until="load")
            page.locator("#txt2img_prompt textarea").wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


def generated(page, prefix: str):
    """Clicks the tab's Generate and waits for its first picture; an error shown instead fails with its text."""
    page.locator(f"#{prefix}_generate").click()
    image = page.locator(f"#{prefix}_gallery img").first
    outcome = image.or_(page.locator(".toast-body")).first
    outcome.wait_for(timeout=60_000)
    assert image.is_visible(), outcome.inner_text()
    return image

