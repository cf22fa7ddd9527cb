"""Turn PyMySQL and socket errors into exceptions that say why they happened and what to do.

Connection errors (refused, ports or descriptors exhausted, server full, lost) and the
statement errors a retry can cure (interrupted, timed out, lock wait timeout, deadlock).

One table, :data:`TABLE`, maps an error's identity to a connguard exception class, whether
retrying can help, the remedies and a docs page.  The identity is the MySQL code
(``exc.args[0]``) and, where it matters, the errno of the ``OSError`` underneath: PyMySQL
reports every failed ``connect()`` as ``OperationalError(2003, ...)`` whether the cause is a
refused port, exhausted local ports (errno 99) or the open-file limit (errno 24).  Raw
``OSError``s are identified by errno alone.

:func:`translate` builds the exception.  The result subclasses both :class:`ConnGuardError`
and the PyMySQL class of the original, keeps the original ``args`` (``e.args[0]`` is still
the MySQL code), chains the original as ``__cause__`` and carries a ``diagnosis`` of the
local resources involved, so existing ``except pymysql.err.OperationalError`` clauses keep
working while the message now names the numbers.  :func:`classify`, :func:`is_transient`
and :func:`is_disconnect` answer the questions the pool and reconnect logic ask.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from pymysql.constants import CR, ER

from connguard import messages
from connguard.census import census as sockets_toward
from connguard.census import unix_listen_queue
from connguard.exceptions import (  # noqa: F401 - the classes and helpers, re-exported
    OTHER_DRIVERS,
    AccessDenied,
    CircuitOpen,
    CommandsOutOfSync,
    ConnectionLost,
    ConnGuardError,
    CoordinatorUnavailable,
    Deadlock,
    FdLimitReached,
    GateTimeout,
    HandshakeLost,
    HostBlocked,
    LeaseUnavailable,
    LocalPortsExhausted,
    LockWaitTimeout,
    PoolClosed,
    PoolTimeout,
    QueryInterrupted,
    ResourceTemporarilyUnavailable,
    ServerShuttingDown,
    ServerThreadLimit,
    ServerUnavailable,
    StatementTimeout,
    TooManyConnections,
    UserConnectionLimit,
    _restore,
    as_driver_error,
    combined_class,
    describe,
    detached,
    is_driver_error,
    note_deadline_cut,
    original_text,
    outage_error,
    summary,
)
from connguard.limits import limits as local_limits
from connguard.messages import docs_base, docs_link  # noqa: F401 - re-exported
from connguard.redaction import (  # noqa: F401 - redact and friends, re-exported
    MIN_VERBATIM,
    Password,
    redact,
    redact_args,
    redact_exception,
)

__all__ = [
    "TABLE",
    "AccessDenied",
    "CircuitOpen",
    "CommandsOutOfSync",
    "ConnGuardError",
    "ConnectionLost",
    "Deadlock",
    "FdLimitReached",
    "GateTimeout",
    "HandshakeLost",
    "HostBlocked",
    "LocalPortsExhausted",
    "LockWaitTimeout",
    "PoolTimeout",
    "ResourceTemporarilyUnavailable",
    "PoolClosed",
    "QueryInterrupted",
    "Row",
    "ServerShuttingDown",
    "ServerThreadLimit",
    "ServerUnavailable",
    "StatementTimeout",
    "TooManyConnections",
    "UserConnectionLimit",
    "classify",
    "is_disconnect",
    "is_transient",
    "preflight_error",
    "redact",
    "redact_exception",
    "translate",
]

# Server codes PyMySQL has no constant for.
ER_ACCESS_DENIED_NO_PASSWORD_ERROR = 1698  # auth_socket / unix_socket account, no password
ER_MUST_CHANGE_PASSWORD_LOGIN = 1862  # password expired
ER_CONNECTION_KILLED = 1927  # MariaDB: "Connection was killed"
ER_CLIENT_INTERACTION_TIMEOUT = 4031  # MySQL >= 8.0.24: disconnected after wait_timeout
ER_USER_IS_BLOCKED = 4150  # MariaDB: max_password_errors reached
ER_ACCOUNT_HAS_BEEN_LOCKED = 4151  # MariaDB: ACCOUNT LOCK
ER_STATEMENT_TIMEOUT = 1969  # MariaDB: max_statement_time exceeded
ER_QUERY_TIMEOUT = 3024  # MySQL: max_execution_time exceeded (unused by MariaDB)

# MySQL and MariaDB give some numbers to different errors.  For each: a pattern of the
# server's text, and whether a match means the error we mean (True) or the other vendor's
# (False).  Server text may be translated (lc_messages), so a miss should fail safe:
# MariaDB's 4031 is a trigger error, MySQL's the inactivity disconnect we must not miss.
_SHARED_CODES = {
    ER_CLIENT_INTERACTION_TIMEOUT: (re.compile(r"trigger", re.IGNORECASE), False),
    ER_USER_IS_BLOCKED: (re.compile(r"credential errors"), True),
    ER_ACCOUNT_HAS_BEEN_LOCKED: (re.compile(r"account is locked"), True),
}

# Codes PyMySQL (and libmysqlclient) use for a failed connect(); their wrapped errno decides
# which row applies.  ``None`` stands for a raw OSError, which has no MySQL code at all.
_CONNECT_CODES: Tuple[Optional[int], ...] = (CR.CR_CONNECTION_ERROR, CR.CR_CONN_HOST_ERROR, None)

# Connection-level codes after which the connection must be thrown away; the same list
# SQLAlchemy's MySQL dialect uses, so both agree on what a disconnect is.
DISCONNECT_CODES = frozenset(
    {
        CR.CR_SERVER_GONE_ERROR,
        CR.CR_SERVER_LOST,
        CR.CR_COMMANDS_OUT_OF_SYNC,
        CR.CR_SHARED_MEMORY_CONNECT_ABANDONED_ERROR,
        CR.CR_SERVER_LOST_EXTENDED,
        ER_CLIENT_INTERACTION_TIMEOUT,
        ER_CONNECTION_KILLED,
    }
)


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What identifies an error: MySQL code (None for a raw OSError), errno, flags."""

    code: Optional[int]
    errno: Optional[int]
    timed_out: bool = False
    during_connect: bool = False


