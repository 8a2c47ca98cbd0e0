"""Every endpoint through HTTP, success and failure, on SQLite and PostgreSQL, in-process and under
a real uvicorn (the ``api`` fixture runs each test on all four)."""

from __future__ import annotations

import csv
import io

import pytest

from largebatch.scaling_rules.wire import (
    ERROR_TYPES,
    ErrorBody,
    HeartbeatOut,
    Page,
    RecommendationOut,
    ReportOut,
    Run,
    Study,
)

from .conftest import bert_request, unique


def assert_error(r, type_: str, status: int | None = None) -> ErrorBody:
    assert r.status_code == (status or ERROR_TYPES[type_]), (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = ErrorBody.model_validate(r.json())
    assert body.type == type_, r.text
    assert "Traceback" not in r.text
    return body


def locs(r) -> list[list]:
    return [e["loc"] for e in r.json()["detail"]]


def new_study(c, **kw) -> str:
    name = unique("study")
    r = c.post("/v1/studies", json={"name": name, "model_params": 340_000_000, **kw})
    assert r.status_code == 201, r.text
    return name


def open_run(c, study: str, target: int = 32768, key: str | None = None) -> Run:
    headers = {"Idempotency-Key": key} if key else {}
    r = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(target)}, headers=headers)
    assert r.status_code in (200, 201), r.text
    return Run.model_validate(r.json())


# ------------------------------------------------------------------------------ recommendations


def test_recommendation_lamb_table4(api):
    c = api.client()
    r = c.post("/v1/recommendations", json=bert_request())
    assert r.status_code == 200, r.text
    out = RecommendationOut.model_validate(r.json())
    s = out.stages[0]
    assert (out.optimizer.name, s.peak_lr, s.steps, s.warmup_steps) == ("lamb", 0.005, 15625, 3125)
    assert out.run is None


def test_recommendation_bad_input_names_the_field(api):
    c = api.client()
    r = c.post("/v1/recommendations", json={**bert_request(), "reference": {**bert_request()["reference"], "lr": -1}})
    assert_error(r, "validation_error")
    assert ["body", "reference", "lr"] in locs(r)
    r = c.post("/v1/recommendations", json={**bert_request(), "batchsize": 3})
    assert_error(r, "validation_error")
    assert ["body", "batchsize"] in locs(r)
    r = c.post("/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, "validation_error")
    r = c.post("/v1/recommendations", json=bert_request(explore=4))  # explore opens runs: needs a study
    assert_error(r, "validation_error")
    assert locs(r) == [["body", "study"]]
    r = c.post("/v1/recommendations", json=bert_request(start_run=True))
    assert locs(r) == [["body", "study"]]
    # Numbers so large the recipe would not fit a database column: 422, not 500.
    r = c.post("/v1/recommendations", json=bert_request(target=2**40))
    assert_error(r, "validation_error")


def test_recommendation_auth(api):
    assert_error(api.client(None).post("/v1/recommendations", json=bert_request()), "unauthorized")
    r = api.client(None).post("/v1/recommendations", json=bert_request(), headers={"Authorization": "Bearer nope"})
    assert_error(r, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = api.client(None).post("/v1/recommendations", json=bert_request(), headers={"Authorization": "Basic eDp5"})
    assert_error(r, "unauthorized")
    # A read key may ask for recipes, not open runs.
    reader = api.client("read")
    assert reader.post("/v1/recommendations", json=bert_request()).status_code == 200
    study = new_study(api.client())
    assert_error(reader.post("/v1/recommendations", json=bert_request(study=study, start_run=True)), "forbidden")


def test_recommendation_start_run_is_idempotent(api):
    c = api.client()
    study = new_study(c)
    body = bert_request(study=study, start_run=True, environment={"gpus": 8})
    r1 = c.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "job-1"})
    r2 = c.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "job-1"})
    r3 = c.post("/v1/recommendations", json=body, headers={"Idempotency-Key": "job-2"})
    assert r1.status_code == r2.status_code == r3.status_code == 200
    o1, o2, o3 = (RecommendationOut.model_validate(r.json()) for r in (r1, r2, r3))
    assert o1.run is not None and o2.run is not None and o3.run is not None
    assert o1.run.id == o2.run.id != o3.run.id
    assert o1.run.state == "running" and o1.run.environment == {"gpus": 8} and o1.run.batch_size == 32768
    assert c.get(f"/v1/studies/{study}").json()["n_runs"] == 2
    assert_error(c.post("/v1/recommendations", json=bert_request(study="no-such-study")), "not_found")


