"""What every option may be: one rule per option, checked the same way wherever it is given.

``connguard.Pool(...)``, ``connguard.connect(...)`` / ``install()``, ``connguard.configure(...)``
and the SQLAlchemy plugin's ``connguard_*`` options (URL query or ``create_engine`` keyword) all
check their values here, and the policy objects (:class:`~connguard.PoolSettings`,
:class:`~connguard.storm.StormPolicy`, ...) check theirs with the same rules. A bad value is a
``ValueError`` naming the option as the caller spelt it (``max_connect_rate``,
``connguard_max_connect_rate``) and what it may be.

Why the rules are strict (each was a silent misbehaviour):

* **Finite numbers only.** NaN compares false with everything, so ``value < minimum`` lets it
  through: ``max_lifetime=nan`` turned pooling off, ``checkout_timeout=nan`` failed every wait
  at once. ``inf`` overflowed far from its cause (``lease_ttl=inf``: an OverflowError on every
  checkout).
* **Upper bounds** where a huge value can only be a typo (``10**30`` connections, a backoff
  of a year): see :data:`MAX_CONNECTIONS`, :data:`HOUR`, :data:`DAY`, :data:`YEAR`.
* **Booleans are True or False** in Python: ``storm_control="off"`` is a true string, and
  left storm control on. Text (a URL's query) takes the words SQLAlchemy's ``asbool`` takes.
* **A coordinator URL is read once, when the pool or engine is made**: ``redis://`` with no
  host (the client's silent default, localhost) and unparsable URLs are refused then, not at
  each connect.

``docs/pool.md`` ("Allowed values") lists every rule; a test keeps it equal to :data:`RULES`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from connguard.backend import BACKENDS, Coordinator
from connguard.drivers import SEAMS
from connguard.redaction import redact, redact_url

#: The most connections any count may name (sizes, bursts, a global budget): MySQL's and
#: MariaDB's ``max_connections`` cannot be set above 100,000.
MAX_CONNECTIONS = 100_000
#: The longest backoff or probe interval: a server that came back is found at most this late.
HOUR = 3_600.0
#: The longest wait (``checkout_timeout``) and lease lifetime.
DAY = 86_400.0
#: The longest lifetime or idle time; MySQL's largest ``wait_timeout`` is also a year.
YEAR = 31_536_000.0
#: Connect rates: at least one connect per 1,000 s (a slower rate waits longer than the
#: bucket's arithmetic is meant for), at most a million a second.
MIN_RATE, MAX_RATE = 0.001, 1_000_000.0
#: Descriptors: Linux's ``fs.nr_open`` (the largest RLIMIT_NOFILE) cannot exceed 2**30.
MAX_FDS = 2 ** 30
#: Local ports: there are 65,535.
MAX_PORTS = 65_535
#: TCP keepalive, the kernel's own limits (``MAX_TCP_KEEPIDLE``, ``MAX_TCP_KEEPINTVL``,
#: ``MAX_TCP_KEEPCNT``); their sum is ``TCP_USER_TIMEOUT`` in milliseconds, a C int.
MAX_KEEPIDLE, MAX_KEEPINTVL, MAX_KEEPCNT = 32_767, 32_767, 127
MAX_USER_TIMEOUT = (2 ** 31 - 1) // 1000

SECONDS = "a number of seconds"

RESET_MODES = ("rollback", "full", "none")
FAIL_MODES = ("open", "closed")

#: The words a boolean may be as text (a URL's query), as SQLAlchemy's ``asbool`` reads them.
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})

#: How much of a bad value a message shows.
SHOWN_MAX = 80


def shown(value: Any) -> str:
    """A value as a message may show it: bounded, and text with any password masked (a URL's
    userinfo, ``password=``): messages end up in logs."""
    text = repr(redact(value)) if isinstance(value, str) else repr(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."


def _number_text(value: float) -> str:
    """0.001, 1.5, 86400: no float noise and no exponent in a message."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def check_number(name: str, value: Any, minimum: float, allow_none: bool = False,
                 integer: bool = False, above: bool = False, kind: str = "",
                 why: str = "", maximum: Optional[float] = None, top: str = "",
                 below: bool = False, none: str = "") -> None:
    """The one check of a number: a ValueError naming ``name``, the allowed values and what
    was given, unless ``value`` is a finite number (``integer``: an int; never a bool)
    ``>= minimum`` (``above``: ``> minimum``) and ``<= maximum`` (``below``: ``< maximum``),
    or None when ``allow_none``. ``kind`` words the number ("a number of seconds"), ``why``
    says why the minimum, ``top`` why the maximum, ``none`` what None means."""
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    # An int is finite however large (math.isfinite(10**400) would overflow converting it).
    if not isinstance(value, bool) and isinstance(value, kinds) and (
            isinstance(value, int) or math.isfinite(value)) and (
            value > minimum if above else value >= minimum) and (
            maximum is None or (value < maximum if below else value <= maximum)):
        return
    allowed = describe_number(minimum, allow_none, integer, above, kind, why, maximum, top,
                              below, none)
    raise ValueError(f"{name} must be {allowed}, got {shown(value)}")


