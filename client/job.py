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
nothing. A report leaves at most ``flush_interval`` after the first unsent one, whatever the
heartbeat interval. The same thread sends heartbeats so the run's lease never runs out while the job
lives (:mod:`largebatch.client._reporter`).

A job talks to the service through a :class:`~largebatch.client._base.RunChannel` (the few calls
it makes) and retries by the client's one retry policy.

Under torch.distributed (DDP, FSDP2, torchrun, Lightning's DDP strategy, HF Accelerate) a job is one
run: rank 0 asks for the recipe and owns the run, the recipe reaches the other ranks
(:meth:`Job.sync`), every rank calls :meth:`Job.report` at the same steps and the job reports the
mean over ranks from rank 0; ``should_stop`` is the same on every rank, so they all leave the
training loop at the same step (:mod:`largebatch.client._dist`). On ranks > 0, :meth:`Job.complete`,
:meth:`Job.fail` and leaving the ``with`` block record nothing.

A non-finite loss, or a step the optimizer skipped because its gradient was not finite
(``nonfinite='skip'``, the default of LAMB, LANS and LARS; the count is the optimizer's
``skipped_steps``), is divergence at that step: the job reports it (a skipped step as a non-finite
gradient norm), stops (``should_stop``) and ends the run ``diverged``.

Every ``progress_every`` optimizer steps (default 100; 0: never) the job logs one line at INFO level
on the ``largebatch.client`` logger: step, loss, LR and the estimated time left.

torch is never imported here; :meth:`Client.autoconfigure` (:mod:`largebatch.client._autoconfigure`)
builds the optimizer and scheduler.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.wire import ReportIn, Run, Study

from . import _dist, errors
from ._base import BaseClient, RunChannel, is_transient, retry_delay
from ._ending import Ending, Preempted
from ._guards import guard_steps
from ._probe import BranchProbing
from ._ranks import Ranks
from ._reporter import Reporter, detached, noise_point, report_point

__all__ = ["Job", "Preempted", "RunChannel"]

log = logging.getLogger("largebatch.client")

T = TypeVar("T")


def _close_at_exit(ref: weakref.ReferenceType[Job]) -> None:
    job = ref()
    if job is not None:
        job.close()


class Job(Ranks, Ending, BranchProbing):
    """One training run: ``optimizer``, ``scheduler``, ``recipe`` and ``run``, plus reporting.

    Use it as a context manager: leaving the block with an exception marks the run ``failed``
    (``diverged`` if a reported loss was NaN/Inf), a Ctrl-C included, after delivering every
    buffered report. Without one, the reports are still flushed when the interpreter exits.

    Args:
        client: A :class:`Client` or :class:`AsyncClient` (the job sends with its
            :meth:`~Client.run_channel`, which does not retry on its own: the background thread
            retries, indefinitely, instead), or any :class:`RunChannel`.
        run: The run opened for this job (``None``: opened by the background thread from
            ``recipe`` as soon as the service answers; see ``offline_fallback``).
        recipe: The recipe being trained.
        optimizer, scheduler: What :func:`largebatch.client.optim.build` made for the recipe.
        flush_interval: Seconds a report may wait in the buffer before it is sent.
        max_batch: Reports that make the job send at once (at most 1000, the service's limit, go in one request).
        heartbeat_interval: Seconds between heartbeats (the service's lease is 10 minutes).
        close_timeout: How long closing (and interpreter exit) waits for undelivered reports.
        complete_timeout: How long :meth:`complete` keeps trying to reach the service.
        progress_every: Log a progress line every this many reported steps (0: never).
        noise: A :class:`~largebatch.client.optim.GradientNoiseScale` the caller attached
            (``attach_accumulation`` or ``attach_ddp``; :meth:`measure_noise` does both): the job
            folds each step's norms in right before every optimizer step and reports its value with
            each loss (``noise_scale``).
        build: For a rank > 0 that waits for rank 0's recipe: builds (optimizer, scheduler) from it.
        model: The model the optimizer was built for: before the first optimizer step the job checks
            that the optimizer still holds its parameters, and before every step that the scheduler
            was stepped once per optimizer step (:mod:`largebatch.client._guards`).
    """

    def __init__(
        self,
        client: BaseClient | RunChannel,
        run: Run | None,
        recipe: Recipe | None,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        study: str | None = None,
        study_info: Study | None = None,
        open_run: Callable[[RunChannel], Run] | None = None,
        flush_interval: float = 1.0,
        max_batch: int = 1000,
        heartbeat_interval: float = 60.0,
        close_timeout: float = 60.0,
        complete_timeout: float = 300.0,
        progress_every: int = 100,
        build: Callable[[Recipe], tuple[Any, Any]] | None = None,
        noise: Any = None,
        model: Any = None,
    ) -> None:
        follower = build is not None
        if run is None and open_run is None and not follower:
            raise ValueError("a job needs its run, or open_run to open it")
        if recipe is None and not follower:
            raise ValueError("a job needs its recipe")
        if isinstance(progress_every, bool) or not isinstance(progress_every, int) or progress_every < 0:
            raise ValueError(f"progress_every must be an int >= 0, got {progress_every!r}")
        if not 1 <= max_batch <= 10_000:
            raise ValueError(f"max_batch must be in 1..10000, got {max_batch}")
        self._client: RunChannel = client.run_channel() if isinstance(client, BaseClient) else client
        self.run = run
        self._recipe = recipe
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.study = study if study is not None else (run.study if run is not None else None)
        self._study_info = study_info
        self._open_run = open_run
        self.close_timeout = close_timeout
        self.complete_timeout = complete_timeout
        self._stop_seen = False  # what this process knows (the service said stop, or it diverged)
        self._agreed_stop = False  # what every rank agreed on at the last report (several ranks)
        self.stop_reason: str | None = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite gradient, as of the last report
        self.progress_every = progress_every
        self._progress_t0: tuple[float, int] | None = None
        self._build = build
        self.follower = follower  # a rank > 0: rank 0 owns the run
        self.world_size = 1  # ranks the job agreed with (set by sync())
        self.noise = noise
        self._noise_hook: Any = None
        self._hook_noise()
        self._model = weakref.ref(model) if model is not None else None
        self._guard: Any = None
        self._hook_guards()
        self.diverged_step: int | None = None
        self.last_step: int | None = None
        self.refused: errors.APIStatusError | None = None  # the service refused reports for good
        self._final: Run | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._sigterm: Any = None  # the SIGTERM handler before `with job:`
        self._reporter = None if follower else Reporter(
            self, flush_interval=flush_interval, max_batch=max_batch, heartbeat_interval=heartbeat_interval)
        self._atexit = _make_exit_hook(self)
        if not follower:
            atexit.register(self._atexit)

    def __repr__(self) -> str:
        run = f"run {self.run.id}" if self.run is not None else "run not opened yet"
        steps = self._recipe.total_steps if self._recipe is not None else "?"
        return f"<Job {run} in study {self.study!r}, {steps} steps, {self.pending} pending>"

    @property
    def recipe(self) -> Recipe:
        if self._recipe is None:
            raise errors.JobError(
                "this rank waits for rank 0's recipe: call job.sync() once torch.distributed has a process "
                "group (the HF and Lightning integrations do; torchrun's environment creates it at once)")
        return self._recipe

    @recipe.setter
    def recipe(self, value: Recipe) -> None:
        self._recipe = value

    @property
    def should_stop(self) -> bool:
        """Stop training: the service said so, or the job diverged. Under several ranks, the value
        every rank agreed on at the last :meth:`report` (so that all leave at the same step)."""
        return self._agreed_stop if self.world_size > 1 else self._stop_seen

    def _hook_guards(self) -> None:
        if self._guard is None and self.optimizer is not None:
            self._guard = guard_steps(self.optimizer, self.scheduler, self._model() if self._model else None)

    def _hook_noise(self) -> None:
        # Right before the optimizer step the accumulated (and all-reduced) gradient is there and
        # no zero_grad() has run yet, in a plain loop as in every framework.
        if self.noise is None or self._noise_hook is not None or self.optimizer is None:
            return
        noise = self.noise

        def fold(*_: Any) -> None:  # a pre-hook that returns something would replace the step's arguments
            noise.step()

        self._noise_hook = self.optimizer.register_step_pre_hook(fold)

    def measure_noise(self, model: Any, plan: _dist.BatchPlan | None = None, *, ema: float | None = None,
                      grad_scale: float | None = None, memory_examples: float | None = None) -> Any:
        """Measure the gradient noise scale B_noise while training and report it with every loss.

        ``plan`` (default :meth:`batch_plan`) says how a step is trained. Under DDP (``model`` wrapped
        in ``DistributedDataParallel``, >= 2 ranks) a communication hook compares the local and the
        all-reduced gradient norms; in one process, hooks read each micro-batch's gradient (the plan
        needs accumulation >= 2), ``grad_scale`` being what each micro-batch's loss was divided by
        (default: the accumulation steps); the bare module of a DDP model is read over the process
        group. Smoothing: ``memory_examples`` (default: the benchmarks' 100 steps of the first measured
        batch) or ``ema`` per step (:class:`~largebatch.client.optim.GradientNoiseScale`). Cost: one
        reduction over the gradients per micro-batch.
        Returns the :class:`~largebatch.client.optim.GradientNoiseScale` (also ``job.noise``).
        """
        from ._measure import attach_noise

        if self.noise is not None:
            raise ValueError("this job already measures the noise scale (job.noise)")
        self.noise = attach_noise(model, plan if plan is not None else self.batch_plan(), ema=ema,
                                  grad_scale=grad_scale, memory_examples=memory_examples)
        self._hook_noise()
        return self.noise

    def state_dict(self) -> dict[str, Any]:
        """What to save with a training checkpoint to continue this run after a crash or a preemption:
        ``autoconfigure(..., resume=state)`` (:mod:`largebatch.client._resume`). It carries the reports
        the service has not acknowledged yet: the checkpoint's steps are not trained again after a crash,
        so a resumed job sends them instead of losing them."""
        if self.run is None:
            raise errors.JobError("the run is not opened yet (the service has not answered): nothing to resume")
        return {"run": self.run.id, "study": self.study, "step": self.last_step,
                "reports": [r.model_dump(exclude_none=True) for r in self.pending_reports()]}

    @property
    def finished(self) -> bool:
        """This process recorded the run's outcome (:meth:`complete`, :meth:`fail`, :meth:`abort` or
        leaving the ``with`` block); always False on a rank > 0, where rank 0 records it."""
        return self._final is not None

    # ------------------------------------------------------------------ reporting

    def report(self, step: int, loss: Any, grad_norm: Any = None, *, noise_scale: Any = None,
               examples: Any = None) -> None:
        """Record the loss (and gradient norm) at ``step``; returns at once.

        ``loss`` may be a float or a 0-d tensor: a tensor is converted to a number by the
        background thread, so the training loop does not wait for the device either.
        ``noise_scale``: the smoothed gradient noise scale B_noise (examples) measured at this step,
        if the job measures it; the run keeps the latest and the study's recipes use the median
        over its runs. Under several ranks, rank 0's value is sent (the estimate is global).
        ``examples``: how many examples (tokens) this rank's ``loss`` is the mean over; under several
        ranks the reported loss is then weighted by it (default: the plain mean over ranks).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._closed:
            raise errors.JobError("the job is closed: it takes no more reports")
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        noise = None
        if noise_scale is None and self.noise is not None:
            noise, noise_scale = self.noise, self.noise.estimate  # a device tensor: read by the background thread
        loss, grad_norm = self._vote(step, loss, grad_norm, examples)
        if self._reporter is not None:
            point = None if noise_scale is None else noise_point(noise, self.recipe.stages, step)
            self._reporter.put(step, detached(loss), detached(grad_norm), detached(noise_scale), point)
        if self.progress_every and (step + 1) % self.progress_every == 0 and not self.follower:
            self._log_progress(step, loss)

    def resend(self, reports: list[ReportIn]) -> None:
        """Queue reports a checkpoint carried (rank 0 only: they were already agreed across ranks)."""
        for r in reports:
            self.last_step = r.step if self.last_step is None else max(self.last_step, r.step)
            if self._reporter is not None:
                self._reporter.put(r.step, r.loss, r.grad_norm, r.noise_scale, report_point(r))

    def _log_progress(self, step: int, loss: Any) -> None:
        now = time.monotonic()
        if self._progress_t0 is None:
            self._progress_t0 = (now, step)
            eta = "?"
        else:
            t0, s0 = self._progress_t0
            left = (now - t0) / max(step - s0, 1) * max(self.recipe.total_steps - step - 1, 0)
            eta = (f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60
                   else f"{left:.0f} s")
        try:
            value = f"{float(loss.item() if hasattr(loss, 'item') else loss):.4g}"
        except (TypeError, ValueError):
            value = "?"
        log.info("largebatch: step %d/%d loss %s lr %.3g eta %s", step + 1, self.recipe.total_steps, value,
                 self.lr_at(step), eta)

    @property
    def pending(self) -> int:
        """Reports not yet acknowledged by the service."""
        return self._reporter.pending if self._reporter is not None else 0

    @property
    def delivered(self) -> int:
        """Reports the service has acknowledged."""
        return self._reporter.delivered if self._reporter is not None else 0

    def pending_reports(self) -> list[ReportIn]:
        return self._reporter.pending_reports() if self._reporter is not None else []

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every report so far is delivered; False if ``timeout`` ran out first."""
        return self._reporter.flush(timeout) if self._reporter is not None else True

    @property
    def study_info(self) -> Study | None:
        """The study (its metric name and direction); fetched once, None if the service is unreachable."""
        if self._study_info is None and self.study is not None:
            try:
                self._study_info = self._retrying(lambda c: c.get_study(self.study), tries=3)
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

    # ------------------------------------------------------------------ internals (also used by the thread)

    def _note_nonfinite(self, step: int, reason: str | None = None) -> None:
        if self.diverged_step is None or step < self.diverged_step:
            self.diverged_step = step
        if not self._stop_seen:
            self.stop_reason = reason or f"loss was not finite at step {step}"
            self._stop_seen = True

    def _note_run(self, run: Run, should_stop: bool, reason: str | None) -> None:
        self.run = run
        if should_stop and not self._stop_seen:
            self.stop_reason = reason
            self._stop_seen = True
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

    def _until(self, deadline: float, fn: Callable[[RunChannel], T]) -> T:
        return self._retrying(fn, deadline=deadline)

    def _retrying(self, fn: Callable[[RunChannel], T], *, deadline: float = math.inf,
                  tries: int | None = None) -> T:
        """``fn(channel)``, tried again on transient errors (the client's policy) until ``deadline``
        or ``tries`` tries."""
        failures = 0
        while True:
            try:
                return fn(self._client)
            except errors.APIError as e:
                failures += 1
                delay = retry_delay(failures - 1, e.retry_after if isinstance(e, errors.APIStatusError) else None)
                if (not is_transient(e) or time.monotonic() + delay > deadline
                        or (tries is not None and failures >= tries)):
                    raise
                time.sleep(delay)


def _make_exit_hook(job: Job) -> Callable[[], None]:
    ref = weakref.ref(job)

    def hook() -> None:
        _close_at_exit(ref)

    return hook
