"""The SQLAlchemy plugin's options: ``connguard_*`` in the URL's query or as
``create_engine`` keyword arguments, parsed and checked into one :class:`PluginOptions` (a bad
value is an ``ArgumentError`` naming the option and the allowed values)."""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from sqlalchemy import exc as sa_exc

from connguard import coordination, options, storm
from connguard.arguments import unknown_names

PREFIX = "connguard_"


class ConnGuardPluginWarning(UserWarning):
    """The plugin cannot apply all of itself to this engine (another driver or database)."""


ConnGuardPluginWarning.__module__ = "connguard.sqlalchemy_plugin"  # where users import it


def warn(message: str) -> None:
    """Say what the plugin cannot do for an engine, once per place (warnings' own rule)."""
    # stacklevel: point past SQLAlchemy's create_engine at the caller's line, roughly.
    warnings.warn(message, ConnGuardPluginWarning, stacklevel=5)


def _option(default: Any, rule: options.Rule, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc})


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    """The plugin's settings; each field ``x`` is given as ``connguard_x`` in the URL query
    or as a ``create_engine`` keyword (``docs/sqlalchemy.md`` has the table)."""

    reaper: bool = _option(
        True, options.Flag(),
        "close idle pooled connections whose server end closed (background thread, every "
        "0.5 s), and idle ones past idle_timeout")
    idle_timeout: Optional[float] = _option(
        None, options.Number(0, options.YEAR, kind=options.SECONDS, why="0: off",
                             top="a year"),
        "seconds a pooled connection may stay idle before the reaper closes it; default: "
        "derived from the server's wait_timeout unless pool_recycle is set; 0 disables")
    resource_guard: bool = _option(
        True, options.RULES["resource_guard"],
        "refuse a connect before the OS runs out of fds or local ports")
    fd_reserve: Optional[int] = _option(
        None, options.RULES["fd_reserve"], "fds the resource guard keeps free")
    port_reserve: Optional[int] = _option(
        None, options.RULES["port_reserve"], "local ports the resource guard keeps free")
    storm_control: bool = _option(
        True, options.RULES["storm_control"],
        "pass new connections through connguard's reconnect-storm gate (rate limit, backoff, "
        "breaker), shared per server by every pool and engine of the process")
    invalidate_pool: bool = _option(
        True, options.Flag(),
        "on a disconnect error, also invalidate every other pooled connection, as SQLAlchemy "
        "does; false keeps them (each checkout checks its own connection anyway)")
    host_gate: Union[bool, str] = _option(
        False, options.RULES["host_gate"],
        "share the handshake cap with this user's other processes of the host through "
        "flock'd slot files (true: in a directory of this user's under $XDG_RUNTIME_DIR or "
        "/dev/shm; or under the directory given)")
    storm_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "doc": "the gate's settings, given as connguard_<name> for each of STORM_OPTIONS"})
    coordination_settings: coordination.CoordinationSettings = dataclasses.field(
        default_factory=coordination.CoordinationSettings, metadata={
            "doc": "the global budget and shared gate, given as connguard_<name> for each of "
                   "COORDINATION_OPTIONS"})


#: The storm settings the plugin takes (connguard_<name>), with the StormPolicy field each
#: sets: the gate's (rate, burst, backoff, breaker) and the guarded pool's (max_handshakes,
#: ceiling_probe).
STORM_OPTIONS = dict(storm.POOL_OPTION_FIELDS)

#: The coordination settings the plugin takes (connguard_<name>), as connguard.Pool's
#: options of the same names (docs/deployment.md).
COORDINATION_OPTIONS = dict(coordination.POOL_OPTION_FIELDS)

# PluginOptions fields that group several options.
_GROUPS = ("storm_settings", "coordination_settings")

OPTION_NAMES: Tuple[str, ...] = tuple(
    PREFIX + f.name for f in dataclasses.fields(PluginOptions) if f.name not in _GROUPS
) + tuple(PREFIX + name for name in STORM_OPTIONS) + tuple(
    PREFIX + name for name in COORDINATION_OPTIONS)


