"""A hostile client against every endpoint (issue 13), on SQLite and PostgreSQL (the ``api`` fixture).

Each category of the issue has its test; ``test_generated_cases_never_answer_5xx`` then mutates every
leaf of a valid request of every endpoint into each hostile value (overflows, wrong types, lone
surrogates, NUL, NaN, huge strings) and every path and query parameter likewise: never a 5xx, every
4xx in the ``{type, detail}`` shape, and nothing stored that cannot be read back.
"""

from __future__ import annotations

import json
import random

import pytest

from largebatch.scaling_rules.wire import ERROR_TYPES, MAX_REPORT_BATCH, ErrorBody

from .conftest import bert_request, unique


def assert_4xx(r, status: int | None = None) -> ErrorBody:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = ErrorBody.model_validate(r.json())
    assert ERROR_TYPES[body.type] == r.status_code, r.text
    assert set(r.json()) == {"type", "detail"}
    return body


def post_raw(c, url: str, text: str, **headers):
    return c.post(url, content=text.encode("utf-8", "surrogatepass"),
                  headers={"Content-Type": "application/json", **headers})


@pytest.fixture
def world(api):
    """A study with one open run in the write key's namespace."""
    c = api.client()
    study = unique("hostile")
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    r = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()})
    assert r.status_code == 201, r.text
    return c, study, r.json()["id"]


# ------------------------------------------------------------------ 1. cost bounds at parse time


def test_limits_are_422_at_parse_time(world):
    c, _study, run_id = world
    too_many = {"reports": [{"step": i, "loss": 1.0} for i in range(MAX_REPORT_BATCH + 1)]}
    body = assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json=too_many), 422)
    assert body.detail[0]["loc"] == ["body", "reports"]
    stages = [{"batch_size": 1024 * (i + 1), "share": 1 / 17} for i in range(17)]
    for fmt in ("png", "svg"):
        assert_4xx(c.post(f"/v1/recommendations/schedule.{fmt}", json=bert_request(stages=stages)), 422)
    assert_4xx(c.post("/v1/recommendations", json=bert_request(stages=stages * 4)), 422)  # 68 > 64 stages
    # The expensive request is accepted and cheap (closed-form arithmetic).
    big = bert_request(lr_cap=1e-4)
    big["target"]["steps"] = 10_000_000
    assert c.post("/v1/recommendations", json=big).status_code == 200


def test_a_posted_recipe_is_bounded_too(world):
    c, study, _ = world
    recipe = c.post("/v1/recommendations", json=bert_request()).json()
    for k in ("run", "variants", "variant_runs"):
        recipe.pop(k)
    many = dict(recipe, stages=recipe["stages"] * 65)
    assert_4xx(c.post("/v1/schedule", json=many), 422)
    assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"recipe": many}), 422)
    absurd = json.loads(json.dumps(recipe))
    absurd["stages"][0]["peak_lr"] = 1e300
    assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"recipe": absurd}), 422)
    absurd["stages"][0]["peak_lr"] = recipe["stages"][0]["peak_lr"]
    absurd["stages"][0]["decay_power"] = -1.0
    assert_4xx(c.post("/v1/schedule", json=absurd), 422)
    absurd = json.loads(json.dumps(recipe))
    absurd["optimizer"]["weight_decay"] = 1e308
    assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"recipe": absurd}), 422)


# ------------------------------------------------------------------ 2. one stored number


def test_a_metric_out_of_bounds_is_refused(world):
    c, _, run_id = world
    for metric in (1e155, -1e16, 1e308):
        assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "completed", "metric": metric}), 422)
    assert c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "completed", "metric": 1e15}).status_code == 200


def test_a_huge_metric_written_by_any_optuna_client_breaks_no_study(api):
    """The store is an Optuna database: a stock Optuna script can write any value. The fit degrades."""
    from largebatch.service.storage import open_store

    c = api.client()
    study = unique("huge")
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    ids = []
    for target, lr in ((1024, 1e-3), (1024, 2e-3), (1024, 4e-3), (2048, 2e-3), (2048, 4e-3)):
        req = bert_request(target, stages=[{"batch_size": target, "lr": lr}])
        ids.append(c.post(f"/v1/studies/{study}/runs", json={"request": req}).json()["id"])
    with open_store(api.store_url, initialize=False) as store:
        for i, run_id in enumerate(ids):  # what the service's edge now refuses, written behind its back
            store.complete_run(run_id, "completed", metric=(1e155, -1e308, 3.0, 1e300, 2.0)[i])
    r = c.post("/v1/recommendations", json=bert_request(study=study))
    assert r.status_code == 200, r.text
    fam = c.post("/v1/recommendations", json=bert_request(study=study, use_family_evidence=True))
    assert fam.status_code == 200, fam.text
    assert c.get(f"/v1/studies/{study}/evidence", params={"family": True}).status_code == 200
    assert c.post("/v1/recommendations", json=bert_request(study=study, start_run=True, explore=3)).status_code == 200


