"""largebatch.client: ask the service for a large-batch recipe, train with it, report back.

::

    from largebatch.client import Client

    job = Client("http://127.0.0.1:8000").autoconfigure(
        model, study="my-model", reference={"batch_size": 512, "lr": 6.25e-4, "steps": 10_000},
        target_batch_size=8192)
    with job:                       # optimizer + scheduler built from the recipe
        ...; job.optimizer.step(); job.scheduler.step(); job.report(step, loss)
        job.complete(eval_loss)

Importing this package imports neither torch nor anything of the service; torch comes in with
:mod:`largebatch.client.optim` (and :meth:`Client.autoconfigure`, which uses it).
"""

from largebatch.scaling_rules.models import Recipe, RecommendationRequest, Reference
from largebatch.scaling_rules.wire import (
    ERROR_TYPES,
    CompleteIn,
    HealthOut,
    HeartbeatOut,
    Page,
    ReadyOut,
    RecommendationIn,
    RecommendationOut,
    ReportBatchIn,
    ReportIn,
    ReportOut,
    ReportPage,
    ReportPoint,
    Run,
    RunCreate,
    Study,
    StudyCreate,
)

from ._async_client import AsyncClient
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._client import Client
from ._version import __version__
from .errors import (
    ERROR_CLASSES,
    AlreadyExistsError,
    APIConnectionError,
    APIError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    InvalidRequestError,
    JobError,
    LargebatchError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    StoreUnavailableError,
    UnsupportedMediaTypeError,
)
from .job import Job, Preempted
from .offline import recommend_local

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "ERROR_CLASSES",
    "ERROR_TYPES",
    "APIConnectionError",
    "APIError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AlreadyExistsError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "CompleteIn",
    "ConflictError",
    "HealthOut",
    "HeartbeatOut",
    "InternalServerError",
    "InvalidRequestError",
    "Job",
    "JobError",
    "LargebatchError",
    "MethodNotAllowedError",
    "NotFoundError",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Preempted",
    "RateLimitError",
    "ReadyOut",
    "Recipe",
    "RecommendationIn",
    "RecommendationOut",
    "RecommendationRequest",
    "Reference",
    "ReportBatchIn",
    "ReportIn",
    "ReportOut",
    "ReportPage",
    "ReportPoint",
    "Run",
    "RunCreate",
    "ServerError",
    "StoreUnavailableError",
    "Study",
    "StudyCreate",
    "UnsupportedMediaTypeError",
    "__version__",
    "recommend_local",
]