def test_recommendation_history_caps_lr_after_divergence(api):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study, 32768)  # LR 0.005 at 32K
    r = c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "diverged", "reason": "loss NaN", "step": 900})
    assert r.status_code == 200 and r.json()["state"] == "diverged"
    for target in (32768, 65536):  # at that batch size and larger ones
        out = RecommendationOut.model_validate(c.post("/v1/recommendations", json=bert_request(target, study=study)).json())
        assert out.stages[0].peak_lr < 0.005
        assert any("diverged" in line and "0.005" in line for line in out.rationale), out.rationale
    # A smaller batch is not capped by a divergence at a larger one.
    small = RecommendationOut.model_validate(c.post("/v1/recommendations", json=bert_request(8192, study=study)).json())
    assert small.stages[0].peak_lr == pytest.approx(6.25e-4 * 4)
    assert not any("diverged" in line for line in small.rationale)


@pytest.mark.parametrize("fmt,magic,media", [("png", b"\x89PNG", "image/png"), ("svg", b"<?xml", "image/svg+xml")])
def test_schedule_plot(api, fmt, magic, media):
    c = api.client("read")
    r = c.post(f"/v1/recommendations/schedule.{fmt}", json=bert_request())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(media) and r.content.startswith(magic)
    assert_error(c.post(f"/v1/recommendations/schedule.{fmt}", json={"model": {"params": 0}}), "validation_error")
    assert_error(api.client(None).post(f"/v1/recommendations/schedule.{fmt}", json=bert_request()), "unauthorized")


# ------------------------------------------------------------------------------ studies


def test_studies_crud_and_paging(api):
    c = api.client()
    names = [new_study(c, model_family="cnn", metric="top1", direction="maximize") for _ in range(3)]
    s = Study.model_validate(c.get(f"/v1/studies/{names[0]}").json())
    assert (s.name, s.model_family, s.metric, s.direction, s.n_runs) == (names[0], "cnn", "top1", "maximize", 0)
    assert s.namespace == api.keys["namespace"]
    page = Page[Study].model_validate(c.get("/v1/studies", params={"limit": 2}).json())
    assert page.total >= 3 and len(page.items) == 2 and page.limit == 2
    everything = c.get("/v1/studies", params={"limit": 1000}).json()
    assert set(names) <= {i["name"] for i in everything["items"]}
    tail = Page[Study].model_validate(c.get("/v1/studies", params={"offset": page.total - 1}).json())
    assert len(tail.items) == 1
    assert_error(c.post("/v1/studies", json={"name": names[0], "model_params": 1}), "already_exists")
    assert c.delete(f"/v1/studies/{names[0]}").status_code == 204
    assert_error(c.get(f"/v1/studies/{names[0]}"), "not_found")
    assert_error(c.delete(f"/v1/studies/{names[0]}"), "not_found")


def test_study_creation_replayed_with_its_idempotency_key(api):
    c = api.client()
    name, body = unique(), {"model_params": 1000, "metric": "ppl"}
    first = c.post("/v1/studies", json={"name": name, **body}, headers={"Idempotency-Key": "mk-1"})
    assert first.status_code == 201, first.text
    # The answer was lost and the client retries: the same study, not "already exists".
    again = c.post("/v1/studies", json={"name": name, **body}, headers={"Idempotency-Key": "mk-1"})
    assert again.status_code == 200 and again.json() == first.json()
    assert "creation_key" not in again.text
    # Anyone else asking for the name gets 409, with or without a key of their own.
    assert_error(c.post("/v1/studies", json={"name": name, **body}), "already_exists")
    assert_error(c.post("/v1/studies", json={"name": name, **body}, headers={"Idempotency-Key": "mk-2"}),
                 "already_exists")
    # The same key with other attributes is a client bug: 409, and the study is unchanged.
    assert_error(c.post("/v1/studies", json={"name": name, "model_params": 7}, headers={"Idempotency-Key": "mk-1"}),
                 "conflict")
    assert c.get(f"/v1/studies/{name}").json()["model_params"] == 1000


