"""What the SQLAlchemy plugin needs to know of each MySQL DBAPI driver it guards.

One small value object per driver (:class:`DriverFacts`): which connections it can watch,
how to find the descriptor to poll for a peer close, how to let go of a connection a forked
child inherited, the driver's error base. The plugin asks :func:`facts_for` once per engine;
a driver module is only ever taken from the dialect (never imported here), so nothing is
imported unless an engine uses it.

PyMySQL: the socket object (``conn._sock``). mysqlclient (``mysql+mysqldb``): the connection
itself, which answers ``fileno()`` with its socket's descriptor while open (and raises once
closed, which counts as dead). aiomysql and asyncmy (async engines): SQLAlchemy's adapter
wraps the driver's connection; the descriptor is the socket of its asyncio transport, which
only the event loop may close (see :attr:`DriverFacts.is_async` and the plugin's reaper).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from typing import Any, Callable, List, Optional, Tuple, Type

import pymysql

from connguard import driver, errors


@dataclasses.dataclass(frozen=True)
class DriverFacts:
    """How the plugin watches one driver's connections."""

    name: str  #: the dialect's driver name (``pymysql``, ``mysqldb``)
    connection_class: type  #: its connections (a do_connect listener may return others)
    error_class: Type[Exception]  #: the DBAPI ``Error`` every error of the driver derives from
    pollable: Callable[[Any], Any]  #: something with ``fileno()``, or None once closed
    drop_inherited: Callable[[Any], None]  #: in a forked child: let go without a word
    thread_id: Callable[[Any], Optional[int]]  #: the server's id of the session, for messages
    module: Any = pymysql  #: the DBAPI module (for async engines: SQLAlchemy's adapter of it)
    #: Connections live on an event loop: never wait in the loop's thread, and let the loop
    #: close their transports.
    is_async: bool = False
    #: Called with each new connection (on the thread that opened it).
    connected: Callable[[Any], None] = lambda conn: None
    #: connguard's own query on a user's connection: its rows as the server's bytes, never
    #: through the connection's cursor class, ``conv`` or ``use_unicode``. None: the
    #: connection's ``cursor()`` (SQLAlchemy's async adapters ask for the plain class).
    raw_rows: Optional[Callable[[Any, str], List[Tuple[Any, ...]]]] = None

    def first_value(self, conn: Any, sql: str) -> Any:
        """The first column of ``sql``'s first row on ``conn`` (IndexError when none)."""
        if self.raw_rows is not None:
            return self.raw_rows(conn, sql)[0][0]
        cursor = conn.cursor()
        try:
            cursor.execute(sql)
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    def own_error(self, err: BaseException) -> BaseException:
        """``err``, raised by connguard itself (no driver error behind it), as this driver's
        ``OperationalError`` (``InterfaceError``) too: SQLAlchemy wraps only the engine's
        DBAPI errors, and users catch their driver's classes."""
        interface = isinstance(err, pymysql.err.InterfaceError)
        return errors.as_driver_error(
            err, getattr(self.module, "InterfaceError" if interface else "OperationalError"))

    def watches(self, conn: Any) -> bool:
        """Whether ``conn`` is one of this driver's connections (a proxy that passes for one
        but hides its socket is not; for async engines, SQLAlchemy's adapter of one)."""
        if self.is_async:
            conn = getattr(conn, "_connection", None)
        return isinstance(conn, self.connection_class) and (
            self.name != "pymysql" or hasattr(conn, "_sock"))


# -- PyMySQL ---------------------------------------------------------------------------------
PYMYSQL = DriverFacts("pymysql", pymysql.connections.Connection, pymysql.err.Error,
                      driver.raw_socket, driver.drop_inherited, driver.thread_id,
                      raw_rows=driver.raw_rows)


# -- mysqlclient (MySQLdb) -------------------------------------------------------------------
# libmysqlclient owns its descriptor: after a lost connection it keeps the number even once
# the descriptor was closed and the number reused for another file. Each connection's socket
# is remembered by (number, device, inode) when it connects, and only that socket is polled or,
# in a forked child, replaced.
_IDENTITY = "_cg_socket_identity"


def _socket_identity(fd: int) -> Tuple[int, int, int]:
    st = os.fstat(fd)
    return fd, st.st_dev, st.st_ino


def mysqldb_connected(conn: Any) -> None:
    setattr(conn, _IDENTITY, _socket_identity(conn.fileno()))
    _dead_end()  # made now, in the process that connects: a forked child needs no new fd


def _mysqldb_socket(conn: Any) -> Optional[int]:
    """The connection's descriptor while it still is the socket it connected on."""
    known = getattr(conn, _IDENTITY, None)
    try:
        if known is None or not conn.open or _socket_identity(conn.fileno()) != known:
            return None
    except Exception:  # noqa: BLE001 - closed (fileno() refuses) or the number is free
        return None
    return int(known[0])


def mysqldb_pollable(conn: Any) -> Any:
    """The connection itself while its socket is the one it connected on (``fileno()`` is
    its descriptor); None (dead) once it is closed or the number names another file."""
    return conn if _mysqldb_socket(conn) is not None else None


_dead_end_fd: Optional[int] = None


def _dead_end() -> int:
    """A socket whose peer is gone: what a forked child puts in place of an inherited
    mysqlclient descriptor. Made once per process before any fork needs it, and kept for the
    life of the process (a bare descriptor: no socket object to finalize at exit)."""
    global _dead_end_fd
    if _dead_end_fd is None:
        ours, other = socket.socketpair()
        other.close()
        _dead_end_fd = ours.detach()
    return _dead_end_fd


