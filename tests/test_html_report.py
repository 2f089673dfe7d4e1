"""report.html (``evaluate --output``) and inspect.html (``inspect --output``): one self-contained
file each, names from the data escaped, a policy that allows nothing but the page's own script and
style; and, in a real headless Chromium (browser_helpers.py), shown with no console error, the
headline figures on screen and the per-class table sorting when a header is clicked; the
screenshots go to the tests' temporary folders.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.evaluate import classification_report
from cnnkit.html_report import THUMBNAIL, esc, evaluation_page, inspection_page, table

from browser_helpers import assert_self_contained, severe_console_entries, start_chromium
from helpers import CLASSES, run_cli

HOSTILE_NAME = "<script>alert(1)</script>"  # a category name (a folder name cannot hold the "/")
HOSTILE_FOLDER = "<img src=x onerror=alert(1)>"  # a class folder name
PNG = b"\x89PNG\r\n\x1a\n"


def data_uris(page: str) -> list[tuple[str, bytes]]:
    return [(kind, base64.b64decode(data))
            for kind, data in re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)]


def assert_page_is_self_contained(page: str) -> None:
    """Nothing from elsewhere, and a policy that allows only the page's own style, script and data: images."""
    content = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert assert_self_contained(page, content.replace("&#x27;", "'"))["img-src"] == ["data:"]


def tiny_png(path: Path, colour: str = "red") -> None:
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture
def report_folder(tmp_path) -> tuple[dict, Path]:
    """A report as evaluate builds it (a hostile class name, an open-set figure from another
    branch), and its PNGs."""
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    report = classification_report(probs, np.array([0, 1, 1, 2]), list(CLASSES), top_k=2)
    report.update(arch="resnet18", checkpoint="best.pt", data="data/test", temperature=1.0, unreadable=[],
                  classes=[{"label": c, "name": HOSTILE_NAME if c == "red" else c} for c in CLASSES],
                  most_confident_wrong=[{"path": "data/<b>x</b>.png", "true": "green", "predicted": "blue",
                                         "confidence": 0.6, "correct": False}],
                  unknown={"auroc": 0.91, "fpr95": 0.35, "combined": {"auroc": 0.97, "fpr95": 0.2}})
    for name in ("confusion_matrix.png", "reliability.png", "most_confident_wrong.png"):
        tiny_png(tmp_path / name)
    return report, tmp_path


# --- the builder ----------------------------------------------------------------------------


def test_strings_from_the_data_are_escaped_and_markup_is_not_escaped_twice():
    assert esc(HOSTILE_NAME) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert esc(esc('a"b&')) == "a&quot;b&amp;"
    cells = table(["name", "score"], [[HOSTILE_FOLDER, 0.5], ["x'y", 3]], sortable=True)
    assert "<img" not in cells and "&lt;img src=x onerror=alert(1)&gt;" in cells and "x&#x27;y" in cells
    assert '<td class="num" data-value="0.5">0.5000</td>' in cells and 'class="sortable"' in cells


def test_the_evaluation_page_embeds_its_pictures_and_every_figure(report_folder):
    report, folder = report_folder
    page = evaluation_page(report, str(folder))
    assert_page_is_self_contained(page)
    pictures = data_uris(page)
    assert len(pictures) == 3 and all(kind == "png" and data.startswith(PNG) for kind, data in pictures)
    assert HOSTILE_NAME not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "data/&lt;b&gt;x&lt;/b&gt;.png" in page
    assert '<table id="per-class" class="sortable">' in page
    assert f"{report['accuracy']:.1%}" in page and "macro F1" in page and "ECE" in page
    # a figure this module does not know (another branch's open-set detection) still shows
    assert "Unknown" in page and "combined.auroc" in page and 'data-value="0.91"' in page


def test_calibration_and_the_abstain_threshold_have_their_own_tables(report_folder):
    report, folder = report_folder
    report["calibration"] = {"temperature": 1.7, "ece_before": 0.2, "ece_after": 0.05, "nll_before": 0.9,
                             "nll_after": 0.7, "reliability_after": report["reliability"]}
    report["abstain"] = {"threshold": 0.62, "target_coverage": 0.9, "coverage": 0.9, "accuracy_kept": 0.95}
    page = evaluation_page(report, str(folder))
    assert '<td>ECE</td><td class="num" data-value="0.2">0.2000</td><td class="num" data-value="0.05">' in page
    assert '<td>threshold</td><td class="num" data-value="0.62">' in page
    assert "Calibration</h2>" in page and page.count("<h2>Calibration</h2>") == 1 and "Abstain</h2>" not in page


def test_a_figure_that_was_not_drawn_is_left_out(report_folder):
    report, folder = report_folder
    (folder / "most_confident_wrong.png").unlink()
    assert len(data_uris(evaluation_page(report, str(folder)))) == 2