def test_studies_bad_input_and_auth(api):
    c = api.client()
    r = c.post("/v1/studies", json={"name": "bad name!", "model_params": 1})
    assert ["body", "name"] in locs(assert_error(r, "validation_error") and r)
    r = c.post("/v1/studies", json={"name": "ok", "model_params": 0})
    assert ["body", "model_params"] in locs(r)
    r = c.post("/v1/studies", json={"name": "ok", "model_params": 5, "direction": "sideways"})
    assert ["body", "direction"] in locs(r)
    assert ["query", "limit"] in locs(assert_error(c.get("/v1/studies", params={"limit": 0}), "validation_error") and
                                      c.get("/v1/studies", params={"limit": 0}))
    study = new_study(c)
    assert_error(api.client("read").post("/v1/studies", json={"name": unique(), "model_params": 1}), "forbidden")
    assert_error(api.client("read").delete(f"/v1/studies/{study}"), "forbidden")
    assert api.client("read").get(f"/v1/studies/{study}").status_code == 200
    assert_error(api.client(None).get("/v1/studies"), "unauthorized")
    # Namespaces: another team's key neither sees nor deletes the study; the same name is free there.
    other = api.client("other")
    assert_error(other.get(f"/v1/studies/{study}"), "not_found")
    assert_error(other.delete(f"/v1/studies/{study}"), "not_found")
    assert study not in {s["name"] for s in other.get("/v1/studies", params={"limit": 1000}).json()["items"]}
    assert other.post("/v1/studies", json={"name": study, "model_params": 1}).status_code == 201


# ------------------------------------------------------------------------------ runs


def test_runs_create_from_recipe_or_request(api):
    c = api.client()
    study = new_study(c)
    recipe = c.post("/v1/recommendations", json=bert_request(16384)).json()
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe, "environment": {"host": "a"}},
               headers={"Idempotency-Key": "abc"})
    assert r.status_code == 201, r.text
    run = Run.model_validate(r.json())
    assert r.headers["location"] == f"/v1/runs/{run.id}"
    assert (run.study, run.state, run.batch_size, run.number) == (study, "running", 16384, 0)
    assert run.lease_expires_at is not None
    again = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe, "environment": {"host": "a"}},
                   headers={"Idempotency-Key": "abc"})
    assert again.status_code == 200 and again.json()["id"] == run.id
    # The same key with a different recipe is a conflict, not a silent second run.
    other = c.post("/v1/recommendations", json=bert_request(8192)).json()
    assert_error(c.post(f"/v1/studies/{study}/runs", json={"recipe": other}, headers={"Idempotency-Key": "abc"}),
                 "conflict")
    from_request = open_run(c, study, 65536)
    assert from_request.batch_size == 65536 and from_request.number == 1


