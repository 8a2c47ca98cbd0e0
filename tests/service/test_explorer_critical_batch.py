"""The explorer plots the selected study's critical batch along the run (B_noise vs examples seen, the
fitted curve in its band, the pooled points), in a real browser."""

from __future__ import annotations

import httpx
import pytest

from .test_browser import _text, _wait, browser, keyed_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def _trajectory(c: httpx.Client, study: str, seed: int) -> None:
    run = c.post(f"/v1/studies/{study}/runs", json={"request": {
        "model": {"params": 340_000_000}, "reference": {"batch_size": 512, "lr": 6.25e-4, "steps": 10_000},
        "target": {"batch_size": 1024}}})
    assert run.status_code == 201, run.text
    reports = [{"step": s, "loss": 3.0, "noise_scale": 3.0 * ((s + 1) * 1024) ** 0.5 * (1 + 0.05 * ((s + seed) % 3)),
                "examples_seen": (s + 1) * 1024} for s in range(0, 1000, 5)]
    assert c.post(f"/v1/runs/{run.json()['id']}/reports", json={"reports": reports}).status_code == 200
    # a critical batch measured by branching at step 500, twice the streaming value there (x 0.9 or x 1.1)
    measured = {"step": 500, "examples_seen": 501 * 1024, "critical_batch": 2.0 * (0.9 + 0.2 * seed) * 2000.0,
                "critical_batch_low": 1000.0, "critical_batch_high": 10000.0, "noise_scale": 2000.0,
                "batch_size": 1024, "ks": [1, 2, 4, 8]}
    assert c.post(f"/v1/runs/{run.json()['id']}/critical-batches", json=measured).status_code == 201


def test_the_study_panel_plots_the_critical_batch_with_its_band(browser, keyed_server):  # noqa: F811
    from selenium.webdriver.support.ui import Select

    server, key = keyed_server
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for name in ("measured", "unmeasured"):
            assert c.post("/v1/studies", json={"name": name, "model_params": 340_000_000}).status_code == 201
        for seed in range(2):
            _trajectory(c, "measured", seed)
        expected = c.get("/v1/studies/measured/critical-batch").json()
        drv = browser
        drv.get(server.base_url + "/")
        _wait(drv, lambda d: "needs an API key" in _text(d, "#key-status"), "the page to ask for a key")
        drv.find_element("id", "api-key").send_keys(key)
        drv.find_element("css selector", "#key-form button").click()
        _wait(drv, lambda d: len(d.find_elements("css selector", "#study option")) == 3, "the study list")
        Select(drv.find_element("id", "study")).select_by_value("measured")
        _wait(drv, lambda d: "B_noise ≈" in _text(d, "#critical-fit"), "the fitted critical batch")
        drawn = drv.execute_script("""
            const out = {};
            for (const g of document.querySelectorAll('#critical-chart g.series')) {
              out[g.dataset.name] = {paths: [...g.querySelectorAll('path')].map(p => p.getAttribute('d')),
                                     circles: g.querySelectorAll('circle').length};
            }
            return out;""")
        band = drawn["95% band"]["paths"]
        assert len(band) == 1 and band[0].endswith("Z") and band[0].count("L") >= 2 * len(expected["fit"]["points"]) - 1
        assert drawn["fitted critical batch"]["paths"][0].count("L") == len(expected["fit"]["points"]) - 1
        assert drawn["runs, pooled by examples seen"]["circles"] == len(expected["points"]) > 5
        cal = expected["calibration"]
        assert cal["measured"] == 2 and cal["factor"] == pytest.approx(2 * (0.9 * 1.1) ** 0.5)
        assert "from 2 runs" in _text(drv, "#critical-fit")
        assert (f"calibration ×{cal['factor']:.4g} (95%: {cal['factor_low']:.4g}–{cal['factor_high']:.4g}) "
                "(2 measured critical batches)") in _text(drv, "#critical-fit")
        Select(drv.find_element("id", "study")).select_by_value("unmeasured")
        _wait(drv, lambda d: "No fitted critical batch: no run" in _text(d, "#critical-fit"), "the empty state")
