"""A job's side of several ranks: rank 0's recipe and run handed to the others, the batch plan over
the ranks, and the vote at every report that makes all ranks stop at the same step.

A mixin of :class:`~largebatch.client.Job` (its state lives there); the collectives themselves are in
:mod:`largebatch.client._dist`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.wire import Run

from . import _dist, errors

__all__ = ["Ranks"]


class Ranks:
    """Several ranks, one run (mixed into :class:`~largebatch.client.Job`)."""

    _recipe: Recipe | None
    run: Run | None
    study: str | None
    optimizer: Any
    scheduler: Any
    follower: bool
    world_size: int
    skipped_steps: int
    stop_reason: str | None
    _stop_seen: bool
    _agreed_stop: bool
    _preempted: bool
    _build: Callable[[Recipe], tuple[Any, Any]] | None

    if TYPE_CHECKING:  # what Job defines
        recipe: Recipe

        def _hook_noise(self) -> None: ...

        def _hook_guards(self) -> None: ...

        def _note_nonfinite(self, step: int, reason: str | None = None) -> None: ...

    def sync(self) -> Self:
        """Hand rank 0's recipe and run to every rank (a collective: every rank calls it once). Does
        nothing without a process group of several ranks, or when already done; on a rank > 0 without
        one it raises :class:`JobError`. Returns the job."""
        if self.world_size > 1:
            return self
        if not _dist.ensure_group():
            if self.follower and self._recipe is None:
                raise errors.JobError("this rank waits for rank 0's recipe, but torch.distributed has no process "
                                      "group: call torch.distributed.init_process_group() first")
            return self
        rank, world = _dist.world()
        if (rank != 0) != self.follower:
            raise errors.JobError(f"the job was made for {'a rank > 0' if self.follower else 'rank 0'} but this "
                                  f"process is rank {rank}: build the job after the ranks are known")
        mine = None
        if not self.follower:
            mine = {"recipe": self.recipe.model_dump(mode="json"), "study": self.study,
                    "run": self.run.model_dump(mode="json") if self.run is not None else None}
        theirs = _dist.broadcast(mine)
        if self.follower:
            if "refused" in theirs:
                raise errors.JobError(theirs["refused"])
            recipe = Recipe.model_validate(theirs["recipe"])
            if self._recipe is not None and self._recipe != recipe:
                raise errors.JobError("rank 0 trains another recipe than the one this rank was handed")
            self._adopt(recipe, theirs["run"], theirs["study"])
        self.world_size = world
        return self

    @staticmethod
    def refuse(error: BaseException) -> None:
        """Rank 0 could not make its job: hand the error to the other ranks, which wait in :meth:`sync`
        for a recipe that will not come (they raise :class:`JobError` with it instead of hanging)."""
        if _dist.ensure_group():
            _dist.broadcast({"refused": f"rank 0 could not configure the job: {type(error).__name__}: {error}"})

    def _adopt(self, recipe: Recipe, run: Any, study: str | None) -> None:
        self._recipe = recipe
        self.run = Run.model_validate(run) if run is not None else None
        self.study = study
        if self.optimizer is None and self._build is not None:
            self.optimizer, self.scheduler = self._build(recipe)
            self._hook_noise()
            self._hook_guards()

    def handover(self) -> dict[str, Any]:
        """What a rank > 0 started from this process needs (see :func:`largebatch.client._dist`)."""
        return {"recipe": self.recipe.model_dump(mode="json"), "study": self.study,
                "run": self.run.model_dump(mode="json") if self.run is not None else None}

    def batch_plan(self, per_device_batch_size: int | None = None, world_size: int | None = None) -> _dist.BatchPlan:
        """How to train the recipe's (global) batch: per-device batch x accumulation x ranks.

        ``per_device_batch_size`` is the most one device holds (default: the whole share of a rank,
        no accumulation); ``world_size`` defaults to the ranks of the process group or launcher.
        Refuses a recipe with stages at several batch sizes, and a batch that does not split over
        the ranks (:class:`ValueError`)."""
        sizes = sorted({s.batch_size for s in self.recipe.stages})
        if len(sizes) > 1:
            raise ValueError(f"the recipe has stages at batch sizes {sizes}: plan each stage on its own")
        if world_size is None:
            world_size = self.world_size if self.world_size > 1 else max(_dist.world()[1],
                                                                        _dist.identity().world_size)
        return _dist.plan_batch(sizes[0], world_size, per_device_batch_size)

    def _vote(self, step: int, loss: Any, grad_norm: Any, examples: Any) -> tuple[Any, Any]:
        """The loss and gradient norm to report at ``step``, the same on every rank, and the stop
        decision (``should_stop``) every rank takes from this report."""
        skipped = self._skipped_now()
        if self.world_size > 1:
            # Every rank is here at this step: one all-reduce gives each the same numbers and verdict.
            vote = _dist.PREEMPTED if self._preempted else int(self._stop_seen)
            loss, grad_norm, stop, skipped = _dist.agree(loss, grad_norm, vote, skipped, examples)
            if stop == _dist.PREEMPTED:  # every rank leaves at this step, and exits as preempted
                self._preempted = True
                self.stop_reason = self.stop_reason or "preempted (SIGTERM)"
            elif stop and not self._stop_seen and self.stop_reason is None:
                self.stop_reason = "rank 0 says stop"
        nonfinite = False  # decided from the agreed numbers: the same on every rank
        if skipped > self.skipped_steps:
            self.skipped_steps = skipped
            # The service judges a non-finite gradient norm as divergence at this step.
            grad_norm = math.inf
            self._note_nonfinite(step, f"step {step} skipped: its gradient was not finite")
            nonfinite = True
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            self._note_nonfinite(step, f"loss was {loss} at step {step}")
            nonfinite = True
        if self.world_size > 1:
            # Only what every rank knows. Not self._stop_seen: rank 0's reporter thread may have set it
            # (the service said stop) since the vote, and a rank that leaves the training loop alone
            # leaves the others waiting in a collective for good. It is voted at the next report.
            self._agreed_stop = self._agreed_stop or bool(stop) or nonfinite
        return loss, grad_norm

    def _skipped_now(self) -> int:
        # Reading the counter waits for the device; only optimizers that skip have one.
        groups = getattr(self.optimizer, "param_groups", None)
        counter = groups[0].get("skipped_steps") if groups else None
        return int(counter) if counter is not None else 0