@dataclass(frozen=True)
class Row:
    """One entry of :data:`TABLE`: which errors it matches and what to tell the user.

    A row matches when the MySQL code is in ``codes`` (``None`` = a raw ``OSError``) and,
    when given, the errno is in ``errnos``, the timed-out flag equals ``timed_out`` and the
    during-connect flag equals ``during_connect``.  The first matching row wins, so specific
    rows come before general ones.  ``cause`` and ``remedies`` are templates: ``{name}`` is a
    diagnosis fact; ``[a|b]`` renders the first alternative whose facts are all known, or
    nothing.  ``census`` asks for a count of sockets toward the server at translate time;
    ``local`` for this host's descriptor and port limits (off for statement errors, which
    are not about this host and may come often: a deadlock costs no ``/proc`` reads).
    """

    cls: Type[ConnGuardError]
    codes: Tuple[Optional[int], ...]
    cause: str
    remedies: Tuple[str, ...]
    transient: bool = True
    errnos: Tuple[int, ...] = ()
    timed_out: Optional[bool] = None
    during_connect: Optional[bool] = None
    census: bool = False
    local: bool = True

    @property
    def docs(self) -> str:
        """The docs page, relative to ``docs/`` (one page per class)."""
        return self.cls.docs

    def matches(self, ident: Identity) -> bool:
        """Whether this row describes an error with identity ``ident``."""
        return (
            ident.code in self.codes
            and (not self.errnos or ident.errno in self.errnos)
            and (self.timed_out is None or self.timed_out == ident.timed_out)
            and (self.during_connect is None or self.during_connect == ident.during_connect)
        )


_RETRY_WITH_BACKOFF = "retry with backoff (connguard does), not in a tight reconnect loop"
_POOL_INSTEAD = "reuse connections instead of opening one per query (connguard pool)"
_SERVER_UNREACHABLE_CAUSE = "cannot reach the MySQL server[ at {target}][ ({reason})]"
_SERVER_UNREACHABLE_REMEDIES = (
    "check that the server is running and listening[ on {target}] (`ss -ltn` on the server)",
    "check routes and firewalls between this host and the server",
    _RETRY_WITH_BACKOFF,
)
_CONNECTION_LOST_REMEDIES = (
    "discard the connection and reconnect; retry only statements that are safe to repeat",
    "check connections before reuse (the connguard pool does) and keep idle time below the "
    "server's wait_timeout[ ({wait_timeout} s)]",
    "[{stuck_close_wait} sockets toward {target} are in CLOSE_WAIT: the server closed them "
    "(KILL, wait_timeout) and this host has not; close them|sockets the server closed (KILL, "
    "wait_timeout) stay in CLOSE_WAIT until the client closes them]",
    "check the server's error log for a crash or restart",
)
_UNKNOWN_HOST: Dict[str, Any] = dict(
    transient=False,
    cause="cannot resolve the MySQL server's host name[ {host}]",
    remedies=(
        "check the host name in the connection settings",
        "check DNS and /etc/hosts on this machine (`getent hosts NAME`)",
    ),
)