# ------------------------------------------------------------------ 3. nothing unreadable is stored


@pytest.mark.parametrize("bad", ["\\ud800", "a\\udfff", "\\udc00\\ud800", "nul\\u0000"])
def test_unstorable_text_is_refused_before_anything_is_stored(world, bad):
    c, study, run_id = world
    before = c.get(f"/v1/studies/{study}/runs").json()["total"]
    req = json.dumps(bert_request(study=study, start_run=True))
    env = f'{{"request": {json.dumps(bert_request())}, "environment": {{"host": "{bad}"}}}}'
    key_env = f'{{"request": {json.dumps(bert_request())}, "environment": {{"{bad}": 1}}}}'
    cases = [
        ("/v1/recommendations", req[:-1] + f', "environment": {{"x": ["{bad}"]}}}}'),
        (f"/v1/studies/{study}/runs", env),
        (f"/v1/studies/{study}/runs", key_env),
        ("/v1/studies", f'{{"name": "{unique()}", "model_params": 1000, "metric": "{bad}"}}'),
        (f"/v1/runs/{run_id}/complete", f'{{"outcome": "failed", "reason": "{bad}"}}'),
    ]
    for url, text in cases:
        body = assert_4xx(post_raw(c, url, text), 422)
        assert body.detail[0]["type"] == "string_unicode", body
    assert c.get(f"/v1/studies/{study}/runs").json()["total"] == before
    r = c.get(f"/v1/runs/{run_id}")
    assert r.status_code == 200 and r.json()["state"] == "running"


def test_report_steps_have_one_range_on_every_backend(world):
    c, _, run_id = world
    for step in (2**31, 2**62, 2**70, -1):
        assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": step, "loss": 1.0}), 422)
        assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "failed", "step": step}), 422)
    assert c.post(f"/v1/runs/{run_id}/reports", json={"step": 2**31 - 1, "loss": 1.0}).status_code == 200


def test_losses_are_finite_and_bounded_or_the_divergence_signal(world):
    c, _, run_id = world
    assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": 1, "loss": 1e39}), 422)
    assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": 1, "loss": 1.0, "grad_norm": 1e300}), 422)
    assert c.post(f"/v1/runs/{run_id}/reports", json={"step": 1, "loss": 3e38}).status_code == 200
    r = post_raw(c, f"/v1/runs/{run_id}/reports", '{"step": 2, "loss": NaN}')
    assert r.status_code == 200 and r.json()["should_stop"] is True


# ------------------------------------------------------------------ 4. overflows


@pytest.mark.parametrize("patch", [
    {"reference": {"lr": 1e306}}, {"reference": {"lr": 1.7e308}}, {"lr_cap": 5e-324},
    {"target": {"steps": 2**70}}, {"reference": {"warmup_steps": 2**70, "warmup_ratio": None}},
    {"reference": {"lr": 1e300}}, {"reference": {"weight_decay": 1e308}}, {"model": {"params": 2**70}},
    {"target": {"batch_size": True}}, {"target": {"batch_size": "512"}}, {"reference": {"lr": "0.001"}},
])
def test_overflows_and_wrong_types_are_422(world, patch):
    c, _, _ = world
    body = bert_request()
    for k, v in patch.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    body["reference"] = {k: v for k, v in body["reference"].items() if v is not None}
    for url in ("/v1/recommendations", "/v1/recommendations/schedule.svg"):
        assert_4xx(c.post(url, json=body), 422)


def test_strict_numbers_on_every_json_route(world):
    c, _study, run_id = world
    assert_4xx(c.post("/v1/studies", json={"name": unique(), "model_params": "1000"}), 422)
    assert_4xx(c.post("/v1/studies", json={"name": unique(), "model_params": True}), 422)
    assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": "3", "loss": 1.0}), 422)
    assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": 3, "loss": True}), 422)
    assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "completed", "metric": "1.5"}), 422)


# ------------------------------------------------------------------ smaller: media types, repeats, CSV


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", None])
def test_only_json_bodies_are_accepted(world, content_type):
    c, study, run_id = world
    text = json.dumps(bert_request())
    headers = {"Content-Type": content_type} if content_type else {}
    for url in ("/v1/recommendations", "/v1/recommendations/schedule.png", "/v1/studies",
                f"/v1/studies/{study}/runs", f"/v1/runs/{run_id}/reports", f"/v1/runs/{run_id}/complete",
                "/v1/schedule"):
        req = c.build_request("POST", url, content=text.encode(), headers=headers)
        if content_type is None:
            req.headers.pop("Content-Type", None)
        assert_4xx(c.send(req), 415)
    assert c.post("/v1/recommendations", content=text, headers={"Content-Type": "application/json; charset=utf-8"}
                  ).status_code == 200


