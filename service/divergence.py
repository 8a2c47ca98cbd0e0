"""When a running job should stop: the ``should_stop`` rule of ``POST /v1/runs/{id}/reports``.

A run has diverged when

1. a reported loss (or gradient norm) is NaN or infinite; or
2. a loss exceeds ``factor`` (default 3) times the run's own *early loss*: the median of the losses
   of its first ``window`` (default 5) reports by step.

Why against the run's own early loss: the early loss is close to the loss at initialisation (for
language models about ln(vocabulary), ~10.4 for BERT's 30K WordPiece vocabulary), and a training run
that is still learning does not climb back above where it started; loss spikes of healthy LAMB/LANS
runs stay well inside that (the LANS paper's point is that an LR above ~1/L makes the loss blow up,
not wobble). Divergence from too large an LR is fast and one-directional: the loss goes up by orders
of magnitude, or to NaN, within a few steps. A factor of 3 therefore costs at most a few steps of
detection delay and gives no false alarms on noisy curves; it needs no knowledge of the model or
dataset, only the run's own numbers. The median of several reports (not the first one alone) keeps
one odd early value from setting the bar. Non-positive early losses (objectives that are not a
cross-entropy) switch rule 2 off; rule 1 always applies.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from largebatch.service.lru import Lru
from largebatch.service.storage.base import Conflict, RunRecord, StudyStore
from largebatch.service.storage.records import noise_point

__all__ = ["DivergenceRule", "Verdict", "record_reports"]


@dataclass(frozen=True)
class Verdict:
    should_stop: bool
    reason: str | None = None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


class DivergenceRule:
    """The rule plus a bounded per-process cache of each run's early loss (it never changes once known)."""

    def __init__(self, factor: float = 3.0, window: int = 5, max_runs: int = 50_000):
        if not factor > 1 or not math.isfinite(factor):
            raise ValueError("factor must be a finite number > 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.factor = factor
        self.window = window
        self.max_runs = max_runs
        self._early: Lru[int, float] = Lru(max_runs)
        self._seen: Lru[int, int] = Lru(max_runs)  # reports this process received, per run

    def note_reports(self, run_id: int, n: int) -> bool:
        """Count ``n`` reports received here; True once the run may have ``window`` reports in all.

        Lets the caller read the run's reports from the store once, not on every early report. Reports
        spread over several replicas only delay this (each counts its own), never make it wrong: the
        early loss itself always comes from the store's full list.
        """
        return self._seen.update(run_id, lambda count: (count or 0) + n) >= self.window

    def early_loss(self, run_id: int) -> float | None:
        return self._early.get(run_id)

    def learn(self, run_id: int, losses_by_step: Iterable[tuple[int, float]]) -> float | None:
        """Work out the early loss from the run's reports, once ``window`` finite ones exist."""
        known = self.early_loss(run_id)
        if known is not None:
            return known
        first = [loss for _, loss in sorted(losses_by_step) if math.isfinite(loss)][: self.window]
        if len(first) < self.window:
            return None
        value = statistics.median(first)
        self._early.put(run_id, value)
        return value

    def judge(self, step: int, loss: float, grad_norm: float | None, early: float | None) -> Verdict:
        if not math.isfinite(loss):
            return Verdict(True, f"loss is {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            return Verdict(True, f"gradient norm is {grad_norm} at step {step}")
        if early is not None and early > 0 and loss > self.factor * early:
            return Verdict(True, f"loss {_fmt(loss)} at step {step} exploded: above {_fmt(self.factor)} x the "
                                 f"run's early loss {_fmt(early)} (median of its first {self.window} reports)")
        return Verdict(False)

    def forget(self, run_id: int) -> None:
        self._early.pop(run_id)
        self._seen.pop(run_id)


class _Report(Protocol):
    step: int
    loss: float
    grad_norm: float | None
    noise_scale: float | None


# The early loss is the median of a run's first few reports by step: these are read, never the whole run.
_EARLY_READ = 64


def record_reports(store: StudyStore, rule: DivergenceRule, run: RunRecord, reports: Sequence[_Report], *,
                   on_revived: Callable[[], None] = lambda: None,
                   on_diverged: Callable[[], None] = lambda: None) -> RunRecord:
    """Store ``reports`` of ``run`` in step order, in one transaction, judging each first; the first that
    diverges records the run ``diverged`` (its step and reason) and the rest are not stored. Returns the
    run as it is then (``running``, ``diverged``, or whatever the run became meanwhile).

    ``on_revived`` is called when the reports revived a run the lease sweeper had preempted,
    ``on_diverged`` when this call recorded the divergence.
    """
    early = rule.early_loss(run.id)
    kept: list[_Report] = []
    stored_first: dict[int, float] | None = None
    verdict = Verdict(False)
    for r in sorted(reports, key=lambda r: r.step):
        kept.append(r)
        if early is None and rule.note_reports(run.id, 1) and math.isfinite(r.loss):
            if stored_first is None:
                stored_first = {p.step: p.loss for p in store.reports(run.id, limit=_EARLY_READ)}
            early = rule.learn(run.id, {**stored_first, **{k.step: k.loss for k in kept}}.items())
        verdict = rule.judge(r.step, r.loss, r.grad_norm, early)
        if verdict.should_stop:
            break
    try:
        before = run.state
        run = store.report_batch(run.id, [(r.step, r.loss, r.grad_norm, getattr(r, "noise_scale", None),
                                           noise_point(r)) for r in kept])
        if before == "preempted":  # the store call succeeded, so the run is running again
            on_revived()
    except Conflict:
        return store.get_run(run.id)
    if verdict.should_stop:
        try:
            run = store.complete_run(run.id, "diverged", step=kept[-1].step, reason=verdict.reason)
            on_diverged()
            rule.forget(run.id)
        except Conflict:  # finished meanwhile (by its job, or by another replica)
            run = store.get_run(run.id)
    return run
