"""Worker processes for the multi-process tests.

They run in children forked from the test process (so they start in milliseconds, with
everything imported), each opening its own store, as uvicorn workers or training jobs would.
Results and acknowledgements go back through a multiprocessing pipe.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from largebatch.service.storage import initialize_schema, open_store

from .helpers import make_recipe

BATCH_SIZES = (1024, 2048, 4096, 8192)


def hammer(url: str, worker: int, n: int, conn: Any) -> None:
    """Create, report and complete ``n`` runs, calling every operation twice (a client retrying
    after a lost response). Sends ``{"ids", "errors", "seconds"}``."""
    store = open_store(url, initialize=False)
    errors: list[str] = []
    ids: list[int] = []
    start = time.perf_counter()
    for i in range(n):
        try:
            bs = BATCH_SIZES[i % len(BATCH_SIZES)]
            recipe = make_recipe(batch_size=bs, lr=1e-3 * (1 + (i % 5)))
            key = f"w{worker}-r{i}"
            run, created = store.create_run("ns", "conc", recipe, client_key=key)
            again, created_again = store.create_run("ns", "conc", recipe, client_key=key)
            if not created or created_again or again.id != run.id:
                errors.append(f"idempotency broken for {key}: {run.id} {again.id} {created} {created_again}")
            store.report(run.id, 10, 2.0, grad_norm=1.0)
            store.report(run.id, 10, 2.0, grad_norm=1.0)
            metric = 1.0 + ((worker * n + i) % 97) / 100
            done = store.complete_run(run.id, "completed", metric=metric)
            done_again = store.complete_run(run.id, "completed", metric=metric)
            if done != done_again or done.state != "completed":
                errors.append(f"complete not idempotent for {run.id}")
            ids.append(run.id)
        except Exception as e:  # every error reaching the caller is a failure of the test
            errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    store.close()
    conn.send({"worker": worker, "ids": ids, "errors": errors, "seconds": time.perf_counter() - start})


def init(url: str, worker: int, barrier: Any, conn: Any) -> None:
    """Initialise the schema at the same instant as the other workers, then use it."""
    try:
        barrier.wait(timeout=60)
        versions = initialize_schema(url)
        store = open_store(url, initialize=False)
        store.create_study("ns", f"p{worker}", model_family="transformer", model_params=1000)
        run, _ = store.create_run("ns", f"p{worker}", make_recipe())
        store.complete_run(run.id, "completed", metric=1.0)
        store.close()
        conn.send({"worker": worker, "versions": versions, "error": None})
    except Exception as e:
        conn.send({"worker": worker, "error": f"{type(e).__name__}: {e}"})


def writer(url: str, start: int, conn: Any) -> None:
    """Create/report/complete runs until killed; send ``(run_id, what)`` after each
    acknowledged write."""
    store = open_store(url, initialize=False)
    conn.send("READY")
    i = start
    while True:
        run, _ = store.create_run("ns", "dur", make_recipe(batch_size=BATCH_SIZES[i % 4]), client_key=f"k{i}")
        conn.send((run.id, "created"))
        store.report(run.id, 5, 3.0)
        conn.send((run.id, "reported"))
        if i % 3 == 2:
            store.complete_run(run.id, "diverged", step=5, reason="nan")
            conn.send((run.id, "diverged"))
        else:
            store.complete_run(run.id, "completed", metric=float(i % 7))
            conn.send((run.id, "completed"))
        i += 1
