"""A headless Chromium driven by selenium, for the tests that open a real page (the serve page,
the HTML reports). Without Debian's ``chromium`` and ``chromium-driver``, or without selenium, the
caller's test skips and says why. Chromium runs with every host name but 127.0.0.1 unresolvable
and a dead proxy, so a page cannot reach anything but a server under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest


def browser_paths() -> tuple[str, str]:
    """The Chromium binary and its chromedriver; skips the test without them."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver (Debian) to run the browser test")
    return browser, driver


def start_chromium(folder: Path, window: str = "1000,1250") -> Any:
    """A headless Chromium (its profile and chromedriver.log in ``folder``) that logs the page's
    console; skips the test when it cannot start here. The caller quits it."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[deploy]')")
    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={window}",
        f"--user-data-dir={folder / 'profile'}", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-default-apps", "--metrics-recording-only", "--lang=en-US",
        # nothing but a server on 127.0.0.1 can be reached
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path, log_output=str(folder / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:  # a Chromium that cannot start here (no display libraries...)
        pytest.skip(f"headless Chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    return driver


def severe_console_entries(driver: Any) -> list[dict[str, Any]]:
    """The browser's SEVERE log entries (a CSP violation, a failed load, a script error)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
