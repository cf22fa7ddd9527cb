"""The SQLAlchemy plugin's connect path for one engine.

Every new DBAPI connection of an engine made with the plugin is opened by the dialect's own
``connect`` (so the engine's DBAPI module, ``module=`` or a patched ``pymysql.connect``, does
the connecting) inside connguard's connect path: the OS resource guard refuses before a port
or a descriptor is asked for, the reconnect-storm gate paces the attempt, a failure leaves
translated with the password masked, and the TLS context PyMySQL built for an earlier
connection is reused when PyMySQL would only build the same one again. It is hooked in
through the dialect's ``do_connect`` event (:meth:`EngineConnect.listener`).

Nothing here runs on a checkout served from the pool: only when a connection is opened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pymysql
from pymysql.constants import CLIENT, CR
from sqlalchemy.pool import QueuePool

from connguard import coordination, dbapis, driver, errors, events, storm
from connguard.connector import Connector
from connguard.guard import ResourceGuard
from connguard.hostgate import HostGate
from connguard.metrics import Histogram
from connguard.sqlalchemy_options import EnginePart, PluginOptions, coordinator_of, warn
from connguard.sqlalchemy_pool import GuardedQueuePool

#: Seconds the storm gate may hold a connect for pools without a checkout timeout.
DEFAULT_CONNECT_WAIT = 30.0


class EngineConnect(EnginePart):
    """How one engine's connections are opened, and what those connects counted.

    Holds the engine weakly (its guard does too). The Connector (resource guard, gate and
    translation) is kept while the connect arguments stay the same.
    """

    def __init__(self, engine: Callable[[], Any], options: PluginOptions,
                 facts: dbapis.DriverFacts, name: str, listeners: events.Listeners,
                 password: Any) -> None:
        super().__init__(engine, options, facts, password)  # counts: connects, connect_errors
        self.name = name
        self._listeners = listeners
        self.connector: Optional[Connector] = None
        self._resource_guard: Optional[ResourceGuard] = None
        # Per destination: the TLS context PyMySQL built for a connection in its "preferred"
        # mode, once the server was seen to offer TLS (see _connect_reusing_tls).
        self._tls_contexts: Dict[Tuple[str, int], ssl.SSLContext] = {}
        self._failures: Counter = Counter()  # connect failures by exception class
        self._connect_time = Histogram()

    def listener(self) -> Callable[..., Any]:
        """The engine's ``do_connect`` listener: a plain function marked with its owner, so
        that :meth:`_do_connect` can find it among the dialect's listeners (a bound method
        is a new object on every access). It does not keep the owner alive through a
        cycle, so the engine's state goes with the engine without a gc pass."""
        def connguard_do_connect(dialect: Any, record: Any, cargs: List[Any],
                                 cparams: Dict[str, Any]) -> Any:
            return self._do_connect(dialect, record, cargs, cparams)
        connguard_do_connect.connguard_owner = self  # type: ignore[attr-defined]
        return connguard_do_connect

    # -- what the engine's guard asks ------------------------------------------------------
    def gate(self) -> Optional[storm.ConnectGate]:
        """The gate the engine's connects go through (None before the first connect, or
        with storm control off)."""
        connector = self.connector
        return connector.gate if connector is not None else None

    def lost(self) -> None:
        """A connection lost to an error: its replacement is paced as a reconnect."""
        gate = self.gate()
        if gate is not None:
            gate.connection_lost()

    def translate(self, exc: BaseException) -> BaseException:
        connector = self.connector
        if connector is not None:
            return connector.translate(exc)
        return errors.translate(exc, password=self._password)

    def snapshot(self) -> Tuple[Dict[str, int], Dict[str, int], Dict[str, Any]]:
        """(connects and connect_errors, failures by class, the connect-time distribution),
        taken together."""
        with self._lock:
            return dict(self._counts), dict(self._failures), self._connect_time.snapshot()

    # -- the listener ----------------------------------------------------------------------
    def _later_listeners(self, dialect: Any) -> List[Callable[..., Any]]:
        listeners = list(dialect.dispatch.do_connect)
        for position, fn in enumerate(listeners):
            if getattr(fn, "connguard_owner", None) is self:
                return listeners[position + 1:]
        return []

    def _do_connect(self, dialect: Any, record: Any, cargs: List[Any],
                    cparams: Dict[str, Any]) -> Any:
        """Open a new DBAPI connection through connguard's connect path (:meth:`_open`).

        Listeners registered after ours (users typically add theirs after create_engine,
        e.g. to put a fresh token in ``cparams["password"]``) run first, since returning a
        connection ends SQLAlchemy's loop over the listeners; one that returns a connection
        of its own wins, and that connection is used as it is.
        """
        for fn in self._later_listeners(dialect):
            conn = fn(dialect, record, cargs, cparams)
            if conn is not None:
                return conn
        began = time.monotonic()
        try:
            conn = self._open(dialect, cargs, cparams)
        except BaseException as exc:
            with self._lock:
                self._counts["connect_errors"] += 1
                if isinstance(exc, Exception):
                    self._failures[type(exc).__name__] += 1
            if events.active and isinstance(exc, Exception):
                events.dispatch(self._listeners, self.name, "connect_failed", error=exc)
            raise
        seconds = time.monotonic() - began
        with self._lock:
            self._counts["connects"] += 1
            self._connect_time.observe(seconds)
        if events.active:
            events.dispatch(self._listeners, self.name, "connect", seconds=seconds)
        return conn

    def _open(self, dialect: Any, cargs: List[Any], cparams: Dict[str, Any]) -> Any:
        """``dialect.connect(*cargs, **cparams)``, which calls the engine's DBAPI module, inside
        connguard's connect path: the resource guard refuses before the OS is asked for a port
        or a descriptor, the storm gate paces the attempt, and a failure leaves translated
        with the password masked in its whole chain."""
        def connect() -> Any:
            try:
                return self._connect_reusing_tls(dialect, cargs, cparams)
            except pymysql.err.Error as exc:
                _close_stranded_socket(exc)
                raise

        deadline = self._connect_deadline()
        engine = self._engine()
        timeout = engine.pool.timeout() if engine is not None and isinstance(
            engine.pool, QueuePool) else None
        started = deadline - timeout if timeout is not None and deadline != float(
            "inf") else None
        pause = _loop_pause if self.facts.is_async else None  # never block an event loop
        try:
            return self._connector_for(cparams).open(deadline, connect=connect,
                                                     started=started, pause=pause)
        except errors.ConnGuardError as exc:  # the gate's or the guard's own refusal
            own = self.facts.own_error(exc)
            if own is exc:
                raise
            raise own from exc.__cause__

    def _connect_reusing_tls(self, dialect: Any, cargs: List[Any],
                             cparams: Dict[str, Any]) -> Any:
        """The dialect's connect, given the TLS context of an earlier connection when PyMySQL
        would only build the same one again.

        With no TLS option, PyMySQL (>= 1.2) uses TLS when the server offers it ("preferred")
        and builds a new default context for every connection, loading the system CA store
        each time. Passing a context as ``ssl`` would make TLS *required*, which a server
        without TLS refuses, so a context is passed only once a connection showed that the
        server offers TLS, and it is the context PyMySQL built for that connection: same
        settings, same outcome. A server restarted without TLS answers 2026; the connect
        is then made again without the context (in clear, as "preferred" does) and the
        context is forgotten until the server offers TLS again.
        """
        if not _tls_left_to_pymysql(dialect, cargs, cparams):
            return dialect.connect(*cargs, **cparams)
        key = driver.destination(cparams)
        context = self._tls_contexts.get(key)
        if context is not None:
            try:
                return dialect.connect(*cargs, **{**cparams, "ssl": context})
            except pymysql.err.OperationalError as exc:
                if not exc.args or exc.args[0] != CR.CR_SSL_CONNECTION_ERROR:
                    raise
            self._tls_contexts.pop(key, None)
        conn = dialect.connect(*cargs, **cparams)
        learnt = _preferred_tls_context(conn)
        if learnt is not None:
            self._tls_contexts.setdefault(key, learnt)
        return conn

    def _connect_deadline(self) -> float:
        """How long the storm gate may hold this connect: what is left of the checkout's
        ``pool_timeout`` (the wait a caller of this engine already accepts), or the whole
        timeout for a connect the guarded pool did not start. Pools without a timeout
        (NullPool, StaticPool, ...) never wait: during an outage their connect fails at
        once, as it would without connguard."""
        engine = self._engine()
        pool = None if engine is None else engine.pool
        if isinstance(pool, GuardedQueuePool):
            deadline = pool.connect_deadline()
            if deadline is not None:
                return deadline
        if not isinstance(pool, QueuePool):
            return time.monotonic()
        timeout = pool.timeout()
        return time.monotonic() + (DEFAULT_CONNECT_WAIT if timeout is None else timeout)

    # -- the Connector ---------------------------------------------------------------------
    def _connector_for(self, cparams: Dict[str, Any]) -> Connector:
        """One Connector per engine, kept while the connect arguments stay the same: the
        resource guard, the storm gate and the translation for :meth:`_open` (which connects
        through the dialect, not with ``Connector.open``).

        A do_connect listener that rotates a token changes them; the Connector is then
        replaced (the resource guard, per destination, is kept).
        """
        connector = self.connector
        if connector is None or connector.kwargs != cparams:
            kwargs = dict(cparams)
            connector = Connector(kwargs, guard=self._guard_for(kwargs),
                                  gate=self._gate_for(kwargs),
                                  fail_fast=bool(self.options.storm_settings.get("fail_fast")))
            self.connector = connector
        return connector

    def _guard_for(self, kwargs: Dict[str, Any]) -> Optional[ResourceGuard]:
        host, port = driver.destination(kwargs)
        if not self.options.resource_guard or not port:
            return None  # opted out, or a unix socket: no ephemeral port to run out of
        if self.facts.is_async and not _is_ip_literal(host):
            return None  # its census resolves the host: a DNS lookup would block the loop
        guard = self._resource_guard
        if guard is None or (guard.host, guard.port) != (host, port):
            reserves = {name: getattr(self.options, name)
                        for name in ("fd_reserve", "port_reserve")
                        if getattr(self.options, name) is not None}
            guard = self._resource_guard = ResourceGuard(host, port, **reserves)
        return guard

    def _gate_for(self, kwargs: Dict[str, Any]) -> Optional[storm.ConnectGate]:
        """The process-wide gate toward this destination (shared with connguard pools that
        have the same settings): one bucket and one breaker per server."""
        if not self.options.storm_control:
            return None
        host, port = driver.destination(kwargs)
        policy = storm.policy_from_options(dict(self.options.storm_settings))
        host_gate = None
        if self.options.host_gate and self.facts.is_async:
            # Its slots are held per thread, and a loop's coroutines share one thread.
            warn("connguard: the host gate is not used by async engines (its slots are held "
                 "per thread); the process's own gate applies")
        elif self.options.host_gate:
            directory = self.options.host_gate if isinstance(self.options.host_gate, str) \
                else None
            host_gate = HostGate(host, port, policy.max_handshakes, directory)
        shared = []
        settings = self.options.coordination_settings
        coordinator = coordinator_of(self.options)
        if coordinator is not None and self.facts.is_async:
            warn("connguard: a shared coordinator (Redis) is not used by async engines: its "
                 "client would block the event loop; the process's own gate applies")
            coordinator = None
        if coordinator is not None:
            # The probe slot lapses a little after the longest a handshake may take.
            probe_timeout = float(kwargs.get("connect_timeout") or 10) + 1.0
            shared.append(coordination.CoordinatedGate(
                coordinator, coordination.destination_key(host, port, settings.key), policy,
                fail=settings.fail, probe_timeout=probe_timeout))
        return storm.gate_for(host, port, policy, host_gate, shared=shared)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loop_pause(seconds: float) -> None:
    """Wait without blocking the event loop: inside SQLAlchemy's greenlet, hand the loop an
    ``asyncio.sleep`` and come back when it is done."""
    from sqlalchemy.util import await_only

    await_only(asyncio.sleep(seconds))