def test_an_idempotency_key_names_one_request(world):
    c, study, _ = world
    h = {"Idempotency-Key": unique("key")}
    first = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"a": 1}}, headers=h)
    assert first.status_code == 201
    again = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"a": 1}}, headers=h)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"a": 2}},
                      headers=h), 409)
    assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(16384), "environment": {"a": 1}},
                      headers=h), 409)
    rec = bert_request(study=study, start_run=True, environment={"b": 1})
    h2 = {"Idempotency-Key": unique("key")}
    assert c.post("/v1/recommendations", json=rec, headers=h2).status_code == 200
    assert_4xx(c.post("/v1/recommendations", json={**rec, "environment": {"b": 2}}, headers=h2), 409)
    # Any other field of the body too, even one that leaves the recipe as it was.
    assert_4xx(c.post("/v1/recommendations", json={**rec, "use_family_evidence": True}, headers=h2), 409)
    assert_4xx(c.post("/v1/recommendations", json={**rec, "explore": 1}, headers=h2), 409)
    assert c.post("/v1/recommendations", json=rec, headers=h2).status_code == 200  # the same body: a replay


def test_repeats_follow_one_rule(world):
    """A report is the newest word for its step (a job resumed from a checkpoint reports again); a
    complete is final: the same complete again is a no-op, anything else is 409."""
    c, _study, run_id = world
    assert c.post(f"/v1/runs/{run_id}/reports", json={"step": 5, "loss": 2.0}).status_code == 200
    assert c.post(f"/v1/runs/{run_id}/reports", json={"step": 5, "loss": 1.5}).status_code == 200
    assert c.get(f"/v1/runs/{run_id}/reports").json()["items"] == [
        {"step": 5, "loss": 1.5, "grad_norm": None, "finite": True}]
    done = {"outcome": "failed", "reason": "out of memory", "step": 5}
    assert c.post(f"/v1/runs/{run_id}/complete", json=done).status_code == 200
    assert c.post(f"/v1/runs/{run_id}/complete", json=done).status_code == 200
    assert c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "failed"}).status_code == 200  # says less
    assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={**done, "reason": "disk full"}), 409)
    assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "completed", "metric": 1.0}), 409)
    assert c.get(f"/v1/runs/{run_id}").json()["reason"] == "out of memory"


def test_csv_cells_are_never_formulas(world):
    c, study, run_id = world
    evil = '=HYPERLINK("http://evil.example","x")'
    assert c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "failed", "reason": evil}).status_code == 200
    for reason in ("+1+1", "-2+3", "@SUM(A1)"):
        r = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()})
        c.post(f"/v1/runs/{r.json()['id']}/complete", json={"outcome": "failed", "reason": reason})
    text = c.get(f"/v1/studies/{study}/runs", params={"format": "csv"}).text
    cells = [cell for line in text.splitlines()[1:] for cell in next(iter(__import__("csv").reader([line])))]
    assert not [x for x in cells if x[:1] in ("=", "+", "@") or (x[:1] == "-" and not _number(x))], cells
    assert "'" + evil in cells


def _number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ generated cases, every endpoint


HOSTILE = [None, True, False, "512", "", "x" * 5000, 2**31, 2**63, 2**70, -(2**70), -1, 0, 1e308, -1e308,
           5e-324, 1e155, float("nan"), float("inf"), "\ud800", "\u0000", [], {}, [[[[[[]]]]]], {"a": {"b": {}}}]
PATH_VALUES = ["0", "-1", "9223372036854775808", "1e3", "%F0%9F%92%A9", "a" * 300, "..", "%00", "%ED%A0%80"]


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(doc, list) and doc:
        for i, v in enumerate(doc):
            yield from _leaves(v, (*path, i))
    yield path