#: connguard.Pool options whose engine equivalent is SQLAlchemy's own create_engine
#: argument: someone who knows the pool writes connguard_checkout_timeout, and the closest
#: plugin option by spelling (connguard_idle_timeout) is not what they mean.
SQLALCHEMY_EQUIVALENTS = {
    "checkout_timeout": "pool_timeout", "max_lifetime": "pool_recycle",
    "max_size": "pool_size", "max_overflow": "max_overflow", "reset": "pool_reset_on_return",
}


def _reject_unknown(names: List[str]) -> None:
    unknown = sorted(set(names) - set(OPTION_NAMES))
    if not unknown:
        return
    theirs = [f"{name!r} is SQLAlchemy's own {SQLALCHEMY_EQUIVALENTS[name[len(PREFIX):]]}="
              for name in unknown if name[len(PREFIX):] in SQLALCHEMY_EQUIVALENTS]
    if theirs:  # create_engine's argument (and a URL cannot carry it)
        raise sa_exc.ArgumentError(
            f"unknown connguard plugin option: {'; '.join(theirs)} (a create_engine "
            "argument, which the plugin keeps: pass it to create_engine)")
    raise sa_exc.ArgumentError(
        f"{unknown_names(unknown, OPTION_NAMES, 'connguard plugin option')}; the full "
        "list: connguard.sqlalchemy_options.OPTION_NAMES (the SQLAlchemy page of the "
        "docs has the table)")


def single_value(name: str, value: Any) -> Any:
    """A URL query value; repeated parameters arrive as a tuple."""
    if isinstance(value, tuple):
        raise sa_exc.ArgumentError(f"{name} is given more than once in the URL")
    return value


def _shown(name: str, value: Any) -> str:
    """An option's value as an error message may show it: a coordinator URL without its
    password."""
    if name == PREFIX + "coordinator" and isinstance(value, str):
        return repr(coordination.redact_url(value))
    return repr(value)


