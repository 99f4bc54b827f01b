"""toot's admin pages in a real browser: headless Chromium driven by Selenium logs in, opens
every page, presses "Retry now" and sees the delivery arrive, sent by the tests' worker.

Each page's screenshot is saved in ``$TOOT_SCREENSHOTS`` (default: ``screenshots/admin/``
at the repository's root, which git ignores). Needs Debian's ``chromium`` and
``chromium-driver`` (``.ci/run`` installs them); without them the test is skipped, unless
``TOOT_REQUIRE_BROWSER=1`` says it must run, as ``.ci/run`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from django.contrib import admin
from django.urls import include, path

from devtools.processes import ROOT, wait_for
from tests.http_server import HTTPServer, Reply
from tests.utils import relaying_lanes
from toot.engine import queue
from toot.models import DeadLetter
from toot.protocol.events import Event
from toot.publisher import lanes, store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery

urlpatterns = [path("admin/", admin.site.urls), path("toot/", include("toot.urls"))]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls(__name__),
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER) and os.environ.get("TOOT_REQUIRE_BROWSER") != "1",
        reason="needs chromium and chromium-driver (Debian), as .ci/run installs them",
    ),
]

SCREENSHOTS = Path(os.environ.get("TOOT_SCREENSHOTS", ROOT / "screenshots" / "admin"))
CHANNEL = "org.example.test.users.updated.v1"
PASSWORD = "a-password-for-the-browser"


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(browser, name: str) -> Path:
    """The whole page: the window grown to its height first."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, max(1000, min(int(height), 4000)))
    where = SCREENSHOTS / f"{name}.png"
    assert browser.save_screenshot(str(where)), f"no screenshot of {name}"
    return where


def test_an_operator_opens_every_page_and_retries_now(
    browser, live_server, django_user_model, celery_worker, redis
):
    from selenium.webdriver.common.by import By

    django_user_model.objects.create_superuser("operator", "op@example.com", PASSWORD)
    with relaying_lanes(), HTTPServer(Reply(200)) as subscriber:
        url = subscriber.url
        store.add(CHANNEL, url)
        # A delivery that failed and waits an hour for its retry.
        event = Event(CHANNEL, {"id": 1}).to_dict()
        record = {"url": url, "events": [event], "batch": False, "id": event["id"]}
        lanes.renew("browser-test")
        lanes.push({url: (False, ["S" + json.dumps(Event(CHANNEL, {}).to_dict())])})
        reply = lanes.claim("browser-test", queue.new_id(), None)
        assert reply is not None and reply.claim is not None
        failed = reply.claim
        failed.outcome, failed.failure, failed.failed = lanes.FAILED, "status 503", 1
        failed.retries = [({"delivery": {**record, "attempts": 1, "first_attempt_at": None}}, 3600)]
        lanes.claim("browser-test", queue.new_id(), failed, take=False)
        bury_delivery(Event(CHANNEL, {"id": 2}).to_dict(), url, 8, Outcome(status=500), None)

        browser.get(f"{live_server.url}/admin/login/")
        browser.find_element(By.NAME, "username").send_keys("operator")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        assert "Retries waiting" in browser.find_element(By.ID, "content").text
        shoot(browser, "index")

        pages = {
            "overview": "/admin/toot/overview/",
            "subscriptions": f"/admin/toot/subscription/?channel={CHANNEL}",
            "retries": f"/admin/toot/retry/?channel={CHANNEL}",
            "dead-letters": "/admin/toot/deadletter/",
            "outbox": "/admin/toot/outboxevent/",
        }
        for name, page in pages.items():
            browser.get(live_server.url + page)
            assert "Server Error" not in browser.title
            shoot(browser, name)
        browser.get(live_server.url + pages["overview"])
        assert browser.find_element(By.CSS_SELECTOR, "svg.toot-chart")
        browser.get(live_server.url + pages["subscriptions"])
        assert "status 503" in browser.find_element(By.ID, "toot-subscriptions").text

        browser.get(live_server.url + pages["retries"])
        assert event["id"] in browser.find_element(By.ID, "toot-retry-items").text
        row = next(
            row
            for row in browser.find_elements(By.CSS_SELECTOR, "#toot-retries tbody tr")
            if url in row.text
        )
        row.find_element(By.CSS_SELECTOR, "input.toot-retry-url").click()
        assert "retries due now" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
        shoot(browser, "retries-after-retry-now")

        def arrived() -> bool:
            return any(r.json().get("id") == event["id"] for r in subscriber.requests)

        wait_for(arrived, 20, "the retried delivery to arrive")
        wait_for(lambda: not lanes.retries([url])[url].count, 10, "no retry to wait")
        browser.get(live_server.url + pages["overview"])
        shoot(browser, "overview-after-retry-now")
        store.remove(CHANNEL, url)
    DeadLetter.objects.all().delete()
    saved = {shot.name for shot in SCREENSHOTS.glob("*.png")}
    assert {f"{name}.png" for name in [*pages, "index"]} <= saved
