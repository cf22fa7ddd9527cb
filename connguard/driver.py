"""The seam between connguard and PyMySQL: everything that knows PyMySQL's internals.

The pool never touches a driver attribute directly; it asks this module whether a transaction
is open, how to reset a session, which socket to check and how to drop a connection. A second
driver would be a second module of the same shape.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import ssl
import time
from typing import Any, Callable, Dict, FrozenSet, Hashable, List, Optional, Tuple

import pymysql
from pymysql.constants import CR, SERVER_STATUS
from pymysql.protocol import EOFPacketWrapper

from connguard.concurrency import ProcessLock
from connguard.proxy import PooledConnection as Handle  # noqa: F401 - what callers hold
from connguard.session import (
    CHARSET_CHANGED,
    DB_CHANGED,
    TAINTED,
    ConnectSettings,
    SessionMarks,
    may_change_session,
)

COM_RESET_CONNECTION = 0x1F

#: Every keyword ``pymysql.connect`` accepts, read from its signature so it tracks the version.
PYMYSQL_ARGUMENTS: FrozenSet[str] = frozenset(
    name
    for name, param in inspect.signature(pymysql.connections.Connection.__init__).parameters.items()
    if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
)

log = logging.getLogger("connguard.driver")

# -- what connguard.drivers asks of every seam --------------------------------------------------
ARGUMENTS = PYMYSQL_ARGUMENTS
CONNECT_NAME = "pymysql.connect"
#: What a driver call may raise that says the connection (or the statement) failed.
ERRORS = (pymysql.err.Error, OSError)


def normalize(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Connect arguments as given: PyMySQL's names are the pool's names."""
    return kwargs


def own_error(err: BaseException) -> BaseException:
    """connguard's own errors already are PyMySQL's (OperationalError, InterfaceError)."""
    return err

#: ssl parameters -> (context, the files' fingerprint, when it was last checked).
_ssl_contexts: Dict[Hashable, Tuple[ssl.SSLContext, Tuple[Any, ...], float]] = {}
_ssl_lock = ProcessLock()  # re-made after a fork and once threading is patched
#: ssl parameters that name files: a context is rebuilt when one of them changes.
TLS_FILE_KEYS = ("ca", "cert", "key", "capath")
#: Seconds between looks at those files (a stat each) for one cached context.
TLS_RECHECK = 5.0