def _tls_left_to_pymysql(dialect: Any, cargs: List[Any], cparams: Dict[str, Any]) -> bool:
    """Whether PyMySQL decides the TLS mode itself: the engine's DBAPI module is PyMySQL and
    no connect argument speaks of TLS (``ssl``, ``ssl_*``, or an option file, which may)."""
    return dialect.dbapi is pymysql and not cargs and not any(
        name.startswith(("ssl", "read_default")) for name in cparams)


def _preferred_tls_context(conn: Any) -> Optional[ssl.SSLContext]:
    """The context PyMySQL built for ``conn`` in its "preferred" TLS mode, if the server
    offered TLS (so that the connection uses it); None otherwise, and with PyMySQL < 1.2,
    which has no such mode."""
    if not isinstance(conn, pymysql.connections.Connection):
        return None
    context = getattr(conn, "ctx", None)
    offered = (getattr(conn, "server_capabilities", 0) or 0) & CLIENT.SSL
    return context if offered and isinstance(context, ssl.SSLContext) else None


_PYMYSQL_CONNECT = pymysql.connections.Connection.connect.__code__


def _close_stranded_socket(exc: BaseException) -> None:
    """Close the unix socket PyMySQL's ``Connection.connect`` left behind when connecting it
    failed.

    PyMySQL creates that socket before ``connect()`` and closes only ``self._sock``, which
    is not set yet: each failed attempt (a missing socket file, a full backlog) keeps a
    descriptor until a garbage-collector pass, then warns (ResourceWarning). connguard's own
    connections avoid it (``driver.GuardedConnection.connect``); connects made through the
    dialect run PyMySQL's, so the socket is found in that call's frame, which the error's
    traceback keeps, and closed here. Does nothing when PyMySQL has no such frame or local.
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is _PYMYSQL_CONNECT:
            sock = frame.f_locals.get("sock")
            owner = frame.f_locals.get("self")
            if isinstance(sock, socket.socket) and sock is not getattr(owner, "_sock", None):
                sock.close()
            return
        tb = tb.tb_next
