"""The HTTP wire contract of the REST service, shared by the service and the client.

The service validates requests and serialises responses with these models; the client parses
responses into them, so neither side sees raw dicts and the two cannot drift apart. Pure pydantic:
no web framework here.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .evidence import Direction, Outcome
from .models import MAX_COUNT, MAX_PARAMS, Family, Recipe, RecommendationRequest

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
FinalOutcome = Literal["completed", "diverged", "failed", "pruned"]
Scope = Literal["read", "write"]

T = TypeVar("T")


class _In(BaseModel):
    # Strict: `true` or `"512"` is not a number; JSON integers are accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True)


# Limits of what the service stores, enforced at parse time (422) and the same on every backend.
MAX_METRIC = 1e15  # a final metric's magnitude: any loss, accuracy or perplexity fits; its square stays finite
MAX_LOSS = 3.4028234663852886e38  # a finite loss or gradient norm: anything float32 training can produce
MAX_REPORT_BATCH = 1000  # reports per request (the client's default batch)
MAX_SEEN = 1e18  # examples or tokens seen by one run: 10^4 x the largest corpora trained on


def _bounded(name: str, v: float | None, bound: float, *, nonfinite: bool) -> float | None:
    if v is None or (nonfinite and not math.isfinite(v)):
        return v  # a NaN/inf loss is the divergence signal itself
    if not math.isfinite(v) or abs(v) > bound:
        raise ValueError(f"{name} must be a finite number in [-{bound:g}, {bound:g}]"
                         + (" (or NaN/Infinity for a diverged step)" if nonfinite else ""))
    return v


class _Out(BaseModel):
    # Newer services may add fields; older clients must still parse the response.
    model_config = ConfigDict(extra="ignore")


# Every error ``type`` the service can answer with, and the HTTP status it comes with. Fixed set:
# the client maps each 1:1 to an exception class; a new type is an additive change to this table.
ERROR_TYPES: dict[str, int] = {
    "validation_error": 422,  # bad input; ``detail`` is a list of {"loc": [...], "msg": ..., "type": ...}
    "bad_request": 400,  # malformed request that is not a field error (e.g. body is not JSON)
    "unauthorized": 401,  # no key, unknown key or revoked key (``WWW-Authenticate: Bearer``)
    "forbidden": 403,  # key lacks the scope for this operation
    "not_found": 404,  # study / run / route does not exist (or is in another namespace)
    "method_not_allowed": 405,
    "already_exists": 409,  # a study with that name exists in the namespace
    "conflict": 409,  # state conflict: e.g. completing a run already finished with another outcome
    "payload_too_large": 413,  # body above the configured limit
    "unsupported_media_type": 415,
    "rate_limited": 429,  # ``Retry-After`` header says when to retry
    "internal_error": 500,  # a bug; never carries a stack trace
    "store_unavailable": 503,  # the study store cannot be reached; ``Retry-After`` header
}


class ErrorBody(_Out):
    """Every failure: ``{"type": ..., "detail": ...}``. ``type`` maps to a client exception class."""

    type: str
    detail: str | list[dict[str, Any]]


# ----- studies -----


class StudyCreate(_In):
    name: str = Field(pattern=NAME_PATTERN)
    model_family: Family = "transformer"
    model_params: int = Field(gt=0, le=MAX_PARAMS)
    metric: str = Field(default="eval_loss", min_length=1, max_length=128)
    direction: Direction = "minimize"


class Study(_Out):
    name: str
    namespace: str
    model_family: str
    model_params: int
    metric: str
    direction: Direction
    created_at: datetime
    n_runs: int = 0


class Page(_Out, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


# ----- the critical batch along the run -----


class CriticalBatchPoint(_Out):
    """The fitted critical batch at one point (the field names of ``reference.noise_trajectory``)."""

    examples_seen: float
    tokens_seen: float | None = Field(default=None, description="When every pooled point gave tokens seen.")
    noise_scale: float = Field(description="CriticalBatchCalibration factor x the fitted B_noise (examples).")
    noise_scale_low: float = Field(description="Lower end of the 95% band.")
    noise_scale_high: float = Field(description="Upper end of the 95% band.")


class PooledNoisePoint(_Out):
    """The runs' trajectory points that fell in one bin of examples seen, pooled."""

    examples_seen: float = Field(description="Mean over the runs' points.")
    tokens_seen: float | None = None
    noise_scale: float = Field(description="Geometric mean of the runs' B_noise (uncalibrated).")
    runs: int
    reports: int


