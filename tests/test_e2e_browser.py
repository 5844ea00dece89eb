"""The web page in headless Chromium against a real `bentoml serve`: draw, upload, explain,
stress, correct, review; no console errors and no request leaves the machine.

Screenshots of each state go to the test's tmp folder and are copied to artifacts/screenshots/.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

from digitops.data import mnist
from tests.servers import bentoml_serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
# Below this test accuracy (the shipped smoke model) a drawn digit is only checked to be a digit.
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Only linked from the page, never fetched: the page must not call it.
MLFLOW_UI = "http://127.0.0.1:5000/"
# The canvas is 280x280; strokes are given in its pixels.
ONE = [[(140, 40), (140, 240)]]
SEVEN = [[(70, 55), (210, 55), (125, 240)]]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with bentoml_serve(tmp_path_factory.mktemp("serve"), DIGITOPS_MLFLOW_UI=MLFLOW_UI) as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():  # a missing browser must fail CI, not quietly skip the UI tests
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """The folder screenshots go to; copied to artifacts/screenshots/ when the module ends."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for png in folder.glob("*.png"):
        shutil.copy2(png, SCREENSHOTS / png.name)


@pytest.fixture(scope="module")
def model_card(server) -> dict:
    return httpx.get(f"{server}/model", timeout=10).json()


@pytest.fixture(scope="module")
def digit_png(server, mnist_dir, tmp_path_factory) -> tuple[Path, int]:
    """An MNIST test digit scaled to 280x280, and its label; one the served model gets right,
    so the label check holds for the smoke model too (the real model gets the first one)."""
    images, labels = mnist.load(mnist_dir, "t10k")
    folder = tmp_path_factory.mktemp("upload")
    with httpx.Client(base_url=server, timeout=30) as client:
        for i in range(50):
            buffer = io.BytesIO()
            Image.fromarray(images[i]).resize((280, 280), Image.BILINEAR).save(buffer, "PNG")
            files = {"image": ("digit.png", buffer.getvalue(), "image/png")}
            if client.post("/predict", files=files).json()["digit"] == labels[i]:
                path = folder / f"mnist-test-{i}-label-{labels[i]}.png"
                path.write_bytes(buffer.getvalue())
                return path, int(labels[i])
    pytest.fail("the served model got none of the first 50 MNIST test digits right")


def off_machine(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("data", "blob") and parts.hostname not in LOOPBACK


class Ui:
    """One page of the app that records what must never happen: console errors, page errors
    and requests to anything but this machine."""

    def __init__(self, browser, base: str, shots: Path, **context_options):
        self.base, self.shots = base, shots
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)  # a 2-core CI box may be training meanwhile
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.goto(f"{base}/")
        self.page.wait_for_function("document.querySelectorAll('#chart .bar').length === 10")

    def settle(self) -> None:
        """Wait until every debounced request has been sent and every reply shown."""
        self.page.wait_for_function("!document.querySelector('[aria-busy=true]')")

    def draw(self, strokes, steps: int = 12) -> None:
        box = self.page.locator("#canvas").bounding_box()
        scale = box["width"] / 280
        mouse = self.page.mouse
        for stroke in strokes:
            (x, y), rest = stroke[0], stroke[1:]
            mouse.move(box["x"] + x * scale, box["y"] + y * scale)
            mouse.down()
            for x, y in rest:
                mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=steps)
            mouse.up()
        self.settle()

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text().strip()

    def natural_width(self, selector: str) -> int:
        return self.page.locator(selector).evaluate("img => img.complete ? img.naturalWidth : 0")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.shots / f"{name}.png", full_page=True)

    def assert_clean(self, expected_errors: tuple[str, ...] = ()) -> None:
        """No console errors but `expected_errors`; no request left loopback."""
        errors = [e for e in self.errors if not any(x in e for x in expected_errors)]
        assert not errors, errors
        remote = [url for url in self.urls if off_machine(url)]
        assert not remote, remote


