"""The end of training, the same for every framework callback."""

from __future__ import annotations

import logging
import math

from largebatch.client.job import Job

log = logging.getLogger("largebatch.client")


def finish(job: Job, last_metric: float | None, *, missing: str) -> None:
    """Record the run's outcome when the framework's training ends: diverged (the job saw it, or the
    final metric is not finite), else completed with ``last_metric``. Without a metric the run stays
    open, and ``missing`` (what was not evaluated, and what to do) is logged."""
    if job.diverged_step is not None or job.should_stop or (
            last_metric is not None and not math.isfinite(last_metric)):
        job.abort()
    elif last_metric is not None:
        job.complete(last_metric)
    else:
        log.warning("largebatch: %s", missing)
