"""The seam between the pool and mysqlclient (``MySQLdb``): ``connguard.driver``'s shape.

Imported only for a pool made with ``driver="mysqldb"`` (``connguard.install("MySQLdb")``
makes those for unchanged ``MySQLdb.connect`` calls). What differs from PyMySQL, and why:

* **No status flags reach Python** except autocommit's (``get_autocommit()``), so whether a
  transaction may be open is tracked from what the borrower sent: with autocommit off
  (mysqlclient's default, as PEP 249 asks) any statement may have opened one; with it on,
  only ``BEGIN``/``START TRANSACTION`` (``begin()`` sends ``BEGIN``). The return then rolls
  back: one round trip, only after a checkout that sent a statement.
* **The session reset is ``change_user()``** (the C API's ``mysql_change_user``: rolls
  back, drops temporary tables and locks, resets variables; it authenticates again), then
  what ``MySQLdb.connect`` did after connecting: character set and collation, sql_mode,
  init_command, autocommit.
* **Unread results** cannot be seen either: the return asks the library for the next result
  (``next_result()``, no I/O when there is none) and discards what comes; a result still
  being streamed (an unexhausted ``SSCursor``) answers "commands out of sync", and the
  connection is discarded rather than handed on.
* **libmysqlclient owns the descriptor**: it is polled only while it still is the socket the
  connection connected on (``connguard.dbapis``' identity check).
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import MySQLdb
import MySQLdb.connections
import MySQLdb.cursors
from MySQLdb import _mysql

from connguard import dbapis, driver
from connguard.proxy import PooledConnection, _Returned, lease_of, pooled_cursor_class
from connguard.session import (
    CHARSET_CHANGED,
    DB_CHANGED,
    TAINTED,
    SessionMarks,
    may_change_session,
)
from connguard.statements import SCAN_LIMIT, starts_with

# -- what connguard.drivers asks of every seam --------------------------------------------------
#: ``MySQLdb.connect``'s keyword arguments (mysqlclient 2.x; it takes ``**kwargs``, so they
#: cannot be read from a signature), ``passwd`` and ``db`` spelt ``password`` and ``database``.
ARGUMENTS = frozenset({
    "host", "user", "password", "database", "port", "unix_socket", "conv", "connect_timeout",
    "compress", "named_pipe", "init_command", "read_default_file", "read_default_group",
    "cursorclass", "use_unicode", "charset", "collation", "auth_plugin", "sql_mode",
    "client_flag", "multi_statements", "ssl", "ssl_mode", "server_public_key_path",
    "local_infile", "local_infile_dir", "autocommit", "binary_prefix", "read_timeout",
    "write_timeout", "executemany_fallback",
})
CONNECT_NAME = "MySQLdb.connect"
ERRORS = (MySQLdb.Error, OSError)
#: Other spellings mysqlclient accepts (named in messages as allowed too).
ALIASES = {"passwd": "password", "db": "database"}


def normalize(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """mysqlclient's aliases spelt one way, as it does itself (``passwd`` is ``password``)."""
    if not any(alias in kwargs for alias in ALIASES):
        return kwargs
    out = {ALIASES.get(name, name): value for name, value in kwargs.items()}
    for alias, name in ALIASES.items():
        if alias in kwargs and name in kwargs:
            raise TypeError(f"{CONNECT_NAME}() got both {alias!r} and {name!r}; pass one")
    return out


#: What the SQLAlchemy plugin knows of mysqlclient (connguard.dbapis), shared with the pool.
FACTS = dbapis.mysqldb_facts(MySQLdb)
#: connguard's own error (a checkout timeout, a closed pool, the storm gate's refusal) as
#: mysqlclient's ``OperationalError`` or ``InterfaceError`` too: callers catch those.
own_error = FACTS.own_error


# -- the connection ------------------------------------------------------------------------
# _cg_marks: the marks both drivers share (TAINTED: also another account) are in
# connguard.session; these are mysqlclient's own.
SENT = 1  # a statement was sent: results may be unread; without autocommit a transaction open
BEGUN = 16  # BEGIN / START TRANSACTION: a transaction even with autocommit on
UNRESETTABLE = 32  # set_server_option(): no reset undoes it, the connection is replaced

