"""The client's exceptions: one class per error ``type`` the service answers with.

The service's side of the contract is :data:`largebatch.scaling_rules.wire.ERROR_TYPES` (type ->
HTTP status). :data:`ERROR_CLASSES` below is the client's side: type -> exception class, one entry
per wire type (a test checks the two tables cover the same types with the same statuses).

Hierarchy::

    LargebatchError
    ├── APIError                       anything that went wrong talking to the service
    │   ├── APIConnectionError         no HTTP response: refused, reset, DNS, ...
    │   │   └── APITimeoutError
    │   ├── APIResponseError           a 2xx response whose body is not what the contract says
    │   └── APIStatusError             an HTTP error response (``status_code``, ``type``, ``detail``)
    │       ├── BadRequestError              400 bad_request
    │       ├── AuthenticationError          401 unauthorized
    │       ├── PermissionDeniedError        403 forbidden
    │       ├── NotFoundError                404 not_found
    │       ├── MethodNotAllowedError        405 method_not_allowed
    │       ├── AlreadyExistsError           409 already_exists
    │       ├── ConflictError                409 conflict
    │       ├── PayloadTooLargeError         413 payload_too_large
    │       ├── UnsupportedMediaTypeError    415 unsupported_media_type
    │       ├── InvalidRequestError          422 validation_error
    │       ├── RateLimitError               429 rate_limited
    │       └── ServerError                  any 5xx
    │           ├── InternalServerError      500 internal_error
    │           └── StoreUnavailableError    503 store_unavailable
    └── JobError                       a training job could not do what was asked (e.g. reports undelivered)
"""

from __future__ import annotations

from typing import Any

import httpx

from largebatch.scaling_rules.wire import ErrorBody

__all__ = [
    "ERROR_CLASSES",
    "APIConnectionError",
    "APIError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AlreadyExistsError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "InvalidRequestError",
    "JobError",
    "LargebatchError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "StoreUnavailableError",
    "UnsupportedMediaTypeError",
    "error_from_response",
]


class LargebatchError(Exception):
    """Base class of every exception this package raises on purpose."""


class JobError(LargebatchError):
    """A training job could not do what was asked, e.g. deliver its reports before a deadline."""


class APIError(LargebatchError):
    """Something went wrong talking to the service. ``request`` is the last request sent."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    """No HTTP response came back (connection refused or reset, DNS failure, protocol error)."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """The request timed out."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseError(APIError):
    """A successful response whose body does not parse as the contract's model."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message, request=response.request)
        self.response = response


class APIStatusError(APIError):
    """An HTTP error response. ``type`` and ``detail`` come from the service's error body.

    Subclasses carry the literal ``status_code`` they stand for; an instance's ``status_code`` is
    always the one actually received.
    """

    status_code: int = 0
    type: str = ""

    def __init__(self, message: str, *, response: httpx.Response, body: ErrorBody | None) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.type = body.type if body is not None else type(self).type
        self.detail: str | list[dict[str, Any]] | None = body.detail if body is not None else None

    @property
    def retry_after(self) -> str | None:
        """The ``Retry-After`` header, if the service sent one (429, 503)."""
        return self.response.headers.get("retry-after")


class BadRequestError(APIStatusError):
    status_code = 400
    type = "bad_request"


class AuthenticationError(APIStatusError):
    status_code = 401
    type = "unauthorized"


class PermissionDeniedError(APIStatusError):
    status_code = 403
    type = "forbidden"


class NotFoundError(APIStatusError):
    status_code = 404
    type = "not_found"


class MethodNotAllowedError(APIStatusError):
    status_code = 405
    type = "method_not_allowed"


class AlreadyExistsError(APIStatusError):
    status_code = 409
    type = "already_exists"


class ConflictError(APIStatusError):
    status_code = 409
    type = "conflict"


class PayloadTooLargeError(APIStatusError):
    status_code = 413
    type = "payload_too_large"


class UnsupportedMediaTypeError(APIStatusError):
    status_code = 415
    type = "unsupported_media_type"


class InvalidRequestError(APIStatusError):
    """The service refused a field of the request; ``detail`` lists ``{"loc", "msg", "type"}``."""

    status_code = 422
    type = "validation_error"


class RateLimitError(APIStatusError):
    status_code = 429
    type = "rate_limited"


class ServerError(APIStatusError):
    """Any 5xx, including ones from a proxy in front of the service (``type`` then empty)."""

    status_code = 500


class InternalServerError(ServerError):
    status_code = 500
    type = "internal_error"


class StoreUnavailableError(ServerError):
    status_code = 503
    type = "store_unavailable"


# The one mapping table: the service's error ``type`` -> exception class. Mirrors wire.ERROR_TYPES.
ERROR_CLASSES: dict[str, type[APIStatusError]] = {
    "bad_request": BadRequestError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "method_not_allowed": MethodNotAllowedError,
    "already_exists": AlreadyExistsError,
    "conflict": ConflictError,
    "payload_too_large": PayloadTooLargeError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "validation_error": InvalidRequestError,
    "rate_limited": RateLimitError,
    "internal_error": InternalServerError,
    "store_unavailable": StoreUnavailableError,
}

# When the body carries no known ``type`` (a proxy's HTML page, an older service), the status
# decides. Derived from the table; for 409 (two types) the general ``conflict`` wins.
_BY_STATUS: dict[int, type[APIStatusError]] = {}
for _cls in ERROR_CLASSES.values():
    _BY_STATUS.setdefault(_cls.status_code, _cls)
_BY_STATUS[409] = ConflictError


def _parse_body(response: httpx.Response) -> ErrorBody | None:
    try:
        return ErrorBody.model_validate_json(response.content)
    except ValueError:
        return None


def _format_detail(detail: str | list[dict[str, Any]]) -> str:
    if isinstance(detail, str):
        return detail
    parts = []
    for item in detail:
        loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
        msg = str(item.get("msg", item))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error response: by the body's ``type``, else by the status code."""
    body = _parse_body(response)
    cls = ERROR_CLASSES.get(body.type) if body is not None else None
    if cls is None:
        status = response.status_code
        cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    if body is not None:
        message = f"{response.status_code} {body.type}: {_format_detail(body.detail)}"
    else:
        text = response.text.strip().replace("\n", " ")
        message = f"{response.status_code} {response.reason_phrase}" + (f": {text[:200]}" if text else "")
    return cls(message, response=response, body=body)
