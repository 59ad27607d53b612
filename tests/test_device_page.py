"""A device's page in a real headless Chromium, against the real daemon: from the
fleet page to a device, its latest values, its chart, another window, a CSV
download equal to what was posted (a gzipped rotated file, a header change)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import DaemonProcess
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from test_status_page import CHROMEDRIVER, CHROMIUM, post_block, wait

from ingestd.sinks.file.housekeeping import compress_file

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver",
)

TOKEN = "tok-456"
MAC = "00a0c8000009"
H1 = "Time,V,A"
H2 = "Time,V,A,P"


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    config = tmp_path / "ingestd.toml"
    config.write_text(f'[status]\ntoken = "{TOKEN}"\n')
    args = (
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
    )
    with asyncio.Runner() as runner:
        process = runner.run(DaemonProcess.start(*args))
        try:
            yield process
        finally:
            try:
                runner.run(process.stop())
            finally:
                process.kill()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(tmp_path: Path, downloads: Path) -> Iterator[webdriver.Chrome]:
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
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


def api(url: str, path: str) -> dict:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def block(header: str, rows: list[str]) -> str:
    return header + "\n" + "".join(row + "\n" for row in rows)


def test_device_page(
    daemon: DaemonProcess, browser: webdriver.Chrome, tmp_path: Path, downloads: Path
) -> None:
    now = time.time()
    # Three files: the header changes twice. Rows 3 h to 2 h ago, then
    # 30 min to a few minutes ago: the 1 h window holds only the last ones.
    first = [f"{stamp(now - 3 * 3600 + i * 300)},{230 + i},1.{i}" for i in range(12)]
    second = [f"{stamp(now - 2 * 3600 + i * 600)},{240 + i},2.{i},{i * 100}" for i in range(3)]
    third = [f"{stamp(now - 1800 + i * 60)},{220 + i % 5}.5,0.{i}" for i in range(25)]
    post_block(daemon.url, MAC, 0, data=block(H1, first))
    post_block(daemon.url, MAC, 0, data=block(H2, second))
    post_block(daemon.url, MAC, 0, data=block(H1, third))
    folder = tmp_path / "data" / "wattmon" / MAC
    closed = sorted(p for p in folder.iterdir() if p.name.endswith(".csv"))[:-1]
    assert len(closed) == 2
    for path in closed:  # as housekeeping does, once they have settled
        compress_file(path)

    browser.get(f"{daemon.url}/?token={TOKEN}")
    link = wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-device="wattmon/{MAC}"] td.id a'),
        "the device listed",
    )
    link.click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "figure.chart"), "charts drawn")
    assert browser.current_url.startswith(f"{daemon.url}/devices/{MAC}?")

    # The latest values: the last row posted, column by column.
    latest = browser.execute_script(
        "return Array.from(document.querySelectorAll('#latest-rows tr'),"
        " (tr) => [tr.cells[0] ? tr.querySelector('th').textContent : '',"
        " tr.querySelector('td').textContent]);"
    )
    assert latest == [list(pair) for pair in zip(H1.split(","), third[-1].split(","), strict=True)]

    def points() -> dict[str, int]:
        return browser.execute_script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('figure.chart'),"
            " (f) => [f.dataset.series,"
            " f.querySelector('polyline').getAttribute('points').trim().split(/\\s+/).length]));"
        )

    # 24 h: every row is a point (fewer than 500); P only where it was sent.
    assert points() == {"V": 40, "A": 40, "P": 3}
    chart = api(daemon.url, f"/api/devices/{MAC}/chart?window=24h")
    assert {s["name"]: len(s["points"]) for s in chart["series"]} == {"V": 40, "A": 40, "P": 3}

    # Another window: the chart follows, the address keeps it.
    Select(browser.find_element(By.ID, "window")).select_by_value("1h")
    wait(
        browser,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-window") == "1h",
        "the 1 h window drawn",
    )
    assert points() == {"V": 25, "A": 25}
    assert "window=1h" in browser.current_url

    # The files, newest first, with links; the two older ones gzipped.
    files = browser.execute_script(
        "return Array.from(document.querySelectorAll('#file-rows a'), (a) => a.textContent);"
    )
    assert len(files) == 3 and files[1].endswith(".csv.gz") and files[2].endswith(".csv.gz")

    # Download all data as CSV: what was posted, a section per header.
    browser.find_element(By.ID, "download-csv").click()
    target = downloads / f"{MAC}.csv"
    wait(browser, lambda d: target.exists(), "the download")
    expected = block(H1, first) + "\n" + block(H2, second) + "\n" + block(H1, third)
    assert target.read_text() == expected

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