# BEGIN / START TRANSACTION as the statement's first keyword, after whatever comments and
# whitespace lead it (``/* app */ BEGIN`` opens a transaction too): connguard.statements finds
# that keyword in linear time, and the pattern is tried there only.
_BEGIN = r"BEGIN\b"
_BEGIN_TEXT = re.compile(_BEGIN, re.IGNORECASE)
_BEGIN_BYTES = re.compile(_BEGIN.encode(), re.IGNORECASE)
_START_TEXT = (("START", "TRANSACTION"),)  # comments may sit between the two words
_START_BYTES = ((b"START", b"TRANSACTION"),)


def _opens_transaction(sql: Any) -> bool:
    if isinstance(sql, str):
        return starts_with(sql, _BEGIN_TEXT, _START_TEXT)
    if isinstance(sql, memoryview):
        if sql.nbytes > SCAN_LIMIT:  # not copied to be read: the conservative answer
            return True
        sql = sql.tobytes()
    return starts_with(sql, _BEGIN_BYTES, _START_BYTES)


class GuardedConnection(SessionMarks, MySQLdb.connections.Connection):
    """A mysqlclient connection that knows what its borrower did to the session, translates
    its statements' errors at the source (every cursor's ``execute`` passes through
    ``query``), and shows its socket to the pool's liveness check."""

    _cg_marks = 0
    _cg_on_error: Optional[Callable[[BaseException], BaseException]] = None
    _cg_kwargs: Dict[str, Any] = {}  # as connected: what a session reset applies again
    _cg_cursorclass: Any = MySQLdb.cursors.Cursor
    _cg_handshake_charset = ""

    @property
    def _sock(self) -> Any:
        """What the pool polls: the connection itself (``fileno()``) while its descriptor is
        the socket it connected on; None once closed or the number names another file."""
        return dbapis.mysqldb_pollable(self)

    def _mark_statement(self, query: Any) -> None:
        marks = self._cg_marks | SENT
        if not marks & TAINTED and may_change_session(query):
            marks |= TAINTED
        if not marks & BEGUN and _opens_transaction(query):
            marks |= BEGUN
        self._cg_marks = marks

    def query(self, query: Any) -> None:
        self._send(super().query, query)

    def send_query(self, query: Any) -> None:
        """mysqlclient's two-step statement (``send_query`` then ``read_query_result``):
        tracked and translated like ``query``."""
        self._send(super().send_query, query)

    def _send(self, send: Callable[[Any], None], query: Any) -> None:
        self._mark_statement(query)
        try:
            send(query)
        except MySQLdb.Error as exc:
            on_error = self._cg_on_error
            translated = exc if on_error is None else on_error(exc)
            if translated is exc:
                raise
            raise translated from exc

    def change_user(self, *args: Any, **kwargs: Any) -> None:
        self._cg_marks |= TAINTED  # another account: the return logs in as ours again
        super().change_user(*args, **kwargs)

    def set_server_option(self, option: int) -> None:
        self._cg_marks |= UNRESETTABLE  # multi-statements on or off: the connection goes
        super().set_server_option(option)


def open_connection(kwargs: Dict[str, Any], deadline: float = float("inf"),
                    keepalive: Optional[Tuple[float, float, int]] = None) -> GuardedConnection:
    """Open a mysqlclient connection, the connect bounded by ``connect_timeout`` (whole
    seconds, as the library takes it) and by ``deadline``; keepalive tuned on its socket."""
    given = kwargs.get("connect_timeout")
    remaining = deadline - time.monotonic()
    if remaining < float(given or 10):
        given = max(1, math.ceil(remaining)) if remaining > 0 else given
    conn = GuardedConnection(**{**kwargs, **({"connect_timeout": int(given)} if given else {})})
    try:
        dbapis.mysqldb_connected(conn)
        if keepalive is not None and not kwargs.get("unix_socket"):
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    driver.set_keepalive(sock, *keepalive)
        conn._cg_kwargs = kwargs
        conn._cg_cursorclass = conn.cursorclass
        conn._cg_handshake_charset = conn.character_set_name()
        conn._cg_marks = 0  # what connecting itself sent (SET NAMES, autocommit)
    except BaseException:
        drop(conn)
        raise
    return conn


destination = driver.destination


def is_open(conn: GuardedConnection) -> bool:
    return bool(conn.open)


