"""Optional modules in tests: one way to import them, so the suite never stops at collection.

``optional("redis")`` returns the module, or skips the test (or, at module level, the whole
module) when it cannot be imported for any reason: not installed (``ModuleNotFoundError``),
but also a half-installed package (SQLAlchemy's asyncio without greenlet raises a plain
``ImportError``) or a module that fails while importing. ``pytest.importorskip`` skips only the
first of these.

The database drivers are the exception when ``CONNGUARD_REQUIRE_DRIVERS=1`` (CI sets it, with
every driver installed): a driver that does not import is then a failure, never a skip, so CI
cannot pass with the driver tests silently skipped.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# The skip reason starts so; .ci/run finds the files whose tests skipped for a missing module.
SKIP_PREFIX = "optional module"

# What CONNGUARD_REQUIRE_DRIVERS=1 requires (top-level names; greenlet: SQLAlchemy's async).
DRIVERS = frozenset({"MySQLdb", "aiomysql", "asyncmy", "greenlet"})


def drivers_required() -> bool:
    return os.environ.get("CONNGUARD_REQUIRE_DRIVERS") == "1"


def optional(name: str, hint: str = "") -> ModuleType:
    """The module ``name``, or a skip that says why it cannot be imported (``hint``: how to
    get it, e.g. "pip install mysqlclient")."""
    __tracebackhide__ = True  # the skip is reported at the caller's line, not here
    if drivers_required() and name.split(".")[0] in DRIVERS:
        return importlib.import_module(name)
    try:
        return importlib.import_module(name)
    except Exception as exc:  # any reason: see the module docstring
        reason = f"{SKIP_PREFIX} {name} cannot be imported ({type(exc).__name__}: {exc})"
        pytest.skip(f"{reason}; {hint}" if hint else reason, allow_module_level=True)