def _replace(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.mark.slow  # over 900 generated cases; the full run keeps them
def test_generated_cases_never_answer_5xx(api, world):
    c, study, run_id = world
    recipe = c.post("/v1/recommendations", json=bert_request()).json()
    for k in ("run", "variants", "variant_runs"):
        recipe.pop(k)
    bodies = {
        "/v1/recommendations": bert_request(study=study, start_run=True, environment={"gpu": "a100"}),
        "/v1/recommendations/schedule.png": bert_request(stages=[{"batch_size": 8192}, {"batch_size": 32768}]),
        "/v1/studies": {"name": "gen", "model_params": 1000, "metric": "loss", "direction": "minimize"},
        f"/v1/studies/{study}/runs": {"request": bert_request(), "environment": {"k": "v"}},
        f"/v1/runs/{run_id}/reports": {"reports": [{"step": 1, "loss": 2.0, "grad_norm": 1.0}]},
        f"/v1/runs/{run_id}/complete": {"outcome": "failed", "reason": "r", "step": 3},
        "/v1/schedule": recipe,
    }
    rng = random.Random(13)
    sent = 0
    for url, valid in bodies.items():
        paths = list(_leaves(valid))
        cases = [(p, v) for p in paths for v in HOSTILE]
        for path, value in rng.sample(cases, min(len(cases), 120)):
            doc = _replace(valid, path, value)
            if url == "/v1/studies" and isinstance(doc, dict):
                doc = {**doc, "name": unique("gen")} if path != ("name",) else doc
            r = c.post(url, content=_dumps(doc), headers={"Content-Type": "application/json",
                                                          "Idempotency-Key": unique("gen")})
            assert r.status_code < 500, (url, path, value, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_4xx(r)
            sent += 1
        for text in (b"", b"{", b"[]", b"null", b"1e999", b'"\xff\xfe"', b"{" * 5000 + b"}" * 5000,
                     b'{"a":' * 300 + b"1" + b"}" * 300):
            r = c.post(url, content=text, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 or (url.endswith("/heartbeat") and r.status_code == 200), (url, text[:40])
            assert_4xx(r)
            sent += 1
    gets = ["/v1/studies/{}", "/v1/studies/{}/runs", "/v1/studies/{}/evidence", "/v1/runs/{}", "/v1/runs/{}/reports"]
    for template in gets:
        for value in PATH_VALUES:
            r = c.get(template.format(value))
            assert r.status_code < 500, (template, value, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_4xx(r)
            sent += 1
    for value in PATH_VALUES:
        for url in (f"/v1/runs/{value}/heartbeat", f"/v1/runs/{value}/complete"):
            r = c.post(url, json={"outcome": "failed"})
            assert 400 <= r.status_code < 500, (url, r.status_code)
            assert_4xx(r)
            sent += 1
        assert_4xx(c.delete(f"/v1/studies/{value}x"))
    queries = [{"limit": v} for v in ("0", "-1", "1e9", "x", "99999999999999999999")] + \
              [{"offset": v} for v in ("-1", "2147483648", "9" * 30)] + \
              [{"batch_size": "0"}, {"state": "nope"}, {"format": "xml"}, {"family": "maybe"}, {"points": "1"}]
    for q in queries:
        for url in (f"/v1/studies/{study}/runs", "/v1/studies", f"/v1/runs/{run_id}/reports",
                    f"/v1/studies/{study}/evidence"):
            r = c.get(url, params=q)
            assert r.status_code < 500, (url, q, r.status_code)
            if r.status_code >= 400:
                assert_4xx(r)
            sent += 1
    assert sent > 900
    # Whatever went in, everything stored reads back.
    page = c.get(f"/v1/studies/{study}/runs", params={"limit": 1000})
    assert page.status_code == 200
    for run in page.json()["items"]:
        assert c.get(f"/v1/runs/{run['id']}").status_code == 200
        assert c.get(f"/v1/runs/{run['id']}/reports").status_code == 200
    assert c.get("/v1/studies", params={"limit": 1000}).status_code == 200
    assert c.post("/v1/recommendations", json=bert_request(study=study)).status_code == 200


# ------------------------------------------------------------------ bounded work per request, before auth

_WRITE_ROUTES = ["/v1/recommendations", "/v1/recommendations/schedule.png", "/v1/studies", "/v1/schedule",
                 "/v1/studies/{study}/runs", "/v1/runs/{run}/reports", "/v1/runs/{run}/complete",
                 "/v1/runs/{run}/heartbeat"]


def _routes(study: str, run_id: int) -> list[str]:
    return [u.format(study=study, run=run_id) for u in _WRITE_ROUTES]


def test_deep_json_is_4xx_everywhere_with_or_without_a_key(api, world):
    c, study, run_id = world
    anonymous = api.client(key=None)
    deep_escape = b'{"a":' + b"[" * 990 + b'"\\u00e9"' + b"]" * 990 + b"}"
    for client in (c, anonymous):
        for url in _routes(study, run_id):
            for body in (deep_escape, b"[" * 100_000):
                r = client.post(url, content=body, headers={"Content-Type": "application/json"})
                assert_4xx(r)
        assert_4xx(client.request("DELETE", f"/v1/studies/{study}", content=deep_escape,
                                  headers={"Content-Type": "application/json"}))
    assert c.get(f"/v1/studies/{study}").status_code == 200


def _nested(depth: int):
    doc: object = 1
    for _ in range(depth - 1):
        doc = {"x": doc}
    return doc


def test_one_depth_limit_for_every_field_so_everything_stored_reads_back(world):
    c, study, _run_id = world
    before = c.get(f"/v1/studies/{study}/runs").json()["total"]
    for depth in (40, 256):
        r = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"e": _nested(depth)}})
        assert assert_4xx(r, 422).detail[0]["type"] == "too_deep"
        assert_4xx(c.post("/v1/recommendations", json=bert_request(study=study, start_run=True,
                                                                   environment={"e": _nested(depth)})), 422)
    assert c.get(f"/v1/studies/{study}/runs").json()["total"] == before
    ok = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"e": _nested(25)}})
    assert ok.status_code == 201, ok.text
    for url in (f"/v1/runs/{ok.json()['id']}", f"/v1/studies/{study}/runs", f"/v1/studies/{study}/runs?format=csv"):
        assert c.get(url).status_code == 200


