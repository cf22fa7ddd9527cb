"""The one table that maps errors: an error's identity (the MySQL code and, where it
matters, the errno of the ``OSError`` underneath) to a connguard exception class, whether
retrying can help, the cause and remedies to tell, and a docs page.

Data only: :mod:`connguard.errors` identifies an error, finds its :class:`Row` here and
builds the exception (``docs/errors`` has a page per row's class, ``connguard explain``
prints it). Cause and remedy texts
are :mod:`connguard.messages` templates: ``{name}`` is a fact of the diagnosis, ``[...]``
a part left out when a fact in it is unknown, ``[a|b]`` b when a fact in a is unknown.
"""

from __future__ import annotations

import errno as errno_codes
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

from pymysql.constants import CR, ER

from connguard.exceptions import (
    AccessDenied,
    CommandsOutOfSync,
    ConnectionLost,
    ConnGuardError,
    Deadlock,
    FdLimitReached,
    HandshakeLost,
    HostBlocked,
    LocalPortsExhausted,
    LockWaitTimeout,
    QueryInterrupted,
    ResourceTemporarilyUnavailable,
    ServerShuttingDown,
    ServerThreadLimit,
    ServerUnavailable,
    StatementTimeout,
    TooManyConnections,
    UnknownDatabase,
    UserConnectionLimit,
)

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
SHARED_CODES = {
    ER_CLIENT_INTERACTION_TIMEOUT: (re.compile(r"trigger", re.IGNORECASE), False),
    ER_USER_IS_BLOCKED: (re.compile(r"credential errors"), True),
    ER_ACCOUNT_HAS_BEEN_LOCKED: (re.compile(r"account is locked"), True),
}

# Codes PyMySQL (and libmysqlclient) use for a failed connect(); their wrapped errno decides
# which row applies.  ``None`` stands for a raw OSError, which has no MySQL code at all.
CONNECT_CODES: Tuple[Optional[int], ...] = (CR.CR_CONNECTION_ERROR, CR.CR_CONN_HOST_ERROR, None)

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
        """The name of the error page (one page per class; ``connguard explain NAME``)."""
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

_ACCESS_CAUSE = "[{server_message}|access denied][ on {target}]"
_ACCESS_NO_RETRY = ("do not retry: credentials and grants do not change by themselves, and "
                    "MariaDB blocks the account after max_password_errors failed logins")

TABLE: Tuple[Row, ...] = (
    Row(
        LocalPortsExhausted,
        CONNECT_CODES,
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
        CONNECT_CODES,
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
        CONNECT_CODES,
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
        CONNECT_CODES,
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
    Row(ServerUnavailable, CONNECT_CODES, errnos=(socket.EAI_NONAME,), **_UNKNOWN_HOST),
    Row(
        ServerUnavailable,
        CONNECT_CODES,
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
        CONNECT_CODES,
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
        "SUPER / CONNECTION ADMIN)| ({established_past_max} established from this host alone: "
        "max_connections {max_connections} + 1 kept for SUPER / CONNECTION ADMIN)"
        "| ({threads_connected} of {max_connections} connected)| ({max_connections})]",
        remedies=(
            "pool and cap connections so that all clients together stay below max_connections "
            "(connguard pool)",
            "[{admin_slot_used} connected is past max_connections: an application account with "
            "SUPER or CONNECTION ADMIN takes the connection kept for administrators, and then "
            "no one can log in to fix this; give application accounts only the privileges "
            "they need|{established_past_max} established is past max_connections: an "
            "account of this host has SUPER or CONNECTION ADMIN and took the connection kept "
            "for administrators; give application accounts only the privileges they need]",
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
    # Access denied: one row per code, so that each lists only its own remedies. The
    # server's text says what was refused ("Access denied for user 'app'@'10.0.0.7' ..."),
    # so it is the cause as it stands.
    Row(
        AccessDenied,
        (ER.ACCESS_DENIED_ERROR,),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "[{no_password}|check the user name and the password]",
            "check that an account matches this client's host part (SELECT user, host FROM "
            "mysql.user; the server names the host it saw)",
            _ACCESS_NO_RETRY,
        ),
    ),
    Row(
        AccessDenied,
        (ER.DBACCESS_DENIED_ERROR,),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "check the database name: to an account with no rights on it, the server answers "
            "so for a database that does not exist too (SHOW DATABASES as an administrator)",
            "grant the account the database (GRANT ... ON db.* TO 'user'@'host'), or connect "
            "to a database it may use (SHOW GRANTS FOR CURRENT_USER)",
            "do not retry: grants and databases do not change by themselves",
        ),
    ),
    Row(
        AccessDenied,
        (ER.HOST_NOT_PRIVILEGED,),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "create the account for this client host (CREATE USER 'user'@'host' ...), or "
            "connect from a host an account exists for (SELECT user, host FROM mysql.user)",
            _ACCESS_NO_RETRY,
        ),
    ),
    Row(
        AccessDenied,
        (ER_ACCESS_DENIED_NO_PASSWORD_ERROR,),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "the account logs in by its operating-system user (unix_socket / auth_socket): "
            "connect as that OS user over the unix socket, or give the account a password "
            "(ALTER USER ... IDENTIFIED BY ...)",
            _ACCESS_NO_RETRY,
        ),
    ),
    Row(
        AccessDenied,
        (ER_MUST_CHANGE_PASSWORD_LOGIN,),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "the password has expired: change it (ALTER USER ... IDENTIFIED BY ...) with a "
            "client that supports expired passwords, or as an administrator",
            _ACCESS_NO_RETRY,
        ),
    ),
    Row(
        AccessDenied,
        (ER_USER_IS_BLOCKED, ER_ACCOUNT_HAS_BEEN_LOCKED),
        transient=False,
        cause=_ACCESS_CAUSE,
        remedies=(
            "4150: the account is blocked after max_password_errors failed logins: fix the "
            "password, then FLUSH PRIVILEGES; 4151: the account is locked: ALTER USER ... "
            "ACCOUNT UNLOCK",
            _ACCESS_NO_RETRY,
        ),
    ),
    Row(
        UnknownDatabase,
        (ER.BAD_DB_ERROR,),
        transient=False,
        cause="[{server_message}|unknown database][ on {target}]",
        remedies=(
            "check the database name in the connection settings (database=, db=, the DSN's "
            "path): names are case-sensitive on Linux servers (lower_case_table_names=0)",
            "create it (CREATE DATABASE ...) or connect without a database and list them "
            "(SHOW DATABASES: it shows only those the account may use)",
            "do not retry: the database does not appear by itself",
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