def tls_fingerprint(sslp: Dict[str, Any]) -> Tuple[Any, ...]:
    """What identifies the contents of the files ``sslp`` names (mtime, size, inode), so a
    rotated certificate, key or CA gives a new context; a missing file counts too."""
    marks: List[Tuple[Any, ...]] = []
    for name in TLS_FILE_KEYS:
        path = sslp.get(name)
        if isinstance(path, (str, bytes, os.PathLike)):
            try:
                info = os.stat(path)
                marks.append((name, info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                marks.append((name, None))
    return tuple(marks)


def _ssl_cache_key(sslp: Dict[str, Any]) -> Optional[Hashable]:
    """A key for a PyMySQL ssl parameter dict, or None when it holds something unhashable."""
    try:
        key = tuple(sorted(sslp.items()))
        hash(key)
    except TypeError:
        return None
    return key


# GuardedConnection._cg_marks: what a borrower did that the reset on return must undo (the
# marks both drivers share are in connguard.session).
STATUS_UNKNOWN = 1  # a statement's reply carried no status flags (yet): a transaction may be open


_query = pymysql.connections.Connection.query


class _StatusResult(pymysql.connections.MySQLResult):
    """A result that keeps the status flags of the EOF packet ending its rows.

    PyMySQL reads those flags and drops them, so after a result set ``server_status`` still
    holds the flags of the last OK packet: a ``SELECT`` that opened a transaction (autocommit
    off) would look like it left none. With these flags the pool knows exactly, at no cost,
    whether a returned connection needs a rollback.
    """

    # PyMySQL's __del__ reads it: set here too for a result whose __init__ was interrupted
    # before setting it (a signal handler's exception), which is then finalized at once.
    unbuffered_active = False

    def _check_packet_is_eof(self, packet: Any) -> bool:
        # PyMySQL's check, plus the status flags it reads and drops. Not a wrapper around
        # super(): this runs once per row, and an extra call per row would tax every result.
        if not packet.is_eof_packet():
            return False
        eof = EOFPacketWrapper(packet)
        self.warning_count = eof.warning_count
        self.has_next = eof.has_next
        self.server_status = status = eof.server_status
        if self.unbuffered_active:  # it ends long after the query returned: tell the conn
            conn = self.connection
            conn.server_status = status
            conn._cg_marks &= ~STATUS_UNKNOWN
        return True


class GuardedConnection(SessionMarks, pymysql.connections.Connection):
    """A PyMySQL connection that knows what its borrower did to the session.

    Beyond PyMySQL's own behaviour it:

    * reuses one SSL context per TLS configuration. PyMySQL >= 1.2 builds a fresh default
      context for every connection even when the user gave no ssl option ("preferred" TLS);
      loading the system CA store makes that tens of ms per cold connect. The TLS mode the
      user gets is unchanged because PyMySQL still decides it from the same arguments;
    * bounds the whole handshake (greeting, TLS, authentication, the connect-time
      statements) by ``connect_timeout``, not only the TCP connect;
    * tunes TCP keepalive and ``TCP_USER_TIMEOUT`` so a peer that vanished without FIN or
      RST surfaces as an error instead of a hang;
    * tracks, for the pool's reset on return, whether the status flags of the last reply
      are known, whether a statement may have changed session state, and whether the
      database or character set was changed through the API.
    """

    _cg_keepalive: Optional[Tuple[float, float, int]] = None
    _cg_deadline: float = float("inf")
    _cg_marks = 0  # what the reset on return must look at (the flags below); 0: nothing
    _cg_cursorclass: Any = pymysql.cursors.Cursor  # as connected: given back on return
    # Set by the pool: turns a statement's error into the error the caller sees (translated;
    # a disconnect also marks the pooled connection broken). At the source, so every path
    # (cursor execute, executemany, callproc, query) is covered with no wrapper around it.
    _cg_on_error: Optional[Callable[[BaseException], BaseException]] = None
    _cg_settings: Optional[ConnectSettings] = None

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        if isinstance(sslp, ssl.SSLContext):
            return sslp
        key = _ssl_cache_key(sslp)
        if key is None:
            return super()._create_ssl_ctx(sslp)
        now = time.monotonic()
        with _ssl_lock:
            cached = _ssl_contexts.get(key)
        if cached is not None and now - cached[2] < TLS_RECHECK:
            return cached[0]
        mark = tls_fingerprint(sslp)  # a stat per file, at most every TLS_RECHECK seconds
        if cached is not None and mark == cached[1]:
            with _ssl_lock:
                _ssl_contexts[key] = (cached[0], mark, now)
            return cached[0]
        try:
            ctx = super()._create_ssl_ctx(sslp)  # new, or a file changed: rotated certificates
        except (OSError, ssl.SSLError) as exc:
            if cached is None:
                raise  # no context yet: PyMySQL's own answer (a missing file, a bad key)
            # Mid-rotation (key and certificate not both replaced yet, a file briefly
            # missing): keep the last good context and look again after TLS_RECHECK.
            with _ssl_lock:
                _ssl_contexts[key] = (cached[0], cached[1], now)
            log.warning("connguard: the TLS files changed but could not be loaded (%s); "
                        "keeping the previous context and trying again in %.0f s",
                        type(exc).__name__, TLS_RECHECK)
            return cached[0]
        with _ssl_lock:
            _ssl_contexts[key] = (ctx, mark, now)
        return ctx

    def connect(self, sock: Any = None) -> None:
        """Connect, the whole handshake bounded by ``connect_timeout`` (and the deadline).

        For a unix socket, the socket is opened here so a failed connect closes it: PyMySQL
        creates it before ``connect()`` and never closes it when that fails (a full
        backlog, a missing file), leaking a descriptor per attempt until the garbage
        collector finds it. Failures are raised exactly as PyMySQL raises them.
        """
        limit = self._handshake_limit()
        saved: Tuple[Any, Any, Any] = (self.connect_timeout, self._read_timeout,  # type: ignore[has-type]
                                       self._write_timeout)  # type: ignore[has-type]
        self.connect_timeout = self._read_timeout = self._write_timeout = limit
        try:
            if sock is None and self.unix_socket:
                sock = self._open_unix_socket(limit)
            super().connect(sock)
        finally:
            self.connect_timeout, self._read_timeout, self._write_timeout = saved
        self._sock.settimeout(self._read_timeout)
        self._current_timeout = self._read_timeout  # PyMySQL >= 1.1 caches the timeout set
        if self._cg_keepalive is not None and not self.unix_socket:
            set_keepalive(self._sock, *self._cg_keepalive)
        self._cg_settings = ConnectSettings.of(self)
        self._cg_cursorclass = self.cursorclass
        self._clear_session_marks()

    def _handshake_limit(self) -> float:
        remaining = self._cg_deadline - time.monotonic()
        limit = float(self.connect_timeout or 10)
        return min(limit, remaining) if remaining > 0 else limit

    def _open_unix_socket(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.unix_socket)
        except OSError as exc:
            sock.close()
            text = f"Can't connect to MySQL server on {self.host!r} ({exc})"
            error = pymysql.err.OperationalError(CR.CR_CONN_HOST_ERROR, text)
            error.original_exception = exc
            raise error from None
        self.host_info = "Localhost via UNIX socket"
        self._secure = True
        return sock

    def _clear_session_marks(self) -> None:
        self._cg_marks = 0

    # -- what a borrower does ----------------------------------------------------------
    def query(self, sql: Any, unbuffered: bool = False) -> Any:
        # Until the reply's status flags arrive, a transaction may be open (even a failed
        # statement can have started one): the reset on return then rolls back.
        marks = self._cg_marks | STATUS_UNKNOWN
        if not marks & TAINTED and may_change_session(sql):  # ~0.2 µs for a plain SELECT
            marks |= TAINTED
        self._cg_marks = marks
        try:
            rows = _query(self, sql, unbuffered)  # super().query, without building a super
        except (pymysql.err.Error, OSError) as exc:
            on_error = self._cg_on_error
            translated = exc if on_error is None else on_error(exc)
            if translated is exc:
                raise
            raise translated from exc
        except BaseException:
            # Ctrl-C, SystemExit, an async exception: the command may be half sent or its
            # reply half read. The next command would be spliced into it: close instead.
            self._force_close()
            raise
        if not unbuffered:
            self._cg_marks &= ~STATUS_UNKNOWN
        return rows

    def _read_query_result(self, unbuffered: bool = False) -> Any:
        self._result = None
        result = _StatusResult(self)
        if unbuffered:
            result.init_unbuffered_query()
        else:
            result.read()
        self._result = result
        if result.server_status is not None:
            self.server_status = result.server_status
        return result.affected_rows




def set_keepalive(sock: socket.socket, idle: float, interval: float, count: int) -> None:
    """Probe an idle connection after ``idle`` s, every ``interval`` s, ``count`` times, and
    give up on unacknowledged data after as long: a silent peer then fails the next read
    with ETIMEDOUT instead of hanging it for ~15 minutes (the kernel's retransmission
    limit). Options the platform lacks are skipped."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", max(1, int(idle))),
                        ("TCP_KEEPINTVL", max(1, int(interval))),
                        ("TCP_KEEPCNT", max(1, int(count))),
                        ("TCP_USER_TIMEOUT", int((idle + interval * count) * 1000))):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def open_connection(kwargs: Dict[str, Any], deadline: float = float("inf"),
                    keepalive: Optional[Tuple[float, float, int]] = None
                    ) -> pymysql.connections.Connection:
    """Open a PyMySQL connection (handshake included, bounded by ``connect_timeout`` and
    ``deadline``) with the cached SSL context and the given keepalive."""
    conn = GuardedConnection(**kwargs, defer_connect=True)
    conn._cg_deadline = deadline
    conn._cg_keepalive = keepalive
    conn.connect()
    return conn


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


def clean_return(conn: GuardedConnection, autocommit: bool) -> bool:
    """A return with nothing to undo (the common case, decided with no round trip): the
    socket open, nothing marked, no transaction open by the last reply's flags, autocommit
    as expected, nothing unread. Then the client-side traces of the last statement
    (``affected_rows()``, ``insert_id()``) are forgotten too, and True is returned."""
    status = conn.server_status or 0
    result = conn._result
    if (conn._sock is None or conn._cg_marks or status & _IN_TRANS
            or bool(status & _AUTOCOMMIT) != autocommit
            or (result is not None and (result.unbuffered_active or result.has_next))):
        return False
    conn._result = None  # forget_last_result, inlined: this runs on every return
    conn._affected_rows = 0
    conn.cursorclass = conn._cg_cursorclass
    return True


def forget_last_result(conn: GuardedConnection) -> None:
    """``affected_rows()``, ``insert_id()`` and ``cursorclass`` as a fresh connection has
    them."""
    conn._result = None
    conn._affected_rows = 0
    conn.cursorclass = conn._cg_cursorclass


def autocommit(conn: pymysql.connections.Connection) -> bool:
    return bool(conn.get_autocommit())


def reset_connection(conn: pymysql.connections.Connection) -> None:
    """COM_RESET_CONNECTION: drop session state (variables, temporary tables, locks)."""
    conn._execute_command(COM_RESET_CONNECTION, b"")
    conn._read_ok_packet()


def drain_results(conn: pymysql.connections.Connection) -> None:
    """Read and drop what the server sent that nobody read (an unbuffered cursor not
    exhausted, the further results of a CALL): the next command would read them instead."""
    result = conn._result
    if result is not None and result.unbuffered_active:
        result._finish_unbuffered_query()
    while conn._result is not None and conn._result.has_next:
        conn.next_result()


def restore_session(conn: GuardedConnection, autocommit_mode: bool, full: bool) -> str:
    """Undo what a borrower changed; returns what it did (for the pool's counters):
    ``"reset"`` (session reset, connect settings applied again), ``"rollback"``,
    ``"restored"`` (autocommit, database or charset put back), or ``"discard"`` when the
    session cannot be made as new (the caller closes the connection).
    """
    drain_results(conn)
    marks = conn._cg_marks
    if full or marks & TAINTED:
        if not _reset_and_reapply(conn, autocommit_mode):
            return "discard"
        forget_last_result(conn)
        return "reset"
    action = "restored"
    if in_transaction(conn) or (marks & STATUS_UNKNOWN and not autocommit(conn)):
        conn.rollback()
        action = "rollback"
    if autocommit(conn) != autocommit_mode:
        conn.autocommit(autocommit_mode)
    settings = conn._cg_settings
    if marks & DB_CHANGED:
        if settings is None or settings.database is None:
            return "discard"  # no statement goes back to "no database selected"
        conn.select_db(settings.database)
    if marks & CHARSET_CHANGED and settings is not None:
        conn.set_character_set(settings.charset, settings.collation)
    conn._clear_session_marks()
    forget_last_result(conn)
    return action


def _reset_and_reapply(conn: GuardedConnection, autocommit_mode: bool) -> bool:
    """COM_RESET_CONNECTION, then what PyMySQL's connect() does after authentication, in
    its order (charset, sql_mode, init_command, autocommit), then the database. False when
    the session cannot be made as new."""
    settings = conn._cg_settings
    if settings is None:
        return False
    reset_connection(conn)
    conn.set_character_set(settings.charset, settings.collation)
    if settings.sql_mode is not None:
        conn.query(f"SET sql_mode={conn.escape(settings.sql_mode)}")
    if settings.init_command is not None:
        with conn.cursor(pymysql.cursors.Cursor) as cur:  # buffered, whatever the default
            cur.execute(settings.init_command)
    if autocommit(conn) != autocommit_mode:
        conn.autocommit(autocommit_mode)
    # The reset keeps the current database: choose the connect-time one again, or make
    # sure the borrower's USE did not leave one where none was chosen.
    if settings.database is not None:
        conn.select_db(settings.database)
    elif _current_database(conn) is not None:
        return False
    conn._clear_session_marks()
    return True


def _current_database(conn: pymysql.connections.Connection) -> Optional[bytes]:
    rows = raw_rows(conn, "SELECT DATABASE()")
    return rows[0][0] if rows else None


# -- connguard's own queries on a user's connection -------------------------------------------
def raw_rows(conn: Any, sql: str) -> List[Tuple[Optional[bytes], ...]]:
    """``sql``'s rows as the bytes the server sent (NULL as None), on a plain buffered cursor.

    Never through the connection's own choices: its ``cursorclass`` (a ``DictCursor`` row is
    not a tuple, an ``SSCursor`` leaves rows unread), its ``conv`` and ``use_unicode`` (a
    number may come back as text, bytes or anything a converter makes). The decoders are
    put back before this returns; the connection is the caller's alone meanwhile.
    ``conn`` may be a PyMySQL connection or a pooled one (its cursor ends with the call).
    """
    saved = conn.decoders, conn.use_unicode
    conn.decoders, conn.use_unicode = {}, False  # no converter, no decoding: raw bytes
    try:
        with conn.cursor(pymysql.cursors.Cursor) as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.decoders, conn.use_unicode = saved


def number(value: Any) -> int:
    """An integer the server sent, as bytes or text (ValueError when it is not one)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii")
    return int(value)


def text(value: Any) -> str:
    """A name or value the server sent, as bytes or text."""
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


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
        (max_connections, max_user), = raw_rows(
            conn, "SELECT @@GLOBAL.max_connections, @@GLOBAL.max_user_connections")
        status = {text(name).lower(): number(value) for name, value in raw_rows(
            conn, "SHOW GLOBAL STATUS WHERE Variable_name IN "
                  "('Threads_connected', 'Max_used_connections')")}
        return {"max_connections": number(max_connections),
                "max_user_connections": number(max_user), **status}
    except (pymysql.err.Error, OSError, TypeError, ValueError):
        return {}
    finally:
        if conn._sock is not None:
            conn._sock.settimeout(previous)


#: The server's limits read once per pool (wait_timeout, max_connections, ...).
LIMITS_QUERY = ("SELECT @@SESSION.wait_timeout, @@GLOBAL.max_connections, "
                "@@GLOBAL.max_user_connections, @@GLOBAL.max_connect_errors")


def server_limits(conn: pymysql.connections.Connection) -> Dict[str, Any]:
    """wait_timeout, max_connections, max_user_connections, max_connect_errors: one query.
    Empty on failure (a server that hides variables must not break connecting).
    ``affected_rows()`` does not show the query."""
    last = conn._result, conn._affected_rows
    try:
        rows = raw_rows(conn, LIMITS_QUERY)
    except pymysql.err.Error:
        return {}
    finally:
        conn._result, conn._affected_rows = last
    return limits_from_row(rows[0] if rows else None)


def limits_from_row(row: Any) -> Dict[str, Any]:
    """LIMITS_QUERY's row by name, its values as bytes, text or numbers (a NULL, or a value
    that is not a number, left out: a limit not known is better than a failed connect)."""
    names = ("wait_timeout", "max_connections", "max_user_connections", "max_connect_errors")
    limits: Dict[str, Any] = {}
    for name, value in zip(names, row or ()):
        with contextlib.suppress(TypeError, ValueError):
            limits[name] = number(value)
    return limits



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
    """Close our end of the socket without a word to the server (nothing is listening)."""
    conn._closed = True
    conn._force_close()


#: Readers of connections inherited through fork: never finalized (see drop_inherited).
_inherited_readers: List[Any] = []


def drop_inherited(conn: pymysql.connections.Connection) -> None:
    """In a forked child: let go of a connection the parent still uses.

    Only the descriptor is closed (no COM_QUIT, and no FIN while the parent holds its
    copy). PyMySQL's buffered reader is not touched: a parent thread that was reading a
    reply at fork time held its lock, which stays locked forever in the child, so closing
    or even finalizing it would hang. It is parked here for the life of the process.
    """
    conn._closed = True
    reader, sock = conn._rfile, conn._sock
    conn._rfile = conn._sock = None
    if reader is not None:
        _inherited_readers.append(reader)
    if sock is not None:
        fd = sock.detach()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
