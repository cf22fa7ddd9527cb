"""Pytest plugin: run a PyMySQL source tree's tests against the *installed* PyMySQL.

PyMySQL's tests live inside the package (``pymysql.tests``), so importing them from a source
checkout would normally import that checkout's ``pymysql`` too, and connguard would then be
patching a different driver than the one applications use. Instead the installed package is
imported first and the checkout's ``pymysql`` directory is appended to its ``__path__``: the
driver modules resolve to the installed files, and only ``pymysql.tests`` (absent from the
installed package) comes from the checkout. The runner sets ``PY_IGNORE_IMPORTMISMATCH`` so
pytest accepts the installed ``pymysql/__init__.py`` for the checkout's package node.
"""

from __future__ import annotations

import os

import pymysql

SOURCE_ENV = "PYMYSQL_SUITE_SRC"


def _graft(source_root: str) -> None:
    package_dir = os.path.join(source_root, "pymysql")
    if package_dir not in pymysql.__path__:
        pymysql.__path__.append(package_dir)


# At import, not in a hook: the graft must exist before anything imports ``pymysql.tests``.
_graft(os.environ[SOURCE_ENV])


def pytest_report_header() -> str:
    return f"pymysql {pymysql.VERSION_STRING} from {pymysql.__file__}"
