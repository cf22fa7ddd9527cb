"""``connguard doctor``: the numbers that decide whether connections will fail, with verdicts.

A report has two halves.  The host: fd limits, the ephemeral port range and the connect rate
it sustains (ports ÷ 60 s of TIME_WAIT), ``tcp_tw_reuse``, the system file table, and the
sockets toward the server by state.  The server (with a DSN): ``max_connections`` against
``Threads_connected`` and ``Max_used_connections``, timeouts, ``max_connect_errors``, the
thread pool, ``back_log``, ``Aborted_connects`` and ``Connection_errors_*``.

Every line is a :class:`Check` with a verdict: ``green`` (fine), ``yellow`` (worth a look, or
trouble in the past) or ``red`` (failing now or about to).  The rules are small pure functions
of the numbers, so they are tested without a host or a server; :func:`diagnose` does the I/O.
The password is never part of a report: :class:`Target` keeps it out of ``repr`` and JSON.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import resource
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import pymysql

from connguard import driver, errors
from connguard.census import census
from connguard.guard import DEFAULT_FD_RESERVE, default_port_reserve
from connguard.limits import TIME_WAIT_SECONDS, limits

GREEN, YELLOW, RED = "green", "yellow", "red"
VERDICTS = (GREEN, YELLOW, RED)  # in order of severity

#: Server variables the report reads (plus every ``thread_pool_*``).
SERVER_VARIABLES = (
    "version", "max_connections", "max_user_connections", "wait_timeout",
    "interactive_timeout", "connect_timeout", "max_connect_errors", "thread_handling",
    "back_log",
)
#: Server status counters the report reads (plus ``Connection_errors_*``, ``Threadpool_*``).
SERVER_STATUS = ("Threads_connected", "Threads_running", "Max_used_connections",
                 "Aborted_connects", "Connections")
#: A SQLAlchemy URL of any MySQL driver names the same server (the doctor connects with
#: PyMySQL whatever the driver): paste the engine's URL as it is.
DSN_SCHEMES = tuple(f"{dialect}{driver}" for dialect in ("mysql", "mariadb")
                    for driver in ("", "+pymysql", "+mysqldb", "+aiomysql", "+asyncmy"))
CONNECT_TIMEOUT = 5  # seconds: a doctor must answer even when the server does not
IO_TIMEOUT = 10  # seconds for any one read or write of the doctor's queries


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report.

    ``value`` is what a person reads ("1,234 of 20,000"); ``amount`` and ``limit`` are the
    same numbers for a program, in ``unit`` (``--json``; docs/doctor.md has the schema).
    ``id`` (``section.name`` in snake case) is stable across releases.
    """

    section: str  # "host", "sockets" or "server"
    name: str
    value: Any  # JSON-serialisable display value
    verdict: str
    note: str = ""
    amount: Optional[float] = None
    limit: Optional[float] = None

    def __post_init__(self) -> None:
        if self.amount is None and isinstance(self.value, (int, float)) \
                and not isinstance(self.value, bool):
            object.__setattr__(self, "amount", self.value)  # frozen: set once, here

    @property
    def id(self) -> str:
        return f"{self.section}.{re.sub(r'[^a-z0-9]+', '_', self.name.lower()).strip('_')}"

    @property
    def unit(self) -> Optional[str]:
        if self.amount is None and self.limit is None:
            return None
        return UNITS.get(self.id) or ("sockets" if self.section == "sockets" else "count")

    def as_dict(self) -> Dict[str, Any]:
        return {"id": self.id, **dataclasses.asdict(self), "unit": self.unit}