def autocommit(conn: GuardedConnection) -> bool:
    return bool(conn.get_autocommit())


def clean_return(conn: GuardedConnection, autocommit_mode: bool) -> bool:
    """A return with nothing to undo, decided with no round trip: no statement sent, no
    database or charset changed, autocommit as connected. ``cursorclass`` put back."""
    if conn._cg_marks or not conn.open or bool(conn.get_autocommit()) != autocommit_mode:
        return False
    conn.cursorclass = conn._cg_cursorclass
    return True


def _drain(conn: GuardedConnection) -> None:
    """Discard results nobody read (the rest of a multi-statement or CALL). A result still
    being streamed raises "commands out of sync": the caller discards the connection."""
    while conn.next_result() == 0:
        conn.discard_result()


def restore_session(conn: GuardedConnection, autocommit_mode: bool, full: bool) -> str:
    """Undo what a borrower changed (see the module doc); returns what it did, as
    ``connguard.driver.restore_session`` does."""
    marks = conn._cg_marks
    if marks & UNRESETTABLE:
        return "discard"
    _drain(conn)
    if full or marks & TAINTED:
        return "reset" if _reset_and_reapply(conn, autocommit_mode) else "discard"
    action = "restored"
    if marks & BEGUN or (marks & SENT and not conn.get_autocommit()):
        conn.rollback()
        action = "rollback"
    if bool(conn.get_autocommit()) != autocommit_mode:
        _mysql.connection.autocommit(conn, autocommit_mode)
    if marks & DB_CHANGED:
        database = conn._cg_kwargs.get("database")
        if not database:
            return "discard"  # no statement goes back to "no database selected"
        conn.select_db(database)
    if marks & CHARSET_CHANGED:
        _apply_charset(conn)
    conn._cg_marks = 0
    conn.cursorclass = conn._cg_cursorclass
    return action


def _apply_charset(conn: GuardedConnection) -> None:
    """The character set (and collation) ``MySQLdb.connect`` chose; the server's default
    when none was given, as it does (the character set the handshake agreed on)."""
    kwargs = conn._cg_kwargs
    charset = kwargs.get("charset") or conn._cg_handshake_charset
    conn.set_character_set(charset, kwargs.get("collation") or None)


def _reset_and_reapply(conn: GuardedConnection, autocommit_mode: bool) -> bool:
    """``change_user`` to the same account and database, then what ``MySQLdb.connect`` does
    after connecting, in its order: character set, sql_mode, init_command, autocommit."""
    kwargs = conn._cg_kwargs
    if not _credentials_known(kwargs):
        return False
    database = kwargs.get("database")
    if database:
        conn.change_user(kwargs["user"], kwargs.get("password") or "", database)
    else:  # then no database is selected, as after a connect that named none
        conn.change_user(kwargs["user"], kwargs.get("password") or "")
    _apply_charset(conn)
    if kwargs.get("sql_mode"):
        conn.set_sql_mode(kwargs["sql_mode"])
    if kwargs.get("init_command"):
        conn.query(kwargs["init_command"])
        _drain_current(conn)
    _mysql.connection.autocommit(conn, autocommit_mode)
    conn._cg_marks = 0
    conn.cursorclass = conn._cg_cursorclass
    return True


def _credentials_known(kwargs: Dict[str, Any]) -> bool:
    """Whether the account the connection logged in as is known here: a user named in the
    connect arguments, and no option file that could have named another (or the password).
    Otherwise ``change_user`` could log in as someone else (an anonymous account, say):
    the connection is discarded instead."""
    return bool(kwargs.get("user")) and not (kwargs.get("read_default_file")
                                             or kwargs.get("read_default_group"))


def _drain_current(conn: GuardedConnection) -> None:
    conn.store_result()
    _drain(conn)


def server_capacity(conn: GuardedConnection, timeout: float) -> Dict[str, Any]:
    """Nothing: libmysqlclient's socket timeout cannot be lowered for one query, and a
    diagnosis must not wait on a server that stopped answering. The limits read at the
    first connect (server_limits) still go into messages."""
    return {}