TABLE: Tuple[Row, ...] = (
    Row(
        LocalPortsExhausted,
        _CONNECT_CODES,
        errnos=(errno_codes.EADDRNOTAVAIL,),
        census=True,
        cause="local ephemeral ports exhausted[ toward {target}][: {ports_in_use} of "
        "{ports_total} in use|: range {port_range_text}, {ports_total} ports]"
        "[ ({socket_states})]",
        remedies=(
            "[{mostly_established} of them are open connections (ESTABLISHED), not TIME_WAIT: "
            "close idle and leaked connections and cap pool sizes across all processes]",
            _POOL_INSTEAD,
            "[stay below about {max_rate} new connections/s per server address: each closed "
            "connection holds its port in TIME_WAIT for 60 s|each closed connection holds its "
            "port in TIME_WAIT for 60 s: connect less often]",
            "widen net.ipv4.ip_local_port_range[ (now {port_range_text})]",
            "set net.ipv4.tcp_tw_reuse=1[ (now {tcp_tw_reuse})]; tcp_tw_recycle is gone and was "
            "unsafe behind NAT",
            "spread connections over more client IPs or server addresses",
        ),
    ),
    Row(
        FdLimitReached,
        _CONNECT_CODES,
        errnos=(errno_codes.EMFILE,),
        census=True,
        cause="this process's open-file limit is reached[: {fd_in_use} of {fd_soft} descriptors "
        "open (soft limit; hard {fd_hard})|: all {fd_soft} descriptors the soft limit allows "
        "are open (hard limit {fd_hard})]",
        remedies=(
            "close connections no longer used and discard dead ones (connguard pool)[; "
            "{stuck_close_wait} sockets toward {target} are in CLOSE_WAIT]",
            "raise the soft limit[ toward the hard limit {fd_hard}]: LimitNOFILE= in systemd, "
            "`ulimit -n` in the start script, or resource.setrlimit()",
            "check the process's real limit in /proc/PID/limits: a shell's `ulimit -n` may show "
            "a different value",
        ),
    ),
    Row(
        FdLimitReached,
        _CONNECT_CODES,
        errnos=(errno_codes.ENFILE,),
        cause="the system-wide open-file table is full (ENFILE)",
        remedies=(
            "close connections no longer used (connguard pool)",
            "find the process holding most descriptors (`ls /proc/*/fd | wc -l` per process)",
            "raise fs.file-max[ (now {file_max})]",
        ),
    ),
    Row(
        ResourceTemporarilyUnavailable,
        _CONNECT_CODES,
        errnos=(errno_codes.EAGAIN,),
        cause="the server's listen queue is full[ at {target}] (errno 11 EAGAIN)"
        "[: {listen_queue} waiting, backlog {listen_backlog}]: it is not accepting "
        "connections as fast as they arrive",
        remedies=(
            _POOL_INSTEAD,
            _RETRY_WITH_BACKOFF,
            "check whether the server is stalled or overloaded (`ss -xl` shows the queue); "
            "raise its back_log[ (now {listen_backlog})] and net.core.somaxconn"
            "[ (now {somaxconn})]",
        ),
    ),
    # The driver says so (2005), or a connect error carries the resolver's EAI_NONAME.
    Row(ServerUnavailable, (CR.CR_UNKNOWN_HOST,), **_UNKNOWN_HOST),
    Row(ServerUnavailable, _CONNECT_CODES, errnos=(socket.EAI_NONAME,), **_UNKNOWN_HOST),
    Row(
        ServerUnavailable,
        _CONNECT_CODES,
        errnos=(
            errno_codes.ECONNREFUSED,
            errno_codes.EHOSTUNREACH,
            errno_codes.ENETUNREACH,
            errno_codes.ETIMEDOUT,
        ),
        cause=_SERVER_UNREACHABLE_CAUSE,
        remedies=_SERVER_UNREACHABLE_REMEDIES,
    ),
    Row(
        ServerUnavailable,
        _CONNECT_CODES,
        timed_out=True,
        cause="no answer from the MySQL server[ at {target}] within the connect timeout"
        "[ ({connect_timeout} s)]",
        remedies=(
            "check that the server host is up and reachable: a firewall that drops packets "
            "looks like this",
            "a stalled or overloaded server answers late: check its load and listen backlog",
            _RETRY_WITH_BACKOFF,
        ),
    ),
    Row(
        ServerUnavailable,
        (CR.CR_CONNECTION_ERROR, CR.CR_CONN_HOST_ERROR),
        cause=_SERVER_UNREACHABLE_CAUSE,
        remedies=_SERVER_UNREACHABLE_REMEDIES,
    ),
    Row(
        TooManyConnections,
        (ER.CON_COUNT_ERROR,),
        census=True,
        cause="too many connections[ to {target}]: server at max_connections"
        "[ ({admin_slot_used} connected, max_connections {max_connections} + 1 kept for "
        "SUPER / CONNECTION ADMIN)| ({threads_connected} of {max_connections} connected)"
        "| ({max_connections})]",
        remedies=(
            "pool and cap connections so that all clients together stay below max_connections "
            "(connguard pool)",
            "[{admin_slot_used} connected is past max_connections: an application account with "
            "SUPER or CONNECTION ADMIN takes the connection kept for administrators, and then "
            "no one can log in to fix this; give application accounts only the privileges "
            "they need]",
            "close idle and leaked connections[ ({established} established from this host to "
            "{target})]; look for long Sleep rows in SHOW PROCESSLIST",
            "raise max_connections if the server has memory for more threads",
            "back off before reconnecting: every refused attempt still costs the server work",
        ),
    ),
    Row(
        ServerThreadLimit,
        (ER.CANT_CREATE_THREAD,),
        census=True,
        cause="the server[ at {target}] cannot create a thread for a new connection "
        "(ER_CANT_CREATE_THREAD[, server errno {server_errno_text}])"
        "[: {threads_below_max} connected, below max_connections {max_connections}, so an OS "
        "limit of the server stopped it|: {threads_connected} connected, max_connections "
        "{max_connections}|: {threads_connected} connected]",
        remedies=(
            "stop opening connections without closing them; pool them (connguard pool)[ ("
            "{established} established from this host to {target})]",
            "raise the process/thread limit of the user mysqld runs as (`ulimit -u`, "
            "LimitNPROC=): every thread of that user counts",
            "check free memory and vm.max_map_count on the server host",
            _RETRY_WITH_BACKOFF,
        ),
    ),
    Row(
        HostBlocked,
        (ER.HOST_IS_BLOCKED,),
        transient=False,
        cause="the server[ at {target}] blocked this client host[ {blocked_host}] after too "
        "many interrupted connection attempts (max_connect_errors[ = {max_connect_errors}])",
        remedies=(
            "on the server run FLUSH HOSTS (`mariadb-admin flush-hosts`, `mysqladmin "
            "flush-hosts`; MySQL 8: TRUNCATE TABLE performance_schema.host_cache)",
            "find what interrupts handshakes from this host: probes that connect and close, "
            "connect timeouts, resets",
            "raise max_connect_errors",
            "do not retry: the block stays until it is flushed",
        ),
    ),
    Row(
        UserConnectionLimit,
        (ER.TOO_MANY_USER_CONNECTIONS, ER.USER_LIMIT_REACHED),
        cause="the account's connection limit is reached[ at {target}]"
        "[ (max_user_connections = {user_limit})][: {server_message}]",
        remedies=(
            "cap the pool so that all processes using this account stay below its limit "
            "(connguard pool)",
            "close idle and leaked connections of this account",
            "raise max_user_connections, or the account's MAX_USER_CONNECTIONS / "
            "MAX_CONNECTIONS_PER_HOUR (ALTER USER ... WITH ...)",
        ),
    ),
    Row(
        AccessDenied,
        (
            ER.DBACCESS_DENIED_ERROR,
            ER.ACCESS_DENIED_ERROR,
            ER.HOST_NOT_PRIVILEGED,
            ER_ACCESS_DENIED_NO_PASSWORD_ERROR,
            ER_MUST_CHANGE_PASSWORD_LOGIN,
            ER_USER_IS_BLOCKED,
            ER_ACCOUNT_HAS_BEEN_LOCKED,
        ),
        transient=False,
        cause="access denied[: {server_message}]",
        remedies=(
            "check the user name, the password and the account's host part "
            "(SELECT user, host FROM mysql.user; SHOW GRANTS FOR ...)",
            "1044: grant the account the database; 1130: create the account for this client "
            "host; 1862: change the expired password; 4150/4151: unblock or unlock the account",
            "do not retry: credentials and grants do not change by themselves, and MariaDB "
            "blocks the account after max_password_errors failed logins (4150)",
        ),
    ),
    Row(
        ServerShuttingDown,
        (ER.SERVER_SHUTDOWN,),
        cause="the server is shutting down[ ({target})]",
        remedies=(
            "reconnect with backoff once it is back or failed over (connguard discards these "
            "connections)",
            "drain traffic away from a server before a planned restart",
        ),
    ),
    Row(
        HandshakeLost,
        (CR.CR_SERVER_GONE_ERROR, CR.CR_SERVER_LOST),
        during_connect=True,
        cause="connection lost during login (handshake)[ to {target}][ ({reason})]",
        remedies=(
            "check whether logins are slow on the server: busy thread-pool workers "
            "(thread_handling, thread_pool_size, thread_pool_oversubscribe) or an overloaded "
            "server keep new logins waiting",
            "the server drops logins that take longer than connect_timeout"
            "[ ({connect_timeout} s)] (default 10 s)",
            "open fewer connections (connguard pool) and back off before reconnecting",
        ),
    ),
    Row(
        ConnectionLost,
        (CR.CR_SERVER_LOST,),
        timed_out=True,
        cause="no reply[ from {target}] within read_timeout[ ({read_timeout} s)]: PyMySQL "
        "closed the connection",
        remedies=(
            "raise read_timeout or make the statement faster",
            "retry only statements that are safe to repeat: the server may still be running it",
        ),
    ),
    Row(
        CommandsOutOfSync,
        (CR.CR_COMMANDS_OUT_OF_SYNC,),
        transient=False,
        cause="connection out of sync: a previous result was not fully read, or two threads "
        "use the connection at once",
        remedies=(
            "discard this connection (the connguard pool does)",
            "fetch or close every cursor before the next query; never share a connection "
            "between threads",
        ),
    ),
    Row(
        ConnectionLost,
        (CR.CR_SERVER_GONE_ERROR,),
        census=True,
        cause="connection[ to {target}][ (server thread {thread_id})] lost: sending to the "
        "server failed[ ({reason})], it had already closed the connection",
        remedies=_CONNECTION_LOST_REMEDIES,
    ),
    Row(
        ConnectionLost,
        (CR.CR_SERVER_LOST,),
        census=True,
        cause="connection[ to {target}][ (server thread {thread_id})] lost while waiting for "
        "the server's reply[ ({reason})]",
        remedies=_CONNECTION_LOST_REMEDIES,
    ),
    Row(
        ConnectionLost,
        (CR.CR_SHARED_MEMORY_CONNECT_ABANDONED_ERROR, CR.CR_SERVER_LOST_EXTENDED),
        census=True,
        cause="connection[ to {target}][ (server thread {thread_id})] lost[ ({reason})]",
        remedies=_CONNECTION_LOST_REMEDIES,
    ),
    Row(
        ConnectionLost,
        (ER_CLIENT_INTERACTION_TIMEOUT, ER_CONNECTION_KILLED),
        census=True,
        cause="the server closed the connection[ to {target}][: {server_message}]",
        remedies=_CONNECTION_LOST_REMEDIES,
    ),
    # Statement errors: the server refused or stopped one statement, the connection is fine
    # (none of these codes is in DISCONNECT_CODES).
    Row(
        StatementTimeout,
        (ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT),
        local=False,
        cause="the statement ran longer than the server allows[ on {target}][ (server thread "
        "{thread_id})] and was stopped (MariaDB max_statement_time, MySQL "
        "max_execution_time); the connection is still usable",
        remedies=(
            "make the statement faster (EXPLAIN it: an index, a smaller batch) or raise the "
            "limit for this session: SET SESSION max_statement_time = seconds (MariaDB), "
            "max_execution_time = milliseconds (MySQL)",
            "retry only after a change or when the server is less loaded: the same statement "
            "under the same load runs out of time again",
        ),
    ),
    Row(
        QueryInterrupted,
        (ER.QUERY_INTERRUPTED,),
        local=False,
        cause="the statement was interrupted[ on {target}][ (server thread {thread_id})]: "
        "KILL QUERY or a server shutdown stopped it; the connection is still usable",
        remedies=(
            "retry it if it is safe to repeat: its changes were undone, an open transaction's "
            "earlier statements were not (retry the statement, or roll back and retry the "
            "transaction)",
            "find who kills queries: an operator, a watchdog such as pt-kill, or a client "
            "timeout that sends KILL QUERY",
            "if the server is shutting down, reconnect with backoff once it is back",
        ),
    ),
    Row(
        QueryInterrupted,
        (ER.FILSORT_ABORT,),
        local=False,
        cause="the server aborted a sort[ on {target}][ (server thread {thread_id})]"
        "[: {server_message}]; the connection is still usable",
        remedies=(
            "retry the statement: a KILL QUERY during a sort ends it this way too",
            "check free space in the server's tmpdir, sort_buffer_size and the server's "
            "error log",
            "an index that serves the ORDER BY or GROUP BY avoids the sort",
        ),
    ),
    Row(
        LockWaitTimeout,
        (ER.LOCK_WAIT_TIMEOUT,),
        local=False,
        cause="lock wait timeout[ on {target}][ (server thread {thread_id})]: the statement "
        "waited innodb_lock_wait_timeout for a row lock another transaction holds and was "
        "rolled back (the transaction stays open unless innodb_rollback_on_timeout is on); "
        "the connection is still usable",
        remedies=(
            "retry: roll the transaction back and run it again (or repeat just the statement)",
            "find the transaction holding the lock (information_schema.innodb_trx, SHOW ENGINE "
            "INNODB STATUS): long or forgotten open transactions; keep transactions short",
            "raise innodb_lock_wait_timeout for the session only if waiting longer is fine",
        ),
    ),
    Row(
        Deadlock,
        (ER.LOCK_DEADLOCK,),
        local=False,
        cause="deadlock[ on {target}][ (server thread {thread_id})]: InnoDB rolled this "
        "transaction back so that another one could finish; the connection is still usable",
        remedies=(
            "retry the whole transaction from its start: the server already rolled it back, "
            "and deadlocks are expected under concurrency",
            "make them rarer: lock rows in the same order in every transaction, keep "
            "transactions short, index the columns in WHERE so that fewer rows are locked",
            "SHOW ENGINE INNODB STATUS shows the latest deadlock; innodb_print_all_deadlocks "
            "logs every one",
        ),
    ),
    Row(
        ConnectionLost,
        (0,),  # PyMySQL raises InterfaceError(0, "") when a closed connection is used
        cause="the connection was already closed (an earlier error or close() ended it)",
        remedies=(
            "discard it and open a new one (the connguard pool does)",
            "look for the earlier error that closed it",
        ),
    ),
    Row(
        ConnectionLost,
        (None,),
        errnos=(errno_codes.ECONNRESET, errno_codes.EPIPE, errno_codes.ECONNABORTED),
        census=True,
        cause="connection[ to {target}] lost[ ({reason})]",
        remedies=_CONNECTION_LOST_REMEDIES,
    ),
)