class CriticalBatchCalibration(_Out):
    """Streaming statistic to measured critical batch, for one study: 1.0 until measured critical batches
    (branches from checkpoints) are its evidence; then the geometric mean over them of measured B_crit /
    the streaming B_noise at their point (the one the job sent with it, else the fitted curve's)."""

    factor: float = Field(default=1.0, description="Measured critical batch / streaming B_noise; multiplies "
                                                   "the fitted curve.")
    measured: int = Field(default=0, description="Measured critical batches behind the factor.")
    factor_low: float | None = Field(default=None, description="Lower end of the factor's 95% t-interval "
                                                               "(in log), from 2 measurements on.")
    factor_high: float | None = None
    geometric_sd: float | None = Field(default=None, description="Spread of the ratios (x/÷), from 2 on.")
    detail: str


MAX_MEASURED_PER_RUN = 64  # measured critical batches one run may record
MAX_KS = 16


def _positive_finite(name: str, v: float | None) -> float | None:
    if v is not None and not (math.isfinite(v) and 0 < v <= MAX_SEEN):
        raise ValueError(f"{name} must be a finite number in (0, {MAX_SEEN:g}]")
    return v


class MeasuredCriticalBatchIn(_In):
    """``POST /v1/runs/{id}/critical-batches``: a critical batch measured by branching at one point of the
    run (``job.branch_probe`` sends it). B in examples."""

    step: int = Field(ge=0, le=MAX_COUNT, description="The run's step where it was measured.")
    examples_seen: float = Field(description="Examples trained on up to that step (> 0).")
    tokens_seen: float | None = Field(default=None, ge=0, le=MAX_SEEN)
    critical_batch: float = Field(description="The measured B_crit (examples).")
    critical_batch_low: float = Field(description="Lower end of its interval (<= critical_batch).")
    critical_batch_high: float | None = Field(default=None, description=(
        "Upper end (>= critical_batch); null when the branches did not bound it from above."))
    noise_scale: float | None = Field(default=None, description="The job's streaming B_noise at that point, if "
                                                                "it measured one.")
    batch_size: int = Field(ge=1, le=MAX_COUNT, description="B: the k = 1 branch's global batch.")
    ks: list[int] = Field(min_length=2, max_length=MAX_KS, description="The batch multiples branched (k x B).")
    window_examples: int | None = Field(default=None, ge=1, le=MAX_COUNT)

    @field_validator("examples_seen", "critical_batch", "critical_batch_low", "critical_batch_high", "noise_scale")
    @classmethod
    def _finite(cls, v: float | None, info: Any) -> float | None:
        return _positive_finite(info.field_name, v)

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if any(not 1 <= k <= 1024 for k in v) or len(set(v)) != len(v):
            raise ValueError("ks must be distinct integers in [1, 1024]")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> MeasuredCriticalBatchIn:
        if self.critical_batch_low > self.critical_batch:
            raise ValueError("critical_batch_low must be <= critical_batch")
        if self.critical_batch_high is not None and self.critical_batch_high < self.critical_batch:
            raise ValueError("critical_batch_high must be >= critical_batch")
        return self


class MeasuredCriticalBatch(_Out):
    """A stored measured critical batch."""

    id: int
    run_id: int
    step: int
    examples_seen: float
    tokens_seen: float | None = None
    critical_batch: float
    critical_batch_low: float
    critical_batch_high: float | None = None
    noise_scale: float | None = None
    batch_size: int
    ks: list[int]
    window_examples: int | None = None
    created_at: datetime


