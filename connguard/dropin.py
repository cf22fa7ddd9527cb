"""Drop-in pooling: ``connguard.connect(...)`` and ``connguard.install()``.

``connect`` takes exactly ``pymysql.connect``'s arguments and returns a pooled connection
from a process-wide pool keyed by all of them (credentials included), so code that connects
and closes per request reuses a handful of server connections instead of burning an
ephemeral port (and a TIME_WAIT slot) per request. ``install()`` patches ``pymysql.connect``
so unchanged code gets the same.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Dict, Hashable, Tuple

import pymysql
import wrapt

from connguard import coordination, drivers
from connguard.arguments import POOL_OPTIONS, pool_key, split_arguments, unknown_names
from connguard.concurrency import ProcessLock
from connguard.options import check_options
from connguard.pool import Pool, build_policies
from connguard.proxy import PooledConnection

_pools: Dict[Hashable, Pool] = {}
_defaults: Dict[str, Any] = {}
_lock = ProcessLock()  # re-made after a fork and once threading is patched
_originals: Dict[Tuple[str, str], Tuple[Any, Any]] = {}
_UNSET = object()
#: Drop-in pools never make a caller wait where pymysql.connect would have connected:
#: beyond max_size, connections are opened and closed again on return (PoolSettings).
#: During an outage a drop-in caller fails at once, as with pymysql.connect (with
#: ServerUnavailable, an OperationalError(2003, ...) like PyMySQL's, and no network attempt
#: while the breaker is open): code that tries a primary, then a replica, keeps working.
#: ``configure(checkout_timeout=N)`` lets callers wait an outage out instead.
DROPIN_DEFAULTS: Dict[str, Any] = {"max_overflow": -1, "checkout_timeout": 0}


def configure(**options: Any) -> None:
    """Pool options (``max_size``, ``checkout_timeout``, …) for drop-in pools made from now on."""
    unknown = sorted(set(options) - POOL_OPTIONS)
    if unknown:
        raise TypeError(f"configure() got {unknown_names(unknown, POOL_OPTIONS, 'option')}; "
                        "the full list: connguard.arguments.POOL_OPTIONS")
    build_policies(options)  # validate values now, not at the first connect
    with _lock:
        _defaults.update(options)


def pool_for(where: str = "connguard.connect", **kwargs: Any) -> Pool:
    """The process-wide pool for these connect arguments (made on first use); ``where``
    names the call in an argument error."""
    options, connect_kwargs = split_arguments(kwargs, where=where)
    key = (options.get("driver", "pymysql"), pool_key(connect_kwargs))
    with _lock:
        pool = _pools.get(key)
        if pool is None or pool.closed:
            pool = Pool(**{**DROPIN_DEFAULTS, **_defaults, **options}, **connect_kwargs)
            _pools[key] = pool
            return pool
    _check_same_options(pool, options)
    return pool


def _check_same_options(pool: Pool, options: Dict[str, Any]) -> None:
    """A later call for the same server and credentials gets the same pool; pool options it
    names must agree with that pool's, or the caller would silently get other limits."""
    held = {name: _held(pool, name) for name in options}
    # A value the pool holds (same type, equal) was checked when it was made: nothing to do
    # on the hot path. Any other is checked first, so a bad one says what it may be (and
    # True does not pass for 1, nor NaN for anything).
    unchecked = {name: value for name, value in options.items()
                 if not (type(held[name]) is type(value) and held[name] == value)}
    if not unchecked:
        return
    check_options(unchecked)
    conflicts = sorted(name for name, value in unchecked.items()
                       if held[name] not in (value, _UNSET))
    if conflicts:
        given = ", ".join(f"{name}={_shown(name, options[name])}" for name in conflicts)
        kept = ", ".join(f"{name}={_shown(name, held[name])}" for name in conflicts)
        raise ValueError(f"connguard.connect(): a pool for these connection arguments already "
                         f"exists with {kept}; this call asks for {given}. Pass the same pool "
                         "options everywhere (or set them once with connguard.configure()).")


def _shown(name: str, value: Any) -> str:
    """An option value for a message: a coordinator URL without its password."""
    if name == "coordinator" and isinstance(value, str):
        return repr(coordination.redact_url(value))
    return repr(value)


def _held(pool: Pool, name: str) -> Any:
    """The value of pool option ``name`` in ``pool``: as given when it was made, else the
    sizing defaults (PoolSettings); _UNSET when not known (then nothing is compared)."""
    if name in pool._options:
        return pool._options[name]
    return getattr(pool._settings, name, _UNSET)


def connect(*args: Any, **kwargs: Any) -> PooledConnection:
    """``pymysql.connect``'s arguments in, a pooled connection out; ``close()`` returns it."""
    if args:
        raise TypeError("connguard.connect() takes keyword arguments only, as pymysql.connect "
                        f"does; got {len(args)} positional")
    return pool_for(**kwargs).connect()


# What help() and IDEs that introspect show for connect: Pool's options by name (the
# drop-in's own defaults for them are in DROPIN_DEFAULTS), then pymysql.connect's arguments.
# The function itself keeps ``**kwargs``: each call pays for no signature binding.
connect.__signature__ = inspect.signature(Pool).replace(  # type: ignore[attr-defined]
    parameters=[p for p in inspect.signature(Pool).parameters.values() if p.name != "clock"],
    return_annotation="PooledConnection")