def test_a_wide_and_deep_megabyte_is_refused_at_the_cost_of_its_bytes(api, world):
    """The issue's freeze: ~1 MiB of numbers nested 900 deep with one escape. Refused (422), by a check
    linear in the bytes; the same numbers shallow reach the route and are refused there."""
    c, _study, run_id = world
    anonymous = api.client(key=None)
    deep = b'{"s":"\\u00e9","a":' + b"[" * 900 + b"1," * 520_000 + b"1" + b"]" * 900 + b"}"
    wide = b'{"s":"\\u00e9","a":[' + b",".join([b"1"] * 500_000) + b"]}"
    for client in (c, anonymous):
        for body in (deep, wide):
            assert_4xx(client.post(f"/v1/runs/{run_id}/reports", content=body,
                                   headers={"Content-Type": "application/json"}))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_only_utf8_bodies(world, encoding):
    c, _study, _ = world
    text = json.dumps({"name": unique(), "model_params": 1000})
    r = c.post("/v1/studies", content=text.encode(encoding), headers={"Content-Type": "application/json"})
    assert_4xx(r, 415)
    assert_4xx(c.post("/v1/recommendations", content=b"\xef\xbb\xbf" + json.dumps(bert_request()).encode(),
                      headers={"Content-Type": "application/json"}), 415)
    assert_4xx(c.post("/v1/recommendations", content=b'{"x": "\xff"}', headers={"Content-Type": "application/json"}),
               415)


# ------------------------------------------------------------------ browsers: rebinding, forgery, framing


def test_a_foreign_host_reaches_nothing(world):
    c, study, run_id = world
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2"):
        for method, url in (("GET", f"/v1/studies/{study}"), ("POST", f"/v1/runs/{run_id}/heartbeat"), ("GET", "/")):
            assert_4xx(c.request(method, url, headers={"Host": host}), 400)
    for host in ("localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST"):
        assert c.get(f"/v1/studies/{study}", headers={"Host": host}).status_code == 200


def test_a_cross_site_post_changes_nothing(api, world):
    c, study, run_id = world
    here = api.base_url.removeprefix("http://")
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"http://{here}", "Sec-Fetch-Site": "cross-site"}):
        assert_4xx(c.post(f"/v1/runs/{run_id}/heartbeat", headers=headers), 403)  # body-less
        assert_4xx(c.post(f"/v1/runs/{run_id}/complete", json={"outcome": "failed"}, headers=headers), 403)
        assert_4xx(c.delete(f"/v1/studies/{study}", headers=headers), 403)
    assert c.get(f"/v1/runs/{run_id}").json()["state"] == "running"
    same = {"Origin": f"http://{here}", "Sec-Fetch-Site": "same-origin"}
    assert c.post(f"/v1/runs/{run_id}/heartbeat", json={}, headers=same).status_code == 200
    assert c.post(f"/v1/runs/{run_id}/heartbeat", json={}).status_code == 200  # a non-browser client: no Origin


def _preempted_run(api, c, study: str) -> int:
    """A run of ``study`` whose lease ran out, swept as the service's sweeper sweeps it (under uvicorn
    the service's own sweeper may sweep it first: either way it ends preempted)."""
    from datetime import UTC, datetime, timedelta

    from largebatch.scaling_rules import recommend
    from largebatch.service.storage import open_store

    namespace = c.get(f"/v1/studies/{study}").json()["namespace"]
    with open_store(api.store_url) as store:
        run, _ = store.create_run(namespace, study, recommend(bert_request()), lease_seconds=1)
        store.expire_leases(now=datetime.now(UTC) + timedelta(seconds=60))
    assert c.get(f"/v1/runs/{run.id}").json()["state"] == "preempted"
    return run.id


