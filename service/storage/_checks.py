"""Argument checks and value conversions shared by the store's parts (each names the argument)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from largebatch.scaling_rules.models import MAX_COUNT
from largebatch.service.storage.base import InvalidArgument

MAX_JSON_BYTES = 256 * 1024
# How deep any JSON document may nest: request bodies (checked on their bytes) and every JSON value the
# store keeps, so nothing is stored that an answer cannot serialise again.
MAX_JSON_DEPTH = 32
MAX_REASON = 2000
# A gradient noise scale is a batch size in examples: below a hundredth of one example or above 10^12 it
# is a measurement error, and a study's median of such values would steer every recipe of the study.
NOISE_SCALE_RANGE = (1e-2, 1e12)
MAX_INT = MAX_COUNT  # steps: one range on every backend (32-bit columns on PostgreSQL)


def _now() -> datetime:
    """Naive UTC (what we store; Optuna 5 stores naive UTC too)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _naive_utc(argument: str, dt: datetime) -> datetime:
    if not isinstance(dt, datetime):
        raise InvalidArgument(f"{argument} must be a datetime, got {dt!r}")
    if dt.tzinfo is None:
        raise InvalidArgument(f"{argument} must be timezone-aware (UTC), got naive {dt!r}")
    return dt.astimezone(timezone.utc).replace(tzinfo=None)


def _int(argument: str, value: object, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{argument} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidArgument(f"{argument} must be {bound}, got {value!r}")
    return value


def _float(argument: str, value: object, *, finite: bool = True, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{argument} must be a number, got {value!r}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise InvalidArgument(f"{argument} must be a finite number, got {value!r}")
    if positive and not v > 0:
        raise InvalidArgument(f"{argument} must be > 0, got {value!r}")
    return v


def _noise_scale(value: object) -> float:
    v = _float("noise_scale", value, positive=True)
    lo, hi = NOISE_SCALE_RANGE
    if not lo <= v <= hi:
        raise InvalidArgument(f"noise_scale must be in [{lo:g}, {hi:g}] examples, got {value!r}")
    return v


def _json(argument: str, value: object) -> str:
    bad = unstorable_text(value)
    if bad is not None:
        raise InvalidArgument(f"{argument}: the string at {bad} is not storable text (lone surrogate or NUL)")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{argument} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        blob = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{argument} must be JSON-serialisable (no NaN/inf): {e}") from e
    if len(blob) > MAX_JSON_BYTES:
        raise InvalidArgument(f"{argument} is too large ({len(blob)} bytes > {MAX_JSON_BYTES})")
    return blob


def json_depth(value: object) -> int:
    """How deep a parsed JSON document nests (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[int, object]] = [(0, value)]
    while stack:
        depth, v = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:  # past the limit the answer is known: stop walking
            stack.extend((depth, item) for item in v)
    return deepest


def _bad_text(v: str) -> bool:
    if "\x00" in v:
        return True
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unstorable_text(value: object) -> list[str | int] | None:
    """Where in a parsed JSON document a string (or key) holds what no store can keep and give back
    (a lone surrogate, which is not UTF-8; NUL, which PostgreSQL refuses), or None. Linear: each node
    keeps a link to its parent, and the path is built only for the one found."""
    stack: list[tuple[tuple | None, object]] = [(None, value)]
    while stack:
        link, v = stack.pop()
        if isinstance(v, str):
            if _bad_text(v):
                loc: list[str | int] = []
                while link is not None:
                    link, part = link
                    loc.append(part)
                return loc[::-1]
        elif isinstance(v, dict):
            for k, item in v.items():
                here = (link, k)
                stack.append((here, k))
                stack.append((here, item))
        elif isinstance(v, list):
            stack.extend(((link, i), item) for i, item in enumerate(v))
    return None


def _text(argument: str, value: str) -> str:
    if unstorable_text(value) is not None:
        raise InvalidArgument(f"{argument} must be valid Unicode text without lone surrogates or NUL")
    return value


def _page_args(limit: object, offset: object) -> tuple[int, int]:
    return _int("limit", limit, minimum=1, maximum=1000), _int("offset", offset, minimum=0)


def _client_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or not value.isprintable():
        raise InvalidArgument(f"client_key must be 1..200 printable characters, got {value!r}")
    return value


def _nonfinite_repr(v: float) -> tuple[float | None, str | None]:
    if math.isfinite(v):
        return v, None
    return None, ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _from_nonfinite(v: float | None, tag: str | None) -> float | None:
    return float(tag) if tag is not None else v


def _same_metric(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))
