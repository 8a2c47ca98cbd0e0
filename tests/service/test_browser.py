"""The recipe explorer (``/``) and the API docs (``/docs``, ``/redoc``) in a real browser: Debian's
headless Chromium driven by Selenium through the system's chromedriver (nothing is downloaded).

The browser can reach the loopback service only: every other host name fails to resolve, so a page
that needed a CDN would stay blank. Without Chromium the tests skip, except in CI (``CI=true``),
where a missing browser is a failure (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from largebatch.service.app import create_app
from largebatch.service.settings import Settings

from .conftest import free_port, make_keys
from .sweep import loss_curve, seed_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The README's picture. The tests write their screenshot to a temporary directory; only
# `LARGEBATCH_UPDATE_SCREENSHOT=1 pytest tests/service/test_browser.py -m slow` rewrites this file.
SCREENSHOT = ROOT / "docs" / "explorer.png"
WAIT_S = 30


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = (f"no {' and no '.join(missing)} on this machine: install Debian's chromium and chromium-driver "
               "(`apt-get install chromium chromium-driver`; .ci/run does it) and the dev extra")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    assert chromium is not None and driver is not None
    return chromium, driver


class Server:
    """The app under a real uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings):
        import uvicorn

        self.app = create_app(settings)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-browser-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def browser() -> Iterator:
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-device-scale-factor=1", "--hide-scrollbars",
                "--lang=en-US", "--no-first-run", "--disable-extensions", "--disable-background-networking",
                # No network but the service's: a page that reaches for a CDN finds nothing there.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    drv.set_page_load_timeout(WAIT_S)
    # What each page's Content-Security-Policy stopped before it reached the network.
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.__blocked = [];"
        "document.addEventListener('securitypolicyviolation', e => window.__blocked.push(e.blockedURI));")})
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def open_server(tmp_path) -> Iterator[Server]:
    server = Server(Settings(store_url=f"sqlite:///{tmp_path / 'open.db'}", open_mode=True))
    yield server
    server.stop()


@pytest.fixture
def keyed_server(tmp_path) -> Iterator[tuple[Server, str]]:
    url = f"sqlite:///{tmp_path / 'keyed.db'}"
    server = Server(Settings(store_url=url, open_mode=False, sweep_interval_s=3600))
    yield server, make_keys(url)["write"]
    server.stop()


def _wait(drv, predicate, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import (
        JavascriptException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.1,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                                 JavascriptException)).until(lambda d: predicate(d))
    except Exception as e:
        errors = drv.find_elements("id", "error")
        shown = errors[0].text if errors else ""
        raise AssertionError(f"timed out waiting for {what}; page error: {shown!r}") from e


def _off_origin(drv, base_url: str) -> tuple[list[str], list[str]]:
    """(what the page fetched from elsewhere, what it tried to but its CSP blocked)."""
    names = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    blocked = drv.execute_script("return window.__blocked")
    tried = [n for n in names if not n.startswith(base_url) and not n.startswith("data:")]
    return [n for n in tried if n not in blocked], blocked


def _hover(drv, svg_css: str, x: float, y: float) -> None:
    """Move the mouse to (x, y) in the SVG's own coordinates."""
    from selenium.webdriver.common.action_chains import ActionChains

    svg = drv.find_element("css selector", svg_css)
    w, h = float(svg.get_attribute("width")), float(svg.get_attribute("height"))
    ActionChains(drv).move_to_element_with_offset(svg, round(x - w / 2), round(y - h / 2)).perform()


def _text(drv, css: str) -> str:
    return drv.execute_script("return document.querySelector(arguments[0]).innerText", css)


def _run_cells(drv, run_id: int) -> list[str]:
    return drv.execute_script("return [...document.querySelectorAll(`#runs tr[data-run='${arguments[0]}'] td`)]"
                              ".map(td => td.innerText)", run_id)


# ------------------------------------------------------------------------------------------ the tests


def test_explorer_shows_a_recipe_and_its_schedule_in_open_mode(browser, open_server):
    drv = browser
    drv.get(open_server.base_url + "/")
    _wait(drv, lambda d: _text(d, "#key-status") == "open mode", "the page to see open mode")
    # The default request is LAMB's BERT-Large 512 -> 32K (LAMB Table 4): LR 5e-3, 15,625 steps.
    drv.find_element("id", "submit").click()
    _wait(drv, lambda d: d.find_elements("css selector", "#stages tbody tr"), "the stages table")
    row = [td.text for td in drv.find_elements("css selector", "#stages tbody tr td")]
    assert row[1:4] == ["32,768", "15,625", "0.005"], row
    assert _text(drv, "#recipe-summary").startswith("LAMB, LR 0.005")
    assert drv.find_elements("css selector", "#rationale li")
    # The chart: a drawn LR line; pointing at its highest point shows the recipe's peak LR.
    path = drv.find_element("css selector", "#schedule-chart svg g.series path").get_attribute("d")
    points = [tuple(map(float, p.split(","))) for p in path.lstrip("M").split("L")]
    assert len(points) > 100
    peak_x, peak_y = min(points, key=lambda p: p[1])
    _hover(drv, "#schedule-chart svg", peak_x, peak_y)
    _wait(drv, lambda d: d.find_element("css selector", "#schedule-chart .tooltip").is_displayed(), "the tooltip")
    assert "learning rate: 0.005" in _text(drv, "#schedule-chart .tooltip")
    # A bad request answers with the service's error, shown on the page.
    drv.find_element("id", "request").clear()
    drv.find_element("id", "request").send_keys('{"model": {"params": -1}}')
    drv.find_element("id", "submit").click()
    _wait(drv, lambda d: d.find_element("id", "error").is_displayed(), "the error")
    assert "422 validation_error" in _text(drv, "#error") and "model.params" in _text(drv, "#error")
    assert _off_origin(drv, open_server.base_url) == ([], [])


