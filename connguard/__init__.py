"""connguard: a client-side guard for MySQL/MariaDB connections.

Start here: :func:`connect` (drop-in for ``pymysql.connect``), :class:`Pool`, :func:`install`.
"""

from connguard import exceptions
from connguard.census import census
from connguard.coordination import CoordinatorUnavailable, LeaseUnavailable
from connguard.dropin import close_all, configure, connect, install, installed, uninstall
from connguard.errors import translate

# Every exception class (connguard.errors.X, where the docs and pickles name them).
from connguard.exceptions import *  # noqa: F403
from connguard.limits import limits, raise_fd_soft_limit
from connguard.liveness import peer_closed
from connguard.metrics import stats
from connguard.policies import KeepalivePolicy, LifetimePolicy, PoolSettings, ResetPolicy
from connguard.pool import Pool
from connguard.proxy import PooledConnection

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
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
