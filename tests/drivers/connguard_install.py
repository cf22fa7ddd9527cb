"""Pytest plugin: the whole session runs with ``connguard.install()`` active.

Loaded with ``-p tests.drivers.connguard_install`` so a driver's own suite, unchanged, gets
pooled connections from every ``pymysql.connect`` call it makes.
"""

from __future__ import annotations

import pytest

import connguard
from connguard import dropin

OPENED_MARK = "connguard: pooled connections opened: "


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: some suites connect at import time (class bodies), and those
    # connections must be pooled too.
    connguard.install()


def pytest_report_header(config: pytest.Config) -> str:
    # Printed in the log so a run can be told apart from a plain one after the fact.
    return f"connguard {connguard.__version__}: install() active, installed={connguard.installed()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Proof that the suite went through connguard: the runner fails a run that opened none.
    pools = list(dropin._pools.values())
    opened = sum(pool.stats()["opened"] for pool in pools)
    terminalreporter.write_line(f"{OPENED_MARK}{opened} in {len(pools)} drop-in pools")


def pytest_unconfigure(config: pytest.Config) -> None:
    connguard.uninstall()
    connguard.close_all()