#: The unit of each check's ``amount`` and ``limit`` (default: a count of things).
UNITS = {
    "host.open_files_soft_hard": "descriptors", "host.open_files_in_use": "descriptors",
    "host.ephemeral_port_range": "ports", "host.system_file_table": "files",
    "host.net_core_somaxconn": "connections", "sockets.ports_in_use_toward_server": "ports",
    "host.net_ipv4_tcp_tw_reuse": "mode",
    "server.wait_timeout": "seconds", "server.interactive_timeout": "seconds",
    "server.connect_timeout": "seconds", "server.thread_pool_stall_limit": "milliseconds",
    "server.thread_pool_idle_timeout": "seconds", "server.threads_connected": "connections",
    "server.max_used_connections": "connections", "server.max_connections": "connections",
    "server.max_user_connections": "connections", "server.back_log": "connections",
    "server.threadpool_threads": "threads", "server.thread_pool_size": "groups",
    "server.thread_pool_max_threads": "threads",
}


#: The server's answers that refuse the login itself (a password may be what is missing):
#: access denied (1045), and 1698 (a socket-auth account reached without a password).
_LOGIN_REFUSED = frozenset({1045, 1698})


def worst(checks: Sequence[Check]) -> str:
    """The most severe verdict among ``checks`` (green for none)."""
    return max((c.verdict for c in checks), key=VERDICTS.index, default=GREEN)


# --- the server to examine ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the server is and how to log in.  ``password`` never shows in repr or JSON."""

    host: str = "localhost"
    port: int = 3306
    user: Optional[str] = None
    database: Optional[str] = None
    unix_socket: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    #: DSN parameters left out (for SQLAlchemy and the plugin, not the server).
    ignored: Tuple[str, ...] = ()
    #: PyMySQL connect arguments from the DSN (CONNECT_PARAMETERS), as (name, value).
    options: Tuple[Tuple[str, Any], ...] = ()

    def address(self) -> str:
        """``host:port``, or the unix socket path."""
        return self.unix_socket or _host_port(self.host, self.port)

    def describe(self) -> str:
        where = self.address()
        user = f"{self.user}@" if self.user else ""
        return f"{user}{where}" + (f"/{self.database}" if self.database else "")

    def as_dict(self) -> Dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user,
                "database": self.database, "unix_socket": self.unix_socket}

    def connect_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user,
                                  "password": self.password or "", "database": self.database,
                                  "connect_timeout": CONNECT_TIMEOUT,
                                  # Bound every read and write too: a frozen server would
                                  # otherwise hang the greeting read or a query forever.
                                  "read_timeout": IO_TIMEOUT, "write_timeout": IO_TIMEOUT}
        if self.unix_socket:
            kwargs["unix_socket"] = self.unix_socket
        kwargs.update(self.options)
        return kwargs


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    """An IP address, or a host name of dot-separated labels (253 characters at most)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label)
                                        for label in name.split("."))


#: Query parameters a DSN may carry: the socket, and PyMySQL's connect arguments that an
#: engine URL commonly holds (the doctor connects with them: a TLS-only server needs ssl_*).
CONNECT_PARAMETERS = ("charset", "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert",
                      "ssl_verify_identity")
DSN_PARAMETERS = ("unix_socket", *CONNECT_PARAMETERS)
_FLAGS = ("ssl_verify_cert", "ssl_verify_identity")
#: Parameters of an engine URL that are for SQLAlchemy and the connguard plugin, not for the
#: server: ``plugin=connguard`` and the plugin's ``connguard_*`` options. The doctor connects
#: with PyMySQL, so it ignores them (with a note) and the engine's URL can be pasted as is.
IGNORED_PARAMETER = "plugin"
IGNORED_PREFIX = "connguard_"


def _ignored(name: str) -> bool:
    return name == IGNORED_PARAMETER or name.startswith(IGNORED_PREFIX)


def parse_dsn(dsn: str) -> Target:
    """``mysql://user[:password]@host[:port][/database][?unix_socket=PATH]`` as a Target.

    Any scheme of :data:`DSN_SCHEMES` (a SQLAlchemy URL of a MySQL driver); ``plugin=`` and
    ``connguard_*`` parameters are left out, named in ``Target.ignored``.

    Raises ValueError, with a message that never contains the password.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in DSN_SCHEMES:
        raise ValueError(f"DSN scheme must be one of {', '.join(DSN_SCHEMES)}: "
                         f"mysql://user@host:port/db")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("DSN port must be a number in 1..65535") from None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("DSN port must be a number in 1..65535")
    query = parse_qs(parts.query, keep_blank_values=True)
    ignored = tuple(sorted(name for name in query if _ignored(name)))
    unknown = sorted(set(query) - set(DSN_PARAMETERS) - set(ignored))
    if unknown:
        raise ValueError(f"unknown DSN parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; allowed: {', '.join(DSN_PARAMETERS)} (and, "
                         f"ignored: {IGNORED_PARAMETER}=, {IGNORED_PREFIX}*)")
    socket_path = query.get("unix_socket", [None])[0]
    if not parts.hostname and not socket_path:
        raise ValueError("DSN names no server: mysql://user@host:port/db, or "
                         "mysql://user@/db?unix_socket=PATH")
    host = unquote(parts.hostname or "localhost")
    if not _valid_host(host):
        raise ValueError("DSN host is not a valid IP address or host name (letters, digits, "
                         "- and _ in dot-separated labels of at most 63 characters)")
    return Target(host=host, port=port or 3306,
                  user=unquote(parts.username) if parts.username else None,
                  database=unquote(parts.path.lstrip("/")) or None,
                  unix_socket=socket_path,
                  password=unquote(parts.password) if parts.password is not None else None,
                  ignored=ignored, options=_connect_options(query))


