"""A training job: the recipe, the optimizer and scheduler built for it, and its run on the service.

::

    job = client.autoconfigure(model, study="bert", reference={...}, target_batch_size=32768)
    with job:
        for step in range(job.recipe.total_steps):
            ...; job.optimizer.step(); job.scheduler.step()
            job.report(step, loss)
            if job.should_stop:
                break
        job.complete(eval_loss)

Reports never block the training loop: :meth:`Job.report` puts them in an in-memory buffer and a
background thread sends them in batches (``POST /v1/runs/{id}/reports`` with
``{"reports": [...]}``). A batch leaves the buffer only once the service has acknowledged it;
until then the thread retries with backoff, for as long as it takes, so a service that is down
for a while (restarted, network partition) loses nothing: the reports are delivered when it is
back. The service is idempotent per step, so a batch resent after a lost response duplicates
nothing. The same thread sends heartbeats so the run's lease never runs out while the job lives.

torch is never imported here at module level; :func:`autoconfigure` imports
``largebatch.client.optim`` (and so torch) when it is called.
"""

from __future__ import annotations

import atexit
import logging
import math
import platform
import random
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from largebatch.scaling_rules.models import Recipe, Reference
from largebatch.scaling_rules.wire import (
    FinalOutcome,
    RecommendationIn,
    RecommendationOut,
    ReportIn,
    Run,
    Study,
)

from . import errors
from ._version import __version__

if TYPE_CHECKING:
    from ._async_client import AsyncClient
    from ._client import Client

__all__ = ["Job", "autoconfigure", "autoconfigure_async", "build_request", "default_environment"]

log = logging.getLogger("largebatch.client")

T = TypeVar("T")

_REPORT_BACKOFF_START = 0.25  # seconds; doubles per failed try
_REPORT_BACKOFF_MAX = 10.0


def _backoff(failures: int, exc: BaseException | None = None) -> float:
    if isinstance(exc, errors.APIStatusError):
        after = exc.retry_after
        try:
            seconds = float(after) if after is not None else None
        except ValueError:
            seconds = None
        if seconds is not None and 0 <= seconds <= 60:
            return seconds
    base = min(_REPORT_BACKOFF_START * 2.0 ** max(failures - 1, 0), _REPORT_BACKOFF_MAX)
    return base * (1.0 - 0.5 * random.random())


def _transient(exc: BaseException) -> bool:
    """Worth trying again later: no response, or 408/429/5xx."""
    if isinstance(exc, errors.APIConnectionError):
        return True
    if isinstance(exc, errors.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    return False


def _detached(value: Any) -> Any:
    """A tensor without its autograd graph: a pending report (kept while the service is down) must
    not keep the step's activations alive. No device sync."""
    detach = getattr(value, "detach", None)
    return detach() if callable(detach) else value


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):  # a torch/numpy scalar: converted here, off the training loop
        value = value.item()
    return float(value)


class _Reporter:
    """The background thread: batches reports, delivers them, sends heartbeats. Never loses a
    report to a transient failure; drops one only when the service refuses it for good."""

    def __init__(self, job: Job, *, flush_interval: float, max_batch: int, heartbeat_interval: float) -> None:
        self._job = job
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._heartbeat_interval = heartbeat_interval
        self._cond = threading.Condition()
        # step -> (loss, grad_norm) as given (tensors converted in the thread); a step reported again
        # replaces the pending one, as the service would overwrite it.
        self._pending: dict[int, tuple[Any, Any]] = {}
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

    def put(self, step: int, loss: Any, grad_norm: Any) -> None:
        with self._cond:
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.pop(step, None)
            self._pending[step] = (loss, grad_norm)
            if len(self._pending) >= self._max_batch:
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
        for step, (loss, grad_norm) in items:
            try:
                out.append(ReportIn(step=step, loss=_to_float(loss), grad_norm=_to_float(grad_norm)))
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

    def _next_batch(self, next_heartbeat: float) -> list[tuple[int, tuple[Any, Any]]] | None:
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
                        return list(self._pending.items())[: self._max_batch]
                heartbeat_at = math.inf if self._closing else next_heartbeat
                if now >= heartbeat_at:
                    return []
                self._cond.wait(timeout=min(send_at, heartbeat_at) - now)
            return None

    def _convert(self, batch: list[tuple[int, tuple[Any, Any]]]) -> tuple[list[ReportIn], list[int]]:
        reports, bad = [], []
        for step, (loss, grad_norm) in batch:
            try:
                r = ReportIn(step=step, loss=_to_float(loss), grad_norm=_to_float(grad_norm))
            except (ValueError, TypeError) as e:
                log.warning("largebatch: report of step %d dropped: %s", step, e)
                bad.append(step)
                continue
            if not math.isfinite(r.loss) or (r.grad_norm is not None and not math.isfinite(r.grad_norm)):
                self._job._note_nonfinite(step)
            reports.append(r)
        return reports, bad

    def _settle(self, batch: list[tuple[int, tuple[Any, Any]]]) -> None:
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

    def _send(self, batch: list[tuple[int, tuple[Any, Any]]]) -> None:
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
            if _transient(e):
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
        delay = _backoff(self._failures, e)
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
            if not _transient(e):
                job._note_refused(e)
            log.debug("largebatch: heartbeat failed: %s", e)
            return False
        job._note_run(out.run, out.should_stop, out.reason)
        return True