def test_runs_create_failures(api):
    c = api.client()
    study = new_study(c)
    recipe = c.post("/v1/recommendations", json=bert_request()).json()
    assert_error(c.post(f"/v1/studies/{study}/runs", json={}), "validation_error")
    assert_error(c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe, "request": bert_request()}),
                 "validation_error")
    bad = {**recipe, "optimizer": {**recipe["optimizer"], "lr": -1.0}}
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": bad})
    assert ["body", "recipe", "optimizer", "lr"] in locs(r)
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": {**recipe, "stages": []}})
    assert_error(r, "validation_error")
    r = c.post(f"/v1/studies/{study}/runs", json={"request": {"model": {"params": 1}}})
    assert_error(r, "validation_error")
    assert_error(c.post("/v1/studies/nope-nope/runs", json={"recipe": recipe}), "not_found")
    assert_error(c.post("/v1/studies/nope-nope/runs", json={"request": bert_request()}), "not_found")
    assert_error(api.client("read").post(f"/v1/studies/{study}/runs", json={"recipe": recipe}), "forbidden")
    assert_error(api.client("other").post(f"/v1/studies/{study}/runs", json={"recipe": recipe}), "not_found")
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe}, headers={"Idempotency-Key": "x" * 201})
    assert ["header", "Idempotency-Key"] in locs(r)


def test_runs_list_filter_and_csv(api):
    c = api.client()
    study = new_study(c)
    runs = [open_run(c, study, b) for b in (8192, 8192, 32768)]
    c.post(f"/v1/runs/{runs[0].id}/complete", json={"outcome": "completed", "metric": 1.5})
    page = Page[Run].model_validate(c.get(f"/v1/studies/{study}/runs").json())
    assert page.total == 3 and [r.id for r in page.items] == [r.id for r in runs]
    by_state = c.get(f"/v1/studies/{study}/runs", params={"state": "running"}).json()
    assert {r["id"] for r in by_state["items"]} == {runs[1].id, runs[2].id}
    by_batch = c.get(f"/v1/studies/{study}/runs", params={"batch_size": 8192, "limit": 1, "offset": 1}).json()
    assert by_batch["total"] == 2 and [r["id"] for r in by_batch["items"]] == [runs[1].id]
    r = c.get(f"/v1/studies/{study}/runs", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(x["id"]) for x in rows] == [x.id for x in runs]
    assert rows[0]["state"] == "completed" and float(rows[0]["metric"]) == 1.5 and rows[1]["metric"] == ""
    assert r.headers["x-total-count"] == "3"
    one = list(csv.DictReader(io.StringIO(c.get(f"/v1/studies/{study}/runs",
                                                params={"format": "csv", "limit": 1, "state": "running"}).text)))
    assert [int(x["id"]) for x in one] == [runs[1].id]
    assert_error(c.get(f"/v1/studies/{study}/runs", params={"state": "exploded"}), "validation_error")
    assert_error(c.get(f"/v1/studies/{study}/runs", params={"format": "xml"}), "validation_error")
    assert_error(c.get(f"/v1/studies/{study}/runs", params={"batch_size": 0}), "validation_error")
    assert_error(c.get("/v1/studies/nope-nope/runs"), "not_found")
    assert_error(api.client("other").get(f"/v1/studies/{study}/runs"), "not_found")
    assert api.client("read").get(f"/v1/studies/{study}/runs").status_code == 200


def test_run_get_and_heartbeat(api):
    c = api.client()
    run = open_run(c, new_study(c))
    got = Run.model_validate(c.get(f"/v1/runs/{run.id}").json())
    assert got.id == run.id and got.recipe.stages[0].peak_lr == 0.005
    hb = HeartbeatOut.model_validate(c.post(f"/v1/runs/{run.id}/heartbeat", json={}).json())
    assert not hb.should_stop and hb.run.lease_expires_at >= run.lease_expires_at
    assert_error(c.get("/v1/runs/999999999"), "not_found")
    assert_error(c.get("/v1/runs/-1"), "validation_error")
    assert_error(c.get("/v1/runs/abc"), "validation_error")
    assert_error(api.client("other").get(f"/v1/runs/{run.id}"), "not_found")
    assert_error(api.client("other").post(f"/v1/runs/{run.id}/heartbeat", json={}), "not_found")
    assert_error(api.client("read").post(f"/v1/runs/{run.id}/heartbeat", json={}), "forbidden")
    assert_error(c.post("/v1/runs/999999999/heartbeat", json={}), "not_found")
    c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "failed", "reason": "OOM"})
    assert_error(c.post(f"/v1/runs/{run.id}/heartbeat", json={}), "conflict")


