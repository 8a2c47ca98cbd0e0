"""A recommendation with a study's evidence on PostgreSQL: a study of 1M runs beside one of 100.

    python benchmarks/pg_scale.py                       # 1,000,000 runs (loading: a few minutes)
    python benchmarks/pg_scale.py --runs 100000 --quick
    python benchmarks/pg_scale.py --readme              # also print the README table

Everything lives in a schema of its own in ``--url``'s database (``lb_pgscale_<pid>``), dropped at the end.
The big study is loaded fast but in the store's exact shape: a few template runs are opened, reported on
and finished through the store, then every row the store wrote for them (Optuna's trial, params, values
and user attrs, and ``lb_runs``) is copied server-side (``INSERT ... SELECT`` over ``generate_series``)
with new ids; the per-batch summaries are then rebuilt by the store from Optuna's tables.

Measured in-process (raw ASGI calls, no sockets), the two studies in turns: ``POST /v1/recommendations``
with ``study``, (a) reading the study's evidence from the store on every request
(``LARGEBATCH_EVIDENCE_FRESH_S=0``: one transaction, its fit cached while the study is unchanged) and
(b) with the default settings (the evidence read reused for 0.5 s, the answer memoised per read).
Also the evidence read alone, and ``EXPLAIN`` of its queries on the big study.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from service_load import BERT_32K

NAMESPACE = "bench"
TEMPLATES = 8  # four batch sizes, one completed and one diverged run each


def _table_rows(conn, schema: str) -> list[tuple[str, list[str], str, str | None]]:
    """(table, columns, the column naming the run, its own serial id column) for every table that holds
    rows of a run (Optuna's ``trial_id`` or our ``run_id``)."""
    from sqlalchemy import text

    cols: dict[str, list[tuple[str, str | None]]] = {}
    for table, column, default in conn.execute(text(
            "SELECT table_name, column_name, column_default FROM information_schema.columns "
            "WHERE table_schema = :s ORDER BY table_name, ordinal_position"), {"s": schema}):
        cols.setdefault(table, []).append((column, default))
    out = []
    for table, cs in cols.items():
        names = [c for c, _ in cs]
        key = "trial_id" if "trial_id" in names else "run_id" if table.startswith("lb_") and "run_id" in names else None
        if key is None:
            continue
        serial = next((c for c, d in cs if d and d.startswith("nextval") and c != key), None)
        out.append((table, names, key, serial))
    # Parents first: trials, then what refers to them.
    out.sort(key=lambda t: (t[0] != "trials", t[0] != "lb_runs", t[0]))
    return out


def _open_templates(store, study: str) -> list[int]:
    from largebatch.scaling_rules import recommend

    ids = []
    for i in range(TEMPLATES):
        batch = (4096, 8192, 16384, 32768)[i % 4]
        recipe = recommend({**BERT_32K, "target": {"batch_size": batch}})
        if i >= 4:
            for s in recipe.stages:
                s.peak_lr *= 8
            recipe.optimizer.lr = recipe.stages[0].peak_lr
        run, _ = store.create_run(NAMESPACE, study, recipe, environment={"gpus": 8})
        store.report_batch(run.id, [(10, 7.5, 1.0, 2000.0 + 100 * i)])  # a report with a measured noise scale
        if i >= 4:
            store.complete_run(run.id, "diverged", reason="loss exploded", step=10)
        else:
            store.complete_run(run.id, "completed", metric=1.6 + 0.01 * i)
        ids.append(run.id)
    return ids


def bulk_load(engine, schema: str, store, study: str, total: int) -> float:
    """Copy the study's template runs until it holds ``total``; returns the seconds it took."""
    from sqlalchemy import text

    t0 = time.perf_counter()
    templates = _open_templates(store, study)
    copies = max(0, total // len(templates) - 1)
    with engine.begin() as conn:
        conn.execute(text(f'SET LOCAL search_path TO "{schema}"'))
        top = conn.execute(text("SELECT max(trial_id) FROM trials")).scalar_one()
        numbers = conn.execute(text("SELECT max(number) + 1 FROM trials WHERE study_id = "
                                    "(SELECT study_id FROM trials WHERE trial_id = :t)"), {"t": templates[0]}).scalar_one()
        n = len(templates)
        # Copy g of template k (its position in the list) gets id top + g * n + k + 1, number numbers + ...
        conn.execute(text("CREATE TEMP TABLE lb_tpl (tid integer, k integer) ON COMMIT DROP"))
        conn.execute(text("INSERT INTO lb_tpl VALUES " + ",".join(f"({t},{k})" for k, t in enumerate(templates))))
        for table, names, key, serial in _table_rows(conn, schema):
            cols = [c for c in names if c != serial]
            exprs = []
            for c in cols:
                if c == key:
                    exprs.append(f":top + g * {n} + p.k + 1")
                elif c == "number":
                    exprs.append(f":numbers + g * {n} + p.k")
                else:
                    exprs.append(f"x.{c}")
            conn.execute(text(
                f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM {table} x "
                f"JOIN lb_tpl p ON x.{key} = p.tid CROSS JOIN generate_series(0, :copies - 1) g"),
                {"top": top, "numbers": numbers, "copies": copies})
        conn.execute(text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                          "(SELECT max(trial_id) FROM trials))"))
        conn.execute(text("UPDATE lb_studies SET n_runs = (SELECT count(*) FROM lb_runs r "
                          "WHERE r.study_id = lb_studies.study_id)"))
    store.rebuild_summaries(NAMESPACE, study)
    with engine.begin() as conn:
        conn.execute(text(f'SET LOCAL search_path TO "{schema}"'))
        conn.execute(text("ANALYZE"))
    return time.perf_counter() - t0


def _small_study(store, study: str, runs: int) -> None:
    _open_templates(store, study)
    from largebatch.scaling_rules import recommend

    for i in range(runs - TEMPLATES):
        batch = (4096, 8192, 16384, 32768)[i % 4]
        recipe = recommend({**BERT_32K, "target": {"batch_size": batch}})
        run, _ = store.create_run(NAMESPACE, study, recipe)
        store.complete_run(run.id, "completed", metric=1.6 + 0.001 * i)


async def _latencies(app, body: bytes, n: int) -> list[float]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/recommendations", "raw_path": b"/v1/recommendations", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    message = {"type": "http.request", "body": body, "more_body": False}
    statuses = []

    async def receive():
        return message

    async def send(m):
        if m["type"] == "http.response.start":
            statuses.append(m["status"])

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await app(dict(scope), receive, send)
        out.append(time.perf_counter() - t0)
    if statuses[-1] != 200:
        raise RuntimeError(f"recommendation answered {statuses[-1]}")
    return out


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


def explain(engine, schema: str, store, study: str) -> list[str]:
    """EXPLAIN ANALYZE of every statement the evidence read runs on ``study``."""
    from sqlalchemy import event

    statements: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(store._db.engine, "before_cursor_execute", grab)  # type: ignore[attr-defined]
    try:
        store.read_evidence(NAMESPACE, study)
    finally:
        event.remove(store._db.engine, "before_cursor_execute", grab)  # type: ignore[attr-defined]
    lines = []
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(f'SET search_path TO "{schema}"')
        for statement, params in statements:
            cur.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + statement, params)
            plan = [r[0] for r in cur.fetchall()]
            lines.append(" ".join(statement.split())[:160])
            lines += ["    " + p for p in plan]
    finally:
        raw.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument("--runs", type=int, default=1_000_000, help="runs in the big study")
    p.add_argument("--small", type=int, default=100, help="runs in the small study")
    p.add_argument("--requests", type=int, default=300, help="requests per study and mode, in rounds")
    p.add_argument("--quick", action="store_true", help="100 requests per study and mode")
    p.add_argument("--readme", action="store_true", help="print the README table")
    p.add_argument("--no-explain", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = 100
    if not (TEMPLATES * 2 <= args.runs <= 5_000_000 and TEMPLATES <= args.small <= 10_000):
        p.error(f"--runs in {TEMPLATES * 2}..5,000,000, --small in {TEMPLATES}..10,000")

    from sqlalchemy import create_engine, text

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings
    from largebatch.service.storage import open_store

    schema = f"lb_pgscale_{os.getpid()}"
    admin = create_engine(args.url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in args.url else "?"
    url = f"{args.url}{sep}options={quote(f'-csearch_path={schema}')}"
    try:
        with open_store(url) as store:
            for name in ("small", "big"):
                store.create_study(NAMESPACE, name, model_family="transformer", model_params=340_000_000)
            _small_study(store, "small", args.small)
            loaded = bulk_load(admin, schema, store, "big", args.runs)
            with admin.connect() as conn:
                counts = dict(conn.execute(text(
                    f'SELECT s.name, count(*) FROM "{schema}".lb_runs r JOIN "{schema}".lb_studies s '
                    "USING (study_id) GROUP BY s.name")).all())
                size = conn.execute(text(
                    "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r'"),
                    {"s": schema}).scalar_one()
            print(f"loaded: {counts} runs in {loaded:.1f} s ({size} in the schema)", flush=True)
            if not args.no_explain:
                print("\nEXPLAIN ANALYZE of the evidence read, big study:")
                for line in explain(admin, schema, store, "big"):
                    print("  " + line)

        apps = {}
        for mode, fresh in (("read every request", 0.0), ("default settings", None)):
            kw = {} if fresh is None else {"evidence_fresh_s": fresh}
            app = create_app(Settings(store_url=url, open_mode=True, open_namespace=NAMESPACE, **kw))
            app.state.store_holder.open()
            apps[mode] = app
        bodies = {name: json.dumps({**BERT_32K, "study": name}).encode() for name in ("small", "big")}
        lat: dict[tuple[str, str], list[float]] = {}
        read: dict[str, list[float]] = {}

        async def measure() -> None:
            for app in apps.values():  # warm: fits, key paths, the pool
                for body in bodies.values():
                    await _latencies(app, body, 5)
            rounds = 10
            for _ in range(rounds):
                for mode, app in apps.items():
                    for name, body in bodies.items():
                        lat.setdefault((mode, name), []).extend(await _latencies(app, body, args.requests // rounds))

        asyncio.run(measure())
        store = apps["read every request"].state.store_holder.get()
        for _ in range(10):
            for name in bodies:
                v = store.read_evidence(NAMESPACE, name)
                t0 = time.perf_counter()
                for _ in range(5):
                    store.read_evidence(NAMESPACE, name, known_version=v.version)
                read.setdefault(name, []).append((time.perf_counter() - t0) / 5)
        for app in apps.values():
            app.state.store_holder.close()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    big = f"{args.runs:,}"
    rows = []
    for mode in apps:
        s, b = lat[(mode, "small")], lat[(mode, "big")]
        rows.append((f"recommendation, {mode}", s, b))
    print(f"\nPostgreSQL, in-process, {args.requests} requests per cell in 10 rounds (studies in turns)\n")
    table = [f"| | {args.small} runs p50 / p99 | {big} runs p50 / p99 | ratio (p50) |", "|---|---:|---:|---:|"]
    for label, s, b in rows:
        table.append(f"| {label} | {_pct(s, .5):.2f} / {_pct(s, .99):.2f} ms | {_pct(b, .5):.2f} / {_pct(b, .99):.2f} ms "
                     f"| {statistics.median(b) / statistics.median(s):.2f}x |")
    rs, rb = statistics.median(read["small"]), statistics.median(read["big"])
    table.append(f"| evidence read alone (one transaction, fit cached) | {rs * 1000:.2f} ms | {rb * 1000:.2f} ms "
                 f"| {rb / rs:.2f}x |")
    print("\n".join(table))
    s, b = lat[("read every request", "small")], lat[("read every request", "big")]
    ratio = statistics.median(b) / statistics.median(s)
    ok = ratio <= 2 and _pct(b, .99) < 20
    print(f"\n{big} runs / {args.small} runs: {ratio:.2f}x (goal <= 2x), p99 {_pct(b, .99):.2f} ms (goal < 20 ms), "
          f"reading the store on every request: {'MET' if ok else 'NOT MET'}")
    if args.readme:
        print("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
