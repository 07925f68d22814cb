"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by selenium, for the
dashboard's tests and bench: find it (or say why not), start it, save screenshots.

Screenshots go to build/test-artifacts/ (ignored by git) unless FLOCK_TEST_ARTIFACTS names
another directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FLOCK_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver", "chromium-driver")


def browser_missing() -> str | None:
    """Why no browser test can run here (None: selenium, Chromium and its driver are there)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(n) for n in CHROMIUM):
        return "no Chromium (as root: apt-get install chromium chromium-driver)"
    if not any(shutil.which(n) for n in DRIVER):
        return "no chromedriver (as root: apt-get install chromium-driver)"
    return None


def start_browser(*, width: int = 1280, height: int = 1400, extra: list[str] | None = None
                  ) -> Any:
    """A headless Chromium with an empty profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(p for n in CHROMIUM if (p := shutil.which(n)))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 f"--window-size={width},{height}", *(extra or [])):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = next(p for n in DRIVER if (p := shutil.which(n)))
    return webdriver.Chrome(service=Service(driver_path), options=options)


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    return path


def console_errors(driver: Any) -> list[str]:
    """The page's console errors (a script error would otherwise pass unseen)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
