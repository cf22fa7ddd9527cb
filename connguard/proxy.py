"""What the caller holds: a PyMySQL connection whose ``close()`` returns it to the pool.

``PooledConnection`` is a transparent proxy (wrapt), so attributes, ``isinstance`` checks and
methods behave as PyMySQL's own. Only three things differ: ``close()`` and the context
manager give the connection back; errors from queries come out translated (still catchable as
PyMySQL's classes); and a connection-level error marks the server connection as broken so
the pool discards it instead of handing it to the next caller.
"""

from __future__ import annotations

import operator
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Tuple, Type

import pymysql
import wrapt

if TYPE_CHECKING:
    from connguard.pool import Entry, Pool


def _returned_error() -> Exception:
    """What PyMySQL raises for a use of a closed connection."""
    return pymysql.err.InterfaceError(0, "connection was closed (returned to the pool)")


class _Returned:
    """Stands in for the connection after the handle was closed: every use is an error
    (``error()``: the one the driver raises for a closed connection).

    ``_result`` alone answers (None): closing a cursor of a closed connection looks at it,
    and PyMySQL lets that succeed; ``open`` is 0, as on a closed mysqlclient connection."""

    _result = None
    open = 0

    def __init__(self, error: Callable[[], Exception]) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # protocol probes (wrapt's, copy's) are not uses
        raise self._error()

    def __repr__(self) -> str:
        return "<returned connection>"


