"""`make dashboard-screenshot`: a picture of a function's dashboard page, for the README.

Run after `make demo` (its Embedder's calls are what the page shows): signs a headless Chromium into the local
server's dashboard (the URL `warmboot dashboard` prints) and saves the function page to
docs/dashboard-function.png.

Usage: ``.venv/bin/python bench/dashboard_screenshot.py [--app NAME] [--function TAG]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from warmboot.sdk import client

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "dashboard-function.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="sentence-transformers")
    parser.add_argument("--function", default="Embedder")
    args = parser.parse_args()
    url = client.request("dashboard_url", renew=False)
    base = url.split("?")[0].rstrip("/")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1100,1500",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ):
            options.add_argument(flag)  # fmt: skip
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)  # trades the token for the cookie
            driver.get(f"{base}/functions/{args.app}/{args.function}")
            WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.ID, "calls")))
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1100, min(max(height + 40, 800), 2400))
            driver.save_screenshot(str(OUT))
        finally:
            driver.quit()
    print(f"Written {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
