"""Nothing blocks the event loop (issue 13): while the most expensive requests the service accepts run
back to back under the real ``largebatch serve``, ``/healthz`` still answers with p99 < 50 ms."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from largebatch.scaling_rules.models import MAX_STAGES
from largebatch.scaling_rules.wire import MAX_REPORT_BATCH
from largebatch.service.routes.recommendations import MAX_PLOT_STAGES

from .conftest import UvicornServer, bert_request


def _expensive(base: str, run_id: int) -> list[tuple[str, dict]]:
    many = [{"batch_size": 1024 * (i + 1), "share": 1 / MAX_STAGES, "lr_cap": 1e-5} for i in range(MAX_STAGES)]
    plot = [{"batch_size": 1024 * (i + 1), "share": 1 / MAX_PLOT_STAGES} for i in range(MAX_PLOT_STAGES)]
    big = bert_request(lr_cap=1e-5)
    big["target"]["steps"] = 2**31 - 1
    big["reference"]["steps"] = 2**31 - 1
    return [
        ("/v1/recommendations", bert_request(stages=many)),
        ("/v1/recommendations", big),
        ("/v1/recommendations/schedule.png", bert_request(stages=plot)),
        ("/v1/recommendations", bert_request(study="load", start_run=True, explore=64)),
        (f"/v1/runs/{run_id}/reports", {"reports": [{"step": i, "loss": 2.0} for i in range(MAX_REPORT_BATCH)]}),
    ]


@pytest.mark.slow
def test_healthz_p99_stays_under_50ms_while_the_most_expensive_requests_run(tmp_path):
    server = UvicornServer(f"sqlite:///{tmp_path / 'load.db'}", "--open", log=tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            assert c.post("/v1/studies", json={"name": "load", "model_params": 340_000_000}).status_code == 201
            run_id = c.post("/v1/studies/load/runs", json={"request": bert_request()}).json()["id"]
            work = _expensive(server.base_url, run_id)
            for url, body in work:  # each is accepted
                r = c.post(url, json=body)
                assert r.status_code == 200, (url, r.text[:300])
        stop = threading.Event()
        served = []

        def load() -> None:
            with httpx.Client(base_url=server.base_url, timeout=60) as lc:
                while not stop.is_set():
                    for url, body in work:
                        served.append(lc.post(url, json=body).status_code)

        # The worst refused requests too: a megabyte of numbers nested 900 deep with an escape (once a
        # 15-39 s freeze), and an escape 990 deep (once a RecursionError), without a key.
        deep = b'{"s":"\\u00e9","a":' + b"[" * 900 + b"1," * 520_000 + b"1" + b"]" * 900 + b"}"
        deeper = b'{"a":' + b"[" * 990 + b'"\\u00e9"' + b"]" * 990 + b"}"
        refused: list[int] = []

        def hostile() -> None:
            with httpx.Client(base_url=server.base_url, timeout=60) as hc:
                while not stop.is_set():
                    for body in (deep, deeper):
                        refused.append(hc.post(f"/v1/runs/{run_id}/reports", content=body,
                                               headers={"Content-Type": "application/json"}).status_code)

        threads = [threading.Thread(target=load) for _ in range(2)] + [threading.Thread(target=hostile)]
        for t in threads:
            t.start()
        latencies = []
        try:
            with httpx.Client(base_url=server.base_url, timeout=10) as probe:
                time.sleep(0.5)
                for _ in range(400):
                    t0 = time.perf_counter()
                    assert probe.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert served and set(served) == {200}, set(served)
        assert refused and all(400 <= s < 500 for s in refused), set(refused)
        p99 = statistics.quantiles(latencies, n=100)[98]
        print(f"healthz under load: median {statistics.median(latencies) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
              f"{len(served)} expensive requests served and {len(refused)} hostile ones refused meanwhile")
        assert p99 < 0.050
    finally:
        server.stop()