# --- identity -----------------------------------------------------------------------------

_ERRNO_IN_TEXT = re.compile(r"\[Errno (-?\d+)\]|\((-?\d+)\)\s*$")
_TIMED_OUT_TEXT = re.compile(r"\(timed out\)\s*$")
# libmysqlclient's wording for a connection lost during login; PyMySQL has no such text,
# so its callers say so with translate(..., during_connect=True).
_HANDSHAKE_TEXT = re.compile(r"reading (initial communication|authorization) packet|handshake")
_HOST_IN_TEXT = re.compile(r"MySQL server on '([^']*)'")


def _mysql_code(exc: BaseException) -> Optional[int]:
    """``args[0]`` of a driver's error when it is an int we can trust; None otherwise."""
    if not is_driver_error(exc):
        return None
    args = getattr(exc, "args", ())
    code = args[0] if isinstance(args, tuple) and args else None
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    if code in _SHARED_CODES:
        pattern, match_means_ours = _SHARED_CODES[code]
        if bool(pattern.search(_server_message(exc))) != match_means_ours:
            return None  # the other vendor's error with the same number
    return code


def _server_message(exc: BaseException) -> str:
    """The text part of an error: ``args[1]`` for PyMySQL, ``strerror`` for OSError."""
    if isinstance(exc, OSError):
        return exc.strerror if isinstance(exc.strerror, str) else ""
    args = getattr(exc, "args", ())
    if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], str):
        return args[1]
    return ""