def mysqldb_drop_inherited(conn: Any) -> None:
    """In a forked child: make the inherited descriptor a dead end.

    libmysqlclient's close (also on garbage collection) sends COM_QUIT on the socket, which
    the parent still uses: that would end the parent's session. The descriptor is replaced
    in this process only (``dup2``) by the dead-end socket (made before the fork), so
    whatever the child's copy later writes goes nowhere; the parent's socket is untouched.
    Only the socket the connection connected on is replaced, never a reused number."""
    fd = _mysqldb_socket(conn)
    if fd is not None:
        os.dup2(_dead_end(), fd)


def mysqldb_raw_rows(conn: Any, sql: str) -> List[Tuple[Optional[bytes], ...]]:
    """``sql``'s rows as the bytes the server sent (NULL as None), on a mysqlclient
    connection: no cursor (so not its ``cursorclass``), no converter (so not its ``conv``
    nor ``use_unicode``; the library's result reads the connection's converter when made)."""
    saved = conn.converter
    conn.converter = {}  # no conversion at all: every value as bytes
    try:
        conn.query(sql)
        result = conn.store_result()
    except Exception:
        raise
    except BaseException:
        # Interrupted between the query and its result: the result is unread and the next
        # command would be out of sync. Closed, the connection is discarded, not handed on.
        with contextlib.suppress(Exception):
            conn.close()
        raise
    finally:
        conn.converter = saved
    return list(result.fetch_row(0)) if result is not None else []


def mysqldb_thread_id(conn: Any) -> Optional[int]:
    try:
        return int(conn.thread_id())
    except Exception:  # noqa: BLE001 - closed: no session to name
        return None


def mysqldb_facts(dbapi: Any) -> DriverFacts:
    """The facts for mysqlclient, ``dbapi`` being its ``MySQLdb`` module."""
    import importlib  # the submodule of the driver the dialect already loaded

    connections = importlib.import_module(dbapi.__name__ + ".connections")
    return DriverFacts("mysqldb", connections.Connection, dbapi.Error,
                       mysqldb_pollable, mysqldb_drop_inherited, mysqldb_thread_id, dbapi,
                       connected=mysqldb_connected, raw_rows=mysqldb_raw_rows)


# -- aiomysql and asyncmy (async engines) -------------------------------------------------------
def transport_of(adapted: Any) -> Any:
    """The asyncio transport under SQLAlchemy's adapter of an aiomysql or asyncmy connection,
    or None once the driver let go of it (closed)."""
    conn = adapted._connection
    writer = getattr(conn, "_writer", None)  # aiomysql: a StreamWriter
    return writer.transport if writer is not None else getattr(conn, "_transport", None)


def _async_pollable(adapted: Any) -> Any:
    """The transport's socket while the transport is open (the loop reads it: a FIN it has
    already read leaves the transport closing, one it has not shows in a poll)."""
    transport = transport_of(adapted)
    if transport is None or transport.is_closing():
        return None
    return transport.get_extra_info("socket")


def _async_thread_id(adapted: Any) -> Optional[int]:
    conn = adapted._connection
    tid = getattr(conn, "server_thread_id", None)  # PyMySQL-style (asyncmy): a tuple
    if tid:
        return int(tid[0])
    try:
        return int(conn.thread_id())  # aiomysql
    except Exception:  # noqa: BLE001 - closed: no session to name
        return None


def _left_to_the_parent(conn: Any) -> None:
    """In a forked child, an async connection is not touched: its loop is the parent's, and
    closing the inherited descriptor alone sends nothing while the parent holds it."""


def _async(name: str, dbapi: Any) -> DriverFacts:
    import importlib  # the driver the dialect already loaded

    connection = importlib.import_module(name + ".connection")
    return DriverFacts(name, connection.Connection, dbapi.Error,
                       _async_pollable, _left_to_the_parent, _async_thread_id, dbapi,
                       is_async=True)


#: The dialects' driver names connguard guards fully.
GUARDED = frozenset({"pymysql", "mysqldb", "aiomysql", "asyncmy"})


def facts_for(dialect: Any) -> Optional[DriverFacts]:
    """The facts for the driver of ``dialect`` (an instance: its DBAPI module loaded), or
    None for a driver connguard cannot watch (a third-party dialect may name no driver)."""
    name = getattr(dialect, "driver", None)
    if name == "pymysql":
        return PYMYSQL
    dbapi = getattr(dialect, "loaded_dbapi", None) or getattr(dialect, "dbapi", None)
    if name == "mysqldb" and getattr(dbapi, "__name__", None) == "MySQLdb":
        return mysqldb_facts(dbapi)  # not another module given as module= (PyMySQL's shim, say)
    if name in ("aiomysql", "asyncmy") and getattr(dialect, "is_async", False):
        return _async(name, dbapi)
    return None


def facts_of(conn: Any, engine_facts: DriverFacts) -> DriverFacts:
    """The facts for ``conn``: PyMySQL's for a PyMySQL connection (a do_connect listener of
    another driver's engine may return one), otherwise the engine driver's."""
    return PYMYSQL if isinstance(conn, pymysql.connections.Connection) else engine_facts


def watchable(conn: Any, engine_facts: DriverFacts) -> bool:
    """Whether the peer-closed check and the reaper can watch ``conn``."""
    return engine_facts.watches(conn) or PYMYSQL.watches(conn)

