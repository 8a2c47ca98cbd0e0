"""What a recommendation reads of a study stays bounded at any study size, and a re-read that gives the
engine the same inputs keeps the answers memoised for the read before it."""

from __future__ import annotations

from largebatch.service.recipes import EvidenceCache, gather_history
from largebatch.service.storage.evidence import NOISE_RUNS

from .test_conformance import _run, _study

REQUEST = {"model": {"params": 110_000_000}, "reference": {"batch_size": 512, "lr": 1e-3, "steps": 10_000},
           "target": {"batch_size": 4096}}


def test_the_noise_scale_is_the_median_of_the_newest_runs_only(store):
    _study(store)
    runs = [_run(store, batch_size=1024, lr=1e-3) for _ in range(NOISE_RUNS + 3)]
    for old in runs[:3]:  # older than the newest NOISE_RUNS: not read
        store.report(old.id, 1, 2.0, noise_scale=9000.0)
    store.report(runs[-1].id, 1, 2.0, noise_scale=300.0)
    assert store.read_evidence("team", "bert").noise_scale == 300.0
    store.report(runs[3].id, 1, 2.0, noise_scale=100.0)  # the oldest of the newest NOISE_RUNS
    assert store.read_evidence("team", "bert").noise_scale == 200.0


def test_a_reread_with_the_same_inputs_keeps_its_serial_and_a_changed_one_does_not(store):
    from largebatch.scaling_rules.wire import RecommendationIn

    _study(store)
    request = RecommendationIn.model_validate(REQUEST)
    done = _run(store, batch_size=1024, lr=1e-3)
    store.complete_run(done.id, "completed", metric=1.5)
    running = _run(store, batch_size=2048, lr=2e-3)
    cache = EvidenceCache(fresh_s=0.0)  # the store is read on every call

    def serial() -> int | None:
        return gather_history(store, "team", "bert", request, cache=cache).serial

    first = serial()
    assert first is not None and serial() == first  # read again, nothing changed: the same answers hold
    store.report(running.id, 1, 2.0, noise_scale=500.0)  # the engine's noise scale moves: a new serial
    measured = serial()
    assert measured != first and serial() == measured
    store.complete_run(running.id, "completed", metric=1.4)  # new evidence: a new serial
    assert serial() not in (first, measured)