def _wrapped_oserror(exc: BaseException) -> Optional[OSError]:
    """The OSError under a PyMySQL error: ``original_exception``, ``__cause__``, ``__context__``."""
    for candidate in (
        getattr(exc, "original_exception", None),
        exc.__cause__,
        exc.__context__,
    ):
        if isinstance(candidate, OSError):
            return candidate
    return None


def _is_timeout(exc: OSError) -> bool:
    """A Python-level socket timeout (no errno), as opposed to the kernel's ETIMEDOUT."""
    return exc.errno is None and isinstance(exc, (socket.timeout, TimeoutError))


def _errno_from_text(text: str) -> Optional[int]:
    """Last resort: "(99)" or "[Errno 99]" in the message."""
    match = _ERRNO_IN_TEXT.search(text)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def _identify(exc: BaseException, during_connect: bool) -> Optional[Identity]:
    """The identity of ``exc``, or None if it is neither a coded PyMySQL error nor an OSError."""
    if isinstance(exc, OSError):
        errno = exc.errno if isinstance(exc.errno, int) else None
        return Identity(None, errno, _is_timeout(exc), during_connect)
    code = _mysql_code(exc)
    if code is None:
        return None
    text = _server_message(exc)
    wrapped = _wrapped_oserror(exc)
    if wrapped is not None:
        errno = wrapped.errno if isinstance(wrapped.errno, int) else None
        timed_out = _is_timeout(wrapped)
    else:
        # The message only says which errno for connect failures; elsewhere a number in
        # parentheses may be anything.
        errno = _errno_from_text(text) if code in _CONNECT_CODES else None
        if errno == errno_codes.EINPROGRESS:
            # MariaDB's libmysqlclient (mysqlclient's): its non-blocking connect reports the
            # errno of starting it, whatever ended it (refused, unreachable): unknown.
            errno = None
        timed_out = bool(_TIMED_OUT_TEXT.search(text))
    connecting = during_connect or bool(_HANDSHAKE_TEXT.search(text))
    return Identity(code, errno, timed_out, connecting)


