"""One error shape for every failure: ``{"type": ..., "detail": ...}`` with the status of
:data:`largebatch.scaling_rules.wire.ERROR_TYPES`.

Domain errors (the store's, the engine's) are mapped by one table; request validation becomes
``validation_error`` with a ``detail`` list naming each field by its ``loc``; anything unexpected
is logged with its traceback and answered ``internal_error`` without one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from largebatch.scaling_rules.engine import RecipeError
from largebatch.scaling_rules.wire import ERROR_TYPES, ErrorBody
from largebatch.service.storage.base import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    StoreError,
    StoreUnavailable,
)

__all__ = ["ERROR_RESPONSES", "ApiError", "error_response", "install_error_handlers", "validation_details"]

log = logging.getLogger("largebatch.service")

_STATUS_TYPES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
    429: "rate_limited", 503: "store_unavailable",
}


# Tags of discriminated request unions (routes/runs.py): pydantic puts them in loc; they name no field.
_UNION_TAGS = frozenset({"single-report", "report-batch"})


class ApiError(Exception):
    """Raise from anywhere in a request to answer with ``{"type", "detail"}``."""

    def __init__(self, type: str, detail: str | list[dict[str, Any]], *, headers: Mapping[str, str] | None = None):
        if type not in ERROR_TYPES:
            raise ValueError(f"unknown error type {type!r}")
        super().__init__(detail)
        self.type = type
        self.status = ERROR_TYPES[type]
        self.detail = detail
        self.headers = dict(headers or {})


def field_error(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> ApiError:
    """A 422 naming one field, shaped like FastAPI's own validation errors."""
    return ApiError("validation_error", [{"loc": list(loc), "msg": msg, "type": kind}])


def error_response(type: str, detail: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": type, "detail": detail}, status_code=ERROR_TYPES[type], headers=dict(headers or {}))


def _clean_loc(loc: Sequence[Any]) -> list[str | int]:
    # pydantic puts validator names ("function-after[...]") and union tags in loc; they name no field.
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        else:
            s = str(part)
            if s.startswith(("function-", "json-or-python", "lax-or-strict")) or s in _UNION_TAGS:
                continue
            out.append(s)
    return out


def validation_details(errors: Sequence[Mapping[str, Any]], prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    """pydantic/FastAPI errors -> JSON-safe ``[{"loc": [...], "msg": ..., "type": ...}]`` (no input echo)."""
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"loc": [*prefix, *_clean_loc(e.get("loc", ()))], "msg": msg, "type": str(e.get("type", "value_error"))})
    return out


def store_error(e: StoreError, retry_after: int) -> ApiError:
    if isinstance(e, StoreUnavailable):
        return ApiError("store_unavailable", "the study store is unavailable; retry later",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(e, NotFound):
        return ApiError("not_found", str(e) or "not found")
    if isinstance(e, AlreadyExists):
        return ApiError("already_exists", str(e))
    if isinstance(e, Conflict):
        return ApiError("conflict", str(e))
    if isinstance(e, InvalidArgument):
        return ApiError("validation_error", [{"loc": ["body"], "msg": str(e), "type": "value_error"}])
    log.error("store error: %s", e, exc_info=e)
    return ApiError("internal_error", "internal error")


# Documented on every route (OpenAPI) so a client and a schema fuzzer know every answer's shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": ", ".join(t for t, s in ERROR_TYPES.items() if s == status)}
    for status in sorted(set(ERROR_TYPES.values()))
}


def install_error_handlers(app: FastAPI) -> None:
    def retry_after(request: Request) -> int:
        return request.app.state.settings.retry_after_s

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.type, exc.detail, exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        e = store_error(exc, retry_after(request))
        return error_response(e.type, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response("validation_error", [
                {"loc": ["body"], "msg": "request body is not valid JSON", "type": "json_invalid"}])
        return error_response("validation_error", validation_details(errors))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response("validation_error", validation_details(exc.errors(), ("body",)))

    @app.exception_handler(RecipeError)
    async def _recipe(request: Request, exc: RecipeError) -> JSONResponse:
        return error_response("validation_error", [{"loc": ["body"], "msg": str(exc), "type": "recipe_error"}])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path}"
        return error_response(kind, detail, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response("internal_error", "internal error")
