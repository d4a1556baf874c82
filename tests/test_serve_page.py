"""The page `pyramoe serve` answers on GET /, in a real headless Chromium against a live server:
a prompt streams its answer into the output (text shown before the answer's end), the expert-load heatmap follows
/stats (one row per MoE layer, its routed-token total grows after a generation), and a request the
server refuses shows its error. Needs `chromium` and `chromedriver` on PATH (Debian:
`apt-get install chromium chromium-driver`) and selenium; PYRAMOE_SKIP_BROWSER=1 skips it, anything
else missing fails it."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import start_server, tiny_run  # noqa: F401

WAIT_S = 30

# Records, each time the output's text changes, its length, the output's state and whether the
# finish reason is shown yet (mutation callbacks run between the page's reads of the stream).
RECORD_GROWTH = """
const out = document.getElementById("output"), note = document.getElementById("note");
window.__seen = [];
new MutationObserver(() => {
  const n = out.textContent.length, seen = window.__seen;
  if (n && (!seen.length || n !== seen[seen.length - 1][0]))
    seen.push([n, out.dataset.state, note.textContent.includes("finish reason")]);
}).observe(out, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):  # noqa: F811
    """Steps at least 20 ms apart: a 200-token answer streams for seconds, a step's token at a time."""
    live = start_server(tiny_run, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", "8",
                        "--min-step-ms", "20")
    yield live
    live.stop()


def launch(chromium: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    # Both paths given: selenium skips selenium-manager, so nothing is ever downloaded.
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium, started on a thread while the server fixture starts (tests call .result())."""
    if os.environ.get("PYRAMOE_SKIP_BROWSER") == "1":
        pytest.skip("PYRAMOE_SKIP_BROWSER=1")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("the page test needs chromium and chromedriver on PATH: apt-get install chromium chromium-driver "
                    "(or set PYRAMOE_SKIP_BROWSER=1 to skip it)", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the page test needs selenium: pip install selenium (or set PYRAMOE_SKIP_BROWSER=1)",
                    pytrace=False)
    with ThreadPoolExecutor(1) as pool:
        driver = pool.submit(launch, chromium, chromedriver)
        yield driver
        if driver.exception() is None:
            driver.result().quit()


def stats(server) -> dict:  # noqa: F811
    with urllib.request.urlopen(f"{server.url}/stats", timeout=10) as response:
        return json.load(response)


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d), message)


def heatmap(driver) -> dict:
    return driver.execute_script("""
        const table = document.getElementById("heatmap");
        return {total: Number(table.dataset.total), rows: table.tBodies[0].rows.length,
                cells: Array.from(table.tBodies[0].rows, (row) => row.cells.length),
                labels: Array.from(table.tBodies[0].rows, (row) => row.cells[0].textContent)};""")


def fill(driver, prompt: str, max_tokens: int, temperature: float) -> None:
    for field, value in (("prompt", prompt), ("max-tokens", max_tokens), ("temperature", temperature)):
        element = driver.find_element("id", field)
        element.clear()
        element.send_keys(str(value))


def finished(driver) -> str | None:
    state = driver.find_element("id", "output").get_attribute("data-state")
    return state if state in ("done", "error") else None


def test_page_streams_and_draws_expert_load(browser, server):  # noqa: F811
    driver = browser.result(timeout=WAIT_S)
    driver.get(f"{server.url}/")
    before = stats(server)
    layers, experts = len(before["moe_layers"]), len(before["expert_counts"][0])
    assert layers >= 1
    wait(driver, lambda d: heatmap(d)["rows"] == layers, "the heatmap never drew /stats")
    drawn = heatmap(driver)
    assert drawn["cells"] == [1 + experts] * layers  # a label, then one cell per expert
    assert drawn["labels"] == [f"block {b}" for b in before["moe_layers"]]
    total_before = drawn["total"]
    assert total_before == sum(map(sum, before["expert_counts"]))

    # Greedy and long (200 tokens), so the answer is the same each run, on a server whose steps are
    # 20 ms apart: the page must show text while the answer is still streaming, before its finish
    # reason arrives, and then more of it. (Merged chunks: however late the page reads, what it has
    # not read yet is still being made.)
    fill(driver, "def f1(x):\n", max_tokens=200, temperature=0)
    driver.execute_script(RECORD_GROWTH)
    driver.find_element("id", "generate").click()
    state = wait(driver, finished, "the output never reached data-state done")
    output = driver.find_element("id", "output")
    text = driver.execute_script("return arguments[0].textContent", output)
    assert state == "done", f"the page reports an error: {text!r}"
    assert text, "the answer is empty"
    seen = driver.execute_script("return window.__seen")
    partial = [n for n, shown_state, finish_shown in seen if shown_state == "streaming" and not finish_shown]
    assert partial and partial[0] < len(text), f"no partial answer was shown while streaming: {seen}"
    lengths = [n for n, _, _ in seen]
    assert lengths == sorted(lengths) and lengths[-1] == len(text)

    # The routed tokens of the generation reach the heatmap within a poll or two.
    wait(driver, lambda d: heatmap(d)["total"] > total_before, "the heatmap's data-total did not grow")
    after = stats(server)
    wait(driver, lambda d: heatmap(d)["total"] == sum(map(sum, after["expert_counts"])),
         "the heatmap's data-total never matched /stats")
    assert heatmap(driver)["rows"] == layers
    assert driver.find_element("id", "decode-path").text == after["decode_path"]
    assert after["generated_tokens"] > before["generated_tokens"]
    float(driver.find_element("id", "tps").text)  # a number once two polls have been seen


def test_page_shows_a_refused_request(browser, server):  # noqa: F811
    driver = browser.result(timeout=WAIT_S)
    driver.get(f"{server.url}/")
    fill(driver, "x", max_tokens=8, temperature=0)
    driver.execute_script("document.getElementById('prompt').value = 'return x + 1\\n'.repeat(400)")  # > context
    driver.find_element("id", "generate").click()
    assert wait(driver, finished, "the output never left data-state streaming") == "error"
    message = driver.find_element("id", "output").text
    assert "HTTP 400" in message and "context" in message, message


def test_page_streams_a_chat_answer(browser, server):  # noqa: F811
    driver = browser.result(timeout=WAIT_S)
    driver.get(f"{server.url}/")
    fill(driver, "Hello", max_tokens=16, temperature=0)
    driver.find_element("id", "mode").send_keys("chat")  # selects "chat completions"
    assert driver.execute_script("return document.getElementById('mode').value") == "chat"
    driver.find_element("id", "generate").click()
    assert wait(driver, finished, "the output never reached data-state done") == "done"
    assert driver.execute_script("return document.getElementById('output').textContent")