@pytest.fixture
def open_ui(browser, server, shots):
    """Opens pages of the app (each in its own browser context); closes them after the test."""
    opened: list[Ui] = []

    def open_page(**context_options) -> Ui:
        opened.append(Ui(browser, server, shots, **context_options))
        return opened[-1]

    yield open_page
    for ui in opened:
        ui.context.close()


@pytest.fixture
def ui(open_ui) -> Ui:
    return open_ui(viewport={"width": 1280, "height": 900})


def stats(base: str) -> dict:
    reply = httpx.get(f"{base}/feedback/stats", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_drawn_digits_are_predicted_and_explained(ui):
    page = ui.page
    for name, strokes, expected in [("one", ONE, 1), ("seven", SEVEN, 7)]:
        clear = page.get_by_role("button", name="Clear")
        if clear.is_enabled():
            clear.click()
        assert ui.text("#digit") == "–"
        ui.draw(strokes)
        digit = ui.text("#digit")
        assert digit == str(expected), f"drew a {expected}, the page says {digit}"
        assert page.locator("#chart .bar").count() == 10
        assert page.locator("#chart .bar.top").get_attribute("data-digit") == digit
        assert "%" in ui.text("#confidence")
        assert ui.natural_width("#input-preview") == 28
        assert ui.natural_width("#cam-image") > 0
        assert ui.natural_width("#maps-image") > 0
        assert f"predicted class {digit}" in ui.text("#cam-caption")
        ui.shot(f"01-drawn-{name}")

    # Another class's bar explains that class instead; the layer picker swaps feature maps.
    other = "3" if digit != "3" else "5"
    page.locator(f"#chart .bar[data-digit='{other}']").click()
    ui.settle()
    assert f"class {other}" in ui.text("#cam-caption")
    assert (
        page.locator(f"#chart .bar[data-digit='{other}']").get_attribute("aria-pressed") == "true"
    )
    page.get_by_label("Feature maps of").select_option("conv3")
    ui.settle()
    assert "channels of conv3" in ui.text("#maps-caption")
    ui.shot("02-explain-other-class")

    # Undo takes the strokes back one by one; with none left the result is cleared.
    page.get_by_role("button", name="Undo").click()
    assert ui.text("#digit") == "–"
    assert page.get_by_role("button", name="Undo").is_disabled()
    ui.assert_clean()


def test_uploaded_mnist_digit_shows_its_label(ui, digit_png):
    path, label = digit_png
    ui.page.set_input_files("#file", path)
    ui.page.wait_for_function("document.querySelector('#source').textContent.includes('.png')")
    ui.settle()
    assert ui.text("#digit") == str(label)
    assert path.name in ui.text("#source")
    assert ui.natural_width("#upload-preview") == 280
    assert ui.natural_width("#input-preview") == 28
    assert "Not inverted" in ui.text("#inverted")  # MNIST is already white ink on black
    ui.shot("03-uploaded")

    # Forcing inversion on makes the model read black ink on white: a different input.
    before = ui.page.locator("#input-preview").get_attribute("src")
    ui.page.get_by_label("On", exact=True).check()
    ui.settle()
    assert ui.page.locator("#input-preview").get_attribute("src") != before
    assert "was inverted" in ui.text("#inverted")

    # Dropped on the drop zone, the same file gives the same answer (inversion back on auto).
    ui.page.get_by_label("Auto", exact=True).check()
    ui.settle()
    ui.page.evaluate(
        """async ([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const drop = new DataTransfer();
            drop.items.add(new File([bytes], name, { type: "image/png" }));
            const zone = document.getElementById("dropzone");
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: drop, bubbles: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: drop, bubbles: true }));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), "dropped.png"],
    )
    ui.page.wait_for_function("document.querySelector('#source').textContent.includes('dropped')")
    ui.settle()
    assert ui.text("#digit") == str(label)
    ui.assert_clean()


def test_noise_slider_changes_the_input_reproducibly(ui, digit_png):
    page = ui.page
    page.set_input_files("#file", digit_png[0])
    ui.settle()
    preview = page.locator("#input-preview")
    clean, clean_cam = preview.get_attribute("src"), page.locator("#cam-image").get_attribute("src")

    slider = page.get_by_label("Noise")
    slider.focus()
    for _ in range(6):  # by keyboard: 6 steps of 0.05
        page.keyboard.press("ArrowRight")
    ui.settle()
    assert ui.text("#noise-value") == "0.30"
    noisy = preview.get_attribute("src")
    assert noisy != clean
    assert page.locator("#cam-image").get_attribute("src") != clean_cam
    assert ui.text("#digit") in list("0123456789?")  # "?": so noisy it looks like no digit
    ui.shot("04-noise-0.30")

    page.keyboard.press("Home")
    ui.settle()
    assert preview.get_attribute("src") == clean
    for _ in range(6):
        page.keyboard.press("ArrowRight")
    ui.settle()
    assert preview.get_attribute("src") == noisy  # a fixed seed: the same level, the same noise
    ui.assert_clean()


def test_a_correction_is_recorded_and_can_be_replaced(ui, server, digit_png):
    page = ui.page
    page.set_input_files("#file", digit_png[0])
    ui.settle()
    pending = stats(server)["pending"]
    wrong = (digit_png[1] + 1) % 10

    assert ui.text("#feedback-question") == f"Correct? The model says {digit_png[1]}."
    assert page.locator("#feedback-digits").is_hidden()
    page.get_by_role("button", name="No", exact=True).click()
    page.get_by_role("button", name=f"It is a {wrong}").click()
    status = page.locator("#feedback-status")
    status.filter(has_text=f"saved as {wrong}").wait_for()
    assert stats(server)["pending"] == pending + 1
    ui.shot("05-feedback-saved")

    # A second answer for the same prediction replaces the first rather than adding one.
    page.get_by_role("button", name="No", exact=True).click()
    page.get_by_role("button", name=f"It is a {digit_png[1]}").click()
    status.filter(has_text=f"replaced the earlier label {wrong}").wait_for()
    assert stats(server)["pending"] == pending + 1
    ui.assert_clean()


def test_an_input_that_is_no_digit_says_so_and_can_be_marked_not_a_digit(ui, server, tmp_path):
    blank = tmp_path / "blank-paper.png"
    Image.new("RGB", (280, 280), "white").save(blank)
    page = ui.page
    page.set_input_files("#file", blank)
    ui.settle()
    assert ui.text("#digit") == "?" and ui.text("#confidence") == "Not a digit?"
    note = page.locator("#not-a-digit")
    assert note.is_visible() and "doesn't look like a digit" in note.inner_text()
    assert page.locator("#chart .bar .value").first.inner_text().endswith("%")  # the breakdown
    ui.shot("05b-not-a-digit")

    pending = stats(server)["pending"]
    assert ui.text("#feedback-question") == "Correct? The model says this is not a digit."
    page.get_by_role("button", name="Yes", exact=True).click()
    page.locator("#feedback-status").filter(has_text="saved as not a digit").wait_for()
    assert stats(server)["pending"] == pending + 1

    # Another input like it, unlabelled, waits in the not-a-digit list.
    with httpx.Client(base_url=server, timeout=30) as client:
        client.post("/predict", files={"image": ("b.png", blank.read_bytes(), "image/png")})
    page.get_by_role("tab", name="Review").click()
    page.get_by_label("List").select_option("not-a-digit")
    page.locator("#review-status").filter(has_text="most digit-like first").wait_for()
    assert "digit score 0.000" in ui.text("#review-list .review-item .meta")
    assert page.get_by_label("Least sure by").is_disabled()
    ui.assert_clean()


def test_review_queue_items_are_labelled_in_one_click(ui, server, mnist_dir):
    images, _ = mnist.load(mnist_dir, "t10k")
    with httpx.Client(base_url=server, timeout=30) as client:
        for i in range(60, 64):  # unlabelled predictions for the queue
            buffer = io.BytesIO()
            Image.fromarray(images[i]).save(buffer, "PNG")
            client.post("/predict", files={"image": ("d.png", buffer.getvalue(), "image/png")})
    pending = stats(server)["pending"]

    page = ui.page
    page.get_by_role("tab", name="Review").click()
    items = page.locator("#review-list .review-item")
    items.first.wait_for()
    assert page.locator("#view-predict").is_hidden()
    assert page.url.endswith("#review")
    assert ui.text("#stat-pending") == str(pending)
    page.get_by_label("Least sure by").select_option("margin")
    items.first.wait_for()
    ui.shot("06-review")

    first = items.first
    prediction_id = first.get_attribute("data-prediction-id")
    first.get_by_role("button", name="Label as 4").click()
    page.locator(f"[data-prediction-id='{prediction_id}']").wait_for(state="detached")
    assert "Labelled as 4" in ui.text("#review-status")
    assert stats(server)["pending"] == pending + 1
    page.locator("#stat-pending").filter(has_text=str(pending + 1)).wait_for()
    ui.shot("07-review-labelled")
    ui.assert_clean()


def test_api_errors_are_shown_in_plain_words(ui, server, tmp_path, digit_png):
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"this is a shopping list, not an image")
    with fake.open("rb") as f:
        expected = httpx.post(f"{server}/predict", files={"image": ("notes.png", f, "image/png")})
    assert expected.status_code == 400
    message = expected.json()["error"]

    ui.page.set_input_files("#file", digit_png[0])
    ui.settle()
    assert ui.text("#digit") == str(digit_png[1])

    ui.page.set_input_files("#file", fake)
    ui.page.locator("#result-error").filter(has_text=message).wait_for()
    ui.settle()
    shown = ui.text("#result-error")
    assert "{" not in shown and "status" not in shown, shown  # words, not a JSON dump
    # The earlier answer is gone: next to the new file it would read as that file's answer.
    assert ui.text("#digit") == "–"
    assert ui.page.locator("#input-preview").is_hidden()
    assert ui.page.locator("#cam-image").is_hidden()
    assert message in ui.text("#explain-error")
    ui.shot("08-error")
    # Chromium logs every 4xx reply as a console error; these three are the point of the test.
    ui.assert_clean(expected_errors=("status of 400",))


def test_model_view_shows_the_serving_model(ui, model_card):
    page = ui.page
    page.get_by_role("tab", name="Predict").focus()
    page.keyboard.press("End")  # tabs follow the ARIA pattern: arrows, Home, End
    assert page.get_by_role("tab", name="Monitor").get_attribute("aria-selected") == "true"
    page.keyboard.press("ArrowLeft")
    assert page.get_by_role("tab", name="Model").get_attribute("aria-selected") == "true"
    card = page.locator("#model-card")
    card.filter(has_text=model_card["source"]).wait_for()
    if model_card.get("version") is not None:
        assert str(model_card["version"]) in card.inner_text()
    link = page.locator("#mlflow-link a")
    if model_card.get("mlflow_ui_url") and model_card.get("mlflow_run_id"):
        run = model_card["mlflow_run_id"]
        assert link.get_attribute("href") == f"{MLFLOW_UI}#/experiments/0/runs/{run}"
    else:
        assert link.count() == 0
    assert page.url.endswith("#model")
    ui.shot("09-model")
    ui.assert_clean()


def monitor_report(base: str) -> dict:
    reply = httpx.get(f"{base}/monitor", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_monitor_view_shows_how_the_served_model_is_doing(ui, server, digit_png, model_card):
    path, label = digit_png
    with httpx.Client(base_url=server, timeout=30) as client:
        files = {"image": ("digit.png", path.read_bytes(), "image/png")}
        answers = [client.post("/predict", files=files).json() for _ in range(3)]
        assert answers[0]["is_digit"] and answers[0]["digit"] == label
        # Earlier tests of this module may have labelled predictions too: this adds one more.
        served = next(v for v in monitor_report(server)["versions"] if v["serving"])
        labels = served["measured"]["labels"] + 1
        correction = {"prediction_id": answers[0]["prediction_id"], "label": label}
        assert client.post("/feedback", json=correction).status_code == 200

    page = ui.page
    page.get_by_role("tab", name="Monitor").click()
    headline = page.locator("#monitor-headline")
    headline.filter(has_text="predictions in the last 24 h").wait_for()
    ui.settle()
    assert page.url.endswith("#monitor")
    assert f"{labels:,} label" in headline.inner_text()
    status = headline.get_attribute("data-status")
    assert status in ("ok", "warning")
    assert page.locator("#monitor-warnings").is_visible() == (status == "warning")

    for name in ("traffic", "accuracy", "shares", "confidence", "digits"):
        plot = page.locator(f"svg#monitor-{name}[role=img]")
        assert plot.get_attribute("aria-label"), f"plot {name} has no accessible name"
    assert page.locator("#monitor-traffic rect.plot-bar").count() >= 1
    assert page.locator("#monitor-accuracy .measured circle").count() >= 1  # the labelled bucket
    assert page.locator("#monitor-confidence rect.plot-bar:not(.reference)").count() == 10
    assert page.locator("#monitor-digits rect.plot-bar:not(.reference)").count() == 10
    assert ui.text("#drift-verdict")  # the tests' figures, or why there are none

    version = str(model_card["version"]) if model_card.get("version") is not None else "shipped"
    row = page.locator("#versions-table tr.serving")
    assert row.count() == 1 and row.locator("th").inner_text().startswith(version)
    measured = row.locator("td.measured").inner_text()
    assert measured.endswith(f"{labels:,} label{'s' if labels != 1 else ''})"), measured
    ui.shot("14-monitor")

    # A narrower window refetches, in buckets that suit it; #monitor reopens the view.
    page.get_by_label("Window", exact=True).select_option("1")
    headline.filter(has_text="predictions in the last 1 h").wait_for()
    assert page.get_by_label("Buckets of", exact=True).input_value() == "5"
    assert "buckets of 5 min" in ui.text("#monitor-updated")
    assert page.locator("#monitor-traffic rect.plot-bar").count() >= 1
    page.reload()
    headline.filter(has_text="predictions in the last").wait_for()
    assert page.locator("#view-predict").is_hidden()
    ui.assert_clean()


def test_phone_layout_and_touch_drawing(open_ui):
    ui = open_ui(
        viewport={"width": 360, "height": 780},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = ui.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "page scrolls sideways"
    box = page.locator("#canvas").bounding_box()
    assert box["width"] >= 250

    # A finger stroke through the DevTools protocol: touch pointer events, not mouse ones.
    cdp = ui.context.new_cdp_session(page)
    x, top, bottom = box["x"] + box["width"] / 2, box["y"] + 30, box["y"] + box["height"] - 30
    cdp.send(
        "Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": top}]}
    )
    for i in range(1, 13):
        point = {"x": x, "y": top + (bottom - top) * i / 12}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    ui.settle()
    assert ui.text("#digit") in list("0123456789")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "page scrolls sideways"
    ui.shot("10-phone-360px")
    page.get_by_role("tab", name="Review").click()
    page.locator("#review-list .review-item").first.wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "review scrolls sideways"
    ui.shot("11-phone-review")
    ui.assert_clean()


def test_on_a_phone_the_answer_comes_into_view(open_ui, digit_png):
    """At 390 px the result card is below the canvas and the upload: a drawing's answer shows
    in a bar pinned at the bottom (the canvas stays put for the next stroke) that leads to the
    card, and an upload's answer scrolls into view."""
    ui = open_ui(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page, bar, answer = ui.page, ui.page.locator("#answer-bar"), ui.page.locator("#digit")
    expect(answer).not_to_be_in_viewport()
    ui.draw(ONE)
    expect(bar).to_be_visible()
    assert ui.text("#answer-bar-digit") == ui.text("#digit")
    assert page.evaluate("scrollY") == 0, "the canvas must stay where the finger is"
    ui.shot("12-phone-answer-bar")
    bar.click()
    expect(answer).to_be_in_viewport()
    expect(bar).to_be_hidden()

    page.evaluate("scrollTo(0, 0)")
    path, label = digit_png
    page.set_input_files("#file", path)
    ui.settle()
    expect(answer).to_be_in_viewport()
    assert ui.text("#digit") == str(label)
    ui.shot("13-phone-upload-answer")
    ui.assert_clean()