def test_a_body_less_post_revives_nothing(api, world):
    """What a page on any site can send without a preflight (no Origin from an old browser or a proxy that
    strips it): a POST with no body, or with a form's or text's media type. None changes a run."""
    c, study, _ = world
    run_id = _preempted_run(api, c, study)
    heartbeat = f"/v1/runs/{run_id}/heartbeat"
    assert_4xx(c.post(heartbeat), 415)  # no body, no content type
    assert_4xx(c.post(heartbeat, headers={"Content-Type": "application/json"}), 422)  # JSON, but empty
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert_4xx(c.post(heartbeat, content=b"", headers={"Content-Type": content_type}), 415)
        assert_4xx(c.post(heartbeat, content=b"{}", headers={"Content-Type": content_type}), 415)
    assert c.get(f"/v1/runs/{run_id}").json()["state"] == "preempted"
    # The job itself, speaking JSON, brings it back.
    r = c.post(heartbeat, json={})
    assert r.status_code == 200 and r.json()["run"]["state"] == "running", r.text


def test_a_form_post_changes_nothing(api, world):
    c, study, run_id = world
    for url, form in ((f"/v1/runs/{run_id}/complete", {"outcome": "failed"}),
                      (f"/v1/runs/{run_id}/reports", {"step": "1", "loss": "2.0"}),
                      ("/v1/studies", {"name": unique("form"), "model_params": "1000"}),
                      (f"/v1/studies/{study}/runs", {"request": "x"}),
                      (f"/v1/runs/{run_id}/heartbeat", {})):
        assert_4xx(c.post(url, data=form), 415)
        assert_4xx(c.post(url, files={"f": ("a.json", b"{}", "application/json")}), 415)  # multipart
    assert c.get(f"/v1/runs/{run_id}").json()["state"] == "running"
    assert c.get(f"/v1/runs/{run_id}/reports").json()["total"] == 0


def test_every_post_needs_a_json_body_and_the_client_sends_one(api, world):
    from largebatch.client import Client

    c, study, _ = world
    run_id = _preempted_run(api, c, study)
    for url in ("/v1/recommendations", "/v1/studies", f"/v1/studies/{study}/runs", f"/v1/runs/{run_id}/reports",
                f"/v1/runs/{run_id}/complete", f"/v1/runs/{run_id}/heartbeat", "/v1/schedule",
                "/v1/recommendations/schedule.svg"):
        assert_4xx(c.post(url), 415)
        assert_4xx(c.post(url, content=b"  ", headers={"Content-Type": "application/json"}), 422)
    # The Python client's heartbeat (what a job's reporter thread sends) is a JSON POST, and revives the run.
    with Client(api.base_url, api_key=api.keys["write"], http_client=api.client(None), max_retries=0) as client:
        hb = client.heartbeat(run_id)
    assert hb.run.state == "running" and not hb.should_stop


def test_security_headers_on_every_answer(api, world):
    c, study, _ = world
    answers = [c.get("/healthz"), c.get("/"), c.get("/docs"), c.get("/nope"), c.get(f"/v1/studies/{study}"),
               c.post("/v1/studies", content=b"{", headers={"Content-Type": "application/json"}),
               api.client(key=None).get(f"/v1/studies/{study}"),
               c.get(f"/v1/studies/{study}/runs", params={"format": "csv"})]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", (r.request.url, r.headers)
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], (r.request.url, r.headers)


def test_csv_line_breaks_and_blanks_do_not_hide_a_formula(world):
    c, study, _ = world
    for reason in ("ok\r=HYPERLINK(1)", "ok\n+1", "  =1+1", "\r\n@SUM(A1)", "x\r\n -1+2"):
        r = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request()})
        assert c.post(f"/v1/runs/{r.json()['id']}/complete", json={"outcome": "failed", "reason": reason}
                      ).status_code == 200
    text = c.get(f"/v1/studies/{study}/runs", params={"format": "csv"}).text
    rows = list(__import__("csv").reader(__import__("io").StringIO(text, newline="")))
    for row in rows[1:]:
        for cell in row:
            for line in cell.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                s = line.lstrip()
                assert not (s[:1] in ("=", "+", "@") or (s[:1] == "-" and not _number(s))), repr(cell)


def test_the_rate_limiter_keys_on_the_credential_and_counts_failures(tmp_path):
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    url = f"sqlite:///{tmp_path / 'rl.db'}"
    app = create_app(Settings(store_url=url, rate_limit_per_s=0.01, rate_limit_burst=4))
    with TestClient(app, base_url="http://localhost") as tc:
        spellings = ["Bearer k1", "bearer k1", "BEARER  k1 ", " Bearer k1", "Bearer\tk1"]
        codes = [tc.get("/v1/studies", headers={"Authorization": h}).status_code for h in spellings]
        assert codes[:4] == [401] * 4 and codes[4] == 429, codes
    app = create_app(Settings(store_url=url, rate_limit_per_s=0.01, rate_limit_burst=100))
    with TestClient(app, base_url="http://localhost") as tc:
        codes = [tc.get("/v1/studies", headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(15)]
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}, codes