def _connect_options(query: Dict[str, List[str]]) -> Tuple[Tuple[str, Any], ...]:
    """CONNECT_PARAMETERS of the DSN as PyMySQL's arguments (flags as booleans)."""
    options = []
    for name in CONNECT_PARAMETERS:
        if name in query:
            value: Any = query[name][-1]
            if name in _FLAGS:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(f"DSN parameter {name} must be true or false, "
                                     f"got {value!r}")
                value = value.lower() in ("true", "1", "yes", "on")
            options.append((name, value))
    return tuple(options)


# --- verdict rules: host ------------------------------------------------------------------------


def _ratio_verdict(used: float, limit: float, yellow: float, red: float) -> str:
    if limit <= 0:
        return GREEN
    share = used / limit
    return RED if share >= red else YELLOW if share >= yellow else GREEN


def _n(value: Optional[float]) -> str:
    """A number for a note: thousands separators; ``?`` when unknown."""
    if value is None:
        return "?"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def check_fd_soft_limit(soft: Optional[int], hard: Optional[int]) -> Check:
    """A soft limit below the hard one is the trap of incident 2: it stops the process early."""
    value = f"{_limit_text(soft)} / {_limit_text(hard)}"
    if soft is not None and hard != soft:
        return Check("host", "open files soft / hard", value, YELLOW,
                     f"the soft limit stops the process at {_n(soft)} descriptors; raise it "
                     "toward the hard limit (LimitNOFILE=, ulimit -n, "
                     "connguard.limits.raise_fd_soft_limit())", amount=soft, limit=hard)
    return Check("host", "open files soft / hard", value, GREEN, amount=soft, limit=hard)


def _limit_text(value: Optional[int]) -> str:
    return "unlimited" if value is None else f"{value:,}"


def check_fd_headroom(in_use: Optional[int], soft: Optional[int],
                      reserve: int = DEFAULT_FD_RESERVE) -> Check:
    """Descriptors left under the soft limit: red below the guard's reserve."""
    if in_use is None or soft is None:
        return Check("host", "open files in use", in_use, GREEN, "limit unknown or unlimited")
    left = soft - in_use
    value = f"{in_use:,} of {soft:,}"
    if left < reserve:
        return Check("host", "open files in use", value, RED,
                     f"only {_n(left)} left: new sockets fail with errno 24 (EMFILE)",
                     amount=in_use, limit=soft)
    if left < soft * 0.2:
        return Check("host", "open files in use", value, YELLOW,
                     f"{_n(left)} left under the soft limit", amount=in_use, limit=soft)
    return Check("host", "open files in use", value, GREEN, amount=in_use, limit=soft)


