"""How a job's run ends: :meth:`complete` (or :meth:`fail`) records the outcome after delivering
every report; leaving ``with job:`` records what the block's way out says (an exception, a NaN, the
service's stop, SIGTERM's :class:`Preempted`); :meth:`close` delivers without an outcome.

A mixin of :class:`~largebatch.client.Job` (its state lives there).
"""

from __future__ import annotations

import atexit
import logging
import math
import signal
import threading
import time
from typing import Any, Self

from largebatch.scaling_rules.wire import FinalOutcome, Run

from . import errors

__all__ = ["Ending", "Preempted"]

log = logging.getLogger("largebatch.client")


class Preempted(SystemExit):
    """SIGTERM (what SLURM and Kubernetes send on preemption) inside ``with job:``: the block
    delivers the reports and records the run ``preempted`` at the last reported step, then the
    process exits with 143 (128 + SIGTERM), without a traceback.

    In one process it is raised in the training loop at once. Under several ranks it cannot be: the
    other ranks would wait in their next collective for good. The rank that got the signal votes it
    at the next :meth:`~largebatch.client.Job.report`, every rank sees ``should_stop`` at that same
    step, and leaving ``with job:`` raises it on every rank (rank 0 records the run)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class Ending:
    """The end of a job's run (mixed into :class:`~largebatch.client.Job`)."""

    _preempted = False  # SIGTERM arrived (one rank) or was voted (all ranks) inside `with job:`

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
            if self._reporter is None:  # a rank > 0: rank 0 records the outcome
                return self.run  # type: ignore[return-value]
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
            return self.pending == 0
        self._closed = True
        if self._reporter is None:
            return True
        ok = self._reporter.close(self.close_timeout if timeout is None else timeout)
        if not ok:
            log.error("largebatch: %d report(s) of run %s could not be delivered (%s)", self.pending,
                      self.run.id if self.run else "?", self._reporter.last_error)
        self._release()
        return ok

    def _shutdown(self) -> None:
        self._closed = True
        if self._reporter is not None:
            self._reporter.close(5.0)
        self._release()

    def _release(self) -> None:
        # The job's client stays usable (complete() after close(), study_info); its idle
        # connections go with it when the job is garbage collected.
        atexit.unregister(self._atexit)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # only there can a handler be set
            self._sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.world_size < 2:
            raise Preempted()
        # Several ranks: voted at the next report (see Preempted). Meanwhile what is buffered leaves now,
        # in case that report never comes before the launcher's SIGKILL.
        self._preempted = True
        if self._reporter is not None:
            self._reporter.flush(0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            self._end(exc_type, exc)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None
        if self._preempted and exc_type is None:
            raise Preempted()

    def abort(self, exc: BaseException | None = None) -> None:
        """End the job without :meth:`complete`, as leaving the ``with`` block would: the run is
        recorded ``diverged`` (a non-finite loss was reported, or the service said so), else
        ``pruned`` (the service asked to stop), else ``failed`` (with ``exc`` as the reason).
        For framework hooks such as Lightning's ``on_exception``. Does not raise ``exc``."""
        self._end(type(exc) if exc is not None else None, exc, raise_errors=False)

    def _end(self, exc_type: type[BaseException] | None, exc: BaseException | None, *,
             raise_errors: bool = True) -> None:
        if self._final is not None or self._reporter is None:
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
            try:
                self.complete(outcome=outcome, step=step, reason=reason,
                              timeout=max(0.0, deadline - time.monotonic()))
            except errors.JobError:
                # The service ended the run first (its divergence verdict, in its own words): that run
                # is recorded, which is all leaving the block has to ensure.
                if self._final is None or self._final.state == "running":
                    raise
                log.info("run %s was already %s at the service; leaving it so", self._final.id, self._final.state)

        if self.run is not None and self.run.state in ("diverged", "pruned"):
            # The service stopped the run itself (should_stop): confirm its verdict.
            finish(self.run.state, self.run.diverged_step, self.run.reason)  # type: ignore[arg-type]
        elif self.diverged_step is not None:
            finish("diverged", self.diverged_step, f"loss was not finite at step {self.diverged_step}")
        elif self._preempted and exc_type is None:
            finish("preempted", self.last_step, "SIGTERM (preempted)")
        elif exc_type is None:
            if self._stop_seen:
                finish("pruned", self.last_step, self.stop_reason or "stopped early")
            else:
                finish("failed", self.last_step, "the job ended without calling complete()")
        elif issubclass(exc_type, Preempted):
            finish("preempted", self.last_step, "SIGTERM (preempted)")  # type: ignore[arg-type]
        elif issubclass(exc_type, KeyboardInterrupt):
            finish("failed", self.last_step, "interrupted (KeyboardInterrupt)")
        else:
            finish("failed", self.last_step, f"{exc_type.__name__}: {exc}"[:2000])