_RETURNED = _Returned(_returned_error)
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

    # Set by Pool.connect right after construction (wrapt's own C __init__ takes the
    # connection): no Python-level __init__ on the checkout path.
    _self_pool: Pool
    _self_entry: Optional[Entry] = None
    # What differs per driver (a subclass per driver overrides them: connguard.mysqldb):
    # the stand-in after close, the errors its methods translate, a second close's error.
    _self_returned: Any = _RETURNED  # for connect(); close() sets _RETURNED (see its comment)
    _self_errors: Tuple[Type[BaseException], ...] = (pymysql.err.Error, OSError)
    _self_warns_on_reconnect = True  # PyMySQL deprecated ping(reconnect=True)

    @staticmethod
    def _self_closed_error() -> Exception:
        return pymysql.err.Error("Already closed")

    def close(self) -> None:
        """Return the connection to the pool; a second close raises like PyMySQL's."""
        entry = self._self_entry
        if entry is None:
            raise self._self_closed_error()
        returns = entry.returns
        self._self_entry = None
        try:  # whatever interrupts these steps (Ctrl-C), the entry goes back to the pool
            # The module's stand-in, not self._self_returned: an attribute read through the
            # proxy costs ~1.5k instructions on every return (a driver's Handle sets its own).
            self.__wrapped__ = _RETURNED
            lease = entry.lease  # _end_lease, inlined: every return passes here
            if lease is not None:
                lease.returned = True
                entry.lease = None
            self._self_pool._release(entry)
        except BaseException:
            # Interrupted before _release took it (its first step counts the return):
            # give it now. After that step, _release finished the return itself.
            if entry.returns == returns:
                self._self_pool._release(entry)
            raise

    def connect(self, sock: Any = None) -> None:
        """PyMySQL reopens a closed connection object with ``connect()``; a closed handle
        does the same with a connection from its pool (``sock`` is not supported)."""
        if sock is not None:
            raise pymysql.err.NotSupportedError("connect(sock) on a pooled connection")
        if self._self_entry is not None:
            PooledConnection.close(self)  # PyMySQL drops the old session too
            self.__wrapped__ = self._self_returned  # the driver's stand-in, if no new one
        entry = self._self_pool._checkout()
        try:
            self._self_entry = entry  # first: from here its close() or __del__ gives it back
            self.__wrapped__ = entry.conn
        except BaseException:
            self._self_entry = None
            self.__wrapped__ = self._self_returned
            self._self_pool._release(entry)
            raise

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
        # finalizer may run inside any thread, even one holding the pool's lock). Queued
        # first, with no Python call before: the lease is ended when it is reclaimed.
        entry = self._self_entry
        if entry is not None:
            self._self_pool._lost.append(entry)
            self._self_entry = None

    def _self_fail(self, exc: BaseException) -> NoReturn:
        """Mark the server connection broken if ``exc`` is connection-level; raise it
        translated. On a closed handle the error is the stand-in's (a use after close):
        about the handle, not the server, so it is not translated."""
        entry = self._self_entry
        if entry is None:
            raise exc
        translated = self._self_pool.statement_failed(entry, exc)
        if translated is exc:
            raise exc
        raise translated from exc

    def ping(self, reconnect: bool = False) -> None:
        """PyMySQL's ``ping``; with ``reconnect=True`` a dead connection is replaced through
        the pool (resource guard, storm gate, lease), never behind its back."""
        if reconnect and self._self_warns_on_reconnect:
            warnings.warn("The 'reconnect' argument is deprecated. Create a new connection "
                          "if you want to reconnect.", DeprecationWarning, 2)
        entry = self._self_entry
        if entry is None:
            if not reconnect:
                raise self._self_closed_error()
            self.connect()  # a closed handle: PyMySQL reconnects it, so does the pool
            return
        try:
            self._self_ping()
            return
        except self._self_errors as exc:
            if not reconnect:
                self._self_fail(exc)
        try:
            self.__wrapped__ = self._self_pool._reconnect(entry)
        except self._self_errors as exc:
            self._self_fail(exc)

    def _self_ping(self) -> None:
        """The driver's own ping, never its reconnect."""
        self.__wrapped__.ping(False)

    def cursor(self, cursor: Any = None) -> Any:
        """A cursor of ``cursor``'s class (or the ``cursorclass`` given at connect) on the
        pooled connection, that lives only as long as this checkout (see PooledCursor).

        After ``close()`` a cursor is still handed out, as PyMySQL does for a closed
        connection, and fails with ``InterfaceError`` when used."""
        entry = self._self_entry
        if entry is None:
            # On a connection object that never connected: nothing reaches the pool's.
            return _never_connected().cursor(cursor)
        lease = entry.lease
        if lease is None:
            lease = entry.lease = Lease()
        conn = entry.conn
        cls = cursor or conn.cursorclass
        # pooled_cursor_class's cache, read here first: one call fewer on every cursor.
        cur = (_cursor_classes.get(cls) or pooled_cursor_class(cls))(conn)
        cur._cg_lease = lease
        cur._cg_handle = self
        return cur

    def __repr__(self) -> str:
        entry = self._self_entry
        if entry is None:
            return "<connguard.PooledConnection (returned)>"
        tid = self.__wrapped__.server_thread_id
        return f"<connguard.PooledConnection thread_id={tid[0] if tid else None}>"


class Lease:
    """One checkout as its cursors see it: ``returned`` once the handle is closed.

    A plain slot, so the check a cursor makes before each use costs next to nothing (an
    attribute of the wrapt proxy itself costs a few hundred ns to read)."""

    __slots__ = ("returned",)

    def __init__(self) -> None:
        self.returned = False


_ENDED = Lease()
_ENDED.returned = True


def lease_of(entry: Optional[Entry]) -> Lease:
    """The lease of ``entry``'s checkout for a new cursor (made on first use); for a closed
    handle (no entry) an ended one: its cursors fail when used."""
    if entry is None:
        return _ENDED
    lease = entry.lease
    if lease is None:
        lease = entry.lease = Lease()
    return lease


