"""Request dependencies: the store, the caller (API key) and the settings, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from largebatch.service.auth import Principal, authenticate
from largebatch.service.errors import ApiError, validation_details
from largebatch.service.settings import Settings
from largebatch.service.storage.base import StoreError, StoreUnavailable, StudyStore

__all__ = ["IdempotencyKey", "Reader", "SettingsDep", "StoreDep", "StoreHolder", "Writer"]

log = logging.getLogger("largebatch.service")
M = TypeVar("M", bound=BaseModel)


def store_options(settings: Settings) -> dict:
    """How the service bounds its waits on the database (``store_timeout_s``): the pool checkout, every
    PostgreSQL statement, SQLite's busy handler and the retries of busy transactions."""
    t = settings.store_timeout_s
    pg = {"pool_timeout": t, "connect_args": {"connect_timeout": max(1, round(t))}}
    return {"engine_kwargs": pg if _is_postgres(settings.store_url) else None,
            "busy_timeout_s": min(t, 5.0), "busy_deadline_s": t, "statement_timeout_s": t}


def _is_postgres(url: str | None) -> bool:
    return url is not None and url.strip().startswith(("postgresql", "postgres:"))


class StoreHolder:
    """Owns the store of one worker process.

    The store is opened at start-up; if the database is down then, the service still starts
    (``/healthz`` is alive, ``/readyz`` and store-backed routes answer 503 with Retry-After) and
    the schema is initialised on the first request after the database comes back.
    """

    def __init__(self, settings: Settings, store: StudyStore | None = None):
        self.settings = settings
        self.store = store
        self.owned = store is None
        self.ready = store is not None  # an injected store is the caller's to initialise
        self._lock = threading.Lock()
        self._next_try = 0.0

    def open(self) -> None:
        try:
            self._ensure()
        except StoreUnavailable as e:
            log.warning("study store unavailable at start-up (%s); serving 503 until it is reachable", e)

    def _ensure(self) -> StudyStore:
        from largebatch.service.storage import open_store

        with self._lock:
            if self.ready and self.store is not None:
                return self.store
            now = time.monotonic()
            if now < self._next_try:  # it failed a moment ago: do not hammer a database that is down
                raise StoreUnavailable("the study store is unavailable")
            if self.store is None:
                # Creates/upgrades the schema (under a cross-process lock) unless told a deploy step did.
                try:
                    self.store = open_store(self.settings.store_url, initialize=self.settings.init_schema,
                                            **store_options(self.settings))
                except StoreUnavailable:
                    self._next_try = now + self.settings.retry_after_s
                    raise
                except DBAPIError as e:  # a driver error escaping the store while it sets up: database down
                    self._next_try = now + self.settings.retry_after_s
                    raise StoreUnavailable(f"cannot open the study store: {type(e).__name__}") from e
            self.ready = True
            return self.store

    def get(self) -> StudyStore:
        if self.ready and self.store is not None:
            return self.store
        return self._ensure()

    def close(self) -> None:
        if self.owned and self.store is not None:
            try:
                self.store.close()
            except StoreError as e:  # closing a store whose database is gone
                log.warning("closing the study store: %s", e)
            self.store = None
            self.ready = False


async def get_store(request: Request) -> StudyStore:
    holder: StoreHolder = request.app.state.store_holder
    if holder.ready and holder.store is not None:
        return holder.store
    return await run_in_threadpool(holder.get)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_reader(request: Request) -> Principal:
    return await authenticate(request, "read")


async def get_writer(request: Request) -> Principal:
    return await authenticate(request, "write")


IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]+$"
MAX_IDEMPOTENCY_KEY = 200


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: 1..200 printable ASCII characters (surrounding blanks ignored)."""
    if value is None:
        return None
    value = value.strip()
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY or not value.isascii() or not value.isprintable():
        raise ApiError("validation_error", [{"loc": ["header", "Idempotency-Key"],
                                             "msg": "must be 1 to 200 printable ASCII characters",
                                             "type": "value_error"}])
    return value


def variant_key(key: str | None, i: int) -> str | None:
    """The key of an ``explore`` request's i-th variant run: the request's key and the variant's number,
    with a long key replaced by its digest so that every variant key fits the store's 200 characters."""
    if key is None:
        return None
    suffix = f":explore-{i}"
    if len(key) + len(suffix) > MAX_IDEMPOTENCY_KEY:
        key = hashlib.sha256(key.encode()).hexdigest()
    return key + suffix


async def _idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY_PATTERN,
               description="Same key, same run: a retried request returns the run the first one opened."),
    ] = None,
) -> str | None:
    return check_idempotency_key(idempotency_key)


def parse_json_body(model: type[M], raw: bytes, *, strict: bool = False) -> M:
    """Validate a JSON request body straight from its bytes; errors shaped like FastAPI's (loc starts "body").
    ``strict``: no coercion (``true`` or ``"512"`` is not a number)."""
    if not raw.strip():
        raise ApiError("validation_error", [{"loc": ["body"], "msg": "Field required", "type": "missing"}])
    try:
        return model.model_validate_json(raw, strict=strict or None)
    except ValidationError as e:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            raise ApiError("validation_error", [{"loc": ["body"], "msg": "request body is not valid JSON",
                                                 "type": "json_invalid"}]) from None
        raise ApiError("validation_error", validation_details(errors, ("body",))) from None


def strict_body(model: type[M]):
    """A route's JSON body, parsed once from its bytes and strictly: a recipe posted by a client says what it
    means, numbers as numbers (``true`` or ``"512"`` is 422). Declare it after the caller's dependencies (they
    answer first) and document it with :func:`body_doc` (FastAPI no longer sees a body to describe)."""

    async def parse(request: Request) -> M:
        return parse_json_body(model, await request.body(), strict=True)

    return Depends(parse)


_BODY_MODELS: dict[str, type[BaseModel]] = {}


def body_doc(model: type[BaseModel]) -> dict:
    """The ``openapi_extra`` that documents a :func:`strict_body`; :func:`add_body_schemas` puts its model
    in the document's components."""
    _BODY_MODELS[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_body_schemas(schema: dict) -> None:
    """The models of :func:`body_doc` (and those they refer to) in the OpenAPI document's components, where
    FastAPI, which sees no body param to collect, did not put them."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, model in _BODY_MODELS.items():
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for sub, sub_schema in own.pop("$defs", {}).items():
            components.setdefault(sub, sub_schema)
        components.setdefault(name, own)


StoreDep = Annotated[StudyStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Reader = Annotated[Principal, Depends(get_reader)]
Writer = Annotated[Principal, Depends(get_writer)]
IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]