def test_a_long_idempotency_key_opens_every_variant_or_nothing(world):
    c, study, _ = world
    before = c.get(f"/v1/studies/{study}/runs").json()["total"]
    key = "k" * 200
    rec = bert_request(study=study, start_run=True, explore=11)
    first = c.post("/v1/recommendations", json=rec, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert c.get(f"/v1/studies/{study}/runs").json()["total"] == before + 12
    again = c.post("/v1/recommendations", json=rec, headers={"Idempotency-Key": key})
    assert [r["id"] for r in again.json()["variant_runs"]] == [r["id"] for r in first.json()["variant_runs"]]
    assert c.get(f"/v1/studies/{study}/runs").json()["total"] == before + 12


def test_a_noise_scale_outside_its_physical_range_is_refused(world):
    c, study, run_id = world
    for bad in (5e-324, 1e-9, 1e13):
        assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"step": 1, "loss": 2.0, "noise_scale": bad}), 422)
        body = assert_4xx(c.post(f"/v1/runs/{run_id}/reports", json={"reports": [
            {"step": 2, "loss": 2.0}, {"step": 3, "loss": 2.0, "noise_scale": bad}]}), 422)
        assert body.detail[0]["loc"] == ["body", "reports", 1, "noise_scale"]
    assert c.get(f"/v1/runs/{run_id}/reports").json()["items"] == []
    assert c.post(f"/v1/runs/{run_id}/reports", json={"step": 1, "loss": 2.0, "noise_scale": 0.5}).status_code == 200
    for extra in ({"start_run": True}, {"start_run": True, "explore": 2}):
        assert c.post("/v1/recommendations", json=bert_request(study=study, **extra)).status_code == 200


# ------------------------------------------------------------------ reads whose size the caller controlled


def test_a_list_page_is_bounded_in_bytes_whatever_the_environments(world):
    c, study, _ = world
    big = {"blob": "x" * 200_000}
    ids = [c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": big}).json()["id"]
           for _ in range(3)]
    page = c.get(f"/v1/studies/{study}/runs", params={"limit": 1000})
    assert page.status_code == 200 and len(page.content) < 20_000 * len(page.json()["items"])
    listed = {r["id"]: r for r in page.json()["items"]}
    for run_id in ids:
        assert "_truncated" in listed[run_id]["environment"], listed[run_id]["environment"]
        assert c.get(f"/v1/runs/{run_id}").json()["environment"] == big
    small = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"gpu": "a100"}})
    again = c.get(f"/v1/studies/{study}/runs", params={"limit": 1000}).json()["items"]
    assert {r["id"]: r for r in again}[small.json()["id"]]["environment"] == {"gpu": "a100"}
    csv_text = c.get(f"/v1/studies/{study}/runs", params={"format": "csv"}).text
    assert len(csv_text.splitlines()) == 1 + c.get(f"/v1/studies/{study}/runs").json()["total"]


def test_report_pages_by_keyset_and_a_downsampled_curve(world):
    c, _study, run_id = world
    for start in range(0, 3000, 1000):
        batch = [{"step": s, "loss": 5.0 - s / 1000} for s in range(start, start + 1000)]
        assert c.post(f"/v1/runs/{run_id}/reports", json={"reports": batch}).status_code == 200
    page = c.get(f"/v1/runs/{run_id}/reports", params={"after_step": 2990, "limit": 5}).json()
    assert [p["step"] for p in page["items"]] == [2991, 2992, 2993, 2994, 2995] and page["total"] == 3000
    assert [p["step"] for p in c.get(f"/v1/runs/{run_id}/reports", params={"offset": 2998}).json()["items"]] == [2998, 2999]
    curve = c.get(f"/v1/runs/{run_id}/curve", params={"points": 50}).json()
    assert len(curve["buckets"]) <= 50 and curve["last_step"] == 2999 and curve["total"] == 3000
    assert curve["buckets"][0]["high"] == 5.0 and curve["buckets"][-1]["low"] == 5.0 - 2999 / 1000
    text = c.get(f"/v1/runs/{run_id}/reports", params={"format": "csv", "offset": 10, "limit": 6000}).text
    lines = text.splitlines()
    assert lines[0] == "step,loss,grad_norm" and len(lines) == 1 + 2990 and lines[1].startswith("10,")
    assert_4xx(c.get("/v1/runs/999999999/curve"), 404)
    assert_4xx(c.get(f"/v1/runs/{run_id}/curve", params={"points": 0}), 422)


# ------------------------------------------------------------------ evidence: one read, one fit per version