def test_reports_healthy_then_batch_then_explosion(api):
    c = api.client()
    run = open_run(c, new_study(c))
    r = c.post(f"/v1/runs/{run.id}/reports", json={"step": 0, "loss": 10.4, "grad_norm": 3.0})
    out = ReportOut.model_validate(r.json())
    assert r.status_code == 200 and not out.should_stop and out.run.last_step == 0
    batch = {"reports": [{"step": s, "loss": 10.4 - 0.1 * s} for s in range(1, 30)]}
    out = ReportOut.model_validate(c.post(f"/v1/runs/{run.id}/reports", json=batch).json())
    assert not out.should_stop and out.run.last_step == 29
    # Resending a step is fine (idempotent per step); a spike within 3x the early loss is not divergence.
    out = ReportOut.model_validate(c.post(f"/v1/runs/{run.id}/reports", json={"step": 29, "loss": 25.0}).json())
    assert not out.should_stop and out.run.state == "running"
    out = ReportOut.model_validate(c.post(f"/v1/runs/{run.id}/reports", json={"step": 30, "loss": 400.0}).json())
    assert out.should_stop and out.run.state == "diverged" and "early loss" in out.reason
    assert out.run.diverged_step == 30
    # The job's reporter may still send a few: it is told to stop again, nothing breaks.
    late = ReportOut.model_validate(c.post(f"/v1/runs/{run.id}/reports", json={"step": 31, "loss": 1e4}).json())
    assert late.should_stop and late.run.state == "diverged"
    hb = HeartbeatOut.model_validate(c.post(f"/v1/runs/{run.id}/heartbeat", json={}).json())
    assert hb.should_stop
    # Its own (different) verdict afterwards conflicts with the recorded one.
    assert_error(c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": 1.0}), "conflict")
    assert c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "diverged"}).status_code == 200


def test_reports_nan_stops(api):
    c = api.client()
    run = open_run(c, new_study(c))
    r = c.post(f"/v1/runs/{run.id}/reports", content=b'{"step": 3, "loss": NaN}',
               headers={"content-type": "application/json"})
    out = ReportOut.model_validate(r.json())
    assert r.status_code == 200 and out.should_stop and "nan" in out.reason.lower()
    assert out.run.state == "diverged" and out.run.last_loss is None
    run2 = open_run(c, new_study(c))
    body = b'{"reports": [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 9.0, "grad_norm": Infinity}]}'
    out = ReportOut.model_validate(c.post(f"/v1/runs/{run2.id}/reports", content=body,
                                          headers={"content-type": "application/json"}).json())
    assert out.should_stop and "gradient norm" in out.reason


def test_reports_failures(api):
    c = api.client()
    run = open_run(c, new_study(c))
    assert ["body", "step"] in locs(c.post(f"/v1/runs/{run.id}/reports", json={"step": -1, "loss": 1.0}))
    assert_error(c.post(f"/v1/runs/{run.id}/reports", json={"loss": 1.0}), "validation_error")
    assert_error(c.post(f"/v1/runs/{run.id}/reports", json={"reports": []}), "validation_error")
    assert_error(c.post(f"/v1/runs/{run.id}/reports", json={"step": 1, "loss": 1.0, "grad_norm": -2}),
                 "validation_error")
    assert_error(c.post("/v1/runs/999999999/reports", json={"step": 1, "loss": 1.0}), "not_found")
    assert_error(api.client("read").post(f"/v1/runs/{run.id}/reports", json={"step": 1, "loss": 1.0}), "forbidden")
    assert_error(api.client("other").post(f"/v1/runs/{run.id}/reports", json={"step": 1, "loss": 1.0}), "not_found")
    c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": 0.5})
    assert_error(c.post(f"/v1/runs/{run.id}/reports", json={"step": 1, "loss": 1.0}), "conflict")