def check_port_range(port_range: Optional[Tuple[int, int]]) -> Check:
    """The ephemeral range and the connect rate toward one server it sustains."""
    if port_range is None:
        return Check("host", "ephemeral port range", None, GREEN, "unknown (no /proc)")
    size = port_range[1] - port_range[0] + 1
    rate = size / TIME_WAIT_SECONDS
    value = f"{port_range[0]}-{port_range[1]} ({size:,} ports)"
    note = (f"sustains about {_n(rate)} new connections/s per server address "
            f"(each close holds a port {TIME_WAIT_SECONDS} s in TIME_WAIT)")
    if size < 10_000:
        return Check("host", "ephemeral port range", value, YELLOW,
                     note + "; widen net.ipv4.ip_local_port_range", amount=size)
    return Check("host", "ephemeral port range", value, GREEN, note, amount=size)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine by its name alone (no DNS: a doctor must not hang)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_tw_reuse(value: Optional[int], server: Optional[str] = None) -> Check:
    """``server``: the host connected to over TCP (None: no server, or a unix socket).
    Mode 2 (the kernel's default) reuses TIME_WAIT ports early toward loopback only, so it
    is a warning when the server is remote."""
    meaning = {0: "TIME_WAIT ports are never reused early",
               1: "connect() may reuse TIME_WAIT ports after 1 s"}
    if value != 2:
        return Check("host", "net.ipv4.tcp_tw_reuse", value, GREEN,
                     meaning.get(value, "") if value is not None else "unknown")
    loopback_only = "TIME_WAIT ports are reused early on loopback (127.0.0.0/8, ::1) only"
    if server is None:
        return Check("host", "net.ipv4.tcp_tw_reuse", value, GREEN,
                     f"{loopback_only}: connections to a remote server wait the full 60 s; "
                     "set 1 if this host connects to remote servers often")
    if _is_loopback(server):
        return Check("host", "net.ipv4.tcp_tw_reuse", value, GREEN,
                     f"{loopback_only}, which is where {server} is")
    return Check("host", "net.ipv4.tcp_tw_reuse", value, YELLOW,
                 f"{loopback_only}, and {server} is remote: its ports wait the full 60 s of "
                 "TIME_WAIT; set net.ipv4.tcp_tw_reuse=1 if this host opens connections to "
                 "it often (better: pool them)")


def check_file_table(file_nr: Optional[Tuple[int, int]]) -> Check:
    """The system-wide file table (ENFILE, errno 23, when full)."""
    if file_nr is None:
        return Check("host", "system file table", None, GREEN, "unknown")
    allocated, maximum = file_nr
    verdict = _ratio_verdict(allocated, maximum, 0.7, 0.9)
    note = "" if verdict == GREEN else "raise fs.file-max; find the process holding most fds"
    return Check("host", "system file table", f"{allocated:,} of {maximum:,}", verdict, note,
                 amount=allocated, limit=maximum)


def check_somaxconn(value: Optional[int]) -> Check:
    return Check("host", "net.core.somaxconn", value, GREEN,
                 "caps the listen backlog (back_log) of a server on this host")


# --- verdict rules: sockets toward the server -----------------------------------------------------


def check_ports_toward(counts: Mapping[str, int], port_range: Optional[Tuple[int, int]],
                       target: str) -> Check:
    """Local ports held toward the server (every state but LISTEN) against the range."""
    used = sum(n for state, n in counts.items() if state != "listen")
    if port_range is None:
        return Check("sockets", "ports in use toward server", used, GREEN, "range unknown")
    size = port_range[1] - port_range[0] + 1
    reserve = default_port_reserve(size)
    value = f"{used:,} of {size:,}"
    if size - used <= reserve:
        return Check("sockets", "ports in use toward server", value, RED,
                     f"{_n(size - used)} free toward {target}: new connections fail with "
                     "errno 99 soon (the connguard guard refuses them now)",
                     amount=used, limit=size)
    if used >= size / 2:
        return Check("sockets", "ports in use toward server", value, YELLOW,
                     "half the range is taken: reuse connections", amount=used, limit=size)
    return Check("sockets", "ports in use toward server", value, GREEN, amount=used,
                 limit=size)