def close_all() -> None:
    """Close every drop-in pool (idle connections now, borrowed ones when returned)."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def _patched_connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if args or kwargs.get("defer_connect"):
        return wrapped(*args, **kwargs)  # nothing a pool can do for these: PyMySQL as is
    return connect(**kwargs)


#: ``MySQLdb.connect``'s positional parameters, in its order (the C connection's).
_MYSQLDB_POSITIONAL = ("host", "user", "passwd", "db", "port", "unix_socket")


def _patched_mysqldb_connect(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if len(args) > len(_MYSQLDB_POSITIONAL) or any(
            name in kwargs for name in _MYSQLDB_POSITIONAL[:len(args)]):
        return wrapped(*args, **kwargs)  # mysqlclient's own error for these
    named = dict(zip(_MYSQLDB_POSITIONAL, args), **kwargs)
    return pool_for("MySQLdb.connect", **named, driver="mysqldb").connect()


class _PooledConnect(wrapt.FunctionWrapper):
    """A driver's ``connect`` once installed: says so in its repr."""

    def __repr__(self) -> str:
        wrapped = self.__wrapped__
        return (f"<{wrapped.__module__}.{wrapped.__name__} pooled by connguard (install()); "
                "connguard.uninstall() restores it>")


def _drivers_to_patch() -> Dict[str, Tuple[Any, Tuple[str, ...], Any]]:
    """Driver name (as ``install()`` takes it) -> (its module, the names of its connect
    function, the wrapper). A driver's module is imported only when named."""
    def mysqldb() -> Any:
        with drivers.explained_import("install('MySQLdb')"):
            import MySQLdb  # opt-in: only when install("MySQLdb") asks for it
        return MySQLdb
    return {"pymysql": (lambda: pymysql, ("connect", "Connect"), _patched_connect),
            "MySQLdb": (mysqldb, ("connect", "Connect", "Connection"), _patched_mysqldb_connect)}


#: Other names ``install()`` takes for a driver: mysqlclient is what pip installs as MySQLdb.
_DRIVER_ALIASES = {"mysqlclient": "MySQLdb"}


def _is_pymysql_shim() -> bool:
    """Whether ``import MySQLdb`` gives PyMySQL (``pymysql.install_as_MySQLdb()``, what
    Django users without a C compiler do): PyMySQL's module itself, or a MySQLdb without
    mysqlclient's C core ``_mysql``. Only a module already imported is looked at: a real
    mysqlclient is never imported here."""
    module = sys.modules.get("MySQLdb")
    return module is not None and (module is pymysql or not hasattr(module, "_mysql"))


def _resolved(name: str) -> str:
    """The driver ``install()`` patches for ``name``: aliases spelt one way, and
    ``"MySQLdb"`` under PyMySQL's shim is PyMySQL (patching mysqlclient's seam onto PyMySQL
    would break the first connect: PyMySQL has no ``_mysql``)."""
    name = _DRIVER_ALIASES.get(name, name)
    return "pymysql" if name == "MySQLdb" and _is_pymysql_shim() else name


def install(*drivers: str) -> None:
    """Make the named drivers' ``connect`` pooled; idempotent. ``"pymysql"`` (the default
    when none is named): ``pymysql.connect`` / ``pymysql.Connect``. ``"MySQLdb"``
    (mysqlclient; ``"mysqlclient"``, its pip name, is the same): ``MySQLdb.connect`` /
    ``Connect`` / ``Connection``, opt-in. After ``pymysql.install_as_MySQLdb()``,
    ``"MySQLdb"`` is PyMySQL itself and is installed as ``"pymysql"``.

    Code that did ``from pymysql import connect`` before this call keeps the original.
    """
    table = _drivers_to_patch()
    unknown = [name for name in drivers if _DRIVER_ALIASES.get(name, name) not in table]
    if unknown:
        raise ValueError(f"install(): unknown driver {unknown[0]!r}; allowed: "
                         f"{', '.join(map(repr, [*table, *_DRIVER_ALIASES]))}")
    for name in dict.fromkeys(_resolved(name) for name in drivers or ("pymysql",)):
        load, names, wrapper = table[name]
        module = load()
        with _lock:
            for attr in names:
                if (name, attr) not in _originals:
                    _originals[(name, attr)] = (module, getattr(module, attr))
                    setattr(module, attr, _PooledConnect(getattr(module, attr), wrapper))


def uninstall() -> None:
    """Undo :func:`install`; idempotent. Pools already made keep working."""
    with _lock:
        for (_, attr), (module, original) in _originals.items():
            setattr(module, attr, original)
        _originals.clear()


def installed(driver: str = "pymysql") -> bool:
    """Whether :func:`install` patched ``driver``'s connect (``"pymysql"``, ``"MySQLdb"``;
    under PyMySQL's MySQLdb shim, ``"MySQLdb"`` answers for PyMySQL)."""
    return any(name == _resolved(driver) for name, _ in _originals)


