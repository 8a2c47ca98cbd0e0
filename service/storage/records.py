"""The study store's vocabulary: its records, its domain errors and the names it checks (the contract,
:class:`~largebatch.service.storage.base.StudyStore`, speaks in these)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field

from largebatch.scaling_rules.evidence import Direction, Outcome
from largebatch.scaling_rules.wire import NAME_PATTERN, FinalOutcome, RunFields, Scope

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FINAL_OUTCOMES",
    "OUTCOMES",
    "AlreadyExists",
    "ApiKeyRecord",
    "Conflict",
    "InvalidArgument",
    "NoisePoint",
    "NotFound",
    "Report",
    "RunRecord",
    "RunTrajectory",
    "StoreError",
    "StoreUnavailable",
    "StoredOutcome",
    "StudyRecord",
    "noise_point",
    "validate_name",
]

# The domain words are defined once, in largebatch.scaling_rules (evidence.py: Outcome, Direction;
# wire.py: FinalOutcome, Scope, NAME_PATTERN, Page), and re-exported here for the store's callers.
OUTCOMES: tuple[str, ...] = get_args(Outcome)
#: What :meth:`StudyStore.complete_run` records: a job's :data:`FinalOutcome`, or ``preempted``.
FINAL_OUTCOMES: tuple[str, ...] = tuple(o for o in OUTCOMES if o != "running")
StoredOutcome = FinalOutcome | Literal["preempted"]
DEFAULT_LEASE_SECONDS = 600.0
_NAME = re.compile(NAME_PATTERN)


# --------------------------------------------------------------------------------------------
# Errors. Each subclasses a builtin so callers that only know Python's exceptions still work.
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class NotFound(StoreError, KeyError):
    """The study, run or API key does not exist (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(StoreError, ValueError):
    """A study with that (namespace, name) exists already (HTTP 409)."""


class Conflict(StoreError, ValueError):
    """The request contradicts what is stored, e.g. a second, different outcome (HTTP 409)."""


class StoreUnavailable(StoreError, ConnectionError):
    """The database cannot be reached or stayed busy past every retry (HTTP 503)."""


class InvalidArgument(StoreError, ValueError):
    """An argument is malformed; the message names the argument (HTTP 422)."""


def validate_name(argument: str, value: object) -> str:
    """Return ``value`` if it is a valid namespace/study name, else raise :class:`InvalidArgument`."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise InvalidArgument(
            f"{argument} must match {NAME_PATTERN} (letters, digits, '_', '.', '-'; "
            f"at most 128 characters), got {value!r}"
        )
    return value


# --------------------------------------------------------------------------------------------
# Records. Immutable, JSON-serialisable (``record.model_dump(mode="json")``); datetimes are UTC-aware.
# --------------------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StudyRecord(_Record):
    """A study groups the runs of one model family / experiment."""

    id: int = Field(description="Optuna study_id.")
    name: str
    namespace: str
    model_family: str
    model_params: int = Field(description="Number of trainable parameters of the model.")
    metric: str = Field(description="Name of the final metric, e.g. 'eval_loss'.")
    direction: Direction
    created_at: datetime
    n_runs: int = 0
    user_attrs: dict[str, Any] = Field(default_factory=dict, description="Free-form extra attributes.")

    @property
    def optuna_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class RunRecord(RunFields):
    """A run is one Optuna trial: one recipe handed out, and what became of it. The fields of the
    wire :class:`~largebatch.scaling_rules.wire.Run`, with the recipe as its JSON object (parsed
    into a ``Recipe`` only when a response is made) and the client's idempotency key; unlike on
    the wire, ``metric`` and ``last_loss`` keep NaN/inf."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: dict[str, Any]
    client_key: str | None = None


class Report(_Record):
    """One intermediate report of a running job."""

    step: int
    loss: float
    grad_norm: float | None = None


class NoisePoint(NamedTuple):
    """What a report with a ``noise_scale`` adds to its run's trajectory besides the value itself."""

    examples_seen: float
    tokens_seen: float | None = None
    grad_sq: float | None = None
    trace_sigma: float | None = None


def noise_point(report: Any) -> NoisePoint | None:
    """The trajectory part of a report (any object with the wire ``ReportIn``'s attributes)."""
    examples = getattr(report, "examples_seen", None)
    if examples is None:
        return None
    return NoisePoint(examples, getattr(report, "tokens_seen", None), getattr(report, "grad_sq", None),
                      getattr(report, "trace_sigma", None))


class TrajectoryPoint(_Record):
    """One bucket of a run's noise trajectory: the reports whose examples seen fell in it, merged."""

    examples_seen: float = Field(description="Mean examples seen over the bucket's reports.")
    tokens_seen: float | None = Field(default=None, description="Mean tokens seen, when every report gave it.")
    noise_scale: float = Field(description="Geometric mean of the reports' B_noise (examples).")
    grad_sq: float | None = Field(default=None, description="Mean |G|^2 of the reports that gave the components.")
    trace_sigma: float | None = None
    reports: int
    first_step: int
    last_step: int


class RunTrajectory(_Record):
    run_id: int
    batch_size: int
    points: list[TrajectoryPoint]


class ApiKeyRecord(_Record):
    """An API key, without its secret (only a sha256 hash of it is stored)."""

    id: int
    namespace: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None = None
    prefix: str = Field(description="First characters of the plaintext key, for display.")

    @property
    def active(self) -> bool:
        return self.revoked_at is None
