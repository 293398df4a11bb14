"""The live status page in a real browser: Debian's chromium driven by selenium through chromium-driver.

Runs in its own tox environment (``tox -e browser``); the default pytest run skips this folder.
glb runs as users run it: ``python -m glb`` with the shipped ``conf/lb.ini`` (its two demo
backends included), on a free port. The screenshot is kept in ``artifacts/``.
"""

import os
import shutil
import tempfile
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.support import shipped_glb, ws_connect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARTIFACTS = os.path.join(ROOT, "artifacts")
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
SESSIONS = 6


@pytest.fixture
def shipped_port(tmp_path):
    """``python -m glb`` with conf/lb.ini on a free port, once both demo backends are ready."""
    with shipped_glb(tmp_path) as glb:
        yield glb.port


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail(f"chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER}) are needed: "
                    "apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="glb-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def cell(driver, backend, name):
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-backend="{backend}"] td.{name}').text


@pytest.mark.timeout(120)
def test_status_page_shows_both_demo_backends_and_live_numbers(shipped_port, browser):
    port = shipped_port
    browser.get(f"http://127.0.0.1:{port}/glb/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: d.find_element(By.ID, "link").text == "live")
    rows = wait.until(lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#backends tbody tr[data-backend]"))
                      and len(found) == 2 and found)
    names = sorted(row.get_attribute("data-backend") for row in rows)
    assert all(cell(browser, name, "state") == "ready" for name in names)
    assert browser.find_element(By.ID, "t-sessions").text == "0"
    assert browser.find_element(By.ID, "t-ready").text == "2"

    clients = [ws_connect(f"ws://127.0.0.1:{port}/demo") for _ in range(SESSIONS)]
    try:
        deadline = time.monotonic() + 30
        for round_number in range(100_000):  # messages flow until the page shows them (bounded in count and time)
            for ws in clients:
                ws.send(f"hello {round_number}")
                assert ws.recv() == f"hello {round_number}"
            if round_number % 20 == 19 and (
                    browser.find_element(By.ID, "t-sessions").text == str(SESSIONS)
                    and browser.find_element(By.ID, "t-mps").text != "0"
                    and len(browser.find_elements(By.CSS_SELECTOR, "#chart path")) == 2):
                break
            assert time.monotonic() < deadline, "the page did not show the sessions and their messages"
        sessions = sum(int(cell(browser, name, "sessions")) for name in names)
        assert sessions == SESSIONS
        assert any(cell(browser, name, "mps-up") != "0" for name in names)
        assert browser.find_elements(By.CSS_SELECTOR, "#chart path")  # the two chart lines
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert browser.save_screenshot(os.path.join(ARTIFACTS, "status-page.png"))
    finally:
        for ws in clients:
            ws.close()
    wait.until(lambda d: d.find_element(By.ID, "t-sessions").text == "0")
    assert browser.find_element(By.ID, "t-closes").text == str(SESSIONS)