def _match(ident: Identity) -> Optional[Row]:
    return next((row for row in TABLE if row.matches(ident)), None)


def classify(exc: BaseException, *, during_connect: bool = False) -> Optional[Row]:
    """The :data:`TABLE` row describing ``exc``, or None if the table does not know it.

    A translated error is classified by its original.  Never raises.
    """
    try:
        if isinstance(exc, ConnGuardError):
            return None if exc.original is None else classify(exc.original)
        ident = _identify(exc, during_connect)
        return None if ident is None else _match(ident)
    except Exception:
        return None


def is_transient(exc: BaseException) -> Optional[bool]:
    """Whether a later retry (with backoff) can succeed; None if we do not know the error."""
    if isinstance(exc, ConnGuardError):
        return exc.transient
    row = classify(exc)
    return None if row is None else row.transient


def is_disconnect(exc: BaseException) -> bool:
    """Whether the connection that raised ``exc`` is unusable and must be discarded.

    True for the connection-level codes in :data:`DISCONNECT_CODES`, for PyMySQL's errors
    about an already closed connection, and for any raw ``OSError`` (a socket error on the
    connection).  A translated error answers for its original.  Never raises.
    """
    try:
        if isinstance(exc, ConnGuardError):
            return exc.original is not None and is_disconnect(exc.original)
        if isinstance(exc, OSError):
            return True
        if not is_driver_error(exc):
            return False
        if _mysql_code(exc) in DISCONNECT_CODES:
            return True
        # PyMySQL's wording for using a connection that is already closed.
        return exc.args in ((0, ""), ("Already closed",))
    except Exception:
        return False


# --- diagnosis ----------------------------------------------------------------------------

_LIMIT_KEYS = ("fd_in_use", "fd_soft", "fd_hard", "port_range", "tcp_tw_reuse")


def _limits() -> Dict[str, Any]:
    """Local limits for a diagnosis (:func:`connguard.limits.limits`); a source that fails
    reads None, and a translation never fails for want of one."""
    try:
        found = local_limits()
    except Exception:  # noqa: BLE001 - a sandbox without /proc or resource: no numbers
        found = {}
    return {**{key: None for key in _LIMIT_KEYS}, **found}


def _resolves_locally(host: str) -> bool:
    """IP literals and localhost: names we can count sockets for without DNS.

    Errors are often translated while DNS or the network is what is failing, and a
    translation must not hang, so other names get no census.
    """
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _census(host: Optional[str], port: Optional[int]) -> Optional[Dict[str, int]]:
    """Sockets toward host:port by state, from connguard.census; None if unavailable."""
    if not host or port is None or not _resolves_locally(host):
        return None
    try:
        return {str(state): int(count) for state, count in sockets_toward(host, port).items()}
    except Exception:  # noqa: BLE001 - no netlink nor /proc: the message goes without it
        return None


# getaddrinfo errors carry negative numbers that errno.errorcode does not name.
_EAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def _errno_name(ident: Identity) -> Optional[str]:
    if ident.errno is None:
        return "timeout" if ident.timed_out else None
    if ident.errno < 0:
        return _EAI_NAMES.get(ident.errno)
    return errno_codes.errorcode.get(ident.errno)