class PooledCursor:
    """What every cursor a handle gives out adds to PyMySQL's cursor class (a subclass per
    class, named like it): once its checkout ended, any use that would reach the server
    raises ``InterfaceError`` (the connection is someone else's now), as PyMySQL's cursor
    of a closed connection does; rows already fetched stay readable; ``close()`` lets go
    without touching the connection. ``connection`` is the handle, not the pooled
    connection behind it."""

    _cg_lease: Lease
    _cg_handle: Any
    _cg_conn: Any = None

    @property
    def connection(self) -> Any:
        return self._cg_handle if self._cg_conn is not None else None

    @connection.setter
    def connection(self, conn: Any) -> None:
        self._cg_conn = conn  # PyMySQL sets it at init (the pooled connection) and on close

    @staticmethod
    def _cg_returned_error() -> Exception:
        return _returned_error()

    @staticmethod
    def _cg_closed_error() -> Exception:
        return pymysql.err.ProgrammingError("Cursor closed")

    def _get_db(self) -> Any:
        if self._cg_lease.returned and not self._follow_handle():
            raise self._cg_returned_error()
        conn = self._cg_conn
        if conn is None:
            raise self._cg_closed_error()
        return conn

    def close(self) -> None:
        if self._cg_lease.returned and not self._follow_handle():
            self._cg_conn = None  # the connection is someone else's now: do not touch it
            return
        super().close()  # type: ignore[misc]

    def _follow_handle(self) -> bool:
        """The checkout this cursor was made in ended. If its handle holds a connection
        again (reopened with ``connect()`` or ``ping(reconnect=True)``), follow it, as a
        PyMySQL cursor follows its reconnected connection; else False."""
        entry = self._cg_handle._self_entry
        if entry is None:
            return False
        lease = entry.lease
        if lease is None:
            lease = entry.lease = Lease()
        self._cg_lease = lease
        if self._cg_conn is not None:  # not closed by the caller: on the new connection
            self._cg_conn = entry.conn
        return True


_cursor_classes: Dict[type, type] = {}


def pooled_cursor_class(cls: type, errors: Optional[Dict[str, Any]] = None) -> type:
    """``cls`` with PooledCursor's behaviour, made once per cursor class. ``errors``: the
    driver's errors for a cursor whose checkout ended and for a closed cursor
    (``_cg_returned_error``, ``_cg_closed_error``), when not PyMySQL's."""
    pooled = _cursor_classes.get(cls)
    if pooled is None:
        namespace: Dict[str, Any] = {"__module__": cls.__module__,
                                     "__qualname__": cls.__qualname__,
                                     "__doc__": cls.__doc__, **(errors or {})}
        if hasattr(cls, "__del__"):  # SSCursor finalizes with close(): with ours, then
            namespace["__del__"] = PooledCursor.close
        pooled = type(cls.__name__, (PooledCursor, cls), namespace)
        pooled = _cursor_classes.setdefault(cls, pooled)
    return pooled


def _setter(name: str) -> Any:
    def set_on_connection(self: PooledConnection, value: Any) -> None:
        setattr(self.__wrapped__, name, value)
    return set_on_connection


def _guarded(name: str) -> Any:
    """A connection method that translates errors and flags connection-level ones."""

    def method(self: PooledConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.__wrapped__, name)(*args, **kwargs)
        except self._self_errors as exc:
            self._self_fail(exc)
        except BaseException:
            # Interrupted mid-command (Ctrl-C, SystemExit): never hand this session on.
            entry = self._self_entry
            if entry is not None:
                entry.broken = True
            raise

    method.__name__ = name
    method.__doc__ = f"PyMySQL's ``{name}``, with connguard's error translation."
    return method


# Statements (``query``, and so every cursor's) are translated where they fail, in
# driver.GuardedConnection.query; these methods do not go through it.
for _name in ("next_result", "commit", "rollback", "begin", "select_db", "autocommit",
              "show_warnings", "set_character_set", "kill"):
    setattr(PooledConnection, _name, _guarded(_name))

# What PyMySQL's cursors read on their connection (the handle), forwarded at C speed. wrapt
# finds any other name only after failing the lookup on the proxy, which costs building and
# discarding an AttributeError: a few thousand instructions per access, several per query.
for _name in ("query", "_result", "escape", "encoding", "charset", "server_status"):
    setattr(PooledConnection, _name, property(operator.attrgetter(f"__wrapped__.{_name}"),
                                              _setter(_name)))
