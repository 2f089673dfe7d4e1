"""``GET /``, the browser page of ``cnnkit serve``: self-contained (nothing loaded from anywhere
else, a Content-Security-Policy that forbids it), and used for real: a headless Chromium driven by
selenium against a real ``cnnkit serve`` (the deployment tests' server, started as the image
starts it: conftest.py) chooses a real photo and a corrupt file, drops another image, and reads
what the page shows: the model card, the top-1 name and probability (the same as the server's own
answer for that file), the 422 error text of the corrupt file; it checks the page at a phone's
width and with the keyboard, and takes a screenshot.

The browser is Debian's ``chromium`` with ``chromium-driver`` (``apt-get install chromium
chromium-driver``); without them, or without selenium (the ``deploy`` extra), the browser test
skips and says why. Chromium runs with every host name but 127.0.0.1 unresolvable and a dead
proxy, so the page cannot reach anything but the server under test.

The screenshot goes to the test's temporary folder; with ``CNNKIT_UPDATE_DOCS=1`` it is written to
``docs/serve-page.png`` instead (and the server serves the README's demo model: conftest.py).
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest

from browser_helpers import assert_self_contained, start_chromium
from deploy_helpers import http, multipart
from image_steps import UPDATE_DOCS

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "data" / "flowers-mini" / "test" / "51" / "image_01314.jpg"  # a real photo (a petunia)
DROPPED = ROOT / "data" / "flowers-mini" / "test" / "73" / "image_00258.jpg"  # another (a water lily)


@pytest.fixture(scope="module")
def server(container):
    return container


# --- the page itself ------------------------------------------------------------------------


def test_the_page_is_one_self_contained_file_with_a_policy_that_enforces_it(server):
    answer = http(server.base, "GET", "/")
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", answer.headers["X-Model-Version"])
    html = answer.text
    # nothing from elsewhere; the policy allows the page's own inline script and style (by hash)
    # and this server, nothing else
    policy = assert_self_contained(html, answer.headers["Content-Security-Policy"])
    assert policy["connect-src"] == ["'self'"]
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    # keyboard and phone basics: a real file input with a label, a viewport, live regions
    assert '<input id="files" type="file" accept="image/*" multiple>' in html and '<label id="drop" for="files">' in html
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in html
    assert html.count('aria-live="polite"') >= 1


def test_head_and_other_methods_on_the_page(server):
    assert http(server.base, "HEAD", "/").status == 200
    answer = http(server.base, "POST", "/", b"x", "text/plain")
    assert answer.status == 405 and answer.json["status"] == 405


def test_the_page_ships_in_the_package():
    from importlib import resources

    assert resources.files("cnnkit.serve").joinpath("page.html").is_file()
    assert '"serve/page.html"' in (ROOT / "pyproject.toml").read_text()  # package data: in the wheel too


# --- a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 30, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _percent(p: float) -> float:
    return round(100 * p, 1)


def test_a_browser_scores_a_photo_and_shows_the_error_of_a_corrupt_file(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(server.base + "/")
    card = _wait(lambda: driver.find_element(By.ID, "model-card").is_displayed() and driver.find_element(By.ID, "model-card"),
                 what="the model card")
    metadata = http(server.base, "GET", "/metadata").json
    rows = dict(zip((e.text for e in card.find_elements(By.TAG_NAME, "dt")), (e.text for e in card.find_elements(By.TAG_NAME, "dd"))))
    assert rows["Architecture"].startswith(metadata["arch"])
    assert rows["Classes"].startswith(f"{metadata['num_classes']}: ")
    assert metadata["model_version"] in rows["Model version"]
    assert set(rows) >= {"Validation accuracy", "Calibration", "Drift reference"}
    top_k = int(driver.find_element(By.ID, "top-k").get_attribute("value"))

    # choose two files at once: a real photo and a corrupt one
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG " * 20)
    driver.find_element(By.ID, "files").send_keys(f"{PHOTO}\n{corrupt}")
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#results .result")) == 2
          and not driver.find_element(By.ID, "status").text.startswith("scoring"), what="two results")
    results = {r.find_element(By.CLASS_NAME, "file").text: r for r in driver.find_elements(By.CSS_SELECTOR, "#results .result")}
    assert set(results) == {PHOTO.name, corrupt.name}

    # the photo: the top-1 name and probability are the server's own answer for that file
    expected = http(server.base, "POST", "/predict", *multipart([("image", PHOTO.name, PHOTO.read_bytes())],
                                                                {"top_k": str(top_k)})).json["results"][0]["predictions"]
    shown = results[PHOTO.name].find_elements(By.CSS_SELECTOR, ".prediction")
    assert len(shown) == len(expected) == min(top_k, metadata["num_classes"])
    name = shown[0].find_element(By.CLASS_NAME, "name").text
    probability = shown[0].find_element(By.CLASS_NAME, "probability").text
    assert name == expected[0]["name"]
    assert re.fullmatch(r"\d+(\.\d)?%", probability) and abs(float(probability[:-1]) - _percent(expected[0]["probability"])) <= 0.051
    assert not results[PHOTO.name].find_elements(By.CLASS_NAME, "error")

    # the corrupt file: the 4xx error text the server gives, shown as an alert, and no predictions
    error = http(server.base, "POST", "/predict", *multipart([("image", corrupt.name, corrupt.read_bytes())])).json
    alert = results[corrupt.name].find_element(By.CSS_SELECTOR, ".error[role=alert]")
    assert error["status"] == 422 and alert.text == error["error"] and alert.text.startswith(f"image {corrupt.name}: ")
    assert not results[corrupt.name].find_elements(By.CLASS_NAME, "prediction")
    assert driver.find_element(By.ID, "status").text == "2 image(s) scored, 1 rejected"

    # drag and drop: a DataTransfer with a file, dropped on the zone, goes the same way
    dropped = base64.b64encode(DROPPED.read_bytes()).decode()
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[1], {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    """, dropped, DROPPED.name)
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#results .result .prediction")) >= 2 * len(expected),
          what="the dropped image's predictions")
    assert driver.find_element(By.CSS_SELECTOR, "#results .result .file").text == DROPPED.name  # newest first

    target = ROOT / "docs" / "serve-page.png" if UPDATE_DOCS else tmp_path / "serve-page.png"
    driver.set_window_size(1000, 1250)
    assert driver.save_screenshot(str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000

    # the keyboard reaches the file input (Tab from the top of the page)
    driver.find_element(By.TAG_NAME, "body").click()
    for _ in range(10):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        if driver.switch_to.active_element.get_attribute("id") == "files":
            break
    else:
        raise AssertionError("Tab never reached the file input")

    # a phone's width: nothing wider than the screen, the results still readable
    driver.set_window_size(390, 844)
    _wait(lambda: driver.execute_script("return window.innerWidth") <= 400, what="the narrow window")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    assert driver.find_element(By.CSS_SELECTOR, "#results .result .prediction .name").is_displayed()

    # the browser logged no error (a CSP violation, a failed load, a script error)
    console = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
               and "/predict" not in entry["message"]]  # the corrupt file's 422 is logged as a failed fetch
    assert not console, console
    assert not server.server_errors()