def _endpoint(host: Optional[str], port: Optional[int], text: str) -> Tuple[Any, Any]:
    """host and port as given, else as named in "Can't connect to MySQL server on 'h[:p]'"."""
    if host is not None:
        return host, port
    match = _HOST_IN_TEXT.search(text)
    if match is None:
        return None, port
    found = match.group(1)
    name, sep, maybe_port = found.rpartition(":")
    if sep and name.count(":") == 0 and maybe_port.isdigit():  # not an IPv6 address
        return name, port if port is not None else int(maybe_port)
    return found, port


def _diagnose(
    ident: Identity, row: Row, host: Optional[str], port: Optional[int], deep: bool
) -> Dict[str, Any]:
    """Facts about the error and this host's resources; never raises, no DNS, no server I/O."""
    diagnosis: Dict[str, Any] = {
        "mysql_code": ident.code,
        "errno": ident.errno,
        "errno_name": _errno_name(ident),
        "host": host,
        "port": port,
    }
    if deep and row.local:
        diagnosis.update(_limits())
        diagnosis["census"] = _census(host, port) if row.census else None
        if ident.errno == errno_codes.EAGAIN and host and host.startswith("/"):
            queue = unix_listen_queue(host)
            if queue is not None:
                diagnosis["listen_queue"], diagnosis["listen_backlog"] = queue
    return diagnosis


# Facts only the server's own text carries.
# 1135: MySQL "(errno 11)", MariaDB '(errno 11 "Resource temporarily unavailable")'.
_SERVER_ERRNO_TEXT = re.compile(r"\(errno:? (\d+)")
_BLOCKED_HOST_TEXT = re.compile(r"Host '([^']*)' is blocked")


def _message_facts(code: Optional[int], text: str) -> Dict[str, Any]:
    """The server's errno behind a 1135, the client host a 1129 names."""
    facts: Dict[str, Any] = {}
    if code == ER.CANT_CREATE_THREAD:
        match = _SERVER_ERRNO_TEXT.search(text)
        if match:
            facts["server_errno"] = int(match.group(1))
            facts["server_errno_name"] = errno_codes.errorcode.get(int(match.group(1)))
    elif code == ER.HOST_IS_BLOCKED:
        match = _BLOCKED_HOST_TEXT.search(text)
        if match:
            facts["blocked_host"] = match.group(1)
    return facts


# --- messages (the templates are filled by connguard.messages) -------------------------


# --- translate ----------------------------------------------------------------------------

def _instantiate(
    static: Type[ConnGuardError], exc: BaseException, args: Tuple[Any, ...]
) -> ConnGuardError:
    """An instance of ``static`` combined with ``type(exc)``, carrying ``args``."""
    try:
        new = combined_class(static, type(exc))(*args)
    except Exception:
        # The original's class cannot be combined or built from its args (odd signature or
        # layout): the table's class still subclasses PyMySQL's OperationalError.
        new = static(*args)
    for attr in ("sqlstate", "original_exception"):
        if hasattr(exc, attr):
            setattr(new, attr, getattr(exc, attr))
    return new


def _translate(
    exc: BaseException,
    host: Optional[str],
    port: Optional[int],
    diagnose: bool,
    extra: Optional[Mapping[str, Any]],
    password: Password,
    during_connect: bool,
) -> BaseException:
    if isinstance(exc, ConnGuardError) or not isinstance(exc, BaseException):
        return exc
    if password:
        # Before anything reads a message, and for errors the table does not know too: the
        # caller raises ours "from exc", or exc itself, and a traceback prints the chain.
        redact_exception(exc, password)
    ident = _identify(exc, during_connect)
    row = None if ident is None else _match(ident)
    if ident is None or row is None:
        return exc
    server_message = redact(_server_message(exc), password)
    host, port = _endpoint(host, port, server_message)
    diagnosis = _diagnose(ident, row, host, port, diagnose)
    diagnosis.update(_message_facts(ident.code, server_message))
    diagnosis.update(extra or {})
    if password:  # e.g. a unix socket path that holds it; diagnoses get logged
        diagnosis = {k: redact(v, password) if isinstance(v, str) else v
                     for k, v in diagnosis.items()}
    new = _instantiate(row.cls, exc, redact_args(tuple(exc.args), password))
    new.transient = row.transient
    cause = messages.render(row.cause, messages.facts(diagnosis, server_message))
    describe(new, cause, row.remedies, diagnosis, exc, password, server_message)
    new.__cause__ = exc  # also sets __suppress_context__
    return new


