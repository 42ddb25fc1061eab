"""The web page of `runtime serve`, driven in a real headless Chromium (Debian's package) through playwright.

The real server runs as a subprocess on a free loopback port with the tiny export; the page is used as a person
uses it: type a prompt, press Generate, see the picture, drop an A1111 PNG, read the error, sign in.
"""
from __future__ import annotations

import base64
import http.client
import io
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")

PROMPT = "a lighthouse at dusk"
USER, PASSWORD = "ann", "s3cret"
WAIT_MS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> None:
    """Return once the server answers HTTP on the port (any status); fail with its log when it exits or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"runtime serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/sdapi/v1/options")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"runtime serve did not answer on port {port} within {timeout} s:\n{log.read_text(errors='replace')}")


@contextmanager
def serving(model: Path, log: Path, *options: str):
    """`runtime serve --model MODEL` on a free loopback port; yields its base URL, stops it afterwards."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(model),
                                 "--host", "127.0.0.1", "--port", str(port), *options],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(proc, port, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def models(tiny_export, tmp_path_factory) -> Path:
    """A folder of two exported models (copies of the tiny export), so the page has a model to switch to."""
    root = tmp_path_factory.mktemp("served")
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_export[0], root / name)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The server behind --api-auth, so every test below also shows the page works behind HTTP Basic auth."""
    with serving(models, tmp_path_factory.mktemp("log") / "serve.log", "--api-auth", f"{USER}:{PASSWORD}") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def signed_in(browser):
    """A browser context that answers the server's Basic auth challenge with the right credentials."""
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
    yield context
    context.close()


@pytest.fixture
def page(signed_in, server):
    """A fresh page on the server, once its selects are filled from the API."""
    page = signed_in.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    page.close()


def _set(page, label: str, value) -> None:
    page.get_by_label(label, exact=True).fill(str(value))


def _decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,"), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def _a1111_png(path: Path, **fields) -> Path:
    """A PNG as A1111 writes it, its parameters text made by the runtime's infotext writer."""
    import numpy as np

    from runtime.images import a1111_parameters, save_png

    save_png(path, np.full((16, 16, 3), 128, np.uint8), a1111_parameters(**fields))
    return path