def _merge(from_url: Mapping[str, Any], from_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """URL and keyword values together; the same option given twice must agree."""
    merged = {name: single_value(name, value) for name, value in from_url.items()}
    for name, value in from_kwargs.items():
        if name in merged and str(merged[name]).lower() != str(value).lower():
            raise sa_exc.ArgumentError(
                f"{name} is given both in the URL ({_shown(name, merged[name])}) and as a "
                f"create_engine argument ({_shown(name, value)}); give it once")
        merged[name] = value
    return merged


#: Every plugin option (without its prefix) and its rule: the pool's rule for the options the
#: plugin shares with connguard.Pool (connguard.options.RULES), the field's for its own.
RULES: Dict[str, options.Rule] = {
    **{f.name: f.metadata["rule"] for f in dataclasses.fields(PluginOptions)
       if f.name not in _GROUPS},
    **{name: options.RULES[name] for name in (*STORM_OPTIONS, *COORDINATION_OPTIONS)},
}


def _parsed(name: str, raw: Any) -> Any:
    """``connguard_<name>``'s value by its rule, text read as in a URL (a config file's
    keyword arguments are text too); ArgumentError naming the option if it is bad."""
    try:
        return RULES[name].parse(PREFIX + name, raw)
    except ValueError as exc:
        raise sa_exc.ArgumentError(str(exc)) from None


def _storm_settings(typed: Mapping[str, Any]) -> Dict[str, Any]:
    """The storm gate's settings given, as StormPolicy's pool options."""
    settings = {name: typed[name] for name in STORM_OPTIONS if name in typed}
    try:
        storm.policy_from_options(settings)
    except ValueError as exc:
        raise sa_exc.ArgumentError(_with_prefix(str(exc), STORM_OPTIONS)) from None
    return settings


def _coordination_settings(typed: Mapping[str, Any]) -> coordination.CoordinationSettings:
    """The coordination settings, as :func:`connguard.coordination.settings_from_options`
    makes them (global_max needs a coordinator); errors name the plugin option."""
    settings = {name: typed[name] for name in COORDINATION_OPTIONS if name in typed}
    try:
        return coordination.settings_from_options(settings)
    except ValueError as exc:
        raise sa_exc.ArgumentError(_with_prefix(str(exc), COORDINATION_OPTIONS)) from None


def _with_prefix(message: str, names: Mapping[str, Any]) -> str:
    """A pool option's message ("global_max needs ...") as the plugin option's."""
    # Longest names first: "coordinator_fail must" is not "coordinator must".
    for name in sorted(names, key=len, reverse=True):
        if message.startswith(name + " "):
            return PREFIX + message
    return f"connguard plugin: {message}"


def check_connect_args(connect_args: Any) -> None:
    """``connect_args`` go to the driver's ``connect()``: a ``connguard_*`` option there would
    be a TypeError at the first connect, far from its cause. Refused at create_engine."""
    if not isinstance(connect_args, Mapping):
        return
    misplaced = sorted(k for k in connect_args if isinstance(k, str) and k.startswith(PREFIX))
    if misplaced:
        raise sa_exc.ArgumentError(
            f"connect_args holds {', '.join(misplaced)}: connect_args go to the driver's "
            "connect(); give connguard's options in the URL query or as create_engine "
            "keywords instead")


def check_coordinator(plugin_options: PluginOptions) -> None:
    """Make the coordinator the options name now, as connguard.Pool does when it is made: a
    URL its backend cannot read (or a missing redis package) fails create_engine, not each
    connect."""
    try:
        coordinator_of(plugin_options)
    except ValueError as exc:
        raise sa_exc.ArgumentError(_with_prefix(str(exc), COORDINATION_OPTIONS)) from None


def parse_options(query: Mapping[str, Any], kwargs: Dict[str, Any]) -> PluginOptions:
    """The plugin's options from a URL query and ``create_engine`` kwargs.

    Removes (consumes) the ``connguard_*`` entries from ``kwargs``, as SQLAlchemy requires;
    the URL's are removed by :meth:`ConnGuardPlugin.update_url`. Raises ``ArgumentError``
    naming an unknown option (and listing the known ones) or a bad value.
    """
    from_url = {k: v for k, v in query.items() if k.startswith(PREFIX)}
    from_kwargs = {k: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(PREFIX)]}
    _reject_unknown(list(from_url) + list(from_kwargs))
    given = _merge(from_url, from_kwargs)
    # None (a keyword argument) is the default, as if not given.
    typed = {name[len(PREFIX):]: _parsed(name[len(PREFIX):], raw)
             for name, raw in given.items() if raw is not None}
    values: Dict[str, Any] = {"storm_settings": _storm_settings(typed),
                              "coordination_settings": _coordination_settings(typed)}
    for field in dataclasses.fields(PluginOptions):
        if field.name in typed and field.name not in _GROUPS:
            values[field.name] = typed[field.name]
    return PluginOptions(**values)


# --- the plugin ---------------------------------------------------------------------------


def coordinator_of(options: PluginOptions) -> Optional[coordination.Coordinator]:
    """The shared coordinator the options name (one per address and process), or None."""
    spec = options.coordination_settings.coordinator
    return None if spec is None else coordination.coordinator_for(spec)


class EnginePart:
    """What each part of an engine's guard knows (its connect path, its idle connections):
    the engine (weakly), the plugin's options, the driver's facts, the password (only to
    mask it in messages), and a lock of its own over its counters."""

    def __init__(self, engine: Callable[[], Any], options: PluginOptions, facts: Any,
                 password: Any) -> None:
        self._engine = engine
        self.options = options
        self.facts = facts  # connguard.dbapis.DriverFacts
        self._password = password
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork

