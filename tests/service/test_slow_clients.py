"""Slow and silent clients under the real ``largebatch serve`` (loopback sockets): each request must be
read within ``read_timeout_s``, an idle connection is closed after ``keep_alive_s``; a 500 keeps the
connection (in-process: the app answers it without re-raising)."""

from __future__ import annotations

import socket
import time

import pytest

from .conftest import UvicornServer

READ_TIMEOUT = 1.0
KEEP_ALIVE = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("slow")
    s = UvicornServer(f"sqlite:///{path / 'slow.db'}", "--open", log=path / "serve.log",
                      env={"LARGEBATCH_READ_TIMEOUT_S": str(READ_TIMEOUT), "LARGEBATCH_KEEP_ALIVE_S": str(KEEP_ALIVE)})
    s.store_url = f"sqlite:///{path / 'slow.db'}"  # type: ignore[attr-defined]
    yield s
    s.stop()


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reads until EOF; fails past ``limit``)."""
    sock.settimeout(limit)
    start = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit}s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


SLOW = [
    b"",  # connects, says nothing
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # partial headers
    b"POST /v1/recommendations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo",
]


@pytest.mark.slow
@pytest.mark.parametrize("sent", SLOW, ids=["silent", "partial-headers", "partial-body"])
def test_slow_clients_are_cut_off_within_the_read_timeout(server, sent):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        if sent:
            sock.sendall(sent)
        took = _closed_after(sock, READ_TIMEOUT + 3)
    assert took >= READ_TIMEOUT * 0.8  # not before the deadline either


@pytest.mark.slow
def test_headers_trickled_byte_by_byte_do_not_extend_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.monotonic()
        sock.settimeout(0.5)
        with pytest.raises(OSError):
            for b in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                sock.send(bytes([b]))
                time.sleep(0.1)
                if time.monotonic() - start > READ_TIMEOUT + 3:
                    pytest.fail("still sending")
                try:
                    if sock.recv(1) == b"":
                        raise OSError("closed")
                except TimeoutError:
                    pass
    assert time.monotonic() - start < READ_TIMEOUT + 3


@pytest.mark.slow
def test_a_prompt_client_keeps_its_connection_until_idle(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for _ in range(3):  # keep-alive: three requests on one connection, each answered
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            data = b""
            while b'"status":"ok"' not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            time.sleep(READ_TIMEOUT / 2)
        took = _closed_after(sock, KEEP_ALIVE + 3)  # then idle: closed after keep_alive_s
    assert took >= KEEP_ALIVE * 0.4


def test_a_500_is_answered_in_the_error_shape_without_reraising(tmp_path):
    """Starlette's handler for ``Exception`` answers, then re-raises, and the server closes the
    connection; the service's own middleware answers and returns (the TestClient would re-raise)."""
    from fastapi.testclient import TestClient

    from largebatch.service.app import create_app
    from largebatch.service.settings import Settings

    app = create_app(Settings(store_url=f"sqlite:///{tmp_path / 'e.db'}", open_mode=True))

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=True, base_url="http://localhost") as c:
        r = c.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"type": "internal_error", "detail": "internal error"}
        assert "connection" not in r.headers or r.headers["connection"] != "close"
        assert c.get("/healthz").status_code == 200


@pytest.mark.slow
def test_a_client_that_stops_reading_its_answer_is_dropped(server):
    """A long CSV asked for and never read: once the socket buffers are full, the server gives the
    client ``read_timeout_s`` to take some of it, then drops the connection (and what it held)."""
    import httpx

    from largebatch.service.storage import open_store

    from .conftest import bert_request

    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.post("/v1/studies", json={"name": "unread", "model_params": 340_000_000}).status_code in (200, 201)
        run = c.post("/v1/studies/unread/runs", json={"request": bert_request()}).json()["id"]
    with open_store(server.store_url) as store:
        store.report_batch(run, [(s, 1.0 + 1.0 / (s + 1), 0.5, None) for s in range(300_000)])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET /v1/runs/{run}/reports?format=csv HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(READ_TIMEOUT + 3)  # reads nothing
        sock.settimeout(10)
        got = b""
        try:
            while chunk := sock.recv(1 << 20):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert got.startswith(b"HTTP/1.1 200")
    assert not got.endswith(b"0\r\n\r\n"), "the whole answer was kept for a client that did not read it"