class CriticalBatchFit(_Out):
    """B_noise along the examples seen: a power law, least squares in log-log, with a 95% band."""

    model: Literal["power_law"] = "power_law"
    formula: str = "noise_scale = factor * coefficient * examples_seen ** exponent"
    coefficient: float
    exponent: float
    exponent_low: float
    exponent_high: float
    confidence: float = 0.95
    interval: Literal["run_bootstrap", "t_points"] = Field(description=(
        "run_bootstrap: percentile bootstrap over runs; t_points: t-interval over the points of fewer than "
        "5 runs, optimistic (a run's smoothed points are correlated)"))
    residual_rms: float = Field(description="RMS of the log residuals (0.1: the points sit ~10% off the curve).")
    points: list[CriticalBatchPoint]


class CriticalBatchOut(_Out):
    """``GET /v1/studies/{name}/critical-batch``."""

    study: str
    unit: Literal["examples"] = "examples"
    runs: int = Field(description="Runs whose trajectories were pooled (the newest, at most 64).")
    runs_with_trajectory: int
    fit: CriticalBatchFit | None = None
    reason: str | None = Field(default=None, description="Why there is no fit, when there is none.")
    calibration: CriticalBatchCalibration
    points: list[PooledNoisePoint] = Field(default_factory=list)


# ----- runs -----


class RunFields(BaseModel):
    """What a run is, shared by the wire :class:`Run` and the store's ``RunRecord`` (which keeps the
    recipe as its JSON object and adds the client's idempotency key)."""

    id: int
    study: str
    namespace: str
    number: int
    state: Outcome
    batch_size: int
    peak_lr: float
    warmup_ratio: float
    const_ratio: float
    optimizer: str
    steps: int
    recipe: Any
    recipe_hash: str
    environment: dict[str, Any] = Field(default_factory=dict)
    metric: float | None = None
    reason: str | None = None
    diverged_step: int | None = None
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime | None = None
    last_step: int | None = None
    last_loss: float | None = None
    noise_scale: float | None = None  # the latest (smoothed) gradient noise scale B_noise the job reported


class Run(RunFields, _Out):
    recipe: Recipe


class RunCreate(_In):
    """Open a run from a recipe the caller already has, or from a request (the service computes it)."""

    recipe: Recipe | None = None
    request: RecommendationRequest | None = None
    environment: dict[str, Any] = Field(default_factory=dict)


class ReportIn(_In):
    step: int = Field(ge=0, le=MAX_COUNT)
    loss: float
    grad_norm: float | None = None
    noise_scale: float | None = Field(default=None, description="The job's smoothed gradient noise scale "
                                                                "B_noise (examples) at this step, if it measures it")
    # The estimator's components (McCandlish et al. 2018, App. A), smoothed as noise_scale is:
    # noise_scale = trace_sigma / grad_sq, so the two come together and agree with it.
    grad_sq: float | None = Field(default=None, description="The smoothed |G|^2 estimate behind noise_scale")
    trace_sigma: float | None = Field(default=None, description="The smoothed tr(Sigma) estimate behind "
                                                                "noise_scale (per example)")
    examples_seen: float | None = Field(default=None, ge=0, le=MAX_SEEN, description=(
        "Examples (sequences) trained on up to and including this step: the axis of the run's noise "
        "trajectory (B_noise is in examples)"))
    tokens_seen: float | None = Field(default=None, ge=0, le=MAX_SEEN, description=(
        "Tokens trained on up to this step (with examples_seen), to read the trajectory in tokens"))

    @field_validator("noise_scale", "grad_sq", "trace_sigma")
    @classmethod
    def _positive(cls, v: float | None, info: Any) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name} must be a finite number > 0")
        return v

    @model_validator(mode="after")
    def _components_agree(self) -> ReportIn:
        if (self.grad_sq is None) != (self.trace_sigma is None):
            raise ValueError("grad_sq and trace_sigma come together (noise_scale = trace_sigma / grad_sq)")
        if self.grad_sq is not None:
            ratio = self.trace_sigma / self.grad_sq  # type: ignore[operator]
            if self.noise_scale is None:
                self.noise_scale = ratio
            elif not math.isclose(self.noise_scale, ratio, rel_tol=1e-3):
                raise ValueError(f"noise_scale ({self.noise_scale:g}) must equal trace_sigma / grad_sq ({ratio:g})")
        if self.tokens_seen is not None and self.examples_seen is None:
            raise ValueError("tokens_seen needs examples_seen (the trajectory's axis: B_noise is in examples)")
        return self

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: float) -> float:
        return _bounded("loss", v, MAX_LOSS, nonfinite=True)  # type: ignore[return-value]

    @field_validator("grad_norm")
    @classmethod
    def _grad_norm(cls, v: float | None) -> float | None:
        # A NaN loss is information (divergence); a negative norm is a bug in the caller.
        if v is not None and not math.isnan(v) and v < 0:
            raise ValueError("grad_norm must be >= 0")
        return _bounded("grad_norm", v, MAX_LOSS, nonfinite=True)


