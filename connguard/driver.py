"""The seam between connguard and PyMySQL: everything that knows PyMySQL's internals.

The pool never touches a driver attribute directly; it asks this module whether a transaction
is open, how to reset a session, which socket to check and how to drop a connection. A second
driver would be a second module of the same shape.
"""

from __future__ import annotations

import inspect
import socket
import ssl
import threading
from typing import Any, Dict, FrozenSet, Hashable, Optional, Tuple

import pymysql
from pymysql.constants import CR, SERVER_STATUS

COM_RESET_CONNECTION = 0x1F

#: Every keyword ``pymysql.connect`` accepts, read from its signature so it tracks the version.
PYMYSQL_ARGUMENTS: FrozenSet[str] = frozenset(
    name
    for name, param in inspect.signature(pymysql.connections.Connection.__init__).parameters.items()
    if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
)

_ssl_contexts: Dict[Hashable, ssl.SSLContext] = {}
_ssl_lock = threading.Lock()


def _ssl_cache_key(sslp: Dict[str, Any]) -> Optional[Hashable]:
    """A key for a PyMySQL ssl parameter dict, or None when it holds something unhashable."""
    try:
        key = tuple(sorted(sslp.items()))
        hash(key)
    except TypeError:
        return None
    return key


class GuardedConnection(pymysql.connections.Connection):
    """A PyMySQL connection that reuses one SSL context per TLS configuration.

    PyMySQL >= 1.2 builds a fresh default context for every connection even when the user gave
    no ssl option ("preferred" TLS); loading the system CA store makes that tens of ms per cold
    connect. The context is a pure function of the parameters, so one per distinct parameter
    set is shared; the TLS mode the user gets (preferred, required, verify) is unchanged
    because PyMySQL still decides it from the same arguments.
    """

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        if isinstance(sslp, ssl.SSLContext):
            return sslp
        key = _ssl_cache_key(sslp)
        if key is None:
            return super()._create_ssl_ctx(sslp)
        with _ssl_lock:
            ctx = _ssl_contexts.get(key)
        if ctx is None:
            ctx = super()._create_ssl_ctx(sslp)
            with _ssl_lock:
                ctx = _ssl_contexts.setdefault(key, ctx)
        return ctx


    def connect(self, sock: Any = None) -> None:
        """Connect; for a unix socket, open it here so a failed connect closes it.

        PyMySQL creates the unix socket before ``connect()`` and never closes it when that
        fails (a full backlog, a missing file): each failed attempt would leak a descriptor
        until the garbage collector finds it. The failure is raised exactly as PyMySQL
        raises it (2003 with ``original_exception``).
        """
        if sock is None and self.unix_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(self.unix_socket)
            except OSError as exc:
                sock.close()
                text = f"Can't connect to MySQL server on {self.host!r} ({exc})"
                error = pymysql.err.OperationalError(CR.CR_CONN_HOST_ERROR, text)
                error.original_exception = exc
                raise error from None
            self.host_info = "Localhost via UNIX socket"
            self._secure = True
        super().connect(sock)


def open_connection(kwargs: Dict[str, Any]) -> pymysql.connections.Connection:
    """Open a PyMySQL connection (handshake included) with the cached SSL context."""
    return GuardedConnection(**kwargs)


def destination(kwargs: Dict[str, Any]) -> Tuple[str, int]:
    """(host, port) a connection with these arguments goes to; the socket path for unix."""
    if kwargs.get("unix_socket"):
        return str(kwargs["unix_socket"]), 0
    return str(kwargs.get("host") or "localhost"), int(kwargs.get("port") or 3306)


def raw_socket(conn: pymysql.connections.Connection) -> Any:
    """The connection's socket, or None once PyMySQL has dropped it."""
    return conn._sock


def is_open(conn: pymysql.connections.Connection) -> bool:
    return conn._sock is not None and not conn._closed


def in_transaction(conn: pymysql.connections.Connection) -> bool:
    """Whether the server said a transaction is open, from the status flags of the last reply."""
    return bool((conn.server_status or 0) & SERVER_STATUS.SERVER_STATUS_IN_TRANS)


_IN_TRANS = SERVER_STATUS.SERVER_STATUS_IN_TRANS
_AUTOCOMMIT = SERVER_STATUS.SERVER_STATUS_AUTOCOMMIT


def session_clean(conn: pymysql.connections.Connection, autocommit: bool) -> bool:
    """No open transaction and autocommit as expected: nothing to reset (the common case,
    answered from the status flags of the last reply, with no round trip)."""
    status = conn.server_status or 0
    return not status & _IN_TRANS and bool(status & _AUTOCOMMIT) == autocommit


def autocommit(conn: pymysql.connections.Connection) -> bool:
    return bool(conn.get_autocommit())


def reset_connection(conn: pymysql.connections.Connection) -> None:
    """COM_RESET_CONNECTION: drop session state (variables, temporary tables, locks)."""
    conn._execute_command(COM_RESET_CONNECTION, b"")
    conn._read_ok_packet()


def server_capacity(conn: pymysql.connections.Connection, timeout: float) -> Dict[str, Any]:
    """The server's max_connections, Threads_connected and Max_used_connections, asked on
    ``conn`` with the socket timeout lowered to ``timeout`` for the duration: a diagnosis
    must stay cheap. Empty on any failure (the caller then discards ``conn``)."""
    sock = conn._sock
    if sock is None:
        return {}
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        with conn.cursor() as cur:
            cur.execute("SELECT @@GLOBAL.max_connections, @@GLOBAL.max_user_connections")
            max_connections, max_user = cur.fetchone()
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN "
                        "('Threads_connected', 'Max_used_connections')")
            status = {name.lower(): int(value) for name, value in cur.fetchall()}
        return {"max_connections": int(max_connections),
                "max_user_connections": int(max_user), **status}
    except (pymysql.err.Error, OSError, TypeError, ValueError):
        return {}
    finally:
        if conn._sock is not None:
            conn._sock.settimeout(previous)


def server_limits(conn: pymysql.connections.Connection) -> Dict[str, Any]:
    """wait_timeout, max_connections, max_user_connections, max_connect_errors: one query.
    Empty on failure (a server that hides variables must not break connecting)."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@SESSION.wait_timeout, @@GLOBAL.max_connections, "
                        "@@GLOBAL.max_user_connections, @@GLOBAL.max_connect_errors")
            row = cur.fetchone()
    except pymysql.err.Error:
        return {}
    names = ("wait_timeout", "max_connections", "max_user_connections", "max_connect_errors")
    return {name: int(value) for name, value in zip(names, row or ()) if value is not None}


def thread_id(conn: pymysql.connections.Connection) -> Optional[int]:
    return conn.server_thread_id[0] if conn.server_thread_id else None


def close_gracefully(conn: pymysql.connections.Connection) -> None:
    """COM_QUIT then close; never raises (the socket may already be dead)."""
    try:
        if not conn._closed:
            conn.close()
    except Exception:  # noqa: BLE001 - closing must not fail the caller
        drop(conn)


def drop(conn: pymysql.connections.Connection) -> None:
    """Close our end of the socket without a word to the server.

    Used for dead connections (nothing to say) and after fork (the parent's session must
    survive: closing a duplicated fd sends no FIN while the parent still holds it).
    """
    conn._closed = True
    conn._force_close()
