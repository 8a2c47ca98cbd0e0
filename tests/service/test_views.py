"""The read-only views the explorer draws (reports, evidence, schedule points), the offline docs and
the bearer scheme in the OpenAPI, and the explorer's files in a built wheel. No browser needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from largebatch.scaling_rules import priors
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.schedule import lr_at

from .conftest import bert_request, unique
from .sweep import DIVERGED, SWEEP, seed_study
from .test_api import assert_error

ROOT = Path(__file__).resolve().parents[2]


def test_reports_are_paged_by_step_and_private_to_the_namespace(api):
    c = api.client()
    study = unique()
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    run = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()}).json()
    reports = [{"step": s, "loss": 10.0 - s / 10, "grad_norm": 1.5} for s in (30, 0, 10, 20)]
    assert c.post(f"/v1/runs/{run['id']}/reports", json={"reports": reports}).status_code == 200

    page = c.get(f"/v1/runs/{run['id']}/reports", params={"limit": 3}).json()
    assert page["total"] == 4 and page["limit"] == 3 and page["offset"] == 0
    assert [p["step"] for p in page["items"]] == [0, 10, 20]
    assert page["items"][1] == {"step": 10, "loss": 9.0, "grad_norm": 1.5, "finite": True}
    rest = api.client("read").get(f"/v1/runs/{run['id']}/reports", params={"offset": 3}).json()
    assert [p["step"] for p in rest["items"]] == [30]

    # A NaN loss (the run is then stopped as diverged) is null in JSON, flagged not finite.
    r = c.post(f"/v1/runs/{run['id']}/reports", content=b'{"step": 40, "loss": NaN}',
               headers={"content-type": "application/json"})
    assert r.json()["should_stop"]
    last = c.get(f"/v1/runs/{run['id']}/reports", params={"offset": 4}).json()["items"]
    assert last == [{"step": 40, "loss": None, "grad_norm": None, "finite": False}]

    assert_error(api.client("other").get(f"/v1/runs/{run['id']}/reports"), "not_found")
    assert_error(api.client(None).get(f"/v1/runs/{run['id']}/reports"), "unauthorized")
    assert_error(c.get("/v1/runs/999999999/reports"), "not_found")
    assert_error(c.get(f"/v1/runs/{run['id']}/reports", params={"limit": 0}), "validation_error")


def test_reports_as_csv_keep_nan_and_inf_and_page_like_json(api):
    c = api.client()
    study = unique()
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    run = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()}).json()
    body = b'{"reports": [{"step": 2, "loss": 8.5, "grad_norm": 2.0}, {"step": 0, "loss": 9.25, "grad_norm": 1.5}, ' \
           b'{"step": 1, "loss": 9.0}, {"step": 3, "loss": NaN, "grad_norm": Infinity}]}'
    assert c.post(f"/v1/runs/{run['id']}/reports", content=body,
                  headers={"content-type": "application/json"}).status_code == 200

    r = api.client("read").get(f"/v1/runs/{run['id']}/reports", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["x-total-count"] == "4"
    assert r.text == "step,loss,grad_norm\n0,9.25,1.5\n1,9.0,\n2,8.5,2.0\n3,nan,inf\n"
    page = c.get(f"/v1/runs/{run['id']}/reports", params={"format": "csv", "limit": 2, "offset": 1})
    assert page.text == "step,loss,grad_norm\n1,9.0,\n2,8.5,2.0\n" and page.headers["x-total-count"] == "4"

    assert_error(api.client("other").get(f"/v1/runs/{run['id']}/reports", params={"format": "csv"}), "not_found")
    assert_error(c.get(f"/v1/runs/{run['id']}/reports", params={"format": "xml"}), "validation_error")


def test_the_noise_scale_runs_report_reaches_the_run_and_the_studys_recipes(api):
    c = api.client()
    study = unique()
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    auto = bert_request(study=study)
    auto["target"] = {"batch_size": "auto"}
    # Before any run measured it, "auto" has nothing to go by.
    assert_error(c.post("/v1/recommendations", json=auto), "validation_error")
    for noise in (3000.0, 5000.0, 9000.0):
        run = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()}).json()
        reports = [{"step": 0, "loss": 9.0}, {"step": 1, "loss": 8.0, "noise_scale": noise}]
        assert c.post(f"/v1/runs/{run['id']}/reports", json={"reports": reports}).status_code == 200
        assert c.get(f"/v1/runs/{run['id']}").json()["noise_scale"] == noise
    out = c.post("/v1/recommendations", json=auto).json()
    assert out["stages"][0]["batch_size"] == 1000  # max_overhead 0.2 x the median, 5000 (Zhang et al. 2024)
    assert any("B_noise = 5000" in line for line in out["rationale"]), out["rationale"]
    bad = c.post(f"/v1/runs/{run['id']}/reports", json={"step": 2, "loss": 7.0, "noise_scale": -1})
    assert_error(bad, "validation_error")


def test_evidence_shows_the_fit_and_the_divergence_boundary_the_recipe_uses(api):
    c = api.client()
    study = unique()
    seed_study(c, study)
    ev = c.get(f"/v1/studies/{study}/evidence", params={"batch_size": 65536}).json()
    assert ev["metric"] == "eval_loss" and ev["direction"] == "minimize"
    outcomes = sorted(r["outcome"] for r in ev["runs"])
    assert outcomes == ["completed"] * 12 + ["diverged"] * 2  # the running run is no evidence yet
    fit = ev["fit"]
    assert fit["n_runs"] == 12 and fit["batch_sizes"] == sorted(SWEEP)
    assert abs(fit["exponent"] - 0.5) < 0.05  # the sweep was made with batch^0.5
    assert fit["prior_exponent"] == 0.5  # LAMB: the Adam family's sqrt rule
    optimum = {p["batch_size"]: p["lr"] for p in ev["optimum"]}
    assert set(optimum) == {*SWEEP, 65536}
    assert optimum[16384] == pytest.approx(4.2e-3, rel=0.05)

    # The recipe at 32K reads the same evidence: its LR is the fitted optimum there.
    req = bert_request(32768, study=study)
    recipe = c.post("/v1/recommendations", json=req).json()
    assert recipe["stages"][0]["peak_lr"] == pytest.approx(optimum[32768], rel=1e-3)

    # LR 0.013 diverged at 16K: every batch from 16K up stays under 0.8 x 0.013.
    boundary = {b["batch_size"]: b for b in ev["boundary"]}
    assert set(boundary) == {16384, 32768, 65536}
    assert boundary[16384]["diverged_lr"] == DIVERGED[16384]
    assert boundary[65536]["cap"] == pytest.approx(priors.DIVERGENCE_MARGIN * DIVERGED[16384])

    assert_error(c.get(f"/v1/studies/{unique()}/evidence"), "not_found")
    assert_error(api.client("other").get(f"/v1/studies/{study}/evidence"), "not_found")
    assert_error(c.get(f"/v1/studies/{study}/evidence", params={"batch_size": 0}), "validation_error")
    fam = c.get(f"/v1/studies/{study}/evidence", params={"family": "true"}).json()
    assert len(fam["runs"]) >= 14


def test_schedule_points_are_the_schedule_itself(api):
    c = api.client("read")
    req = {"model": {"params": 340_000_000}, "reference": bert_request()["reference"], "optimizer": "lans",
           "stages": [{"batch_size": 98304, "share": 0.9}, {"batch_size": 32768, "share": 0.1}]}
    out = c.post("/v1/recommendations", json=req).json()
    body = {k: out[k] for k in ("optimizer", "stages", "total_steps")}
    pts = c.post("/v1/schedule", params={"points": 50}, json=body).json()
    recipe = Recipe.model_validate(body)
    assert pts["total_steps"] == recipe.total_steps and pts["stage_starts"] == [0, out["stages"][0]["steps"]]
    assert pts["steps"] == sorted(set(pts["steps"])) and pts["steps"][-1] == recipe.total_steps - 1
    assert 50 <= len(pts["steps"]) <= 50 + 16
    for step, lr in zip(pts["steps"], pts["lr"], strict=True):
        assert lr == lr_at(recipe, step)
    # Both sides of the second stage's re-warm are there, so a line through the points shows the drop.
    start = pts["stage_starts"][1]
    assert {start - 1, start} <= set(pts["steps"])
    assert_error(c.post("/v1/schedule", json={"stages": []}), "validation_error")
    assert_error(c.post("/v1/schedule", params={"points": 1}, json=body), "validation_error")
    body["stages"][0]["peak_lr"] = -1.0
    assert_error(c.post("/v1/schedule", json=body), "validation_error")


def test_openapi_has_a_bearer_scheme_and_the_docs_load_nothing_from_elsewhere(api):
    c = api.client(None)
    spec = c.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["APIKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path in ("/v1/recommendations", "/v1/studies/{name}/evidence", "/v1/runs/{id}/reports"):
        for op in spec["paths"][path].values():
            assert op["security"] == [{"APIKey": []}, {}], path
    assert "security" not in spec["paths"]["/healthz"]["get"]
    for page in ("/docs", "/redoc"):
        html = c.get(page).text
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), html  # every asset is the service's
        for asset in re.findall(r"(?:src|href)=\"(/docs-assets/[^\"]+)\"", html):
            r = c.get(asset)
            assert r.status_code == 200 and len(r.content) > 100, asset
    assert 'persistAuthorization": true' in c.get("/docs").text
    index = c.get("/")
    assert index.headers["content-type"].startswith("text/html") and "recipe explorer" in index.text
    for asset in re.findall(r"(?:src|href)=\"(static/[^\"]+)\"", index.text):
        assert c.get("/" + asset).status_code == 200, asset
    assert_error(c.get("/static/explorer/nothing.js"), "not_found")


@pytest.mark.slow
def test_the_explorer_ships_in_the_wheel(tmp_path):
    """A normal (non-editable) install has the page: its files are package data of largebatch.service."""
    src = tmp_path / "src"  # a copy: building in the work tree would leave build/ behind
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("client", "service", "scaling_rules"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("largebatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT / "service").as_posix() for p in (ROOT / "service" / "static").rglob("*")
               if p.is_file()}
    assert shipped and {f"largebatch/service/{p}" for p in shipped} <= names
