"""The study-store contract: records, domain errors, the abstract :class:`StudyStore` and the
:class:`ApiKeyStore` it includes (authentication needs only that one).

Everything the REST service does with persistent state goes through :class:`StudyStore`. The
only implementation today is :class:`largebatch.service.storage.optuna_store.OptunaStudyStore`,
which keeps every study and run in a genuine Optuna RDB schema (so ``optuna.load_study`` and
optuna-dashboard can open it) plus a few tables of our own for idempotency keys, leases,
per-batch-size summaries and API keys.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from largebatch.scaling_rules import wire
from largebatch.scaling_rules.evidence import BatchSummary, Direction, Outcome
from largebatch.scaling_rules.learning import RunEvidence
from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.wire import NAME_PATTERN, FinalOutcome, Page, Scope

__all__ = [
    "DEFAULT_LEASE_SECONDS", "FINAL_OUTCOMES", "NAME_PATTERN", "OUTCOMES", "AlreadyExists", "ApiKeyRecord",
    "ApiKeyStore", "BatchSummary", "Conflict", "Direction", "FinalOutcome", "InvalidArgument", "NotFound",
    "Outcome", "Page", "Report", "RunRecord", "Scope", "StoreError", "StoreUnavailable", "StoredOutcome",
    "StudyRecord", "StudyStore", "validate_name",
]

# The records and errors live in .records; re-exported here, where the store's callers look for them.
from largebatch.service.storage.records import (
    DEFAULT_LEASE_SECONDS,
    FINAL_OUTCOMES,
    OUTCOMES,
    AlreadyExists,
    ApiKeyRecord,
    Conflict,
    InvalidArgument,
    NotFound,
    Report,
    RunRecord,
    RunTrajectory,
    StoredOutcome,
    StoreError,
    StoreUnavailable,
    StudyRecord,
    validate_name,
)

# --------------------------------------------------------------------------------------------
# The contract.
# --------------------------------------------------------------------------------------------


class ApiKeyStore(abc.ABC):
    """API keys: a namespace and a scope each; only a hash of the secret is stored. Thread-safe;
    errors as :class:`StudyStore`'s. Every :class:`StudyStore` is one (the keys live in its
    database), and authentication needs nothing more than this interface."""

    @abc.abstractmethod
    def create_api_key(self, namespace: str, scope: Scope = "write") -> tuple[int, str]:
        """Create an API key. Only its sha256 is stored; the plaintext is returned once.

        Returns:
            ``(key_id, plaintext)``.

        Raises:
            InvalidArgument: Bad namespace or scope.
        """

    @abc.abstractmethod
    def list_api_keys(self, namespace: str | None = None) -> list[ApiKeyRecord]:
        """List API keys (revoked ones included), oldest first."""

    @abc.abstractmethod
    def revoke_api_key(self, key_id: int) -> ApiKeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first ``revoked_at``).

        Raises:
            NotFound: No such key.
        """

    @abc.abstractmethod
    def lookup_api_key(self, plaintext: str) -> ApiKeyRecord | None:
        """Return the *active* key whose plaintext this is, or None (unknown or revoked).

        Looks up by the sha256 of ``plaintext`` (no comparison of secrets in Python).
        """


