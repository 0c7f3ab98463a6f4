"""The playground page at / in a real headless browser (Debian's chromium, driven by Selenium):
type a prompt, generate, the text streams in, Stop stops it, the tokens carry the notebook's
probability colours and their alternatives. Waits are on page conditions, never sleeps."""

from __future__ import annotations

import colorsys
import math
import re
import shutil

import httpx
import pytest
from serving import ServerProcess

from model.probview import probability_color

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; .ci/run installs them)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = ServerProcess("--checkpoint", str(tiny_checkpoint), "--no_access_log")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_text()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=opts)
    yield driver
    driver.quit()


def _rgb(hsl: str) -> tuple[int, int, int]:
    h, s, lum = (float(x) for x in re.findall(r"[\d.]+", hsl))
    r, g, b = colorsys.hls_to_rgb(h / 360, lum / 100, s / 100)
    return round(r * 255), round(g * 255), round(b * 255)


def _fill(driver, field: str, value: str) -> None:
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def test_playground_streams_stops_and_colours_tokens(server, browser):
    wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.05)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("tiny:"))
    _fill(browser, "prompt", "Once upon a time")
    _fill(browser, "max_tokens", "4096")  # the server's --max_tokens_limit: runs until Stop
    _fill(browser, "temperature", "0")
    browser.find_element(By.ID, "generate").click()
    tokens = By.CSS_SELECTOR, "#tokens span.lm-tok"
    wait.until(lambda d: len(d.find_elements(*tokens)) >= 20)  # the text streams in
    wait.until(lambda d: re.search(r"[\d.]+ tokens/s", d.find_element(By.ID, "stats").text))
    mark = server.mark()
    browser.find_element(By.ID, "stop-button").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
    assert browser.find_element(By.ID, "generate").is_enabled()
    server.wait_for(r"went away after \d+ tokens; 1 rows freed", since=mark)
    assert httpx.get(server.url + "/health").json()["running"] == 0  # the row was freed
    spans = browser.find_elements(*tokens)
    for span in spans[:10]:
        p = float(span.get_attribute("data-prob"))
        got = tuple(int(x) for x in re.findall(r"\d+", span.value_of_css_property(
            "background-color"))[:3])
        assert all(abs(a - b) <= 1 for a, b in zip(got, _rgb(probability_color(p)),
                                                    strict=True)), (p, got)
        title = span.get_attribute("title").split("\n")
        assert title[0].startswith('"') and "%" in title[0] and "rank 1" in title[0]  # greedy
        assert len(title) - 1 >= 5 and all(re.match(r'  ".*" [\d.e+-]+%$', t)
                                           for t in title[1:])

    # A short run to the end: the same text the API gives for the same request.
    _fill(browser, "max_tokens", "12")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done (length)")
    shown = browser.find_element(By.ID, "tokens").text
    api = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
        "top_p": 0.95}).json()
    assert shown.split() == api["choices"][0]["text"].split()  # (.text trims whitespace)
    assert len(browser.find_elements(*tokens)) == 12
    assert "12 tokens" in browser.find_element(By.ID, "stats").text
    assert math.isfinite(float(browser.find_elements(*tokens)[0].get_attribute("data-prob")))
