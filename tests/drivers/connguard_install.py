"""Pytest plugin: the whole session runs with ``connguard.install()`` active.

Loaded with ``-p tests.drivers.connguard_install`` so a driver's own suite, unchanged, gets
pooled connections from every ``pymysql.connect`` call it makes.
"""

from __future__ import annotations

import pytest

import connguard


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: some suites connect at import time (class bodies), and those
    # connections must be pooled too.
    connguard.install()


def pytest_report_header(config: pytest.Config) -> str:
    # Printed in the log so a run can be told apart from a plain one after the fact.
    return f"connguard {connguard.__version__}: install() active, installed={connguard.installed()}"


def pytest_unconfigure(config: pytest.Config) -> None:
    connguard.uninstall()
    connguard.close_all()