def test_many_conflicting_runs_make_one_warning_line_and_the_fit_follows_the_study(api, world):
    c, study, _ = world
    rec = c.post("/v1/recommendations", json=bert_request()).json()
    lr = rec["stages"][0]["peak_lr"]
    low = c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(512)}).json()
    assert c.post(f"/v1/runs/{low['id']}/complete", json={"outcome": "diverged", "reason": "x"}).status_code == 200
    recipe = {k: v for k, v in rec.items() if k not in ("run", "variants", "variant_runs")}
    for _ in range(6):  # completed at the target batch above an LR that diverged at a smaller batch
        r = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe}).json()
        assert c.post(f"/v1/runs/{r['id']}/complete", json={"outcome": "completed", "metric": 1.0}).status_code == 200
    out = c.post("/v1/recommendations", json=bert_request(study=study)).json()
    conflicts = [w for w in out["warnings"] if w.startswith("evidence conflict")]
    assert len(conflicts) == 1 and "6 runs completed" in conflicts[0], out["warnings"]
    assert out["stages"][0]["peak_lr"] < lr  # the cap of the diverged run
    ev = c.get(f"/v1/studies/{study}/evidence").json()
    assert len(ev["conflicts"]) == 1 and ev["boundary"]
    cap = min(b["cap"] for b in ev["boundary"])
    assert out["stages"][0]["peak_lr"] <= cap
    # A run finishing changes the answer at once (the cached fit is per version of the evidence).
    r = c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe}).json()
    c.post(f"/v1/runs/{r['id']}/complete", json={"outcome": "completed", "metric": 1.0})
    again = c.post("/v1/recommendations", json=bert_request(study=study)).json()
    assert any("7 runs completed" in w for w in again["warnings"]), again["warnings"]


# ------------------------------------------------------------------ SQLite: a held lock, a vanished file


def test_sqlite_writers_behind_an_external_lock_give_up_within_the_deadline_queue_included(tmp_path):
    import sqlite3
    import threading
    import time

    from largebatch.service.storage import StoreUnavailable, open_store

    url = f"sqlite:///{tmp_path / 'held.db'}"
    with open_store(url, busy_timeout_s=0.5, busy_deadline_s=1.0) as store:
        store.create_study("ns", "s0", model_family="transformer", model_params=1000)
        holder = sqlite3.connect(tmp_path / "held.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        waited: list[float] = []
        outcomes: list[str] = []

        def writer(i: int) -> None:
            t0 = time.monotonic()
            try:
                store.create_study("ns", f"w{i}", model_family="transformer", model_params=1000)
                outcomes.append("ok")
            except StoreUnavailable:
                outcomes.append("503")
            waited.append(time.monotonic() - t0)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        holder.execute("ROLLBACK")
        holder.close()
        assert outcomes == ["503"] * 8
        # About twice the deadline, however many writers queue (before: 8 x 1.5 s, one after the other).
        assert max(waited) < 2 * 1.0 + 0.5 + 1.0, sorted(waited)
        store.create_study("ns", "after", model_family="transformer", model_params=1000)


def test_readyz_and_writes_notice_a_held_lock_and_a_vanished_database(tmp_path):
    import sqlite3

    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    path = tmp_path / "gone.db"
    app = create_app(Settings(store_url=f"sqlite:///{path}", open_mode=True, store_timeout_s=0.5,
                              ready_timeout_s=1.5))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/studies", json={"name": "a", "model_params": 1000}).status_code == 201
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            assert_4xx_or_503(c.get("/readyz"))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert c.get("/readyz").status_code == 200
        path.unlink()
        assert_4xx_or_503(c.get("/readyz"))
        assert_4xx_or_503(c.post("/v1/studies", json={"name": "b", "model_params": 1000}))
        assert not path.exists()


def assert_4xx_or_503(r) -> None:
    assert r.status_code == 503 and r.json()["type"] == "store_unavailable", (r.status_code, r.text)
    assert "retry-after" in r.headers


def test_a_posted_recipe_says_numbers_as_numbers(world):
    c, study, _ = world
    rec = c.post("/v1/recommendations", json=bert_request()).json()
    recipe = {k: v for k, v in rec.items() if k not in ("run", "variants", "variant_runs")}
    before = c.get(f"/v1/studies/{study}/runs").json()["total"]
    for where, value in ((("stages", 0, "batch_size"), "512"), (("stages", 0, "batch_size"), True),
                         (("total_steps",), "15625"), (("optimizer", "lr"), "0.005"), (("stages", 0, "peak_lr"), True)):
        bad = _replace(recipe, where, value)
        body = assert_4xx(c.post(f"/v1/studies/{study}/runs", json={"recipe": bad}), 422)
        assert body.detail[0]["loc"] == ["body", "recipe", *where]
        assert_4xx(c.post("/v1/schedule", json=bad), 422)
    assert c.get(f"/v1/studies/{study}/runs").json()["total"] == before
    assert c.post(f"/v1/studies/{study}/runs", json={"recipe": recipe}).status_code == 201
    assert c.post(f"/v1/studies/{study}/runs", json={"request": bert_request(), "environment": {"n": 1}}).status_code == 201
