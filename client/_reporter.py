"""The background thread of a :class:`~largebatch.client.Job`: batches reports, delivers them,
sends heartbeats.

A report leaves the buffer only once the service has acknowledged it; until then the thread retries
by the client's retry policy (:func:`~largebatch.client._base.is_transient`,
:func:`~largebatch.client._base.retry_delay`), for as long as it takes, so a service that is down for
a while (restarted, network partition) loses nothing. The service is idempotent per step, so a batch
resent after a lost response duplicates nothing. A report is sent at most ``flush_interval`` seconds
after the first unsent one arrived, whatever the heartbeat interval: the service's divergence stop
(``should_stop``) answers reports, so it must not wait for a heartbeat.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, NamedTuple, Protocol

from largebatch.scaling_rules.wire import MAX_REPORT_BATCH, ReportIn, Run

from . import errors
from ._base import RunChannel, is_transient, retry_delay

__all__ = ["NoisePoint", "Reporter", "ReporterOwner", "detached", "noise_point", "report_point", "seen"]

log = logging.getLogger("largebatch.client")


class ReporterOwner(Protocol):
    """What the reporter needs of its job (a :class:`~largebatch.client.Job`)."""

    run: Run | None
    _client: RunChannel

    def _ensure_run(self) -> int: ...

    def _note_run(self, run: Run, should_stop: bool, reason: str | None) -> None: ...

    def _note_nonfinite(self, step: int) -> None: ...

    def _note_refused(self, e: errors.APIError) -> None: ...


def detached(value: Any) -> Any:
    """A tensor without its autograd graph: a pending report (kept while the service is down) must
    not keep the step's activations alive. No device sync."""
    detach = getattr(value, "detach", None)
    return detach() if callable(detach) else value


def _noise(value: Any) -> float | None:
    # An estimate that is not yet meaningful (its early EMAs can make it negative or inf) is left
    # out of the report, not the report dropped.
    try:
        v = _to_float(value)
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


class NoisePoint(NamedTuple):
    """Where a report's noise scale sits on the run's trajectory, and the estimator's components
    behind it (numbers, or device tensors converted by the background thread)."""

    examples_seen: float
    tokens_seen: float | None = None
    grad_sq: Any = None
    trace_sigma: Any = None


def seen(stages: Any, step: int) -> tuple[float, float | None]:
    """Examples (sequences) and tokens trained on up to and including ``step`` of a recipe's stages
    (tokens None when a stage has no ``seq_len``); steps past the last stage continue at its batch."""
    examples, tokens, left = 0.0, 0.0, step + 1
    for i, s in enumerate(stages):
        n = left if i == len(stages) - 1 else min(left, s.steps)
        examples += n * s.batch_size
        tokens = None if tokens is None or s.seq_len is None else tokens + n * s.batch_size * s.seq_len
        left -= n
        if left <= 0:
            break
    return examples, tokens


def noise_point(noise: Any, stages: Any, step: int) -> NoisePoint:
    """The trajectory point of a noise scale reported at ``step``, with the components of ``noise`` (the
    job's :class:`~largebatch.client.optim.GradientNoiseScale`, when the value is its estimate). Its
    smoothed sums are read as device tensors, without a host sync (the training loop must not wait for
    the device): the estimator replaces them at each update, so these stay this step's."""
    examples, tokens = seen(stages, step)
    if noise is None or not getattr(noise, "n_updates", 0):
        return NoisePoint(examples, tokens)
    weight = noise._weight  # bias correction of the EMA sums, as its grad_sq/trace_sigma apply it
    return NoisePoint(examples, tokens, noise._grad_sq / weight, noise._trace / weight)


def report_point(report: ReportIn) -> NoisePoint | None:
    """The trajectory point a report (a checkpoint's, resent) carries."""
    if report.examples_seen is None:
        return None
    return NoisePoint(report.examples_seen, report.tokens_seen, report.grad_sq, report.trace_sigma)


def _positive(value: Any) -> float | None:
    try:
        v = _to_float(value)
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) and v > 0 else None