def test_explorer_with_a_key_shows_a_study_its_evidence_and_live_runs(browser, keyed_server, tmp_path):
    from selenium.webdriver.support.ui import Select

    server, key = keyed_server
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        running = seed_study(c, "bert-large-sweep")
        drv = browser
        drv.get(server.base_url + "/")
        _wait(drv, lambda d: "needs an API key" in _text(d, "#key-status"), "the page to ask for a key")
        drv.find_element("id", "api-key").send_keys(key)
        drv.find_element("css selector", "#key-form button").click()
        _wait(drv, lambda d: len(d.find_elements("css selector", "#study option")) == 2, "the study list")
        assert drv.execute_script("return localStorage.getItem('largebatch.apiKey')") == key

        Select(drv.find_element("id", "study")).select_by_value("bert-large-sweep")
        _wait(drv, lambda d: len(d.find_elements("css selector", "#runs tbody tr")) == 15, "the runs table")
        drv.find_element("id", "submit").click()
        _wait(drv, lambda d: d.find_elements("css selector", "#stages tbody tr"), "the recipe")
        _wait(drv, lambda d: d.find_elements("css selector", "#evidence-chart g.series.points circle[r='6']"),
              "the recipe's point on the evidence chart")

        # The recipe was fitted on the study: the rationale says so, and the fit is shown.
        assert "evidence" in _text(drv, "#rationale")
        assert "Fit on 12 completed runs" in _text(drv, "#fit")
        legend = _text(drv, "#evidence-chart .legend")
        for name in ("completed", "diverged", "fitted optimum", "divergence boundary", "recipe"):
            assert name in legend
        # The charts redraw on every refresh: read them in one go, not element by element.
        drawn = drv.execute_script("""
            const out = {};
            for (const g of document.querySelectorAll(arguments[0])) {
              out[g.closest('.chart').id + ':' + g.dataset.name] = {
                paths: [...g.querySelectorAll('path')].map(p => p.getAttribute('d')),
                circles: g.querySelectorAll('circle').length};
            }
            return out;""", "#evidence-chart g.series, #metric-chart g.series, #loss-chart g.series")
        assert drawn["evidence-chart:fitted optimum"]["paths"][0].count("L") >= 2
        assert drawn["evidence-chart:divergence boundary"]["paths"][0]
        assert drawn["evidence-chart:completed"]["circles"] == 12
        assert {k for k in drawn if k.startswith("metric-chart:")} == {
            "metric-chart:batch 8,192", "metric-chart:batch 16,384", "metric-chart:batch 32,768",
            "metric-chart:diverged"}
        # Loss curves: the 12 newest runs, the running one among them.
        curves = [k for k in drawn if k.startswith("loss-chart:")]
        assert len(curves) == 12 and all(drawn[k]["paths"] for k in curves)
        assert f"loss-chart:run {running} · B 32,768 · LR 0.006 · running" in drawn

        # The running run is refreshed while it trains.
        assert _run_cells(drv, running)[2] == "running"
        before = _run_cells(drv, running)[6]
        more = loss_curve(15625, 1.7)[15:30]
        assert c.post(f"/v1/runs/{running}/reports", json={"reports": more}).status_code == 200
        want = f"{more[-1]['step']:,}"
        _wait(drv, lambda d: _run_cells(d, running)[6] == want, f"the running run's last step {want}", timeout=15)
        assert before != want
        assert "refreshing every" in _text(drv, "#runs-refresh")

        # A click on a run focuses its loss curve.
        drv.find_element("css selector", f"#runs tbody tr[data-run='{running}']").click()
        _wait(drv, lambda d: d.execute_script("return document.querySelector('#runs tr.selected')?.dataset.run")
              == str(running), "the selected run")
        assert _off_origin(drv, server.base_url) == ([], [])

        # The picture the README shows: the whole page.
        drv.find_element("css selector", f"#runs tbody tr[data-run='{running}']").click()
        _wait(drv, lambda d: d.execute_script("return !document.querySelector('#runs tr.selected')"),
              "no selected run")
        drv.execute_script("window.scrollTo(0, 0)")
        for _ in range(3):  # the charts redraw (150 ms after a resize) for the new size, and may move things
            height = drv.execute_script("return document.documentElement.scrollHeight")
            drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False})
            time.sleep(0.4)
        shot = SCREENSHOT if os.environ.get("LARGEBATCH_UPDATE_SCREENSHOT") == "1" else tmp_path / "explorer.png"
        assert drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000


