"""Shared test helpers (importable from worker processes too)."""

from __future__ import annotations

from largebatch.scaling_rules.models import Recipe


def make_recipe(batch_size: int = 4096, lr: float = 1e-3, optimizer: str = "lamb", steps: int = 1000,
                warmup: float = 0.1, const: float = 0.0, note: str = "") -> Recipe:
    warmup_steps = round(steps * warmup)
    const_steps = round(steps * const)
    return Recipe.model_validate({
        "optimizer": {"name": optimizer, "lr": lr},
        "stages": [{
            "batch_size": batch_size, "steps": steps, "peak_lr": lr,
            "warmup_steps": warmup_steps, "const_steps": const_steps,
            "decay_steps": steps - warmup_steps - const_steps,
            "warmup_ratio": warmup, "const_ratio": const,
        }],
        "total_steps": steps,
        "rationale": [note] if note else [],
    })


def assert_consistent(store, namespace: str, study: str) -> int:
    """Check that our tables and Optuna's agree for one study; return its number of runs.

    Every run row has its trial (same number, matching state), every trial has its run row,
    numbers are 0..n-1 without gaps or duplicates, the study's counter matches, and the summary
    table equals a rebuild from Optuna's data.
    """
    from sqlalchemy import text

    expected_state = {"running": "RUNNING", "completed": "COMPLETE", "pruned": "PRUNED",
                      "diverged": "FAIL", "failed": "FAIL", "preempted": "FAIL"}
    with store.engine.connect() as conn:
        sid = conn.execute(text("SELECT study_id FROM lb_studies WHERE namespace=:n AND name=:s"),
                           {"n": namespace, "s": study}).scalar_one()
        runs = {r.run_id: r for r in conn.execute(
            text("SELECT run_id, number, state FROM lb_runs WHERE study_id=:i"), {"i": sid})}
        trials = {t.trial_id: t for t in conn.execute(
            text("SELECT trial_id, number, state FROM trials WHERE study_id=:i"), {"i": sid})}
        n_runs = conn.execute(text("SELECT n_runs FROM lb_studies WHERE study_id=:i"), {"i": sid}).scalar_one()
        values = dict(conn.execute(text(
            "SELECT v.trial_id, v.value FROM trial_values v JOIN trials t ON t.trial_id = v.trial_id "
            "WHERE t.study_id=:i"), {"i": sid}).all())
        metrics = dict(conn.execute(text("SELECT run_id, metric FROM lb_runs WHERE study_id=:i AND state='completed'"),
                                    {"i": sid}).all())
    assert set(runs) == set(trials), "run rows and trials differ"
    assert sorted(r.number for r in runs.values()) == list(range(len(runs))), "trial numbers not 0..n-1"
    assert n_runs == len(runs)
    for rid, r in runs.items():
        assert trials[rid].number == r.number
        assert trials[rid].state == expected_state[r.state], (rid, r.state, trials[rid].state)
    for rid, metric in metrics.items():
        assert values[rid] == metric
    before = store.history(namespace, study)
    store.rebuild_summaries(namespace, study)
    assert store.history(namespace, study) == before, "incremental summary differs from a rebuild"
    assert sum(h.n_runs for h in before) == len(runs)
    return len(runs)