def _report_in(step: int, item: tuple[Any, Any, Any, NoisePoint | None]) -> ReportIn:
    loss, grad_norm, noise_scale, point = item
    noise = _noise(noise_scale)
    fields: dict[str, Any] = {}
    if point is not None and noise is not None:  # a trajectory point is a noise scale where it was measured
        fields = {"examples_seen": float(point.examples_seen), "tokens_seen": point.tokens_seen}
        grad_sq, trace = _positive(point.grad_sq), _positive(point.trace_sigma)
        if grad_sq is not None and trace is not None:
            fields.update(grad_sq=grad_sq, trace_sigma=trace)
    return ReportIn(step=step, loss=_to_float(loss), grad_norm=_to_float(grad_norm), noise_scale=noise,
                    **{k: v for k, v in fields.items() if v is not None})


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):  # a torch/numpy scalar: converted here, off the training loop
        value = value.item()
    return float(value)


class Reporter:
    """The background thread: batches reports, delivers them, sends heartbeats. Never loses a
    report to a transient failure; drops one only when the service refuses it for good."""

    def __init__(self, job: ReporterOwner, *, flush_interval: float, max_batch: int, heartbeat_interval: float) -> None:
        self._job = job
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._heartbeat_interval = heartbeat_interval
        self._cond = threading.Condition()
        # step -> (loss, grad_norm, noise_scale, NoisePoint) as given (tensors converted in the thread); a step
        # reported again replaces the pending one, as the service would overwrite it.
        self._pending: dict[int, tuple[Any, Any, Any, NoisePoint | None]] = {}
        self._oldest: float | None = None  # when the oldest pending report arrived
        self._retry_at = 0.0  # no send before this (backoff)
        self._urgent = False  # flush() asked
        self._closing = False
        self._sending = False
        self._stopped = False  # the thread has exited
        self._abandon = threading.Event()
        self._failures = 0
        self.delivered = 0
        self.dropped = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"largebatch-reporter-{id(job):x}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training-thread side

    def put(self, step: int, loss: Any, grad_norm: Any, noise_scale: Any = None,
            point: NoisePoint | None = None) -> None:
        with self._cond:
            first = not self._pending
            if first:
                self._oldest = time.monotonic()
            self._pending.pop(step, None)
            self._pending[step] = (loss, grad_norm, noise_scale, point)
            # The thread sleeps until the next heartbeat when nothing is pending: the first report
            # must wake it so that it leaves within flush_interval (issue 15).
            if first or len(self._pending) >= self._max_batch:
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def pending_reports(self) -> list[ReportIn]:
        """The reports not yet acknowledged by the service (converted to numbers)."""
        with self._cond:
            items = list(self._pending.items())
        out = []
        for step, item in items:
            try:
                out.append(_report_in(step, item))
            except (ValueError, TypeError):
                continue
        return out

    def flush(self, timeout: float | None) -> bool:
        """Wait until every report so far is delivered (or dropped as refused). False on timeout."""
        with self._cond:
            self._urgent = True
            self._retry_at = 0.0  # one try now, whatever the backoff; failures back off again
            self._cond.notify_all()
            done = self._cond.wait_for(
                lambda: (not self._pending and not self._sending) or self._stopped, timeout=timeout)
            return done and not self._pending

    def close(self, timeout: float | None) -> bool:
        """Deliver what is pending (waiting at most ``timeout``), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join(5.0)
        with self._cond:
            return not self._pending

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        next_heartbeat = time.monotonic() + self._heartbeat_interval
        try:
            while True:
                batch = self._next_batch(next_heartbeat)
                if batch is None:
                    return
                if batch:
                    try:
                        self._send(batch)
                    except Exception as e:  # a bug, not the network: keep the reports, retry later
                        log.exception("largebatch: sending reports failed unexpectedly")
                        self._defer(e)
                    finally:
                        with self._cond:
                            self._sending = False
                            self._cond.notify_all()
                elif time.monotonic() >= next_heartbeat:
                    ok = self._heartbeat()
                    next_heartbeat = time.monotonic() + (self._heartbeat_interval if ok
                                                         else min(self._heartbeat_interval, 10.0))
        except BaseException as e:  # never expected; say so rather than die silently
            log.exception("largebatch: the reporter thread stopped: %s", e)
            self.last_error = e
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _next_batch(self, next_heartbeat: float) -> list[tuple[int, tuple[Any, Any, Any, NoisePoint | None]]] | None:
        """Wait for something to do: a batch to send ([] means: time for a heartbeat), None: stop."""
        with self._cond:
            while not self._abandon.is_set():
                now = time.monotonic()
                if self._closing and not self._pending:
                    return None
                send_at = math.inf
                if self._pending:
                    urgent = self._urgent or self._closing or len(self._pending) >= self._max_batch
                    due_at = now if urgent else (self._oldest or now) + self._flush_interval
                    send_at = max(due_at, self._retry_at)
                    if now >= send_at:
                        self._sending = True
                        return list(self._pending.items())[: min(self._max_batch, MAX_REPORT_BATCH)]  # the service's limit
                heartbeat_at = math.inf if self._closing else next_heartbeat
                if now >= heartbeat_at:
                    return []
                self._cond.wait(timeout=min(send_at, heartbeat_at) - now)
            return None

    def _convert(self, batch: list[tuple[int, tuple[Any, Any, Any, NoisePoint | None]]]) -> tuple[list[ReportIn], list[int]]:
        reports, bad = [], []
        for step, item in batch:
            try:
                r = _report_in(step, item)
            except (ValueError, TypeError) as e:
                log.warning("largebatch: report of step %d dropped: %s", step, e)
                bad.append(step)
                continue
            if not math.isfinite(r.loss) or (r.grad_norm is not None and not math.isfinite(r.grad_norm)):
                self._job._note_nonfinite(step)
            reports.append(r)
        return reports, bad

    def _settle(self, batch: list[tuple[int, tuple[Any, Any, Any, NoisePoint | None]]]) -> None:
        """Remove what was sent from the buffer, unless a step was re-reported meanwhile."""
        with self._cond:
            for step, item in batch:
                if self._pending.get(step) is item:
                    del self._pending[step]
            if not self._pending:
                self._urgent = False
                self._oldest = None
            else:
                self._oldest = time.monotonic()

    def _send(self, batch: list[tuple[int, tuple[Any, Any, Any, NoisePoint | None]]]) -> None:
        job = self._job
        reports, bad = self._convert(batch)
        if bad:  # not numbers: they can never be sent, so they leave the buffer now
            self.dropped += len(bad)
            bad_steps = set(bad)
            self._settle([item for item in batch if item[0] in bad_steps])
        try:
            run_id = job._ensure_run()
            out = job._client.report_batch(run_id, reports) if reports else None
        except errors.APIError as e:
            self.last_error = e
            if is_transient(e):
                self._defer(e)
                return
            # Refused for good (the run is finished, the key was revoked, ...): retrying cannot help.
            log.error("largebatch: the service refused %d report(s): %s", len(reports), e)
            self.dropped += len(reports)
            job._note_refused(e)
            self._settle(batch)
            self._failures = 0
            return
        if self._failures:
            log.warning("largebatch: service reachable again; reports delivered")
        self._failures = 0
        self.delivered += len(reports)
        if out is not None:
            job._note_run(out.run, out.should_stop, out.reason)
        self._settle(batch)

    def _defer(self, e: BaseException) -> None:
        """Keep the reports; try again after a backoff."""
        self.last_error = e
        self._failures += 1
        delay = retry_delay(self._failures - 1, _retry_after(e))
        if self._failures in (1, 5) or self._failures % 20 == 0:
            log.warning("largebatch: %d report(s) not delivered yet (%s); retrying in %.1fs", self.pending, e, delay)
        with self._cond:
            self._retry_at = time.monotonic() + delay

    def _heartbeat(self) -> bool:
        job = self._job
        if job.run is None:
            return False
        try:
            out = job._client.heartbeat(job.run.id)
        except errors.APIError as e:
            if not is_transient(e):
                job._note_refused(e)
            log.debug("largebatch: heartbeat failed: %s", e)
            return False
        job._note_run(out.run, out.should_stop, out.reason)
        return True


def _retry_after(e: BaseException) -> str | None:
    return e.retry_after if isinstance(e, errors.APIStatusError) else None
