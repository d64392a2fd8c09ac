"""The built docs site in a real browser: `mkdocs build --strict` into a folder, served on
127.0.0.1, opened in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium; nothing is downloaded). The home page renders; the search box finds a field name
(`max_steps`) and its result leads to the field's entry in the configuration reference.

    pip install -e '.[docs]' && apt-get install chromium chromium-driver && pytest -m docs
    POSTTRAIN_DOCS_SCREENSHOTS=/tmp/shots pytest -m docs     # also PNGs of the home page and the entry
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.docs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = [
    why
    for why, missing in [
        ("mkdocs-material is not installed (pip install -e '.[docs]')", importlib.util.find_spec("material") is None),
        ("selenium is not installed (pip install -e '.[docs]')", importlib.util.find_spec("selenium") is None),
        ("no chromium on PATH (apt-get install chromium)", CHROMIUM is None),
        ("no chromedriver on PATH (apt-get install chromium-driver)", DRIVER is None),
    ]
    if missing
]
if MISSING:
    pytest.skip("; ".join(MISSING), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as seen  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = os.environ.get("POSTTRAIN_DOCS_SCREENSHOTS")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """The site built from this checkout, served on 127.0.0.1: its base URL."""
    folder = tmp_path_factory.mktemp("site")
    build = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "-q",
        "-f",
        str(REPO / "mkdocs.yml"),
        "-d",
        str(folder),
    ]
    proc = subprocess.run(build, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / name))


def test_the_home_page_renders(site, browser):
    browser.get(site + "/")
    assert browser.title.startswith("posttrain")
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text == "posttrain"
    nav = browser.find_element(By.CSS_SELECTOR, "nav.md-nav--primary").get_attribute("textContent")
    assert "Getting started" in nav and "Configuration reference" in nav
    # the stylesheet applied: Material's header is fixed at the top
    assert browser.find_element(By.CSS_SELECTOR, "header.md-header").value_of_css_property("position") in (
        "fixed",
        "sticky",
    )
    shot(browser, "docs_home.png")


def test_search_finds_a_field_and_leads_to_its_reference_entry(site, browser):
    browser.get(site + "/")
    wait = WebDriverWait(browser, 30)
    box = wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")))
    box.click()
    box.send_keys("max_steps")
    link = ".md-search-result__item a.md-search-result__link"

    def offered(driver):
        """The results and their URLs once the entry is among them (the list is drawn again after
        each key typed: a result read while it is replaced is read again)."""
        results = driver.find_elements(By.CSS_SELECTOR, link)
        where = [urlsplit(r.get_attribute("href")) for r in results]
        return (results, where) if any(url.fragment == "stage-max_steps" for url in where) else False

    results, where = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,)).until(offered)
    entry = [r for r, url in zip(results, where, strict=True) if url.fragment == "stage-max_steps"]
    assert entry[0].is_displayed() and where[results.index(entry[0])].path == "/reference/stages/"
    # the field's own entry is the first thing the search offers: the first page, its first section
    assert [url.path for url in where[:2]] == ["/reference/stages/"] * 2 and results[1] == entry[0], where[:3]
    entry[0].click()
    wait.until(seen.url_contains("#stage-max_steps"))
    heading = wait.until(seen.visibility_of_element_located((By.ID, "stage-max_steps")))
    assert "max_steps" in heading.text
    text = browser.find_element(By.CSS_SELECTOR, "article").text
    assert "optimizer steps; -1 = use num_train_epochs" in text
    shot(browser, "docs_reference.png")
