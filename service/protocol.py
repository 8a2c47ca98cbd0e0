"""The HTTP protocol ``largebatch serve`` runs: uvicorn's, with a deadline for reading each request.

Uvicorn closes a connection that stays idle between requests (``timeout_keep_alive``), but has no
timeout for reading one, nor for a client that stops reading its answer: a client that connects and sends nothing, or sends half its headers, or
half its body, holds the connection (and its file descriptor) for ever. Here every request must
arrive whole, headers and body, within ``read_timeout_s`` of its first byte (or of the connection
being opened); otherwise the connection is closed. Once a request is read, the timer stops: how
long the service takes to answer is bounded elsewhere (``store_timeout_s``). And an answer the client
stops taking in (the socket's buffers full) is dropped after ``read_timeout_s`` without progress.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DeadlineH11Protocol", "DeadlineHttpProtocol", "read_timeout_s"]


@functools.cache
def read_timeout_s() -> float:
    """The configured deadline (``LARGEBATCH_READ_TIMEOUT_S``), read once per worker process."""
    from largebatch.service.settings import Settings

    return Settings().read_timeout_s


class _ReadDeadline:
    """Mixin for uvicorn's HTTP protocols (httptools and h11 alike: both keep ``cycle``, ``loop`` and
    ``transport``)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # the first bytes of a new request
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._disarm()  # the whole request is in: the app has it

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._write_progress()
        super().connection_lost(exc)  # type: ignore[misc]

    # The answer's side: a client that stops reading (its window full, our buffer past the high-water
    # mark) has ``read_timeout_s`` to take some of it, or the connection is dropped with what it holds.
    _write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(read_timeout_s(), self._write_stalled)

    def resume_writing(self) -> None:
        self._write_progress()
        super().resume_writing()  # type: ignore[misc]

    def _write_progress(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        self.transport.abort()  # close() would wait to flush what the client never reads

    def _arm(self) -> None:
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(read_timeout_s(), self._expired)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expired(self) -> None:
        self._read_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            return  # read in time after all (the app is answering)
        if not self.transport.is_closing():
            self.transport.close()


class DeadlineHttpProtocol(_ReadDeadline, AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """Uvicorn's default protocol (httptools when installed, else h11) with the read deadline."""


class DeadlineH11Protocol(_ReadDeadline, H11Protocol):
    """The pure-Python h11 protocol with the read deadline."""
