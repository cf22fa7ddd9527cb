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

from connguard import coordination, storm
from connguard.arguments import unknown_names

PREFIX = "connguard_"


class ConnGuardPluginWarning(UserWarning):
    """The plugin cannot apply all of itself to this engine (another driver or database)."""


ConnGuardPluginWarning.__module__ = "connguard.sqlalchemy_plugin"  # where users import it


def warn(message: str) -> None:
    """Say what the plugin cannot do for an engine, once per place (warnings' own rule)."""
    # stacklevel: point past SQLAlchemy's create_engine at the caller's line, roughly.
    warnings.warn(message, ConnGuardPluginWarning, stacklevel=5)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise sa_exc.ArgumentError(f"{name} must be true or false (1/0, yes/no, on/off); "
                               f"got {value!r}")


def _as_number(name: str, value: Any, integer: bool, minimum: float) -> Any:
    kind = int if integer else float
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        what = "an integer" if integer else "a number"
        raise sa_exc.ArgumentError(f"{name} must be {what} >= {minimum}; got {value!r}")
    return number


def _as_host_gate(name: str, value: Any) -> Union[bool, str]:
    """``host_gate``: true/false, or the directory of the shared gate file."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in _TRUE or text.lower() in _FALSE:
        return text.lower() in _TRUE
    if not text.startswith("/"):
        raise sa_exc.ArgumentError(f"{name} must be true or false, or the absolute path of a "
                                   f"directory for the shared gate file; got {value!r}")
    return text


def _parser(integer: bool = False, minimum: float = 0) -> Callable[[str, Any], Any]:
    return lambda name, value: _as_number(name, value, integer, minimum)


def _option(default: Any, parse: Callable[[str, Any], Any], doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "doc": doc})


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    """The plugin's settings; each field ``x`` is given as ``connguard_x`` in the URL query
    or as a ``create_engine`` keyword (``docs/sqlalchemy.md`` has the table)."""

    reaper: bool = _option(
        True, _as_bool,
        "close idle pooled connections whose server end closed (background thread, every "
        "0.5 s), and idle ones past idle_timeout")
    idle_timeout: Optional[float] = _option(
        None, _parser(),
        "seconds a pooled connection may stay idle before the reaper closes it; default: "
        "derived from the server's wait_timeout unless pool_recycle is set; 0 disables")
    resource_guard: bool = _option(
        True, _as_bool, "refuse a connect before the OS runs out of fds or local ports")
    fd_reserve: Optional[int] = _option(
        None, _parser(integer=True), "fds the resource guard keeps free")
    port_reserve: Optional[int] = _option(
        None, _parser(integer=True), "local ports the resource guard keeps free")
    storm_control: bool = _option(
        True, _as_bool,
        "pass new connections through connguard's reconnect-storm gate (rate limit, backoff, "
        "breaker), shared per server by every pool and engine of the process")
    invalidate_pool: bool = _option(
        True, _as_bool,
        "on a disconnect error, also invalidate every other pooled connection, as SQLAlchemy "
        "does; false keeps them (each checkout checks its own connection anyway)")
    host_gate: Union[bool, str] = _option(
        False, _as_host_gate,
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


def _reject_unknown(names: List[str]) -> None:
    unknown = sorted(set(names) - set(OPTION_NAMES))
    if unknown:
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


def _storm_settings(given: Mapping[str, Any]) -> Dict[str, Any]:
    """The storm gate's settings, typed like StormPolicy's defaults and validated by it."""
    settings = {}
    for name, field in STORM_OPTIONS.items():
        raw = given.get(PREFIX + name)
        if raw is not None:
            kind = type(getattr(storm.StormPolicy, field))
            settings[name] = (_as_bool(PREFIX + name, raw) if kind is bool else
                              _as_number(PREFIX + name, raw, kind is int, 0))
    try:
        storm.policy_from_options(settings)
    except ValueError as exc:
        raise sa_exc.ArgumentError(_with_option_name(str(exc))) from exc
    return settings


def _coordination_settings(given: Mapping[str, Any]) -> coordination.CoordinationSettings:
    """The coordination settings, typed (URL values are strings) and validated by
    :func:`connguard.coordination.settings_from_options`; errors name the plugin option."""
    settings: Dict[str, Any] = {}
    for name in COORDINATION_OPTIONS:
        raw = given.get(PREFIX + name)
        if raw is None:
            continue
        if name == "global_max":
            raw = _as_number(PREFIX + name, raw, True, 1)
        elif name == "lease_ttl":
            raw = _as_number(PREFIX + name, raw, False, 0)
        elif not isinstance(raw, str):
            raise sa_exc.ArgumentError(f"{PREFIX}{name} must be a string; got "
                                       f"{type(raw).__name__}")
        settings[name] = raw
    try:
        return coordination.settings_from_options(settings)
    except ValueError as exc:
        message = str(exc)
        # Longest names first: "coordinator_fail must" is not "coordinator must".
        for name in sorted(COORDINATION_OPTIONS, key=len, reverse=True):
            if message.startswith(name + " "):
                message = PREFIX + message
                break
        else:
            message = f"connguard plugin: {message}"
        raise sa_exc.ArgumentError(message) from None


def _with_option_name(message: str) -> str:
    """StormPolicy names its fields ("burst must be ..."); say the plugin option instead."""
    for name, field in STORM_OPTIONS.items():
        if message.startswith(field + " "):
            return PREFIX + name + message[len(field):]
    return f"connguard plugin: {message}"


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
    values: Dict[str, Any] = {"storm_settings": _storm_settings(given),
                              "coordination_settings": _coordination_settings(given)}
    for field in dataclasses.fields(PluginOptions):
        raw = given.get(PREFIX + field.name)
        if raw is not None and field.name not in _GROUPS:
            values[field.name] = field.metadata["parse"](PREFIX + field.name, raw)
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

