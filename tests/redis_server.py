"""A throwaway redis-server for the coordination tests, on a free port of 127.0.0.1.

Never the system's Redis: each module that imports the fixture gets its own server, with no
persistence (``--save "" --appendonly no``), so a restart starts empty, as a real failover
to a fresh node would. Import the fixture into a test module to use it::

    from tests.redis_server import redis_server_fixture  # noqa: F401  (fixture "redis_server")
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from typing import Any, Iterator, Optional

import pytest

from tests.mariadb import free_port, wait_until

INSTALL_HINT = "redis-server is not on PATH: apt-get install redis-server"


class RedisServer:
    """One redis-server process: start, stop and start again on the same port."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="connguard-redis-")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.workdir,
                "--protected-mode", "no", "--logfile", ""]

    def start(self) -> RedisServer:
        if self.running:
            return self
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(self.ping, 30, message=f"redis-server on port {self.port}")
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def client(self) -> Any:
        """A redis-py client (the caller closes it)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module", name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """A redis-server of this module's own, running; stopped afterwards. A test that stops
    it starts it again before it ends (``redis_server.start()`` is idempotent)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(name="fresh_redis")
def fresh_redis_fixture(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The module's server, running and empty at the start of the test."""
    redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    yield redis_server
    redis_server.start()
