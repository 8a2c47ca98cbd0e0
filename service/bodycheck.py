"""Checks of a JSON request body's raw bytes whose cost is linear in its size, done before anything
parses it: UTF-8 only, nesting depth bounded, no escape that decodes to what no store can keep.

A parser walks a document recursively, and a check that walked the parsed tree cost elements x depth;
here ``bytes`` methods (C loops, a few milliseconds a megabyte), one literal search and at most one
vectorised prefix sum do the work, whatever the document's shape.
"""

from __future__ import annotations

import re

import numpy as np

from largebatch.service.storage._checks import MAX_JSON_DEPTH

__all__ = ["BodyProblem", "check_body"]

# A \u escape of NUL or of a surrogate half (whether its backslash is itself escaped is checked apart).
_SUSPECT_ESCAPE = re.compile(rb"\\u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_KEEP_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class BodyProblem(Exception):
    """Why a body is refused: the HTTP status, the error type and the ``detail``."""

    def __init__(self, status: int, type_: str, detail):
        super().__init__(detail)
        self.status = status
        self.type = type_
        self.detail = detail


def _depth(body: bytes) -> int:
    if b"[" not in body and b"{" not in body:
        return 0
    # Escaped backslashes, then escaped quotes, go; what is left of quotes delimits the strings, whose
    # brackets are text. (Valid JSON is read exactly; invalid JSON fails to parse where the readings part.)
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _KEEP_STRUCTURE)
    brackets = b"".join(skeleton.split(b'"')[::2])
    if len(brackets) <= 512:  # a usual request: a few dozen brackets, cheaper counted here than in numpy
        depth = deepest = 0
        for b in brackets:
            depth += 1 if b in (0x5B, 0x7B) else -1
            deepest = max(deepest, depth)
        return deepest
    steps = _OPEN[np.frombuffer(brackets, dtype=np.uint8)].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def _unstorable_escape(body: bytes) -> int | None:
    """Byte offset of a ``\\u`` escape that decodes to NUL or to a lone surrogate, or None."""
    # Escaped backslashes become two placeholder bytes (offsets kept; NUL is refused before this), so
    # every \u left is an escape: "\\u0000" is a backslash and the text "u0000".
    text = body.replace(b"\\\\", b"\x00\x00")
    pending_high: re.Match | None = None
    for m in _SUSPECT_ESCAPE.finditer(text):
        code = int(m.group(1), 16)
        escape_start = m.start()
        if pending_high is not None:
            if escape_start == pending_high.end() and 0xDC00 <= code <= 0xDFFF:
                pending_high = None  # a pair: one character outside the BMP
                continue
            return pending_high.end() - 6
        if code == 0 or 0xDC00 <= code <= 0xDFFF:
            return escape_start
        pending_high = m
    return None if pending_high is None else pending_high.end() - 6


def check_body(body: bytes) -> None:
    """Raise :class:`BodyProblem` for a body no route should parse: not UTF-8 (UTF-16/32 included),
    nested deeper than ``MAX_JSON_DEPTH``, or with an escape that decodes to unstorable text."""
    if not body:
        return
    if b"\x00" in body or body.startswith((b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")):
        raise BodyProblem(415, "unsupported_media_type", "request bodies must be JSON encoded as UTF-8 (no BOM, "
                                                          "no UTF-16/32)")
    try:
        if not body.isascii():  # ASCII is UTF-8: most bodies need no decoding
            body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyProblem(415, "unsupported_media_type",
                          f"request bodies must be JSON encoded as UTF-8: invalid byte at {e.start}") from None
    # Each level needs an opening bracket (those inside strings only add): a usual body has too few to matter.
    depth = _depth(body) if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise BodyProblem(422, "validation_error", [{
            "loc": ["body"], "msg": f"JSON nested {depth} deep: at most {MAX_JSON_DEPTH} levels", "type": "too_deep"}])
    if b"\\u" in body:
        at = _unstorable_escape(body)
        if at is not None:
            raise BodyProblem(422, "validation_error", [{
                "loc": ["body"], "msg": f"strings must be valid Unicode text: no lone surrogates (\\ud800-\\udfff) "
                                        f"and no NUL (\\u0000); see byte {at}", "type": "string_unicode"}])
