"""Study-store benchmark: history-query latency vs. runs stored, and write throughput, beside
plain Optuna doing the same job.

    python benchmarks/store.py            # full: 100 / 10,000 / 100,000 runs, SQLite and PostgreSQL
    python benchmarks/store.py --quick    # < 30 s: 100 / 1,000 runs
    python benchmarks/store.py --no-pg    # SQLite only

History query ("what do we know per batch size?"):
  * store:  ``store.history(namespace, study)``: one indexed read of the summary table.
  * optuna: what a service on plain Optuna would do: ``optuna.load_study(...)``, then
    ``study.trials`` and a Python aggregation (cold: a fresh ``load_study`` per query, as a
    stateless worker would). Timed up to 10,000 runs by default; ``--peer-max 100000`` times it at
    100,000 runs too (once: it takes 1-2 minutes per backend on a 2-core machine).

Runs are bulk-loaded into the store's tables (Optuna's and ours, the same rows ``create_run`` /
``complete_run`` write), then the summaries are rebuilt from Optuna's data with
``rebuild_summaries()``, which is timed too. Loading 100,000 runs one API call at a time would
take most of an hour on a 2-core machine; the write path is measured separately:

Write throughput ("one run": create + one report + a final outcome):
  * store:  ``create_run`` + ``report`` + ``complete_run`` (3 transactions).
  * optuna: ``study.ask(fixed distributions)`` + ``trial.report`` + ``study.tell`` with
    ``RandomSampler`` (no sampler cost) on a stock ``RDBStorage(url)``.
  with 1 and 8 concurrent writer processes on one database.

Results: a Markdown table on stdout and JSON in ``benchmarks/out/store.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import create_engine, select, text, update

from largebatch.scaling_rules.models import Recipe
from largebatch.service.storage import _schema as sch
from largebatch.service.storage import open_store
from largebatch.service.storage.optuna_store import (
    _DIST_JSON,
    DISTRIBUTIONS,
    IVT,
    T_INTERMEDIATE,
    T_PARAMS,
    T_TRIAL_USER,
    T_TRIALS,
    T_VALUES,
    VT,
    _now,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

BATCH_SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
OUTCOME_MIX = (("completed", 0.70), ("diverged", 0.15), ("failed", 0.10), ("running", 0.05))


def recipe(batch_size: int, lr: float, steps: int = 1000) -> Recipe:
    warm = steps // 10
    return Recipe.model_validate({
        "optimizer": {"name": "lamb", "lr": lr},
        "stages": [{"batch_size": batch_size, "steps": steps, "peak_lr": lr, "warmup_steps": warm,
                    "const_steps": 0, "decay_steps": steps - warm, "warmup_ratio": warm / steps,
                    "const_ratio": 0.0}],
        "total_steps": steps,
        "rationale": ["sqrt scaling from the reference batch", "LAMB trust ratio keeps layers stable"],
    })


# ------------------------------------------------------------------------------- bulk loading


def bulk_load(store, namespace: str, study: str, n: int, rng: random.Random, chunk: int = 5000) -> None:
    """Append ``n`` finished/running runs to a study: the same rows the API writes, in bulk."""
    engine = store.engine
    with engine.connect() as conn:
        sid, n_runs = conn.execute(
            select(sch.lb_studies.c.study_id, sch.lb_studies.c.n_runs).where(
                sch.lb_studies.c.namespace == namespace, sch.lb_studies.c.name == study)
        ).one()
    recipes = {bs: recipe(bs, 1e-3) for bs in BATCH_SIZES}
    blobs = {bs: json.dumps(r.model_dump(mode="json")) for bs, r in recipes.items()}
    hashes = {bs: r.fingerprint() for bs, r in recipes.items()}
    outcomes = [o for o, _ in OUTCOME_MIX]
    weights = [w for _, w in OUTCOME_MIX]
    done = 0
    while done < n:
        m = min(chunk, n - done)
        now = _now()
        plan = []
        for i in range(m):
            bs = rng.choice(BATCH_SIZES)
            lr = 10 ** rng.uniform(-4.5, -1.5)
            outcome = rng.choices(outcomes, weights)[0]
            metric = 2.0 + (math.log10(lr) + 3) ** 2 / 4 + rng.random() * 0.05 if outcome == "completed" else None
            plan.append((n_runs + done + i, bs, lr, outcome, metric))
        state_of = {"completed": optuna.trial.TrialState.COMPLETE, "running": optuna.trial.TrialState.RUNNING}
        with engine.begin() as conn:
            ids = list(conn.execute(
                T_TRIALS.insert().returning(T_TRIALS.c.trial_id, sort_by_parameter_order=True),
                [{"study_id": sid, "number": num, "state": state_of.get(o, optuna.trial.TrialState.FAIL),
                  "datetime_start": now, "datetime_complete": None if o == "running" else now}
                 for num, _bs, _lr, o, _m in plan],
            ).scalars())
            params, attrs, values, inter, runs = [], [], [], [], []
            for tid, (num, bs, lr, o, met) in zip(ids, plan, strict=True):
                p = {"batch_size": bs, "peak_lr": lr, "warmup_ratio": 0.1, "const_ratio": 0.0,
                     "optimizer": "lamb", "steps": 1000}
                params += [{"trial_id": tid, "param_name": k, "param_value": DISTRIBUTIONS[k].to_internal_repr(v),
                            "distribution_json": _DIST_JSON[k]} for k, v in p.items()]
                a: dict[str, Any] = {"recipe_hash": hashes[bs], "environment": {"gpus": 8}, "client_key": f"c{num}",
                                     "stage": 0}
                if o != "running":
                    a["outcome"] = o
                attrs += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in a.items()]
                attrs.append({"trial_id": tid, "key": "recipe", "value_json": blobs[bs]})
                inter.append({"trial_id": tid, "step": 100, "intermediate_value": 3.0,
                              "intermediate_value_type": IVT.FINITE})
                if met is not None:
                    values.append({"trial_id": tid, "objective": 0, "value": met, "value_type": VT.FINITE})
                runs.append({"run_id": tid, "study_id": sid, "number": num, "client_key": f"c{num}", "state": o,
                             "swept": False, "recipe_hash": hashes[bs], "metric": met, "reason": None,
                             "diverged_step": 500 if o == "diverged" else None, "created_at": now,
                             "updated_at": now, "lease_seconds": 600.0,
                             "lease_expires_at": now + timedelta(seconds=600) if o == "running" else None,
                             "last_step": 100, "last_loss": 3.0, "last_loss_nonfinite": None, **p})
            conn.execute(T_PARAMS.insert(), params)
            conn.execute(T_TRIAL_USER.insert(), attrs)
            conn.execute(T_INTERMEDIATE.insert(), inter)
            if values:
                conn.execute(T_VALUES.insert(), values)
            conn.execute(sch.lb_runs.insert(), runs)
            conn.execute(update(sch.lb_studies).where(sch.lb_studies.c.study_id == sid)
                         .values(n_runs=sch.lb_studies.c.n_runs + m))
        done += m


# ------------------------------------------------------------------------------- measurements


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def optuna_history(url: str, name: str) -> dict[int, dict[str, Any]]:
    """The same answer as store.history, the plain-Optuna way."""
    study = optuna.load_study(study_name=name, storage=url)
    out: dict[int, dict[str, Any]] = {}
    for t in study.trials:
        if "batch_size" not in t.params:
            continue
        bs, lr = t.params["batch_size"], t.params["peak_lr"]
        h = out.setdefault(bs, {"n": 0, "best": None, "div": None, "stable": None})
        h["n"] += 1
        if t.state == optuna.trial.TrialState.COMPLETE:
            if h["best"] is None or t.value < h["best"][1]:
                h["best"] = (lr, t.value)
            h["stable"] = lr if h["stable"] is None else max(h["stable"], lr)
        elif t.user_attrs.get("outcome") == "diverged":
            h["div"] = lr if h["div"] is None else min(h["div"], lr)
    return out


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": statistics.median(s), "p95_ms": s[min(len(s) - 1, int(0.95 * len(s)))], "n": len(s)}


def bench_history(url: str, sizes: list[int], peer_max: int, label: str, peer_reps: int = 3,
                  calls: int = 300) -> list[dict[str, Any]]:
    store = open_store(url)
    store.create_study("bench", "hist", model_family="transformer", model_params=340_000_000)
    for i in range(20):  # other studies in the same band, so family_history merges something
        store.create_study("bench", f"other{i}", model_family="transformer", model_params=300_000_000 + i)
    rng = random.Random(0)
    rows = []
    stored = 0
    for n in sizes:
        t = time.perf_counter()
        bulk_load(store, "bench", "hist", n - stored, rng)
        load_s = time.perf_counter() - t
        stored = n
        t = time.perf_counter()
        store.rebuild_summaries("bench", "hist")
        rebuild_ms = (time.perf_counter() - t) * 1000
        with store.engine.connect() as conn:  # fresh planner statistics, as autovacuum would
            conn.execute(text("ANALYZE"))
            conn.commit()
        store.history("bench", "hist")
        hist = stats(timed(lambda: store.history("bench", "hist"), calls))
        fam = stats(timed(lambda: store.family_history("transformer", 100_000_000, 1_000_000_000), calls))
        get_run = stats(timed(lambda n=n: store.get_run(rng.randint(1, n)), calls))
        row = {"backend": label, "runs": n, "load_s": round(load_s, 1), "rebuild_ms": round(rebuild_ms, 1),
               "history": hist, "family_history": fam, "get_run": get_run}
        if n <= peer_max:
            result: list[dict] = []
            peer = timed(lambda result=result: result.append(optuna_history(store.url, "bench/hist")),
                         peer_reps if n <= 10_000 else 1)
            row["optuna_trials"] = stats(peer)
            check = result[-1]
            ours = {h.batch_size: h for h in store.history("bench", "hist")}
            assert set(check) == set(ours) and all(check[b]["n"] == ours[b].n_runs for b in check)
            assert all((check[b]["best"] or (None, None))[0] == ours[b].best_lr for b in check)
        rows.append(row)
        print(f"  [{label}] {n:>7} runs: history {hist['median_ms']:.2f} ms"
              + (f", optuna study.trials {row['optuna_trials']['median_ms']:.0f} ms" if "optuna_trials" in row else "")
              + f" (load {load_s:.1f} s, rebuild {rebuild_ms:.0f} ms)", flush=True)
    store.close()
    return rows


def _store_writer(url: str, worker: int, n: int, q) -> None:
    store = open_store(url, initialize=False)
    rec = recipe(4096, 1e-3)
    t = time.perf_counter()
    for i in range(n):
        run, _ = store.create_run("bench", "writes", rec, client_key=f"w{worker}-{i}")
        store.report(run.id, 100, 3.0)
        store.complete_run(run.id, "completed", metric=2.0 + i * 1e-4)
    q.put(time.perf_counter() - t)


def _optuna_writer(url: str, worker: int, n: int, q) -> None:
    study = optuna.load_study(study_name="bench/writes", storage=url,
                              sampler=optuna.samplers.RandomSampler(seed=worker))
    rec = recipe(4096, 1e-3).model_dump(mode="json")
    t = time.perf_counter()
    for i in range(n):
        trial = study.ask(DISTRIBUTIONS)
        trial.set_user_attr("recipe", rec)
        trial.report(3.0, 100)
        study.tell(trial, 2.0 + i * 1e-4)
    q.put(time.perf_counter() - t)


def bench_writes(make_url, label: str, writers: int, per_writer: int, peer_per_writer: int) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out: dict[str, Any] = {"backend": label, "writers": writers, "runs": writers * per_writer,
                           "peer_runs": writers * peer_per_writer}
    for kind in ("store", "optuna"):
        url = make_url(kind)
        n = per_writer if kind == "store" else peer_per_writer
        if kind == "store":
            s = open_store(url)
            s.create_study("bench", "writes", model_family="transformer", model_params=1)
            s.close()
            target = _store_writer
        else:
            optuna.create_study(study_name="bench/writes", storage=url)  # stock RDBStorage defaults
            target = _optuna_writer
        q = ctx.Queue()
        procs = [ctx.Process(target=target, args=(url, w, n, q)) for w in range(writers)]
        t = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t
        per = [q.get() for _ in procs]
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{kind} writer failed")
        out[kind] = {"runs_per_s": round(writers * n / max(per), 1), "wall_s": round(wall, 2)}
        print(f"  [{label}] {writers} writer(s) {kind:>6}: {out[kind]['runs_per_s']} runs/s", flush=True)
    return out


# ------------------------------------------------------------------------------- main


def pg_database(server: str):
    name = f"lbbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = server.rpartition("/")[0]
    return admin, name, f"{base}/{name}"


def drop_pg(admin, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def markdown(history: list[dict], writes: list[dict]) -> str:
    lines = ["| backend | runs stored | `store.history` median (p95) | `family_history` median | "
             "`get_run` median | plain Optuna: `load_study` + `study.trials` | rebuild summaries |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in history:
        peer = f"{r['optuna_trials']['median_ms']:,.0f} ms" if "optuna_trials" in r else "not run"
        lines.append(f"| {r['backend']} | {r['runs']:,} | {r['history']['median_ms']:.2f} ms "
                     f"({r['history']['p95_ms']:.2f}) | {r['family_history']['median_ms']:.2f} ms | "
                     f"{r['get_run']['median_ms']:.2f} ms | {peer} | {r['rebuild_ms']:,.0f} ms |")
    by_backend: dict[str, list[dict]] = {}
    for r in history:
        by_backend.setdefault(r["backend"], []).append(r)
    lines.append("")
    for b, rs in by_backend.items():
        ratio = rs[-1]["history"]["median_ms"] / rs[0]["history"]["median_ms"]
        lines.append(f"{b}: history latency at {rs[-1]['runs']:,} runs / at {rs[0]['runs']:,} runs = "
                     f"{ratio:.2f}x (goal: within 2x)")
    lines += ["", "| backend | writers | store: create+report+complete | plain Optuna: ask+report+tell |",
              "|---|---:|---:|---:|"]
    for w in writes:
        lines.append(f"| {w['backend']} | {w['writers']} | {w['store']['runs_per_s']} runs/s ({w['runs']} runs) | "
                     f"{w['optuna']['runs_per_s']} runs/s ({w['peer_runs']} runs) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, under 30 s")
    ap.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    ap.add_argument("--pg", default=os.environ.get("LARGEBATCH_BENCH_PG",
                                                   "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                    help="URL of a PostgreSQL database the benchmark may create a scratch database from")
    ap.add_argument("--peer-max", type=int, default=None,
                    help="largest study to time plain Optuna's study.trials on (default 10,000: at 100,000 "
                         "runs it takes minutes per backend)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("out") / "store.json"))
    args = ap.parse_args(argv)
    sizes = [100, 1_000] if args.quick else [100, 10_000, 100_000]
    peer_max = args.peer_max if args.peer_max is not None else (1_000 if args.quick else 10_000)
    peer_reps, calls = (1, 100) if args.quick else (3, 300)
    # (runs per writer for the store, for plain Optuna): stock Optuna on SQLite manages ~5 runs/s.
    w1, w8 = ((20, 5), (5, 2)) if args.quick else ((200, 40), (50, 10))
    tmp = Path(tempfile.mkdtemp(prefix="lbbench_"))
    history, writes = [], []
    print(f"optuna {optuna.__version__}, {os.cpu_count()} CPUs, sizes {sizes}", flush=True)

    history += bench_history(f"sqlite:///{tmp / 'hist.db'}", sizes, peer_max, "SQLite", peer_reps, calls)
    counter = iter(range(10**6))

    def sqlite_url(kind: str) -> str:
        return f"sqlite:///{tmp / f'w{next(counter)}_{kind}.db'}"

    writes.append(bench_writes(sqlite_url, "SQLite", 1, *w1))
    writes.append(bench_writes(sqlite_url, "SQLite", 8, *w8))

    if not args.no_pg:
        admin, name, url = pg_database(args.pg)
        try:
            history += bench_history(url, sizes, peer_max, "PostgreSQL", peer_reps, calls)
        finally:
            drop_pg(admin, name)
        for n_writers, per in ((1, w1), (8, w8)):
            dbs: list[tuple[Any, str]] = []

            def pg_url(kind: str, dbs: list[tuple[Any, str]] = dbs) -> str:
                admin_, name_, url_ = pg_database(args.pg)
                dbs.append((admin_, name_))
                return url_

            try:
                writes.append(bench_writes(pg_url, "PostgreSQL", n_writers, *per))
            finally:
                for a, nm in dbs:
                    drop_pg(a, nm)

    table = markdown(history, writes)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"optuna": optuna.__version__, "quick": args.quick, "history": history,
                               "writes": writes, "markdown": table}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
