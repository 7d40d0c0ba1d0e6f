"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import LiveServer

ARTIFACTS = Path(os.environ.get("UNETPP_TEST_ARTIFACTS", "test-artifacts"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium and chromium-driver must be installed (see .ci/run)")
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_upload_segment_compare_and_errors(
    live: LiveServer, browser, image_png: bytes, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    path = tmp_path / "nuclei.png"
    path.write_bytes(image_png)
    browser.get(live.url + "/")
    assert "unetpp" in browser.title
    _wait(browser, lambda d: "graphs" in d.find_element(By.ID, "model-info").text)
    # sample images from the embedded generator are offered
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples button")) == 4)

    # upload, choose level 2 by keyboard-reachable controls, segment: an overlay comes back
    browser.find_element(By.ID, "file").send_keys(str(path))
    _wait(browser, lambda d: d.find_element(By.ID, "segment").is_enabled())
    browser.find_element(By.CSS_SELECTOR, "#route option[value=level]").click()
    browser.find_element(By.CSS_SELECTOR, "#level option[value='2']").click()
    browser.find_element(By.ID, "segment").click()
    _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    figures = browser.find_elements(By.CSS_SELECTOR, "#views figure")
    assert len(figures) == 2 and "L2 fp32" in figures[1].text
    size = browser.execute_script(
        "const i = document.querySelectorAll('#views img')[1];"
        "return i.complete ? [i.naturalWidth, i.naturalHeight] : null;"
    )
    assert size == [130, 100]  # the overlay has the input's size

    # compare: all four levels side by side, each with its latency and measured IoU
    browser.find_element(By.ID, "compare").click()
    _wait(browser, lambda d: d.find_element(By.ID, "status").text == "Compared all four levels.")
    results = browser.find_elements(By.CSS_SELECTOR, "#views figure.compare-result")
    assert [r.get_attribute("data-level") for r in results] == ["1", "2", "3", "4"]
    for r in results:
        assert " ms" in r.text and "measured IoU" in r.text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web_compare.png"))
    assert Image.open(ARTIFACTS / "web_compare.png").size[0] > 0

    # an error from the API is shown, not swallowed
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    _wait(browser, lambda d: "broken.png" in d.find_element(By.ID, "status").text)
    browser.find_element(By.ID, "segment").click()
    _wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert "400" in browser.find_element(By.ID, "status").text


def test_samples_endpoint(live: LiveServer) -> None:
    names = live.client.get("/v1/samples").json()["samples"]
    assert len(names) == 4
    resp = live.client.get(f"/v1/samples/{names[0]}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.content.startswith(b"\x89PNG")
    missing = live.client.get("/v1/samples/..%2F..%2Fetc%2Fpasswd")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert live.client.get("/").headers["content-type"].startswith("text/html")


def test_the_page_asks_for_the_api_key(browser, tiny_repository: Path) -> None:
    """With UNETPP_API_KEY set the page still loads; the API's 401 makes it ask for the key."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    from tests.helpers import settings, start, stop

    server = start(settings(tiny_repository, api_key="s3cret"))
    try:
        browser.get(server.url + "/")
        for answer in ("wrong", "s3cret"):  # a wrong key is asked again
            prompt = _wait(browser, expected_conditions.alert_is_present())
            assert "API key" in prompt.text
            prompt.send_keys(answer)
            prompt.accept()
        _wait(browser, lambda d: "graphs" in d.find_element(By.ID, "model-info").text)
        key = browser.execute_script("return sessionStorage.getItem('unetpp-api-key')")
        assert key == "s3cret"
    finally:
        stop(server)


def test_a_multiclass_model_names_its_colours(
    browser, tiny_classes_repository: Path, tmp_path: Path
) -> None:
    """The overlay draws each class in its colour; the page names them in a legend and offers
    no object downloads (binary models only)."""
    from selenium.webdriver.common.by import By

    from tests.helpers import settings, start, stop, tiny_samples
    from unetpp.core.imageio import encode_png

    path = tmp_path / "cells.png"
    path.write_bytes(encode_png(tiny_samples("val", classes=True)[0].image))
    server = start(settings(tiny_classes_repository))
    try:
        browser.get(server.url + "/")
        _wait(browser, lambda d: "graphs" in d.find_element(By.ID, "model-info").text)
        legend = browser.find_element(By.ID, "legend")
        assert legend.is_displayed()
        spans = legend.find_elements(By.TAG_NAME, "span")
        assert [s.text for s in spans] == ["round", "elongated"]
        swatches = browser.execute_script(
            "return [...arguments[0].children].map("
            "(s) => getComputedStyle(s, '::before').backgroundColor);",
            legend,
        )
        assert swatches == ["rgb(255, 40, 40)", "rgb(40, 200, 40)"]
        objects = browser.find_elements(By.CSS_SELECTOR, "#download-format option[data-objects]")
        assert objects and not any(o.is_enabled() for o in objects)
        browser.find_element(By.ID, "file").send_keys(str(path))
        _wait(browser, lambda d: d.find_element(By.ID, "segment").is_enabled())
        browser.find_element(By.ID, "segment").click()
        _wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
        browser.save_screenshot(str(ARTIFACTS / "web_classes.png"))
    finally:
        stop(server)
