"""Pytest plugin: the whole session runs with ``connguard.install()`` active.

Loaded with ``-p tests.drivers.connguard_install`` so a driver's own suite, unchanged, gets
pooled connections from every ``connect`` call it makes. Which driver is patched comes from
``$CONNGUARD_INSTALL`` (a name ``connguard.install()`` takes: ``pymysql``, the default, or
``MySQLdb``): one plugin serves every driver's suite runner.
"""

from __future__ import annotations

import os

import pytest

import connguard
from connguard import drivers, dropin

OPENED_MARK = "connguard: pooled connections opened: "
DRIVER_ENV = "CONNGUARD_INSTALL"
DRIVER = os.environ.get(DRIVER_ENV) or "pymysql"


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: some suites connect at import time (class bodies), and those
    # connections must be pooled too.
    connguard.install(DRIVER)


def pytest_report_header(config: pytest.Config) -> str:
    # Printed in the log so a run can be told apart from a plain one after the fact.
    return (f"connguard {connguard.__version__}: install({DRIVER!r}) active, "
            f"installed={connguard.installed(DRIVER)}")


def opened_line(driver: str) -> str:
    """The line the runners look for: pooled connections the drop-in pools speaking
    ``driver`` opened (install("MySQLdb") leaves pymysql.connect alone, so only those count)."""
    seam = drivers.SEAMS[driver.lower()]
    pools = [pool for pool in dropin._pools.values() if pool._driver.__name__ == seam]
    opened = sum(pool.stats()["opened"] for pool in pools)
    return f"{OPENED_MARK}{opened} in {len(pools)} drop-in {driver} pools"


def report_opened(driver: str) -> None:
    """Print :func:`opened_line` (for suites that run without pytest, e.g. at exit)."""
    print(opened_line(driver), flush=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Proof that the suite went through connguard: the runner fails a run that opened none.
    terminalreporter.write_line(opened_line(DRIVER))


def pytest_unconfigure(config: pytest.Config) -> None:
    connguard.uninstall()
    connguard.close_all()