def _request(drv) -> dict:
    import json

    return json.loads(drv.find_element("id", "request").get_attribute("value"))


def test_explorer_opens_on_the_newest_study_with_a_request_from_its_runs(browser, keyed_server):
    from selenium.webdriver.support.ui import Select

    server, key = keyed_server
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        assert c.post("/v1/studies", json={"name": "empty", "model_params": 110_000_000,
                                           "model_family": "transformer"}).status_code == 201
        running = seed_study(c, "bert-large-sweep")  # the newest study
        drv = browser
        drv.get(server.base_url + "/")
        drv.execute_script("localStorage.setItem('largebatch.apiKey', arguments[0])", key)
        drv.get(server.base_url + "/")
        # Nothing picked by hand: the newest study, its evidence and its runs are on the page.
        _wait(drv, lambda d: len(d.find_elements("css selector", "#runs tbody tr")) == 15, "the newest study's runs")
        assert drv.find_element("id", "study").get_attribute("value") == "bert-large-sweep"
        _wait(drv, lambda d: "Fit on 12 completed runs" in _text(d, "#fit"), "the study's evidence")
        # The request comes from the study's own runs: its best run at its smallest batch size is the
        # reference, its largest batch size the target.
        req = _request(drv)
        assert req["study"] == "bert-large-sweep" and req["model"]["params"] == 340_000_000
        assert req["reference"]["batch_size"] == 8192 and req["reference"]["lr"] == 2.5e-3
        assert req["target"]["batch_size"] == 32768
        assert "from bert-large-sweep's runs" in _text(drv, "#request-source")
        drv.find_element("id", "submit").click()
        _wait(drv, lambda d: d.find_elements("css selector", "#stages tbody tr"), "the recipe")
        assert not drv.find_element("id", "error").is_displayed()
        # The running run's curve is drawn last (on top) and thicker than the finished ones.
        series = drv.execute_script("""
            return [...document.querySelectorAll('#loss-chart g.series')].map(g => [g.dataset.name,
              g.querySelector('path') && g.querySelector('path').getAttribute('stroke-width')]);""")
        assert series[-1][0].startswith(f"run {running} ") and series[-1][0].endswith("running"), series
        assert float(series[-1][1]) > max(float(w) for _, w in series[:-1] if w is not None)
        # A study without runs resets the request to the example, for that study's model, and says so.
        Select(drv.find_element("id", "study")).select_by_value("empty")
        _wait(drv, lambda d: "no runs yet" in _text(d, "#request-source"), "the reset request")
        req = _request(drv)
        assert req["study"] == "empty" and req["model"]["params"] == 110_000_000
        assert req["reference"]["batch_size"] == 512 and req["target"]["batch_size"] == 32768
        Select(drv.find_element("id", "study")).select_by_value("")
        _wait(drv, lambda d: "study" not in _request(d), "the request without a study")


def test_docs_render_offline_with_an_authorize_button(browser, keyed_server):
    server, _ = keyed_server
    for page in ("/", "/docs", "/redoc"):  # the browser is told to load nothing from elsewhere
        assert "default-src 'self'" in httpx.get(server.base_url + page).headers["content-security-policy"]
    drv = browser
    drv.get(server.base_url + "/docs")
    _wait(drv, lambda d: d.find_elements("css selector", ".opblock-summary-path"), "Swagger UI's operations")
    paths = {e.text.replace("\u200b", "") for e in drv.find_elements("css selector", ".opblock-summary-path")}
    assert {"/v1/recommendations", "/v1/runs/{id}/reports", "/v1/studies/{name}/evidence"} <= paths
    authorize = drv.find_element("css selector", "button.authorize")
    assert "Authorize" in authorize.text
    authorize.click()
    _wait(drv, lambda d: d.find_elements("css selector", ".auth-container"), "the authorize dialog")
    dialog = _text(drv, ".auth-container")
    assert "APIKey" in dialog and "Bearer" in dialog
    assert _off_origin(drv, server.base_url)[0] == []

    drv.get(server.base_url + "/redoc")
    _wait(drv, lambda d: "largebatch" in d.find_element("tag name", "body").text
          and d.find_elements("css selector", "[data-section-id]"), "ReDoc's page")
    assert "Bearer" in drv.find_element("tag name", "body").text
    # ReDoc reaches for its vendor's logo; the page's policy stops it (the link falls back to text).
    assert _off_origin(drv, server.base_url)[0] == []
