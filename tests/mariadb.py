"""The real-MariaDB test harness, loaded as a pytest plugin (``-p tests.mariadb``).

Servers come from :mod:`testsupport.servers` (also used by ``connguard bench``); this module adds
the fixtures (``mariadb``, ``mariadb_factory``, ``mariadb_template``) and socket helpers that
ask ``ss``, so assertions about connguard's own census do not rely on connguard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional

import pytest

from testsupport.servers import (  # noqa: F401 - re-exported for the tests
    APP_DATABASE,
    APP_PASSWORD,
    APP_USER,
    INSTALL_HINT,
    MariaDB,
    Template,
    find_binary,
    free_port,
    wait_until,
)


# -- process-level socket helpers (independent of connguard: they ask `ss`) -----------------
def socket_states(port: int, pid: Optional[int] = None) -> Dict[str, int]:
    """Count TCP sockets toward ``port`` by state, for process ``pid`` (default: this one).

    Uses ``ss`` so assertions about connguard's own census do not rely on connguard.
    Sockets that no process holds any more (TIME_WAIT) are counted with ``pid=None``
    passed as ``pid=0``: every socket toward the port whatever its owner.
    """
    pid = os.getpid() if pid is None else pid
    out = subprocess.run(["ss", "-tanpH", "state", "all", f"dport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    counts: Dict[str, int] = {}
    for line in out.splitlines():
        if pid and f"pid={pid}," not in line:
            continue
        state = line.split()[0].lower().replace("-", "_")
        counts[state] = counts.get(state, 0) + 1
    return counts


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- pytest plugin ---------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    if find_binary("mariadbd") is None and find_binary("mysqld") is None:
        raise pytest.UsageError(INSTALL_HINT)


@pytest.fixture(scope="session")
def mariadb_template() -> Iterator[Template]:
    root = tempfile.mkdtemp(prefix="connguard-test-")
    os.chmod(root, 0o755)
    template = Template(root)
    template.build()
    yield template
    shutil.rmtree(root, ignore_errors=True)


class ServerFactory:
    """Starts servers with per-test options and stops every one of them afterwards."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.servers: List[MariaDB] = []
        self._lock = threading.Lock()

    def __call__(self, nproc_headroom: Optional[int] = None, start: bool = True,
                 **options: Any) -> MariaDB:
        server = MariaDB(self.template, options, nproc_headroom=nproc_headroom)
        with self._lock:
            self.servers.append(server)
        return server.start() if start else server

    def close(self) -> None:
        for server in self.servers:
            server.destroy()


@pytest.fixture
def mariadb_factory(mariadb_template: Template) -> Iterator[ServerFactory]:
    factory = ServerFactory(mariadb_template)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def mariadb(mariadb_template: Template) -> Iterator[MariaDB]:
    """The default server a test module shares (stock options)."""
    factory = ServerFactory(mariadb_template)
    server = factory()
    yield server
    factory.close()
