"""Property: the incrementally maintained summary equals a brute-force recomputation from the
runs, and equals a rebuild from Optuna's data, for any sequence of runs and outcomes."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from largebatch.scaling_rules.optimizers import units_of

from .helpers import make_recipe

BATCHES = (256, 1024, 4096)
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
METRICS = (0.5, 1.0, 1.5)
OUTCOMES = ("running", "completed", "diverged", "failed", "pruned", "preempted", "swept", "swept_then_completed")

run_plan = st.tuples(st.sampled_from(BATCHES), st.sampled_from(LRS), st.sampled_from(OUTCOMES),
                     st.sampled_from(METRICS))
_names = itertools.count()


def _expected(plan, direction):
    out = {}
    for bs, lr, outcome, metric in plan:
        final = {"swept_then_completed": "completed", "swept": "preempted"}.get(outcome, outcome)
        h = out.setdefault(bs, {"batch_size": bs, "n_runs": 0, "completed": [], "diverged": []})
        h["n_runs"] += 1
        if final == "completed":
            h["completed"].append((lr, metric))
        elif final == "diverged":
            h["diverged"].append(lr)
    result = []
    for bs in sorted(out):
        h = out[bs]
        sign = 1 if direction == "minimize" else -1
        best = min(h["completed"], key=lambda c: (sign * c[1], c[0]), default=(None, None))
        result.append({
            "batch_size": bs, "n_runs": h["n_runs"], "n_completed": len(h["completed"]),
            "n_diverged": len(h["diverged"]), "best_lr": best[0], "best_metric": best[1],
            "min_diverged_lr": min(h["diverged"], default=None),
            "max_stable_lr": max((c[0] for c in h["completed"]), default=None),
            "units": units_of("lamb"),  # make_recipe's optimizer
        })
    return result


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(run_plan, min_size=0, max_size=14), direction=st.sampled_from(["minimize", "maximize"]))
def test_summary_matches_brute_force_and_rebuild(store, plan, direction):
    name = f"p{next(_names)}"
    store.create_study("prop", name, model_family="transformer", model_params=1000, direction=direction)
    swept = []
    for i, (bs, lr, outcome, metric) in enumerate(plan):
        run, _ = store.create_run("prop", name, make_recipe(batch_size=bs, lr=lr), client_key=str(i),
                                  lease_seconds=1e6 if outcome not in ("swept", "swept_then_completed") else 1)
        if outcome in ("running",):
            continue
        if outcome in ("swept", "swept_then_completed"):
            swept.append((run.id, outcome, metric))
            continue
        store.complete_run(run.id, outcome, metric=metric if outcome in ("completed", "pruned") else None)
    if swept:
        store.expire_leases(now=datetime.now(timezone.utc) + timedelta(seconds=30))
        for run_id, outcome, metric in swept:
            assert store.get_run(run_id).state == "preempted"
            if outcome == "swept_then_completed":
                store.complete_run(run_id, "completed", metric=metric)
    got = [h.model_dump() for h in store.history("prop", name)]
    assert got == _expected(plan, direction)
    store.rebuild_summaries("prop", name)
    assert [h.model_dump() for h in store.history("prop", name)] == got
