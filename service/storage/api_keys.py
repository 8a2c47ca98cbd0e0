"""API keys: their own store (:class:`ApiKeyStore`), on the ``lb_api_keys`` table. Only a sha256 of
each key is stored; the plaintext is shown once, at creation."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, get_args

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from largebatch.service.storage import _schema as sch
from largebatch.service.storage._checks import _aware, _int, _now
from largebatch.service.storage._db import Database
from largebatch.service.storage.base import (
    ApiKeyRecord,
    ApiKeyStore,
    InvalidArgument,
    NotFound,
    Scope,
    validate_name,
)

__all__ = ["SqlApiKeyStore"]

_KEY_PREFIX = "lbk_"


class SqlApiKeyStore(ApiKeyStore):
    """:class:`ApiKeyStore` on the store's database (shares the :class:`Database` it is given)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _write(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=True)

    def _read(self, fn):  # type: ignore[no-untyped-def]
        return self._db.run(fn, write=False)

    def create_api_key(self, namespace: str, scope: Scope = "write") -> tuple[int, str]:
        validate_name("namespace", namespace)
        if scope not in get_args(Scope):
            raise InvalidArgument(f"scope must be 'read' or 'write', got {scope!r}")
        plaintext = _KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hashlib.sha256(plaintext.encode()).hexdigest()

        def tx(conn: Connection) -> int:
            return conn.execute(
                sch.lb_api_keys.insert().values(
                    key_hash=digest, prefix=plaintext[:12], namespace=namespace, scope=scope, created_at=_now()
                )
            ).inserted_primary_key[0]

        return self._write(tx), plaintext

    @staticmethod
    def _key_record(row: Any) -> ApiKeyRecord:
        return ApiKeyRecord(
            id=row.key_id,
            namespace=row.namespace,
            scope=row.scope,
            created_at=_aware(row.created_at),
            revoked_at=_aware(row.revoked_at),
            prefix=row.prefix,
        )

    def list_api_keys(self, namespace: str | None = None) -> list[ApiKeyRecord]:
        if namespace is not None:
            validate_name("namespace", namespace)
        k = sch.lb_api_keys
        q = select(k).order_by(k.c.key_id)
        if namespace is not None:
            q = q.where(k.c.namespace == namespace)
        return self._read(lambda conn: [self._key_record(r) for r in conn.execute(q)])

    def revoke_api_key(self, key_id: int) -> ApiKeyRecord:
        _int("key_id", key_id, minimum=0)
        k = sch.lb_api_keys

        def tx(conn: Connection) -> ApiKeyRecord:
            conn.execute(update(k).where(k.c.key_id == key_id, k.c.revoked_at.is_(None)).values(revoked_at=_now()))
            row = conn.execute(select(k).where(k.c.key_id == key_id)).first()
            if row is None:
                raise NotFound(f"API key {key_id} not found")
            return self._key_record(row)

        return self._write(tx)

    def lookup_api_key(self, plaintext: str) -> ApiKeyRecord | None:
        if not isinstance(plaintext, str) or not plaintext or len(plaintext) > 512:
            return None
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        k = sch.lb_api_keys

        def tx(conn: Connection) -> ApiKeyRecord | None:
            row = conn.execute(select(k).where(k.c.key_hash == digest, k.c.revoked_at.is_(None))).first()
            return None if row is None else self._key_record(row)

        return self._read(tx)
