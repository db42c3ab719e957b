"""Headless Chromium for the leaderboard site: open it as a reader would, collect console errors, photograph it.

Used by the site's browser test and by ``make site-screenshot`` (the picture in the docs). It drives the
distribution's ``chromium`` through its matching ``chromedriver`` with selenium (a dev dependency), so no
browser is downloaded at run time.

    python -m diffprune_bench.report.browser results/site/index.html results/site/screenshot.png
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)
WINDOW = (1400, 1000)
MAX_HEIGHT = 12000  # a full-page screenshot taller than this is cut (Chromium's own limits are near 16k)
# generous: the page loads in a second on an idle machine, but a sweep beside the test can starve Chromium for
# tens of seconds, and a timeout there fails the site test for a reason that says nothing about the page
LOAD_TIMEOUT_S = 120


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def missing_browser() -> str | None:
    """Why the browser cannot run here (a sentence naming what to install), or None when it can."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    if _which(CHROMIUM_NAMES) is None:
        missing.append("chromium (apt-get install chromium)")
    if _which(DRIVER_NAMES) is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    return f"missing {', '.join(missing)}" if missing else None


@contextmanager
def open_page(index: str | Path) -> Iterator[Any]:
    """A headless Chromium showing ``index`` from the file system, with the console log captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    reason = missing_browser()
    if reason:
        raise RuntimeError(f"cannot open the site in a browser: {reason}")
    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM_NAMES) or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=_which(DRIVER_NAMES)), options=options)
    try:
        driver.set_page_load_timeout(LOAD_TIMEOUT_S)
        driver.get(Path(index).resolve().as_uri())
        WebDriverWait(driver, LOAD_TIMEOUT_S).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """SEVERE entries of the browser console since the last call (JS exceptions, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def page_problems(driver: Any) -> list[str]:
    """What makes the page unusable: console errors, or no visible text (a blank page)."""
    problems = console_errors(driver)
    text = driver.execute_script("return document.body ? document.body.innerText.trim() : ''")
    if not text:
        problems.append("the page shows no text (blank page)")
    return problems


def screenshot(index: str | Path, target: str | Path) -> Path:
    """Save a full-page PNG of the site; raises when the page is blank or logs a JS error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_page(index) as driver:
        problems = page_problems(driver)
        if problems:
            raise RuntimeError(f"{index}: " + "; ".join(problems))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WINDOW[0], min(int(height), MAX_HEIGHT))
        driver.save_screenshot(str(target))
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m diffprune_bench.report.browser INDEX_HTML SCREENSHOT_PNG", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"no site at {argv[0]!r}: run `diffbench leaderboard` first", file=sys.stderr)
        return 2
    try:
        print(screenshot(argv[0], argv[1]))
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - command-line entry
    sys.exit(main(sys.argv[1:]))