def _drop(page, path: Path) -> None:
    """Drop a file on the page as a browser does when a file is dragged from the desktop."""
    data = page.evaluate_handle(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""", [base64.b64encode(path.read_bytes()).decode(), path.name])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": data})


def _navigation_refused(page, url: str) -> bool:
    """Whether the browser gets no page: the 401 response, or (no credentials at all) an auth navigation error."""
    try:
        return page.goto(url).status == 401
    except sync_api.Error as e:
        return "ERR_INVALID_AUTH_CREDENTIALS" in str(e)


def _generate(page, prompt=PROMPT, steps=4, width=64, height=96, batch=1, keyboard=False):
    """Fill the form and start a job with the Generate button (or Ctrl+Enter)."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in (("Sampling steps", steps), ("Width", width), ("Height", height), ("Batch size", batch)):
        _set(page, label, value)
    if keyboard:
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
    else:
        page.get_by_role("button", name="Generate").click()


def _newest_caption(page) -> str:
    """The parameters text of the newest image; fails with the page's message when the job failed instead."""
    page.wait_for_selector("#gallery .infotext, #message.error")
    if page.locator("#message.error").is_visible():
        pytest.fail(f"the page shows an error instead of an image: {page.locator('#message').inner_text()}")
    return page.locator("#gallery .infotext").first.inner_text()


def test_generate_shows_the_picture_with_its_parameters_and_a_png_download(page):
    _generate(page, keyboard=True)
    _newest_caption(page)
    figure = page.locator("#gallery figure").first
    src = figure.locator("img").get_attribute("src")
    image = _decoded(src)
    assert image.format == "PNG" and image.size == (64, 96)
    assert PROMPT in image.info["parameters"] and "Steps: 4" in image.info["parameters"]
    caption = figure.locator(".infotext").inner_text()
    assert caption.startswith(PROMPT) and "Steps: 4" in caption and "Size: 64x96" in caption
    link = figure.get_by_role("link")
    assert link.get_attribute("href") == src and link.get_attribute("download").endswith(".png")
    assert page.locator("#progress").evaluate("bar => bar.value") == 1
    assert page.locator("#progress-text").inner_text().startswith("Done")
    assert page.locator("#message").is_hidden()


def test_a_batch_shows_one_figure_per_image_with_its_own_seed(page):
    _set(page, "Seed", 1234)
    _generate(page, batch=2)
    page.locator("#gallery figure").nth(1).wait_for()
    texts = page.locator("#gallery .infotext").all_inner_texts()
    assert any("Seed: 1234" in t for t in texts) and any("Seed: 1235" in t for t in texts)
    page.get_by_role("button", name="Reuse").click()
    assert page.get_by_label("Seed", exact=True).input_value() == "1234"


def test_progress_bar_moves_during_a_long_job_and_interrupt_stops_it(page):
    _generate(page, steps=1000, width=64, height=64)
    page.wait_for_function(
        "() => /Step [1-9][0-9]*\\/1000/.test(document.getElementById('progress-text').textContent)")
    assert 0 < page.locator("#progress").evaluate("bar => bar.value") < 1
    clicked = time.monotonic()
    page.get_by_role("button", name="Interrupt").click()
    page.locator("#gallery figure img").wait_for()      # A1111 answers an interrupted job with what it has
    assert time.monotonic() - clicked < 10, "the 1000 steps ran on after Interrupt"
    assert page.get_by_role("button", name="Interrupt").is_disabled()
    assert not page.get_by_role("button", name="Generate", exact=True).is_disabled()
    assert page.locator("#message").is_hidden()


def test_server_error_is_shown_as_a_message_naming_the_field(page):
    _generate(page, width=100)
    message = page.locator("#message.error")
    message.wait_for()
    assert "width" in message.inner_text().lower() and "HTTP 4" in message.inner_text()
    width = page.get_by_label("Width", exact=True)
    assert width.get_attribute("aria-invalid") == "true" and width.evaluate("input => input === document.activeElement")
    assert page.locator("#gallery figure").count() == 0
    assert not page.get_by_role("button", name="Generate").is_disabled()


def test_dropping_an_a1111_png_fills_the_fields_and_generates_the_same_parameters(page, tmp_path):
    png = _a1111_png(tmp_path / "fox.png", prompt="a red fox, (snow:1.2)", negative="blurry, lowres", steps=3,
                     sampler=("Euler", "Karras"), guidance=5.5, seed=987, width=80, height=64, model="tiny")
    _drop(page, png)
    page.locator("#message.info", has_text="fox.png").wait_for()
    values = {label: page.get_by_label(label, exact=True).input_value() for label in (
        "Prompt", "Negative prompt", "Sampling steps", "Sampling method", "Schedule type", "CFG Scale", "Seed",
        "Width", "Height")}
    assert values == {"Prompt": "a red fox, (snow:1.2)", "Negative prompt": "blurry, lowres", "Sampling steps": "3",
                      "Sampling method": "Euler", "Schedule type": "Karras", "CFG Scale": "5.5", "Seed": "987",
                      "Width": "80", "Height": "64"}
    page.get_by_role("button", name="Generate").click()
    text = _newest_caption(page)
    assert text.startswith("a red fox, (snow:1.2)\nNegative prompt: blurry, lowres\n")
    for field in ("Steps: 3", "Sampler: Euler", "Schedule type: Karras", "CFG scale: 5.5", "Seed: 987",
                  "Size: 80x64"):
        assert field in text


def test_choosing_a_png_without_parameters_says_so(page, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    page.get_by_label("PNG Info", exact=False).set_input_files(tmp_path / "plain.png")
    message = page.locator("#message.error")
    message.wait_for()
    assert "plain.png has no AUTOMATIC1111 parameters" in message.inner_text()


def test_switching_the_model_posts_options(page, server):
    model = page.get_by_label("Stable Diffusion checkpoint")
    titles = model.locator("option").all_inner_texts()
    assert len(titles) == 2 and any("tiny-a" in t for t in titles) and any("tiny-b" in t for t in titles)
    other = next(t for t in titles if t != model.input_value())
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/options") and r.request.method == "POST") as posted:
        model.select_option(other)
    assert posted.value.ok
    page.locator("#message.info", has_text=f"Loaded {other}").wait_for()
    assert page.evaluate("() => fetch('sdapi/v1/options').then(r => r.json())")["sd_model_checkpoint"] == other
    _generate(page)
    assert f"Model: {other.split(' [')[0]}" in _newest_caption(page)


@pytest.mark.parametrize("credentials", [None, {"username": USER, "password": "wrong"}], ids=["none", "wrong"])
def test_without_the_right_credentials_page_and_api_answer_401(browser, server, credentials):
    refused = browser.new_context(http_credentials=credentials)
    try:
        assert refused.request.get(server).status == 401
        assert refused.request.get(server + "static/app.js").status == 401
        assert refused.request.get(server + "sdapi/v1/sd-models").status == 401
        assert _navigation_refused(refused.new_page(), server)
    finally:
        refused.close()