def server_limits(conn: GuardedConnection) -> Dict[str, Any]:
    """``connguard.driver.server_limits`` for mysqlclient, on a connection just opened."""
    try:
        rows = dbapis.mysqldb_raw_rows(conn, driver.LIMITS_QUERY)
        # affected_rows() must read 0, as on a fresh connection, not our query's row:
        # an OK reply that resets it (autocommit as it is: the connect already set it).
        _mysql.connection.autocommit(conn, bool(conn.get_autocommit()))
    except MySQLdb.Error:
        return {}
    finally:
        conn._cg_marks = 0
    return driver.limits_from_row(rows[0] if rows else None)


thread_id = FACTS.thread_id


def close_gracefully(conn: GuardedConnection) -> None:
    """COM_QUIT and close (the library's close); never raises."""
    try:
        if conn.open:
            conn.close()
    except Exception:  # noqa: BLE001 - closing must not fail the caller
        pass


# libmysqlclient cannot close without COM_QUIT: to a dead peer it goes nowhere.
drop = close_gracefully
drop_inherited = FACTS.drop_inherited


# -- what callers hold -------------------------------------------------------------------------
def _gone() -> Exception:
    """What mysqlclient raises for any use of a closed connection (and a second close)."""
    return MySQLdb.OperationalError(2006, "")


_CURSOR_ERRORS = {"_cg_returned_error": staticmethod(_gone),
                  "_cg_closed_error": staticmethod(
                      lambda: MySQLdb.ProgrammingError("cursor closed"))}


class _Gone(_Returned):
    """The stand-in after close: ``closed`` and ``open`` answer as on a closed mysqlclient
    connection; its methods are still there (``hasattr`` holds) and fail when called, as
    mysqlclient's do; any other use raises its error."""

    closed = 1  # ints, as mysqlclient answers

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__") and callable(
                getattr(MySQLdb.connections.Connection, name, None)):
            def gone(*args: Any, **kwargs: Any) -> Any:
                raise _gone()
            return gone
        return super().__getattr__(name)


_GONE = _Gone(_gone)


class Handle(PooledConnection):
    """A pooled mysqlclient connection; ``close()`` gives it back to its pool. After
    ``close()`` every use fails as on a closed mysqlclient connection."""

    _self_returned = _GONE
    _self_errors = ERRORS
    _self_closed_error = staticmethod(_gone)
    _self_warns_on_reconnect = False  # mysqlclient warns itself (below)

    def close(self) -> None:
        if self._self_entry is None:
            raise _gone()
        try:
            PooledConnection.close(self)
        finally:  # interrupted in the reset, too: uses after close fail as mysqlclient's
            self.__wrapped__ = _GONE

    @property
    def open(self) -> int:  # type: ignore[override]
        """1 or 0, as mysqlclient answers."""
        return 1 if PooledConnection.open.fget(self) else 0  # type: ignore[attr-defined]

    def ping(self, *reconnect: Any) -> None:
        """mysqlclient's ``ping()``. ``ping(True)`` (mysqlclient's deprecated reconnect) warns
        as it does, and replaces a dead connection through the pool, never behind its back."""
        if reconnect:
            warnings.warn("The reconnect parameter of ping() is deprecated.",
                          DeprecationWarning, 2)
        super().ping(bool(reconnect[0]) if reconnect else False)

    def _self_ping(self) -> None:
        self.__wrapped__.ping()  # with an argument, mysqlclient >= 2.2.1 warns

    def __repr__(self) -> str:
        entry = self._self_entry
        if entry is None:
            return "<connguard.mysqldb.Handle (returned)>"
        return f"<connguard.mysqldb.Handle thread_id={thread_id(entry.conn)}>"

    def cursor(self, cursorclass: Any = None) -> Any:
        """mysqlclient's ``cursor(cursorclass=None)``; the cursor lives as long as this
        checkout (see connguard.proxy.PooledCursor). After ``close()`` a cursor is still
        handed out, as mysqlclient does, and fails when used."""
        entry = self._self_entry
        conn = entry.conn if entry is not None else self.__wrapped__
        cls = cursorclass or (conn.cursorclass if entry is not None
                              else GuardedConnection._cg_cursorclass)
        cur = pooled_cursor_class(cls, _CURSOR_ERRORS)(conn)
        cur._cg_lease = lease_of(entry)
        cur._cg_handle = self
        return cur


__all__ = ["ARGUMENTS", "CONNECT_NAME", "ERRORS", "GuardedConnection", "Handle"]
