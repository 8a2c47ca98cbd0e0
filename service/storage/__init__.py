"""The study store: every recipe handed out and every outcome reported, kept in an Optuna RDB store.

``open_store(url)`` returns a :class:`StudyStore`; ``initialize_schema(url)`` creates or upgrades
the schema once at start-up (call it from one process before any worker serves).
"""

from largebatch.service.storage.base import (
    DEFAULT_LEASE_SECONDS,
    FINAL_OUTCOMES,
    NAME_PATTERN,
    OUTCOMES,
    AlreadyExists,
    ApiKeyRecord,
    BatchSummary,
    Conflict,
    Direction,
    InvalidArgument,
    NotFound,
    Outcome,
    Page,
    Report,
    RunRecord,
    Scope,
    StoreError,
    StoreUnavailable,
    StudyRecord,
    StudyStore,
    validate_name,
)

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "FINAL_OUTCOMES",
    "NAME_PATTERN",
    "OUTCOMES",
    "AlreadyExists",
    "ApiKeyRecord",
    "BatchSummary",
    "Conflict",
    "Direction",
    "InvalidArgument",
    "NotFound",
    "Outcome",
    "Page",
    "Report",
    "RunRecord",
    "Scope",
    "StoreError",
    "StoreUnavailable",
    "StudyRecord",
    "StudyStore",
    "default_url",
    "initialize_schema",
    "open_store",
    "validate_name",
]


def __getattr__(name: str):
    # The Optuna-backed implementation pulls in optuna + sqlalchemy; load it only when asked.
    if name in ("open_store", "initialize_schema", "default_url", "OptunaStudyStore"):
        from largebatch.service.storage import optuna_store

        return getattr(optuna_store, name)
    raise AttributeError(name)
