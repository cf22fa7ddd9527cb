"""Arguments: which belong to the pool, which to PyMySQL, and the key that names a pool."""

from __future__ import annotations

import difflib
import ssl
from typing import Any, Collection, Dict, Hashable, Mapping, Tuple

from connguard import drivers

#: Options the pool itself takes; everything else must be a ``pymysql.connect`` argument.
POOL_OPTIONS = frozenset({
    "name", "max_size", "max_overflow", "min_idle", "checkout_timeout", "leak_threshold",
    "max_lifetime", "lifetime_jitter", "idle_timeout", "reset", "keepalive",
    "resource_guard", "fd_reserve", "port_reserve",
    "storm_control", "host_gate", "max_connect_rate", "connect_burst", "max_handshakes",
    "backoff_initial", "backoff_max", "breaker_threshold", "ceiling_probe", "fail_fast",
    "reconnect_rate", "reconnect_burst",
    "coordinator", "global_max", "coordinator_fail", "lease_ttl", "coordinator_key",
    "driver",
})


class _Default:
    """The default of a pool option the caller did not pass: the option is left out, as if
    the signature were ``**kwargs`` (a pool tells given options from defaults: the drop-in
    compares a later call's given options with its pool's, and some defaults differ between
    the drop-in and ``Pool``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


#: The default of every pool option in ``Pool``'s signature.
DEFAULT: Any = _Default()


def given_options(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The pool options among ``values`` (a signature's parameters) the caller passed."""
    return {name: value for name, value in values.items()
            if name in POOL_OPTIONS and value is not DEFAULT}


def split_arguments(kwargs: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split ``kwargs`` into (pool options, connect arguments); reject unknown names.

    Unknown names are an error rather than being passed on: a typo such as ``max_sise``
    would otherwise surface as PyMySQL's TypeError on the first connect, far from its cause.
    The connect arguments are those of the driver named by ``driver`` (default PyMySQL),
    with its aliases spelt one way (mysqlclient's ``passwd`` is ``password``), so that two
    spellings of the same arguments name the same pool.
    """
    seam = drivers.seam(kwargs.get("driver", "pymysql"))
    kwargs = seam.normalize(kwargs)
    known = POOL_OPTIONS | seam.ARGUMENTS | set(getattr(seam, "ALIASES", ()))
    unknown = sorted(set(kwargs) - POOL_OPTIONS - seam.ARGUMENTS)
    if unknown:
        raise TypeError(f"{where}() got {unknown_names(unknown, known, 'argument')}; the full "
                        f"list: connguard.arguments.POOL_OPTIONS and {seam.CONNECT_NAME}'s "
                        "parameters")
    if kwargs.get("defer_connect"):
        raise ValueError(f"{where}(): defer_connect=True is not supported: pooled connections "
                         "are connected when handed out")
    options = {k: v for k, v in kwargs.items() if k in POOL_OPTIONS}
    connect = {k: v for k, v in kwargs.items() if k not in POOL_OPTIONS}
    return options, connect


def unknown_names(unknown: Collection[str], known: Collection[str], kind: str) -> str:
    """"unknown argument 'pasword' (did you mean 'password'?)": each misspelt name with its
    closest known one, if any. The whole list of known names is too long to read for a
    typo (about 70 names), so messages point to where it is instead."""
    names = sorted(unknown)
    shown = []
    for name in names:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        shown.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"unknown {kind}{'s' if len(names) > 1 else ''} {', '.join(shown)}"


def _freeze_ssl_context(ctx: ssl.SSLContext) -> Hashable:
    """An SSL context by its observable settings, so a context made per call (the usual
    ``ssl.create_default_context(cafile=...)`` in a connect helper) finds the same pool.

    A client certificate loaded into a context cannot be read back: two contexts differing
    only in it share a pool. The MySQL account (user, password) still separates pools.
    """
    return ("SSLContext", ctx.protocol, ctx.verify_mode, ctx.check_hostname, int(ctx.options),
            ctx.minimum_version, ctx.maximum_version, ctx.verify_flags,
            _freeze(ctx.get_ca_certs()), tuple(c["name"] for c in ctx.get_ciphers()))


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for an argument value (dicts and lists by content)."""
    if isinstance(value, ssl.SSLContext):
        return _freeze_ssl_context(value)
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(_freeze(v) for v in value)
        return (type(value).__name__, tuple(sorted(items, key=repr))
                if isinstance(value, (set, frozenset)) else items)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # unhashable and opaque: only the same object matches
    return value


def pool_key(kwargs: Dict[str, Any]) -> Hashable:
    """The identity of a drop-in pool: every argument, credentials included.

    Two calls share a pool only if they would have opened interchangeable connections, so a
    pool never hands one user's session to another. The key lives only in memory and is
    never printed.
    """
    return tuple(sorted((name, _freeze(value)) for name, value in kwargs.items()))