def check_time_wait(counts: Mapping[str, int], port_range: Optional[Tuple[int, int]],
                    tw_reuse: Optional[int]) -> Check:
    """Many TIME_WAIT sockets mean connect/close churn (incident 4)."""
    tw = counts.get("time_wait", 0)
    size = port_range[1] - port_range[0] + 1 if port_range else None
    if size and tw >= size / 4:
        return Check("sockets", "TIME_WAIT toward server", tw, YELLOW,
                     f"connect/close churn: about {_n(tw / TIME_WAIT_SECONDS)} new "
                     "connections/s; pool connections, or set net.ipv4.tcp_tw_reuse=1 "
                     f"(now {_n(tw_reuse)})")
    return Check("sockets", "TIME_WAIT toward server", tw, GREEN)


def check_close_wait(counts: Mapping[str, int]) -> Check:
    """CLOSE_WAIT has no timer: the server closed, a client here never did (incident 2)."""
    cw = counts.get("close_wait", 0)
    if cw:
        return Check("sockets", "CLOSE_WAIT toward server", cw, YELLOW,
                     "the server closed these (KILL, wait_timeout, 1040) and a process here "
                     "never closed its end: they hold an fd and a port until it does")
    return Check("sockets", "CLOSE_WAIT toward server", cw, GREEN)


def check_established(counts: Mapping[str, int]) -> Check:
    return Check("sockets", "ESTABLISHED toward server", counts.get("established", 0), GREEN,
                 "from every process on this host")


# --- verdict rules: server -----------------------------------------------------------------------


def _int(values: Mapping[str, Any], name: str) -> Optional[int]:
    try:
        return int(values[name])
    except (KeyError, TypeError, ValueError):
        return None


def check_connections(threads_connected: Optional[int], max_connections: Optional[int]
                      ) -> Check:
    if threads_connected is None or not max_connections:
        return Check("server", "Threads_connected", threads_connected, GREEN, "unknown")
    verdict = _ratio_verdict(threads_connected, max_connections, 0.75, 0.9)
    note = "includes this check's own connection"
    if verdict != GREEN:
        note = (f"{threads_connected / max_connections:.0%} of max_connections: new "
                "connections will get 1040 Too many connections; " + note)
    return Check("server", "Threads_connected", f"{threads_connected:,} of {max_connections:,}",
                 verdict, note, amount=threads_connected, limit=max_connections)


def check_max_used(max_used: Optional[int], max_connections: Optional[int]) -> Check:
    if max_used is None or not max_connections:
        return Check("server", "Max_used_connections", max_used, GREEN, "unknown")
    value = f"{max_used:,} of {max_connections:,}"
    if max_used >= max_connections:
        return Check("server", "Max_used_connections", value, YELLOW,
                     "the server was full at some point since it started: cap client pools",
                     amount=max_used, limit=max_connections)
    return Check("server", "Max_used_connections", value, GREEN, "peak since the server started",
                 amount=max_used, limit=max_connections)


def _seconds(seconds: Optional[int]) -> Optional[str]:
    return None if seconds is None else f"{seconds:,} s"


def check_wait_timeout(name: str, seconds: Optional[int]) -> Check:
    if seconds is not None and seconds < 60:
        return Check("server", name, _seconds(seconds), YELLOW,
                     "idle connections are killed within a minute: pools reconnect often "
                     "(connguard retires them first)", amount=seconds)
    return Check("server", name, _seconds(seconds), GREEN,
                 "idle connections are closed after this", amount=seconds)


def check_connect_timeout(seconds: Optional[int]) -> Check:
    if seconds is not None and seconds < 5:
        return Check("server", "connect_timeout", _seconds(seconds), YELLOW,
                     "slow logins on a busy server are dropped (2013 during handshake)",
                     amount=seconds)
    return Check("server", "connect_timeout", _seconds(seconds), GREEN,
                 "seconds a login may take", amount=seconds)


