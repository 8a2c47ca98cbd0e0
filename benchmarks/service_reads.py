"""What heavy honest use costs the service, in-process (the app over Starlette's TestClient, a real store):

    python benchmarks/service_reads.py                 # SQLite file, 10^6-step run (~2-4 min on 2 cores)
    python benchmarks/service_reads.py --quick         # 10^5-step run, 200 runs for the memory figure
    python benchmarks/service_reads.py --store postgresql+psycopg://127.0.0.1/test

* a report page (100 reports) at step 10 and at step 10^6, by keyset (``after_step``) and by ``offset``;
* a 1,000-report batch (``POST /v1/runs/{id}/reports``), one transaction;
* the explorer's bytes for a 10^5-report run: its first draw (the downsampled curve) and each refresh
  (the reports after the last step it has), beside reading every report as pages;
* the engine with 2,000 runs of evidence: fitted on every request, and fitted once per study version
  (what the service does), and the service's whole evidence read (one transaction) with the fit cached;
* the server's peak memory (max RSS) while it serves a study of 1,000 runs with 250 KB environments
  (lists, CSV, every run, the evidence, a recommendation), measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BERT_32K = {"model": {"params": 340_000_000},
            "reference": {"batch_size": 512, "lr": 6.25e-4, "warmup_ratio": 0.003125, "steps": 1_000_000},
            "target": {"batch_size": 32768}}


def _client(url: str):
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    return TestClient(create_app(Settings(store_url=url, open_mode=True)), base_url="http://localhost")


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _study(c, name: str) -> None:
    r = c.post("/v1/studies", json={"name": name, "model_params": 340_000_000})
    assert r.status_code in (201, 200), r.text


def _run(c, study: str) -> int:
    r = c.post(f"/v1/studies/{study}/runs", json={"request": BERT_32K})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def reads_and_writes(url: str, steps: int) -> dict:
    out: dict = {}
    with _client(url) as c:
        store = c.app.state.store_holder.get()
        _study(c, "reads")
        run = _run(c, "reads")
        t0 = time.perf_counter()
        chunk = 100_000
        for start in range(0, steps, chunk):
            store.report_batch(run, [(s, 10.0 / (1 + s / 1000), None, None) for s in range(start, min(steps, start + chunk))])
        out["load_s"] = time.perf_counter() - t0
        page = f"/v1/runs/{run}/reports"
        cases = (("keyset_step_10", {"after_step": 10}), ("keyset_step_top", {"after_step": steps - 200}),
                 ("offset_step_10", {"offset": 10}), ("offset_step_top", {"offset": steps - 200}))
        samples: dict[str, list[float]] = {label: [] for label, _ in cases}
        for _ in range(40):  # in turns, so the machine's background load hits every case alike
            for label, params in cases:
                t0 = time.perf_counter()
                c.get(page, params={**params, "limit": 100}).raise_for_status()
                samples[label].append(time.perf_counter() - t0)
        for label, _ in cases:
            out[label + "_ms"] = statistics.median(samples[label][2:]) * 1e3
        out["curve_ms"] = _median_ms(lambda: c.get(f"/v1/runs/{run}/curve", params={"points": 500}).raise_for_status(), 5)
        # A 1,000-report batch over HTTP, on a fresh run each time.
        times = []
        for _ in range(6):
            fresh = _run(c, "reads")
            body = {"reports": [{"step": s, "loss": 3.0 - s / 1e4, "grad_norm": 1.0} for s in range(1000)]}
            t0 = time.perf_counter()
            assert c.post(f"/v1/runs/{fresh}/reports", json=body).status_code == 200
            times.append(time.perf_counter() - t0)
        out["batch_1000_ms"] = statistics.median(times[1:]) * 1e3
        # The explorer on a 10^5-report run: a first draw, then refreshes of what is new.
        ex = _run(c, "reads")
        n = min(steps, 100_000)
        store.report_batch(ex, [(s, 5.0 - s / n, None, None) for s in range(n)])
        first = c.get(f"/v1/runs/{ex}/curve", params={"points": 500})
        last = first.json()["last_step"]
        store.report_batch(ex, [(s, 1.0, None, None) for s in range(n, n + 10)])  # ~3 s of a job's reports
        refresh = c.get(f"/v1/runs/{ex}/reports", params={"after_step": last, "limit": 1000})
        whole = sum(len(c.get(f"/v1/runs/{ex}/reports", params={"offset": o, "limit": 10_000}).content)
                    for o in range(0, n + 10, 10_000))
        out.update(explorer_reports=n, explorer_first_bytes=len(first.content), explorer_refresh_bytes=len(refresh.content),
                   explorer_whole_bytes=whole)
    return out


def engine_with_evidence(url: str, n_runs: int = 2000) -> dict:
    from largebatch.scaling_rules import recommend
    from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence
    from largebatch.scaling_rules.models import RecommendationRequest
    from largebatch.service.recipes import EvidenceCache, gather_history

    rng = random.Random(3)
    runs = []
    for i in range(n_runs):
        b = rng.choice([4096, 8192, 16384, 32768])
        lr = 6.25e-4 * math.sqrt(b / 512) * 2 ** rng.uniform(-3, 3)
        diverged = lr > 1.2e-2
        runs.append(RunEvidence(batch_size=b, lr=lr, outcome="diverged" if diverged else "completed",
                                metric=None if diverged else 1.5 + 0.1 * math.log(lr / 5e-3) ** 2 + rng.gauss(0, 0.01),
                                run_id=i))
    model = EvidenceModel.from_runs(runs)
    out = {"evidence_runs": n_runs,
           "engine_no_evidence_ms": _median_ms(lambda: recommend(BERT_32K), 200),
           "engine_fit_each_time_ms": _median_ms(lambda: recommend(BERT_32K, evidence=runs), 5),
           "engine_cached_fit_ms": _median_ms(lambda: recommend(BERT_32K, evidence=model), 200),
           # The curve's fit alone, side by side: with the bend tested (26 bends at four batch sizes), and
           # the power law alone (what the fit was before the curve could bend).
           "fit_with_bend_ms": _median_ms(lambda: model._fit(None), 5),
           "fit_power_law_ms": _median_ms(lambda: model._fit(None, bend=False), 5)}
    with _client(url) as c:
        store = c.app.state.store_holder.get()
        _study(c, "evidence")
        from largebatch.scaling_rules.models import Recipe

        base = Recipe.model_validate({k: v for k, v in c.post("/v1/recommendations", json=BERT_32K).json().items()
                                      if k not in ("run", "variants", "variant_runs")})
        for r in runs:
            recipe = base.model_copy(deep=True)
            recipe.stages[0].peak_lr = recipe.optimizer.lr = r.lr
            recipe.stages[0].end_lr = min(recipe.stages[0].end_lr, r.lr)
            recipe.stages[0].batch_size = r.batch_size
            rec, _ = store.create_run("default", "evidence", recipe)
            store.complete_run(rec.id, r.outcome, metric=r.metric)
        req = RecommendationRequest.model_validate({**BERT_32K})
        cache = EvidenceCache()
        out["service_evidence_read_cached_ms"] = _median_ms(
            lambda: gather_history(store, "default", "evidence", req, cache=cache), 50)
        out["service_evidence_read_uncached_ms"] = _median_ms(
            lambda: gather_history(store, "default", "evidence", req, cache=None), 3)
        out["http_recommend_with_study_ms"] = _median_ms(
            lambda: c.post("/v1/recommendations", json={**BERT_32K, "study": "evidence"}).raise_for_status(), 50)
        out["http_recommend_without_ms"] = _median_ms(
            lambda: c.post("/v1/recommendations", json=BERT_32K).raise_for_status(), 50)
    return out


def _build_big_study(url: str, runs: int, env_bytes: int) -> None:
    from largebatch.service.storage import open_store

    with _client(url) as c:
        _study(c, "big")
        recipe = c.post("/v1/recommendations", json=BERT_32K).json()
    from largebatch.scaling_rules.models import Recipe

    recipe = Recipe.model_validate({k: v for k, v in recipe.items() if k not in ("run", "variants", "variant_runs")})
    with open_store(url) as store:
        for i in range(runs):
            env = {"i": i, "blob": "x" * env_bytes}
            run, _ = store.create_run("default", "big", recipe, environment=env)
            if i % 2:
                store.complete_run(run.id, "completed", metric=1.0 + i / runs)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve_big_study(url: str) -> dict:
    """In a fresh process: every read a user (and the explorer) makes of the big study; the peak RSS."""
    before = _peak_rss_mb()
    with _client(url) as c:
        started = _peak_rss_mb()
        for _ in range(3):
            page = c.get("/v1/studies/big/runs", params={"limit": 1000})
            assert page.status_code == 200
        size = len(page.content)
        csv_bytes = len(c.get("/v1/studies/big/runs", params={"format": "csv"}).content)
        for r in page.json()["items"]:
            assert c.get(f"/v1/runs/{r['id']}").status_code == 200
        c.get("/v1/studies/big/evidence").raise_for_status()
        c.post("/v1/recommendations", json={**BERT_32K, "study": "big"}).raise_for_status()
        c.get("/").raise_for_status()
    peak = _peak_rss_mb()
    return {"rss_before_app_mb": before, "rss_app_started_mb": started, "rss_peak_mb": peak,
            "list_page_bytes": size, "csv_bytes": csv_bytes}


def memory(url: str, runs: int, env_bytes: int) -> dict:
    _build_big_study(url, runs, env_bytes)
    proc = subprocess.run([sys.executable, __file__, "--serve-big", url], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"serving the big study failed: {proc.stderr[-3000:]}")
    return {"runs": runs, "env_bytes": env_bytes, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--store", help="a PostgreSQL URL (each part uses a fresh study in it); default: SQLite files")
    p.add_argument("--json", type=Path)
    p.add_argument("--parts", default="reads,engine,memory")
    p.add_argument("--serve-big", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_big:
        print(json.dumps(_serve_big_study(args.serve_big)))
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="lb-reads-")

    def url(name: str) -> str:
        return args.store or f"sqlite:///{Path(tmp.name) / name}.db"

    steps = 100_000 if args.quick else 1_000_000
    res = {"store": (args.store or "sqlite").split(":")[0], "cpus": os.cpu_count()}
    parts = args.parts.split(",")
    if "reads" in parts:
        res["reads"] = reads_and_writes(url("reads"), steps)
        print(json.dumps(res["reads"]), flush=True)
    if "engine" in parts:
        res["engine"] = engine_with_evidence(url("engine"))
        print(json.dumps(res["engine"]), flush=True)
    if "memory" in parts:
        res["memory"] = memory(url("memory"), 200 if args.quick else 1000, 250_000)
        print(json.dumps(res["memory"]), flush=True)
    tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if set(parts) != {"reads", "engine", "memory"}:
        return 0
    r, e, m = res["reads"], res["engine"], res["memory"]
    print(f"store {res['store']}, {res['cpus']} CPUs\n")
    print("| measure | value |\n|---|---:|")
    rows = [
        ("report page (100) at step 10, keyset", f"{r['keyset_step_10_ms']:.2f} ms"),
        (f"report page (100) at step {steps:,}, keyset", f"{r['keyset_step_top_ms']:.2f} ms "
                                                        f"({r['keyset_step_top_ms'] / r['keyset_step_10_ms']:.2f}x)"),
        (f"report page (100) at step {steps:,}, offset", f"{r['offset_step_top_ms']:.2f} ms"),
        (f"downsampled curve (500 buckets) of {steps:,} reports", f"{r['curve_ms']:.0f} ms"),
        ("1,000-report batch, one transaction (HTTP)", f"{r['batch_1000_ms']:.0f} ms"),
        (f"explorer first draw, {r['explorer_reports']:,}-report run", f"{r['explorer_first_bytes']:,} bytes"),
        ("explorer refresh (10 new reports)", f"{r['explorer_refresh_bytes']:,} bytes"),
        ("every report as pages (before: each refresh)", f"{r['explorer_whole_bytes']:,} bytes"),
        ("engine, no evidence", f"{e['engine_no_evidence_ms']:.3f} ms"),
        (f"engine, {e['evidence_runs']:,} runs of evidence fitted per request", f"{e['engine_fit_each_time_ms']:.1f} ms"),
        (f"engine, {e['evidence_runs']:,} runs of evidence, fit cached", f"{e['engine_cached_fit_ms']:.3f} ms"),
        (f"the LR curve's fit alone, {e['evidence_runs']:,} runs at 4 batch sizes: bend tested / power law only",
         f"{e['fit_with_bend_ms']:.1f} ms / {e['fit_power_law_ms']:.1f} ms "
         f"({e['fit_with_bend_ms'] / e['fit_power_law_ms']:.1f}x)"),
        ("service evidence read (one transaction), fit cached", f"{e['service_evidence_read_cached_ms']:.1f} ms"),
        ("service evidence read, fitted", f"{e['service_evidence_read_uncached_ms']:.1f} ms"),
        ("POST /v1/recommendations with the 2,000-run study (in-process)", f"{e['http_recommend_with_study_ms']:.2f} ms"),
        ("POST /v1/recommendations without a study (in-process)", f"{e['http_recommend_without_ms']:.2f} ms"),
        (f"server peak RSS serving {m['runs']:,} runs x 250 KB environments", f"{m['rss_peak_mb']:.0f} MB "
                                                                          f"(app started: {m['rss_app_started_mb']:.0f} MB)"),
        ("a list page of 1,000 of those runs", f"{m['list_page_bytes']:,} bytes"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