class ReportBatchIn(_In):
    """Several reports in one request (the client batches them in the background)."""

    reports: list[ReportIn] = Field(min_length=1, max_length=MAX_REPORT_BATCH)


class ReportOut(_Out):
    run: Run
    should_stop: bool = False
    reason: str | None = None


class ReportPoint(_Out):
    """One stored report, as ``GET /v1/runs/{id}/reports`` gives it."""

    step: int
    loss: float | None = Field(description="null when the reported loss was NaN or infinite (JSON has neither)")
    grad_norm: float | None = None
    finite: bool = Field(description="false when the reported loss was NaN or infinite")


class ReportPage(_Out):
    """A page of a run's reports, by step."""

    run_id: int
    items: list[ReportPoint]
    total: int
    limit: int
    offset: int


class CompleteIn(_In):
    # preempted: the job was told to stop from outside (SIGTERM from SLURM or Kubernetes) and says so.
    outcome: Literal[FinalOutcome, "preempted"]  # type: ignore[valid-type]
    metric: float | None = None
    reason: str | None = Field(default=None, max_length=2000)
    step: int | None = Field(default=None, ge=0, le=MAX_COUNT)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: float | None) -> float | None:
        return _bounded("metric", v, MAX_METRIC, nonfinite=False)


class HeartbeatOut(_Out):
    run: Run
    should_stop: bool = False
    reason: str | None = None


# ----- recommendations -----


class RecommendationIn(RecommendationRequest):
    """The engine's request plus where to file it."""

    study: str | None = Field(default=None, pattern=NAME_PATTERN)
    start_run: bool = False
    environment: dict[str, Any] = Field(default_factory=dict)
    use_family_evidence: bool = False
    explore: int = Field(default=0, ge=0, le=64)
    explore_warmup: bool = Field(default=False, description=(
        "With explore: the variants vary the warmup too, shorter only (1/8 to 1 x the recipe's warmup ratio), "
        "sampled with the LR, so the study's evidence can learn the warmup"))


class RecommendationOut(Recipe):
    """The recipe, plus the run opened for it when ``start_run`` was asked."""

    run: Run | None = None
    variants: list[Recipe] = Field(default_factory=list)
    variant_runs: list[Run] = Field(default_factory=list)


# ----- API keys (admin CLI only) -----


class ApiKey(_Out):
    id: int
    namespace: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None = None
    prefix: str


# ----- operations -----


class HealthOut(_Out):
    """``GET /healthz``: the process is alive."""

    status: Literal["ok"] = "ok"
    version: str


class ReadyOut(_Out):
    """``GET /readyz``: the study store answers; ``schema_versions`` = {"optuna": ..., "largebatch": ...}."""

    status: Literal["ready"] = "ready"
    version: str
    schema_versions: dict[str, str] = Field(default_factory=dict)