def check_max_connect_errors(value: Optional[int]) -> Check:
    if value is not None and value < 100:
        return Check("server", "max_connect_errors", value, YELLOW,
                     "a few interrupted handshakes block a client host (1129) until FLUSH HOSTS")
    return Check("server", "max_connect_errors", value, GREEN)


def check_max_user_connections(value: Optional[int]) -> Check:
    note = "unlimited" if value == 0 else "per account: more gives 1203"
    return Check("server", "max_user_connections", value, GREEN, note)


def check_back_log(value: Optional[int]) -> Check:
    if value is not None and value < 50:
        return Check("server", "back_log", value, YELLOW,
                     "connect bursts overflow the listen queue (errno 11, timeouts)")
    return Check("server", "back_log", value, GREEN, "listen queue for connects not yet accepted")


def check_aborted_connects(aborted: Optional[int], connections: Optional[int]) -> Check:
    if aborted is None or not connections:
        return Check("server", "Aborted_connects", aborted, GREEN)
    if aborted >= 10 and aborted / connections >= 0.05:
        return Check("server", "Aborted_connects", f"{aborted:,} of {connections:,}", YELLOW,
                     "many failed logins or handshakes: wrong passwords, timeouts, probes",
                     amount=aborted, limit=connections)
    return Check("server", "Aborted_connects", f"{aborted:,} of {connections:,}", GREEN,
                 amount=aborted, limit=connections)


def check_connection_errors(status: Mapping[str, Any]) -> List[Check]:
    """One line per ``Connection_errors_*`` counter: yellow when it is not zero."""
    checks = []
    for name in sorted(k for k in status if k.startswith("Connection_errors_")):
        count = _int(status, name)
        if count:
            note = ("connections refused at max_connections (1040) since start"
                    if name.endswith("max_connections") else "errors since the server started")
            checks.append(Check("server", name, count, YELLOW, note))
        else:
            checks.append(Check("server", name, count, GREEN))
    return checks


def check_thread_pool(variables: Mapping[str, Any], status: Mapping[str, Any]) -> List[Check]:
    """thread_handling, and with a thread pool its settings (incidents 3 and 5)."""
    handling = variables.get("thread_handling")
    checks = [Check("server", "thread_handling", handling, GREEN,
                    "a thread per connection" if handling == "one-thread-per-connection"
                    else "logins wait for a free worker when all are busy")]
    if handling != "pool-of-threads":
        return checks
    stall = _int(variables, "thread_pool_stall_limit")
    if stall is not None and stall >= 500:
        checks.append(Check("server", "thread_pool_stall_limit", stall, YELLOW,
                            "ms before a blocked worker is replaced: queries queued behind it "
                            "wait that long (lowering it to 10 ms fixed incident 5)"))
    for name in ("thread_pool_size", "thread_pool_oversubscribe", "thread_pool_max_threads",
                 "thread_pool_idle_timeout"):
        if name in variables:
            checks.append(Check("server", name, _int(variables, name), GREEN))
    threads, maximum = _int(status, "Threadpool_threads"), _int(variables,
                                                                 "thread_pool_max_threads")
    if threads is not None and maximum:
        verdict = _ratio_verdict(threads, maximum, 0.75, 0.9)
        checks.append(Check("server", "Threadpool_threads", f"{threads:,} of {maximum:,}",
                            verdict, "" if verdict == GREEN else "new logins will queue",
                            amount=threads, limit=maximum))
    return checks


def server_checks(variables: Mapping[str, Any], status: Mapping[str, Any]) -> List[Check]:
    """Every server line, from SHOW GLOBAL VARIABLES and SHOW GLOBAL STATUS values."""
    max_connections = _int(variables, "max_connections")
    checks = [
        Check("server", "max_connections", max_connections, GREEN),
        check_connections(_int(status, "Threads_connected"), max_connections),
        check_max_used(_int(status, "Max_used_connections"), max_connections),
        check_max_user_connections(_int(variables, "max_user_connections")),
        check_wait_timeout("wait_timeout", _int(variables, "wait_timeout")),
        check_wait_timeout("interactive_timeout", _int(variables, "interactive_timeout")),
        check_connect_timeout(_int(variables, "connect_timeout")),
        check_max_connect_errors(_int(variables, "max_connect_errors")),
        check_back_log(_int(variables, "back_log")),
        check_aborted_connects(_int(status, "Aborted_connects"), _int(status, "Connections")),
    ]
    return checks + check_thread_pool(variables, status) + check_connection_errors(status)


