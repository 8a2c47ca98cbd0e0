"""``read_evidence``: one transaction with everything a recommendation reads, and a version that changes
exactly when the study's evidence may have."""

from __future__ import annotations

import pytest

from largebatch.service.storage.base import NotFound

from .test_conformance import _run, _study


def test_the_version_moves_when_a_run_opens_or_finishes_and_only_then(store):
    _study(store)
    first = store.read_evidence("team", "bert")
    assert first.runs == [] and first.history == [] and first.noise_scale is None
    assert first.study.name == "bert"
    run = _run(store, batch_size=1024, lr=1e-3)
    opened = store.read_evidence("team", "bert", known_version=first.version)
    assert opened.version != first.version and opened.runs == []
    store.report(run.id, 1, 2.0, noise_scale=300.0)
    same = store.read_evidence("team", "bert", known_version=opened.version)
    assert same.version == opened.version and same.runs is None and same.noise_scale == 300.0
    store.complete_run(run.id, "completed", metric=1.5)
    done = store.read_evidence("team", "bert", known_version=opened.version)
    assert done.version != opened.version
    assert [(r.run_id, r.outcome, r.metric) for r in done.runs] == [(run.id, "completed", 1.5)]
    assert [h.batch_size for h in done.history] == [1024]
    assert done.runs == store.evidence("team", "bert")
    with pytest.raises(NotFound):
        store.read_evidence("team", "nope")


def test_the_family_is_read_and_versioned_too(store):
    _study(store, model_params=100_000_000)
    _study(store, "sib", model_params=150_000_000)
    band = ("transformer", 50_000_000, 200_000_000)
    before = store.read_evidence("team", "bert", family_band=band)
    sib = _run(store, "sib", batch_size=2048, lr=2e-3)
    store.complete_run(sib.id, "diverged")
    after = store.read_evidence("team", "bert", family_band=band, known_version=before.version)
    assert after.version != before.version
    assert [r.run_id for r in after.runs] == [sib.id]
    assert [h.batch_size for h in after.family_history] == [2048]
    assert store.read_evidence("team", "bert").runs == []  # without the band, the study's own runs only