class StudyStore(ApiKeyStore):
    """Persistent memory of the service: studies, runs, outcomes, summaries, API keys.

    Contract shared by every implementation:

    * **Thread-safety.** One instance is shared by all request threads of a worker process; every
      method may be called concurrently. Several processes (uvicorn workers, CLI tools) may open
      stores on the same database at the same time; the database, not the instance, is the unit of
      consistency (uniqueness is enforced by constraints, not by read-then-write).
    * **Identity.** A study is addressed by ``(namespace, name)``; its Optuna study name is
      ``f"{namespace}/{name}"``. A run is addressed by its ``id`` (the Optuna ``trial_id``), which
      is unique across all studies.
    * **Idempotency.** :meth:`create_run` with a ``client_key`` already used in that study returns
      the existing run (``created=False``). :meth:`complete_run` with the outcome already recorded
      (same state, same metric) returns the run unchanged; a different final outcome raises
      :class:`Conflict`. :meth:`report` of a step already reported overwrites it.
    * **Outcomes.** ``running`` → one of ``completed`` (metric required), ``diverged`` (step and/or
      reason), ``failed`` (reason), ``pruned`` (step), ``preempted``. Final outcomes never change
      again, with one exception: a run that :meth:`expire_leases` preempted (its lease ran out,
      e.g. during a network partition) is the sweeper's guess, and the job's word wins over it: a
      :meth:`heartbeat` or :meth:`report` from the job makes it ``running`` again, and the job's
      own final outcome is accepted. A run its job declared ``preempted`` stays so (Conflict).
    * **Leases.** :meth:`create_run` starts a lease; :meth:`heartbeat` and :meth:`report` renew it
      (by the run's lease length unless a new one is given).
    * **Returned objects** are immutable snapshots; mutating the store never changes them.
    * **Times** are timezone-aware UTC datetimes.
    * **Errors.** Only subclasses of :class:`StoreError` are raised on purpose: :class:`NotFound`,
      :class:`AlreadyExists`, :class:`Conflict`, :class:`InvalidArgument` (message names the
      argument), :class:`StoreUnavailable` (database down, or busy past all retries; transient
      SQLite "database is locked" errors are retried inside the store and never surface).
    """

    # ----------------------------------------------------------------------------- studies

    @abc.abstractmethod
    def create_study(
        self,
        namespace: str,
        name: str,
        *,
        model_family: str,
        model_params: int,
        metric: str = "loss",
        direction: Direction = "minimize",
        user_attrs: dict[str, Any] | None = None,
    ) -> StudyRecord:
        """Create a study.

        Args:
            namespace: Owner namespace (validated with :data:`NAME_PATTERN`).
            name: Study name, unique within the namespace (same pattern).
            model_family: e.g. ``"transformer"``; used by :meth:`family_history`.
            model_params: Parameter count (> 0); used by :meth:`family_history` size bands.
            metric: Name of the final metric.
            direction: ``"minimize"`` or ``"maximize"``.
            user_attrs: Extra JSON-serialisable attributes stored with the study.

        Returns:
            The new study.

        Raises:
            AlreadyExists: The namespace already has a study with that name.
            InvalidArgument: An argument is malformed.
        """

    @abc.abstractmethod
    def get_study(self, namespace: str, name: str) -> StudyRecord:
        """Return one study (with its current ``n_runs``).

        Raises:
            NotFound: No such study.
            InvalidArgument: A name is malformed.
        """

    @abc.abstractmethod
    def list_studies(self, namespace: str | None = None, *, limit: int = 100, offset: int = 0) -> Page:
        """List studies ordered by creation (oldest first).

        Args:
            namespace: Only this namespace; ``None`` lists all namespaces.
            limit: Page size, 1..1000.
            offset: Number of items to skip, >= 0.

        Returns:
            ``Page(items=[StudyRecord, ...], total=<all matching studies>)``.

        Raises:
            InvalidArgument: Bad namespace, limit or offset.
        """

    @abc.abstractmethod
    def delete_study(self, namespace: str, name: str) -> None:
        """Delete a study, its runs and its summaries (Optuna rows included).

        Raises:
            NotFound: No such study.
        """

    # ----------------------------------------------------------------------------- runs

    @abc.abstractmethod
    def create_run(
        self,
        namespace: str,
        study: str,
        recipe: Recipe,
        *,
        client_key: str | None = None,
        environment: dict[str, Any] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        stage: int = 0,
        request_hash: str | None = None,
    ) -> tuple[RunRecord, bool]:
        """Record that ``recipe`` was handed out and a job is starting it (state ``running``).

        The searchable parameters (batch size, peak LR, warmup/const ratios, optimizer, steps)
        come from ``recipe.stages[stage]`` and ``recipe.optimizer``; the whole recipe and its
        :meth:`Recipe.fingerprint` are kept too.

        Args:
            namespace: Owner namespace.
            study: Study name within the namespace.
            recipe: The recipe being run.
            client_key: Idempotency key chosen by the client (1..200 printable characters). A
                second call with the same key in the same study returns the first run.
            environment: JSON-serialisable description of the client's environment.
            lease_seconds: The run is ``running`` until this lease expires unless renewed
                by :meth:`heartbeat`; then :meth:`expire_leases` marks it ``preempted``.
            stage: Which recipe stage the run's parameters describe.
            request_hash: A digest of the whole request that opened the run. With it, a second call
                with the same ``client_key`` is a replay exactly when the digest is the same (the
                recipe may differ: the study learned in between); without it, when the recipe and
                the environment are.

        Returns:
            ``(run, created)``; ``created`` is False when ``client_key`` matched an existing run.

        Raises:
            NotFound: No such study.
            Conflict: ``client_key`` was already used for a different request (see ``request_hash``).
            InvalidArgument: An argument is malformed.
        """

    @abc.abstractmethod
    def get_run(self, run_id: int) -> RunRecord:
        """Return one run.

        Raises:
            NotFound: No such run.
            InvalidArgument: ``run_id`` is not a non-negative integer.
        """

    @abc.abstractmethod
    def list_runs(
        self,
        namespace: str,
        study: str,
        *,
        state: Outcome | None = None,
        batch_size: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page:
        """List the runs of a study in creation order, optionally filtered.

        Returns:
            ``Page(items=[RunRecord, ...], total=<all matching runs>)``.

        Raises:
            NotFound: No such study.
            InvalidArgument: Bad state, batch size, limit or offset.
        """

    @abc.abstractmethod
    def heartbeat(self, run_id: int, *, lease_seconds: float | None = None) -> RunRecord:
        """Renew the lease of a running run to now + ``lease_seconds`` (default: the run's
        current lease length, as given to :meth:`create_run` or the last heartbeat).

        Raises:
            NotFound: No such run.
            Conflict: The run finished (one the sweeper preempted is revived instead).
            InvalidArgument: ``lease_seconds`` is not a finite number > 0.
        """

    @abc.abstractmethod
    def report(self, run_id: int, step: int, loss: float, grad_norm: float | None = None,
               noise_scale: float | None = None) -> RunRecord:
        """Record an intermediate report (Optuna intermediate value at ``step``): ``report_batch`` of one."""

    @abc.abstractmethod
    def report_batch(self, run_id: int, reports: Sequence[tuple[Any, ...]]) -> RunRecord:
        """Record ``(step, loss, grad_norm, noise_scale[, NoisePoint])`` reports in one transaction
        (a ``records.NoisePoint`` with a ``noise_scale`` adds it to the run's trajectory).

        Idempotent per step: reporting the same step again overwrites it (within a batch, the later
        report of a step wins). Renews the lease by the run's lease length. ``loss`` and ``grad_norm``
        may be NaN/inf (a diverging job says so). ``noise_scale`` (the job's smoothed B_noise) becomes
        the run's ``noise_scale`` when its step is the run's newest. All or nothing.

        Raises:
            NotFound: No such run.
            Conflict: The run finished (one the sweeper preempted is revived instead).
            InvalidArgument: a ``step`` < 0 or not an int, ``loss``/``grad_norm`` not numbers,
                ``noise_scale`` outside ``NOISE_SCALE_RANGE``.
        """

    @abc.abstractmethod
    def noise_scale(self, namespace: str, study: str) -> float | None:
        """The median of the ``noise_scale`` of the study's runs that reported one; None if none did.

        Raises:
            NotFound: No such study.
        """

    @abc.abstractmethod
    def noise_trajectories(self, namespace: str, study: str, *, max_runs: int = 256
                           ) -> tuple[int, list[RunTrajectory]]:
        """The number of the study's runs with a noise trajectory, and those of the newest ``max_runs``
        (at most 256), each at most ``MAX_BUCKETS`` points. Raises NotFound: no such study."""

    @abc.abstractmethod
    def add_critical_batch(self, run_id: int, measurement: wire.MeasuredCriticalBatchIn
                           ) -> tuple[wire.MeasuredCriticalBatch, bool, bool]:
        """Record a critical batch measured by branching on a running run (a swept one is revived);
        (the stored one, created, revived). The same measurement at the same step again is the stored one.

        Raises:
            NotFound: No such run.
            Conflict: The run finished; another measurement at that step; the run has ``MAX_MEASURED_PER_RUN``.
            InvalidArgument: ``measurement`` is not a valid ``MeasuredCriticalBatchIn`` (nothing stored).
        """

    @abc.abstractmethod
    def measured_critical_batches(self, namespace: str, study: str, *, limit: int = 256
                                  ) -> tuple[int, list[wire.MeasuredCriticalBatch]]:
        """The number of the study's measured critical batches and the newest ``limit`` (at most 256),
        newest first. Raises NotFound: no such study."""

    @abc.abstractmethod
    def reports(self, run_id: int, *, after_step: int | None = None, offset: int = 0,
                limit: int | None = None) -> list[Report]:
        """The run's intermediate reports ordered by step: those after ``after_step`` (a keyset page: it
        costs the same at any step), skipping ``offset``, at most ``limit``.

        Raises:
            NotFound: No such run.
        """

    @abc.abstractmethod
    def report_count(self, run_id: int) -> int:
        """How many reports the run has.

        Raises:
            NotFound: No such run.
        """

    @abc.abstractmethod
    def report_curve(self, run_id: int, buckets: int) -> list[tuple[int, int, float, float, int]]:
        """The run's losses in at most ``buckets`` equal step ranges: ``(first step, last step, lowest finite
        loss, highest finite loss, non-finite count)`` per non-empty range, by step (None where a range
        has no finite loss). One aggregate query, whatever the run's length.

        Raises:
            NotFound: No such run.
        """

    @abc.abstractmethod
    def complete_run(
        self,
        run_id: int,
        outcome: StoredOutcome,
        *,
        metric: float | None = None,
        reason: str | None = None,
        step: int | None = None,
    ) -> RunRecord:
        """Record the final outcome of a run and update the batch-size summary.

        Args:
            run_id: The run.
            outcome: ``completed`` (``metric`` required, finite), ``diverged`` (``step`` and/or
                ``reason``), ``failed`` (crash not caused by the recipe), ``pruned`` (stopped
                early; ``step``) or ``preempted``.
            metric: Final metric value (``completed``; optional for ``pruned``).
            reason: Free text, at most 2000 characters.
            step: Step at which the run diverged / was pruned / stopped.

        Returns:
            The run in its final state. Completing again with the same outcome, and the same
            metric, reason and step where given, is a no-op that returns the stored run; anything
            else is :class:`Conflict`.

        Raises:
            NotFound: No such run.
            Conflict: The run already has a different final outcome.
            InvalidArgument: Unknown outcome, missing or non-finite metric for ``completed``, ...
        """

    @abc.abstractmethod
    def expire_leases(self, now: datetime | None = None) -> list[int]:
        """Mark every running run whose lease expired before ``now`` as ``preempted``.

        Safe to call from several processes at once: each run is preempted once.

        Returns:
            The ids of the runs preempted by this call.
        """

    # ----------------------------------------------------------------------------- history

    @abc.abstractmethod
    def history(self, namespace: str, study: str) -> list[BatchSummary]:
        """Per (batch size, LR units) of one study: counts, best completed LR/metric, smallest diverged
        LR, largest LR that did not diverge. Ordered by batch size, then units. Reads the compact
        summary table only (never whole studies).

        Raises:
            NotFound: No such study.
        """

    @abc.abstractmethod
    def family_history(
        self,
        family: str,
        min_params: int | None = None,
        max_params: int | None = None,
        *,
        namespace: str | None = None,
        metric: str | None = None,
        direction: Direction | None = None,
    ) -> list[BatchSummary]:
        """Like :meth:`history`, merged over every study of ``family`` whose ``model_params`` is
        in ``[min_params, max_params]`` (inclusive; ``None`` = unbounded), optionally only in
        ``namespace`` and only studies of ``metric``. Counts and LR bounds merge every matched
        study; ``best_lr``/``best_metric`` merge the studies whose direction is ``direction``
        (default: the direction all matched studies share, else ``"minimize"``). Each summary
        also carries ``n_studies`` (an extra field): how many studies had runs at that batch size and units.

        Raises:
            InvalidArgument: Bad family, bounds (min > max), namespace or direction.
        """

    @abc.abstractmethod
    def evidence(
        self,
        namespace: str,
        study: str,
        *,
        limit: int = 2000,
        family_band: tuple[str, int, int] | None = None,
    ) -> list[RunEvidence]:
        """The finished runs the recommender fits its scaling curve on (issue #7): one compact row
        per completed or diverged run (batch size, peak LR, warmup, optimizer, outcome, metric),
        newest first, at most ``limit``. Reads the indexed run table only, never Optuna trials.

        Args:
            family_band: ``(family, min_params, max_params)`` to add the runs of every study of
                that family and size band in ``namespace`` (the study's own runs are always in).

        Raises:
            NotFound: No such study.
            InvalidArgument: Bad names or limit.
        """

    @abc.abstractmethod
    def read_evidence(self, namespace: str, study: str, *, limit: int = 2000,
                      family_band: tuple[str, int, int] | None = None, known_version: tuple | None = None) -> Any:
        """What a recommendation reads of a study, in one transaction (an ``EvidenceRead``): the study,
        its per-batch summaries (and, with ``family_band``, its family's), the median noise scale, a
        ``version`` of its evidence that changes whenever one of those runs is opened or finishes or the study
        records a measured critical batch, and the finished runs as :meth:`evidence` gives them, or None when
        ``known_version`` is current.

        Raises:
            NotFound: No such study.
        """

    @abc.abstractmethod
    def rebuild_summaries(self, namespace: str | None = None, study: str | None = None) -> int:
        """Recompute the summary tables from the run rows (all studies, or one).

        Returns:
            Number of (study, batch size, LR units) summary rows written.
        """

    # ----------------------------------------------------------------------------- operations

    @abc.abstractmethod
    def ping(self, *, write: bool = False) -> bool:
        """Return True if the database answers (with ``write``: if it takes a write now); a database
        file that vanished is unavailable, not recreated empty.

        Raises:
            StoreUnavailable: It does not.
        """

    @abc.abstractmethod
    def schema_versions(self) -> dict[str, str]:
        """Return ``{"optuna": <alembic head of the Optuna schema>, "largebatch": <ours>}``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
