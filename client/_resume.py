"""Continuing a run after a crash or a preemption.

A job's :meth:`~largebatch.client.Job.state_dict` (the run, its study, the last reported step and the
reports the service had not acknowledged yet) is saved with the training checkpoint, next to the optimizer's and scheduler's own state. Handing it back
as ``autoconfigure(..., resume=state)`` makes a job for the same run, the same recipe, with a fresh
optimizer and scheduler for the caller to load their state into:

* the run still ``running`` (the process was killed: SIGKILL, OOM, a lost node), or ``preempted`` by
  the service's lease sweeper (its guess: the job's next report revives it): the job reattaches to
  it, first sending the checkpoint's unacknowledged reports (the steps up to the checkpoint are not
  trained again, so they would be lost otherwise); steps reported again after the checkpoint replace
  the earlier reports (the service keeps one report per step), and the run ends in one final state;
* the run already ended (``failed`` after an exception, ``preempted`` by its job on SIGTERM,
  ``completed``, ``diverged``, ``pruned``): it takes no more reports, so resuming it is refused before the first
  step (:class:`~largebatch.client.errors.JobError`) unless the caller asks for a new attempt,
  ``new_attempt=True``: a new run of the same recipe whose environment names the one it continues
  (``resumes_run``) and counts the attempts (``attempt``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from largebatch.scaling_rules.wire import ReportIn, Run

from . import errors

__all__ = ["ENDED", "check_resumable", "resume_run", "saved_reports", "takes_reports"]

ENDED = ("completed", "diverged", "failed", "pruned", "preempted")  # runs that take no more reports...
_SWEPT = "lease expired"  # ...except one the lease sweeper preempted (the service's reason for it)


def takes_reports(run: Run) -> bool:
    return run.state not in ENDED or (run.state == "preempted" and run.reason == _SWEPT)


def check_resumable(state: Any) -> tuple[int, str | None, int | None]:
    """(run id, study, last step) of a :meth:`Job.state_dict`; ValueError naming ``resume`` if it is not one."""
    if not isinstance(state, Mapping) or not isinstance(state.get("run"), int) or isinstance(state.get("run"), bool):
        raise ValueError(f"resume must be a job's state_dict() (with the run's id), got {state!r}")
    step = state.get("step")
    saved_reports(state)
    return state["run"], state.get("study"), step if isinstance(step, int) else None


def saved_reports(state: Mapping[str, Any]) -> list[ReportIn]:
    """The unacknowledged reports a :meth:`Job.state_dict` carries (none in one saved before they were);
    ValueError naming ``resume`` if they are not reports."""
    raw = state.get("reports", [])
    try:
        if not isinstance(raw, list):
            raise TypeError("not a list")
        return [ReportIn.model_validate(r) for r in raw]
    except (ValidationError, TypeError) as e:
        raise ValueError(f"resume['reports'] must be the reports of a job's state_dict(): {e}") from None


def resume_run(get_run: Callable[[int], Run], create_run: Callable[[Run, dict[str, Any]], Run], state: Any, *,
               study: str, new_attempt: bool) -> Run:
    """The run a resumed job reports to: the same one while it is running, else (``new_attempt``) a new
    attempt linked to it. Raises :class:`JobError` for an ended run without ``new_attempt``."""
    run_id, saved_study, step = check_resumable(state)
    if saved_study is not None and saved_study != study:
        raise errors.JobError(f"resume is the state of a job in study {saved_study!r}, not {study!r}")
    run = get_run(run_id)
    if takes_reports(run):
        return run
    if not new_attempt:
        raise errors.JobError(
            f"run {run_id} is {run.state}: it takes no more reports. To continue its training, start a new attempt "
            f"linked to it: autoconfigure(..., resume=state, new_attempt=True) (then load the optimizer and "
            f"scheduler state from the checkpoint and train from step {'?' if step is None else step + 1})")
    attempt = int(run.environment.get("attempt", 1)) + 1
    return create_run(run, {"resumes_run": run_id, "attempt": attempt,
                            **({"resumes_after_step": step} if step is not None else {})})