def describe_number(minimum: float, allow_none: bool = False, integer: bool = False,
                    above: bool = False, kind: str = "", why: str = "",
                    maximum: Optional[float] = None, top: str = "", below: bool = False,
                    none: str = "") -> str:
    """"an integer >= 1 and <= 100000", "a number of seconds > 0 and <= 3600 (an hour)"."""
    text = f"{kind or ('an integer' if integer else 'a number')} {'>' if above else '>='} " \
           f"{_number_text(minimum)}" + (f" ({why})" if why else "")
    if maximum is not None:
        text += f" and {'<' if below else '<='} {_number_text(maximum)}" + (
            f" ({top})" if top else "")
    if allow_none:
        text += ", or None" + (f" ({none})" if none else "")
    return text


# --- rules --------------------------------------------------------------------------------


class Rule:
    """What one option may be. ``check``: a Python value (returned unchanged, or ValueError);
    ``parse``: a value that may be text (a URL's query, an INI file), returned typed."""

    def check(self, name: str, value: Any) -> Any:
        raise NotImplementedError

    def parse(self, name: str, value: Any) -> Any:
        return self.check(name, value)

    def allowed(self) -> str:
        """The allowed values in words (the docs' table and the messages)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Number(Rule):
    """A finite number within bounds (see :func:`check_number` for the fields)."""

    minimum: float
    maximum: float
    integer: bool = False
    above: bool = False
    below: bool = False
    none: Optional[str] = None  # what None means; None: not allowed
    kind: str = ""
    why: str = ""
    top: str = ""

    def _fields(self) -> Dict[str, Any]:
        return {"minimum": self.minimum, "allow_none": self.none is not None,
                "integer": self.integer, "above": self.above, "kind": self.kind,
                "why": self.why, "maximum": self.maximum, "top": self.top,
                "below": self.below, "none": self.none or ""}

    def check(self, name: str, value: Any) -> Any:
        check_number(name, value, **self._fields())
        return value

    def parse(self, name: str, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if self.integer else float(text)
            except ValueError:
                raise ValueError(f"{name} must be {self.allowed()}, got {shown(value)}") \
                    from None
        elif self.integer is False and isinstance(value, int) and not isinstance(value, bool) \
                and abs(value) <= self.maximum:
            value = float(value)  # typed as the policy's default is (a larger int is refused
            # by check, as an int: float() of one past 1e308 would raise OverflowError)
        return self.check(name, value)

    def allowed(self) -> str:
        return describe_number(**self._fields())


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
    """True or False (as text: true/false, 1/0, yes/no, on/off)."""

    def check(self, name: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = " (text is not read as a boolean here)" \
            if isinstance(value, str) else ""
        raise ValueError(f"{name} must be True or False, got {shown(value)}{text}")

    def parse(self, name: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in TRUE_WORDS or text in FALSE_WORDS:
            return text in TRUE_WORDS
        raise ValueError(f"{name} must be true or false (as text: 1/0, yes/no, on/off too), "
                         f"got {shown(value)}")

    def allowed(self) -> str:
        return "True or False (in a URL: true/false, 1/0, yes/no, on/off)"


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a few words."""

    values: Tuple[str, ...]
    none: Optional[str] = None

    def check(self, name: str, value: Any) -> Any:
        if (value is None and self.none is not None) or (
                isinstance(value, str) and value in self.values):
            return value
        raise ValueError(f"{name} must be {self.allowed()}; got {shown(value)}")

    def allowed(self) -> str:
        none = "" if self.none is None else f", or None ({self.none})"
        return f"one of {', '.join(self.values)}{none}"


