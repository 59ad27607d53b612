"""The status page in a real headless Chromium, against the real daemon."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import DaemonProcess
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"
TOKEN = "tok-123"
SILENT = "00a0c8000001"  # posts once, then falls silent
ACTIVE = ("00a0c8000002", "00a0c8000003")
STREAM = "site-a_mm-1"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver "
    "(apt-get install -y chromium chromium-driver)",
)


def post(url: str, path: str, body: bytes, content_type: str) -> None:
    request = urllib.request.Request(
        url + path, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == b"OK"


def post_block(url: str, mac: str, rows: int, data: str | None = None) -> None:
    if data is None:
        lines = (f"2026-11-21 08:00:{i:02d},230.{i},1.{i}\n" for i in range(rows))
        data = "Time,V,A\n" + "".join(lines)
    form = urllib.parse.urlencode(
        {"key": mac, "md5sum": hashlib.md5(data.encode()).hexdigest(), "data": data}
    )
    post(url, "/wattmon", form.encode(), "application/x-www-form-urlencoded")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    config = tmp_path / "ingestd.toml"
    config.write_text(f'[status]\ntoken = "{TOKEN}"\n')
    data = str(tmp_path / "data")
    args = ("--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", data)
    # The daemon's own event loop runs only inside these calls, so the
    # blocking browser calls in between are fine.
    with asyncio.Runner() as runner:
        process = runner.run(DaemonProcess.start(*args))
        try:
            yield process
        finally:
            try:
                runner.run(process.stop())
            finally:
                process.kill()  # only if it did not stop


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1480,330",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


class Poster:
    """Keeps some devices reporting while the test looks at the page."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="poster", daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        rows = 1
        try:
            while not self.stop.is_set():
                for mac in ACTIVE:
                    post_block(self.url, mac, rows)
                post(self.url, f"/{STREAM}", b'{"rx_bytes": 1}', "application/json")
                rows = rows % 9 + 1
                self.stop.wait(0.2)
        except (OSError, AssertionError) as exc:  # reported by the test
            self.error = exc


def rows(driver: webdriver.Chrome) -> list[list[str]]:
    """[device, class] per table row, read at once (the page redraws itself)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr'),"
        " (tr) => [tr.dataset.device, tr.className]);"
    )


def wait(driver: webdriver.Chrome, condition: Any, what: str) -> Any:
    return WebDriverWait(driver, 10, poll_frequency=0.05).until(
        lambda d: condition(d), message=what
    )


def test_status_page(daemon: DaemonProcess, browser: webdriver.Chrome, tmp_path: Path) -> None:
    post_block(daemon.url, SILENT, 3)
    post_block(daemon.url, ACTIVE[0], 0, data="1,2\n3,4\n")  # no header: quarantined
    poster = Poster(daemon.url)
    poster.thread.start()
    try:
        poster.stop.wait(3.0)  # SILENT has sent nothing for longer than 2 s now
        browser.get(f"{daemon.url}/status?silent=2s&token={TOKEN}")
        every = {f"wattmon/{SILENT}", *(f"wattmon/{mac}" for mac in ACTIVE), f"json/{STREAM}"}
        wait(browser, lambda d: {r[0] for r in rows(d)} == every, "all devices listed")

        # The silent device is on top, highlighted; the others are not.
        listed = rows(browser)
        assert listed[0] == [f"wattmon/{SILENT}", "silent"]
        assert all(cls == "" for _, cls in listed[1:]), listed
        summary = browser.find_element(By.ID, "summary").text
        assert summary.startswith("4 devices: 3 reporting, 1 silent"), summary
        # A sparkline per device, with a bar for the records of this hour.
        bars = browser.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr'),"
            " (tr) => tr.querySelectorAll('svg.spark rect').length);"
        )
        assert all(n >= 1 for n in bars), bars
        # Just the page: the window's own frame taken into account.
        chrome, height = browser.execute_script(
            "return [window.outerHeight - window.innerHeight,"
            " document.documentElement.scrollHeight];"
        )
        browser.set_window_size(1480, chrome + height)
        shot = tmp_path / "status-page.png"  # for a person to look at
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10 * 1024
        if os.environ.get("INGESTD_UPDATE_SCREENSHOT"):  # the README's picture
            browser.save_screenshot(str(DOCS_SCREENSHOT))

        # Sorting by a column keeps the silent device on top.
        browser.find_element(By.CSS_SELECTOR, "th[data-key=id] button").click()
        wait(
            browser,
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "th[data-key=id]").get_attribute("aria-sort")
                == "ascending"
            ),
            "sorted by id",
        )
        order = [device for device, _ in rows(browser)]
        assert order == [f"wattmon/{SILENT}", *(f"wattmon/{m}" for m in ACTIVE), f"json/{STREAM}"]
        browser.find_element(By.CSS_SELECTOR, "th[data-key=id] button").click()
        wait(browser, lambda d: [r[0] for r in rows(d)][1:] == order[:0:-1], "sorted back")

        # The filter hides rows that do not match; what is typed stays text.
        box = browser.find_element(By.ID, "filter")
        box.send_keys(ACTIVE[1][-4:])
        wait(browser, lambda d: [r[0] for r in rows(d)] == [f"wattmon/{ACTIVE[1]}"], "filtered")
        box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        box.send_keys("<img src=x>mm-1")
        wait(browser, lambda d: len(rows(d)) == 0, "nothing matches")
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        box.send_keys("MM-1")
        wait(browser, lambda d: [r[0] for r in rows(d)] == [f"json/{STREAM}"], "case-blind")

        # The page refreshes itself: the records keep climbing.
        def records() -> int:
            return int(
                browser.execute_script(
                    "return document.querySelector('#rows tr td.n')"
                    ".textContent.replace(/\\D/g, '');"
                )
            )

        before = records()
        wait(browser, lambda d: records() > before, "a refresh with new records")

        # A longer threshold: nothing is silent; the address keeps the controls.
        threshold = browser.find_element(By.ID, "threshold")
        threshold.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        threshold.send_keys("1h", Keys.ENTER)
        wait(browser, lambda d: " 0 silent" in d.find_element(By.ID, "summary").text, "1h")
        box.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        wait(browser, lambda d: len(rows(d)) == 4 and all(c == "" for _, c in rows(d)), "all")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query)
        assert query == {"silent": ["1h"], "token": [TOKEN]}

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []  # no script error, nothing the page's CSP refused
        state = browser.find_element(By.ID, "state")
        assert state.get_attribute("class") == "" and state.text.startswith("updated")
    finally:
        poster.stop.set()
        poster.thread.join(10)
    assert poster.error is None
