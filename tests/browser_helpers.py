"""A headless Chromium driven by selenium, for the tests that open a real page (the serve page,
the HTML reports), and the check that such a page is self-contained. Without Debian's
``chromium`` and ``chromium-driver``, or without selenium, the caller's test skips and says why. Chromium runs with every host name but 127.0.0.1
unresolvable and a dead proxy, so a page cannot reach anything but a server under test.
"""

from __future__ import annotations

import base64
import hashlib
import re
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


def csp_sources(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy as directive → its sources."""
    return {name: values for name, *values in (d.split() for d in policy.split(";") if d.strip())}


def assert_self_contained(html: str, policy: str) -> dict[str, list[str]]:
    """Nothing in ``html`` from elsewhere (no URL with a scheme or a host, no external script, style,
    font or image), and a ``policy`` of default-src 'none' that allows the page's one inline script
    and one inline style by their hashes; returns the policy's directives."""
    html = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "data:", html)  # base64 may hold "//"
    assert not re.search(r"(https?:)?//[a-z0-9]", html, flags=re.I), re.search(r"(https?:)?//[a-z0-9].{0,40}", html)
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=\"(?!data:)", html, flags=re.I)
    assert "@import" not in html and "url(" not in html
    sources = csp_sources(policy)
    assert sources["default-src"] == ["'none'"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert sources[directive] == [f"'sha256-{digest}'"]
    return sources
