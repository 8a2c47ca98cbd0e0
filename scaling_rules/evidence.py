"""What past runs teach, in the shape the recommender consumes.

The study store (``largebatch.service.storage``) keeps one :class:`BatchSummary` row per
(study, batch size, LR units) up to date with every outcome, so a recommendation never loads whole
studies, and one optimizer's divergences never bound another's LRs (``optimizers.run_units``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Outcome = Literal["running", "completed", "diverged", "failed", "preempted", "pruned"]
Direction = Literal["minimize", "maximize"]


class BatchSummary(BaseModel):
    """Everything known about one batch size of one study (or one family/size band), in one LR units.

    ``units`` is the LR units of the runs folded in (``optimizers.run_units`` of their optimizer:
    ``optimizers.UNNAMED_UNITS`` for runs that named none, read in the reference's units); None where
    they were not recorded, and the row then speaks for every optimizer's runs together.
    """

    model_config = ConfigDict(extra="allow")

    batch_size: int
    n_runs: int = 0
    n_completed: int = 0
    n_diverged: int = 0
    best_lr: float | None = None
    best_metric: float | None = None
    min_diverged_lr: float | None = None
    max_stable_lr: float | None = None
    units: str | None = None