@dataclasses.dataclass(frozen=True)
class Text(Rule):
    """A non-empty string."""

    none: Optional[str] = None

    def check(self, name: str, value: Any) -> Any:
        if (value is None and self.none is not None) or (isinstance(value, str) and value):
            return value
        raise ValueError(f"{name} must be {self.allowed()}, got {shown(value)}")

    def allowed(self) -> str:
        return "a non-empty string" + ("" if self.none is None else f", or None ({self.none})")


@dataclasses.dataclass(frozen=True)
class HostGate(Rule):
    """``host_gate``: True/False (None: off), or the absolute path of a directory."""

    def check(self, name: str, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, str) and os.path.isabs(value) and "\0" not in value:
            return value
        raise ValueError(f"{name} must be True, False or the absolute path of a directory for "
                         f"the shared handshake slots; got {shown(value)}")

    def parse(self, name: str, value: Any) -> Any:
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, str) and (text.lower() in TRUE_WORDS or text.lower() in FALSE_WORDS):
            return text.lower() in TRUE_WORDS
        if isinstance(text, str) and not text.startswith("/"):
            raise ValueError(f"{name} must be true or false, or the absolute path of a "
                             f"directory for the shared gate file; got {shown(value)}")
        return self.check(name, text)

    def allowed(self) -> str:
        return "True, False, None (off) or the absolute path of a directory"


@dataclasses.dataclass(frozen=True)
class Keepalive(Rule):
    """``keepalive``: True (the defaults), False/None (the OS defaults), or a tuple."""

    def check(self, name: str, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, (tuple, list)) and len(value) == 3:
            check_keepalive(name, *value)
            return value
        raise ValueError(f"{name} must be True, False, None or a tuple (idle seconds, "
                         f"interval seconds, probe count); got {shown(value)}")

    def allowed(self) -> str:
        return (f"True, False, None or (idle s, interval s, count): idle 1..{MAX_KEEPIDLE}, "
                f"interval 1..{MAX_KEEPINTVL}, count an integer 1..{MAX_KEEPCNT}, "
                f"idle + interval × count <= {MAX_USER_TIMEOUT} s")


def check_keepalive(name: str, idle: Any, interval: Any, count: Any) -> None:
    """The parts of a keepalive tuple, within what the kernel accepts."""
    check_number(f"{name} idle", idle, 1, kind="a number of seconds", maximum=MAX_KEEPIDLE)
    check_number(f"{name} interval", interval, 1, kind="a number of seconds",
                 maximum=MAX_KEEPINTVL)
    check_number(f"{name} count", count, 1, integer=True, maximum=MAX_KEEPCNT)
    if idle + interval * count > MAX_USER_TIMEOUT:
        raise ValueError(f"{name}: idle + interval × count must be at most {MAX_USER_TIMEOUT} "
                         f"s (TCP_USER_TIMEOUT in ms is a C int), got {idle + interval * count}")


@dataclasses.dataclass(frozen=True)
class CoordinatorURL(Rule):
    """``coordinator``: None, a Coordinator, or a URL whose scheme names a backend, read now.

    ``redis://`` with no host is refused rather than read as the client's default
    (localhost:6379): a URL whose host went missing (an empty environment variable, a
    password with an unencoded ``/`` that urllib reads as the path) would otherwise silently
    share state through whatever Redis runs on each host. ``redis://localhost:6379/0`` says
    it when that is meant."""

    def check(self, name: str, value: Any) -> Any:
        if value is None or isinstance(value, Coordinator):
            return value
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a URL such as 'redis://host:6379/0' or None, got "
                             f"{type(value).__name__}")
        problem = url_problem(value)
        if problem is not None:
            raise ValueError(f"{name} {problem}")
        return value

    def allowed(self) -> str:
        return (f"None, or a URL with scheme {', '.join(sorted(BACKENDS))} that names its host "
                "(redis://host:6379/0) or socket path (unix:///path/redis.sock?db=0)")


_ENCODE_HINT = ("percent-encode / @ : # ? [ ] in its user name and password (/ is %2F), and "
                "close an IPv6 address's bracket")


def _shown_url(url: str) -> str:
    """A coordinator URL as a message shows it: its password masked by the URL's structure
    (a blank in it ends a token of text, not the password), bounded."""
    return shown(redact_url(url))


