"""A real `largebatch serve` subprocess on a free port with a temporary SQLite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`largebatch serve --port P --store sqlite:///...`, which tests may kill and start again."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store_url = f"sqlite:///{root / 'store.db'}"
        self.log_path = root / "service.log"
        self.proc: subprocess.Popen | None = None
        self._store = None

    def start(self, timeout: float = 60.0) -> Service:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "largebatch.scaling_rules.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--store", self.store_url, "--no-access-log", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LARGEBATCH_OPEN_MODE": "true"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"largebatch serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"largebatch serve did not answer within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections just drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._store is not None:
            self._store.close()
            self._store = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    @property
    def store(self):
        """The study store itself (read directly, not through the service): what was really recorded."""
        if self._store is None:
            from largebatch.service.storage import open_store

            self._store = open_store(self.store_url)
        return self._store


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("service")).start()
    yield svc
    svc.stop()


@pytest.fixture
def own_service(tmp_path):
    """A service of the test's own, for tests that kill it."""
    svc = Service(tmp_path / "service")
    yield svc
    svc.stop()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: intra-op threads only fight the service process (and any other load)
    for the two cores, which makes a step 40x slower, not faster."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
