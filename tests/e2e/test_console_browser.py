"""The console in a real headless browser (Debian's chromium, driven by selenium through
chromedriver): log in, the overview's charts, an order found and its timeline, a message's
raw body, a failure replayed; no session means the login page; a form without its CSRF token
is refused. Each page is saved as a screenshot under ``.pandasync/screenshots/`` (or
``PANDASYNC_SCREENSHOTS``); docs/operations.md shows a set of them.

Without chromium and chromedriver the test is skipped on a laptop and fails on CI; install
them with ``apt-get install -y --no-install-recommends chromium chromium-driver``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker

from service.app import create_app
from service.broker import RECONCILE_QUEUE
from tests.conftest import ON_CI
from tests.support.console import (
    ADMIN_TOKEN,
    FAILED_ORDER_ID,
    ORDER_ID,
    console_settings,
    seed,
)
from tests.support.servers import uvicorn_thread

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PANDASYNC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PANDASYNC_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(os.environ.get("PANDASYNC_SCREENSHOTS", ROOT / ".pandasync" / "screenshots"))
WAIT_S = 15


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        message = (
            f"no {' or '.join(missing)}: apt-get install -y --no-install-recommends "
            "chromium chromium-driver"
        )
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser() -> Iterator[Any]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pandasync-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver: Any, name: str) -> None:
    """Save the whole page (the window made as tall as the page) as ``name``.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(600, min(int(height) + 40, 1400)))
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


async def test_the_console_in_a_browser(fresh_database_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    seeded = await seed(fresh_database_url)
    broker = StubBroker()
    app = create_app(console_settings(fresh_database_url), broker=broker)
    with uvicorn_thread(app) as (host, port):
        base = f"http://{host}:{port}"

        def find(css: str) -> Any:
            return browser.find_element(By.CSS_SELECTOR, css)

        def submit(button: Any) -> None:
            """Click a form's button and wait for the page it leads to."""
            from selenium.webdriver.support import expected_conditions
            from selenium.webdriver.support.wait import WebDriverWait

            page = browser.find_element(By.TAG_NAME, "html")
            button.click()
            WebDriverWait(browser, WAIT_S).until(expected_conditions.staleness_of(page))

        # No session: the login page, which remembers where to go.
        browser.get(f"{base}/console/failures")
        assert browser.current_url.startswith(f"{base}/console/login?next=")
        shot(browser, "login")
        find("#token").send_keys("not the token, not at all")
        submit(find("#login"))
        assert "That is not the admin token" in find("#problem").text
        find("#token").send_keys(ADMIN_TOKEN)
        submit(find("#login"))
        assert browser.current_url == f"{base}/console/failures"

        # The overview: a card per account and platform, with charts that hold data.
        browser.get(f"{base}/console/")
        card = find('section.card[data-account="acct-1"][data-platform="taobao"]')
        charts = card.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(charts) == 2
        assert len(charts[0].find_elements(By.CSS_SELECTOR, "rect")) >= 100
        assert f"{seeded.messages} messages in the last 3 h" in browser.page_source
        assert charts[1].find_elements(By.CSS_SELECTOR, "polyline.line-max")
        shot(browser, "overview")

        # Orders: the list, then a search that lands on the order's timeline.
        browser.get(f"{base}/console/orders")
        assert ORDER_ID in find("#orders").text
        shot(browser, "orders")
        find("#q").send_keys(ORDER_ID)
        submit(find("#find"))
        assert browser.current_url == f"{base}/console/orders/taobao/{ORDER_ID}?account=acct-1"
        timeline = find("#timeline").text
        assert "status pending_payment → paid" in timeline
        assert "inbox_message" in timeline
        shot(browser, "order")

        # Messages, and a hostile body shown as text (no script ran, no element was made).
        browser.get(f"{base}/console/messages")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#messages tbody tr")) == 50
        shot(browser, "messages")
        browser.get(f"{base}/console/messages/{seeded.hostile_inbox_id}")
        assert "<script>alert(1)</script>" in find("#raw-body").text
        assert not browser.find_elements(By.CSS_SELECTOR, "main script, main img, #headers svg")
        shot(browser, "message")

        # Failures: replay one; its row then says so, and a reconcile went to the broker.
        browser.get(f"{base}/console/failures")
        row = find(f"#failure-{seeded.failure_id}")
        assert FAILED_ORDER_ID in row.text
        assert row.find_element(By.CSS_SELECTOR, "td.replayed").text == "-"
        submit(row.find_element(By.CSS_SELECTOR, "button.replay"))
        assert "Queued 1 failed order(s)" in find("#notice").text
        replayed = find(f"#failure-{seeded.failure_id} td.replayed").text
        assert replayed.startswith("replayed 1×")
        assert broker.queues[RECONCILE_QUEUE].qsize() == 1
        shot(browser, "failures")

        # The same form without its CSRF token: refused, nothing sent.
        browser.execute_script(
            "document.querySelectorAll('#replay-all ~ input[name=csrf], "
            'form[action="/console/failures/replay"] input[name=csrf]\')'
            ".forEach(e => e.remove())"
        )
        submit(find("#replay-all"))
        assert "did not come from this console session" in find("#problem").text
        assert broker.queues[RECONCILE_QUEUE].qsize() == 1

        # Without the session cookie: back to the login page.
        browser.delete_all_cookies()
        browser.get(f"{base}/console/orders")
        assert browser.current_url.startswith(f"{base}/console/login?next=")
