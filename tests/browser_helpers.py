"""A headless Chromium for the dashboard's tests, and the steps they share: the URL `warmboot dashboard` prints,
signing the browser in with it, opening a page and waiting until it shows what a test expects, reading a table.

The browser reaches nothing but this machine: no first-run, sync, component or metrics traffic, and every host
name but 127.0.0.1 resolves to nothing.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import Platform

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: How long a page may take to show what a test waits for (a page is rendered in milliseconds; what it shows
#: may trail a call's result by a moment: the call log and the start log are written as the call ends).
WAIT_S = 30.0
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
#: What `warmboot dashboard --no-open` prints.
URL_LINE = re.compile(r"Dashboard: (?P<base>http://127\.0\.0\.1:\d+/_dashboard)/\?token=(?P<token>[A-Za-z0-9_-]{32,})")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with a profile of its own (removed at the end)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: `make setup` installs Debian's chromium and chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed: `make setup` installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="warmboot-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def dashboard_url(platform: Platform) -> tuple[str, str]:
    """(base, token) from `warmboot dashboard --no-open`: base is ``http://127.0.0.1:PORT/_dashboard``."""
    out = platform.cli("dashboard", "--no-open").stdout
    found = URL_LINE.search(out)
    assert found, f"`warmboot dashboard` printed no dashboard URL:\n{out}"
    return found["base"], found["token"]


class Dashboard:
    """The dashboard of ``platform``, seen by ``driver``."""

    def __init__(self, platform: Platform, driver: Any) -> None:
        self.platform = platform
        self.driver = driver
        self.base, self.token = dashboard_url(platform)

    @property
    def login_url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def url(self, path: str = "") -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def sign_in(self) -> None:
        """Visit the URL with the token: the dashboard sets its cookie and redirects to the apps page."""
        self.driver.get(self.login_url)
        self.wait(
            lambda d: d.current_url == self.url() and d.find_elements("css selector", "main h1"),
            "the sign-in redirect lands on the apps page",
        )

    def wait(self, check: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
        """WebDriverWait until ``check(driver)`` is true; returns its value."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        waiter = WebDriverWait(
            self.driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        )
        return waiter.until(check, message=f"timed out waiting until {what}")

    def open(self, path: str) -> None:
        """Load a page and wait until its main content is there."""
        self.driver.get(self.url(path))
        self.wait(lambda d: d.find_elements("css selector", "main h1"), f"{path} is shown")

    def open_until(self, path: str, check: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
        """Load the page again until ``check(driver)`` is true on it (server-rendered pages show state as of their
        load); returns its value."""

        def loaded_and_checked(driver: Any) -> Any:
            driver.get(self.url(path))
            return check(driver)

        return self.wait(loaded_and_checked, f"{path} shows {what}", timeout)

    def table(self, ident: str) -> list[dict[str, str]]:
        """The rows of ``table#ident`` as {header: cell text}; [] when the page has no such table."""
        headers, rows = self.driver.execute_script(
            "var t = document.getElementById(arguments[0]);"
            "if (!t) { return [[], []]; }"
            "var text = function (c) { return c.textContent.trim(); };"
            "return [Array.from(t.tHead.rows[0].cells).map(text),"
            "        Array.from(t.tBodies[0].rows).map(function (r) { return Array.from(r.cells).map(text); })];",
            ident,
        )
        return [dict(zip(headers, row, strict=True)) for row in rows]

    def text(self, css: str = "main") -> str:
        return self.driver.find_element("css selector", css).text
