"""The command line: ``largebatch keys create|list|revoke``, ``largebatch serve`` modes, and the recipe
over HTTP equal to ``largebatch recommend --json`` (LAMB Table 4)."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from largebatch.scaling_rules.cli import main as cli_main

from .conftest import LARGEBATCH, UvicornServer, bert_request

pytestmark = pytest.mark.slow  # every test starts `largebatch` processes


def lb(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([LARGEBATCH, *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_keys_cli_and_their_use_over_http(api, tmp_path):
    """create -> use over HTTP -> list -> revoke -> refused. The full tour on PostgreSQL; the
    essentials (create, use, revoke) on SQLite (each CLI call is a ~1 s process start)."""
    if not api.name.startswith("uvicorn"):
        pytest.skip("the CLI is exercised against the uvicorn servers")
    full = api.name.endswith("postgresql")
    ns = f"cli-{int(time.time() * 1000)}"
    made = lb("keys", "create", "--namespace", ns, "--scope", "write", "--store", api.store_url)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert len(key.splitlines()) == 1 and len(key) >= 32 and "only time" in made.stderr
    key_id = int(made.stderr.split()[1].rstrip(":"))
    c = api.client(None, headers={"Authorization": f"Bearer {key}"})
    r = c.post("/v1/studies", json={"name": "from-cli", "model_params": 1000})
    assert r.status_code == 201 and r.json()["namespace"] == ns
    if full:
        # The store URL may come from the environment too.
        ro = lb("keys", "create", "--namespace", ns, "--scope", "read", env={"LARGEBATCH_STORE_URL": api.store_url})
        assert ro.returncode == 0, ro.stderr
        listed = lb("keys", "list", "--namespace", ns, "--json", "--store", api.store_url)
        rows = json.loads(listed.stdout)
        assert (rows[0]["id"], rows[0]["namespace"], rows[0]["scope"]) == (key_id, ns, "write")
        assert [r["scope"] for r in rows] == ["write", "read"]
        assert key not in listed.stdout and key.startswith(rows[0]["prefix"])
        table = lb("keys", "list", "--store", api.store_url)
        assert table.returncode == 0 and ns in table.stdout and key not in table.stdout
    revoked = lb("keys", "revoke", str(key_id), "--store", api.store_url)
    assert revoked.returncode == 0 and "revoked" in revoked.stderr, revoked.stderr
    deadline = time.monotonic() + 10  # the service trusts a looked-up key for key_cache_seconds (1 s here)
    while c.get("/v1/studies").status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted"
        time.sleep(0.25)
    assert c.get("/v1/studies").json()["type"] == "unauthorized"


def test_keys_cli_errors(sqlite_url):
    r = lb("keys", "revoke", "999999", "--store", sqlite_url)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = lb("keys", "create", "--namespace", "bad name", "--store", sqlite_url)
    assert r.returncode == 2 and "namespace" in r.stderr and "Traceback" not in r.stderr
    r = lb("keys", "create", "--namespace", "x", "--scope", "admin", "--store", sqlite_url)
    assert r.returncode == 2
    r = lb("keys", "list", "--store", "mysql://nope")
    assert r.returncode == 2 and "--store" in r.stderr and "Traceback" not in r.stderr


def test_serve_open_mode_on_localhost_is_loud(tmp_path):
    url = f"sqlite:///{tmp_path / 'open.db'}"
    server = UvicornServer(url, log=tmp_path / "serve.log")  # no --require-keys, loopback host
    try:
        with httpx.Client(base_url=server.base_url) as c:
            r = c.post("/v1/studies", json={"name": "open", "model_params": 10})
            assert r.status_code == 201 and r.json()["namespace"] == "default"
            assert c.get("/v1/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        server.stop()
    assert "OPEN MODE" in server.log()


def test_serve_rejects_bad_options(tmp_path):
    assert lb("serve", "--port", "0").returncode == 2
    r = lb("serve", "--workers", "0", "--store", f"sqlite:///{tmp_path / 'x.db'}")
    assert r.returncode == 2 and "--workers" in r.stderr
    r = lb("serve", "--store", "mysql://nope", "--port", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert lb("serve", "--require-keys", "--open").returncode == 2


# LAMB Table 4: BERT-Large from 512 to 32K, LR 5/(2^3 x 10^3) at 512, warmup 1/320 of 1M steps.
TABLE4 = [512, 1024, 2048, 4096, 8192, 16384, 32768]


def _cli_recipe(target: int, capsys) -> dict:
    rc = cli_main(["recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "6.25e-4",
                   "--ref-warmup", "0.003125", "--ref-steps", "1M", "--target-batch", str(target), "--json"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_http_recipe_equals_cli_json(api, capsys):
    c = api.client("read")
    for target in TABLE4:
        cli = _cli_recipe(target, capsys)
        http = c.post("/v1/recommendations", json=bert_request(target)).json()
        assert {k: http[k] for k in cli} == cli, target
        assert http["run"] is None and http["variants"] == []
    # And the real `largebatch recommend` process, once, for the last column.
    out = lb("recommend", "--model-params", "340M", "--ref-batch", "512", "--ref-lr", "6.25e-4", "--ref-warmup",
             "0.003125", "--ref-steps", "1M", "--target-batch", "32K", "--json")
    cli = json.loads(out.stdout)
    assert cli["stages"][0]["peak_lr"] == 0.005 and cli["stages"][0]["warmup_steps"] == 3125
    http = c.post("/v1/recommendations", json=bert_request(32768)).json()
    assert {k: http[k] for k in cli} == cli


def test_serve_on_a_busy_port_says_so_before_announcing_anything(capsys, caplog):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["serve", "--port", str(port), "--store", "memory"]) == 2
    err = capsys.readouterr().err
    assert f"port {port} is in use: try --port {port + 1}" in err, err
    assert "serving on" not in err + caplog.text