# --- gathering (I/O) ----------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """Everything ``connguard doctor`` found; :meth:`as_json` is the ``--json`` document."""

    target: Optional[Target]
    process: Dict[str, Any]
    limits: Dict[str, Any]
    census: Optional[Dict[str, int]]
    server: Optional[Dict[str, Any]]
    checks: List[Check]

    @property
    def worst(self) -> str:
        return worst(self.checks)

    def as_json(self) -> Dict[str, Any]:
        from connguard import __version__

        return {"connguard_version": __version__, "worst": self.worst,
                "target": self.target.as_dict() if self.target else None,
                "host": {"process": self.process, "limits": _jsonable(self.limits),
                         "census": self.census,
                         "max_connect_rate": self.limits.get("max_connect_rate")},
                "server": self.server,
                "checks": [c.as_dict() for c in self.checks]}


def _jsonable(values: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def process_limits(pid: Optional[int] = None) -> Dict[str, Any]:
    """fd soft/hard limits and fds in use of ``pid`` (default: this process), None if hidden.

    A service's limits are its own (systemd's LimitNOFILE=, its start script's ulimit),
    not those of the shell running the doctor: hence ``--pid``.
    """
    if pid is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return {"pid": os.getpid(), "fd_soft": _finite(soft), "fd_hard": _finite(hard),
                "fd_in_use": _count_dir("/proc/self/fd", own=True)}
    soft_hard = _read_nofile(f"/proc/{pid}/limits")
    return {"pid": pid, "fd_soft": soft_hard[0], "fd_hard": soft_hard[1],
            "fd_in_use": _count_dir(f"/proc/{pid}/fd")}


def _finite(value: int) -> Optional[int]:
    return None if value == resource.RLIM_INFINITY else value


def _count_dir(path: str, own: bool = False) -> Optional[int]:
    try:
        return len(os.listdir(path)) - (1 if own else 0)  # our listing's own descriptor
    except OSError:
        return None


def _read_nofile(path: str) -> Tuple[Optional[int], Optional[int]]:
    """(soft, hard) from a /proc/PID/limits "Max open files" line."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return _parse_limit(soft), _parse_limit(hard)
    except (OSError, ValueError):
        pass
    return None, None


def _parse_limit(text: str) -> Optional[int]:
    return None if text == "unlimited" else int(text)


def host_checks(process: Mapping[str, Any], found: Mapping[str, Any],
                server: Optional[str] = None) -> List[Check]:
    """``server``: the host of the target over TCP, for checks that depend on where it is."""
    return [
        check_fd_soft_limit(process.get("fd_soft"), process.get("fd_hard")),
        check_fd_headroom(process.get("fd_in_use"), process.get("fd_soft")),
        check_port_range(found.get("port_range")),
        check_tw_reuse(found.get("tcp_tw_reuse"), server),
        check_file_table(found.get("file_nr")),
        check_somaxconn(found.get("somaxconn")),
    ]


def socket_checks(counts: Mapping[str, int], found: Mapping[str, Any], target: str
                  ) -> List[Check]:
    return [
        check_ports_toward(counts, found.get("port_range"), target),
        check_established(counts),
        check_time_wait(counts, found.get("port_range"), found.get("tcp_tw_reuse")),
        check_close_wait(counts),
    ]


def _census(target: Target) -> Optional[Dict[str, int]]:
    """Sockets toward the target by state; None for a unix socket or when it fails."""
    if target.unix_socket:
        return None
    try:
        return {k: int(v) for k, v in census(target.host, target.port).items()}
    except (OSError, ValueError) as exc:
        raise DoctorError(f"cannot count sockets toward {target.describe()}: {exc}") from exc


class DoctorError(Exception):
    """A part of the report could not be gathered (its message names which)."""


Connect = Callable[..., Any]


def read_server(target: Target, connect: Connect = pymysql.connect) -> Dict[str, Any]:
    """Variables and status of the server, over one short-lived connection."""
    conn = connect(**target.connect_kwargs())
    try:
        # A plain cursor and the server's bytes, whatever cursor class and converters the
        # connection ``connect`` makes would apply.
        names = ", ".join(f"'{n}'" for n in SERVER_VARIABLES)
        variables = _named(conn, f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({names}) "
                                 "OR Variable_name LIKE 'thread\\_pool\\_%'")
        names = ", ".join(f"'{n}'" for n in SERVER_STATUS)
        status = _named(conn, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names}) "
                              "OR Variable_name LIKE 'Connection\\_errors\\_%' "
                              "OR Variable_name LIKE 'Threadpool\\_%'")
    finally:
        conn.close()
    return {"reachable": True, "error": None, "version": variables.get("version"),
            "variables": variables, "status": status}


def _named(conn: Any, sql: str) -> Dict[str, str]:
    """A SHOW statement's (name, value) rows as text."""
    return {driver.text(name): driver.text(value) for name, value in driver.raw_rows(conn, sql)}


def _server(target: Target, connect: Connect) -> Tuple[Dict[str, Any], List[Check]]:
    try:
        server = read_server(target, connect)
    except (pymysql.err.Error, OSError) as exc:
        # A unix socket is the address: named in the message, not host:port.
        host, port = ((target.unix_socket, None) if target.unix_socket
                      else (target.host, target.port))
        translated = errors.translate(exc, host=host, port=port,
                                      password=target.password, during_connect=True)
        text = getattr(translated, "cause", "") or str(translated).split("\n", 1)[0]
        # The server answered, but refused this login (wrong password, blocked host,
        # too many connections): it is reachable; the login is what failed.
        answered = isinstance(translated, pymysql.err.OperationalError) and bool(
            translated.args) and isinstance(translated.args[0], int) and \
            1000 <= translated.args[0] < 2000
        code = translated.args[0] if answered else None
        remedies = getattr(translated, "remedies", None)
        if code in _LOGIN_REFUSED and not target.password:  # refused, with nothing sent
            # (the library's remedy speaks of password=; on this command line it is these)
            text += (" — no password was given: set MYSQL_PWD, use --password-prompt, or put "
                     "it in the DSN (mysql://user:password@host)")
        elif remedies:  # what to do, as the library's own error says it
            text += f" — {remedies[0]}"
        text = errors.redact(text, target.password)
        checks = ([Check("server", "reachable", True, GREEN, "the server answered"),
                   Check("server", "login", False, RED, text)] if answered else
                  [Check("server", "reachable", False, RED, text)])
        return {"reachable": answered, "error": text, "version": None, "variables": {},
                "status": {}}, checks
    checks = [Check("server", "reachable", True, GREEN, server["version"] or "")]
    return server, checks + server_checks(server["variables"], server["status"])


def diagnose(target: Optional[Target], pid: Optional[int] = None,
             connect: Connect = pymysql.connect) -> Report:
    """Gather the report: host always, sockets and server when a target is given."""
    found = limits()
    process = process_limits(pid)
    tcp_host = target.host if target is not None and not target.unix_socket else None
    checks = host_checks(process, found, tcp_host)
    counts: Optional[Dict[str, int]] = None
    server: Optional[Dict[str, Any]] = None
    if target is not None:
        try:
            counts = _census(target)
        except DoctorError as exc:
            checks.append(Check("sockets", "census", None, YELLOW, str(exc)))
        if counts is not None:
            checks += socket_checks(counts, found, target.address())
        server, server_lines = _server(target, connect)
        checks += server_lines
    return Report(target, process, found, counts, server, checks)