def _close_at_exit(ref: weakref.ReferenceType[Job]) -> None:
    job = ref()
    if job is not None:
        job.close()


class Job:
    """One training run: ``optimizer``, ``scheduler``, ``recipe`` and ``run``, plus reporting.

    Use it as a context manager: leaving the block with an exception marks the run ``failed``
    (``diverged`` if a reported loss was NaN/Inf), a Ctrl-C included, after delivering every
    buffered report. Without one, the reports are still flushed when the interpreter exits.

    Args:
        client: A :class:`Client` (the job uses a copy that does not retry on its own: the
            background thread retries, indefinitely, instead).
        run: The run opened for this job (``None``: opened by the background thread from
            ``recipe`` as soon as the service answers; see ``offline_fallback``).
        recipe: The recipe being trained.
        optimizer, scheduler: What :func:`largebatch.client.optim.build` made for the recipe.
        flush_interval: Seconds a report may wait in the buffer before it is sent.
        max_batch: Most reports per request (also sent at once when this many are waiting).
        heartbeat_interval: Seconds between heartbeats (the service's lease is 10 minutes).
        close_timeout: How long closing (and interpreter exit) waits for undelivered reports.
        complete_timeout: How long :meth:`complete` keeps trying to reach the service.
    """

    def __init__(
        self,
        client: Client,
        run: Run | None,
        recipe: Recipe,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        study: str | None = None,
        study_info: Study | None = None,
        open_run: Callable[[Client], Run] | None = None,
        flush_interval: float = 1.0,
        max_batch: int = 1000,
        heartbeat_interval: float = 60.0,
        close_timeout: float = 60.0,
        complete_timeout: float = 300.0,
    ) -> None:
        if run is None and open_run is None:
            raise ValueError("a job needs its run, or open_run to open it")
        if not 1 <= max_batch <= 10_000:
            raise ValueError(f"max_batch must be in 1..10000, got {max_batch}")
        # The job's own connections: it outlives a `with Client(...)` block that created it. (An
        # injected http_client is the caller's to configure and keep open: it is shared.)
        if client._owns_http:
            self._client = type(client)(client.base_url, **{**client._options(), "max_retries": 0})
        else:
            self._client = client.with_options(max_retries=0)
        self.run = run
        self.recipe = recipe
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.study = study if study is not None else (run.study if run is not None else None)
        self._study_info = study_info
        self._open_run = open_run
        self.close_timeout = close_timeout
        self.complete_timeout = complete_timeout
        self.should_stop = False
        self.stop_reason: str | None = None
        self.diverged_step: int | None = None
        self.last_step: int | None = None
        self.refused: errors.APIStatusError | None = None  # the service refused reports for good
        self._final: Run | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._reporter = _Reporter(self, flush_interval=flush_interval, max_batch=max_batch,
                                   heartbeat_interval=heartbeat_interval)
        self._atexit = _make_exit_hook(self)
        atexit.register(self._atexit)

    def __repr__(self) -> str:
        run = f"run {self.run.id}" if self.run is not None else "run not opened yet"
        return f"<Job {run} in study {self.study!r}, {self.recipe.total_steps} steps, {self.pending} pending>"

    # ------------------------------------------------------------------ reporting

    def report(self, step: int, loss: Any, grad_norm: Any = None) -> None:
        """Record the loss (and gradient norm) at ``step``; returns at once.

        ``loss`` may be a float or a 0-d tensor: a tensor is converted to a number by the
        background thread, so the training loop does not wait for the device either.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._closed:
            raise errors.JobError("the job is closed: it takes no more reports")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            self._note_nonfinite(step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        self._reporter.put(step, _detached(loss), _detached(grad_norm))

    @property
    def pending(self) -> int:
        """Reports not yet acknowledged by the service."""
        return self._reporter.pending

    @property
    def delivered(self) -> int:
        """Reports the service has acknowledged."""
        return self._reporter.delivered

    def pending_reports(self) -> list[ReportIn]:
        return self._reporter.pending_reports()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every report so far is delivered; False if ``timeout`` ran out first."""
        return self._reporter.flush(timeout)

    @property
    def study_info(self) -> Study | None:
        """The study (its metric name and direction); fetched once, None if the service is unreachable."""
        if self._study_info is None and self.study is not None:
            try:
                self._study_info = self._client.with_options(max_retries=2).get_study(self.study)
            except errors.APIError as e:
                log.debug("largebatch: cannot fetch study %r: %s", self.study, e)
        return self._study_info

    @property
    def metric_name(self) -> str:
        """The study's metric (e.g. ``eval_loss``): what :meth:`complete` expects."""
        info = self.study_info
        return info.metric if info is not None else "eval_loss"

    def lr_at(self, step: int) -> float:
        """The recipe's LR at ``step`` (what the scheduler sets)."""
        from largebatch.scaling_rules.schedule import lr_at

        return lr_at(self.recipe, step)

    # ------------------------------------------------------------------ finishing

    def complete(self, metric: float | None = None, *, outcome: FinalOutcome = "completed",
                 reason: str | None = None, step: int | None = None, timeout: float | None = None) -> Run:
        """Deliver every report, then record the run's final outcome; returns the finished run.

        ``completed`` needs the final ``metric`` (the study's metric, e.g. eval loss). Keeps
        trying to reach the service for ``timeout`` seconds (default ``complete_timeout``).

        Raises:
            JobError: reports or the outcome could not be delivered in time (nothing is lost:
                call again), or the run already finished with another outcome.
        """
        if outcome == "completed":
            if metric is None:
                raise ValueError("complete() needs the final metric (or outcome='failed'/'diverged'/'pruned')")
            metric = float(metric)
            if not math.isfinite(metric):
                raise ValueError(f"the final metric must be finite, got {metric}: use outcome='diverged'")
        with self._lock:
            if self._final is not None:
                if self._final.state == outcome:
                    return self._final
                raise errors.JobError(f"run {self._final.id} already finished as {self._final.state}")
            deadline = time.monotonic() + (self.complete_timeout if timeout is None else timeout)
            if not self._reporter.flush(max(0.0, deadline - time.monotonic())):
                raise errors.JobError(
                    f"{self.pending} report(s) not delivered within the timeout ({self._reporter.last_error}); "
                    "they are kept: call complete() again")
            run_id = self._ensure_run_until(deadline)
            try:
                run = self._until(deadline, lambda c: c.complete_run(run_id, outcome=outcome, metric=metric,
                                                                     reason=reason, step=step))
            except errors.ConflictError as e:
                current = self._client.get_run(run_id)
                self._final = self.run = current
                self._shutdown()
                raise errors.JobError(f"run {run_id} is already {current.state}: {e.detail}") from e
            self._final = self.run = run
            self._shutdown()
            return run

    def fail(self, reason: str, *, step: int | None = None, timeout: float | None = None) -> Run:
        """Record that the job failed for a reason unrelated to the recipe (crash, bug, OOM)."""
        return self.complete(outcome="failed", reason=reason[:2000], step=step, timeout=timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Deliver the buffered reports (waiting at most ``timeout``, default ``close_timeout``) and
        stop the background thread, without recording an outcome. True if nothing was left over."""
        if self._closed:
            return self._reporter.pending == 0
        self._closed = True
        ok = self._reporter.close(self.close_timeout if timeout is None else timeout)
        if not ok:
            log.error("largebatch: %d report(s) of run %s could not be delivered (%s)", self.pending,
                      self.run.id if self.run else "?", self._reporter.last_error)
        self._release()
        return ok

    def _shutdown(self) -> None:
        self._closed = True
        self._reporter.close(5.0)
        self._release()

    def _release(self) -> None:
        # The job's client stays usable (complete() after close(), study_info); its idle
        # connections go with it when the job is garbage collected.
        atexit.unregister(self._atexit)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._end(exc_type, exc)

    def abort(self, exc: BaseException | None = None) -> None:
        """End the job without :meth:`complete`, as leaving the ``with`` block would: the run is
        recorded ``diverged`` (a non-finite loss was reported, or the service said so), else
        ``pruned`` (the service asked to stop), else ``failed`` (with ``exc`` as the reason).
        For framework hooks such as Lightning's ``on_exception``. Does not raise ``exc``."""
        self._end(type(exc) if exc is not None else None, exc, raise_errors=False)

    def _end(self, exc_type: type[BaseException] | None, exc: BaseException | None, *,
             raise_errors: bool = True) -> None:
        if self._final is not None:
            self.close()
            return
        deadline = time.monotonic() + self.close_timeout
        try:
            self._finish_on_exit(exc_type, exc, deadline)
        except KeyboardInterrupt:
            # A second Ctrl-C while delivering: the user wants out now.
            log.error("largebatch: interrupted while delivering: %d report(s) of run %s not delivered",
                      self.pending, self.run.id if self.run else "?")
            self.close(timeout=0)
            if exc_type is None and raise_errors:
                raise
        except Exception as e:
            if exc_type is None and raise_errors:
                self.close(timeout=max(0.0, deadline - time.monotonic()))
                raise
            # Never hide the training loop's own exception behind ours.
            log.error("largebatch: could not record the run's outcome: %s", e)
        self.close(timeout=max(0.0, deadline - time.monotonic()))

    def _finish_on_exit(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        deadline: float) -> None:
        # Deliver first: the NaN that explains the exception may still be in the buffer.
        if not self._reporter.flush(min(1.0, max(0.0, deadline - time.monotonic()))):
            log.warning("largebatch: delivering %d buffered report(s) of run %s before exiting (at most %.0fs; "
                        "Ctrl-C again to give up)", self.pending, self.run.id if self.run else "?",
                        max(0.0, deadline - time.monotonic()))
            self._reporter.flush(max(0.0, deadline - time.monotonic()))
        for r in self._reporter.pending_reports():
            if not math.isfinite(r.loss):
                self._note_nonfinite(r.step)

        def finish(outcome: FinalOutcome, step: int | None, reason: str | None) -> None:
            self.complete(outcome=outcome, step=step, reason=reason, timeout=max(0.0, deadline - time.monotonic()))

        if self.run is not None and self.run.state in ("diverged", "pruned"):
            # The service stopped the run itself (should_stop): confirm its verdict.
            finish(self.run.state, self.run.diverged_step, self.run.reason)  # type: ignore[arg-type]
        elif self.diverged_step is not None:
            finish("diverged", self.diverged_step, f"loss was not finite at step {self.diverged_step}")
        elif exc_type is None:
            if self.should_stop:
                finish("pruned", self.last_step, self.stop_reason or "stopped early")
            else:
                finish("failed", self.last_step, "the job ended without calling complete()")
        elif issubclass(exc_type, KeyboardInterrupt):
            finish("failed", self.last_step, "interrupted (KeyboardInterrupt)")
        else:
            finish("failed", self.last_step, f"{exc_type.__name__}: {exc}"[:2000])

    # ------------------------------------------------------------------ internals (also used by the thread)

    def _note_nonfinite(self, step: int) -> None:
        if self.diverged_step is None or step < self.diverged_step:
            self.diverged_step = step

    def _note_run(self, run: Run, should_stop: bool, reason: str | None) -> None:
        self.run = run
        if should_stop and not self.should_stop:
            self.stop_reason = reason
            self.should_stop = True
            log.warning("largebatch: the service asks run %d to stop: %s", run.id, reason)

    def _note_refused(self, e: errors.APIError) -> None:
        # Not a reason to stop training by itself (the service says stop with should_stop); the
        # refusal is kept for the caller to see, and logged.
        if isinstance(e, errors.APIStatusError):
            self.refused = e

    def _ensure_run(self) -> int:
        """The run id, opening the run first if the job started offline (thread-safe, idempotent)."""
        if self.run is not None:
            return self.run.id
        assert self._open_run is not None
        run = self._open_run(self._client)
        self.run = run
        log.warning("largebatch: service reachable: opened run %d for the locally computed recipe", run.id)
        return run.id

    def _ensure_run_until(self, deadline: float) -> int:
        if self.run is not None:
            return self.run.id
        return self._until(deadline, lambda c: self._ensure_run())

    def _until(self, deadline: float, fn: Callable[[Client], T]) -> T:
        failures = 0
        while True:
            try:
                return fn(self._client)
            except errors.APIError as e:
                failures += 1
                delay = _backoff(failures, e)
                if not _transient(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)


def _make_exit_hook(job: Job) -> Callable[[], None]:
    ref = weakref.ref(job)

    def hook() -> None:
        _close_at_exit(ref)

    return hook


# ---------------------------------------------------------------------------------- autoconfigure


def count_parameters(model: Any) -> int:
    """Trainable parameters of a torch module (duck-typed: anything with ``parameters()``)."""
    return int(sum(p.numel() for p in model.parameters() if getattr(p, "requires_grad", True)))


def default_environment(model: Any = None) -> dict[str, Any]:
    """What the run records about where it ran."""
    env: dict[str, Any] = {"client": f"largebatch-client {__version__}", "python": platform.python_version(),
                           "platform": platform.platform(terse=True), "host": socket.gethostname()}
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
    if model is not None:
        try:
            env["device"] = str(next(iter(model.parameters())).device)
        except (StopIteration, AttributeError, TypeError):
            pass
    return env


def build_request(model: Any, *, study: str, reference: Reference | Mapping[str, Any] | None,
                  target_batch_size: int | None, target_steps: int | None = None, model_params: int | None = None,
                  model_family: str = "transformer", environment: Mapping[str, Any] | None = None,
                  **request_fields: Any) -> RecommendationIn:
    """The ``start_run`` request :func:`autoconfigure` sends (validated locally)."""
    fields: dict[str, Any] = dict(request_fields)
    if "model" not in fields:
        fields["model"] = {"params": model_params or count_parameters(model), "family": model_family}
    if reference is not None:
        fields["reference"] = reference
    if target_batch_size is not None:
        fields["target"] = {"batch_size": target_batch_size, **({"steps": target_steps} if target_steps else {})}
    fields.update(study=study, start_run=True,
                  environment={**default_environment(model), **dict(environment or {})})
    return RecommendationIn.model_validate(fields)


def _engine_request(req: RecommendationIn) -> dict[str, Any]:
    return req.model_dump(exclude={"study", "start_run", "environment", "use_family_evidence", "explore"},
                          exclude_unset=True)


def _new_key() -> str:
    from ._base import _new_idempotency_key

    return _new_idempotency_key()


def _study_args(req: RecommendationIn, metric: str, direction: str) -> dict[str, Any]:
    assert req.study is not None
    return {"model_params": req.model.params, "model_family": req.model.family, "metric": metric,
            "direction": direction}


def _open_offline(req: RecommendationIn, recipe: Recipe, key: str, create_study: bool, metric: str,
                  direction: str) -> Callable[[Client], Run]:
    """How the background thread opens the run once the service answers (offline fallback)."""

    def open_run(client: Client) -> Run:
        assert req.study is not None
        try:
            return client.create_run(req.study, recipe=recipe, environment=req.environment, idempotency_key=key)
        except errors.NotFoundError:
            if not create_study:
                raise
            try:
                client.create_study(req.study, **_study_args(req, metric, direction))
            except errors.AlreadyExistsError:
                pass
            return client.create_run(req.study, recipe=recipe, environment=req.environment, idempotency_key=key)

    return open_run


def _build(model: Any, recipe: Recipe) -> tuple[Any, Any]:
    from largebatch.client.optim import build

    return build(model, recipe)


def _make_job(client: Client, model: Any, req: RecommendationIn, out: RecommendationOut | None, *,
              study_info: Study | None, key: str, offline_reason: BaseException | None, create_study: bool,
              metric: str, direction: str, job_options: Mapping[str, Any] | None) -> Job:
    if out is None:
        from .offline import recommend_local

        out = recommend_local(_engine_request(req))
        log.warning("largebatch: service unreachable (%s): training with the recipe computed locally; the run "
                    "will be opened and the reports delivered when the service answers", offline_reason)
        open_run = _open_offline(req, out, key, create_study, metric, direction)
    else:
        open_run = None
        if out.run is None:
            raise errors.JobError("the service answered without opening a run")
    recipe = Recipe.model_validate(out.model_dump(exclude={"run", "variants", "variant_runs"}))
    optimizer, scheduler = _build(model, recipe)
    return Job(client, out.run, recipe, optimizer, scheduler, study=req.study, study_info=study_info,
               open_run=open_run, **dict(job_options or {}))


def autoconfigure(client: Client, model: Any, *, study: str, reference: Reference | Mapping[str, Any] | None,
                  target_batch_size: int | None, target_steps: int | None = None, model_params: int | None = None,
                  model_family: str = "transformer", environment: Mapping[str, Any] | None = None,
                  idempotency_key: str | None = None, create_study: bool = True, metric: str = "eval_loss",
                  direction: str = "minimize", job_options: Mapping[str, Any] | None = None,
                  offline_fallback: bool = False, **request_fields: Any) -> Job:
    """See :meth:`Client.autoconfigure`."""
    req = build_request(model, study=study, reference=reference, target_batch_size=target_batch_size,
                        target_steps=target_steps, model_params=model_params, model_family=model_family,
                        environment=environment, **request_fields)
    key = idempotency_key or _new_key()
    study_info: Study | None = None
    out: RecommendationOut | None = None
    offline_reason: BaseException | None = None
    try:
        try:
            out = client.recommend(req, idempotency_key=key)
        except errors.NotFoundError:
            if not create_study:
                raise
            try:
                study_info = client.create_study(study, **_study_args(req, metric, direction))
            except errors.AlreadyExistsError:  # another job created it meanwhile
                pass
            out = client.recommend(req, idempotency_key=key)
    except errors.APIError as e:
        if not (offline_fallback and _transient(e)):
            raise
        offline_reason = e
    return _make_job(client, model, req, out, study_info=study_info, key=key, offline_reason=offline_reason,
                     create_study=create_study, metric=metric, direction=direction, job_options=job_options)


async def autoconfigure_async(client: AsyncClient, model: Any, *, study: str,
                              reference: Reference | Mapping[str, Any] | None, target_batch_size: int | None,
                              target_steps: int | None = None, model_params: int | None = None,
                              model_family: str = "transformer", environment: Mapping[str, Any] | None = None,
                              idempotency_key: str | None = None, create_study: bool = True,
                              metric: str = "eval_loss", direction: str = "minimize",
                              job_options: Mapping[str, Any] | None = None, offline_fallback: bool = False,
                              **request_fields: Any) -> Job:
    """See :meth:`AsyncClient.autoconfigure`. The job's thread reports with a sync client of the
    same configuration."""
    from ._client import Client

    req = build_request(model, study=study, reference=reference, target_batch_size=target_batch_size,
                        target_steps=target_steps, model_params=model_params, model_family=model_family,
                        environment=environment, **request_fields)
    key = idempotency_key or _new_key()
    study_info: Study | None = None
    out: RecommendationOut | None = None
    offline_reason: BaseException | None = None
    try:
        try:
            out = await client.recommend(req, idempotency_key=key)
        except errors.NotFoundError:
            if not create_study:
                raise
            try:
                study_info = await client.create_study(study, **_study_args(req, metric, direction))
            except errors.AlreadyExistsError:
                pass
            out = await client.recommend(req, idempotency_key=key)
    except errors.APIError as e:
        if not (offline_fallback and _transient(e)):
            raise
        offline_reason = e
    sync_client = Client(client.base_url, **client._options())
    return _make_job(sync_client, model, req, out, study_info=study_info, key=key, offline_reason=offline_reason,
                     create_study=create_study, metric=metric, direction=direction, job_options=job_options)
