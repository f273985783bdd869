"""The portal in a real browser: headless Debian Chromium driven by Selenium through the system chromedriver.

The projections service (real chDB, real access control, demo rows of two tenants from
`tests/test_portal.py`) is served on a loopback port; the browser logs in through the form,
opens every page, checks each chart drew marks, and saves a screenshot of each page (into
`tmp_path`, and into `$LEDGERFLOW_ARTIFACTS` when set). Skipped only where Chromium or its
driver is not installed; CI installs both (`.ci/run`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from projections.portal import PAGES, Page
from projections.service import ProjectionService
from tests.test_portal import ADMIN_SECRET, OPERATOR_PAGES, OPERATOR_TOKEN, TENANT_PAGES, USER_SECRET, make_read_side

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or not os.path.exists(CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]

# Marks pygal draws for data: bars (rect), lines (path.line), dots (circle), pie slices (path.slice).
_MARKS_JS = """
return Array.from(document.querySelectorAll('figure.chart svg')).map(svg => ({
  title: svg.closest('figure').dataset.title,
  marks: svg.querySelectorAll('g.series rect, g.series path, g.series circle').length,
  width: svg.getBoundingClientRect().width,
  height: svg.getBoundingClientRect().height,
}));
"""


class Served:
    """An aiohttp app on a free loopback port, served from its own thread and event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, name="portal-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def portal(chdb_url: str) -> Iterator[str]:
    svc: ProjectionService = make_read_side(chdb_url)
    served = Served(svc.make_app())
    yield served.url
    served.close()
    assert svc.writer is not None
    svc.writer.command(f"DROP DATABASE IF EXISTS {svc.database}")
    svc.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1600",
    ):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager is never asked to download anything.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    """A full-window PNG of the current page, kept under tmp_path and $LEDGERFLOW_ARTIFACTS if set."""
    path = tmp_path / f"portal-{name}.png"
    assert driver.save_screenshot(str(path)), name
    assert path.stat().st_size > 5000  # a real render, not a blank image
    artifacts = os.environ.get("LEDGERFLOW_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / path.name)
    return path


def log_in(driver: WebDriver, base: str, secret: str) -> None:
    driver.get(f"{base}/portal/")
    assert driver.current_url.endswith("/portal/login")  # redirected: no session
    box = driver.find_element(By.NAME, "secret")
    box.send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    # click() returns before the form's POST navigates: wait for the login page to be replaced,
    # or the next assertion reads the old URL on a slow machine.
    WebDriverWait(driver, 30).until(lambda _: _detached(box))


def _detached(element: WebElement) -> bool:
    """`staleness_of`, also for Chrome's answer when the old page's node is asked about while
    the new page replaces it ("Node with given id does not belong to the document": a CI run
    failed on it), which Selenium raises as a plain WebDriverException."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in (exc.msg or ""):
            return True
        raise
    return False


def visit_every_page(
    driver: WebDriver, base: str, tmp_path: Path, who: str, pages: tuple[Page, ...] = PAGES
) -> dict[str, str]:
    """Open each page; assert it has charts that drew marks and no empty state; return the sources."""
    sources: dict[str, str] = {}
    for page in pages:
        driver.get(f"{base}/portal/{page.slug}")
        assert driver.find_element(By.TAG_NAME, "h1").text == page.title
        charts = driver.execute_script(_MARKS_JS)
        assert charts, f"{page.title}: no chart"
        for c in charts:
            assert c["marks"] > 0 and c["width"] > 100 and c["height"] > 100, (page.title, c)
        assert not driver.find_elements(By.CSS_SELECTOR, ".empty"), page.title
        sources[page.title] = driver.page_source
        shoot(driver, tmp_path, f"{who}-{page.slug or 'spend'}")
    return sources


def test_operator_sees_every_page_with_charts_for_every_tenant(portal: str, browser: WebDriver, tmp_path: Path) -> None:
    log_in(browser, portal, OPERATOR_TOKEN)
    assert browser.current_url == f"{portal}/portal/"
    sources = visit_every_page(browser, portal, tmp_path, "operator")
    every = "".join(sources.values())
    assert "acme" in every and "globex" in every
    assert OPERATOR_TOKEN not in every  # the secret is never echoed into a page
    assert len(list(tmp_path.glob("portal-operator-*.png"))) == len(PAGES)
    # the panels added with their tables: lag per group, SLO burn, verification, forecast, anomalies
    assert "ledgerflow-sink" in sources["Consumer lag"] and "sink-a" in sources["Consumer lag"]
    assert "Burn rate per window" in sources["SLOs"] and "Firing now" in sources["SLOs"]
    assert "FAILED at seq 30" in sources["Ledger"] and 'class="ok"' in sources["Ledger"]
    assert "HoltWinters" in sources["Budgets"] and "Cost anomalies" in sources["Spend and savings"]
    for page in OPERATOR_PAGES:
        assert f'href="/portal/{page.slug}"' in browser.page_source  # linked for the operator


@pytest.mark.parametrize(("tenant", "other"), [("acme", "globex"), ("globex", "acme")])
def test_a_tenant_admin_sees_only_their_tenant(
    portal: str, browser: WebDriver, tmp_path: Path, tenant: str, other: str
) -> None:
    log_in(browser, portal, ADMIN_SECRET[tenant])
    sources = visit_every_page(browser, portal, tmp_path, tenant, TENANT_PAGES)
    for title, source in sources.items():
        assert tenant in source, title
        assert other not in source, f"{other!r} appears on {tenant}'s {title} page"
        for page in OPERATOR_PAGES:
            assert f'href="/portal/{page.slug}"' not in source, f"{title} links the operator's {page.title}"
    for page in OPERATOR_PAGES:  # platform-wide pages: refused, nothing of them shown
        browser.get(f"{portal}/portal/{page.slug}")
        assert "operator's read token only" in browser.find_element(By.CSS_SELECTOR, ".error").text
        assert not browser.find_elements(By.CSS_SELECTOR, "figure.chart")
        shoot(browser, tmp_path, f"{tenant}-refused-{page.slug}")
    browser.get(f"{portal}/portal/budgets?tenant={other}")
    assert f"reads tenant '{tenant}' only" in browser.find_element(By.CSS_SELECTOR, ".error").text
    assert other not in browser.page_source.replace(f"not '{other}'", "")
    # logging out ends the session: the pages send the browser back to the form
    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    browser.get(f"{portal}/portal/ledger")
    assert browser.current_url.endswith("/portal/login")


@pytest.mark.parametrize(("secret", "says"), [("lf_not_a_key", "unknown"), (USER_SECRET, "needs 'admin' or 'analyst'")])
def test_a_wrong_key_is_refused(portal: str, browser: WebDriver, tmp_path: Path, secret: str, says: str) -> None:
    log_in(browser, portal, secret)
    assert browser.current_url.endswith("/portal/login")
    assert says in browser.find_element(By.ID, "login-error").text
    assert browser.get_cookies() == []
    shoot(browser, tmp_path, f"refused-{'user' if secret == USER_SECRET else 'unknown'}")
    browser.get(f"{portal}/portal/routing")
    assert browser.current_url.endswith("/portal/login")
