"""connguard: a client-side guard for MySQL/MariaDB connections.

Start here: :func:`connect` (drop-in for ``pymysql.connect``), :class:`Pool`, :func:`install`.
"""

from typing import TYPE_CHECKING

from connguard import exceptions

# Every exception class (connguard.errors.X, where the docs and pickles name them).
from connguard.exceptions import *  # noqa: F403
from connguard.exceptions import CoordinatorUnavailable, LeaseUnavailable

if TYPE_CHECKING:
    from connguard.census import census
    from connguard.dropin import close_all, configure, connect, install, installed, uninstall
    from connguard.errors import translate
    from connguard.limits import limits, raise_fd_soft_limit
    from connguard.liveness import peer_closed
    from connguard.metrics import stats
    from connguard.policies import KeepalivePolicy, LifetimePolicy, PoolSettings, ResetPolicy
    from connguard.pool import Pool
    from connguard.proxy import PooledConnection

__version__ = "0.1.0"


#: Everything but the exceptions loads on first use, so `import connguard` costs little more
#: than PyMySQL: the pool and the drop-in pull in wrapt (which imports asyncio and
#: importlib.metadata), the error translation its tables, and a process that only catches
#: connguard's errors needs none of them.
_LAZY = {
    "census": "connguard.census",
    "translate": "connguard.errors",
    "limits": "connguard.limits",
    "raise_fd_soft_limit": "connguard.limits",
    "peer_closed": "connguard.liveness",
    "stats": "connguard.metrics",
    "Pool": "connguard.pool",
    "PooledConnection": "connguard.proxy",
    **{name: "connguard.policies" for name in (
        "KeepalivePolicy", "LifetimePolicy", "PoolSettings", "ResetPolicy")},
    **{name: "connguard.dropin" for name in (
        "close_all", "configure", "connect", "install", "installed", "uninstall")},
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    # The SQLAlchemy plugin's helpers load on first use: SQLAlchemy is an optional extra,
    # and `import connguard` must not require it.
    if name == "ConnGuardPluginWarning":
        try:
            from connguard import sqlalchemy_plugin
        except ModuleNotFoundError as exc:
            if exc.name != "sqlalchemy":
                raise
            raise ModuleNotFoundError(
                f"connguard.{name} is for SQLAlchemy engines and needs SQLAlchemy: "
                "pip install 'connguard[sqlalchemy]'", name="sqlalchemy") from None
        return getattr(sqlalchemy_plugin, name)
    raise AttributeError(f"module 'connguard' has no attribute {name!r}")


def __dir__() -> "list[str]":
    return sorted({*globals(), *_LAZY})


__all__ = [
    *exceptions.__all__,
    "CoordinatorUnavailable",
    "KeepalivePolicy",
    "LeaseUnavailable",
    "LifetimePolicy",
    "Pool",
    "PoolSettings",
    "PooledConnection",
    "ResetPolicy",
    "census",
    "close_all",
    "configure",
    "connect",
    "install",
    "installed",
    "limits",
    "peer_closed",
    "raise_fd_soft_limit",
    "stats",
    "translate",
    "uninstall",
]
