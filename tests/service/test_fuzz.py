"""Property-based fuzz of the API from its own OpenAPI schema (schemathesis): whatever the input,
no 5xx, and every response (status, content type, headers, body) matches the schema."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from largebatch.service.app import create_app
from largebatch.service.settings import Settings

from .conftest import bert_request, make_keys

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]

# The app under test, built at collection time so schemathesis can make one test per operation;
# it opens its SQLite store on the first request (the lifespan is not needed for that).
_DIR = Path(tempfile.mkdtemp(prefix="lb-fuzz-"))
_URL = os.environ.get("LB_FUZZ_STORE_URL") or f"sqlite:///{_DIR / 'fuzz.db'}"  # e.g. a PostgreSQL URL
# schemathesis sends Host: testserver (its ASGI client's name): allowed, beside the default names.
APP = create_app(Settings(store_url=_URL, open_mode=False, allowed_hosts=["localhost", "testserver"]))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
_AUTH: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def fuzz_world():
    from fastapi.testclient import TestClient

    keys = make_keys(_URL)
    _AUTH["Authorization"] = f"Bearer {keys['write']}"
    with TestClient(APP, headers=_AUTH, base_url="http://localhost") as c:
        # Something to find: a study and a run in the fuzzing key's namespace.
        assert c.post("/v1/studies", json={"name": "fuzz", "model_params": 340_000_000}).status_code == 201
        assert c.post("/v1/studies/fuzz/runs", json={"request": bert_request()}).status_code == 201
        yield
    APP.state.store_holder.close()
    shutil.rmtree(_DIR, ignore_errors=True)


@pytest.mark.slow  # schemathesis over every operation: seconds
@schema.parametrize()
# LB_FUZZ_EXAMPLES=500 for a deeper (slower) hunt; the suite's default stays within its time budget.
@settings(max_examples=int(os.environ.get("LB_FUZZ_EXAMPLES", "12")), deadline=None, derandomize="LB_FUZZ_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(headers=_AUTH, checks=CHECKS)
