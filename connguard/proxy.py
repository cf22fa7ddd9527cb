"""What the caller holds: a PyMySQL connection whose ``close()`` returns it to the pool.

``PooledConnection`` is a transparent proxy (wrapt), so attributes, ``isinstance`` checks and
methods behave as PyMySQL's own. Only three things differ: ``close()`` and the context
manager give the connection back; errors from queries come out translated (still catchable as
PyMySQL's classes); and a connection-level error marks the server connection as broken so
the pool discards it instead of handing it to the next caller.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, List, NoReturn, Optional

import pymysql
import wrapt

from connguard import errors

if TYPE_CHECKING:
    from connguard.pool import Entry, Pool


class _Returned:
    """Stands in for the connection after the handle was closed: every use is an error."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # protocol probes (wrapt's, copy's) are not uses
        raise pymysql.err.InterfaceError(0, "connection was closed (returned to the pool)")

    def __repr__(self) -> str:
        return "<returned connection>"


_RETURNED = _Returned()
_NEVER_CONNECTED: List[pymysql.connections.Connection] = []


def _never_connected() -> pymysql.connections.Connection:
    if not _NEVER_CONNECTED:
        _NEVER_CONNECTED.append(pymysql.connections.Connection(defer_connect=True))
    return _NEVER_CONNECTED[0]

# wrapt 2's ObjectProxy re-derives special methods on every ``__wrapped__`` assignment (a few
# µs, on each return to the pool); BaseObjectProxy is the plain C proxy. wrapt 1 has only
# ObjectProxy, which is that plain proxy.
_ProxyBase: Any = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


def _no_fixups() -> None:
    return None


class PooledConnection(_ProxyBase):
    """A pooled PyMySQL connection; ``close()`` gives it back to its pool."""

    # wrapt looks this up on every ``__wrapped__`` assignment (each close); found on the
    # class it costs a trivial call instead of a miss delegated to the wrapped object.
    __wrapped_setattr_fixups__ = staticmethod(_no_fixups)

    def __init__(self, conn: pymysql.connections.Connection, pool: Pool, entry: Entry) -> None:
        _ProxyBase.__init__(self, conn)
        self._self_pool = pool
        self._self_entry: Optional[Entry] = entry

    def close(self) -> None:
        """Return the connection to the pool; a second close raises like PyMySQL's."""
        entry = self._self_entry
        if entry is None:
            raise pymysql.err.Error("Already closed")
        self._self_entry = None
        self.__wrapped__ = _RETURNED
        self._self_pool._release(entry)

    def connect(self, sock: Any = None) -> None:
        """PyMySQL reopens a closed connection object with ``connect()``; a closed handle
        does the same with a connection from its pool (``sock`` is not supported)."""
        if sock is not None:
            raise pymysql.err.NotSupportedError("connect(sock) on a pooled connection")
        if self._self_entry is not None:
            self._self_pool._release(self._self_entry)  # PyMySQL drops the old session too
            self._self_entry = None
            self.__wrapped__ = _RETURNED
        entry = self._self_pool._acquire()
        self.__wrapped__ = entry.conn
        self._self_entry = entry

    @property
    def open(self) -> bool:
        return self._self_entry is not None and bool(self.__wrapped__.open)

    def __enter__(self) -> PooledConnection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._self_entry is not None:
            self.close()

    def __del__(self) -> None:
        # Forgotten without close(): hand the entry back through a lock-free queue (a
        # finalizer may run inside any thread, even one holding the pool's lock).
        entry = self._self_entry
        if entry is not None:
            self._self_entry = None
            self._self_pool._lost_handle(entry)

    def _self_fail(self, exc: BaseException) -> NoReturn:
        """Mark the server connection broken if ``exc`` is connection-level; raise it
        translated."""
        entry = self._self_entry
        if entry is not None and errors.is_disconnect(exc):
            entry.broken = True
        tid = entry.conn.server_thread_id if entry is not None else None
        translated = self._self_pool.translate(exc, extra={"thread_id": tid[0]} if tid else None)
        if translated is exc:
            raise exc
        raise translated from exc

    def ping(self, reconnect: bool = False) -> None:
        """PyMySQL's ``ping``; with ``reconnect=True`` a dead connection is replaced through
        the pool (resource guard, storm gate, lease), never behind its back."""
        if reconnect:
            warnings.warn("The 'reconnect' argument is deprecated. Create a new connection "
                          "if you want to reconnect.", DeprecationWarning, 2)
        entry = self._self_entry
        if entry is None:
            if not reconnect:
                raise pymysql.err.Error("Already closed")
            self.connect()  # a closed handle: PyMySQL reconnects it, so does the pool
            return
        try:
            self.__wrapped__.ping(False)
            return
        except (pymysql.err.Error, OSError) as exc:
            if not reconnect:
                self._self_fail(exc)
        try:
            self.__wrapped__ = self._self_pool._reconnect(entry)
        except (pymysql.err.Error, OSError) as exc:
            self._self_fail(exc)

    def cursor(self, cursor: Any = None) -> Any:
        if self._self_entry is None:
            # PyMySQL hands out cursors of a closed connection (they fail on use): the same,
            # on a connection object that never connected, so nothing reaches the pool's.
            return _never_connected().cursor(cursor)
        try:
            raw = self.__wrapped__.cursor(cursor)
        except pymysql.err.Error as exc:
            self._self_fail(exc)
        return GuardedCursor(raw, self)

    def __repr__(self) -> str:
        entry = self._self_entry
        if entry is None:
            return "<connguard.PooledConnection (returned)>"
        tid = self.__wrapped__.server_thread_id
        return f"<connguard.PooledConnection thread_id={tid[0] if tid else None}>"