def inspection_report(folder: Path, pairs: list[dict]) -> dict:
    """inspect.json's dict for two 300x200 images in train/ (a cat, and a hostile class folder)."""
    split = {"images": 2, "classes": {HOSTILE_FOLDER: 1, "cat": 1}, "empty_classes": [], "imbalance": 1.0,
             "width": {"min": 300, "median": 300, "max": 300}, "height": {"min": 200, "median": 200, "max": 200},
             "modes": {"RGB": 2}, "unreadable": [], "tiny": [], "extreme_aspect": []}
    return {"data_dir": str(folder), "phash_distance": 4, "images": 2, "splits": {"train": split},
            "duplicates": {"exact_pairs": len(pairs), "near_pairs": 0, "within_split": len(pairs), "across_splits": 0,
                           "label_conflicts": len(pairs)},
            "pairs": pairs}


def test_the_inspection_page_shows_both_images_of_a_pair_as_small_thumbnails(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / f"{HOSTILE_FOLDER}.png"
    Image.new("RGB", (300, 200), "blue").save(a)
    shutil.copy(a, b)
    side = {"split": "train"}
    report = inspection_report(tmp_path, [{"kind": "exact", "distance": 0, "across_splits": False, "label_conflict": True,
                                           "a": {**side, "path": str(a), "label": "cat"},
                                           "b": {**side, "path": str(b), "label": HOSTILE_FOLDER}}])
    page = inspection_page(report)
    assert_page_is_self_contained(page)
    thumbnails = data_uris(page)
    assert len(thumbnails) == 2
    for kind, data in thumbnails:
        assert kind == "jpeg" and max(Image.open(io.BytesIO(data)).size) == THUMBNAIL
    assert "onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert '<table id="counts" class="sortable">' in page


def label_issues_report(folder: Path) -> dict:
    """An inspection with two suspected label issues (one given a hostile class folder's label, one
    with a category name) and its label_issues.png."""
    a, b = folder / "a.png", folder / "b.png"
    Image.new("RGB", (300, 200), "blue").save(a)
    Image.new("RGB", (200, 300), "red").save(b)
    tiny_png(folder / "label_issues.png")
    suspects = [{"rank": 1, "path": str(a), "split": "train", "given": HOSTILE_FOLDER, "suggested": "cat",
                 "p_given": 0.02, "p_suggested": 0.97},
                {"rank": 2, "path": str(b), "split": "train", "given": "cat", "suggested": HOSTILE_FOLDER,
                 "p_given": 0.11, "p_suggested": 0.85}]
    found = {"backbone": "resnet18 (weights DEFAULT)", "images": 2, "classes": ["cat", HOSTILE_FOLDER],
             "names": {"cat": HOSTILE_NAME}, "folds": 2, "seed": 0, "out_of_fold_accuracy": 0.5, "issues": 2,
             "suspects": suspects}
    return {**inspection_report(folder, []), "label_issues": found}


def test_the_label_issues_section_embeds_the_gallery_and_a_thumbnail_a_suspect(tmp_path):
    report = label_issues_report(tmp_path)
    page = inspection_page(report, str(tmp_path))
    assert_page_is_self_contained(page)
    assert [kind for kind, _ in data_uris(page)] == ["png", "jpeg", "jpeg"]
    assert "<h2>Label issues</h2>" in page and '<table id="label-issues" class="sortable">' in page
    assert HOSTILE_NAME not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; (cat)" in page
    (tmp_path / "label_issues.png").unlink()  # not drawn (no matplotlib): the table stays
    assert [kind for kind, _ in data_uris(inspection_page(report, str(tmp_path)))] == ["jpeg", "jpeg"]


# --- as a user runs them --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reports(trained, image_folder, tmp_path_factory) -> dict[str, Path]:
    """report.html and inspect.html, written by ``cnnkit evaluate/inspect --output`` run as a user
    runs them, with a hostile category name and a hostile class folder."""
    from helpers import cli_subprocess_env

    from test_inspect import make_data

    work = tmp_path_factory.mktemp("html-reports")
    env = cli_subprocess_env(work / "torch-home")
    names = work / "names.json"
    names.write_text(json.dumps({"blue": "Blue sky", "green": "Green leaf", "red": HOSTILE_NAME}), encoding="utf-8")
    evaluated = run_cli(["evaluate", str(trained.best), str(image_folder), "--split", "valid", "--workers", "0",
                         "--no-progress", "--category-names", str(names), "--output", str(work / "evaluation")], env)
    assert evaluated.returncode == 0, evaluated.stderr
    data = work / "data"
    make_data(data)
    hostile = data / "train" / HOSTILE_FOLDER
    hostile.mkdir()
    shutil.copy(data / "train" / "cat" / "2.png", hostile / "same.png")
    inspected = run_cli(["inspect", str(data), "--output", str(work / "inspection")], env)
    assert inspected.returncode == 10, inspected.stderr  # the planted leaks
    return {"report": work / "evaluation" / "report.html", "inspect": work / "inspection" / "inspect.html"}


def test_evaluate_output_writes_a_self_contained_report_html(reports):
    page = reports["report"].read_text(encoding="utf-8")
    assert_page_is_self_contained(page)
    report = json.loads((reports["report"].parent / "report.json").read_text(encoding="utf-8"))
    assert f"{report['accuracy']:.1%}" in page
    assert HOSTILE_NAME not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    pictures = data_uris(page)
    assert all(kind == "png" and data.startswith(PNG) for kind, data in pictures)
    assert len(pictures) == len(list(reports["report"].parent.glob("*.png")))


def test_inspect_output_writes_inspect_html_with_the_pairs(reports):
    page = reports["inspect"].read_text(encoding="utf-8")
    assert_page_is_self_contained(page)
    pairs = json.loads((reports["inspect"].parent / "inspect.json").read_text(encoding="utf-8"))["pairs"]
    pictures = data_uris(page)  # a thumbnail of each image of each pair, and sizes.png
    assert len(pictures) == 2 * len(pairs) + 1 and page.count('class="flag">leak<') == 2
    assert sum(kind == "png" for kind, _ in pictures) == 1 and 'alt="image sizes per split"' in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


# --- in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium"), window="1100,2400")
    yield driver
    driver.quit()


def column(driver, table_id: str, index: int) -> list[str]:
    return driver.execute_script(
        "var index = arguments[1];"
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(function (row) { return row.cells[index].textContent; });", table_id, index)


def assert_rendered(driver) -> None:
    """No script but the page's own ran, every picture decoded, nothing logged as an error."""
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert driver.execute_script("return document.scripts.length") == 1
    assert driver.execute_script(
        "return Array.from(document.images).every(function (i) { return i.complete && i.naturalWidth > 0; })")
    assert not severe_console_entries(driver)


def test_the_report_in_a_browser(browser, reports, tmp_path):
    from selenium.webdriver.common.by import By

    report = json.loads((reports["report"].parent / "report.json").read_text(encoding="utf-8"))
    browser.get(reports["report"].as_uri())
    assert_rendered(browser)
    headline = browser.find_element(By.ID, "headline").text
    assert f"{report['accuracy']:.1%}" in headline and "accuracy" in headline
    assert HOSTILE_NAME in browser.find_element(By.ID, "per-class").text  # shown as text, not run

    headers = browser.find_elements(By.CSS_SELECTOR, "#per-class th")
    headers[0].click()  # class: ascending, then descending
    assert column(browser, "per-class", 0) == sorted(CLASSES)
    headers[0].click()
    assert column(browser, "per-class", 0) == sorted(CLASSES, reverse=True)
    headers[4].click()  # F1, as numbers
    f1 = [float(v) for v in column(browser, "per-class", 4)]
    assert f1 == sorted(f1) and headers[4].get_attribute("aria-sort") == "ascending"
    headers[0].click()
    assert not severe_console_entries(browser)

    shot = tmp_path / "report-html.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(PNG)


def test_the_inspection_in_a_browser(browser, reports, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(reports["inspect"].as_uri())
    assert_rendered(browser)
    headline = browser.find_element(By.ID, "headline").text
    assert "leaks (across splits)" in headline and "label conflicts" in headline
    assert HOSTILE_FOLDER in browser.find_element(By.ID, "counts").text
    header = browser.find_element(By.CSS_SELECTOR, "#counts th")
    header.click()
    header.click()
    labels = column(browser, "counts", 0)
    assert labels == sorted(labels, reverse=True) and len(labels) == 3
    browser.save_screenshot(str(tmp_path / "inspect-html.png"))


def test_the_label_issues_in_a_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "inspect.html"
    path.write_text(inspection_page(label_issues_report(tmp_path), str(tmp_path)), encoding="utf-8")
    browser.get(path.as_uri())
    assert_rendered(browser)
    assert "label issues" in browser.find_element(By.ID, "headline").text
    assert HOSTILE_NAME in browser.find_element(By.ID, "label-issues").text  # shown as text, not run
    headers = browser.find_elements(By.CSS_SELECTOR, "#label-issues th")
    headers[3].click()
    headers[3].click()  # p(given), descending
    assert column(browser, "label-issues", 3) == ["0.1100", "0.0200"]
    assert not severe_console_entries(browser)
    browser.save_screenshot(str(tmp_path / "label-issues-html.png"))