def test_complete_outcomes(api):
    c = api.client()
    study = new_study(c)
    for outcome, extra in [("completed", {"metric": 1.25}), ("diverged", {"step": 10, "reason": "NaN"}),
                           ("failed", {"reason": "node lost"}), ("pruned", {"step": 100})]:
        run = open_run(c, study)
        r = c.post(f"/v1/runs/{run.id}/complete", json={"outcome": outcome, **extra})
        assert r.status_code == 200, r.text
        done = Run.model_validate(r.json())
        assert done.state == outcome
        # Same outcome again: a no-op; another one: 409.
        assert c.post(f"/v1/runs/{run.id}/complete", json={"outcome": outcome, **extra}).json()["state"] == outcome
        other = "failed" if outcome != "failed" else "pruned"
        assert_error(c.post(f"/v1/runs/{run.id}/complete", json={"outcome": other}), "conflict")
    assert c.get(f"/v1/runs/{run.id}").json()["state"] == "pruned"
    run = open_run(c, study)
    assert locs(c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed"})) == [["body", "metric"]]
    assert ["body", "metric"] in locs(c.post(f"/v1/runs/{run.id}/complete",
                                             json={"outcome": "completed", "metric": "high"}))
    assert ["body", "outcome"] in locs(c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "running"}))
    assert_error(api.client("read").post(f"/v1/runs/{run.id}/complete", json={"outcome": "failed"}), "forbidden")
    assert_error(api.client("other").post(f"/v1/runs/{run.id}/complete", json={"outcome": "failed"}), "not_found")
    assert_error(c.post("/v1/runs/999999999/complete", json={"outcome": "failed"}), "not_found")
    assert c.get(f"/v1/runs/{run.id}").json()["state"] == "running"


def test_history_from_completed_runs_is_visible(api):
    c = api.client()
    study = new_study(c)
    run = open_run(c, study, 16384)
    c.post(f"/v1/runs/{run.id}/complete", json={"outcome": "completed", "metric": 1.4})
    assert c.get(f"/v1/studies/{study}").json()["n_runs"] == 1
    out = c.post("/v1/recommendations", json=bert_request(16384, study=study)).json()
    assert any("history" in line for line in out["rationale"]), out["rationale"]


# ------------------------------------------------------------------------------ probes and plumbing


def test_probes(api):
    c = api.client(None)
    assert c.get("/healthz").json()["status"] == "ok"
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    versions = r.json()["schema_versions"]
    assert versions["optuna"] and versions["largebatch"]
    api.client().post("/v1/recommendations", json=bert_request())
    m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'largebatch_http_requests_total{method="POST",route="/v1/recommendations",status="200"}' in text
    assert 'largebatch_http_request_duration_seconds_bucket{le="0.05",method="POST",route="/v1/recommendations"}' in text
    if "sqlite" in api.name or "postgresql" in api.name:
        assert "largebatch_store_pool_checked_out" in text


def test_unknown_route_method_and_big_body(api):
    c = api.client()
    assert_error(c.get("/v1/nothing-here"), "not_found")
    assert_error(c.put("/v1/studies"), "method_not_allowed")
    big = b'{"name": "' + b"x" * (1 << 20) + b'"}'
    assert_error(c.post("/v1/studies", content=big, headers={"content-type": "application/json"}), "payload_too_large")


def test_openapi_documents_every_route_and_the_recommendation_body(api):
    spec = api.client(None).get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/recommendations", "/v1/recommendations/schedule.png", "/v1/recommendations/schedule.svg",
                 "/v1/studies", "/v1/studies/{name}", "/v1/studies/{name}/runs", "/v1/runs/{id}",
                 "/v1/runs/{id}/heartbeat", "/v1/runs/{id}/reports", "/v1/runs/{id}/complete",
                 "/v1/runs/{id}/critical-batches",
                 "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    rec = paths["/v1/recommendations"]["post"]
    ref = rec["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/RecommendationIn") and "RecommendationIn" in spec["components"]["schemas"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in rec["parameters"])
    assert {"401", "403", "413", "422", "429", "503"} <= set(rec["responses"])
    assert api.client(None).get("/docs").status_code == 200
