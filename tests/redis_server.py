"""A throwaway redis-server for the coordination tests, on a free port of 127.0.0.1.

Never the system's Redis: each module that imports the fixture gets its own server, with no
persistence (``--save "" --appendonly no``), so a restart starts empty, as a real failover
to a fresh node would. Import the fixture into a test module to use it::

    from tests.redis_server import redis_server_fixture  # noqa: F401  (fixture "redis_server")
"""

from __future__ import annotations

from typing import Iterator

import pytest

from testsupport.servers import REDIS_INSTALL_HINT, RedisServer

INSTALL_HINT = REDIS_INSTALL_HINT


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