def _guarded(name: str) -> Any:
    """A connection method that translates errors and flags connection-level ones."""

    def method(self: PooledConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.__wrapped__, name)(*args, **kwargs)
        except (pymysql.err.Error, OSError) as exc:
            self._self_fail(exc)

    method.__name__ = name
    method.__doc__ = f"PyMySQL's ``{name}``, with connguard's error translation."
    return method


for _name in ("query", "commit", "rollback", "begin", "select_db", "autocommit",
              "show_warnings", "set_character_set", "kill"):
    setattr(PooledConnection, _name, _guarded(_name))


class GuardedCursor(_ProxyBase):
    """A PyMySQL cursor whose errors come out translated and flag a broken connection.

    It lives only as long as the handle that made it: once the handle is closed (the server
    connection back in the pool, perhaps already another caller's), every call that would
    talk to the server raises ``InterfaceError``, as PyMySQL's cursor of a closed connection
    does. Rows already fetched into the cursor stay readable, as with PyMySQL.
    """

    def __init__(self, cursor: Any, owner: PooledConnection) -> None:
        super().__init__(cursor)
        self._self_owner = owner
        self._self_unbuffered = isinstance(cursor, pymysql.cursors.SSCursor)

    @property
    def connection(self) -> Any:
        """The handle, not the pooled connection behind it (which outlives the handle)."""
        return self._self_owner if self.__wrapped__.connection is not None else None

    def close(self) -> None:
        if self._self_owner._self_entry is None:
            # The server connection is someone else's now: let go without touching it.
            self.__wrapped__.connection = None
            return
        self.__wrapped__.close()

    def __enter__(self) -> GuardedCursor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __iter__(self) -> Any:
        return iter(self.__wrapped__)


def _guarded_cursor(name: str, talks: bool) -> Any:
    def method(self: GuardedCursor, *args: Any, **kwargs: Any) -> Any:
        if self._self_owner._self_entry is None and (talks or self._self_unbuffered):
            raise pymysql.err.InterfaceError(0, "connection was closed (returned to the pool)")
        try:
            return getattr(self.__wrapped__, name)(*args, **kwargs)
        except (pymysql.err.Error, OSError) as exc:
            self._self_owner._self_fail(exc)

    method.__name__ = name
    method.__doc__ = f"PyMySQL's cursor ``{name}``, with connguard's error translation."
    return method


for _name in ("execute", "executemany", "callproc", "nextset"):
    setattr(GuardedCursor, _name, _guarded_cursor(_name, talks=True))
# Fetching reads the server only for unbuffered cursors (SSCursor).
for _name in ("fetchone", "fetchmany", "fetchall"):
    setattr(GuardedCursor, _name, _guarded_cursor(_name, talks=False))