def url_problem(url: str) -> Optional[str]:
    """What is wrong with a coordinator URL ("must ..."), or None. The URL is shown with its
    password masked, and urllib's own words never (they may quote a piece of the password:
    "Port could not be cast to integer value as 'Zq9x'")."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in BACKENDS:
        return f"must be a URL with scheme {', '.join(sorted(BACKENDS))}, got {_shown_url(url)}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"must be a URL that can be read, got {_shown_url(url)}: {_ENCODE_HINT}"
    try:
        port = parts.port
    except ValueError:
        return f"must name a port in 1..65535, got {_shown_url(url)}: {_ENCODE_HINT}"
    if scheme == "unix":
        if not parts.path:
            return f"must name the socket (unix:///path/redis.sock?db=0), got {_shown_url(url)}"
        return None
    if not parts.hostname:
        return (f"must name the Redis host (redis://host:6379/0), got {_shown_url(url)}: without "
                "one the client would use localhost:6379 (write redis://localhost:6379/0 if "
                f"that is meant); {_ENCODE_HINT}")
    if port == 0:
        return f"must name a port in 1..65535, got {_shown_url(url)}"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return (f"must name the database by number (redis://host:6379/0), got {_shown_url(url)}: "
                f"{_ENCODE_HINT}")
    return None


#: Every pool option (connguard.arguments.POOL_OPTIONS) and what it may be.
RULES: Mapping[str, Rule] = {
    "name": Text(none="the default, user@host:port/db"),
    "driver": Choice(tuple(sorted(SEAMS))),
    # sizing and waiting
    "max_size": Number(1, MAX_CONNECTIONS, integer=True),
    "max_overflow": Number(-1, MAX_CONNECTIONS, integer=True, why="-1: no limit"),
    "min_idle": Number(0, MAX_CONNECTIONS, integer=True),
    "checkout_timeout": Number(0, DAY, kind=SECONDS, top="a day"),
    "leak_threshold": Number(0.001, YEAR, kind=SECONDS, top="a year", none="off"),
    # lifetime, reset, keepalive
    "max_lifetime": Number(0.001, YEAR, kind=SECONDS, top="a year", none="no limit"),
    "lifetime_jitter": Number(0, 1, below=True),
    "idle_timeout": Number(0.001, YEAR, kind=SECONDS, top="a year", none="no limit"),
    "reset": Choice(RESET_MODES),
    "keepalive": Keepalive(),
    # the OS resource guard, the host-wide gate
    "resource_guard": Flag(),
    "fd_reserve": Number(0, MAX_FDS, integer=True),
    "port_reserve": Number(0, MAX_PORTS, integer=True,
                           none="the default, 5 % of the port range, at most 1000"),
    "host_gate": HostGate(),
    # storm control
    "storm_control": Flag(),
    "max_connect_rate": Number(MIN_RATE, MAX_RATE, kind="a number of connects per second"),
    "connect_burst": Number(1, MAX_CONNECTIONS, integer=True),
    "max_handshakes": Number(1, MAX_CONNECTIONS, integer=True),
    "backoff_initial": Number(0, HOUR, above=True, kind=SECONDS, top="an hour"),
    "backoff_max": Number(0, HOUR, above=True, kind=SECONDS, top="an hour"),
    "breaker_threshold": Number(1, MAX_CONNECTIONS, integer=True),
    "ceiling_probe": Number(0, HOUR, above=True, kind=SECONDS, top="an hour"),
    "fail_fast": Flag(),
    "reconnect_rate": Number(MIN_RATE, MAX_RATE, kind="a number of connects per second"),
    "reconnect_burst": Number(1, MAX_CONNECTIONS, integer=True),
    # coordination across processes (None: the default, as if not given)
    "coordinator": CoordinatorURL(),
    "global_max": Number(1, MAX_CONNECTIONS, integer=True, none="no budget"),
    "coordinator_fail": Choice(FAIL_MODES, none="the default, open"),
    "lease_ttl": Number(1.5, DAY, kind=SECONDS, why="three reaper passes", top="a day",
                        none="the default, 15"),
    "coordinator_key": Text(none="the default, host:port"),
}


def check_options(options: Mapping[str, Any], prefix: str = "") -> None:
    """Check each of ``options`` (pool options by name) by its rule; a ValueError names the
    first bad one as ``prefix + name``."""
    for name, value in options.items():
        RULES[name].check(prefix + name, value)
