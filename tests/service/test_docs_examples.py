"""Every request body ``/docs`` documents has an example, and "Try it out" with it succeeds: each example
is sent to the app as Swagger UI would send it (on SQLite and PostgreSQL, through the ``api`` fixture)."""

from __future__ import annotations

from largebatch.scaling_rules.published import VECTORS

from .conftest import unique


def test_every_documented_body_has_an_example_the_service_accepts(api):
    c = api.client()
    schema = c.get("/openapi.json").json()
    study = unique("docs")
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    documented = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody")
            if body is None:
                continue
            example = body["content"]["application/json"].get("example")
            assert example is not None, f"{method.upper()} {path} documents a body without an example"
            documented.append((method, path, example))
    assert len(documented) >= 8
    for method, path, example in documented:
        url = path.replace("{name}", study)
        if "{id}" in url:
            run = c.post(f"/v1/studies/{study}/runs", json={"request": documented[0][2]})
            url = url.replace("{id}", str(run.json()["id"]))
        r = c.request(method.upper(), url, json=example)
        if path == "/v1/studies":  # the example's name, once; the same body again is a replay
            assert r.status_code in (200, 201), (path, r.text[:300])
            continue
        assert r.status_code in (200, 201), (method, path, r.status_code, r.text[:300])


def test_the_recommendation_example_is_lamb_table_4(api):
    c = api.client()
    schema = c.get("/openapi.json").json()
    example = schema["paths"]["/v1/recommendations"]["post"]["requestBody"]["content"]["application/json"]["example"]
    table_4 = next(v for v in VECTORS if v.case == "Table 4, BERT-Large LAMB 512 -> 32K" and v.quantity == "peak LR")
    assert example == table_4.request
    out = c.post("/v1/recommendations", json=example).json()
    assert out["stages"][0]["peak_lr"] == table_4.published and out["stages"][0]["batch_size"] == 32768