def translate(
    exc: BaseException,
    *,
    host: Optional[str] = None,
    port: Optional[int] = None,
    diagnose: bool = True,
    extra: Optional[Mapping[str, Any]] = None,
    password: Password = None,
    during_connect: bool = False,
) -> BaseException:
    """Return ``exc`` as the connguard exception the table names for it.

    Returns ``exc`` itself when it already is a :class:`ConnGuardError` or the table does
    not know it, and never raises: on any internal failure the original is the answer.
    The result is meant to be raised (``raise translate(e) from e``).

    ``host``/``port`` name the server (default: the host in PyMySQL's message, no port);
    they appear in the message and select the socket census.  ``diagnose=False`` skips
    reading local limits and counting sockets (cheap identity only).  ``extra`` adds facts
    to the diagnosis and the message, e.g. ``{"max_connections": 151,
    "threads_connected": 150}``; also used: ``connect_timeout``, ``read_timeout``,
    ``wait_timeout``, ``max_connect_errors``.  ``password`` is masked wherever it would
    appear: in the result, and in place in ``exc`` and the exceptions chained to it (an
    ``OSError``'s ``filename`` and ``strerror`` included, see :func:`redact_exception`),
    also when the table does not know ``exc``.  ``during_connect=True`` says the error
    happened while connecting, which turns a lost connection (2013, 2006) into
    :class:`HandshakeLost`.

    Time is bounded: the census (sockets toward the server) is taken only for rows that
    use it and only for IP literals or ``localhost``, so no DNS lookup happens here.
    """
    try:
        return _translate(exc, host, port, diagnose, extra, password, during_connect)
    except Exception:
        # Translating is a courtesy: the original error is always a correct answer.
        return exc



# --- the resource guard's refusals (connguard.guard) -----------------------------------------

PREFLIGHT_PORT_CAUSE = (
    "refused before connect()[ to {target}]: {ports_free} of {ports_total} local ports free "
    "toward it[ (range {port_range_text}; {states_text})], and one more connection would "
    "leave fewer than the reserve of {port_reserve}"
)
PREFLIGHT_FD_CAUSE = (
    "refused before connect()[ to {target}]: {fds_left} file descriptors left under the soft "
    "limit of {fd_soft}[ (hard {fd_hard}; {fd_in_use} open)], and one more connection would "
    "leave fewer than the reserve of {fd_reserve}"
)


def _port_remedies(diagnosis: Mapping[str, Any]) -> Tuple[str, ...]:
    """What to do about exhausted ports, most useful first, for the sockets actually seen."""
    census_counts = diagnosis.get("census") or {}
    remedies: List[str] = [
        "hold fewer connections to {target}: lower max_size, use one pool per process and "
        "server, close pools no longer needed[ ({established} established now)]",
    ]
    if census_counts.get("time_wait"):
        remedies.append(
            "{time_wait} ports sit in TIME_WAIT (60 s after each close): reuse connections "
            "instead of reconnecting[, below about {max_connect_rate} new connections/s]; "
            "net.ipv4.tcp_tw_reuse=1[ (now {tcp_tw_reuse})] lets connect() reuse them early")
    if census_counts.get("close_wait"):
        remedies.append("{close_wait} sockets are in CLOSE_WAIT: the server closed them and "
                        "this host has not; find the code that keeps them open")
    remedies += [
        "widen net.ipv4.ip_local_port_range[ (now {port_range_text})]",
        "spread connections over more client IPs or server addresses",
        "the guard keeps {port_reserve} ports for the rest of this host: lower port_reserve "
        "only if nothing else here connects to that server, or set resource_guard=False",
    ]
    return tuple(remedies)


def _fd_remedies(diagnosis: Mapping[str, Any]) -> Tuple[str, ...]:
    """What to do about the descriptor limit, most useful first."""
    remedies: List[str] = [
        "close connections and files no longer used; lower max_size",
    ]
    if diagnosis.get("fd_hard") != diagnosis.get("fd_soft"):
        remedies.append(
            "raise the soft limit toward the hard limit[ {fd_hard}]: "
            "connguard.limits.raise_fd_soft_limit() in the process, LimitNOFILE= in systemd, "
            "`ulimit -n` in the start script")
    else:
        remedies.append("raise the hard limit (LimitNOFILE= in systemd, limits.conf), then "
                        "the soft one")
    remedies.append("the guard keeps {fd_reserve} descriptors for files, logs and other "
                    "pools: lower fd_reserve only if the process opens little else, or set "
                    "resource_guard=False")
    return tuple(remedies)


def preflight_refusal(fds: bool, diagnosis: Dict[str, Any]) -> ConnGuardError:
    """The resource guard's refusal (``fds``: the descriptor limit, else the local ports
    toward the server) as FdLimitReached or LocalPortsExhausted, worded from ``diagnosis``."""
    if fds:
        return preflight_error(FdLimitReached, PREFLIGHT_FD_CAUSE, _fd_remedies(diagnosis),
                               diagnosis)
    return preflight_error(LocalPortsExhausted, PREFLIGHT_PORT_CAUSE,
                           _port_remedies(diagnosis), diagnosis)


def preflight_error(
    cls: Type[ConnGuardError],
    cause: str,
    remedies: Tuple[str, ...],
    diagnosis: Dict[str, Any],
) -> ConnGuardError:
    """``cls`` for a connection refused *before* connect() (the OS resource guard).

    Nothing failed yet, so there is no original; ``cause`` and ``remedies`` are templates
    like the table's, filled from ``diagnosis`` (which becomes ``err.diagnosis``).
    ``args`` is ``(2003, first line)``, the code PyMySQL uses for a failed connect, so
    handlers that look at ``args[0]`` treat it like the kernel's refusal.
    """
    facts = messages.facts(diagnosis)
    text = messages.render(cause, facts)
    err = cls(CR.CR_CONN_HOST_ERROR, text)
    describe(err, text, remedies, diagnosis, None)
    return err
